//! The real daemon binary with the real VMM (QEMU; set `BUILDER_VMM_ACCEL=tcg` where KVM is
//! nested): kill -9 mid-build and restart, timeouts and capacity with real VMs, each ending
//! with a check that no VMM process, netns, veth or work dir of the node is left. Slow and
//! root-only: `cargo test -p node-agent --test vm -- --ignored --test-threads 1`.
//!
//! Guests: the project's kernel (`build/vms/vmlinux`, or `NODE_AGENT_TEST_KERNEL`) with a root
//! disk that is not a filesystem panics at once and QEMU exits (the stub VM); with the builder
//! image (`build/vms/builder-rootfs.ext4`, or `NODE_AGENT_TEST_ROOTFS`) and a repo on an
//! unroutable address it runs until stopped. The builder image's own agent also reports, and
//! hands over its logs, through its veth to the node's VM-facing listener (the daemon listens
//! on loopback only, the default), once with build args too long for the kernel command line
//! and build credentials, which it takes from its config drive.
//!
//! Warm builds (issue 10) build for real and upload: examples/rebuild, `FROM` the test base
//! image (the builder image must have it preloaded, `PRELOAD_IMAGES`, as
//! `scripts/test-builder-vm.sh` builds it), and a Dockerfile `FROM` an upstream registry. S3 and
//! that upstream live in an outside namespace (`scripts/lib/outside.sh`, 198.18.253.0/30 and
//! 198.18.254.0/30); the upstream is a copy of the test services' registry
//! (`scripts/services.sh start`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn project_file(env: &str, rel: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    });
    assert!(path.exists(), "{} is missing (set {env})", path.display());
    path
}

/// The daemon's process, stopped when the test lets go of it (also when it panics), so a
/// failed test leaves no daemon behind holding its VM network: SIGTERM first (the daemon
/// drains and unmounts its cache pool's XFS image), SIGKILL after [`DAEMON_STOP_GRACE`].
struct DaemonProcess(Child);

const DAEMON_STOP_GRACE: Duration = Duration::from_secs(30);

impl std::ops::Deref for DaemonProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for DaemonProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: kill takes any pid and signal; the child has not been reaped yet.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + DAEMON_STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Daemon {
    child: DaemonProcess,
    base: String,
    token: String,
    work: PathBuf,
    node_id: String,
    rootfs: PathBuf,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    fn start(work: &Path, node_id: &str, rootfs: &Path, port: u16, capacity: u32) -> Daemon {
        // A build must name a bucket and the node must be able to upload: these builds fail
        // before any upload, and the status object they write goes to a closed port.
        std::fs::create_dir_all(work).unwrap();
        let s3_credentials = work.join("s3.json");
        std::fs::write(
            &s3_credentials,
            r#"{"s3": {"endpoint": "http://127.0.0.1:9", "access_key_id": "test-access", "secret_access_key": "test-secret"}}"#,
        )
        .unwrap();
        Daemon::start_with(work, node_id, rootfs, port, capacity, &s3_credentials, &[])
    }

