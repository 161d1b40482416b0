//! The completion webhook: one signed POST of the [`BuildReport`], retried under the shared
//! [`RetryPolicy`] (`builder-retry`: exponential backoff with full jitter) while the receiver
//! is unreachable or answers 5xx/408/429 (honouring its `Retry-After`), given up on other 4xx.
//! The progress events go out through the same signed POST ([`post_signed`]) with fewer
//! attempts and a shorter limit.

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
    #[error("{url} refused the {what} with HTTP {status}")]
    Refused {
        url: Url,
        what: &'static str,
        status: StatusCode,
    },
    #[error("the {what} could not be delivered to {url} in {attempts} attempts: {last}")]
    GaveUp {
        url: Url,
        what: &'static str,
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

/// One signed JSON POST to the build's receiver, retried under `policy`: what the report and
/// the progress events ([`crate::phase_events`]) share.
pub struct SignedPost<'a> {
    pub url: &'a Url,
    pub secret: &'a [u8],
    pub body: &'a [u8],
    pub policy: RetryPolicy,
    /// The limit of one attempt (connecting takes at most 5 s of it).
    pub timeout: Duration,
    /// What is sent, for the log and errors: `report`, `upload progress event`.
    pub what: &'static str,
    /// What the log lines about it start with: `webhook`, `progress (upload)`.
    pub label: &'a str,
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
    post_signed(
        log,
        &SignedPost {
            url,
            secret,
            body: &body,
            policy,
            timeout: Duration::from_secs(15),
            what: "report",
            label: "webhook",
        },
    )
    .await
}

/// Sends one [`SignedPost`]; every retry and the outcome are logged under its label.
pub async fn post_signed(log: &BuildLog, request: &SignedPost<'_>) -> Result<(), NotifyError> {
    let SignedPost {
        url,
        secret,
        body,
        policy,
        timeout,
        what,
        label,
    } = *request;
    let client = reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
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
            .header(SIGNATURE_HEADER, sign(secret, timestamp, body))
            .body(body.to_vec())
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
        log.line(&format!("{label}: {}", retrying.describe(&text)));
    })
    .await;
    match result {
        Ok(status) => {
            log.line(&format!("{label}: delivered to {url} (HTTP {status})"));
            Ok(())
        }
        Err(gave_up) => {
            let last = gave_up.error.describe();
            log.line(&format!(
                "{label}: attempt {} of {} failed: {last}",
                gave_up.attempts,
                policy.attempts.max(1)
            ));
            match (gave_up.stop, gave_up.error) {
                (Stop::Final, AttemptError::Status { status, .. }) => Err(NotifyError::Refused {
                    url: url.clone(),
                    what,
                    status,
                }),
                _ => Err(NotifyError::GaveUp {
                    url: url.clone(),
                    what,
                    attempts: gave_up.attempts,
                    last,
                }),
            }
        }
    }
}
