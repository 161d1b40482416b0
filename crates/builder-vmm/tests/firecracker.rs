//! The Firecracker driver against the real jailer and Firecracker (`FIRECRACKER_BIN`,
//! `JAILER_BIN`): chroot, uid, cgroup limits, netns, the whole API configuration and
//! `InstanceStart`, strict request checking, kill and exit detection, cleanup and reclaim, and a
//! cache disk on another filesystem bound into the chroot in place.
//!
//! The guest is a tiny ELF that halts, or resets the machine as `reboot=k` does: on hosts whose
//! KVM is nested (these), Linux dies under Firecracker (`KVM_EXIT_INTERNAL_ERROR` after ~45 s)
//! but these few instructions run. Full boots are checked on a KVM host by
//! `make test-builder-vm VMM=firecracker`.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use builder_contract::Secrets;
use builder_vmm::firecracker::api::{ActionType, ApiClient, ApiError, InstanceAction};
use builder_vmm::firecracker::metrics::MetricsTotals;
use builder_vmm::{
    cgroup, AddressPool, Driver, EgressPolicy, ExitCause, FirecrackerConfig, NetworkSpec, VmSpec,
    Vmm, VmmConfig,
};
use common::TinyGuest;

const UID: u32 = 10_000;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    vmm: Vmm,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let chroot_base = root.join("jail");
        std::fs::create_dir(&chroot_base).unwrap();
        let config = FirecrackerConfig::from_env(chroot_base, UID, UID)
            .expect("set FIRECRACKER_BIN and JAILER_BIN (e.g. ../shared/bin/firecracker)");
        let vmm = Vmm::new(VmmConfig {
            work_root: root.join("vms"),
            pool: AddressPool::default(),
            driver: Driver::Firecracker(config),
        });
        Setup {
            _dir: dir,
            root,
            vmm,
        }
    }

    fn spec(&self, name: &str, slot: u32, guest: TinyGuest) -> VmSpec {
        let kernel = self.root.join(format!("{name}.elf"));
        common::tiny_elf(&kernel, guest);
        let mut spec = common::spec(common::id(name), kernel, common::rootfs(&self.root));
        spec.network = Some(NetworkSpec {
            slot,
            egress: EgressPolicy::default(),
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        });
        spec.secrets = Some(Secrets {
            webhook_secret: Some("hook".into()),
            ..Default::default()
        });
        spec.cpus = Some("0".parse().unwrap());
        spec
    }

    fn dirs(&self) -> [PathBuf; 2] {
        let Driver::Firecracker(fc) = &self.vmm.config().driver else {
            unreachable!()
        };
        [fc.jail_dir(), self.root.join("vms")]
    }

    fn leftovers(&self, tag: &str) -> Vec<String> {
        let dirs = self.dirs();
        common::leftovers(
            tag,
            &dirs.iter().map(PathBuf::as_path).collect::<Vec<&Path>>(),
        )
    }
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn configures_starts_rejects_unknown_fields_and_cleans_up() {
    let setup = Setup::new();
    let mut vm = setup
        .vmm
        .start(setup.spec("fc", 4200, TinyGuest::Halt))
        .await
        .unwrap();
    let _guard = common::ReclaimOnPanic(setup.vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();

    // InstanceStart was accepted (start() checks every 204); the VMM is jailed.
    let mut api = ApiClient::connect(vm.api_socket().unwrap()).await.unwrap();
    let info = api.instance_info().await.unwrap();
    assert_eq!(info.id, tag);
    assert_eq!(info.state, "Running");
    assert_eq!(uid_of(vm.pid()), UID);
    let netns = std::fs::read_link(format!("/proc/{}/ns/net", vm.pid())).unwrap();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(netns, ours, "Firecracker runs in the VM's namespace");
    let cgroups = cgroup::find(&tag);
    let cpuset = cgroups
        .iter()
        .find(|d| d.join("cpuset.cpus").exists())
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(cpuset.join("cpuset.cpus"))
            .unwrap()
            .trim(),
        "0"
    );
    assert!(cgroups
        .iter()
        .any(|d| d.join("memory.max").exists() || d.join("memory.limit_in_bytes").exists()));

    // A field Firecracker does not know is refused, and the error says which.
    let err = api
        .put(
            "/machine-config",
            &serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Fault { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("Firecracker refused PUT /machine-config (400 Bad Request)"),
        "{message}"
    );
    assert!(message.contains("unknown field `bogus`"), "{message}");

    // Metrics are written where the node agent can scrape them.
    api.put(
        "/actions",
        &InstanceAction {
            action_type: ActionType::FlushMetrics,
        },
    )
    .await
    .unwrap();
    let metrics = MetricsTotals::read(vm.metrics_file().unwrap()).unwrap();
    assert!(
        metrics.lines >= 1 && metrics.last_flush_ms.is_some(),
        "{metrics:?}"
    );
    // The configuration above went through the API: every PUT is counted, none failed.
    assert!(
        metrics.get("put_api_requests.actions_count").unwrap() >= 2,
        "{metrics:?}"
    );
    assert!(
        metrics.get("put_api_requests.drive_count").unwrap() >= 3,
        "{metrics:?}"
    );
    assert_eq!(metrics.get("put_api_requests.drive_fails"), Some(0));
    assert_eq!(
        metrics.get("put_api_requests.machine_cfg_fails"),
        Some(1),
        "the bogus field"
    );
    assert!(metrics.get("block.read_bytes").is_some(), "{metrics:?}");
    assert!(metrics.get("net.tx_bytes_count").is_some(), "{metrics:?}");
    // The same totals, found by tag prefix the way the node agent scrapes running VMs.
    let found = setup.vmm.metrics_matching(&tag);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, tag);
    assert_eq!(found[0].1.as_ref().unwrap(), &metrics);

    let exit = vm.kill().await.unwrap();
    assert_eq!(exit.cause, ExitCause::Killed);
    let log = std::fs::read_to_string(&exit.vmm_log).unwrap();
    assert!(
        log.contains("InstanceStart"),
        "Firecracker's log is collected:\n{log}"
    );
    vm.cleanup().await.unwrap();
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
}

