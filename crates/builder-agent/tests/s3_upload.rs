//! The parallel multipart upload against the real SeaweedFS S3 of `scripts/services.sh`, seen
//! through a loopback proxy that counts the requests in flight and fails chosen parts: the
//! object is byte-identical with its metadata, at most `parts_in_flight` parts travel at once,
//! a transient 500 is retried, and a part that keeps failing aborts the upload and leaves no
//! multipart upload behind (checked with ListMultipartUploads on the server). Also the
//! `builder-agent upload` command that `scripts/bench-upload.sh` times.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use builder_contract::S3Credentials;
use builder_s3::{DirectUpload, ObjectAttributes, S3Client, S3Error, Uploader};
use support::{env, run, s3_get, sha256_hex, unique};

/// Part size of these tests: S3's smallest.
const PART: u64 = 5 << 20;

/// Which parts the proxy answers with HTTP 500 instead of forwarding.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// The first attempt of this part only.
    Once(u32),
    /// Every attempt of this part.
    Always(u32),
    /// The first CompleteMultipartUpload is forwarded, and its answer replaced by a 500: the
    /// upload is complete, but the client does not know; a second one is answered
    /// `NoSuchUpload` (SeaweedFS would answer 200 again; S3 may not).
    CompleteAnswerLost,
    /// Every CompleteMultipartUpload is answered `NoSuchUpload` without being forwarded.
    CompleteNoSuchUpload,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    fault: Fault,
    /// `METHOD partNumber` (`POST complete`, or `METHOD -`) of every request, in arrival order.
    requests: Arc<Mutex<Vec<String>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