    /// [`Daemon::start`] uploading with `s3_credentials`, and `extra` arguments to `serve`.
    fn start_with(
        work: &Path,
        node_id: &str,
        rootfs: &Path,
        port: u16,
        capacity: u32,
        s3_credentials: &Path,
        extra: &[&str],
    ) -> Daemon {
        std::fs::create_dir_all(work).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .arg("serve")
            .args(extra)
            .arg("--s3-credentials-file")
            .arg(s3_credentials)
            .arg("--work-dir")
            .arg(work)
            .arg("--listen")
            // Loopback, the default: VMs are served on their own listener at their veth.
            .arg(format!("127.0.0.1:{port}"))
            .arg("--node-id")
            .arg(node_id)
            .arg("--capacity-vcpus")
            .arg(capacity.to_string())
            .arg("--capacity-mem-mib")
            .arg("4096")
            .arg("--kernel")
            .arg(project_file("NODE_AGENT_TEST_KERNEL", "build/vms/vmlinux"))
            .arg("--rootfs")
            .arg(rootfs)
            .arg("--vm-network")
            .arg("10.218.0.0/16")
            .arg("--grace-period-s")
            .arg("2")
            // Pinned: `auto` picks Firecracker where KVM answers, and this host's KVM is nested
            // (Firecracker's guests die there); QEMU under TCG boots.
            .arg("--vmm")
            .arg("qemu")
            .env(
                "BUILDER_VMM_ACCEL",
                std::env::var("BUILDER_VMM_ACCEL").unwrap_or_else(|_| "tcg".into()),
            )
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(work.join("daemon.log"))
                    .unwrap(),
            )
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::blocking_get(&format!("{base}/healthz")).is_none() {
            assert!(Instant::now() < deadline, "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let token = std::fs::read_to_string(work.join("api-token")).unwrap();
        Daemon {
            child: DaemonProcess(child),
            base,
            token,
            work: work.to_path_buf(),
            node_id: node_id.into(),
            rootfs: rootfs.into(),
            port,
        }
    }

    /// Log `source` of build `id` through the API: status and text.
    fn log(&self, id: &str, source: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}/v1/builds/{id}/logs?source={source}", self.base))
            .output()
            .unwrap();
        let out = String::from_utf8(out.stdout).unwrap();
        let (text, code) = out.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), text.to_string())
    }

    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, "-H"])
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg(format!("{}{path}", self.base));
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d"])
                .arg(b.to_string());
        }
        let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    fn submit(&self, extra: Value) -> String {
        let mut body = json!({"repo_url": "http://192.0.2.1/unreachable.git", "ref": "main", "vcpus": 1, "mem_mib": 512, "disk_gib": 1, "s3_bucket": "rootfs", "s3_key": "app.rootfs"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = self.api("POST", "/v1/builds", Some(body));
        assert_eq!(status, 202, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    fn wait(&self, id: &str, done: impl Fn(&Value) -> bool, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (_, b) = self.api("GET", &format!("/v1/builds/{id}"), None);
            if done(&b) {
                return b;
            }
            assert!(Instant::now() < deadline, "build {id}: {b}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the build is in a terminal state.
    fn wait_terminal(&self, id: &str, within: Duration) -> Value {
        self.wait(
            id,
            |b| {
                ["succeeded", "failed", "timed_out", "cancelled"]
                    .contains(&b["state"].as_str().unwrap_or(""))
            },
            within,
        )
    }

    fn leftovers(&self) -> Vec<String> {
        leftovers(&self.work, &self.node_id)
    }

    fn sigterm(mut self) {
        // SAFETY: kill takes any pid and signal; the worst a stale pid gets is a signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "the daemon exited with {status} after SIGTERM"
        );
    }
}

/// What the VMs of node `node_id` (tagged `bvm-<node tag>-`) left on the host.
fn leftovers(work: &Path, node_id: &str) -> Vec<String> {
    {
        let prefix = format!(
            "bvm-{}-",
            &hex::encode(Sha256::digest(node_id.as_bytes()))[..8]
        );
        let mut found = vec![];
        let sh = |c: &str| {
            String::from_utf8(Command::new("sh").arg("-c").arg(c).output().unwrap().stdout).unwrap()
        };
        for line in sh("ip netns list; ip -o link show; ps -eo pid,args").lines() {
            if line.contains(&prefix) && !line.contains("ps -eo") {
                found.push(line.to_string());
            }
        }
        for e in std::fs::read_dir(work.join("vms")).unwrap().flatten() {
            found.push(e.path().display().to_string());
        }
        // QEMU's jails, and its cgroups in every hierarchy.
        for e in std::fs::read_dir(work.join("jail/qemu"))
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(e.path().display().to_string());
        }
        for dir in builder_vmm::cgroup::find(&prefix) {
            found.push(dir.display().to_string());
        }
        found
    }
}

mod reqwest {
    /// A GET with curl that says whether it answered 2xx.
    pub fn blocking_get(url: &str) -> Option<()> {
        let ok = std::process::Command::new("curl")
            .args(["-fs", "-o", "/dev/null", url])
            .status()
            .ok()?
            .success();
        ok.then_some(())
    }
}

fn builder_rootfs() -> PathBuf {
    project_file("NODE_AGENT_TEST_ROOTFS", "build/vms/builder-rootfs.ext4")
}

fn stub_rootfs(dir: &Path) -> PathBuf {
    let path = dir.join("not-a-filesystem.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split(' ').nth(2) != Some("Z"))
}

/// `/readyz` says which VMM runs the builds and that TCG is emulation; `/metrics` has the
/// same as `node_agent_vmm_info`.
#[test]
#[ignore = "runs the daemon with the real VMM layer; root"]
fn readyz_and_metrics_name_the_vmm_and_its_emulation() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!("readyz-{}", std::process::id()),
        &stub_rootfs(dir.path()),
        free_port(),
        1,
    );
    let (_, ready) = d.api("GET", "/readyz", None);
    let vmm = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "vmm")
        .unwrap_or_else(|| panic!("no vmm check: {ready}"));
    assert_eq!(vmm["ok"], true, "{ready}");
    assert_eq!(vmm["detail"], "qemu, tcg (emulated)", "{ready}");
    let metrics = Command::new("curl")
        .args(["-sf", &format!("{}/metrics", d.base), "-H"])
        .arg(format!("Authorization: Bearer {}", d.token))
        .output()
        .unwrap();
    let metrics = String::from_utf8(metrics.stdout).unwrap();
    assert!(
        metrics.contains("node_agent_vmm_info{vmm=\"qemu\",accel=\"tcg\"} 1\n"),
        "{metrics}"
    );
    d.sigterm();
}

#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn kill_9_mid_build_then_restart_fails_the_build_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::start(
        dir.path(),
        &format!("kill9-{}", std::process::id()),
        &builder_rootfs(),
        port,
        2,
    );
    let id = d.submit(json!({}));
    let b = d.wait(&id, |b| b["state"] == "running", Duration::from_secs(60));
    let detail = b["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["to_state"] == "running")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_string();
    let pid: i32 = detail
        .split("pid ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let Daemon {
        mut child,
        work,
        node_id,
        rootfs,
        port,
        ..
    } = d;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(pid_alive(pid), "the VMM should outlive a crashed daemon");
    assert!(
        !leftovers(&work, &node_id).is_empty(),
        "a crash leaves the VM's resources behind"
    );

    let d = Daemon::start(&work, &node_id, &rootfs, port, 2);
    let b = d.wait(&id, |b| b["state"] != "running", Duration::from_secs(30));
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(b["error"]["message"], "node agent restarted");
    assert!(!pid_alive(pid), "reclaim killed the VMM {pid}");
    assert_eq!(d.leftovers(), Vec::<String>::new());
    let metrics = String::from_utf8(
        Command::new("curl")
            .arg("-s")
            .arg(format!("{}/metrics", d.base))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let reclaimed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("node_agent_reclaimed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        reclaimed >= 3,
        "process, netns, veth, work dir at least: {reclaimed}"
    );
    d.sigterm();
}

#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn timeout_and_cancel_stop_real_vms_without_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!("timeout-{}", std::process::id()),
        &builder_rootfs(),
        free_port(),
        2,
    );
    let timed = d.submit(json!({"timeout_s": 8}));
    let cancelled = d.submit(json!({}));
    d.wait(
        &cancelled,
        |b| b["state"] == "running",
        Duration::from_secs(60),
    );
    let (status, _) = d.api("POST", &format!("/v1/builds/{cancelled}/cancel"), None);
    assert_eq!(status, 202);
    let b = d.wait(
        &cancelled,
        |b| b["state"] == "cancelled",
        Duration::from_secs(30),
    );
    assert_eq!(b["error"]["class"], "user");
    let b = d.wait(
        &timed,
        |b| b["state"] == "timed_out",
        Duration::from_secs(60),
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("8 s time limit"),
        "{b}"
    );
    // The console log outlives the VM.
    let log = std::fs::read_to_string(d.work.join("logs").join(format!("{timed}.log"))).unwrap();
    assert!(log.contains("Linux version"), "{log}");
    assert_eq!(d.leftovers(), Vec::<String>::new());
    d.sigterm();
}

