//! End-to-end builds through `builder-agent run` against a real dockerd, SeaweedFS S3, git
//! daemon and webhook receiver (started by `scripts/services.sh`).

mod support;

use builder_contract::{BuildStatus, ErrorClass, Phase};
use support::*;

fn base() -> String {
    env("BUILDER_TEST_BASE_IMAGE")
}

fn params(repo: &TestRepo, revision: &str, id: &str, extra: &str) -> String {
    format!(
        "build_id={id} repo_url={} commit_sha={revision} {extra}",
        repo.url()
    )
}

fn assert_failed(run: &Run, class: ErrorClass, phase: Phase, needle: &str) {
    let error = run
        .report
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("no error: {}", run.stdout));
    assert_eq!(run.report.status, BuildStatus::Failed);
    assert_eq!(
        (error.class, error.phase),
        (class, phase),
        "{}",
        error.message
    );
    assert!(
        error.message.contains(needle),
        "`{}` lacks `{needle}`",
        error.message
    );
    let code = if class == ErrorClass::User { 1 } else { 2 };
    assert_eq!(run.code, code, "{}", run.log);
    assert!(
        run.log
            .contains(&format!("failed: {class} error in phase {phase}")),
        "{}",
        run.log
    );
}

#[test]
fn simple_dockerfile_becomes_a_rootfs_and_a_signed_webhook() {
    let repo = TestRepo::new("simple");
    // The first RUN makes every run's steps new to the daemon's layer cache, whose hits keep
    // the mtimes of the build that made them.
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo {} > /dev/null\nCOPY hello.txt /app/hello.txt\nRUN echo built > /app/built.txt\n\
             ENV GREETING=hi\nWORKDIR /app\nENTRYPOINT [\"/bin/sh\", \"-c\"]\nCMD [\"cat hello.txt\"]\n",
            base(),
            unique("run")
        ),
    )
    .write("hello.txt", "hello from the repo\n");
    let commit = repo.commit("first");
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let id = unique("simple");
    let run = scratch.run_notifying(&params(&repo, "main", &id, ""), &hook.url, None, &[]);
    assert_eq!(run.code, 0, "{}", run.log);
    let rootfs = run.rootfs(&id);
    assert_eq!(
        ext4_cat(&rootfs, "/app/hello.txt").as_deref(),
        Some("hello from the repo\n")
    );
    assert_eq!(
        ext4_cat(&rootfs, "/app/built.txt").as_deref(),
        Some("built\n")
    );
    assert!(ext4_cat(&rootfs, "/bin/busybox").is_some());
    // Files from the repository carry their commit's time (git keeps no file times).
    assert_eq!(
        ext4_mtime(&rootfs, "/app/hello.txt"),
        repo.commit_time(&commit)
    );
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.out_dir.join(&id).join("rootfs.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"]),
        "{config}"
    );
    assert_eq!(config["WorkingDir"], "/app");

    let report = hook.only_report();
    assert_eq!(report, run.report);
    assert_eq!(report.status, BuildStatus::Succeeded);
    assert_eq!(report.commit_sha.as_deref(), Some(commit.as_str()));
    assert!(report
        .image_digest
        .as_deref()
        .unwrap()
        .starts_with("sha256:"));
    let artifact = report.rootfs.unwrap();
    let bytes = std::fs::read(&rootfs).unwrap();
    assert_eq!(artifact.sha256, sha256_hex(&bytes));
    assert_eq!(artifact.size_bytes, bytes.len() as u64);
    let phases: Vec<Phase> = report.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [Phase::Clone, Phase::Checkout, Phase::Build, Phase::Convert]
    );
    assert!(
        run.log
            .contains("layer directories of the daemon's overlay2 store")
            && run.log.contains("rootfs made from layer-dirs"),
        "the image was not read from its layer directories:\n{}",
        run.log
    );
    assert!(
        run.log.contains("==> build")
            && run
                .log
                .contains("building with \"default\" instance using docker driver")
            && run.log.contains("[4/5] RUN echo built > /app/built.txt")
            && run.log.contains("#0 building with"),
        "BuildKit's step lines are in the log: {}",
        run.log
    );
}

