//! BuildKit through `builder-agent run` against the real test dockerd (Docker 26.1, buildx):
//! today's Dockerfile syntax, target, build args and platform, build secrets that leave no
//! trace, and private sources (a git server that wants a token, a registry that wants a login).

mod support;

use std::process::{Child, Command};

use builder_contract::{BuildStatus, ErrorClass, Phase};
use support::*;

fn base() -> String {
    env("BUILDER_TEST_BASE_IMAGE")
}

fn params(repo: &TestRepo, id: &str, extra: &str) -> String {
    format!(
        "build_id={id} repo_url={} commit_sha=main {extra}",
        repo.url()
    )
}

fn assert_user_error(run: &Run, phase: Phase, needle: &str) {
    let error = run
        .report
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("no error: {}", run.log));
    assert_eq!(
        (error.class, error.phase),
        (ErrorClass::User, phase),
        "{}",
        error.message
    );
    assert!(
        error.message.contains(needle),
        "`{}` lacks `{needle}`",
        error.message
    );
    assert_eq!(run.code, 1, "{}", run.log);
}

/// `python3 -m http.server` on a free loopback port, serving `dir`; killed on drop.
struct FileServer {
    child: Child,
    url: String,
}

impl FileServer {
    fn start(dir: &std::path::Path) -> Self {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        FileServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn todays_dockerfile_syntax_builds_with_target_build_args_and_platform_args() {
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("asset.txt"), "downloaded asset\n").unwrap();
    let asset_sha = sha256_hex(b"downloaded asset\n");
    let server = FileServer::start(served.path());
    let repo = TestRepo::new("modern");
    repo.write(
        "Dockerfile",
        &format!(
            r#"# syntax=docker/dockerfile:1.7
FROM {base} AS base
ARG GREETING
ARG TARGETPLATFORM
ARG TARGETARCH
ARG BUILDPLATFORM
RUN --mount=type=cache,target=/cache \
    echo cached > /cache/stamp && ls /cache > /cache-listing
RUN --mount=type=bind,source=data,target=/mnt/data \
    cp /mnt/data/input.txt /from-bind.txt
RUN --mount=type=tmpfs,target=/scratch \
    echo tmp > /scratch/t && cat /scratch/t > /from-tmpfs.txt
RUN <<EOF
echo "$GREETING" > /greeting.txt
echo "$TARGETPLATFORM $TARGETARCH $BUILDPLATFORM" > /platform.txt
EOF
COPY --chmod=0750 <<EOF /usr/local/bin/hello
#!/bin/sh
echo hello from a heredoc
EOF
COPY --link data/input.txt /linked.txt
ADD --checksum=sha256:{asset_sha} {url}/asset.txt /asset.txt

FROM base AS unused
RUN echo the unused stage ran && exit 1

FROM base AS final
RUN echo final > /final.txt

FROM final AS after-target
RUN echo the stage after the target ran && exit 1
"#,
            base = base(),
            url = server.url,
        ),
    )
    .write("data/input.txt", "from the context\n");
    repo.commit("first");
    let scratch = Scratch::new();
    let id = unique("modern");
    // GREETING="hello world & more", VERSION=1.2, form-encoded then percent-encoded.
    let run = scratch.run(
        &params(
            &repo,
            &id,
            "target=final platform=linux/amd64 \
             build_args=GREETING%3Dhello%2Bworld%2B%2526%2Bmore%26VERSION%3D1.2",
        ),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.log);
    let rootfs = run.rootfs(&id);
    let file = |path: &str| ext4_cat(&rootfs, path);
    assert_eq!(
        file("/greeting.txt").as_deref(),
        Some("hello world & more\n")
    );
    assert_eq!(
        file("/platform.txt").as_deref(),
        Some("linux/amd64 amd64 linux/amd64\n")
    );
    assert_eq!(file("/cache-listing").as_deref(), Some("stamp\n"));
    assert_eq!(file("/cache/stamp"), None, "cache mount contents stay out");
    assert_eq!(
        file("/from-bind.txt").as_deref(),
        Some("from the context\n")
    );
    assert_eq!(
        file("/mnt/data/input.txt"),
        None,
        "bind mount contents stay out"
    );
    assert_eq!(file("/from-tmpfs.txt").as_deref(), Some("tmp\n"));
    assert_eq!(file("/scratch/t"), None, "tmpfs contents stay out");
    assert_eq!(
        file("/usr/local/bin/hello").as_deref(),
        Some("#!/bin/sh\necho hello from a heredoc\n")
    );
    assert_eq!(ext4_mode(&rootfs, "/usr/local/bin/hello"), 0o750);
    assert_eq!(file("/linked.txt").as_deref(), Some("from the context\n"));
    assert_eq!(file("/asset.txt").as_deref(), Some("downloaded asset\n"));
    assert_eq!(file("/final.txt").as_deref(), Some("final\n"));
    assert!(!run.log.contains("the unused stage ran"), "{}", run.log);
    assert!(
        !run.log.contains("the stage after the target ran"),
        "{}",
        run.log
    );
    assert!(
        run.log
            .contains("`# syntax=docker/dockerfile:1.7` cannot be fetched")
            && run
                .log
                .contains("building with the frontend built into the daemon"),
        "the offline fallback is logged: {}",
        run.log
    );
    let inputs = run
        .report
        .inputs
        .clone()
        .expect("the report echoes the inputs");
    assert_eq!(inputs.target.as_deref(), Some("final"));
    assert_eq!(inputs.platform, "linux/amd64");
    assert_eq!(inputs.build_args["GREETING"], "hello world & more");
    assert_eq!(inputs.build_args["VERSION"], "1.2");

    // A download whose checksum does not match is the Dockerfile's error.
    let repo = TestRepo::new("badsum");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nADD --checksum=sha256:{} {}/asset.txt /asset.txt\n",
            base(),
            "0".repeat(64),
            server.url
        ),
    );
    repo.commit("first");
    let run = scratch.run(&params(&repo, &unique("badsum"), ""), &[]);
    assert_user_error(&run, Phase::Build, "ADD --checksum");
}

