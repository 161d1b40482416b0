//! The build cache end to end: a daemon with its cache pool on (sparse copies, 1 GiB disks),
//! "VMs" that are scripts loop-mounting the cache disk they are given (`CACHE_DISK`), reading
//! the marker an earlier build of the key left and writing their own, and guests whose report
//! (and rootfs upload, to the real SeaweedFS S3 of `scripts/services.sh`) is made here. Covers
//! reuse within a key, isolation between tokens unless they share a `cache_namespace`, commit
//! only of succeeded, cleanly unmounted, powered-off disks, concurrent builds of one key,
//! eviction, the list/delete API, metrics, leftovers of a crash, and the reuse of an unchanged
//! image's rootfs (offered, verified, a lying report refused).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use builder_contract::{BuildReport, BuildStatus, RootfsArtifact};
use common::{Api, Daemon, Guest, Options, ScriptLauncher};
use node_agent::tokens::{BucketScope, TokenName, TokensFile};
use serde_json::json;

/// The image digest [`Guest::upload_rootfs`] puts on the object.
fn image_digest() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

/// A "VM" that mounts its cache disk, copies the marker there to `<state>/<build>.seen`, writes
/// its build id as the marker and a 1 MiB "layer" (so a disk outgrows `cache_max_mib = 1`),
/// unmounts (unless `unclean`: then the mount point goes to
/// `<state>/<build>.mnt`), says `<build>.ready` and powers off once `<build>.go` exists.
fn script(state: &Path, unclean: bool) -> String {
    let state = state.display();
    let unmount = if unclean {
        format!("echo \"$m\" > {state}/$BUILD_ID.mnt")
    } else {
        "umount \"$m\" && rmdir \"$m\"".to_string()
    };
    format!(
        r#"set -e
m=$(mktemp -d)
mount -o loop "$CACHE_DISK" "$m"
cat "$m/marker" > {state}/$BUILD_ID.seen 2>/dev/null || : > {state}/$BUILD_ID.seen
echo "$BUILD_ID" > "$m/marker"
head -c 1048576 /dev/urandom > "$m/layer"
sync
{unmount}
touch {state}/$BUILD_ID.ready
while [ ! -e {state}/$BUILD_ID.go ]; do sleep 0.1; done
"#
    )
}

async fn daemon(
    dir: &Path,
    launcher: std::sync::Arc<ScriptLauncher>,
    max_mib: Option<u64>,
) -> Daemon {
    common::start(
        &dir.join("work"),
        launcher,
        Options {
            cache: true,
            cache_max_mib: max_mib,
            ..Default::default()
        },
    )
    .await
}