#[test]
fn upload_lands_in_s3_with_metadata_and_matching_sha256() {
    let repo = TestRepo::new("upload");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN head -c 12000000 /dev/urandom > /blob\n",
            base()
        ),
    );
    let commit = repo.commit("first");
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let id = unique("upload");
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = format!("rootfs/{id}.ext4");
    let run = scratch.run_notifying(
        &params(
            &repo,
            &commit,
            &id,
            &format!("s3_bucket={bucket} s3_key={key}"),
        ),
        &hook.url,
        None,
        &["--part-size-mib", "5"],
    );
    assert_eq!(run.code, 0, "{}", run.log);
    let report = hook.only_report();
    let artifact = report.rootfs.clone().unwrap();
    assert_eq!(artifact.location, format!("s3://{bucket}/{key}"));
    let (status, headers, body) = s3_get(&bucket, &key);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(sha256_hex(&body), artifact.sha256);
    assert_eq!(body.len() as u64, artifact.size_bytes);
    assert!(
        body.len() > 10 << 20,
        "multipart: more than two 5 MiB parts"
    );
    for expected in [
        format!("x-amz-meta-build-id: {id}"),
        format!("x-amz-meta-commit-sha: {commit}"),
        "x-amz-meta-status: succeeded".to_string(),
        format!("x-amz-meta-rootfs-sha256: {}", artifact.sha256),
    ] {
        assert!(
            headers.contains(&expected.to_ascii_lowercase()),
            "{expected} not in {headers}"
        );
    }
    let (status, _, config) = s3_get(&bucket, &format!("{key}.json"));
    assert_eq!(status, 200);
    serde_json::from_slice::<serde_json::Value>(&config).unwrap();
    let (status, headers, record) = s3_get(&bucket, &format!("{key}.status.json"));
    assert_eq!(status, 200, "{headers}");
    assert!(
        headers.contains("x-amz-meta-status: succeeded"),
        "{headers}"
    );
    let record: builder_contract::BuildReport = serde_json::from_slice(&record).unwrap();
    assert_eq!(record.rootfs, report.rootfs);
    assert!(report.phases.iter().any(|p| p.phase == Phase::Upload));
    assert!(
        run.log.contains("upload: ") && run.log.contains("(100 %)"),
        "{}",
        run.log
    );
    assert!(
        !scratch.path().join("work").join(&id).exists(),
        "scratch left behind"
    );
}

#[test]
fn multi_stage_keeps_only_the_final_stage() {
    let repo = TestRepo::new("multistage");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {b} AS builder\nRUN mkdir /out && echo compiled > /out/app && echo junk > /builder-only\n\
             FROM {b}\nCOPY --from=builder /out/app /usr/local/bin/app\n",
            b = base()
        ),
    );
    repo.commit("first");
    let scratch = Scratch::new();
    let id = unique("multi");
    let run = scratch.run(&params(&repo, "main", &id, ""), &[]);
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(
        ext4_cat(&run.rootfs(&id), "/usr/local/bin/app").as_deref(),
        Some("compiled\n")
    );
    assert_eq!(ext4_cat(&run.rootfs(&id), "/builder-only"), None);
}

#[test]
fn dockerfile_in_a_subdirectory_with_dockerignore_and_build_arg_default() {
    let repo = TestRepo::new("subdir");
    repo.write(
        "docker/app.Dockerfile",
        &format!(
            "FROM {}\nARG GREETING=hello-default\nRUN echo $GREETING > /greeting\nCOPY . /ctx/\n",
            base()
        ),
    )
    .write(".dockerignore", "*.secret\nlogs/\n!logs/keep.log\n")
    .write("keep.txt", "kept\n")
    .write("db.secret", "nope\n")
    .write("logs/noise.log", "noise\n")
    .write("logs/keep.log", "keep me\n");
    repo.commit("first");
    let scratch = Scratch::new();
    let id = unique("subdir");
    let run = scratch.run(
        &params(&repo, "main", &id, "dockerfile=docker/app.Dockerfile"),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.log);
    let rootfs = run.rootfs(&id);
    assert_eq!(
        ext4_cat(&rootfs, "/greeting").as_deref(),
        Some("hello-default\n")
    );
    assert_eq!(
        ext4_cat(&rootfs, "/ctx/keep.txt").as_deref(),
        Some("kept\n")
    );
    assert_eq!(
        ext4_cat(&rootfs, "/ctx/logs/keep.log").as_deref(),
        Some("keep me\n")
    );
    assert_eq!(ext4_cat(&rootfs, "/ctx/db.secret"), None);
    assert_eq!(ext4_cat(&rootfs, "/ctx/logs/noise.log"), None);
}

