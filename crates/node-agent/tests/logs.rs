//! Each build's logs by source, the VM-facing listener and retention, on the daemon with real
//! databases (SQLite, and PostgreSQL in the `pg_` tests) and a shell script as the VM, whose
//! guest's posts the test makes as builder-agent would (signed, to the URLs of its spec).

mod common;

use std::time::Duration;

use builder_contract::LogSource;
use common::{Guest, Options, ScriptLauncher};
use serde_json::json;

const SECRET: &str = "npm-t0ken-value";
const CAP: u64 = 4096;

/// `GET /v1/builds/{id}/logs` with `query`: status and body.
async fn get_log(d: &common::Daemon, id: &str, query: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/builds/{id}/logs{query}", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_loopback_node_gets_the_vms_report_and_logs_on_its_vm_facing_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    // The console and the "VMM" (stderr) both print the secret; the VM waits to be told.
    let launcher = ScriptLauncher::new(&format!(
        "echo '==> build'; echo 'console says {SECRET}'; echo 'vmm says {SECRET}' >&2; sleep 30"
    ));
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            max_log_bytes: Some(CAP),
            ..Default::default()
        },
    )
    .await;
    // The default listen address is loopback, and so is the harness's.
    assert!(d.node.config.callback_url.is_none());
    assert!(d.base.starts_with("http://127.0.0.1:"));
    let api = d.client();
    let id = api.submit(json!({"secrets": {"npm": SECRET}})).await;
    api.wait_state(&id, "running", Duration::from_secs(10))
        .await;
    let guest = Guest::of(&launcher.spec(&id).unwrap());
    // The VM was pointed at its own listener, not at the operator's.
    let vm_base = format!(
        "http://{}:{}",
        guest.notify_url.host_str().unwrap(),
        guest.notify_url.port().unwrap()
    );
    assert_ne!(vm_base, d.base);

    // Nothing of the operator API, metrics or health is served there, token or not.
    let http = reqwest::Client::new();
    for path in [
        "/v1/builds",
        &format!("/v1/builds/{id}"),
        "/metrics",
        "/healthz",
    ] {
        let r = http
            .get(format!("{vm_base}{path}"))
            .bearer_auth(&d.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path} on the VM-facing listener");
    }
    let r = http
        .post(format!("{vm_base}/v1/builds"))
        .bearer_auth(&d.token)
        .json(&json!({"repo_url": "https://git.example/app.git", "ref": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The guest's logs: a small build log, and a dockerd log past the cap, both with the
    // secret in them.
    let build_log = format!("==> clone\nbuild step printed {SECRET}\n");
    let dockerd_log: String = (0..400)
        .map(|i| format!("time={i} level=info msg=\"pulling\" auth={SECRET}\n"))
        .collect();
    assert_eq!(guest.post_log(LogSource::Build, &build_log).await, 204);
    assert_eq!(guest.post_log(LogSource::Dockerd, &dockerd_log).await, 204);
    // Another key, or a source the guest does not send: refused.
    let url =
        builder_contract::logs::guest_log_url(&guest.notify_url, &id, LogSource::Build).unwrap();
    assert_eq!(guest.post_signed(&url, "not-the-key", b"x").await, 401);
    let mut console_url = url.clone();
    console_url.set_path(&builder_contract::logs::log_path(&id, "console"));
    assert_eq!(guest.post_signed(&console_url, &guest.key, b"x").await, 400);
    assert_eq!(
        guest
            .post_report(&common::failed_report(
                &id,
                builder_contract::ErrorClass::User,
                builder_contract::Phase::Build,
                "RUN exited with 1"
            ))
            .await,
        204
    );
    let b = api.wait_terminal(&id, Duration::from_secs(15)).await;
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(b["error"]["message"], "RUN exited with 1");
    // The listener went with the VM.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http.get(format!("{vm_base}/")).send().await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{vm_base} still listens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every source is kept scrubbed; the console is the default.
    let (status, console) = get_log(&d, &id, "").await;
    assert_eq!(status, 200);
    assert!(console.contains("console says ***"), "{console}");
    let (_, console_by_name) = get_log(&d, &id, "?source=console").await;
    assert_eq!(console_by_name, console);
    let (status, vmm) = get_log(&d, &id, "?source=vmm").await;
    assert_eq!(status, 200);
    assert_eq!(vmm, "vmm says ***\n");
    let (_, build) = get_log(&d, &id, "?source=build").await;
    assert_eq!(build, "==> clone\nbuild step printed ***\n");
    // Past the cap: the tail, from a line start, under a line saying what was cut.
    let (_, dockerd) = get_log(&d, &id, "?source=dockerd").await;
    assert!(dockerd.len() as u64 <= CAP, "{}", dockerd.len());
    let (marker, rest) = dockerd.split_once('\n').unwrap();
    assert!(
        marker.starts_with("[node-agent: the first ") && marker.contains("4096 bytes"),
        "{marker}"
    );
    assert!(rest.starts_with("time="), "{rest}");
    assert!(rest.ends_with("time=399 level=info msg=\"pulling\" auth=***\n"));
    for text in [&console, &vmm, &build, &dockerd] {
        assert!(!text.contains(SECRET), "{text}");
    }

    // An unknown source names the parameter and the valid ones.
    let (status, body) = get_log(&d, &id, "?source=kernel").await;
    assert_eq!(status, 400);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["field"], "source");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("\"kernel\"") && error.contains("console, vmm, build, dockerd"),
        "{error}"
    );

    // A build whose guest sent nothing: its console only; a source not kept is a 404.
    *launcher.script.lock().unwrap() = "echo 'no network'; exit 2".into();
    let quiet = api.submit(json!({})).await;
    api.wait_terminal(&quiet, Duration::from_secs(15)).await;
    let (status, body) = get_log(&d, &quiet, "?source=build").await;
    assert_eq!(status, 404);
    assert!(body.contains("has no build log"), "{body}");
    let (status, console) = get_log(&d, &quiet, "?source=console").await;
    assert_eq!((status, console.as_str()), (200, "no network\n"));

    // The CLI reads a source by name.
    let cli = |source: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["logs", &id, "--source", source, "--server", &d.base])
            .arg("--token-file")
            .arg(dir.path().join("api-token"))
            .output()
    };
    let out = cli("build").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "==> clone\nbuild step printed ***\n"
    );
    let out = cli("kernel").await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("console, vmm, build, dockerd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop().await;
}