/// Waits for `path` for up to 30 s.
async fn wait_file(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(id: &str, status: BuildStatus, rootfs: Option<RootfsArtifact>) -> BuildReport {
    let digest = rootfs.as_ref().map(|_| image_digest());
    common::end_report(id, status, rootfs, digest)
}

/// How a test build's guest ends it.
enum End {
    /// Uploads a rootfs and reports success.
    Succeed,
    /// Reports failure.
    Fail,
    /// Reports success with this rootfs (no upload).
    Report(RootfsArtifact),
}

struct Cached {
    state: PathBuf,
}

impl Cached {
    /// Submits a build, waits until its script used the cache disk, ends it as `end` says and
    /// waits for its end. Returns the build view and what the build saw of the marker.
    async fn build(
        &self,
        api: &Api,
        launcher: &ScriptLauncher,
        extra: serde_json::Value,
        end: End,
    ) -> (serde_json::Value, String) {
        let id = api.submit(extra).await;
        self.finish(api, launcher, &id, end).await
    }

    async fn finish(
        &self,
        api: &Api,
        launcher: &ScriptLauncher,
        id: &str,
        end: End,
    ) -> (serde_json::Value, String) {
        wait_file(&self.state.join(format!("{id}.ready"))).await;
        let seen = std::fs::read_to_string(self.state.join(format!("{id}.seen"))).unwrap();
        let guest = Guest::of(&launcher.spec(id).unwrap());
        let report = match end {
            End::Succeed => {
                let rootfs = guest.upload_rootfs(id.as_bytes()).await;
                report(id, BuildStatus::Succeeded, Some(rootfs))
            }
            End::Fail => report(id, BuildStatus::Failed, None),
            End::Report(rootfs) => report(id, BuildStatus::Succeeded, Some(rootfs)),
        };
        let status = guest.post_report(&report).await;
        assert!(status < 300, "the report was refused: {status}");
        std::fs::write(self.state.join(format!("{id}.go")), "").unwrap();
        let view = api.wait_terminal(id, Duration::from_secs(30)).await;
        (view, seen.trim().to_string())
    }
}

fn setup(dir: &Path, unclean: bool) -> (Cached, std::sync::Arc<ScriptLauncher>) {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let launcher = ScriptLauncher::new(&script(&state, unclean));
    (Cached { state }, launcher)
}

fn events(view: &serde_json::Value) -> Vec<String> {
    view["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["detail"].as_str().map(str::to_string))
        .collect()
}

fn has_event(view: &serde_json::Value, words: &str) -> bool {
    events(view).iter().any(|e| e.contains(words))
}

/// The committed disk of cache `id` under the daemon's pool.
fn committed_disk(d: &Daemon, id: &str) -> PathBuf {
    d.work_dir.join("cache/keys").join(id).join("disk.ext4")
}

/// The SHA-256 of a (sparse, 1 GiB) disk, by `sha256sum` (hashing it here, unoptimized, takes
/// seconds).
/// Every build of `d` has ended: none of their forks may be left in the pool.
fn assert_no_fork_left(d: &Daemon) {
    let forks = d.work_dir.join("cache/forks");
    let left: Vec<_> = std::fs::read_dir(&forks)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "forks left behind in {}: {left:?}",
        forks.display()
    );
}

fn sha256_file(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// `name value` of a metric line without labels.
async fn metric(d: &Daemon, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", d.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

/// An API client of a new token `name` (any bucket), optionally in a cache namespace.
fn token(d: &Daemon, name: &str, namespace: Option<&str>) -> Api {
    let issued = TokensFile::add(
        &d.node.config.api_tokens_file,
        TokenName::try_from(name.to_string()).unwrap(),
        false,
        vec![BucketScope::try_from("*".to_string()).unwrap()],
        vec![],
        namespace.map(|n| TokenName::try_from(n.to_string()).unwrap()),
        false,
    )
    .unwrap();
    Api {
        token: issued.token,
        ..d.client()
    }
}

fn unique_key() -> String {
    format!("cache/{}.ext4", node_agent::random_hex(8))
}

#[tokio::test]
async fn a_key_is_reused_by_its_next_build_and_a_failed_build_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), false);
    let d = daemon(dir.path(), launcher.clone(), None).await;
    let api = d.client();
    let dest = json!({"s3_key": unique_key()});

    let (first, seen) = c.build(&api, &launcher, dest.clone(), End::Succeed).await;
    assert_eq!(first["state"], "succeeded", "{first}");
    assert_eq!(seen, "", "a new cache disk is empty");
    assert_eq!(first["cache"]["outcome"], "miss", "{first}");
    assert_eq!(first["cache"]["key"], "https://git.example/app.git");
    assert!(has_event(&first, "build cache committed"), "{first}");
    let cache_id = first["cache"]["id"].as_str().unwrap().to_string();

    let (second, seen) = c.build(&api, &launcher, dest.clone(), End::Succeed).await;
    assert_eq!(second["cache"]["outcome"], "hit", "{second}");
    assert_eq!(second["cache"]["id"], cache_id.as_str());
    assert_eq!(
        seen,
        first["id"].as_str().unwrap(),
        "the second build sees the first's marker"
    );

    // A failed build's fork is discarded: the committed disk stays as it was, byte for byte.
    let disk = committed_disk(&d, &cache_id);
    let before = (
        sha256_file(&disk),
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
    );
    let (failed, seen) = c.build(&api, &launcher, dest.clone(), End::Fail).await;
    assert_eq!(failed["state"], "failed");
    assert_eq!(seen, second["id"].as_str().unwrap());
    assert!(
        has_event(&failed, "build cache discarded: the build did not succeed"),
        "{failed}"
    );
    let after = (
        sha256_file(&disk),
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
    );
    assert_eq!(before, after, "a failed build changed the committed disk");

    // no_cache: a new empty disk, never committed.
    let (fresh, seen) = c
        .build(
            &api,
            &launcher,
            json!({"s3_key": unique_key(), "no_cache": true}),
            End::Succeed,
        )
        .await;
    assert_eq!(fresh["state"], "succeeded");
    assert_eq!(seen, "");
    assert_eq!(fresh["cache"]["outcome"], "miss");
    assert!(
        has_event(&fresh, "discarded: the build asked for no_cache"),
        "{fresh}"
    );
    assert_eq!(sha256_file(&disk), before.0);

    let (_, seen) = c.build(&api, &launcher, dest, End::Succeed).await;
    assert_eq!(seen, second["id"].as_str().unwrap());
    assert_eq!(metric(&d, "node_agent_cache_hits_total").await, 3.0);
    assert_eq!(metric(&d, "node_agent_cache_misses_total").await, 2.0);
    assert_eq!(metric(&d, "node_agent_cache_commits_total").await, 3.0);
    assert_eq!(metric(&d, "node_agent_cache_discards_total").await, 2.0);
    assert_eq!(metric(&d, "node_agent_cache_keys").await, 1.0);
    assert!(metric(&d, "node_agent_cache_fork_seconds_count").await >= 5.0);
    assert_no_fork_left(&d);
    d.stop().await;
}