#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn fifty_stub_vms_with_capacity_two_never_overlap_more_than_two() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = stub_rootfs(dir.path());
    let d = Daemon::start(
        dir.path(),
        &format!("cap-{}", std::process::id()),
        &rootfs,
        free_port(),
        2,
    );
    let ids: Vec<String> = (0..50).map(|_| d.submit(json!({}))).collect();
    let mut spans = vec![];
    for id in &ids {
        let b = d.wait_terminal(id, Duration::from_secs(600));
        assert_eq!(b["state"], "failed", "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("kernel panicked"),
            "{b}"
        );
        spans.push((
            b["timings"]["vm_started_at_ms"].as_i64().unwrap(),
            b["timings"]["finished_at_ms"].as_i64().unwrap(),
        ));
    }
    // At every VM start, how many VMs were live (started and not finished)?
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(s2, f2)| s2 <= s && s < f2).count())
        .max()
        .unwrap();
    assert!(most <= 2, "{most} VMs ran at once");
    assert_eq!(d.leftovers(), Vec::<String>::new());
    d.sigterm();
}

#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn a_real_guest_reports_through_its_veth_with_its_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!("guest-{}", std::process::id()),
        &builder_rootfs(),
        free_port(),
        2,
    );
    // DNS fails at once inside the VM, so the guest agent reports a user error in `clone`.
    let id = d.submit(json!({"repo_url": "https://nonexistent.invalid/repo.git", "vcpus": 2, "mem_mib": 2048, "timeout_s": 300}));
    let b = d.wait_terminal(&id, Duration::from_secs(300));
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(b["error"]["class"], "user", "{b}");
    assert_eq!(b["error"]["phase"], "clone", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nonexistent.invalid"),
        "{b}"
    );
    // The guest powered itself off after its report was accepted.
    assert_eq!(b["vmm_exit_code"], 0, "{b}");
    let log = std::fs::read_to_string(d.work.join("logs").join(format!("{id}.log"))).unwrap();
    assert!(
        log.contains("webhook: delivered") && log.contains("HTTP 204"),
        "{log}"
    );
    // The guest handed over its logs before its report; the VMM's log was kept at cleanup.
    assert!(
        log.contains("logs: build log sent") && log.contains("logs: dockerd log sent"),
        "{log}"
    );
    let (status, build) = d.log(&id, "build");
    assert_eq!(status, 200, "{build}");
    assert!(build.contains("==> clone"), "{build}");
    let (status, dockerd) = d.log(&id, "dockerd");
    assert_eq!(status, 200, "{dockerd}");
    // The image's dockerd logs warnings and up.
    assert!(dockerd.contains(" level="), "{dockerd}");
    let (status, vmm) = d.log(&id, "vmm");
    assert_eq!(status, 200, "{vmm}");
    assert!(vmm.starts_with("--- qemu.log ---\n"), "{vmm}");
    assert_eq!(d.leftovers(), Vec::<String>::new());
    d.sigterm();
}