#[test]
fn builds_a_commit_that_is_not_the_branch_head() {
    let repo = TestRepo::new("oldcommit");
    repo.write(
        "Dockerfile",
        &format!("FROM {}\nCOPY version /version\n", base()),
    )
    .write("version", "one\n");
    let first = repo.commit("one");
    repo.write("version", "two\n");
    repo.commit("two");
    let scratch = Scratch::new();
    let id = unique("old");
    let run = scratch.run(&params(&repo, &first, &id, ""), &[]);
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(run.report.commit_sha.as_deref(), Some(first.as_str()));
    assert_eq!(
        ext4_cat(&run.rootfs(&id), "/version").as_deref(),
        Some("one\n")
    );
}

#[test]
fn failing_run_step_is_a_user_error_and_is_reported() {
    let repo = TestRepo::new("failrun");
    repo.write(
        "Dockerfile",
        &format!("FROM {}\nRUN echo about to fail && exit 3\n", base()),
    );
    repo.commit("first");
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let id = unique("failrun");
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = format!("rootfs/{id}.ext4");
    let run = scratch.run_notifying(
        &params(
            &repo,
            "main",
            &id,
            &format!("s3_bucket={bucket} s3_key={key}"),
        ),
        &hook.url,
        None,
        &[],
    );
    assert_failed(
        &run,
        ErrorClass::User,
        Phase::Build,
        "step `[2/2] RUN echo about to fail && exit 3` (Dockerfile:2) failed: process \"/bin/sh \
         -c echo about to fail && exit 3\" did not complete successfully: exit code: 3",
    );
    assert!(run.log.contains("about to fail"), "{}", run.log);
    assert_eq!(hook.only_report().status, BuildStatus::Failed);
    // No rootfs, but a record of the failure where it would have been.
    assert_eq!(s3_get(&bucket, &key).0, 404);
    let (status, headers, record) = s3_get(&bucket, &format!("{key}.status.json"));
    assert_eq!(status, 200, "{headers}");
    assert!(headers.contains("x-amz-meta-status: failed"), "{headers}");
    let record: builder_contract::BuildReport = serde_json::from_slice(&record).unwrap();
    assert_eq!(record, run.report);
}

#[test]
fn missing_commit_and_missing_dockerfile_are_user_errors() {
    let repo = TestRepo::new("missing");
    repo.write("README", "no dockerfile here\n");
    repo.commit("first");
    let scratch = Scratch::new();
    let absent = "0123456789abcdef0123456789abcdef01234567";
    let run = scratch.run(&params(&repo, absent, &unique("nocommit"), ""), &[]);
    assert_failed(&run, ErrorClass::User, Phase::Clone, absent);
    let run = scratch.run(&params(&repo, "no-such-branch", &unique("noref"), ""), &[]);
    assert_failed(&run, ErrorClass::User, Phase::Clone, "no-such-branch");
    let run = scratch.run(&params(&repo, "main", &unique("nodockerfile"), ""), &[]);
    assert_failed(
        &run,
        ErrorClass::User,
        Phase::Build,
        "the Dockerfile `Dockerfile` does not exist",
    );
    let run = scratch.run(
        &format!(
            "build_id={} repo_url=git://127.0.0.1:1/none.git commit_sha=main",
            unique("unreach")
        ),
        &[],
    );
    assert_failed(
        &run,
        ErrorClass::User,
        Phase::Clone,
        "cannot reach the repository",
    );
}

