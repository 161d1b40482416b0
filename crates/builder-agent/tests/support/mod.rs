//! Test harness for end-to-end runs of `builder-agent run` against the real services started by
//! `scripts/services.sh` (dockerd, SeaweedFS S3, git daemon): test repositories, a webhook
//! receiver that checks signatures, and S3 read-back through curl's own SigV4.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use builder_contract::signature::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::BuildReport;

pub const WEBHOOK_SECRET: &str = "whsec-test-7f3a9c";
pub const GIT_TOKEN: &str = "gittok-test-51b2e8";

/// An environment variable set by `scripts/services.sh env`; a missing one fails the test.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the test services with `eval \"$(scripts/services.sh env)\"` or run scripts/test.sh")
    })
}

pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("{prefix}-{}-{t}-{n}", std::process::id())
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repository served by the test git daemon, built commit by commit.
pub struct TestRepo {
    pub name: String,
    work: tempfile::TempDir,
    bare: PathBuf,
    /// The URL of the server's root.
    server: String,
}

impl TestRepo {
    /// A repository on the test git daemon (anyone may clone it).
    pub fn new(prefix: &str) -> Self {
        Self::on_server(prefix, "BUILDER_TEST_GIT_ROOT", "BUILDER_TEST_GIT_URL")
    }

    /// A repository on the test git HTTP server that requires `BUILDER_TEST_PRIVATE_GIT_TOKEN`.
    pub fn private(prefix: &str) -> Self {
        Self::on_server(
            prefix,
            "BUILDER_TEST_PRIVATE_GIT_ROOT",
            "BUILDER_TEST_PRIVATE_GIT_URL",
        )
    }

    fn on_server(prefix: &str, root_var: &str, url_var: &str) -> Self {
        let name = format!("{}.git", unique(prefix));
        let bare = Path::new(&env(root_var)).join(&name);
        run(Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&bare));
        run(Command::new("git").arg("-C").arg(&bare).args([
            "config",
            "uploadpack.allowReachableSHA1InWant",
            "true",
        ]));
        let work = tempfile::tempdir().unwrap();
        run(Command::new("git")
            .args(["init", "-q", "-b", "main"])
            .arg(work.path()));
        TestRepo {
            name,
            work,
            bare,
            server: env(url_var),
        }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    pub fn write(&self, path: &str, content: &str) -> &Self {
        let full = self.work.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
        self
    }

    pub fn remove(&self, path: &str) -> &Self {
        std::fs::remove_file(self.work.path().join(path)).unwrap();
        self
    }

    /// Commits everything and pushes `main`; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        let git = |args: &[&str]| {
            run(Command::new("git")
                .arg("-C")
                .arg(self.work.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args))
        };
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", message]);
        git(&["push", "-q", self.bare.to_str().unwrap(), "main"]);
        git(&["rev-parse", "HEAD"]).trim().to_string()
    }

    /// The committer time of `commit`, in Unix seconds.
    pub fn commit_time(&self, commit: &str) -> u64 {
        run(Command::new("git").arg("-C").arg(self.work.path()).args([
            "show",
            "-s",
            "--format=%ct",
            commit,
        ]))
        .trim()
        .parse()
        .unwrap()
    }
}

impl Drop for TestRepo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bare);
    }
}

/// A webhook receiver on loopback that records reports whose signature verifies.
pub struct Receiver {
    pub url: String,
    pub verified: Arc<Mutex<Vec<BuildReport>>>,
    pub rejected: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct ReceiverState {
    verified: Arc<Mutex<Vec<BuildReport>>>,
    rejected: Arc<Mutex<Vec<String>>>,
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    match verify(
        WEBHOOK_SECRET.as_bytes(),
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        &body,
        now,
        300,
    ) {
        Ok(_) => {
            let report: BuildReport = serde_json::from_slice(&body).expect("a valid report");
            state.verified.lock().unwrap().push(report);
            StatusCode::NO_CONTENT
        }
        Err(e) => {
            state.rejected.lock().unwrap().push(e.to_string());
            StatusCode::UNAUTHORIZED
        }
    }
}

impl Receiver {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = ReceiverState {
            verified: Arc::default(),
            rejected: Arc::default(),
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url,
            verified: state.verified,
            rejected: state.rejected,
            _runtime: runtime,
        }
    }

    /// The one report received; fails if there were none, several, or bad signatures.
    pub fn only_report(&self) -> BuildReport {
        assert!(
            self.rejected.lock().unwrap().is_empty(),
            "{:?}",
            self.rejected
        );
        let reports = self.verified.lock().unwrap();
        assert_eq!(
            reports.len(),
            1,
            "expected exactly one webhook: {reports:?}"
        );
        reports[0].clone()
    }
}

/// A loopback address where nothing listens.
pub fn closed_port_url(path: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}{path}")
}

/// Writes a secrets file for the test S3 server (or `s3_endpoint` instead).
pub fn secrets_file(dir: &Path, s3_endpoint: Option<&str>) -> PathBuf {
    secrets_file_with(dir, s3_endpoint, serde_json::json!({}))
}

