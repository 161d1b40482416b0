//! The requester's webhook: exactly one per build, the build's final report, signed with the
//! node's notify secret (same headers and scheme as the guest's report), retried with
//! exponential backoff. Delivery state is kept in the build row so a restart resumes it.

use std::time::Duration;

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};

use crate::db::{BuildRow, Db, Update};

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

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
    },
}

async fn attempt(
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
        });
    }
    Ok(())
}

/// Delivers a finished build's report to its `notify_url`, recording every attempt.
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
    let mut delay = FIRST_RETRY;
    let mut done = row.webhook_attempts;
    loop {
        done += 1;
        let result = attempt(http, url, body.as_bytes(), secret).await;
        let (state, error) = match &result {
            Ok(()) => ("delivered", None),
            Err(e) if done >= i64::from(attempts) => ("failed", Some(crate::error_chain(e))),
            Err(e) => ("pending", Some(crate::error_chain(e))),
        };
        let update = Update::default()
            .set("webhook_state", state)
            .set("webhook_attempts", done)
            .set("webhook_error", error.clone());
        if let Err(e) = db.update(&row.id, update).await {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot record a webhook attempt"
            );
        }
        match state {
            "delivered" => {
                tracing::info!(
                    build_id = row.id,
                    attempts = done,
                    "requester webhook delivered"
                );
                return;
            }
            "failed" => {
                tracing::error!(
                    build_id = row.id,
                    attempts = done,
                    error,
                    "requester webhook abandoned"
                );
                return;
            }
            _ => {
                tracing::warn!(
                    build_id = row.id,
                    attempts = done,
                    error,
                    retry_in_ms = delay.as_millis() as u64,
                    "requester webhook failed"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }
}