#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn a_real_guest_takes_oversized_build_args_and_credentials_from_its_config_drive() {
    const SECRET: &str = "npm-SECRET-in-a-real-vm-41d2";
    const TOKEN: &str = "ghp-TOKEN-in-a-real-vm-9c3e";
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        &format!("inputs-{}", std::process::id()),
        &builder_rootfs(),
        free_port(),
        2,
    );
    // Too long for the kernel command line: the node puts the build args on the config drive
    // and the guest merges them back; it then fails in `clone` (no DNS) and reports its inputs.
    let big = "v".repeat(2500);
    let id = d.submit(json!({
        "repo_url": "https://nonexistent.invalid/repo.git", "vcpus": 2, "mem_mib": 2048,
        "timeout_s": 300, "target": "prod", "build_args": {"BIG": big, "SMALL": "1"},
        "secrets": {"npm": SECRET}, "git_token": TOKEN,
    }));
    let b = d.wait_terminal(&id, Duration::from_secs(300));
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(
        (&b["error"]["class"], &b["error"]["phase"]),
        (&json!("user"), &json!("clone")),
        "{b}"
    );
    let inputs = &b["inputs"];
    assert_eq!(inputs["target"], "prod", "{b}");
    assert_eq!(inputs["build_args"]["BIG"], big.as_str(), "{b}");
    assert_eq!(inputs["build_args"]["SMALL"], "1", "{b}");
    assert_eq!(inputs["secret_ids"], json!(["npm"]), "{b}");
    assert!(!dir
        .path()
        .join("credentials")
        .join(format!("{id}.json"))
        .exists());
    let console = std::fs::read_to_string(d.work.join("logs").join(format!("{id}.log"))).unwrap();
    let guest_logs: Vec<String> = ["build", "dockerd", "vmm"]
        .iter()
        .map(|source| d.log(&id, source).1)
        .collect();
    let daemon_log = std::fs::read_to_string(d.work.join("daemon.log")).unwrap();
    assert_eq!(d.leftovers(), Vec::<String>::new());
    d.sigterm();
    let mut database = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(format!("node-agent.db{suffix}"))) {
            database.extend(bytes);
        }
    }
    let database = String::from_utf8_lossy(&database);
    // The inputs are the guest's own account (its report), not the node's copy of the request.
    let url = format!("sqlite://{}/node-agent.db", dir.path().display());
    let row = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { node_agent::db::Db::open(&url).await?.get(&id).await })
        .unwrap()
        .unwrap();
    let report: builder_contract::BuildReport =
        serde_json::from_str(row.report.as_deref().unwrap()).unwrap();
    let reported = report.inputs.expect("the guest reports its inputs");
    assert_eq!(reported.build_args["BIG"], big);
    assert_eq!(reported.secret_ids, ["npm"]);
    for (what, text) in [
        ("the console log", console.as_str()),
        ("the node's log", daemon_log.as_str()),
        ("the database", &database),
        ("the API answer", &b.to_string()),
        ("the build log", &guest_logs[0]),
        ("the dockerd log", &guest_logs[1]),
        ("the VMM's log", &guest_logs[2]),
    ] {
        assert!(
            !text.contains(SECRET) && !text.contains(TOKEN),
            "{what} holds a credential value"
        );
    }
}