#[tokio::test]
async fn a_failed_start_undoes_everything() {
    let setup = Setup::new();
    let mut spec = setup.spec("badkernel", 4201, TinyGuest::Halt);
    // Not an ELF: Firecracker refuses the boot source, after the jail and network exist.
    spec.kernel = setup.root.join("not-elf");
    std::fs::write(&spec.kernel, b"not a kernel").unwrap();
    let tag = spec.tag();
    let err = setup.vmm.start(spec).await.unwrap_err();
    let message = format!("{err}");
    assert!(
        message.starts_with("Firecracker refused PUT /"),
        "{message}"
    );
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
}

#[tokio::test]
async fn reclaim_after_a_crash_leaves_nothing() {
    let setup = Setup::new();
    let vm = setup
        .vmm
        .start(setup.spec("crash", 4202, TinyGuest::Halt))
        .await
        .unwrap();
    let _guard = common::ReclaimOnPanic(setup.vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();
    drop(vm);
    assert!(!setup.leftovers(&tag).is_empty());
    let report = setup.vmm.reclaim_matching(&tag);
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(report.processes, 1, "{report:?}");
    assert_eq!(report.netns, 1, "{report:?}");
    assert_eq!(report.chroots, 1, "{report:?}");
    assert_eq!(report.work_dirs, 1, "{report:?}");
    assert!(report.cgroups >= 2, "{report:?}");
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
}

#[tokio::test]
async fn guest_reset_makes_the_vmm_exit_and_is_detected() {
    let setup = Setup::new();
    let mut vm = setup
        .vmm
        .start(setup.spec("exit", 4203, TinyGuest::Reset))
        .await
        .unwrap();
    let _guard = common::ReclaimOnPanic(setup.vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();
    let exit = vm.wait().await.unwrap();
    assert_eq!(exit.cause, ExitCause::GuestShutdown);
    assert_eq!(exit.vmm_exit_code, Some(0));
    vm.cleanup().await.unwrap();
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
}

#[tokio::test]
async fn timeout_kills_a_guest_that_never_exits() {
    let setup = Setup::new();
    let mut spec = setup.spec("timeout", 4204, TinyGuest::Halt);
    spec.timeout = Duration::from_secs(2);
    let mut vm = setup.vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(setup.vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();
    let exit = vm.wait().await.unwrap();
    assert_eq!(exit.cause, ExitCause::TimedOut { after_s: 2 });
    assert!(
        exit.console_log.starts_with(vm.work_dir()),
        "console collected into the work dir"
    );
    vm.cleanup().await.unwrap();
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
}

/// A tmpfs mounted for one test: a filesystem of its own, as a cache pool is (a loop-mounted
/// XFS in production), so a hard link into the chroot is impossible and a copy would show.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf) -> Self {
        std::fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Where the file `name` at the root of some filesystem is mounted (bound) in this mount
/// namespace (`/proc/self/mountinfo`: field 4 the mount's root, field 5 its mount point).
fn binds_of(name: &str) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(|line| line.split(' ').collect::<Vec<_>>())
        .filter(|fields| fields[3] == format!("/{name}"))
        .map(|fields| PathBuf::from(fields[4]))
        .collect()
}

#[tokio::test]
async fn a_cache_disk_is_bound_in_place_and_left_to_the_caller() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let setup = Setup::new();
    let pool = Tmpfs::mount(setup.root.join("pool"));
    let cache = pool.0.join("fork-1.ext4");
    std::fs::write(&cache, vec![7u8; 1 << 20]).unwrap();
    let before = std::fs::metadata(&cache).unwrap();
    let mut spec = setup.spec("cache", 4205, TinyGuest::Halt);
    spec.cache_disk = Some(cache.clone());
    let mut vm = setup.vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(setup.vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();

    // In the chroot, the very same file (device and inode: bound, not copied), the jailed
    // uid's, mode 0600.
    let Driver::Firecracker(fc) = &setup.vmm.config().driver else {
        unreachable!()
    };
    let jailed = std::fs::metadata(fc.chroot(&tag).join("cache.ext4")).unwrap();
    assert_eq!((jailed.dev(), jailed.ino()), (before.dev(), before.ino()));
    assert_eq!((jailed.uid(), jailed.gid()), (UID, UID));
    assert_eq!(jailed.permissions().mode() & 0o777, 0o600);
    // Firecracker accepted it as a writable, non-root drive, and holds it open.
    let mut api = ApiClient::connect(vm.api_socket().unwrap()).await.unwrap();
    let config: serde_json::Value = api.get("/vm/config").await.unwrap();
    // (`GET /vm/config` lists the running VM's drives in no set order; they are attached in
    // the order given, which the QEMU argv test checks, the drives being the same list.)
    let mut drives: Vec<(&str, &str, bool, bool)> = config["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["drive_id"].as_str().unwrap(),
                d["path_on_host"].as_str().unwrap(),
                d["is_read_only"].as_bool().unwrap(),
                d["is_root_device"].as_bool().unwrap(),
            )
        })
        .collect();
    drives.sort();
    assert_eq!(
        drives,
        [
            ("cache", "cache.ext4", false, false),
            ("config", "config.ext4", true, false),
            ("rootfs", "rootfs.ext4", true, false),
            ("scratch", "scratch.ext4", false, false),
        ]
    );
    let open = std::fs::read_dir(format!("/proc/{}/fd", vm.pid()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .any(|target| target == Path::new("/cache.ext4"));
    assert!(open, "Firecracker has the cache disk open");
    assert_eq!(
        binds_of("fork-1.ext4"),
        [fc.chroot(&tag).join("cache.ext4")]
    );

    vm.kill().await.unwrap();
    vm.cleanup().await.unwrap();
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
    // The caller's file is still there, untouched, root's again, and free: no bind of it is
    // left, and it renames.
    let after = std::fs::metadata(&cache).unwrap();
    assert_eq!((after.ino(), after.len()), (before.ino(), before.len()));
    assert_eq!((after.uid(), after.gid()), (0, 0));
    assert_eq!(after.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&cache).unwrap(), vec![7u8; 1 << 20]);
    assert_eq!(binds_of("fork-1.ext4"), Vec::<PathBuf>::new());
    std::fs::rename(&cache, pool.0.join("committed.ext4")).unwrap();
}

#[tokio::test]
async fn reclaim_unmounts_a_crashed_vms_cache_disk() {
    let setup = Setup::new();
    let _pool = Tmpfs::mount(setup.root.join("pool"));
    let cache = setup.root.join("pool/fork-2.ext4");
    std::fs::write(&cache, vec![0u8; 1 << 20]).unwrap();
    let mut spec = setup.spec("cachecrash", 4206, TinyGuest::Halt);
    spec.cache_disk = Some(cache.clone());
    let vm = setup.vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(setup.vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();
    drop(vm);
    assert_eq!(binds_of("fork-2.ext4").len(), 1);
    let report = setup.vmm.reclaim_matching(&tag);
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(report.chroots, 1, "{report:?}");
    assert_eq!(setup.leftovers(&tag), Vec::<String>::new());
    assert!(cache.exists(), "reclaim leaves the caller's file");
    assert_eq!(binds_of("fork-2.ext4"), Vec::<PathBuf>::new());
}