/// Builds that ended long ago go with their events and logs, recent ones stay; signatures past
/// the replay window go; `retention_days = 0` keeps every build.
async fn retention(database_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let url = database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display()));
    let options = |retention_days| Options {
        database_url: database_url.clone(),
        retention_days: Some(retention_days),
        ..Default::default()
    };
    let launcher = ScriptLauncher::new("echo 'exiting'; exit 1");
    let d = common::start(dir.path(), launcher.clone(), options(14)).await;
    let api = d.client();
    let old = api.submit(json!({})).await;
    let recent = api.submit(json!({})).await;
    for id in [&old, &recent] {
        api.wait_terminal(id, Duration::from_secs(15)).await;
    }
    let logs_dir = dir.path().join("logs");
    std::fs::write(logs_dir.join(format!("{old}.vmm.log")), "vmm").unwrap();
    // A log of a build some other node pruned, last written long ago, and a recent one.
    let orphan = logs_dir.join("0000000000000000dead.log");
    let fresh_orphan = logs_dir.join("0000000000000000beef.log");
    std::fs::write(&orphan, "x").unwrap();
    std::fs::write(&fresh_orphan, "x").unwrap();
    assert!(std::process::Command::new("touch")
        .args(["-d", "30 days ago"])
        .arg(&orphan)
        .status()
        .unwrap()
        .success());
    d.stop().await;

    // Make `old` end 30 days ago; one signature old, one just seen.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let month_ago = node_agent::now_ms() - 30 * 86_400_000;
    sqlx::query("UPDATE builds SET finished_at_ms = $1 WHERE id = $2")
        .bind(month_ago)
        .bind(&old)
        .execute(&pool)
        .await
        .unwrap();
    for (signature, at_ms) in [("v1=old", month_ago), ("v1=new", node_agent::now_ms())] {
        sqlx::query("INSERT INTO seen_signatures (signature, build_id, at_ms) VALUES ($1, $2, $3)")
            .bind(signature)
            .bind(&old)
            .bind(at_ms)
            .execute(&pool)
            .await
            .unwrap();
    }
    let count = |sql: &'static str, id: String| {
        let pool = pool.clone();
        async move {
            let row = sqlx::query(sql).bind(id).fetch_one(&pool).await.unwrap();
            sqlx::Row::try_get::<i64, _>(&row, 0).unwrap()
        }
    };
    let events_sql = "SELECT COUNT(*) FROM build_events WHERE build_id = $1";
    let old_events = count(events_sql, old.clone()).await;
    assert!(old_events >= 3, "{old_events}");

    // Kept forever: the start's pass deletes only the old signature.
    let d = common::start(dir.path(), launcher.clone(), options(0)).await;
    assert_eq!(d.client().build(&old).await["state"], "failed");
    let signatures_sql = "SELECT COUNT(*) FROM seen_signatures WHERE build_id = $1";
    assert_eq!(count(signatures_sql, old.clone()).await, 1);
    d.stop().await;

    // 14 days: the start's pass prunes `old`, its events and logs, and the old orphan.
    let d = common::start(dir.path(), launcher, options(14)).await;
    let api = d.client();
    let (status, _) = api.get(&format!("/v1/builds/{old}")).await;
    assert_eq!(status, 404);
    assert_eq!(count(events_sql, old.clone()).await, 0);
    assert_eq!(api.build(&recent).await["state"], "failed");
    assert!(count(events_sql, recent.clone()).await >= 3);
    assert!(!logs_dir.join(format!("{old}.log")).exists());
    assert!(!logs_dir.join(format!("{old}.vmm.log")).exists());
    assert!(logs_dir.join(format!("{recent}.log")).exists());
    assert!(!orphan.exists());
    assert!(fresh_orphan.exists());
    let metrics = reqwest::get(format!("{}/metrics", d.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "node_agent_pruned_total{what=\"builds\"} 1".to_string(),
        format!("node_agent_pruned_total{{what=\"events\"}} {old_events}"),
        "node_agent_pruned_total{what=\"log_files\"} 3".to_string(),
    ] {
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    d.stop().await;
    pool.close().await;
}

#[tokio::test]
async fn retention_prunes_ended_builds_events_logs_and_old_signatures() {
    retention(None).await;
}

#[tokio::test]
async fn pg_retention_prunes_ended_builds_events_logs_and_old_signatures() {
    let pg = common::postgres().await;
    retention(Some(pg.url.clone())).await;
}
