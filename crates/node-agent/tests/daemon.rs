//! The daemon on loopback with real databases (SQLite, and PostgreSQL in the `pg_` tests) and
//! real child processes as VMs: API contract, auth, body limits, the state machine with signed
//! reports and replays, requester webhooks, timeouts, cancels, capacity, restart recovery,
//! drain, and two daemons sharing one PostgreSQL queue.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use builder_contract::signature::{sign, verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::{BuildReport, BuildStatus, Phase, PhaseTiming, RootfsArtifact};
use common::{Options, ScriptLauncher};
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test]
async fn api_contract_auth_validation_and_body_limits() {
    let dir = tempfile::tempdir().unwrap();
    let d = common::start(
        dir.path(),
        ScriptLauncher::new("sleep 30"),
        Options {
            capacity_vcpus: 1,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let http = reqwest::Client::new();

    // Health is open; the API is not.
    let r = http
        .get(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for token in [None, Some("wrong")] {
        let mut req = http.get(format!("{}/v1/builds", d.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }

    // Validation errors come from the build contract and name the field.
    for (body, field, words) in [
        (
            json!({"repo_url": "file:///etc", "ref": "main"}),
            "repo_url",
            "scheme `file`",
        ),
        (
            json!({"repo_url": "https://g.example/r", "commit_sha": "abc1234"}),
            "commit_sha",
            "abbreviated",
        ),
        (
            json!({"repo_url": "https://g.example/r", "ref": "main", "dockerfile": "../Dockerfile"}),
            "dockerfile",
            "climbs out",
        ),
        (
            json!({"repo_url": "https://g.example/r", "ref": "main", "s3_bucket": "Bad_Bucket", "s3_key": "k"}),
            "s3_bucket",
            "lower-case",
        ),
        (
            json!({"repo_url": "https://g.example/r", "ref": "main", "vcpus": 2}),
            "vcpus",
            "capacity",
        ),
        (
            json!({"repo_url": "https://g.example/r", "ref": "main", "egress_allow": ["example.com"]}),
            "egress_allow",
            "example.com",
        ),
    ] {
        let (status, v) = api.post("/v1/builds", &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["field"], field, "{v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{v}");
    }
    let (status, v) = api
        .post(
            "/v1/builds",
            &json!({"repo_url": "https://g.example/r", "ref": "main", "colour": 1}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{v}"
    );
    let r = http
        .post(format!("{}/v1/builds", d.base))
        .bearer_auth(&d.token)
        .header("content-type", "application/json")
        .body("{\"repo_url\":")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("not valid JSON"),
        "{v}"
    );
    let big = format!(
        "{{\"repo_url\":\"https://g.example/{}\"}}",
        "a".repeat(10_000)
    );
    let r = http
        .post(format!("{}/v1/builds", d.base))
        .bearer_auth(&d.token)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // A valid request is accepted, shown, listed and paged.
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(api.submit(json!({"requester": "alice"})).await);
    }
    let b = api.build(&ids[0]).await;
    assert_eq!(b["requester"], "alice");
    assert_eq!(b["revision"], "main");
    assert_eq!(b["events"][0]["to_state"], "queued");
    let (status, _) = api.get("/v1/builds/000000000000aaaaaaaaaaaa").await;
    assert_eq!(status, 404);
    let (_, page1) = api.get("/v1/builds?limit=2").await;
    assert_eq!(page1["builds"].as_array().unwrap().len(), 2);
    assert_eq!(page1["builds"][0]["id"].as_str().unwrap(), ids[2]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = api
        .get(&format!("/v1/builds?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["builds"].as_array().unwrap().len(), 1);
    assert_eq!(page2["builds"][0]["id"].as_str().unwrap(), ids[0]);
    assert_eq!(page2["next_cursor"], serde_json::Value::Null);
    let (status, v) = api.get("/v1/builds?state=bogus").await;
    assert_eq!(status, 400, "{v}");
    // The database filters by requester and by text in the repository URL (any case; `%` and
    // `_` are plain characters, not patterns).
    for (query, expected) in [
        ("requester=alice", 3),
        ("requester=bob", 0),
        ("repo=GIT.EXAMPLE%2Fapp", 3),
        ("repo=%25", 0),
        ("repo=git_example", 0),
        ("requester=alice&repo=other", 0),
    ] {
        let (status, v) = api.get(&format!("/v1/builds?{query}")).await;
        assert_eq!(status, 200, "{query}: {v}");
        assert_eq!(
            v["builds"].as_array().unwrap().len(),
            expected,
            "{query}: {v}"
        );
    }

    // One runs (capacity 1), two wait: metrics and the state filter agree.
    api.wait_state(&ids[0], "running", SECS(10)).await;
    let (_, queued) = api.get("/v1/builds?state=queued").await;
    assert_eq!(queued["builds"].as_array().unwrap().len(), 2);
    let metrics = http
        .get(format!("{}/metrics", d.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "node_agent_builds{state=\"queued\"} 2",
        "node_agent_builds{state=\"running\"} 1",
        "node_agent_queue_depth 2",
        "node_agent_running_vms 1",
        "node_agent_capacity_vcpus 1",
        "node_agent_used_vcpus 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let ready = http.get(format!("{}/readyz", d.base)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: serde_json::Value = ready.json().await.unwrap();
    let names: Vec<&str> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["script", "database", "disk", "vm_dns", "admitting"]);
    assert_eq!(
        ready["checks"][3]["detail"],
        common::TEST_VM_DNS.to_string(),
        "{ready}"
    );
    d.stop().await;
}

fn report(id: &str, status: BuildStatus) -> BuildReport {
    BuildReport {
        build_id: id.to_string(),
        status,
        repo_url: "https://git.example/app.git".into(),
        revision: "main".into(),
        commit_sha: Some("0123456789abcdef0123456789abcdef01234567".into()),
        image_digest: Some("sha256:abc".into()),
        inputs: None,
        rootfs: Some(RootfsArtifact {
            location: "s3://b/k".into(),
            config_location: "s3://b/k.json".into(),
            size_bytes: 1234,
            sha256: "ff".repeat(32),
            reused: false,
        }),
        error: None,
        phases: vec![PhaseTiming {
            phase: Phase::Build,
            duration_ms: 1500,
        }],
        started_at_unix_ms: 1,
        duration_ms: 2,
    }
}

async fn post_report(base: &str, id: &str, key: &str, body: &[u8], ts: u64) -> u16 {
    post_signed_report(base, id, &sign(key.as_bytes(), ts, body), body, ts)
        .await
        .0
}

/// Posts `body` as build `id`'s report with this signature header; the status and the answer.
async fn post_signed_report(
    base: &str,
    id: &str,
    signature: &str,
    body: &[u8],
    ts: u64,
) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/internal/builds/{id}/complete"))
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, signature)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn state_machine(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let hook = common::receiver().await;
    let launcher = ScriptLauncher::new(
        "echo '[ 0.1s] ==> clone'; sleep 0.6; echo '[ 0.8s] ==> upload'; sleep 2",
    );
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            database_url,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    // A key of its own: the SQLite and PostgreSQL runs upload at once.
    let s3_key = format!("state-machine/{}.ext4", node_agent::random_hex(8));
    let id = api
        .submit(json!({"notify_url": hook.url, "s3_key": s3_key}))
        .await;
    api.wait_state(&id, "running", SECS(10)).await;
    let spec = launcher.spec(&id).unwrap();
    // The guest's signed progress moves the build (its console's phase lines do not: see
    // tests/progress.rs).
    let guest = common::Guest::of(&spec);
    assert_eq!(guest.post_progress(Phase::Clone).await, 204);
    assert_eq!(guest.post_progress(Phase::Upload).await, 204);
    api.wait_state(&id, "uploading", SECS(10)).await;
    let key = spec.secrets.webhook_secret.clone().unwrap();
    assert_eq!(key.len(), 64);
    assert!(spec
        .params
        .notify_url
        .as_ref()
        .unwrap()
        .as_str()
        .ends_with(&format!("/v1/internal/builds/{id}/complete")));
    assert_eq!(spec.cpus.len(), 1);

    // A succeeded report stands only with an upload the node verified.
    let rootfs = common::Guest::of(&spec).upload_rootfs(&[7; 1234]).await;
    let succeeded = BuildReport {
        rootfs: Some(rootfs.clone()),
        ..report(&id, BuildStatus::Succeeded)
    };
    let body = serde_json::to_vec(&succeeded).unwrap();
    let now = (node_agent::now_ms() / 1000) as u64;
    // Wrong key, stale timestamp, another build's report: refused.
    assert_eq!(
        post_report(&d.base, &id, "not-the-key", &body, now).await,
        401
    );
    assert_eq!(
        post_report(&d.base, &id, &key, &body, now - 3600).await,
        401
    );
    let other = serde_json::to_vec(&report("0000000000000000", BuildStatus::Succeeded)).unwrap();
    assert_eq!(post_report(&d.base, &id, &key, &other, now).await, 400);
    assert_eq!(post_report(&d.base, &id, &key, &body, now).await, 204);
    // The same signed report again is a replay, also when its signature is spelled otherwise.
    assert_eq!(post_report(&d.base, &id, &key, &body, now).await, 409);
    let signature = sign(key.as_bytes(), now, &body);
    let respelled = format!("v1={}", signature["v1=".len()..].to_uppercase());
    let (status, answer) = post_signed_report(&d.base, &id, &respelled, &body, now).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("(replay)"), "{answer}");

    let b = api.wait_terminal(&id, SECS(10)).await;
    assert_eq!(b["state"], "succeeded", "{b}");
    assert_eq!(b["rootfs"]["location"], format!("s3://rootfs/{s3_key}"));
    assert_eq!(b["rootfs"]["size_bytes"], 1234);
    assert_eq!(b["commit_sha"], "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(b["timings"]["phases"][0]["phase"], "build");
    let states = common::states(&b);
    assert_eq!(
        states,
        ["queued", "starting", "running", "uploading", "succeeded"]
    );
    // The VM powered off by itself after reporting.
    assert_eq!(b["vmm_exit_code"], 0, "{b}");

    // Exactly one webhook, signed with the node's notify secret, carrying the report.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = hook.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 1);
    let secret = std::fs::read_to_string(dir.path().join("notify-secret")).unwrap();
    let (headers, hit) = &hits[0];
    let h = |n| headers.get(n).and_then(|v| v.to_str().ok());
    verify(
        secret.as_bytes(),
        h(TIMESTAMP_HEADER),
        h(SIGNATURE_HEADER),
        hit,
        now,
        300,
    )
    .unwrap();
    let got: BuildReport = serde_json::from_slice(hit).unwrap();
    assert_eq!(got, succeeded);
    assert_eq!(api.build(&id).await["webhook"]["state"], "delivered");
    // The console log is kept and served.
    let log = reqwest::Client::new()
        .get(format!("{}/v1/builds/{id}/logs", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("==> upload"), "{log}");
    let metrics = reqwest::get(format!("{}/metrics", d.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("node_agent_phase_duration_seconds_count{phase=\"build\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("node_agent_vmm_exits_total{code=\"0\"} 1"),
        "{metrics}"
    );
    d.stop().await;
}

#[tokio::test]
async fn state_machine_signed_report_replay_and_one_webhook() {
    state_machine(None).await;
}

#[tokio::test]
async fn pg_state_machine_signed_report_replay_and_one_webhook() {
    let pg = common::postgres().await;
    state_machine(Some(pg.url.clone())).await;
}

#[tokio::test]
async fn vm_exit_without_report_fails_with_console_tail_and_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let hook = common::receiver().await;
    let d = common::start(
        dir.path(),
        ScriptLauncher::new("echo '==> clone'; echo 'fatal: repository not found'; exit 3"),
        Options::default(),
    )
    .await;
    let api = d.client();
    let id = api.submit(json!({"notify_url": hook.url})).await;
    let b = api.wait_terminal(&id, SECS(15)).await;
    assert_eq!(b["state"], "failed");
    assert_eq!(b["error"]["class"], "internal");
    // The console's `==> clone` is not believed: no signed progress, no phase reached.
    assert_eq!(b["error"]["phase"], "params");
    assert_eq!(b["vmm_exit_code"], 3);
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("without reporting") && msg.contains("repository not found"),
        "{msg}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = hook.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 1);
    let got: BuildReport = serde_json::from_slice(&hits[0].1).unwrap();
    assert_eq!(got.status, BuildStatus::Failed);
    assert!(got.error.unwrap().message.contains("repository not found"));
    d.stop().await;
}

#[tokio::test]
async fn timeout_kills_the_vm_and_cancel_stops_running_and_queued_builds() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("echo booted; sleep 60");
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            capacity_vcpus: 1,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let timed = api.submit(json!({"timeout_s": 1})).await;
    let b = api.wait_terminal(&timed, SECS(10)).await;
    assert_eq!(b["state"], "timed_out");
    assert_eq!(b["error"]["class"], "user");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 s time limit"),
        "{b}"
    );
    let pid = launcher.pids.lock().unwrap()[0];
    assert!(
        !common::pid_alive(pid),
        "the timed-out VM {pid} is still running"
    );

    let running = api.submit(json!({})).await;
    let queued = api.submit(json!({})).await;
    api.wait_state(&running, "running", SECS(10)).await;
    let (status, v) = api
        .post(&format!("/v1/builds/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!((status, v["state"].as_str()), (202, Some("cancelled")));
    let (status, _) = api
        .post(&format!("/v1/builds/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let b = api.wait_terminal(&running, SECS(10)).await;
    assert_eq!(b["state"], "cancelled");
    assert!(!common::pid_alive(launcher.pids.lock().unwrap()[1]));
    assert_eq!(api.build(&queued).await["state"], "cancelled");
    // A cancelled build stays cancelled; a finished one cannot be cancelled.
    let (status, _) = api
        .post(&format!("/v1/builds/{timed}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(launcher.running.load(Ordering::SeqCst), 0);
    d.stop().await;
}

async fn capacity(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("sleep 0.05");
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            database_url,
            capacity_vcpus: 2,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let mut ids = vec![];
    for _ in 0..50 {
        ids.push(api.submit(json!({})).await);
    }
    for id in &ids {
        let b = api.wait_terminal(id, SECS(60)).await;
        assert_eq!(b["state"], "failed", "{b}");
    }
    assert_eq!(launcher.launched.lock().unwrap().len(), 50);
    let max = launcher.max_running.load(Ordering::SeqCst);
    assert_eq!(max, 2, "at most 2 VMs at once, and the capacity is used");
    d.stop().await;
}

#[tokio::test]
async fn fifty_builds_capacity_two_never_more_than_two_running() {
    capacity(None).await;
}

#[tokio::test]
async fn restart_fails_running_builds_requeues_starting_ones_and_counts_reclaimed() {
    use node_agent::db::{Db, NewBuild, Update};
    use node_agent::model::{BuildRequest, BuildState};
    let dir = tempfile::tempdir().unwrap();
    let hook = common::receiver().await;
    // What a node killed with -9 leaves in its database: one build running, one claimed but
    // not started yet.
    let db_url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
    let db = Db::open(&db_url).await.unwrap();
    let request: BuildRequest = serde_json::from_value(json!({"repo_url": "https://g.example/r", "ref": "main", "vcpus": 1, "mem_mib": 512, "s3_bucket": "rootfs", "s3_key": "app.rootfs", "notify_url": hook.url})).unwrap();
    let mut ids = vec![];
    for target in [BuildState::Running, BuildState::Starting] {
        let id = node_agent::new_build_id();
        db.insert(&NewBuild {
            id: id.clone(),
            request: request.clone(),
            credentials: Default::default(),
            pinned_node: None,
            requester: "t".into(),
            revision: "main".into(),
            timeout_s: 600,
            created_at_ms: node_agent::now_ms(),
        })
        .await
        .unwrap();
        db.transition(
            &id,
            &[BuildState::Queued],
            BuildState::Starting,
            "test-node",
            "admitted",
            Update::default().set("node_id", "test-node"),
        )
        .await
        .unwrap()
        .unwrap();
        if target == BuildState::Running {
            db.transition(
                &id,
                &[BuildState::Starting],
                BuildState::Running,
                "test-node",
                "VM started",
                Update::default(),
            )
            .await
            .unwrap()
            .unwrap();
        }
        ids.push(id);
    }
    drop(db);
    let (running, waiting) = (&ids[0], &ids[1]);

    let mut launcher = ScriptLauncher::new("sleep 0.1");
    std::sync::Arc::get_mut(&mut launcher).unwrap().reclaimable = 7;
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            capacity_vcpus: 1,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let b = api.build(running).await;
    assert_eq!(b["state"], "failed");
    assert_eq!(b["error"]["class"], "internal");
    assert_eq!(b["error"]["message"], "node agent restarted");
    let w = api.wait_terminal(waiting, SECS(10)).await;
    let states = common::states(&w);
    assert_eq!(
        &states[..4],
        ["queued", "starting", "queued", "starting"],
        "{w}"
    );
    assert!(launcher.spec(waiting).is_some());
    assert!(
        launcher.spec(running).is_none(),
        "a build that was running is not run again"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = hook.hits.lock().unwrap().clone();
    let reports: Vec<BuildReport> = hits
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect();
    assert_eq!(reports.len(), 2, "one webhook per build");
    assert!(reports.iter().any(|r| &r.build_id == running
        && r.error
            .as_ref()
            .unwrap()
            .message
            .contains("node agent restarted")));
    let metrics = reqwest::get(format!("{}/metrics", d.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("node_agent_reclaimed_total 7"),
        "{metrics}"
    );
    d.stop().await;
}

#[tokio::test]
async fn drain_refuses_new_builds_and_cancels_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("sleep 60");
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            grace_period_s: 1,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let id = api.submit(json!({})).await;
    api.wait_state(&id, "running", SECS(10)).await;
    let node = d.node.clone();
    let started = std::time::Instant::now();
    let stop = tokio::spawn(d.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, v) = api
        .post(
            "/v1/builds",
            &json!({"repo_url": "https://g.example/r", "ref": "main", "vcpus": 1}),
        )
        .await;
    assert_eq!(status, 503, "{v}");
    stop.await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let row = node.db.get(&id).await.unwrap().unwrap();
    assert_eq!(row.state, node_agent::model::BuildState::Cancelled);
    assert_eq!(
        row.error_message.as_deref(),
        Some("the node agent is shutting down")
    );
    assert_eq!(launcher.running.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn pg_two_daemons_share_one_queue_without_running_a_build_twice() {
    let pg = common::postgres().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (la, lb) = (
        ScriptLauncher::new("sleep 0.05"),
        ScriptLauncher::new("sleep 0.05"),
    );
    let a = common::start(
        dir_a.path(),
        la.clone(),
        Options {
            database_url: Some(pg.url.clone()),
            node_id: "node-a".into(),
            ..Default::default()
        },
    )
    .await;
    let b = common::start(
        dir_b.path(),
        lb.clone(),
        Options {
            database_url: Some(pg.url.clone()),
            node_id: "node-b".into(),
            ..Default::default()
        },
    )
    .await;
    let (api_a, api_b) = (a.client(), b.client());
    let mut ids = vec![];
    for i in 0..40 {
        ids.push(if i % 2 == 0 {
            api_a.submit(json!({})).await
        } else {
            api_b.submit(json!({})).await
        });
    }
    for id in &ids {
        let b = api_a.wait_terminal(id, SECS(60)).await;
        let starts = b["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["to_state"] == "starting")
            .count();
        assert_eq!(starts, 1, "{b}");
    }
    let mut launched: Vec<String> = la
        .launched
        .lock()
        .unwrap()
        .iter()
        .chain(lb.launched.lock().unwrap().iter())
        .map(|s| s.build_id.clone())
        .collect();
    let (na, nb) = (
        la.launched.lock().unwrap().len(),
        lb.launched.lock().unwrap().len(),
    );
    launched.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(launched, expected, "every build ran exactly once");
    assert!(na > 0 && nb > 0, "both nodes took work: {na} + {nb}");
    assert!(
        la.max_running.load(Ordering::SeqCst) <= 2 && lb.max_running.load(Ordering::SeqCst) <= 2
    );
    a.stop().await;
    b.stop().await;
}

/// A SQLite URL without `mode` creates its file, and a request without `vcpus`/`mem_mib` on a
/// node smaller than the defaults gets them clamped to the node (what is stored, shown and
/// launched), while an explicit value above the capacity is still refused.
#[tokio::test]
async fn a_new_sqlite_file_and_defaults_that_fit_a_small_node() {
    let dir = tempfile::tempdir().unwrap();
    let db_file = dir.path().join("db/new.db");
    let launcher = ScriptLauncher::new("sleep 30");
    let d = common::start(
        &dir.path().join("work"),
        launcher.clone(),
        Options {
            database_url: Some(format!("sqlite://{}", db_file.display())),
            capacity_vcpus: 1,
            ..Default::default()
        },
    )
    .await;
    assert!(db_file.is_file(), "{} was not created", db_file.display());
    let api = d.client();
    let (status, v) = api
        .post(
            "/v1/builds",
            &json!({"repo_url": "https://git.example/app.git", "ref": "main", "s3_bucket": "rootfs", "s3_key": "app.rootfs"}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let b = api.wait_state(&id, "running", SECS(20)).await;
    assert_eq!(
        (&b["vcpus"], &b["mem_mib"]),
        (&json!(1), &json!(2048)),
        "{b}"
    );
    let spec = launcher.spec(&id).unwrap();
    assert_eq!((spec.vcpus, spec.mem_mib), (1, 2048));
    let row = d.node.db.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (row.request.vcpus, row.request.mem_mib),
        (Some(1), Some(2048))
    );

    let (status, v) = api
        .post(
            "/v1/builds",
            &json!({"repo_url": "https://git.example/app.git", "ref": "main", "vcpus": 2}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["field"], "vcpus", "{v}");
    let (status, _) = api
        .post(&format!("/v1/builds/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    assert_eq!(api.wait_terminal(&id, SECS(20)).await["state"], "cancelled");
    d.stop().await;
}

/// The node keeps no build output: a build without `s3_bucket` would "succeed" with its rootfs
/// deleted with the VM, so it is refused at admission; so is a bucket on a node without S3
/// credentials, which has no way to upload.
#[tokio::test]
async fn builds_without_a_bucket_or_on_a_node_without_s3_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let with_s3 = common::start(
        &dir.path().join("with"),
        ScriptLauncher::new("exit 1"),
        Options::default(),
    )
    .await;
    let without_s3 = common::start(
        &dir.path().join("without"),
        ScriptLauncher::new("sleep 30"),
        Options {
            s3_credentials: false,
            ..Default::default()
        },
    )
    .await;
    let bare = json!({"repo_url": "https://git.example/app.git", "ref": "main", "vcpus": 1});
    let mut with_bucket = bare.clone();
    with_bucket["s3_bucket"] = json!("rootfs");
    with_bucket["s3_key"] = json!("app.rootfs");
    for (d, body, words) in [
        (&with_s3, &bare, "keeps no build output"),
        (&without_s3, &bare, "keeps no build output"),
        (&without_s3, &with_bucket, "no way to upload"),
    ] {
        let (status, v) = d.client().post("/v1/builds", body).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["field"], "s3_bucket", "{v}");
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(words), "{error}");
    }
    let (_, v) = without_s3.client().post("/v1/builds", &with_bucket).await;
    assert!(
        v["error"].as_str().unwrap().contains("s3_credentials_file"),
        "{v}"
    );
    // Nothing refused was stored.
    for d in [&with_s3, &without_s3] {
        let (status, v) = d.client().get("/v1/builds").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["builds"].as_array().map(Vec::len), Some(0), "{v}");
    }
    let (status, v) = with_s3.client().post("/v1/builds", &with_bucket).await;
    assert_eq!(status, 202, "{v}");
    with_s3.stop().await;
    without_s3.stop().await;
}