#[tokio::test]
async fn caches_are_per_token_unless_tokens_share_a_namespace_and_the_api_keeps_them_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), false);
    let d = daemon(dir.path(), launcher.clone(), None).await;
    let alice = token(&d, "alice", None);
    let bob = token(&d, "bob", None);
    let carol = token(&d, "carol", Some("team"));
    let dave = token(&d, "dave", Some("team"));
    let dest = || json!({"s3_key": unique_key()});

    let (a, _) = c.build(&alice, &launcher, dest(), End::Succeed).await;
    let (b, seen) = c.build(&bob, &launcher, dest(), End::Succeed).await;
    assert_eq!(a["cache"]["outcome"], "miss");
    assert_eq!(b["cache"]["outcome"], "miss", "bob got alice's cache: {b}");
    assert_eq!(seen, "");
    assert_ne!(a["cache"]["id"], b["cache"]["id"]);
    let (_, _) = c.build(&carol, &launcher, dest(), End::Succeed).await;
    let (shared, seen) = c.build(&dave, &launcher, dest(), End::Succeed).await;
    assert_eq!(shared["cache"]["outcome"], "hit", "{shared}");
    assert_ne!(seen, "");

    let (status, list) = alice.get("/v1/caches").await;
    assert_eq!(status, 200, "{list}");
    let caches = list["caches"].as_array().unwrap();
    assert_eq!(caches.len(), 1, "{list}");
    assert_eq!(caches[0]["namespace"], "alice");
    assert_eq!(caches[0]["name"], "https://git.example/app.git");
    assert_eq!(caches[0]["commits"], 1);
    assert!(caches[0]["bytes"].as_u64().unwrap() > 0);
    let (status, all) = d.client().get("/v1/caches").await;
    assert_eq!(status, 200);
    assert_eq!(all["caches"].as_array().unwrap().len(), 3, "{all}");
    let (_, team) = d.client().get("/v1/caches?namespace=team").await;
    assert_eq!(team["caches"][0]["commits"], 2, "{team}");
    let (status, _) = alice.get("/v1/caches?namespace=bob").await;
    assert_eq!(status, 403);

    let bobs = b["cache"]["id"].as_str().unwrap();
    let alices = a["cache"]["id"].as_str().unwrap();
    let delete = |api: &Api, id: &str| {
        let request = api
            .http
            .delete(format!("{}/v1/caches/{id}", api.base))
            .bearer_auth(&api.token);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(alice.get(&format!("/v1/caches/{bobs}")).await.0, 404);
    assert_eq!(delete(&alice, bobs).await, 404, "alice deleted bob's cache");
    assert_eq!(alice.get("/v1/caches/not-an-id").await.0, 400);
    let (status, one) = alice.get(&format!("/v1/caches/{alices}")).await;
    assert_eq!((status, one["id"].as_str()), (200, Some(alices)));
    // The CLI: `cache list` shows alice's one cache, `cache delete` removes it.
    let token_file = dir.path().join("alice-token");
    std::fs::write(&token_file, &alice.token).unwrap();
    // The daemon answers on this test's runtime: the CLI runs beside it, not blocking it.
    let cli = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .arg("cache")
            .args(args)
            .args(["--server", &d.base])
            .arg("--token-file")
            .arg(&token_file)
            .output()
    };
    let listed = cli(&["list"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(alices) && stdout.contains("alice/https://git.example/app.git"),
        "{stdout}"
    );
    let deleted = cli(&["delete", alices]).await.unwrap();
    assert!(deleted.status.success(), "{deleted:?}");
    assert_eq!(delete(&alice, alices).await, 404);
    assert!(!cli(&["delete", bobs]).await.unwrap().status.success());
    let (_, list) = alice.get("/v1/caches").await;
    assert_eq!(list["caches"].as_array().unwrap().len(), 0);
    assert_eq!(bob.get(&format!("/v1/caches/{bobs}")).await.0, 200);
    d.stop().await;
}

