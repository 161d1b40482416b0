//! The requester's webhook: exactly one per build, the build's final report, signed with the
//! node's notify secret (same headers and scheme as the guest's report), retried under the
//! shared [`RetryPolicy`] (`builder-retry`: exponential backoff with full jitter, the guest
//! webhook's waits, `webhook_attempts` attempts; 5xx/408/429 and unreachable receivers are
//! retried, honouring `Retry-After`, other answers are final). Delivery state is kept in the
//! build row so a restart resumes it with the attempts left.

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_retry::{retry, RetryPolicy, Verdict};

use crate::db::{BuildRow, Db, Update};

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("the request to {url} failed")]
    Send {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        retry_after: Option<String>,
    },
}

impl AttemptError {
    fn verdict(&self) -> Verdict {
        match self {
            AttemptError::Send { .. } => Verdict::Retry,
            AttemptError::Status {
                status,
                retry_after,
                ..
            } => Verdict::for_http_status(status.as_u16(), retry_after.as_deref()),
        }
    }
}

async fn attempt_once(
    http: &reqwest::Client,
    url: &str,
    body: &[u8],
    secret: &[u8],
) -> Result<(), AttemptError> {
    let timestamp = (crate::now_ms() / 1000) as u64;
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, sign(secret, timestamp, body))
        .body(body.to_vec())
        .send()
        .await
        .map_err(|source| AttemptError::Send {
            url: url.to_string(),
            source,
        })?;
    if !response.status().is_success() {
        return Err(AttemptError::Status {
            url: url.to_string(),
            status: response.status(),
            retry_after: response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
    }
    Ok(())
}

/// Delivers a finished build's report to its `notify_url`, recording every attempt; `attempts`
/// counts those a previous run of the node made too.
pub async fn deliver(
    http: &reqwest::Client,
    db: &Db,
    row: &BuildRow,
    secret: &[u8],
    attempts: u32,
) {
    let (Some(url), Some(body)) = (&row.notify_url, &row.report) else {
        return;
    };
    let made_before = u32::try_from(row.webhook_attempts).unwrap_or(0);
    let policy = RetryPolicy {
        attempts: attempts.saturating_sub(made_before),
        ..RetryPolicy::default()
    };
    let record = |state: &'static str, attempt: u32, error: Option<String>| async move {
        let update = Update::default()
            .set("webhook_state", state)
            .set("webhook_attempts", i64::from(made_before + attempt))
            .set("webhook_error", error);
        if let Err(e) = db.update(&row.id, update).await {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot record a webhook attempt"
            );
        }
    };
    let send = |attempt| async move {
        let result = attempt_once(http, url, body.as_bytes(), secret).await;
        match &result {
            Ok(()) => record("delivered", attempt, None).await,
            Err(e) => record("pending", attempt, Some(crate::error_chain(e))).await,
        }
        result.map(|()| attempt)
    };
    let result = retry(&policy, send, AttemptError::verdict, |retrying| {
        tracing::warn!(
            build_id = row.id,
            attempts = made_before + retrying.attempt,
            error = crate::error_chain(retrying.error),
            retry_in_ms = retrying.delay.as_millis() as u64,
            "requester webhook failed"
        );
    })
    .await;
    match result {
        Ok(attempt) => tracing::info!(
            build_id = row.id,
            attempts = made_before + attempt,
            "requester webhook delivered"
        ),
        Err(gave_up) => {
            let error = crate::error_chain(&gave_up.error);
            record("failed", gave_up.attempts, Some(error.clone())).await;
            tracing::error!(
                build_id = row.id,
                attempts = made_before + gave_up.attempts,
                error,
                "requester webhook abandoned"
            );
        }
    }
}

/// The client requester webhooks go out with: a 30 s limit per attempt, and no redirects
/// followed (a redirect is the receiver's answer, a failure: a webhook URL cannot send the
/// node's signed report on to an address its admission never checked).
pub(crate) fn webhook_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a plain HTTP client builds")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::StatusCode;

    use super::*;
    use crate::db::NewBuild;
    use crate::model::BuildRequest;

    /// A receiver on loopback answering `statuses` in turn (the last one from then on); returns
    /// its URL and the number of requests it got.
    async fn scripted_receiver(statuses: &[u16]) -> (String, Arc<Mutex<usize>>) {
        let statuses = statuses.to_vec();
        let hits = Arc::new(Mutex::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let mut hits = counter.lock().unwrap();
                let status = statuses[(*hits).min(statuses.len() - 1)];
                *hits += 1;
                async move { StatusCode::from_u16(status).unwrap() }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, hits)
    }

    /// A finished build with a report for `url`, `made` deliveries already attempted.
    async fn finished_build(db: &Db, url: &str, made: i64) -> BuildRow {
        let request: BuildRequest = serde_json::from_value(serde_json::json!(
            {"repo_url": "https://g.example/r", "ref": "main", "notify_url": url}
        ))
        .unwrap();
        let row = db
            .insert(&NewBuild {
                id: crate::new_build_id(),
                request,
                credentials: Default::default(),
                pinned_node: None,
                requester: "t".into(),
                revision: "main".into(),
                timeout_s: 60,
                created_at_ms: crate::now_ms(),
            })
            .await
            .unwrap();
        let update = Update::default()
            .set("report", "{\"status\":\"failed\"}")
            .set("webhook_attempts", made);
        db.update(&row.id, update).await.unwrap();
        db.get(&row.id).await.unwrap().unwrap()
    }

    /// Delivers with `attempts` allowed; returns the row's webhook state, attempts and the
    /// receiver's hits.
    async fn deliver_to(statuses: &[u16], made: i64, attempts: u32) -> (String, i64, usize) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let (hook, hits) = scripted_receiver(statuses).await;
        let row = finished_build(&db, &hook, made).await;
        deliver(&webhook_client(), &db, &row, b"key", attempts).await;
        let row = db.get(&row.id).await.unwrap().unwrap();
        let hits = *hits.lock().unwrap();
        (row.webhook_state, row.webhook_attempts, hits)
    }

    #[tokio::test]
    async fn transient_answers_are_retried_until_delivered() {
        let (state, attempts, hits) = deliver_to(&[503, 429, 204], 0, 8).await;
        assert_eq!((state.as_str(), attempts, hits), ("delivered", 3, 3));
    }

    #[tokio::test]
    async fn a_refusal_is_final_at_once() {
        let (state, attempts, hits) = deliver_to(&[400, 204], 0, 8).await;
        assert_eq!((state.as_str(), attempts, hits), ("failed", 1, 1));
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (elsewhere, elsewhere_hits) = scripted_receiver(&[204]).await;
        let hits = Arc::new(Mutex::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                *counter.lock().unwrap() += 1;
                let to = elsewhere.clone();
                async move { (StatusCode::TEMPORARY_REDIRECT, [("location", to)]) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let row = finished_build(&db, &hook, 0).await;
        deliver(&webhook_client(), &db, &row, b"key", 8).await;
        let row = db.get(&row.id).await.unwrap().unwrap();
        assert_eq!(row.webhook_state, "failed");
        assert_eq!(*hits.lock().unwrap(), 1);
        assert_eq!(
            *elsewhere_hits.lock().unwrap(),
            0,
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn a_restart_resumes_with_the_attempts_left() {
        // 3 of 4 attempts were made before the restart: one more, then it is given up.
        let (state, attempts, hits) = deliver_to(&[503], 3, 4).await;
        assert_eq!((state.as_str(), attempts, hits), ("failed", 4, 1));
    }
}
