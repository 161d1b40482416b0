//! The completion webhook: one signed POST of the [`BuildReport`], retried under the shared
//! [`RetryPolicy`] (`builder-retry`: exponential backoff with full jitter) while the receiver
//! is unreachable or answers 5xx/408/429 (honouring its `Retry-After`), given up on other 4xx.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::BuildReport;
use builder_retry::{retry, Stop, Verdict};
use reqwest::StatusCode;
use url::Url;

use crate::log::BuildLog;

/// How the webhook is retried: the shared policy, 6 attempts by default.
pub use builder_retry::RetryPolicy;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("the secrets file has no webhook_secret, so the report to {url} cannot be signed")]
    NoSecret { url: Url },
    #[error("the webhook receiver {url} refused the report with HTTP {status}")]
    Refused { url: Url, status: StatusCode },
    #[error("the webhook receiver {url} could not be reached after {attempts} attempts: {last}")]
    GaveUp {
        url: Url,
        attempts: u32,
        last: String,
    },
}

/// How one POST failed.
enum AttemptError {
    Status {
        status: StatusCode,
        retry_after: Option<String>,
    },
    Send(reqwest::Error),
}

impl AttemptError {
    fn verdict(&self) -> Verdict {
        match self {
            AttemptError::Status {
                status,
                retry_after,
            } => Verdict::for_http_status(status.as_u16(), retry_after.as_deref()),
            AttemptError::Send(_) => Verdict::Retry,
        }
    }

    fn describe(&self) -> String {
        match self {
            AttemptError::Status { status, .. } => format!("HTTP {status}"),
            AttemptError::Send(e) => crate::error::chain(e),
        }
    }
}

/// Sends `report` to `url`, signed with `secret`.
pub async fn deliver(
    log: &BuildLog,
    url: &Url,
    secret: &[u8],
    report: &BuildReport,
    policy: RetryPolicy,
) -> Result<(), NotifyError> {
    let body = serde_json::to_vec(report).expect("a report always serializes");
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()
        .expect("a client with timeouts always builds");
    let post = |_attempt| async {
        // Signed per attempt: the timestamp must be fresh for the receiver's replay window.
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let response = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(secret, timestamp, &body))
            .body(body.clone())
            .send()
            .await
            .map_err(AttemptError::Send)?;
        let status = response.status();
        if status.is_success() {
            return Ok(status);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Err(AttemptError::Status {
            status,
            retry_after,
        })
    };
    let result = retry(&policy, post, AttemptError::verdict, |retrying| {
        let text = retrying.error.describe();
        log.line(&format!("webhook: {}", retrying.describe(&text)));
    })
    .await;
    match result {
        Ok(status) => {
            log.line(&format!("webhook: delivered to {url} (HTTP {status})"));
            Ok(())
        }
        Err(gave_up) => {
            let last = gave_up.error.describe();
            log.line(&format!(
                "webhook: attempt {} of {} failed: {last}",
                gave_up.attempts,
                policy.attempts.max(1)
            ));
            match (gave_up.stop, gave_up.error) {
                (Stop::Final, AttemptError::Status { status, .. }) => Err(NotifyError::Refused {
                    url: url.clone(),
                    status,
                }),
                _ => Err(NotifyError::GaveUp {
                    url: url.clone(),
                    attempts: gave_up.attempts,
                    last,
                }),
            }
        }
    }
}