#[tokio::test]
async fn a_disk_left_mounted_is_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), true);
    let d = daemon(dir.path(), launcher.clone(), None).await;
    let api = d.client();
    let (view, _) = c
        .build(
            &api,
            &launcher,
            json!({"s3_key": unique_key()}),
            End::Succeed,
        )
        .await;
    let id = view["id"].as_str().unwrap();
    let mount = std::fs::read_to_string(c.state.join(format!("{id}.mnt"))).unwrap();
    let unmounted = std::process::Command::new("umount")
        .arg(mount.trim())
        .status()
        .unwrap();
    assert!(unmounted.success());
    assert_eq!(
        view["state"], "succeeded",
        "the build itself succeeded: {view}"
    );
    assert!(
        has_event(&view, "build cache not committed"),
        "{:?}",
        events(&view)
    );
    assert_eq!(metric(&d, "node_agent_cache_refused_total").await, 1.0);
    assert_eq!(metric(&d, "node_agent_cache_keys").await, 0.0);
    assert_no_fork_left(&d);
    d.stop().await;
}

#[tokio::test]
async fn two_concurrent_builds_of_one_key_both_succeed_and_one_clean_disk_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), false);
    let d = daemon(dir.path(), launcher.clone(), None).await;
    let api = d.client();
    let first = api.submit(json!({"s3_key": unique_key()})).await;
    let second = api.submit(json!({"s3_key": unique_key()})).await;
    let (a, b) = tokio::join!(
        c.finish(&api, &launcher, &first, End::Succeed),
        c.finish(&api, &launcher, &second, End::Succeed)
    );
    assert_eq!(a.0["state"], "succeeded", "{}", a.0);
    assert_eq!(b.0["state"], "succeeded", "{}", b.0);
    assert_eq!(
        launcher
            .max_running
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let disk = committed_disk(&d, a.0["cache"]["id"].as_str().unwrap());
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let (status, _) = api.get("/v1/caches").await;
    assert_eq!(status, 200);
    let (_, seen) = c
        .build(&api, &launcher, json!({"s3_key": unique_key()}), End::Fail)
        .await;
    assert!(
        seen == first || seen == second,
        "the committed marker is {seen:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn keys_are_evicted_least_recently_used_first_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), false);
    // Smaller than one committed disk: only the key committed last is kept.
    let d = daemon(dir.path(), launcher.clone(), Some(1)).await;
    let api = d.client();
    let (one, _) = c
        .build(
            &api,
            &launcher,
            json!({"s3_key": unique_key(), "cache_key": "one"}),
            End::Succeed,
        )
        .await;
    let (two, _) = c
        .build(
            &api,
            &launcher,
            json!({"s3_key": unique_key(), "cache_key": "two"}),
            End::Succeed,
        )
        .await;
    assert!(has_event(&two, "evicted"), "{:?}", events(&two));
    let (_, list) = api.get("/v1/caches").await;
    let names: Vec<&str> = list["caches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["two"]);
    assert_eq!(metric(&d, "node_agent_cache_evictions_total").await, 1.0);
    assert!(!committed_disk(&d, one["cache"]["id"].as_str().unwrap()).exists());
    d.stop().await;
}

#[tokio::test]
async fn a_fork_left_by_a_crash_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, launcher) = setup(dir.path(), false);
    let d = daemon(dir.path(), launcher.clone(), None).await;
    let forks = d.work_dir.join("cache/forks");
    d.stop().await;
    // What a node killed mid-build leaves.
    std::fs::write(forks.join("0123456789ab.ext4"), b"half a disk").unwrap();
    let d = daemon(dir.path(), launcher, None).await;
    assert_eq!(std::fs::read_dir(&forks).unwrap().count(), 0);
    d.stop().await;
}