/// A loopback proxy in front of the test S3 server. Requests keep their `Host` header, so the
/// client's SigV4 signature (made for the proxy's address) still verifies upstream.
struct Proxy {
    endpoint: String,
    state: ProxyState,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    fn start(fault: Fault) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = ProxyState {
            upstream: env("BUILDER_TEST_S3_ENDPOINT"),
            http: reqwest::Client::new(),
            fault,
            requests: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(forward)
            .layer(DefaultBodyLimit::disable())
            .with_state(state.clone());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Proxy {
            endpoint,
            state,
            _runtime: runtime,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How often part `number` was sent.
    fn part_attempts(&self, number: u32) -> usize {
        let needle = format!("PUT {number}");
        self.requests().iter().filter(|r| **r == needle).count()
    }
}

async fn forward(
    State(state): State<ProxyState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let part: Option<u32> = query.get("partNumber").and_then(|n| n.parse().ok());
    let seen = {
        let mut requests = state.requests.lock().unwrap();
        let entry = match part {
            Some(n) => format!("{method} {n}"),
            None if method == Method::POST && query.contains_key("uploadId") => {
                "POST complete".to_string()
            }
            None => format!("{method} -"),
        };
        requests.push(entry.clone());
        requests.iter().filter(|r| **r == entry).count()
    };
    let fail = match (state.fault, part) {
        (Fault::Once(n), Some(p)) => n == p && seen == 1,
        (Fault::Always(n), Some(p)) => n == p,
        _ => false,
    };
    if fail {
        let body = "<Error><Code>InternalError</Code><Message>injected by the test proxy</Message></Error>";
        return (StatusCode::INTERNAL_SERVER_ERROR, body).into_response();
    }
    let complete = method == Method::POST && query.contains_key("uploadId") && part.is_none();
    let gone = match state.fault {
        Fault::CompleteNoSuchUpload => true,
        // S3 need not remember a completed upload: its id is gone.
        Fault::CompleteAnswerLost => seen > 1,
        _ => false,
    };
    if complete && gone {
        let body =
            "<Error><Code>NoSuchUpload</Code><Message>injected by the test proxy</Message></Error>";
        return (StatusCode::NOT_FOUND, body).into_response();
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    if part.is_some() {
        // Hold each part a while, so parts sent at once overlap here however the CPU is shared.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let mut upstream_headers = headers.clone();
    upstream_headers.remove(axum::http::header::CONTENT_LENGTH);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let head = method == Method::HEAD;
    let result = state
        .http
        .request(method, format!("{}{path}", state.upstream))
        .headers(upstream_headers)
        .body(body)
        .send()
        .await;
    let response = match result {
        Ok(_) if complete && matches!(state.fault, Fault::CompleteAnswerLost) && seen == 1 => {
            (StatusCode::INTERNAL_SERVER_ERROR, "the answer was lost").into_response()
        }
        Ok(response) => {
            let status = response.status();
            let mut headers = response.headers().clone();
            // A HEAD answer's length is the object's; otherwise the body sets it.
            for hop in ["content-length", "transfer-encoding", "connection"] {
                if !(head && hop == "content-length") {
                    headers.remove(hop);
                }
            }
            let body = response.bytes().await.unwrap_or_default();
            (status, headers, body).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// A client of the test S3 server's credentials at `endpoint`, sending `parts_in_flight`
/// parts at once.
struct Client {
    s3: S3Client,
    parts_in_flight: usize,
}

fn client(endpoint: &str, parts_in_flight: usize) -> Client {
    Client {
        s3: S3Client::new(S3Credentials {
            endpoint: endpoint.to_string(),
            region: env("BUILDER_TEST_S3_REGION"),
            access_key_id: env("BUILDER_TEST_S3_ACCESS_KEY"),
            secret_access_key: env("BUILDER_TEST_S3_SECRET_KEY"),
            session_token: None,
        })
        .unwrap(),
        parts_in_flight,
    }
}

/// `len` incompressible bytes (xorshift), different for every `seed`.
fn random_file(dir: &Path, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    let path = dir.join("rootfs.ext4");
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// The metadata a build gives its rootfs.
fn metadata(sha256: &str) -> Vec<(String, String)> {
    vec![
        ("build-id".to_string(), "upload-test".to_string()),
        ("rootfs-sha256".to_string(), sha256.to_string()),
    ]
}

/// Uploads `path` as `key` through `client`, signing with its credentials (the direct
/// authorizer); returns the result and every progress call.
fn upload(
    client: &Client,
    key: &str,
    path: &Path,
    metadata: &[(String, String)],
) -> (Result<(), S3Error>, Vec<(u64, u64)>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut progress = Vec::new();
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let direct = DirectUpload::new(
        &client.s3,
        &bucket,
        key,
        ObjectAttributes {
            content_type: "application/octet-stream",
            metadata,
        },
    );
    let uploader = Uploader::default().with_parts_in_flight(client.parts_in_flight);
    let result = runtime.block_on(uploader.upload(&direct, path, None, PART, |sent, total| {
        progress.push((sent, total))
    }));
    (result, progress)
}

/// The upload ids the server still holds for `key` (ListMultipartUploads).
fn open_uploads(key: &str) -> Vec<String> {
    // curl 7.88 signs the query as written, so it is written in SigV4's sorted order.
    let xml = run(Command::new("curl")
        .args(["-sS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!(
            "{}:{}",
            env("BUILDER_TEST_S3_ACCESS_KEY"),
            env("BUILDER_TEST_S3_SECRET_KEY")
        ))
        .arg(format!(
            "{}/{}?prefix={key}&uploads=",
            env("BUILDER_TEST_S3_ENDPOINT"),
            env("BUILDER_TEST_S3_BUCKET")
        )));
    assert!(xml.contains("<ListMultipartUploadsResult"), "{xml}");
    xml.split("<UploadId>")
        .skip(1)
        .filter_map(|rest| rest.split("</UploadId>").next())
        .map(str::to_string)
        .collect()
}

/// Checks that [`open_uploads`] sees an upload the server holds: creates one, lists it, aborts
/// it. Without this a listing that never finds anything would pass every "nothing left" check.
fn assert_listing_finds_open_uploads() {
    let key = unique("s3-open-upload");
    let url = format!(
        "{}/{}/{key}",
        env("BUILDER_TEST_S3_ENDPOINT"),
        env("BUILDER_TEST_S3_BUCKET")
    );
    let curl = || {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!(
                "{}:{}",
                env("BUILDER_TEST_S3_ACCESS_KEY"),
                env("BUILDER_TEST_S3_SECRET_KEY")
            ));
        command
    };
    let created = run(curl().args(["-X", "POST"]).arg(format!("{url}?uploads=")));
    let id = created
        .split("<UploadId>")
        .nth(1)
        .and_then(|rest| rest.split("</UploadId>").next())
        .unwrap_or_else(|| panic!("no UploadId in {created}"))
        .to_string();
    assert_eq!(open_uploads(&key), std::slice::from_ref(&id));
    run(curl()
        .args(["-X", "DELETE"])
        .arg(format!("{url}?uploadId={id}")));
    assert!(open_uploads(&key).is_empty());
}

#[test]
fn parallel_parts_make_a_byte_identical_object_with_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    // Five parts, the last one short.
    let (path, bytes) = random_file(dir.path(), (4 * PART + 1234) as usize, 1);
    let sha256 = sha256_hex(&bytes);
    let proxy = Proxy::start(Fault::None);
    let key = unique("s3-parallel");
    let (result, progress) = upload(&client(&proxy.endpoint, 3), &key, &path, &metadata(&sha256));
    result.unwrap();

    let (status, headers, body) = s3_get(&env("BUILDER_TEST_S3_BUCKET"), &key);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(body.len(), bytes.len());
    assert!(body == bytes, "the object differs from the file");
    assert!(
        headers.contains(&format!("x-amz-meta-rootfs-sha256: {sha256}")),
        "{headers}"
    );
    assert!(
        headers.contains("x-amz-meta-build-id: upload-test"),
        "{headers}"
    );
    assert!(
        headers.contains("content-type: application/octet-stream"),
        "{headers}"
    );

    // One progress line per part, growing to the whole file.
    let total = bytes.len() as u64;
    assert_eq!(progress.len(), 5, "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0].0 < w[1].0), "{progress:?}");
    assert_eq!(progress.last(), Some(&(total, total)));

    // Several parts travelled at once, never more than asked for.
    let max = proxy.state.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "{max} requests in flight at most");
    for number in 1..=5 {
        assert_eq!(proxy.part_attempts(number), 1, "{:?}", proxy.requests());
    }
    assert!(open_uploads(&key).is_empty());
}

#[test]
fn a_complete_whose_answer_was_lost_is_recognised_by_the_object_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = random_file(dir.path(), (PART + 99) as usize, 4);
    let sha256 = sha256_hex(&bytes);
    let proxy = Proxy::start(Fault::CompleteAnswerLost);
    let key = unique("s3-complete-lost");
    let (result, _) = upload(&client(&proxy.endpoint, 2), &key, &path, &metadata(&sha256));
    result.unwrap();
    // The Complete was sent twice: the second found the upload gone, and the object was
    // recognised as this upload's by its metadata.
    let completes = proxy
        .requests()
        .iter()
        .filter(|r| *r == "POST complete")
        .count();
    assert_eq!(completes, 2, "{:?}", proxy.requests());
    let (status, headers, body) = s3_get(&env("BUILDER_TEST_S3_BUCKET"), &key);
    assert_eq!(status, 200, "{headers}");
    assert!(body == bytes, "the object differs from the file");
    assert!(open_uploads(&key).is_empty());

    // A NoSuchUpload at Complete with an object of other metadata at the key (an earlier
    // build's) stays a failure: that object is not taken for this upload's.
    let earlier = metadata(&"0".repeat(64));
    let (result, _) = upload(
        &client(&env("BUILDER_TEST_S3_ENDPOINT"), 2),
        &key,
        &path,
        &earlier,
    );
    result.unwrap();
    let proxy = Proxy::start(Fault::CompleteNoSuchUpload);
    let (result, _) = upload(&client(&proxy.endpoint, 2), &key, &path, &metadata(&sha256));
    let error = result.unwrap_err();
    assert!(error.to_string().contains("NoSuchUpload"), "{error}");
    assert!(open_uploads(&key).is_empty());
}

#[test]
fn a_transient_500_is_retried_and_the_upload_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = random_file(dir.path(), (2 * PART + 77) as usize, 2);
    let sha256 = sha256_hex(&bytes);
    let proxy = Proxy::start(Fault::Once(2));
    let key = unique("s3-transient");
    let (result, _) = upload(&client(&proxy.endpoint, 4), &key, &path, &metadata(&sha256));
    result.unwrap();

    assert_eq!(proxy.part_attempts(2), 2, "{:?}", proxy.requests());
    assert_eq!(proxy.part_attempts(1), 1, "{:?}", proxy.requests());
    let (status, headers, body) = s3_get(&env("BUILDER_TEST_S3_BUCKET"), &key);
    assert_eq!(status, 200, "{headers}");
    assert!(body == bytes, "the object differs from the file");
    assert!(open_uploads(&key).is_empty());
}

#[test]
fn a_part_that_keeps_failing_aborts_and_leaves_nothing() {
    assert_listing_finds_open_uploads();
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = random_file(dir.path(), (6 * PART) as usize, 3);
    let proxy = Proxy::start(Fault::Always(3));
    let key = unique("s3-failing");
    let (result, progress) = upload(
        &client(&proxy.endpoint, 4),
        &key,
        &path,
        &metadata(&sha256_hex(&bytes)),
    );
    let error = result.unwrap_err();
    let message = builder_agent::error::chain(&error);
    assert!(
        message.contains("UploadPart") && message.contains("failed 4 times"),
        "{message}"
    );
    assert!(message.contains("HTTP 500"), "{message}");
    assert_eq!(proxy.part_attempts(3), 4, "{:?}", proxy.requests());
    assert!(
        progress.iter().all(|(sent, total)| sent < total),
        "{progress:?}"
    );

    let requests = proxy.requests();
    assert!(
        requests.contains(&"DELETE -".to_string()),
        "no abort: {requests:?}"
    );
    let posts = requests.iter().filter(|r| *r == "POST -").count();
    assert_eq!(posts, 1, "created once, never completed: {requests:?}");
    assert_eq!(s3_get(&env("BUILDER_TEST_S3_BUCKET"), &key).0, 404);
    assert!(open_uploads(&key).is_empty(), "the upload was left open");
}

#[test]
fn the_upload_command_lands_the_file_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = random_file(dir.path(), (PART + 99) as usize, 4);
    let secrets = support::secrets_file(dir.path(), None);
    let key = unique("s3-command");
    let agent = |bucket: &str| {
        Command::new(env!("CARGO_BIN_EXE_builder-agent"))
            .arg("upload")
            .arg(&path)
            .arg("--secrets")
            .arg(&secrets)
            .args(["--bucket", bucket, "--key", &key, "--parts-in-flight", "2"])
            .output()
            .unwrap()
    };
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let out = agent(&bucket);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["location"], format!("s3://{bucket}/{key}"));
    assert_eq!(json["parts_in_flight"], 2);
    assert!(json["seconds"].as_f64().unwrap() > 0.0, "{json}");
    let (status, _, body) = s3_get(&bucket, &key);
    assert_eq!(status, 200);
    assert!(body == bytes, "the object differs from the file");

    let out = agent("Not_A_Bucket");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("s3_bucket"), "{stderr}");
}