#[test]
fn bad_params_name_the_key_upload_nothing_and_still_notify() {
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let id = unique("badparams");
    let key = format!("rootfs/{id}.ext4");
    let run = scratch.run_notifying(
        &format!(
            "build_id={id} repo_url=ftp://example/x commit_sha=main s3_bucket={bucket} s3_key={key}"
        ),
        &hook.url,
        None,
        &[],
    );
    assert_failed(&run, ErrorClass::User, Phase::Params, "invalid `repo_url`");
    assert_eq!(s3_get(&bucket, &key).0, 404);
    let report = hook.only_report();
    assert_eq!(report.build_id, id);
    assert!(report.phases.is_empty());
    let run = scratch.run(
        &format!("build_id={id} repo_url=https://h/x commit_sha=main dockerfile=../../etc/passwd"),
        &[],
    );
    assert_failed(&run, ErrorClass::User, Phase::Params, "`dockerfile`");
}

#[test]
fn s3_down_is_an_internal_error_and_the_webhook_is_still_sent() {
    let repo = TestRepo::new("s3down");
    repo.write("Dockerfile", &format!("FROM {}\nRUN echo x > /x\n", base()));
    repo.commit("first");
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let id = unique("s3down");
    let run = scratch.run_notifying(
        &params(
            &repo,
            "main",
            &id,
            &format!("s3_bucket=builds s3_key=k/{id}"),
        ),
        &hook.url,
        Some(&closed_port_url("")),
        &[],
    );
    assert_failed(
        &run,
        ErrorClass::Internal,
        Phase::Upload,
        "cannot reach the S3 endpoint",
    );
    let report = hook.only_report();
    assert_eq!(report.error.unwrap().phase, Phase::Upload);
    assert!(report.rootfs.is_none());
}

#[test]
fn webhook_receiver_down_is_retried_then_given_up() {
    let repo = TestRepo::new("hookdown");
    repo.write("Dockerfile", &format!("FROM {}\n", base()));
    repo.commit("first");
    let scratch = Scratch::new();
    let run = scratch.run_notifying(
        &params(&repo, "main", &unique("hookdown"), ""),
        &closed_port_url("/hook"),
        None,
        &["--notify-attempts", "3"],
    );
    assert_eq!(run.report.status, BuildStatus::Succeeded);
    assert_eq!(
        run.code, 2,
        "a result nobody heard of is an internal error: {}",
        run.log
    );
    assert_eq!(
        run.log.matches("webhook: attempt").count(),
        3,
        "{}",
        run.log
    );
    assert!(run.log.contains("webhook: giving up"), "{}", run.log);
}

#[test]
fn secrets_stay_out_of_the_log_and_the_image() {
    let repo = TestRepo::new("secrets");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo {} && env; cat /proc/cmdline; env > /env.txt; cat /proc/cmdline > /cmdline.txt\n",
            base(),
            unique("run")
        ),
    );
    repo.commit("first");
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let id = unique("secrets");
    let run = scratch.run_notifying(&params(&repo, "main", &id, ""), &hook.url, None, &[]);
    assert_eq!(run.code, 0, "{}", run.log);
    assert!(
        run.log.contains("PATH="),
        "the RUN step printed its environment: {}",
        run.log
    );
    let image = std::fs::read(run.rootfs(&id)).unwrap();
    for secret in [
        WEBHOOK_SECRET.to_string(),
        GIT_TOKEN.to_string(),
        env("BUILDER_TEST_S3_SECRET_KEY"),
    ] {
        assert!(!run.log.contains(&secret), "the log leaks {secret}");
        assert!(!run.stdout.contains(&secret), "stdout leaks {secret}");
        assert!(
            !image.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the image leaks {secret}"
        );
    }
    assert_eq!(hook.only_report().status, BuildStatus::Succeeded);
}

#[test]
fn a_full_disk_is_reported_as_a_user_error() {
    let repo = TestRepo::new("diskfull");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN head -c 30000000 /dev/urandom > /big\n",
            base()
        ),
    );
    repo.commit("first");
    let scratch = Scratch::new();
    let small = scratch.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    run(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&small));
    let id = unique("diskfull");
    let small = small.to_str().unwrap();
    let result = scratch.run(
        &params(&repo, "main", &id, ""),
        &["--work-dir", small, "--out-dir", small],
    );
    let _ = std::process::Command::new("umount").arg(small).status();
    assert_failed(&result, ErrorClass::User, Phase::Convert, "no space left");
}