/// [`secrets_file`] with the fields of `extra` (a JSON object) added or replaced.
pub fn secrets_file_with(
    dir: &Path,
    s3_endpoint: Option<&str>,
    extra: serde_json::Value,
) -> PathBuf {
    let endpoint = s3_endpoint
        .map(str::to_string)
        .unwrap_or_else(|| env("BUILDER_TEST_S3_ENDPOINT"));
    let path = dir.join("secrets.json");
    let json = serde_json::json!({
        "s3": {
            "endpoint": endpoint,
            "access_key_id": env("BUILDER_TEST_S3_ACCESS_KEY"),
            "secret_access_key": env("BUILDER_TEST_S3_SECRET_KEY"),
        },
        "webhook_secret": WEBHOOK_SECRET,
        "git_token": GIT_TOKEN,
    });
    let mut json = json;
    for (key, value) in extra.as_object().expect("extra secrets are an object") {
        json[key] = value.clone();
    }
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

/// One finished `builder-agent run`.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub log: String,
    pub out_dir: PathBuf,
    pub report: BuildReport,
}

impl Run {
    pub fn rootfs(&self, build_id: &str) -> PathBuf {
        self.out_dir.join(build_id).join("rootfs.ext4")
    }
}

/// A scratch directory for one run: out dir, work dir, log, secrets.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the agent with a secrets file for `s3_endpoint` (default: the test S3) and
    /// `notify_url=<hook_url>` added to `params`.
    pub fn run_notifying(
        &self,
        params: &str,
        hook_url: &str,
        s3_endpoint: Option<&str>,
        extra: &[&str],
    ) -> Run {
        self.run_with_secrets(params, hook_url, s3_endpoint, serde_json::json!({}), extra)
    }

    /// [`Scratch::run_notifying`] with `secrets` (a JSON object) added to the secrets file.
    pub fn run_with_secrets(
        &self,
        params: &str,
        hook_url: &str,
        s3_endpoint: Option<&str>,
        secrets: serde_json::Value,
        extra: &[&str],
    ) -> Run {
        let secrets = secrets_file_with(self.path(), s3_endpoint, secrets);
        let mut args = vec!["--secrets", secrets.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(&format!("{params} notify_url={hook_url}"), &args)
    }

    /// Runs the agent with `params` and extra flags; the work dir defaults to `<scratch>/work`.
    pub fn run(&self, params: &str, extra: &[&str]) -> Run {
        let out_dir = self.path().join("out");
        let log_file = self.path().join("build.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_builder-agent"));
        cmd.args(["run", "--params", params, "--notify-first-delay-ms", "100"])
            .arg("--log-file")
            .arg(&log_file)
            .env("DOCKER_HOST", env("DOCKER_HOST"))
            .env("BUILDER_INIT", env("BUILDER_INIT"));
        if !extra.contains(&"--work-dir") {
            cmd.arg("--work-dir").arg(self.path().join("work"));
        }
        if !extra.contains(&"--out-dir") {
            cmd.arg("--out-dir").arg(&out_dir);
        }
        cmd.args(extra);
        let out = cmd.output().expect("builder-agent runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not a report ({e}): {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout,
            log,
            out_dir,
            report,
        }
    }
}

/// A file of an ext4 image, read with debugfs (no mount needed).
pub fn ext4_cat(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !stderr.contains("File not found")).then_some(text)
}

/// `debugfs`'s `stat` of `path` in an ext4 image.
fn ext4_stat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The permission bits of `path` in an ext4 image, from `debugfs`'s `Mode:  0750` field.
pub fn ext4_mode(image: &Path, path: &str) -> u32 {
    let text = ext4_stat(image, path);
    text.split("Mode:")
        .nth(1)
        .and_then(|rest| u32::from_str_radix(rest.split_whitespace().next()?, 8).ok())
        .unwrap_or_else(|| panic!("no mode for {path} in debugfs output: {text}"))
}

/// The mtime (seconds) of `path` in an ext4 image, from `debugfs`'s `mtime: 0x<hex>:...` line.
pub fn ext4_mtime(image: &Path, path: &str) -> u64 {
    let text = ext4_stat(image, path);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("mtime: 0x"))
        .and_then(|hex| u64::from_str_radix(hex.split(':').next()?, 16).ok())
        .unwrap_or_else(|| panic!("no mtime for {path} in debugfs output: {text}"))
}

/// GETs an object with curl's SigV4 signing: `(status, headers, body)`.
pub fn s3_get(bucket: &str, key: &str) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("h");
    let body = dir.path().join("b");
    let status = run(Command::new("curl")
        .args(["-s", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args([
            "-w",
            "%{http_code}",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
        ])
        .arg(format!(
            "{}:{}",
            env("BUILDER_TEST_S3_ACCESS_KEY"),
            env("BUILDER_TEST_S3_SECRET_KEY")
        ))
        .arg(format!(
            "{}/{bucket}/{key}",
            env("BUILDER_TEST_S3_ENDPOINT")
        )));
    (
        status.trim().parse().unwrap(),
        std::fs::read_to_string(headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        std::fs::read(body).unwrap_or_default(),
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
