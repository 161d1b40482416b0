//! Test harness: the daemon in-process on loopback (real HTTP, real database) with a launcher
//! whose "VM" is a real child process running a shell script, so the scheduler, supervisor,
//! timeouts and cancels act on real processes; its stderr is the "VMM's log", and its
//! VM-facing listener is served on a loopback port of its own, as a real launcher serves it on
//! the VM's veth; a guest's posts of its logs and report ([`Guest`]); a webhook receiver; and
//! a private PostgreSQL cluster in a temp dir when `NODE_AGENT_TEST_POSTGRES_URL` is not
//! given.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder_vmm::firecracker::metrics::MetricsTotals;
use futures_util::future::BoxFuture;
use node_agent::config::{Config, ServeArgs};
use node_agent::node::Node;
use node_agent::vm::{
    point_at_host, Check, LaunchSpec, Launcher, RunningVm, VmError, VmExit, VmListener,
};

/// The name server test daemons give their VMs.
pub const TEST_VM_DNS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 53);

/// The source upload limit of test daemons.
pub const MAX_SOURCE_BYTES: u64 = 1 << 20;

/// A launcher whose VMs are `sh -c SCRIPT` with the console on stdout, the build id in
/// `BUILD_ID` and the build's cache disk (`LaunchSpec.cache_disk`) in `CACHE_DISK` (empty
/// without one).
pub struct ScriptLauncher {
    pub script: Mutex<String>,
    pub launched: Mutex<Vec<LaunchSpec>>,
    pub pids: Mutex<Vec<u32>>,
    pub running: Arc<AtomicUsize>,
    pub max_running: Arc<AtomicUsize>,
    pub reclaimable: usize,
    /// What [`Launcher::vmm_metrics`] answers, as a VMM would for its running VMs.
    pub vmm_metrics: Mutex<Vec<(String, MetricsTotals)>>,
}

impl ScriptLauncher {
    pub fn new(script: &str) -> Arc<Self> {
        Arc::new(ScriptLauncher {
            script: Mutex::new(script.to_string()),
            launched: Mutex::default(),
            pids: Mutex::default(),
            running: Arc::default(),
            max_running: Arc::default(),
            reclaimable: 0,
            vmm_metrics: Mutex::default(),
        })
    }

    pub fn spec(&self, build_id: &str) -> Option<LaunchSpec> {
        self.launched
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.build_id == build_id)
            .cloned()
    }
}

struct ScriptVm {
    child: tokio::process::Child,
    running: Arc<AtomicUsize>,
    /// The VM-facing routes, served while the "VM" runs.
    listener: Option<VmListener>,
}

impl Launcher for ScriptLauncher {
    fn launch(&self, mut spec: LaunchSpec) -> BoxFuture<'_, Result<Box<dyn RunningVm>, VmError>> {
        Box::pin(async move {
            let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
            let listener = spec
                .vm_routes
                .as_ref()
                .map(|routes| routes.serve((loopback, 0).into()).unwrap());
            point_at_host(
                &mut spec.params,
                loopback,
                listener.as_ref().map(|l| l.addr().port()),
            );
            let console = std::fs::File::create(&spec.console_log).unwrap();
            let vmm_log = std::fs::File::create(&spec.vmm_log).unwrap();
            let cache_disk = spec.cache_disk.clone().unwrap_or_default();
            let child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(self.script.lock().unwrap().clone())
                .env("BUILD_ID", &spec.build_id)
                .env("CACHE_DISK", cache_disk)
                .stdout(Stdio::from(console))
                .stderr(Stdio::from(vmm_log))
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| VmError::Launch {
                    build_id: spec.build_id.clone(),
                    source: Box::new(e),
                })?;
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            self.pids.lock().unwrap().push(child.id().unwrap());
            self.launched.lock().unwrap().push(spec);
            Ok(Box::new(ScriptVm {
                child,
                running: self.running.clone(),
                listener,
            }) as Box<dyn RunningVm>)
        })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<u64, VmError>> {
        Box::pin(async move { Ok(self.reclaimable as u64) })
    }

    fn readiness(&self) -> Vec<Check> {
        vec![Check::new("script", true, "sh")]
    }

    fn vmm_metrics(&self) -> Vec<(String, MetricsTotals)> {
        self.vmm_metrics.lock().unwrap().clone()
    }
}

