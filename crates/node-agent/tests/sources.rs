//! Uploaded sources against the in-process daemon and the real git: `node-agent submit DIR`'s
//! bundle (committed state, subdirectory, snapshot, dirty refusal), `POST /v1/sources` (auth,
//! size limit, bad bundles), cloning the served repository over dumb HTTP the way the guest
//! agent fetches, and the source's removal once its build has ended.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Options, ScriptLauncher, MAX_SOURCE_BYTES};
use node_agent::local_source::{bundle_dir, LocalSourceError};
use node_agent::sources::{Uploaded, SWEEP_INTERVAL};
use serde_json::json;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A work tree with `app/Dockerfile`, `app/main.sh` and `README` committed.
fn work_tree(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/Dockerfile"), "FROM busybox\nCOPY main.sh /\n").unwrap();
    std::fs::write(dir.join("app/main.sh"), "echo hi\n").unwrap();
    std::fs::write(dir.join("README"), "top\n").unwrap();
    git(dir, &["init", "-q", "-b", "trunk"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "first"]);
    git(dir, &["rev-parse", "HEAD"])
}

async fn upload(d: &common::Daemon, bytes: Vec<u8>, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/sources", d.base))
        .body(bytes);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// Fetches `commit` of `url` into `dir` as builder-agent does: a shallow fetch of the commit
/// first (dumb HTTP refuses it), then every branch, then a checkout.
fn fetch_like_the_guest(url: &str, commit: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "."]);
    git(dir, &["remote", "add", "origin", url]);
    let shallow = Command::new("git")
        .args(["fetch", "--depth=1", "--no-tags", "origin", commit])
        .current_dir(dir)
        .output()
        .unwrap();
    if !shallow.status.success() {
        git(
            dir,
            &[
                "fetch",
                "--no-tags",
                "origin",
                "+refs/heads/*:refs/remotes/origin/*",
            ],
        );
    }
    git(dir, &["checkout", "-q", "--detach", commit]);
}

#[test]
fn a_work_tree_is_bundled_as_committed_and_refused_when_dirty() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let head = work_tree(&src);

    // The top of the work tree: HEAD itself.
    let top = bundle_dir(&src, false).unwrap();
    assert_eq!(top.commit_sha, head);
    // A subdirectory: HEAD's tree of it, the same commit every time.
    let sub = bundle_dir(&src.join("app"), false).unwrap();
    assert_ne!(sub.commit_sha, head);
    assert_eq!(
        bundle_dir(&src.join("app"), false).unwrap().commit_sha,
        sub.commit_sha
    );
    assert!(sub.what.starts_with("app/ of HEAD"), "{}", sub.what);

    // The user's repository is untouched: no new ref, no index change.
    let refs = git(&src, &["for-each-ref"]);
    assert_eq!(refs.lines().count(), 1, "{refs}");

    // Uncommitted changes and untracked files under the directory are refused...
    std::fs::write(src.join("app/main.sh"), "echo changed\n").unwrap();
    std::fs::write(src.join("app/new.txt"), "new\n").unwrap();
    let err = bundle_dir(&src.join("app"), false).unwrap_err();
    assert!(matches!(err, LocalSourceError::Dirty { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("main.sh")
            && message.contains("new.txt")
            && message.contains("--snapshot"),
        "{message}"
    );
    // ...but not outside it.
    std::fs::write(src.join("README"), "changed\n").unwrap();
    git(&src, &["checkout", "-q", "--", "app"]);
    std::fs::remove_file(src.join("app/new.txt")).unwrap();
    assert_eq!(
        bundle_dir(&src.join("app"), false).unwrap().commit_sha,
        sub.commit_sha
    );
    // --snapshot takes the files on disk, .gitignore honoured.
    std::fs::write(src.join("app/main.sh"), "echo snap\n").unwrap();
    std::fs::write(src.join("app/.gitignore"), "*.log\n").unwrap();
    std::fs::write(src.join("app/build.log"), "noise\n").unwrap();
    let snap = bundle_dir(&src.join("app"), true).unwrap();
    let check = tmp.path().join("check.git");
    std::fs::write(tmp.path().join("snap.bundle"), &snap.bytes).unwrap();
    git(
        tmp.path(),
        &["clone", "-q", "--bare", "snap.bundle", "check.git"],
    );
    assert_eq!(git(&check, &["show", "main:main.sh"]), "echo snap");
    let files = git(&check, &["ls-tree", "--name-only", "main"]);
    assert_eq!(files, ".gitignore\nDockerfile\nmain.sh");

    // A directory outside git is a snapshot; no directory at all is an error.
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("Dockerfile"), "FROM busybox\n").unwrap();
    assert!(bundle_dir(&plain, false)
        .unwrap()
        .what
        .starts_with("a snapshot of"));
    let err = bundle_dir(&tmp.path().join("nope"), false).unwrap_err();
    assert!(
        matches!(err, LocalSourceError::NotADirectory { .. }),
        "{err:?}"
    );
}