/// The `etag` and `last-modified` headers of an object.
fn object_version(bucket: &str, key: &str) -> (String, String) {
    let (status, headers, _) = s3_get(bucket, key);
    assert_eq!(status, 200, "{headers}");
    let header = |name: &str| {
        headers
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {headers}"))
            .trim()
            .to_string()
    };
    (header("etag:"), header("last-modified:"))
}

#[test]
fn an_unchanged_rebuild_reuses_the_rootfs_at_its_destination() {
    let repo = TestRepo::new("reuse");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN echo {} > /stamp\nCOPY app.txt /app.txt\n",
            base(),
            unique("reuse")
        ),
    )
    .write("app.txt", "unchanged\n");
    let commit = repo.commit("first");
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = format!("rootfs/{}.ext4", unique("reuse"));
    let build = |reuse: Option<String>| {
        let hook = Receiver::start();
        let id = unique("reuse");
        let extra = match reuse {
            Some(value) => format!("s3_bucket={bucket} s3_key={key} reuse_rootfs={value}"),
            None => format!("s3_bucket={bucket} s3_key={key}"),
        };
        let run = Scratch::new().run_notifying(
            &params(&repo, &commit, &id, &extra),
            &hook.url,
            None,
            &[],
        );
        assert_eq!(run.code, 0, "{}", run.log);
        (id, run, hook.only_report())
    };

    let (first_id, _, first) = build(None);
    let first_rootfs = first.rootfs.clone().unwrap();
    assert!(!first_rootfs.reused);
    let digest = first.image_digest.clone().unwrap();
    let uploaded = object_version(&bucket, &key);

    // Same commit, same context, a new build id, on the daemon that built it (warm BuildKit
    // cache; the first build's image itself was removed): Docker 26.1's BuildKit gives the same
    // image id, so the rootfs already uploaded is reported and left alone.
    let offer = format!(
        "{digest},{},{}",
        first_rootfs.sha256, first_rootfs.size_bytes
    );
    let (_, run, second) = build(Some(offer.replace(',', "%2C")));
    assert_eq!(second.image_digest.as_deref(), Some(digest.as_str()));
    let reused = second.rootfs.clone().unwrap();
    assert!(reused.reused, "{}", run.log);
    assert_eq!(
        (
            &reused.location,
            &reused.config_location,
            &reused.sha256,
            reused.size_bytes
        ),
        (
            &first_rootfs.location,
            &first_rootfs.config_location,
            &first_rootfs.sha256,
            first_rootfs.size_bytes
        )
    );
    assert!(
        run.log.contains(&format!(
            "image {digest} is the one already at s3://{bucket}/{key}: not converted or uploaded again"
        )),
        "{}",
        run.log
    );
    let phases: Vec<Phase> = second.phases.iter().map(|p| p.phase).collect();
    assert!(
        !phases.contains(&Phase::Convert) && !phases.contains(&Phase::Upload),
        "{phases:?}"
    );
    assert_eq!(object_version(&bucket, &key), uploaded);
    let (_, headers, _) = s3_get(&bucket, &key);
    assert!(
        headers.contains(&format!("x-amz-meta-build-id: {first_id}")),
        "{headers}"
    );

    // An offer made from another image is not taken: converted and uploaded as usual.
    let stale = format!("sha256:{}", "0".repeat(64));
    let offer = format!(
        "{stale},{},{}",
        first_rootfs.sha256, first_rootfs.size_bytes
    );
    let (third_id, run, third) = build(Some(offer.replace(',', "%2C")));
    assert_eq!(third.image_digest.as_deref(), Some(digest.as_str()));
    let rootfs = third.rootfs.clone().unwrap();
    assert!(!rootfs.reused);
    assert!(run.log.contains("converting and uploading"), "{}", run.log);
    let phases: Vec<Phase> = third.phases.iter().map(|p| p.phase).collect();
    assert!(
        phases.contains(&Phase::Convert) && phases.contains(&Phase::Upload),
        "{phases:?}"
    );
    let (status, headers, body) = s3_get(&bucket, &key);
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&body), rootfs.sha256);
    assert!(
        headers.contains(&format!("x-amz-meta-build-id: {third_id}")),
        "{headers}"
    );
}