impl RunningVm for ScriptVm {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
    fn wait(&mut self) -> BoxFuture<'_, Result<VmExit, VmError>> {
        Box::pin(async move {
            let status = self.child.wait().await.unwrap();
            Ok(VmExit {
                code: status.code(),
                description: format!("exited ({status})"),
            })
        })
    }
    fn kill(&mut self) -> BoxFuture<'_, Result<(), VmError>> {
        Box::pin(async move {
            let _ = self.child.start_kill();
            Ok(())
        })
    }
    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), VmError>> {
        Box::pin(async move {
            drop(self.listener);
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

pub struct Daemon {
    pub base: String,
    pub token: String,
    pub node: Arc<Node>,
    pub work_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub struct Options {
    pub database_url: Option<String>,
    pub capacity_vcpus: u32,
    pub node_id: String,
    pub grace_period_s: u64,
    /// Whether the node has S3 credentials (`s3_credentials_file`); the script VMs never
    /// upload, so they name an endpoint nothing listens on.
    pub s3_credentials: bool,
    /// The `s3` section of `s3_credentials_file` (JSON); `None`: the test store's
    /// ([`test_store`]) when the test services' environment names one (its bucket `rootfs`,
    /// the builds' default, made if missing), else an endpoint nothing listens on.
    pub s3_section: Option<String>,
    /// `max_log_bytes` (the default's when `None`).
    pub max_log_bytes: Option<u64>,
    /// `retention_days` (the default's when `None`).
    pub retention_days: Option<u64>,
    /// `notify_allow`: by default loopback, where the tests' webhook receivers listen.
    pub notify_allow: Vec<String>,
    /// `tls_cert_file` and `tls_key_file`: the API serves HTTPS (`base` is `https://`).
    pub tls: Option<node_agent::config::TlsFiles>,
    /// `cache`: off by default here (1 GiB disks, sparse copies, `cache_max_mib` as given).
    pub cache: bool,
    pub cache_max_mib: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            database_url: None,
            capacity_vcpus: 2,
            node_id: "test-node".into(),
            grace_period_s: 5,
            s3_credentials: true,
            s3_section: None,
            max_log_bytes: None,
            retention_days: None,
            notify_allow: vec!["127.0.0.0/8".into()],
            tls: None,
            cache: false,
            cache_max_mib: None,
        }
    }
}

/// The S3 store of the test services (`scripts/services.sh env`), when its environment is set.
pub fn test_store() -> Option<builder_contract::S3Credentials> {
    let var = |name| std::env::var(name).ok();
    Some(builder_contract::S3Credentials {
        endpoint: var("BUILDER_TEST_S3_ENDPOINT")?,
        region: var("BUILDER_TEST_S3_REGION")?,
        access_key_id: var("BUILDER_TEST_S3_ACCESS_KEY")?,
        secret_access_key: var("BUILDER_TEST_S3_SECRET_KEY")?,
        session_token: None,
    })
}

/// Makes `bucket` in `store` when it is missing (curl signs the request).
fn make_bucket(store: &builder_contract::S3Credentials, bucket: &str) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args([
            "--aws-sigv4",
            &format!("aws:amz:{}:s3", store.region),
            "--user",
        ])
        .arg(format!(
            "{}:{}",
            store.access_key_id, store.secret_access_key
        ))
        .arg(format!("{}/{bucket}", store.endpoint))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        code == "200" || code == "409",
        "cannot make the bucket {bucket}: HTTP {code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn start(work_dir: &Path, launcher: Arc<dyn Launcher>, o: Options) -> Daemon {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s3_credentials_file = o.s3_credentials.then(|| {
        std::fs::create_dir_all(work_dir).unwrap();
        let path = work_dir.join("s3.json");
        let section = o.s3_section.clone().or_else(|| {
            let store = test_store()?;
            make_bucket(&store, "rootfs");
            Some(serde_json::to_string(&store).unwrap())
        });
        let section = section.unwrap_or_else(|| {
            r#"{"endpoint": "http://127.0.0.1:9", "access_key_id": "test-access", "secret_access_key": "test-secret"}"#.to_string()
        });
        std::fs::write(&path, format!(r#"{{"s3": {section}}}"#))
        .unwrap();
        path
    });
    let args = ServeArgs {
        work_dir: Some(work_dir.to_path_buf()),
        s3_credentials_file,
        // Set, so the tests do not depend on the host's /etc/resolv.conf.
        vm_dns: Some(vec![TEST_VM_DNS]),
        database_url: o.database_url,
        capacity_vcpus: Some(o.capacity_vcpus),
        capacity_mem_mib: Some(16384),
        node_id: Some(o.node_id),
        listen: Some(addr),
        grace_period_s: Some(o.grace_period_s),
        poll_interval_ms: Some(50),
        max_body_bytes: Some(4096),
        max_source_bytes: Some(MAX_SOURCE_BYTES),
        webhook_attempts: Some(3),
        max_log_bytes: o.max_log_bytes,
        retention_days: o.retention_days,
        notify_allow: Some(o.notify_allow),
        tls_cert_file: o.tls.as_ref().map(|t| t.cert.clone()),
        tls_key_file: o.tls.as_ref().map(|t| t.key.clone()),
        cache: Some(o.cache),
        cache_disk_gib: Some(1),
        cache_max_mib: o.cache_max_mib,
        cache_reflink_image_gib: Some(0),
        ..Default::default()
    };
    let config = Config::load(&args).unwrap();
    let node = Node::start(config, launcher).await.unwrap();
    let token = node.api_token.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node_agent::serve_on(listener, node.clone(), async move {
        let _ = rx.await;
    }));
    let scheme = if o.tls.is_some() { "https" } else { "http" };
    Daemon {
        base: format!("{scheme}://{addr}"),
        token,
        node,
        work_dir: work_dir.to_path_buf(),
        shutdown: Some(tx),
        task,
    }
}

