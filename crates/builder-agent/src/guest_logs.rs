//! Hands the guest's own logs (the build log, the Docker daemon's) to the node agent before
//! the report, so they outlive the VM: the last [`MAX_GUEST_LOG_BYTES`] of each, scrubbed of
//! the build's secrets, posted to the route beside the report's ([`guest_log_url`]) and signed
//! like the report with the build's key. A log that cannot be read or sent is logged and the
//! build goes on: the report matters more than its logs.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use builder_contract::logs::{guest_log_url, MAX_GUEST_LOG_BYTES};
use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::LogSource;
use url::Url;

use crate::log::BuildLog;

/// Attempts per log; a log is worth less than the report, so fewer than its retries.
const ATTEMPTS: u32 = 3;
const RETRY_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GuestLogError {
    #[error("cannot read the {source_name} log {path}")]
    Read {
        source_name: LogSource,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node agent refused the {source_name} log at {url} with HTTP {status}")]
    Refused {
        source_name: LogSource,
        url: Url,
        status: reqwest::StatusCode,
    },
    #[error("the {source_name} log could not be sent to {url} in {ATTEMPTS} attempts: {last}")]
    GaveUp {
        source_name: LogSource,
        url: Url,
        last: String,
    },
}

/// The last `max` bytes of the file at `path`, from a line start when cut, each line scrubbed.
pub fn read_tail(log: &BuildLog, path: &Path, max: u64) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = match (start > 0, text.find('\n')) {
        (true, Some(i)) => &text[i + 1..],
        _ => &text[..],
    };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        out.push_str(&log.scrub(line));
    }
    Ok(out)
}

/// Sends each of `logs` that exists to the node agent behind `notify_url`; nothing when that
/// is not the node agent's report route of `build_id`.
pub async fn send(
    log: &BuildLog,
    notify_url: &Url,
    build_id: &str,
    secret: &[u8],
    logs: &[(LogSource, &Path)],
) {
    for &(source, path) in logs {
        let Some(url) = guest_log_url(notify_url, build_id, source) else {
            continue;
        };
        match send_one(log, &url, secret, source, path).await {
            Ok(bytes) => log.line(&format!("logs: {source} log sent ({bytes} bytes)")),
            Err(e) => log.line(&format!("warning: logs: {}", crate::error::chain(&e))),
        }
    }
}

async fn send_one(
    log: &BuildLog,
    url: &Url,
    secret: &[u8],
    source: LogSource,
    path: &Path,
) -> Result<usize, GuestLogError> {
    let body = read_tail(log, path, MAX_GUEST_LOG_BYTES).map_err(|e| GuestLogError::Read {
        source_name: source,
        path: path.to_path_buf(),
        source: e,
    })?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client with timeouts always builds");
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(RETRY_DELAY).await;
        }
        // Signed per attempt, like the report: the timestamp must be fresh.
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let result = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(secret, timestamp, body.as_bytes()))
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => return Ok(body.len()),
            Ok(response) if !response.status().is_server_error() => {
                return Err(GuestLogError::Refused {
                    source_name: source,
                    url: url.clone(),
                    status: response.status(),
                })
            }
            Ok(response) => last = format!("HTTP {}", response.status()),
            Err(e) => last = crate::error::chain(&e),
        }
    }
    Err(GuestLogError::GaveUp {
        source_name: source,
        url: url.clone(),
        last,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::HeaderMap;
    use builder_contract::signature::verify;

    use super::*;

    #[test]
    fn the_tail_starts_at_a_line_and_is_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dockerd.log");
        std::fs::write(&path, "first line\nsecond hunter2 line\nthird hunter2\n").unwrap();
        let mut log = BuildLog::create(None, false).unwrap();
        log.redact(["hunter2".to_string()]);
        assert_eq!(
            read_tail(&log, &path, 1 << 20).unwrap(),
            "first line\nsecond [REDACTED] line\nthird [REDACTED]\n"
        );
        // 30 bytes from the end start inside the second line, which goes whole.
        assert_eq!(read_tail(&log, &path, 30).unwrap(), "third [REDACTED]\n");
    }

    #[tokio::test]
    async fn each_log_is_posted_signed_beside_the_report_route_and_nowhere_else() {
        type Hits = Arc<Mutex<Vec<(String, HeaderMap, String)>>>;
        let hits: Hits = Arc::default();
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/v1/internal/builds/{id}/logs/{source}",
            axum::routing::post(
                move |axum::extract::Path((_, source)): axum::extract::Path<(String, String)>,
                      headers: HeaderMap,
                      body: String| {
                    let h = h.clone();
                    async move {
                        h.lock().unwrap().push((source, headers, body));
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("build.log");
        let dockerd = dir.path().join("dockerd.log");
        std::fs::write(&build, "==> clone\n").unwrap();
        std::fs::write(&dockerd, "level=info token=s3cr3t\n").unwrap();
        let none = dir.path().join("none");
        let mut log = BuildLog::create(None, false).unwrap();
        log.redact(["s3cr3t".to_string()]);
        let logs = [
            (LogSource::Build, build.as_path()),
            (LogSource::Dockerd, dockerd.as_path()),
            // Missing: logged, the others still go.
            (LogSource::Build, none.as_path()),
        ];
        let report = Url::parse(&format!("http://{addr}/v1/internal/builds/b1/complete")).unwrap();
        send(&log, &report, "b1", b"key", &logs[..2]).await;
        send(&log, &report, "b1", b"key", &logs[2..]).await;
        // A webhook of the requester's own gets no logs.
        let elsewhere = Url::parse(&format!("http://{addr}/hook")).unwrap();
        send(&log, &elsewhere, "b1", b"key", &logs).await;

        let hits = hits.lock().unwrap().clone();
        let sources: Vec<&str> = hits.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!(sources, ["build", "dockerd"]);
        assert_eq!(hits[1].2, "level=info token=[REDACTED]\n");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (_, headers, body) in &hits {
            let h = |n| headers.get(n).and_then(|v| v.to_str().ok());
            verify(
                b"key",
                h(TIMESTAMP_HEADER),
                h(SIGNATURE_HEADER),
                body.as_bytes(),
                now,
                300,
            )
            .unwrap();
        }
    }
}
