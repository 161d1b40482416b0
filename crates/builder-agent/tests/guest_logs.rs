//! `builder-agent run` reporting to a node agent's routes (a receiver that serves the report
//! route and the log route beside it, as the node agent does) hands over its build log before
//! its report, signed with the build's key, whether the build failed or succeeded; against
//! the real services started by `scripts/services.sh`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use builder_contract::logs::{log_path, report_path};
use builder_contract::signature::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::{BuildReport, BuildStatus};
use support::*;

/// What the node received, in order: `("build", log)` for a log, `("report", body)`.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A node agent's guest routes on loopback; posts whose signature does not verify are refused.
struct Node {
    base: String,
    received: Received,
    _runtime: tokio::runtime::Runtime,
}

fn verified(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    verify(
        WEBHOOK_SECRET.as_bytes(),
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        body,
        now,
        300,
    )
    .is_ok()
}

impl Node {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received = Received::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route(
                &report_path("{id}"),
                post(
                    |State(r): State<Received>, headers: HeaderMap, body: String| async move {
                        if !verified(&headers, body.as_bytes()) {
                            return StatusCode::UNAUTHORIZED;
                        }
                        r.lock().unwrap().push(("report".into(), body));
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .route(
                &log_path("{id}", "{source}"),
                post(
                    |State(r): State<Received>,
                     Path((_, source)): Path<(String, String)>,
                     headers: HeaderMap,
                     body: String| async move {
                        if !verified(&headers, body.as_bytes()) {
                            return StatusCode::UNAUTHORIZED;
                        }
                        r.lock().unwrap().push((source, body));
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(received.clone());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Node {
            base,
            received,
            _runtime: runtime,
        }
    }

    fn report_url(&self, build_id: &str) -> String {
        format!("{}{}", self.base, report_path(build_id))
    }

    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

#[test]
fn the_build_log_reaches_the_node_before_the_report_on_failure_and_success() {
    let node = Node::start();
    let repo = TestRepo::new("guestlogs");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo built-here\n",
            env("BUILDER_TEST_BASE_IMAGE")
        ),
    );
    repo.commit("first");
    let scratch = Scratch::new();

    // A commit the repository does not have: a user error in `clone`.
    let id = unique("guestlogs-fail");
    let absent = "0123456789abcdef0123456789abcdef01234567";
    let run = scratch.run_notifying(
        &format!("build_id={id} repo_url={} commit_sha={absent}", repo.url()),
        &node.report_url(&id),
        None,
        &[],
    );
    assert_eq!(run.report.status, BuildStatus::Failed, "{}", run.log);
    let received = node.take();
    let kinds: Vec<&str> = received.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["build", "report"], "{}", run.log);
    let (_, build_log) = &received[0];
    assert!(build_log.contains("==> clone"), "{build_log}");
    assert!(build_log.contains(absent), "{build_log}");
    // The log the node got is the log the agent wrote, up to the report it sent after it.
    assert!(run.log.starts_with(build_log.as_str()), "{build_log}");
    assert!(run.log.contains("logs: build log sent"), "{}", run.log);
    let report: BuildReport = serde_json::from_str(&received[1].1).unwrap();
    assert_eq!(report.build_id, id);

    // A build that succeeds hands it over too, with the build's own output in it.
    let id = unique("guestlogs-ok");
    let run = scratch.run_notifying(
        &format!("build_id={id} repo_url={} commit_sha=main", repo.url()),
        &node.report_url(&id),
        None,
        &[],
    );
    assert_eq!(run.report.status, BuildStatus::Succeeded, "{}", run.log);
    let received = node.take();
    let kinds: Vec<&str> = received.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["build", "report"], "{}", run.log);
    assert!(received[0].1.contains("built-here"), "{}", received[0].1);
    assert!(received[0].1.contains("==> convert"), "{}", received[0].1);

    // A webhook of the requester's own (not a node agent's report route) gets no logs.
    let hook = Receiver::start();
    let id = unique("guestlogs-hook");
    scratch.run_notifying(
        &format!("build_id={id} repo_url={} commit_sha={absent}", repo.url()),
        &hook.url,
        None,
        &[],
    );
    assert_eq!(hook.only_report().build_id, id);
    assert!(node.take().is_empty());
}