impl Daemon {
    pub fn client(&self) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: self.base.clone(),
            token: self.token.clone(),
        }
    }

    /// SIGTERM's path: drain, then stop.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn submit(&self, extra: serde_json::Value) -> String {
        let mut body = serde_json::json!({"repo_url": "https://git.example/app.git", "ref": "main", "vcpus": 1, "mem_mib": 512, "s3_bucket": "rootfs", "s3_key": "app.rootfs"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = self.post("/v1/builds", &body).await;
        assert_eq!(status, 202, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub async fn build(&self, id: &str) -> serde_json::Value {
        let (status, v) = self.get(&format!("/v1/builds/{id}")).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Polls until the build is in a terminal state.
    pub async fn wait_terminal(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let b = self.build(id).await;
            if ["succeeded", "failed", "timed_out", "cancelled"]
                .contains(&b["state"].as_str().unwrap())
            {
                return b;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "build {id} not finished in {within:?}: {b}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(&self, id: &str, state: &str, within: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let b = self.build(id).await;
            if b["state"] == state {
                return b;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "build {id} never {state}: {b}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What a guest posts to its node: its logs and its report, signed with the build's key, at
/// the URLs its launch spec gives it (the VM-facing listener).
pub struct Guest {
    pub build_id: String,
    pub key: String,
    pub notify_url: url::Url,
}

impl Guest {
    /// The guest of the build `spec` launched.
    pub fn of(spec: &LaunchSpec) -> Self {
        Guest {
            build_id: spec.build_id.clone(),
            key: spec.secrets.webhook_secret.clone().unwrap(),
            notify_url: spec.params.notify_url.clone().unwrap(),
        }
    }

    /// Posts `body` signed with `key` (the build's, or another to be refused); the status.
    pub async fn post_signed(&self, url: &url::Url, key: &str, body: &[u8]) -> u16 {
        use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
        let ts = (node_agent::now_ms() / 1000) as u64;
        reqwest::Client::new()
            .post(url.clone())
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, sign(key.as_bytes(), ts, body))
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Posts log `source` as the guest would; the status.
    pub async fn post_log(&self, source: builder_contract::LogSource, text: &str) -> u16 {
        let url = builder_contract::logs::guest_log_url(&self.notify_url, &self.build_id, source)
            .expect("a guest log goes beside the node's report route");
        self.post_signed(&url, &self.key, text.as_bytes()).await
    }

    /// Posts that the guest started `phase`, as builder-agent does; the status.
    pub async fn post_progress(&self, phase: builder_contract::Phase) -> u16 {
        let url = builder_contract::progress::progress_url(&self.notify_url, &self.build_id)
            .expect("progress goes beside the node's report route");
        let event = builder_contract::ProgressEvent {
            build_id: self.build_id.clone(),
            phase,
            at_unix_ms: node_agent::now_ms() as u64,
        };
        let body = serde_json::to_vec(&event).unwrap();
        self.post_signed(&url, &self.key, &body).await
    }

    /// Uploads `bytes` as this build's rootfs the way builder-agent does in a VM (no S3 key:
    /// each request granted by the node) to the daemon's store; the report's artifact for it.
    pub async fn upload_rootfs(&self, bytes: &[u8]) -> builder_contract::RootfsArtifact {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rootfs.ext4");
        std::fs::write(&path, bytes).unwrap();
        let sha256 = hex::encode(sha2::Sha256::digest(bytes));
        let object = builder_s3::GrantedObject {
            sha256: sha256.clone(),
            image_digest: format!("sha256:{}", "ab".repeat(32)),
            commit_sha: "0123456789abcdef0123456789abcdef01234567".into(),
        };
        let grant = builder_s3::NodeGrant::new(
            &self.notify_url,
            &self.build_id,
            self.key.as_bytes(),
            object,
        )
        .expect("the guest reports to its node");
        builder_s3::Uploader::default()
            .upload(
                &grant,
                &path,
                Some(b"{}".to_vec().into()),
                5 << 20,
                |_, _| {},
            )
            .await
            .expect("the granted upload lands");
        let verified = grant.verified().expect("the node verified the upload");
        builder_contract::RootfsArtifact {
            config_location: format!("{}.json", verified.location),
            location: verified.location,
            size_bytes: verified.size,
            sha256,
            reused: false,
        }
    }

    /// Posts the report; the status.
    pub async fn post_report(&self, report: &builder_contract::BuildReport) -> u16 {
        let body = serde_json::to_vec(report).unwrap();
        self.post_signed(&self.notify_url, &self.key, &body).await
    }
}

/// A webhook receiver on loopback that records every request.
pub struct Receiver {
    pub url: String,
    pub hits: Arc<Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>>,
}

pub async fn receiver() -> Receiver {
    use axum::routing::post;
    let hits: Arc<Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>> = Arc::default();
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let h = h.clone();
            async move {
                h.lock().unwrap().push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver { url, hits }
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie is not alive: it has exited.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split(' ').nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

/// A PostgreSQL database for one test: `NODE_AGENT_TEST_POSTGRES_URL` (a server the test may
/// create databases on), else a private cluster in a temp dir run as the `postgres` user on a
/// free loopback port, stopped when dropped.
pub struct Postgres {
    pub url: String,
    cluster: Option<(tempfile::TempDir, PathBuf)>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some((dir, bin)) = &self.cluster {
            let _ = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .args(["-D"])
                .arg(dir.path().join("data"))
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Debian's postgresql is installed")
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version").join("bin")
}

pub async fn postgres() -> Postgres {
    let db = format!("na_{}", node_agent::random_hex(6));
    if let Ok(server) = std::env::var("NODE_AGENT_TEST_POSTGRES_URL") {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&server)
            .await
            .expect("NODE_AGENT_TEST_POSTGRES_URL answers");
        sqlx::Executor::execute(&mut c, format!("CREATE DATABASE {db}").as_str())
            .await
            .unwrap();
        let mut url = url::Url::parse(&server).unwrap();
        url.set_path(&db);
        return Postgres {
            url: url.to_string(),
            cluster: None,
        };
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = pg_bin();
    let chown = |p: &Path| {
        assert!(std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
            .unwrap()
            .success())
    };
    chown(dir.path());
    let as_pg = |cmd: &str| {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(cmd));
        c
    };
    let out = as_pg("initdb")
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
        dir.path().display()
    );
    let out = as_pg("pg_ctl")
        .args(["-D"])
        .arg(dir.path().join("data"))
        .args(["-l"])
        .arg(dir.path().join("log"))
        .args(["-w", "-o", &opts, "start"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_ctl start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&server).await.unwrap();
    sqlx::Executor::execute(&mut c, format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    Postgres {
        url: format!("postgres://postgres@127.0.0.1:{port}/{db}"),
        cluster: Some((dir, bin)),
    }
}

/// A failed build's report as a guest sends it: the failure's class, phase and message.
pub fn failed_report(
    id: &str,
    class: builder_contract::ErrorClass,
    phase: builder_contract::Phase,
    message: &str,
) -> builder_contract::BuildReport {
    builder_contract::BuildReport {
        build_id: id.to_string(),
        status: builder_contract::BuildStatus::Failed,
        repo_url: "https://git.example/app.git".into(),
        revision: "main".into(),
        commit_sha: None,
        image_digest: None,
        inputs: None,
        rootfs: None,
        error: Some(builder_contract::BuildFailure {
            class,
            phase,
            message: message.into(),
        }),
        phases: vec![],
        started_at_unix_ms: 1,
        duration_ms: 2,
    }
}

/// A report as a guest sends it at its end: `status` with the `rootfs` it uploaded (and its
/// image's digest), or, failed, the failure of a `RUN` step.
pub fn end_report(
    id: &str,
    status: builder_contract::BuildStatus,
    rootfs: Option<builder_contract::RootfsArtifact>,
    image_digest: Option<String>,
) -> builder_contract::BuildReport {
    let mut report = failed_report(
        id,
        builder_contract::ErrorClass::User,
        builder_contract::Phase::Build,
        "RUN exited with 1",
    );
    if status != builder_contract::BuildStatus::Failed {
        report.error = None;
    }
    builder_contract::BuildReport {
        status,
        rootfs,
        image_digest,
        ..report
    }
}

/// The states a build went through, in order, from its events (`GET /v1/builds/{id}`).
pub fn states(build: &serde_json::Value) -> Vec<String> {
    build["events"]
        .as_array()
        .expect("the build's events")
        .iter()
        .map(|e| e["to_state"].as_str().expect("a state").to_string())
        .collect()
}
