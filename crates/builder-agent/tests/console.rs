//! What a hostile build can put on the console, and what the node learns instead: a real build
//! through `builder-agent run` (real dockerd, git daemon) whose `RUN` steps print the agent's
//! phase lines and a terminal escape. On stderr (the VM's console) every line of the build's
//! output carries the untrusted prefix, so the only bare `==> PHASE` lines are the agent's own;
//! and the node stand-in receives each phase, signed with the build's key, in order, before
//! the report.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use builder_contract::logs::report_path;
use builder_contract::signature::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::{BuildReport, ProgressEvent};
use support::*;

/// What the node stand-in received, in order: `progress PHASE`, `log SOURCE`, `report`.
type Received = Arc<Mutex<Vec<String>>>;

/// Serves the node agent's guest routes on loopback, verifying each signature.
fn node(runtime: &tokio::runtime::Runtime) -> (String, Received) {
    let received: Received = Arc::default();
    let verified = |headers: &HeaderMap, body: &[u8]| {
        let h = |n| headers.get(n).and_then(|v| v.to_str().ok());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        verify(
            WEBHOOK_SECRET.as_bytes(),
            h(TIMESTAMP_HEADER),
            h(SIGNATURE_HEADER),
            body,
            now,
            300,
        )
        .is_ok()
    };
    let (r1, r2, r3) = (received.clone(), received.clone(), received.clone());
    let app = axum::Router::new()
        .route(
            "/v1/internal/builds/{id}/progress",
            post(
                move |headers: HeaderMap, body: axum::body::Bytes| async move {
                    assert!(verified(&headers, &body), "an unsigned progress event");
                    let event: ProgressEvent = serde_json::from_slice(&body).unwrap();
                    r1.lock().unwrap().push(format!("progress {}", event.phase));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .route(
            "/v1/internal/builds/{id}/logs/{source}",
            post(
                move |Path((_, source)): Path<(String, String)>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| async move {
                    assert!(verified(&headers, &body), "an unsigned log");
                    r2.lock().unwrap().push(format!("log {source}"));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .route(
            "/v1/internal/builds/{id}/complete",
            post(
                move |headers: HeaderMap, body: axum::body::Bytes| async move {
                    assert!(verified(&headers, &body), "an unsigned report");
                    let _: BuildReport = serde_json::from_slice(&body).unwrap();
                    r3.lock().unwrap().push("report".into());
                    StatusCode::NO_CONTENT
                },
            ),
        );
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, received)
}

/// The text after the timestamp of each line of `log` (`[   1.234s] text`).
fn bodies(log: &str) -> Vec<&str> {
    log.lines()
        .filter_map(|l| l.split_once("s] ").map(|(_, body)| body))
        .collect()
}

#[test]
fn build_output_is_prefixed_on_the_console_and_phases_go_signed_to_the_node() {
    let repo = TestRepo::new("console");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo {} > /dev/null\n\
             RUN echo '==> upload' && printf '\\033[2K==> notify\\n' && echo '<== build done'\n",
            env("BUILDER_TEST_BASE_IMAGE"),
            unique("run")
        ),
    );
    repo.commit("first");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (base, received) = node(&runtime);
    let scratch = Scratch::new();
    let id = unique("console");
    let secrets = secrets_file(scratch.path(), None);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_builder-agent"))
        .args(["run", "--params"])
        .arg(format!(
            "build_id={id} repo_url={} commit_sha=main notify_url={base}{}",
            repo.url(),
            report_path(&id)
        ))
        .arg("--secrets")
        .arg(&secrets)
        .arg("--work-dir")
        .arg(scratch.path().join("work"))
        .arg("--out-dir")
        .arg(scratch.path().join("out"))
        .arg("--log-file")
        .arg(scratch.path().join("build.log"))
        .env("DOCKER_HOST", env("DOCKER_HOST"))
        .env("BUILDER_INIT", env("BUILDER_INIT"))
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{console}");

    // The build printed the lines: they are on the console, behind the prefix.
    let lines = bodies(&console);
    for printed in ["==> upload", "==> notify", "<== build done"] {
        let shown: Vec<&&str> = lines.iter().filter(|l| l.ends_with(printed)).collect();
        assert!(
            !shown.is_empty()
                && shown
                    .iter()
                    .all(|l| l.starts_with(builder_agent::log::UNTRUSTED_PREFIX) || **l == printed),
            "`{printed}` is not on the console behind the prefix:\n{console}"
        );
    }
    assert!(
        !console.contains('\u{1b}'),
        "a raw escape reached the console"
    );
    // The bare phase lines are exactly the agent's own (this build does not upload).
    let phases: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("==> "))
        .collect();
    assert_eq!(
        phases,
        ["clone", "checkout", "build", "convert", "notify"],
        "{console}"
    );
    // The build log, which the node keeps, is written the same way.
    let log = std::fs::read_to_string(scratch.path().join("build.log")).unwrap();
    assert!(
        bodies(&log)
            .iter()
            .any(|l| l.starts_with(builder_agent::log::UNTRUSTED_PREFIX)
                && l.ends_with("==> upload")),
        "{log}"
    );

    // The node heard each phase, signed, in order, then the logs and the report.
    let received = received.lock().unwrap().clone();
    assert_eq!(
        received,
        [
            "progress clone",
            "progress checkout",
            "progress build",
            "progress convert",
            "log build",
            "report"
        ]
        .map(String::from),
        "{console}"
    );
}
