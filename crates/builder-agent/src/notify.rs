//! The completion webhook: one signed POST of the [`BuildReport`], retried with exponential
//! backoff while the receiver is unreachable or answers 5xx/408/429, given up on other 4xx.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::BuildReport;
use reqwest::StatusCode;
use url::Url;

use crate::log::BuildLog;

/// How the webhook is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time, capped at 30 s.
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_secs(1),
        }
    }
}

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
    let mut delay = policy.first_delay;
    let mut last = String::new();
    for attempt in 1..=policy.attempts.max(1) {
        if attempt > 1 {
            log.line(&format!(
                "webhook: retrying in {:.1} s",
                delay.as_secs_f64()
            ));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        // Signed per attempt: the timestamp must be fresh for the receiver's replay window.
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let result = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(secret, timestamp, &body))
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => {
                log.line(&format!(
                    "webhook: delivered to {url} (HTTP {})",
                    response.status()
                ));
                return Ok(());
            }
            Ok(response) => {
                let status = response.status();
                let retryable = status.is_server_error()
                    || status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::TOO_MANY_REQUESTS;
                last = format!("HTTP {status}");
                log.line(&format!("webhook: attempt {attempt} answered {last}"));
                if !retryable {
                    return Err(NotifyError::Refused {
                        url: url.clone(),
                        status,
                    });
                }
            }
            Err(e) => {
                last = crate::error::chain(&e);
                log.line(&format!("webhook: attempt {attempt} failed: {last}"));
            }
        }
    }
    Err(NotifyError::GaveUp {
        url: url.clone(),
        attempts: policy.attempts.max(1),
        last,
    })
}