/// The outside namespace of `scripts/lib/outside.sh`: SeaweedFS S3 the VMs upload to, and with
/// `registry` an upstream registry with htpasswd auth; taken down when dropped.
struct Outside {
    dir: PathBuf,
    env: std::collections::HashMap<String, String>,
}

impl Outside {
    fn up(dir: &Path, name: &str, octet: u8, registry: bool) -> Outside {
        let script = project_file("NODE_AGENT_TEST_OUTSIDE", "scripts/lib/outside.sh");
        let mut cmd = Command::new(&script);
        cmd.arg("up").arg(dir).arg(name).arg(octet.to_string());
        if registry {
            cmd.arg("--registry");
        }
        // Taken down from here on, also when `up` fails half-way.
        let mut outside = Outside {
            dir: dir.to_path_buf(),
            env: Default::default(),
        };
        assert!(
            cmd.status().unwrap().success(),
            "{} up failed",
            script.display()
        );
        outside.env = std::fs::read_to_string(dir.join("outside.env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        outside
    }

    fn get(&self, name: &str) -> &str {
        &self.env[name]
    }

    /// The upstream registry's GET and HEAD requests so far (its access log).
    fn upstream_requests(&self) -> usize {
        std::fs::read_to_string(self.get("UPSTREAM_LOG"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") || l.contains("\"HEAD /v2/"))
            .count()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new(project_file(
            "NODE_AGENT_TEST_OUTSIDE",
            "scripts/lib/outside.sh",
        ))
        .arg("down")
        .arg(&self.dir)
        .status();
    }
}

/// The builder image with the test base image preloaded, as warm builds need it (their
/// Dockerfiles start `FROM` it, and VMs reach no registry but the node's mirror).
fn builder_rootfs_with_base_image() -> PathBuf {
    let rootfs = builder_rootfs();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(rootfs.with_file_name("builder-vm.json")).unwrap())
            .unwrap();
    assert!(
        manifest["preloaded_images"]
            .as_array()
            .is_some_and(|images| !images.is_empty()),
        "{} has no preloaded base image: run scripts/build-builder-vm.sh with \
         PRELOAD_IMAGES=builder-vm/busybox:latest (scripts/test-builder-vm.sh does)",
        rootfs.display()
    );
    rootfs
}

/// `git` in `dir`, as a test author.
fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?} in {}", dir.display());
}