// Several threads: the test's git talks to the daemon running in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_sources_are_served_over_dumb_http_until_their_build_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    work_tree(&src);
    let launcher = ScriptLauncher::new("echo '==> clone'; sleep 3; exit 3");
    let d = common::start(
        &tmp.path().join("node"),
        launcher.clone(),
        Options::default(),
    )
    .await;
    let bundle = bundle_dir(&src.join("app"), false).unwrap();

    // Auth, size limit and bad bundles.
    let r = upload(&d, bundle.bytes.clone(), None).await;
    assert_eq!(r.status(), 401);
    let r = upload(&d, vec![0; MAX_SOURCE_BYTES as usize + 1], Some(&d.token)).await;
    assert_eq!(r.status(), 413);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains(&MAX_SOURCE_BYTES.to_string()));
    let r = upload(
        &d,
        b"# v2 git bundle\nnot really\n".to_vec(),
        Some(&d.token),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not a git bundle"));
    let sources = d.work_dir.join("sources");
    assert_eq!(
        std::fs::read_dir(&sources).unwrap().count(),
        0,
        "failed uploads leave nothing"
    );

    let r = upload(&d, bundle.bytes.clone(), Some(&d.token)).await;
    assert_eq!(r.status(), 201);
    let up: Uploaded = r.json().await.unwrap();
    assert_eq!(up.commit_sha, bundle.commit_sha);
    // Served to the VMs: on their own listener, at the port the per-VM listener has (its host
    // each VM's launcher points at the host end of the VM's veth); and on the API's port.
    let for_vms = up.repo_url.to_string();
    let vm_base = d.node.config.vm_base_url().to_string();
    assert!(
        for_vms.starts_with(&format!("{vm_base}v1/sources/")),
        "{for_vms}"
    );
    let url = format!("{}{}", d.base, up.repo_url.path());
    assert!(url.ends_with("/repo.git"), "{url}");

    // The real git fetches it the guest's way, and gets the directory's committed files.
    let clone = tmp.path().join("clone");
    fetch_like_the_guest(&url, &up.commit_sha, &clone);
    assert_eq!(
        std::fs::read_to_string(clone.join("Dockerfile")).unwrap(),
        "FROM busybox\nCOPY main.sh /\n"
    );
    assert!(!clone.join("README").exists());
    // Only git's files are served, and no other token.
    let http = reqwest::Client::new();
    let status = |u: String| {
        let http = http.clone();
        async move { http.get(u).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(format!("{url}/info/refs")).await, 200);
    assert_eq!(status(format!("{url}/config")).await, 404);
    assert_eq!(status(format!("{url}/../source.json")).await, 404);
    let other = url.replace(&up.id, &"0".repeat(32));
    assert_eq!(status(format!("{other}/info/refs")).await, 404);

    // A build that names it keeps it until the build ends; then the sweeper removes it.
    let api = d.client();
    let id = api
        .submit(json!({"repo_url": for_vms, "commit_sha": up.commit_sha, "ref": null}))
        .await;
    // The VM clones it from its own listener, the one its report goes to.
    api.wait_state(&id, "running", Duration::from_secs(10))
        .await;
    let params = launcher.spec(&id).unwrap().params;
    let notify_url = params.notify_url.unwrap();
    assert_eq!(params.repo_url.host(), notify_url.host());
    assert_eq!(params.repo_url.port(), notify_url.port());
    assert_ne!(params.repo_url.port(), up.repo_url.port());
    fetch_like_the_guest(
        params.repo_url.as_str(),
        &up.commit_sha,
        &tmp.path().join("vm-clone"),
    );
    assert!(tmp.path().join("vm-clone/Dockerfile").exists());
    let b = api.wait_terminal(&id, Duration::from_secs(15)).await;
    assert_eq!(b["repo_url"], for_vms.as_str());
    let deadline = tokio::time::Instant::now() + SWEEP_INTERVAL * 2;
    while sources.join(&up.id).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "source kept after its build ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status(format!("{url}/info/refs")).await, 404);
    d.stop().await;
}

#[tokio::test]
async fn submit_of_a_dirty_work_tree_says_what_to_do_and_uploads_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    work_tree(&src);
    std::fs::write(src.join("app/main.sh"), "echo changed\n").unwrap();
    let d = common::start(
        &tmp.path().join("node"),
        ScriptLauncher::new("exit 0"),
        Options::default(),
    )
    .await;
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &d.token).unwrap();
    // Without a bucket the node would keep nothing: refused before the directory is read.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .arg("submit")
        .arg(src.join("app"))
        .args(["--server", &d.base])
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--s3-bucket") && stderr.contains("keeps no build output"),
        "{stderr}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .arg("submit")
        .arg(src.join("app"))
        .args(["--server", &d.base])
        .arg("--token-file")
        .arg(&token_file)
        .args(["--s3-bucket", "rootfs", "--s3-key", "app.rootfs"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot make a git bundle of")
            && stderr.contains("uncommitted changes")
            && stderr.contains("app/main.sh")
            && stderr.contains("--snapshot"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read_dir(d.work_dir.join("sources"))
            .unwrap()
            .count(),
        0
    );
    d.stop().await;
}
