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