/// A git work tree at `dir` holding `files` (path, contents), committed.
fn app_repo(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    commit_files(dir, files, "app");
    dir.to_path_buf()
}

/// Writes `files` into the work tree `dir` and commits everything in it.
fn commit_files(dir: &Path, files: &[(&str, &str)], message: &str) {
    for (path, contents) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", message]);
}

/// A copy of examples/rebuild at `dir`, a git work tree with it committed.
fn rebuild_example(dir: &Path) -> PathBuf {
    let example = project_file("NODE_AGENT_TEST_REBUILD_EXAMPLE", "examples/rebuild");
    let status = Command::new("cp")
        .arg("-r")
        .arg(&example)
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "cp -r {}", example.display());
    app_repo(dir, &[])
}

impl Daemon {
    /// `node-agent submit DIR` (its committed state, cache key `dir:<DIR>`) with `token_file`'s
    /// token, uploading to the outside's S3: the build's id.
    fn submit_dir(&self, dir: &Path, token_file: &Path, s3_key: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .arg("submit")
            .arg(dir)
            .args(["--server", &self.base, "--token-file"])
            .arg(token_file)
            .args(["--s3-bucket", "rootfs", "--s3-key", s3_key])
            .args(["--vcpus", "1", "--mem-mib", "2048", "--disk-gib", "4"])
            .args(["--timeout-s", "900"])
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "submit {}: {stdout}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.lines().next().unwrap().trim().to_string()
    }

