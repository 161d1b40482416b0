//! A build's phase and `running -> uploading` come only from the guest's signed progress events:
//! the console, which a build can print anything into, moves nothing; an event signed with
//! another key, replayed, about another build, out of order or for an ended build is refused.
//! On the daemon with a real SQLite database and a shell script as the VM, whose guest's posts
//! the test makes as builder-agent would.

mod common;

use std::time::Duration;

use builder_contract::progress::{progress_path, progress_url};
use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::{Phase, ProgressEvent};
use common::{Guest, Options, ScriptLauncher};
use serde_json::json;

/// What a hostile build prints: the agent's phase lines, bare and as the build log writes them.
const FORGED_CONSOLE: &str = "echo '==> upload'; echo '[   9.000s] ==> upload'; \
                              echo 'Kernel panic - not syncing: forged'; sleep 30";

fn event(id: &str, phase: Phase) -> Vec<u8> {
    serde_json::to_vec(&ProgressEvent {
        build_id: id.to_string(),
        phase,
        at_unix_ms: node_agent::now_ms() as u64,
    })
    .unwrap()
}

/// Posts `body` to `url` signed with `key` at `timestamp`: the status and the answer.
async fn post_at(url: &url::Url, key: &str, timestamp: u64, body: &[u8]) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url.clone())
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, sign(key.as_bytes(), timestamp, body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn only_the_guests_signed_progress_moves_a_build() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new(FORGED_CONSOLE);
    let d = common::start(dir.path(), launcher.clone(), Options::default()).await;
    let api = d.client();
    let id = api.submit(json!({})).await;
    api.wait_state(&id, "running", Duration::from_secs(10))
        .await;
    let guest = Guest::of(&launcher.spec(&id).unwrap());
    let url = progress_url(&guest.notify_url, &id).unwrap();

    // The console says upload, several times over, and the supervisor has looked at it
    // (it ticks every 0.5 s): nothing moved.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = api.build(&id).await;
    assert_eq!(
        (b["state"].as_str(), b["phase"].as_str()),
        (Some("running"), None),
        "{b}"
    );

    // Another key, another build's event: refused, nothing recorded.
    let now = (node_agent::now_ms() / 1000) as u64;
    let (status, _) = post_at(&url, "not-the-key", now, &event(&id, Phase::Upload)).await;
    assert_eq!(status, 401);
    let (status, answer) = post_at(&url, &guest.key, now, &event("other", Phase::Upload)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("is about build other"), "{answer}");
    let (status, _) = post_at(&url, &guest.key, now, b"{\"build_id\":1}").await;
    assert_eq!(status, 400);
    assert_eq!(api.build(&id).await["phase"], serde_json::Value::Null);

    // The guest's own events, in order: the phase follows, and upload moves the state.
    let clone = event(&id, Phase::Clone);
    let (status, answer) = post_at(&url, &guest.key, now, &clone).await;
    assert_eq!(status, 204, "{answer}");
    let b = api.build(&id).await;
    assert_eq!(
        (b["state"].as_str(), b["phase"].as_str()),
        (Some("running"), Some("clone"))
    );
    // The same signed event again is a replay.
    let (status, answer) = post_at(&url, &guest.key, now, &clone).await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("(replay)"), "{answer}");
    assert_eq!(guest.post_progress(Phase::Build).await, 204);
    assert_eq!(guest.post_progress(Phase::Upload).await, 204);
    let b = api.build(&id).await;
    assert_eq!(
        (b["state"].as_str(), b["phase"].as_str()),
        (Some("uploading"), Some("upload")),
        "{b}"
    );

    // Out of order or repeated (freshly signed, so no replay): ignored, said, nothing moves.
    let (status, answer) = post_at(&url, &guest.key, now + 1, &event(&id, Phase::Build)).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer.contains("phase build does not follow upload"),
        "{answer}"
    );
    let (status, _) = post_at(&url, &guest.key, now + 1, &event(&id, Phase::Upload)).await;
    assert_eq!(status, 409);
    let b = api.build(&id).await;
    assert_eq!(
        (b["state"].as_str(), b["phase"].as_str()),
        (Some("uploading"), Some("upload"))
    );

    // The report ends the build; progress for it is refused like a second report (on the
    // operator's listener, which serves the VM routes too: the VM's own went with the VM).
    assert_eq!(
        guest
            .post_report(&common::failed_report(
                &id,
                builder_contract::ErrorClass::Internal,
                builder_contract::Phase::Upload,
                "S3 refused the upload"
            ))
            .await,
        204
    );
    let b = api.wait_terminal(&id, Duration::from_secs(15)).await;
    let url = url::Url::parse(&format!("{}{}", d.base, progress_path(&id))).unwrap();
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(b["error"]["message"], "S3 refused the upload", "{b}");
    let (status, answer) = post_at(
        &url,
        &guest.key,
        (node_agent::now_ms() / 1000) as u64,
        &event(&id, Phase::Notify),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("is already failed"), "{answer}");
    let states = common::states(&b);
    assert_eq!(
        states,
        ["queued", "starting", "running", "uploading", "failed"],
        "exactly the true states: {b}"
    );
}

#[tokio::test]
async fn a_vm_that_only_prints_progress_ends_without_a_phase_or_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new(
        "echo '==> clone'; echo '==> upload'; echo 'Kernel panic - not syncing: forged'; exit 0",
    );
    let d = common::start(dir.path(), launcher, Options::default()).await;
    let api = d.client();
    let id = api.submit(json!({})).await;
    let b = api.wait_terminal(&id, Duration::from_secs(15)).await;
    assert_eq!(b["state"], "failed", "{b}");
    // The failure is placed before any phase the guest signed, not where its console claims.
    assert_eq!(b["error"]["phase"], "params", "{b}");
    let message = b["error"]["message"].as_str().unwrap();
    assert!(message.contains("without reporting"), "{message}");
    let states = common::states(&b);
    assert_eq!(states, ["queued", "starting", "running", "failed"], "{b}");
}