#[tokio::test]
async fn an_unchanged_image_reuses_the_uploaded_rootfs_and_a_lying_report_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), false);
    let d = daemon(dir.path(), launcher.clone(), None).await;
    let api = d.client();
    let dest = json!({"s3_key": unique_key()});

    let first_id = api.submit(dest.clone()).await;
    wait_file(&c.state.join(format!("{first_id}.ready"))).await;
    assert_eq!(launcher.spec(&first_id).unwrap().params.reuse, None);
    let (first, _) = c.finish(&api, &launcher, &first_id, End::Succeed).await;
    assert_eq!(first["state"], "succeeded", "{first}");
    let uploaded = RootfsArtifact {
        location: first["rootfs"]["location"].as_str().unwrap().to_string(),
        config_location: format!("{}.json", first["rootfs"]["location"].as_str().unwrap()),
        size_bytes: first["rootfs"]["size_bytes"].as_u64().unwrap(),
        sha256: first["rootfs"]["sha256"].as_str().unwrap().to_string(),
        reused: true,
    };

    // Offered (the guest reads it from its command line) and reused.
    let second_id = api.submit(dest.clone()).await;
    wait_file(&c.state.join(format!("{second_id}.ready"))).await;
    let offer = launcher.spec(&second_id).unwrap().params.reuse.unwrap();
    assert_eq!(offer.image_digest, image_digest());
    assert_eq!(offer.sha256, uploaded.sha256);
    assert_eq!(offer.size_bytes, uploaded.size_bytes);
    let (second, _) = c
        .finish(&api, &launcher, &second_id, End::Report(uploaded.clone()))
        .await;
    assert_eq!(second["state"], "succeeded", "{second}");
    assert_eq!(second["rootfs"]["reused"], true);
    assert_eq!(second["rootfs"]["sha256"], uploaded.sha256.as_str());

    // A report claiming to reuse a rootfs that is not the one offered is refused.
    let lie = RootfsArtifact {
        sha256: "cd".repeat(32),
        ..uploaded.clone()
    };
    let (third, _) = c
        .build(&api, &launcher, dest.clone(), End::Report(lie))
        .await;
    assert_eq!(third["state"], "failed", "{third}");
    let message = third["error"]["message"].as_str().unwrap();
    assert!(message.contains("`rootfs.sha256`"), "{message}");
    assert!(has_event(&third, "build cache discarded"), "{third}");

    // force_upload: nothing offered, so a reused report is refused too.
    let forced_id = api
        .submit(json!({"s3_key": dest["s3_key"], "force_upload": true}))
        .await;
    wait_file(&c.state.join(format!("{forced_id}.ready"))).await;
    assert_eq!(launcher.spec(&forced_id).unwrap().params.reuse, None);
    let (forced, _) = c
        .finish(&api, &launcher, &forced_id, End::Report(uploaded))
        .await;
    assert_eq!(forced["state"], "failed");
    assert!(
        forced["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`rootfs.reused`"),
        "{forced}"
    );
    d.stop().await;
}

#[tokio::test]
async fn the_cache_columns_migrate_and_record_on_postgresql() {
    let pg = common::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let (c, launcher) = setup(dir.path(), false);
    let d = common::start(
        &dir.path().join("work"),
        launcher.clone(),
        Options {
            cache: true,
            database_url: Some(pg.url.clone()),
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let (first, _) = c
        .build(
            &api,
            &launcher,
            json!({"s3_key": unique_key()}),
            End::Succeed,
        )
        .await;
    let (second, _) = c
        .build(&api, &launcher, json!({"s3_key": unique_key()}), End::Fail)
        .await;
    assert_eq!(first["cache"]["outcome"], "miss", "{first}");
    assert_eq!(second["cache"]["outcome"], "hit", "{second}");
    assert_eq!(second["cache"]["id"], first["cache"]["id"]);
    d.stop().await;
}