    /// A scoped token `name` (its own tenant) that may upload to the bucket `rootfs`, in a file.
    fn add_token(&self, name: &str) -> PathBuf {
        let out = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["token", "add", name, "--bucket", "rootfs", "--work-dir"])
            .arg(&self.work)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "token add {name}: {stdout}");
        let token = stdout
            .lines()
            .find_map(|l| l.strip_prefix("token: "))
            .unwrap_or_else(|| panic!("no token in {stdout}"));
        let path = self.work.join(format!("token-{name}"));
        std::fs::write(&path, token).unwrap();
        path
    }

    fn admin_token_file(&self) -> PathBuf {
        self.work.join("api-token")
    }

    /// Waits for build `id`'s end and asserts it succeeded.
    fn wait_succeeded(&self, id: &str) -> Value {
        let b = self.wait_terminal(id, Duration::from_secs(900));
        assert_eq!(b["state"], "succeeded", "{b}");
        b
    }

    /// The committed cache of the key build `b` ran with (`GET /v1/caches/{id}`).
    fn cache_of(&self, b: &Value) -> Value {
        let id = b["cache"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no cache id: {b}"));
        let (status, v) = self.api("GET", &format!("/v1/caches/{id}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// The identity of the committed disk of the key build `b` ran with (in the node's default
    /// pool, `<work>/cache`): its inode and modification time, which a commit (a rename of a
    /// fork over it) changes and nothing else does. Its allocated bytes are no such proof: XFS
    /// trims the speculative preallocation of a file written through a loop device later.
    fn committed_disk_identity(&self, b: &Value) -> (u64, i64, i64) {
        use std::os::unix::fs::MetadataExt;
        let id = b["cache"]["id"].as_str().expect("a cache id");
        let disk = self.work.join("cache/keys").join(id).join("disk.ext4");
        let meta = std::fs::metadata(&disk).unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    }
}

/// The build cache outcome of a build view: `hit`, `miss`, `off` or `error`.
fn cache_outcome(b: &Value) -> &str {
    b["cache"]["outcome"]
        .as_str()
        .unwrap_or_else(|| panic!("no cache outcome: {b}"))
}

/// The `build` phase of a build view, in milliseconds.
fn build_phase_ms(b: &Value) -> u64 {
    b["timings"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "build")
        .unwrap_or_else(|| panic!("no build phase: {b}"))["duration_ms"]
        .as_u64()
        .unwrap()
}

/// Whether BuildKit's plain progress in `log` (lines `[  5.2s]   | #6 ...`) shows the example's
/// slow `RUN` step as `CACHED`.
fn slow_step_cached(log: &str) -> bool {
    let step = log
        .lines()
        .find(|l| l.contains("RUN digest=seed"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with('#')))
        .unwrap_or_else(|| panic!("no slow step in the build log: {log}"));
    let cached = format!("| {step} CACHED");
    log.lines().any(|l| l.trim_end().ends_with(&cached))
}

/// Warm builds of examples/rebuild through one node: a key's second build reuses the slow
/// step's layer (BuildKit `CACHED`, a much shorter build phase, cache=hit); an unchanged
/// rebuild reuses the uploaded rootfs; another tenant's build of the same directory misses; a
/// failed build leaves the committed cache as it was; two concurrent builds of the key both
/// succeed and the next one still hits.
#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn warm_builds_reuse_a_keys_cache_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let outside = Outside::up(&dir.path().join("outside"), "bvw-out", 253, false);
    let d = Daemon::start_with(
        &dir.path().join("node"),
        &format!("warm-{}", std::process::id()),
        &builder_rootfs_with_base_image(),
        free_port(),
        2,
        &dir.path().join("outside/s3-credentials.json"),
        &["--vm-dns", outside.get("OUTSIDE_ADDR")],
    );
    let app = rebuild_example(&dir.path().join("app"));
    let admin = d.admin_token_file();

    // Cold: a new key, every step runs.
    let cold = d.wait_succeeded(&d.submit_dir(&app, &admin, "warm/a.ext4"));
    assert_eq!(cache_outcome(&cold), "miss", "{cold}");
    // `submit DIR`'s key: the directory, in the token's namespace.
    assert_eq!(cold["cache"]["key"], format!("dir:{}", app.display()));
    let (_, log) = d.log(cold["id"].as_str().unwrap(), "build");
    assert!(!slow_step_cached(&log), "{log}");

    // A one-line change: the slow step comes from the key's cache disk.
    commit_files(&app, &[("app/version.sh", "APP_VERSION=2\n")], "version 2");
    let warm = d.wait_succeeded(&d.submit_dir(&app, &admin, "warm/a.ext4"));
    assert_eq!(cache_outcome(&warm), "hit", "{warm}");
    let (_, log) = d.log(warm["id"].as_str().unwrap(), "build");
    assert!(slow_step_cached(&log), "{log}");
    assert!(
        build_phase_ms(&warm) * 4 < build_phase_ms(&cold),
        "warm build phase {} ms, cold {} ms",
        build_phase_ms(&warm),
        build_phase_ms(&cold)
    );

    // Unchanged: the same image, so the rootfs already uploaded is reused.
    let noop = d.wait_succeeded(&d.submit_dir(&app, &admin, "warm/a.ext4"));
    assert_eq!(noop["rootfs"]["reused"], true, "{noop}");
    assert_eq!(noop["rootfs"]["sha256"], warm["rootfs"]["sha256"], "{noop}");
    assert_eq!(noop["rootfs"]["location"], warm["rootfs"]["location"]);

    // Another tenant, the same directory: its own key, empty.
    let other = d.add_token("tenant-b");
    let b = d.wait_succeeded(&d.submit_dir(&app, &other, "warm/b.ext4"));
    assert_eq!(cache_outcome(&b), "miss", "{b}");
    assert_ne!(b["cache"]["id"], cold["cache"]["id"], "{b}");
    let (_, log) = d.log(b["id"].as_str().unwrap(), "build");
    assert!(!slow_step_cached(&log), "{log}");

    // A build that fails after the cached step: the committed disk stays as it was.
    let before = d.cache_of(&noop);
    let disk_before = d.committed_disk_identity(&noop);
    let dockerfile = std::fs::read_to_string(app.join("Dockerfile")).unwrap();
    commit_files(
        &app,
        &[("Dockerfile", &format!("{dockerfile}RUN exit 3\n"))],
        "a failing step",
    );
    let failed = d.submit_dir(&app, &admin, "warm/a.ext4");
    let failed = d.wait_terminal(&failed, Duration::from_secs(900));
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["class"], "user", "{failed}");
    let after = d.cache_of(&failed);
    assert_eq!(
        after["commits"], before["commits"],
        "before {before}, after {after}"
    );
    assert_eq!(
        d.committed_disk_identity(&failed),
        disk_before,
        "the committed disk was replaced"
    );

    // Two builds of the key at once: both fork, both succeed; the last commit wins.
    commit_files(
        &app,
        &[
            ("Dockerfile", &dockerfile),
            ("app/version.sh", "APP_VERSION=3\n"),
        ],
        "version 3",
    );
    let first = d.submit_dir(&app, &admin, "warm/a.ext4");
    let second = d.submit_dir(&app, &admin, "warm/a2.ext4");
    let both = [first, second].map(|id| d.wait_succeeded(&id));
    for b in &both {
        assert_eq!(cache_outcome(b), "hit", "{b}");
    }
    let committed = d.cache_of(&both[0]);
    assert!(
        committed["commits"].as_u64() > before["commits"].as_u64(),
        "before {before}, after the concurrent builds {committed}"
    );
    commit_files(&app, &[("app/version.sh", "APP_VERSION=4\n")], "version 4");
    let next = d.wait_succeeded(&d.submit_dir(&app, &admin, "warm/a.ext4"));
    assert_eq!(cache_outcome(&next), "hit", "{next}");
    let (_, log) = d.log(next["id"].as_str().unwrap(), "build");
    assert!(slow_step_cached(&log), "{log}");
    assert_eq!(d.leftovers(), Vec::<String>::new());
    d.sigterm();
}

/// The node's pull-through mirror: a `FROM` the upstream registry (htpasswd auth, in the
/// outside namespace) builds with no registry credentials in the request, and the second
/// tenant's build of it pulls from the mirror without reaching the upstream.
#[test]
#[ignore = "boots real VMs; root; slow suite"]
fn the_registry_mirror_serves_the_second_pull_without_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let outside = Outside::up(&dir.path().join("outside"), "bvm-mir", 254, true);
    let upstream = outside.get("UPSTREAM_REGISTRY").to_string();
    let password_file = outside.get("UPSTREAM_PASSWORD_FILE").to_string();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[[mirror]]\nupstream = \"{upstream}\"\nremote_url = \"http://{upstream}\"\n\
             username = \"{}\"\npassword_file = \"{password_file}\"\n",
            outside.get("UPSTREAM_USER"),
        ),
    )
    .unwrap();
    let d = Daemon::start_with(
        &dir.path().join("node"),
        &format!("mirror-{}", std::process::id()),
        &builder_rootfs(),
        free_port(),
        2,
        &dir.path().join("outside/s3-credentials.json"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--vm-dns",
            outside.get("OUTSIDE_ADDR"),
        ],
    );
    let app = app_repo(
        &dir.path().join("app"),
        &[(
            "Dockerfile",
            &format!("FROM {upstream}/private/busybox:latest\nRUN echo mirrored > /mirrored.txt\n"),
        )],
    );
    let a = d.wait_succeeded(&d.submit_dir(&app, &d.admin_token_file(), "mirror/a.ext4"));
    let after_first = outside.upstream_requests();
    assert!(after_first > 0, "the first pull went to the upstream");
    let other = d.add_token("tenant-b");
    d.wait_succeeded(&d.submit_dir(&app, &other, "mirror/b.ext4"));
    assert_eq!(
        outside.upstream_requests(),
        after_first,
        "the second pull reached the upstream (its log: {})",
        outside.get("UPSTREAM_LOG")
    );
    // The VM never saw the upstream's credentials.
    let password = std::fs::read_to_string(&password_file).unwrap();
    let id = a["id"].as_str().unwrap();
    for source in ["console", "build", "dockerd"] {
        let (_, text) = d.log(id, source);
        assert!(
            !text.contains(&password),
            "the {source} log has the password"
        );
    }
    assert_eq!(d.leftovers(), Vec::<String>::new());
    d.sigterm();
}