#[test]
fn dockerfile_errors_name_the_step_and_platforms_are_checked() {
    let scratch = Scratch::new();
    let repo = TestRepo::new("buildkit-errors");
    repo.write(
        "Dockerfile",
        &format!("FROM {}\nCOPY missing.txt /\n", base()),
    )
    .write("Dockerfile.syntax", "FROM scratch\nFOO bar\n")
    .write(
        "Dockerfile.stage",
        &format!("FROM {} AS one\nRUN true\n", base()),
    );
    repo.commit("first");
    let run = scratch.run(&params(&repo, &unique("nocopy"), ""), &[]);
    assert_user_error(&run, Phase::Build, "step `[2/2] COPY missing.txt /`");
    assert!(run
        .report
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("not found"));
    let run = scratch.run(
        &params(&repo, &unique("syntax"), "dockerfile=Dockerfile.syntax"),
        &[],
    );
    assert_user_error(&run, Phase::Build, "unknown instruction: FOO");
    let run = scratch.run(
        &params(
            &repo,
            &unique("notarget"),
            "dockerfile=Dockerfile.stage target=two",
        ),
        &[],
    );
    assert_user_error(
        &run,
        Phase::Build,
        "target stage \"two\" could not be found",
    );
    let run = scratch.run(&params(&repo, &unique("arm"), "platform=linux/arm64"), &[]);
    assert_user_error(&run, Phase::Params, "linux/amd64 only");
}

#[test]
fn build_secrets_reach_run_steps_and_nothing_else() {
    const SECRET: &str = "npm-token-value-3c9e71f0";
    let repo = TestRepo::new("buildsecret");
    // BuildKit's layer cache does not key on secrets: the nonce makes the step run every time.
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\n\
             RUN --mount=type=secret,id=npm_token,required=true \\\n\
             \x20   echo {} && \\\n\
             \x20   test \"$(sha256sum < /run/secrets/npm_token | cut -d' ' -f1)\" = {} && \\\n\
             \x20   echo the secret is $(cat /run/secrets/npm_token) && \\\n\
             \x20   wc -c < /run/secrets/npm_token > /secret-length\n",
            base(),
            unique("nonce"),
            sha256_hex(SECRET.as_bytes())
        ),
    );
    repo.commit("first");
    let hook = Receiver::start();
    let scratch = Scratch::new();
    let id = unique("buildsecret");
    let work = scratch.path().join("work");
    let run = scratch.run_with_secrets(
        &params(&repo, &id, ""),
        &hook.url,
        None,
        serde_json::json!({ "build_secrets": { "npm_token": SECRET } }),
        &["--keep-work", "--work-dir", work.to_str().unwrap()],
    );
    assert_eq!(run.code, 0, "{}", run.log);
    let rootfs = run.rootfs(&id);
    assert_eq!(ext4_cat(&rootfs, "/secret-length").as_deref(), Some("24\n"));
    assert_eq!(ext4_cat(&rootfs, "/run/secrets/npm_token"), None);
    assert!(
        run.log.contains("the secret is [REDACTED]"),
        "the RUN step's output is scrubbed: {}",
        run.log
    );
    let report = hook.only_report();
    assert_eq!(report.status, BuildStatus::Succeeded);
    assert_eq!(report.inputs.unwrap().secret_ids, ["npm_token"]);
    let image = std::fs::read(&rootfs).unwrap();
    let leaks = |bytes: &[u8]| bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
    assert!(!leaks(&image), "the rootfs holds the secret");
    assert!(!run.log.contains(SECRET), "the log holds the secret");
    assert!(!run.stdout.contains(SECRET), "the report holds the secret");
    // The scratch directory kept with --keep-work holds no copy of it either (it was passed to
    // buildx in its environment, and the Docker config with the logins is removed).
    let kept = Command::new("grep")
        .args(["-rl", SECRET])
        .arg(&work)
        .output()
        .unwrap();
    assert!(
        kept.stdout.is_empty(),
        "the scratch directory holds the secret: {}",
        String::from_utf8_lossy(&kept.stdout)
    );
}

#[test]
fn a_private_repository_needs_its_token() {
    let repo = TestRepo::private("private");
    repo.write(
        "Dockerfile",
        &format!("FROM {}\nCOPY app.txt /app.txt\n", base()),
    )
    .write("app.txt", "private app\n");
    repo.commit("first");
    let scratch = Scratch::new();
    let hook = Receiver::start();
    let id = unique("private");
    let run = scratch.run_with_secrets(
        &params(&repo, &id, ""),
        &hook.url,
        None,
        serde_json::json!({ "git_token": env("BUILDER_TEST_PRIVATE_GIT_TOKEN") }),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(
        ext4_cat(&run.rootfs(&id), "/app.txt").as_deref(),
        Some("private app\n")
    );
    assert!(!run.log.contains(&env("BUILDER_TEST_PRIVATE_GIT_TOKEN")));
    // The shared test secrets carry another token: the server refuses it.
    let run = scratch.run(
        &params(&repo, &unique("private-denied"), ""),
        &[
            "--secrets",
            secrets_file(scratch.path(), None).to_str().unwrap(),
        ],
    );
    assert_user_error(&run, Phase::Clone, "");
}

#[test]
fn a_private_base_image_needs_its_registry_login() {
    let image = env("BUILDER_TEST_PRIVATE_IMAGE");
    let registry = env("BUILDER_TEST_REGISTRY");
    // The test dockerd keeps no copy, so each build pulls it with the build's own login.
    let _ = Command::new("/usr/bin/docker")
        .args(["image", "rm", "-f", &image])
        .env("DOCKER_HOST", env("DOCKER_HOST"))
        .output();
    let repo = TestRepo::new("privimage");
    repo.write(
        "Dockerfile",
        &format!("FROM {image}\nRUN echo pulled > /pulled\n"),
    );
    repo.commit("first");
    let scratch = Scratch::new();
    let hook = Receiver::start();
    let run = scratch.run(&params(&repo, &unique("nologin"), ""), &[]);
    assert_user_error(&run, Phase::Build, &registry);
    let id = unique("login");
    let password = env("BUILDER_TEST_REGISTRY_PASSWORD");
    let run = scratch.run_with_secrets(
        &params(&repo, &id, ""),
        &hook.url,
        None,
        serde_json::json!({ "registry_auths": { registry.clone(): {
            "username": env("BUILDER_TEST_REGISTRY_USER"),
            "password": password,
        }}}),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(
        ext4_cat(&run.rootfs(&id), "/pulled").as_deref(),
        Some("pulled\n")
    );
    assert!(!run.log.contains(&password) && !run.stdout.contains(&password));
    let _ = Command::new("/usr/bin/docker")
        .args(["image", "rm", "-f", &image])
        .env("DOCKER_HOST", env("DOCKER_HOST"))
        .output();
}
