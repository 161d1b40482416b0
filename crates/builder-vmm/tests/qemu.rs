//! The QEMU driver for real: a kernel boots under `-M microvm` with all four disks and the
//! network, panics for want of a root filesystem and makes QEMU exit, which tells the panic by
//! its exit status (pvpanic), while a guest that only prints a panic is a shutdown; the console
//! is captured;
//! a timeout and a kill are detected; cleanup and reclaim leave nothing; guests mount the
//! disks builder-ext4 wrote, and a cache disk used in place that one guest hands the next. QEMU runs confined: its own uid and gid, seccomp, `no_new_privs`,
//! no capabilities, chrooted into its jail in a mount namespace of its own, in cgroups with
//! the VM's CPU and memory limits, with a config drive its uid cannot write; cleanup and the
//! reclaim of a crashed run remove the jail and the cgroups.
//!
//! Set `BUILDER_VMM_ACCEL=tcg` where KVM is nested (as on the CI hosts).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use builder_contract::{S3Credentials, Secrets};
use builder_vmm::{
    AddressPool, Driver, EgressPolicy, ExitCause, NetworkSpec, QemuConfig, VmSpec, Vmm, VmmConfig,
    DEFAULT_BOOT_ARGS,
};

/// A QEMU VMM with its work dirs in `work_root` and its jails beside it, in `<parent>/jail`.
fn vmm(work_root: &Path) -> Vmm {
    Vmm::new(VmmConfig {
        work_root: work_root.to_path_buf(),
        pool: AddressPool::default(),
        driver: Driver::Qemu(QemuConfig {
            chroot_base: jail_base(work_root),
            ..QemuConfig::from_env().unwrap()
        }),
    })
}

fn jail_base(work_root: &Path) -> std::path::PathBuf {
    work_root.with_file_name("jail")
}

/// [`common::leftovers`] of `prefix`, the work dirs and jails of `vmm(<dir>/vms)` included.
fn leftovers(prefix: &str, dir: &Path) -> Vec<String> {
    let work_root = dir.join("vms");
    common::leftovers(prefix, &[&work_root, &jail_dir(&work_root)])
}

/// Where the VMs of [`vmm`]`(work_root)` are jailed.
fn jail_dir(work_root: &Path) -> std::path::PathBuf {
    jail_base(work_root).join("qemu")
}

fn network(slot: u32) -> NetworkSpec {
    NetworkSpec {
        slot,
        egress: EgressPolicy::default(),
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
    }
}

/// Whether the test kernel has the pvpanic driver QEMU's device needs (`CONFIG_PVPANIC_MMIO`),
/// from the config beside it (`vmlinux.config`, or `config` in the kernel cache); why not.
fn kernel_has_pvpanic(kernel: &Path) -> Result<(), String> {
    let dir = kernel.parent().unwrap();
    let config = [dir.join("vmlinux.config"), dir.join("config")]
        .into_iter()
        .find_map(|path| std::fs::read_to_string(&path).ok().map(|text| (path, text)));
    let Some((path, text)) = config else {
        return Err(format!("no kernel config beside {}", kernel.display()));
    };
    for option in ["CONFIG_PVPANIC=y", "CONFIG_PVPANIC_MMIO=y"] {
        if !text.lines().any(|l| l == option) {
            return Err(format!("{} lacks {option}", path.display()));
        }
    }
    Ok(())
}

/// Checks that QEMU told the guest's panic by its exit status; with a kernel that cannot tell
/// QEMU (no pvpanic driver), says so and checks that it is not taken for a panic either.
fn assert_panic_told_by_qemu(exit: &builder_vmm::VmExit, console: &str) {
    match kernel_has_pvpanic(&common::kernel()) {
        Ok(()) => {
            assert_eq!(exit.cause, ExitCause::GuestPanic, "{console}");
            assert_eq!(exit.vmm_exit_code, Some(1));
        }
        Err(why) => {
            eprintln!(
                "SKIPPED the guest-panic check: {why}, so the guest cannot tell QEMU it \
                 panicked (rebuild it: scripts/build-kernel.sh)"
            );
            assert_eq!(exit.cause, ExitCause::GuestShutdown, "{console}");
        }
    }
}

#[tokio::test]
async fn an_init_that_exits_panics_the_guest_and_qemu_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let rootfs = probe_rootfs(dir.path(), "exit 3\n");
    let mut spec = common::spec(common::id("initexit"), common::kernel(), rootfs);
    spec.boot_args = format!("{DEFAULT_BOOT_ARGS} rootfstype=ext4 init=/init");
    let mut vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(&exit.console_log).unwrap();
    assert!(console.contains("Attempted to kill init!"), "{console}");
    assert_panic_told_by_qemu(&exit, &console);
    vm.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_guest_printing_a_panic_and_shutting_down_is_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let rootfs = probe_rootfs(
        dir.path(),
        "echo 'Kernel panic - not syncing: printed by a build'\n/bin/busybox reboot -f\n",
    );
    let mut spec = common::spec(common::id("forgedpanic"), common::kernel(), rootfs);
    spec.boot_args = format!("{DEFAULT_BOOT_ARGS} rootfstype=ext4 init=/init");
    let mut vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(&exit.console_log).unwrap();
    assert!(console.contains("printed by a build"), "{console}");
    assert_eq!(exit.cause, ExitCause::GuestShutdown, "{console}");
    assert_eq!(exit.vmm_exit_code, Some(0));
    vm.cleanup().await.unwrap();
}

/// A spec whose guest boots a busybox init that sleeps until the VM is stopped.
fn hanging(name: &str, dir: &Path) -> VmSpec {
    let rootfs = probe_rootfs(dir, "/bin/busybox sleep 3600\n");
    let mut spec = common::spec(common::id(name), common::kernel(), rootfs);
    spec.boot_args = format!("{DEFAULT_BOOT_ARGS} rootfstype=ext4 init=/init");
    spec
}

#[tokio::test]
async fn boots_to_exit_with_disks_network_and_console() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let mut spec = common::spec(
        common::id("boot"),
        common::kernel(),
        common::rootfs(dir.path()),
    );
    spec.network = Some(network(4100));
    spec.cache_disk = Some(cache_disk(dir.path(), "boot-cache.ext4"));
    spec.secrets = Some(Secrets {
        s3: Some(S3Credentials {
            endpoint: "http://10.0.0.1:8333".into(),
            region: "us-east-1".into(),
            access_key_id: "AK".into(),
            secret_access_key: "SK".into(),
            session_token: None,
        }),
        ..Default::default()
    });
    let mut vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let guest = vm.addresses().unwrap().guest;
    assert!(
        vm.cmdline().contains(&format!("ip={guest}::")),
        "{}",
        vm.cmdline()
    );
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(&exit.console_log).unwrap();
    // A real panic (no root filesystem), told by the pvpanic device, not by the console.
    assert!(console.contains("Kernel panic - not syncing"), "{console}");
    assert_panic_told_by_qemu(&exit, &console);
    for disk in ["[vda]", "[vdb]", "[vdc]", "[vdd]"] {
        assert!(console.contains(disk), "{disk} missing:\n{console}");
    }
    assert!(
        console.contains(&format!("ipaddr={guest}")),
        "the guest took its address from ip=:\n{console}"
    );
    assert!(exit.runtime < Duration::from_secs(60));

    let prefix = vm.tag().to_string();
    vm.cleanup().await.unwrap();
    assert_eq!(leftovers(&prefix, dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn timeout_kills_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let mut spec = hanging("timeout", dir.path());
    spec.timeout = Duration::from_secs(3);
    let mut vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let exit = vm.wait().await.unwrap();
    assert_eq!(exit.cause, ExitCause::TimedOut { after_s: 3 });
    assert!(exit.runtime >= Duration::from_secs(3));
    assert!(exit.console_log.exists());
    let prefix = vm.tag().to_string();
    vm.cleanup().await.unwrap();
    assert_eq!(leftovers(&prefix, dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn kill_from_another_task_is_reported_as_killed() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let mut vm = vmm.start(hanging("kill", dir.path())).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let killer = vm.kill_handle();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        killer.kill().unwrap();
    });
    let exit = vm.wait().await.unwrap();
    assert_eq!(exit.cause, ExitCause::Killed);
    assert_eq!(
        vm.kill().await.unwrap(),
        exit,
        "a second kill returns the same exit"
    );
    vm.cleanup().await.unwrap();
}

#[tokio::test]
async fn reclaim_after_a_crash_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("vms");
    let vmm = vmm(&work_root);
    let mut spec = hanging("crash", dir.path());
    spec.network = Some(network(4101));
    spec.cpus = Some("0".parse().unwrap());
    let vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();
    // QEMU runs pinned (its cgroup's cpuset), in the VM's namespace, in its jail.
    let exe = || std::fs::read_link(format!("/proc/{}/exe", vm.pid())).unwrap();
    for _ in 0..500 {
        if exe().to_string_lossy().contains("qemu-system") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        exe().to_string_lossy().contains("qemu-system"),
        "{:?}",
        exe()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    assert!(status.contains("Cpus_allowed_list:\t0\n"), "{status}");
    let netns = std::fs::read_link(format!("/proc/{}/ns/net", vm.pid())).unwrap();
    assert_ne!(netns, std::fs::read_link("/proc/self/ns/net").unwrap());
    let jail = jail_dir(&work_root).join(&tag);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", vm.pid())).unwrap(),
        jail
    );
    // The daemon dies: the handle and its cleanup stack are gone, the VM keeps running.
    drop(vm);
    assert!(!leftovers(&tag, dir.path()).is_empty());
    assert!(!builder_vmm::cgroup::find(&tag).is_empty());

    let report = vmm.reclaim_matching(&tag);
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(report.processes, 1, "{report:?}");
    assert_eq!(report.netns, 1, "{report:?}");
    assert_eq!(report.veths, 1, "{report:?}");
    assert!(report.iptables_rules > 0, "{report:?}");
    // cpuset, memory and cpu: one hierarchy under v2, three under v1.
    assert!(report.cgroups >= 1, "{report:?}");
    assert_eq!(report.chroots, 1, "{report:?}");
    assert_eq!(report.work_dirs, 1, "{report:?}");
    assert!(!jail.exists());
    assert_eq!(leftovers(&tag, dir.path()), Vec::<String>::new());
}

/// A field of `/proc/<pid>/status`, e.g. `Uid`.
fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

/// Whether `uid`:`gid` (no supplementary groups) may access the file open as `file` with
/// `mode` (`libc::R_OK`, `W_OK`): `faccessat2(AT_EMPTY_PATH | AT_EACCESS)` in a child that
/// took those ids, answered through its spawn. `Err` carries the errno.
fn access_as(uid: u32, gid: u32, file: &std::fs::File, mode: libc::c_int) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = file.as_raw_fd();
    let mut command = std::process::Command::new("/bin/true");
    // SAFETY: only system calls between fork and exec, on an fd and ids prepared before.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::syscall(
                libc::SYS_faccessat2,
                fd,
                c"".as_ptr(),
                mode,
                libc::AT_EMPTY_PATH | libc::AT_EACCESS,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    match command.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => panic!("/bin/true failed: {status}"),
        Err(e) => Err(e.raw_os_error().unwrap()),
    }
}

/// Polls `/proc/<pid>/status` until QEMU has installed its seccomp filter (`-sandbox`).
async fn sandboxed(pid: i32) -> String {
    for _ in 0..500 {
        if status_field(pid, "Seccomp") == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status_field(pid, "Seccomp")
}

/// QEMU runs as the VM's own uid and gid (a different pair for each VM), with seccomp,
/// `no_new_privs` and no capabilities, chrooted into its jail in a mount namespace of its own
/// that holds only its files, in cgroups with the VM's limits; the config drive is root's and
/// not writable by the VM's uid, the scratch disk is the VM's alone; cleanup removes the jail,
/// the cgroups and the process.
#[tokio::test]
async fn qemu_runs_unprivileged_in_its_jail_with_limits() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("vms");
    let vmm = vmm(&work_root);
    let mut spec = hanging("jail", dir.path());
    spec.network = Some(network(4105));
    spec.cpus = Some("0".parse().unwrap());
    spec.secrets = Some(Secrets {
        webhook_secret: Some("key-jail".into()),
        ..Default::default()
    });
    let cache_path = cache_disk(dir.path(), "jail-cache.ext4");
    spec.cache_disk = Some(cache_path.clone());
    let mut vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let tag = vm.tag().to_string();
    let pid = vm.pid();
    assert_eq!(sandboxed(pid).await, "2", "QEMU's -sandbox filter is on");

    let ids = builder_vmm::qemu::DEFAULT_IDS;
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let gid = uid - ids.uid_base + ids.gid_base;
    assert!(
        (ids.uid_base..ids.uid_base + ids.count).contains(&uid),
        "{uid}"
    );
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{gid}\t{gid}\t{gid}\t{gid}")
    );
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for caps in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }

    // Its root is the jail, whose directory on the host holds only root's empty mount points;
    // inside its own mount namespace they carry its files.
    let jail = jail_dir(&work_root).join(&tag);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        jail
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    let mut names: Vec<String> = std::fs::read_dir(&jail)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected = [
        "cache.ext4",
        "config.ext4",
        "dev",
        "etc",
        "lib",
        "lib64",
        "rootfs.ext4",
        "scratch.ext4",
        "usr",
        "vmlinux",
    ];
    assert_eq!(names, expected);
    for name in expected {
        let meta = std::fs::symlink_metadata(jail.join(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{name} is root's");
        assert!(
            meta.is_symlink() || meta.len() == 0 || meta.is_dir(),
            "{name}"
        );
    }
    let seen = format!("/proc/{pid}/root");
    let mut dev: Vec<String> = std::fs::read_dir(format!("{seen}/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dev.sort();
    assert_eq!(
        dev,
        ["null", "urandom"],
        "TCG: no /dev/kvm, no /dev/net/tun"
    );
    let config_len = std::fs::metadata(vm.work_dir().join("config.ext4"))
        .unwrap()
        .len();
    assert_eq!(
        std::fs::metadata(format!("{seen}/config.ext4"))
            .unwrap()
            .len(),
        config_len
    );

    // The config drive: root's, readable by the VM's group only, writable by nobody but root;
    // and read-only as QEMU sees it, whatever its mode.
    let config = vm.work_dir().join("config.ext4");
    let meta = std::fs::metadata(&config).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, gid));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o440);
    let file = std::fs::File::open(&config).unwrap();
    assert_eq!(access_as(uid, gid, &file, libc::W_OK), Err(libc::EACCES));
    assert_eq!(access_as(uid, gid, &file, libc::R_OK), Ok(()));
    let inside = std::fs::File::open(format!("{seen}/config.ext4")).unwrap();
    assert_eq!(access_as(uid, gid, &inside, libc::W_OK), Err(libc::EACCES));
    // The scratch disk is the one file the VM's uid may write.
    let scratch = std::fs::File::open(vm.work_dir().join("scratch.ext4")).unwrap();
    let meta = scratch.metadata().unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(access_as(uid, gid, &scratch, libc::W_OK), Ok(()));
    // Another uid (the next VM's) may not even read it.
    assert_eq!(
        access_as(uid + 1, gid + 1, &scratch, libc::R_OK),
        Err(libc::EACCES)
    );
    // So is the cache disk, bound where the caller keeps it (the same inode in the jail).
    let cache = std::fs::File::open(&cache_path).unwrap();
    let meta = cache.metadata().unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(access_as(uid, gid, &cache, libc::W_OK), Ok(()));
    assert_eq!(
        access_as(uid + 1, gid + 1, &cache, libc::R_OK),
        Err(libc::EACCES)
    );
    let bound = std::fs::metadata(format!("{seen}/cache.ext4")).unwrap();
    assert_eq!((bound.dev(), bound.ino()), (meta.dev(), meta.ino()));

    // Its cgroups: it is in each, with the VM's CPU quota (1 vCPU), memory (256 MiB + QEMU's
    // overhead under TCG) and CPU set.
    let cgroups = builder_vmm::cgroup::find(&tag);
    assert!(!cgroups.is_empty());
    let memory = (256 + QemuConfig::memory_overhead_mib(builder_vmm::Accel::Tcg)) << 20;
    let mut limits = vec![];
    for dir in &cgroups {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{dir:?}: {procs}"
        );
        for file in [
            "cpu.max",
            "memory.max",
            "cpu.cfs_quota_us",
            "cpu.cfs_period_us",
            "memory.limit_in_bytes",
            "cpuset.cpus",
        ] {
            if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
                limits.push(format!("{file}={}", value.trim()));
            }
        }
    }
    limits.sort();
    let expected = match builder_vmm::cgroup::CgroupVersion::detect() {
        builder_vmm::cgroup::CgroupVersion::V2 => vec![
            "cpu.max=100000 100000".to_string(),
            "cpuset.cpus=0".to_string(),
            format!("memory.max={memory}"),
        ],
        builder_vmm::cgroup::CgroupVersion::V1 => vec![
            "cpu.cfs_period_us=100000".to_string(),
            "cpu.cfs_quota_us=100000".to_string(),
            "cpuset.cpus=0".to_string(),
            format!("memory.limit_in_bytes={memory}"),
        ],
    };
    assert_eq!(limits, expected);

    // A second VM at the same time gets ids of its own.
    let second = vmm.start(hanging("jail-2", dir.path())).await.unwrap();
    let _guard2 = common::ReclaimOnPanic(vmm.clone(), second.tag().to_string());
    assert_eq!(sandboxed(second.pid()).await, "2");
    let second_uid = status_field(second.pid(), "Uid");
    assert_ne!(
        second_uid.split_whitespace().next().unwrap(),
        uid.to_string()
    );
    let mut second = second;
    let second_tag = second.tag().to_string();
    second.kill().await.unwrap();
    second.cleanup().await.unwrap();
    assert_eq!(leftovers(&second_tag, dir.path()), Vec::<String>::new());

    vm.kill().await.unwrap();
    vm.cleanup().await.unwrap();
    assert!(!jail.exists());
    // The cache disk stays, root's again.
    let meta = std::fs::metadata(&cache_path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        builder_vmm::cgroup::find(&tag),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(leftovers(&tag, dir.path()), Vec::<String>::new());
}

/// Under KVM the jail holds a `/dev/kvm` of its own, owned by the VM's uid, which QEMU opens:
/// no other device, and no access to the host's (root's, mode 0600 here). Where KVM is nested
/// the guest may die later; the test only needs QEMU to have started.
#[tokio::test]
async fn under_kvm_qemu_opens_the_kvm_node_of_its_jail() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let builder_vmm::qemu::KvmProbe::Unusable(why) = builder_vmm::qemu::KvmProbe::run() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("vms");
    let vmm = Vmm::new(VmmConfig {
        work_root: work_root.clone(),
        pool: AddressPool::default(),
        driver: Driver::Qemu(QemuConfig {
            chroot_base: jail_base(&work_root),
            accel: builder_vmm::Accel::Kvm,
            ..QemuConfig::from_env().unwrap()
        }),
    });
    let mut vm = vmm.start(hanging("kvm", dir.path())).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let pid = vm.pid();
    assert_eq!(sandboxed(pid).await, "2");
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let kvm = std::fs::metadata(format!("/proc/{pid}/root/dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!(
        (kvm.rdev(), kvm.uid(), kvm.mode() & 0o7777),
        (libc::makedev(10, 232), uid, 0o600)
    );
    // Its open files, as the host names them: the jail's `/dev/kvm` (and KVM's VM and vCPU).
    // QEMU sandboxes itself before it sets up its accelerator: wait for the VM to be created.
    let open_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut fds = open_files();
    while !fds
        .iter()
        .any(|f| f.to_string_lossy() == "anon_inode:kvm-vm")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds = open_files();
    }
    let jail = jail_dir(&work_root).join(vm.tag());
    assert!(fds.contains(&jail.join("dev/kvm")), "{fds:?}");
    assert!(
        fds.iter()
            .any(|f| f.to_string_lossy() == "anon_inode:kvm-vm"),
        "{fds:?}"
    );
    let tag = vm.tag().to_string();
    vm.kill().await.unwrap();
    vm.cleanup().await.unwrap();
    assert_eq!(leftovers(&tag, dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_refused_start_undoes_what_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let work_root = dir.path().join("vms");
    let vmm = vmm(&work_root);
    let mut spec = common::spec(
        common::id("long"),
        common::kernel(),
        common::rootfs(dir.path()),
    );
    spec.network = Some(network(4102));
    spec.boot_args = format!("{DEFAULT_BOOT_ARGS} {}", "x".repeat(2048));
    let tag = spec.tag();
    let err = vmm.start(spec).await.unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("over the 2048-byte limit"), "{chain}");
    // The work dir, disks and network made before the check are gone again.
    assert_eq!(leftovers(&tag, dir.path()), Vec::<String>::new());
}

/// Two guests in a row from one VMM, each on disks of its own written by builder-ext4: each
/// mounts its scratch disk read-write and its config drive, writes and reads back, finds only
/// its own secrets, and the host's e2fsck finds both scratch disks clean afterwards. Both get
/// the same cache disk (vdd): the second finds what the first wrote there; between and after
/// them it is the caller's file, clean, and renames.
#[tokio::test]
async fn guests_mount_their_scratch_disks_and_config_drives() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let script = "/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t ext4 /dev/vdb /scratch && echo scratch=mounted
/bin/busybox echo written >/scratch/probe && /bin/busybox sync
echo \"scratch=$(/bin/busybox cat /scratch/probe)\"
/bin/busybox mount -t ext4 -o ro /dev/vdc /config && echo config=mounted
echo \"secret=$(/bin/busybox grep -o 'key-[a-z]*' /config/secrets.json)\"
/bin/busybox umount /scratch && echo scratch=unmounted
/bin/busybox mount -t ext4 /dev/vdd /cache && echo cache=mounted
/bin/busybox grep -o 'key-[a-z]*' /config/secrets.json >>/cache/runs
echo \"cache=$(/bin/busybox tr '\\n' , </cache/runs)\"
/bin/busybox umount /cache && echo cache=unmounted
/bin/busybox reboot -f
";
    let rootfs = probe_rootfs(dir.path(), script);
    let mut cache = cache_disk(dir.path(), "fork.ext4");
    for (name, runs) in [("disks-a", "key-a,"), ("disks-b", "key-a,key-b,")] {
        let mut spec = common::spec(common::id(name), common::kernel(), rootfs.clone());
        spec.boot_args = format!("{DEFAULT_BOOT_ARGS} rootfstype=ext4 init=/init");
        spec.cache_disk = Some(cache.clone());
        spec.secrets = Some(Secrets {
            webhook_secret: Some(format!("key-{}", &name[6..])),
            ..Default::default()
        });
        let mut vm = vmm.start(spec).await.unwrap();
        let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
        let exit = vm.wait().await.unwrap();
        let console = std::fs::read_to_string(&exit.console_log).unwrap();
        assert_eq!(exit.cause, ExitCause::GuestShutdown, "{console}");
        for line in [
            "scratch=mounted",
            "scratch=written",
            "config=mounted",
            &format!("secret=key-{}", &name[6..]),
            "scratch=unmounted",
            "cache=mounted",
            &format!("cache={runs}"),
            "cache=unmounted",
        ] {
            assert!(console.contains(line), "{line} missing:\n{console}");
        }
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(vm.work_dir().join("scratch.ext4"))
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let tag = vm.tag().to_string();
        vm.cleanup().await.unwrap();
        assert_eq!(leftovers(&tag, dir.path()), Vec::<String>::new());
        // What a cache pool does with a fork after a build: check it and commit it by rename.
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(&cache)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let committed = dir.path().join(format!("committed-{name}.ext4"));
        std::fs::rename(&cache, &committed).unwrap();
        cache = committed;
    }
}

/// An empty ext4 cache disk `name` in `dir`, as a cache pool's first fork of a key is.
fn cache_disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    builder_vmm::disk::create_scratch_disk(&path, 32).unwrap();
    path
}

/// A root filesystem whose init (busybox) probes the network from inside the guest, prints what
/// it got and reboots.
fn probe_rootfs(dir: &Path, script: &str) -> std::path::PathBuf {
    let root = dir.join("probe-root");
    for sub in ["bin", "proc", "dev", "sys", "scratch", "config", "cache"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/usr/bin/busybox", root.join("bin/busybox")).unwrap();
    let init = root.join("init");
    std::fs::write(&init, format!("#!/bin/busybox sh\n{script}")).unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image = dir.join("probe.ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());
    image
}

/// Accepts connections on every address until the test ends, greeting each.
fn greeter(port: u16) {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut &conn, b"hello\n");
        }
    });
}

/// The host's main address (the source of its default route): part of "the host" too.
fn host_address() -> String {
    let out = std::process::Command::new("ip")
        .args(["-j", "route", "get", "1.1.1.1"])
        .output()
        .unwrap();
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    routes[0]["prefsrc"].as_str().unwrap().to_string()
}

/// A stand-in for the Internet: a namespace behind a host veth, at `<net>.2/24` (`net` in
/// 198.18.0.0/15, which VMs may reach as the public Internet), serving the greeting on `ports`.
/// Removed when dropped.
struct Outside {
    netns: String,
    host_link: String,
    address: String,
}

impl Outside {
    fn new(name: &str, net: &str, ports: &[u16]) -> Self {
        let netns = format!("bvm-{}", common::id(name));
        let host_link = format!(
            "bvo{}{}",
            std::process::id() % 100_000,
            &name[name.len() - 1..]
        );
        let address = format!("{net}.2");
        let sh = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        sh(&["netns", "add", &netns]);
        let outside = Outside {
            netns: netns.clone(),
            host_link: host_link.clone(),
            address: address.clone(),
        };
        let peer = ["peer", "name", "eth0", "netns", &netns];
        sh(&[&["link", "add", &host_link, "type", "veth"][..], &peer].concat());
        sh(&["addr", "add", &format!("{net}.1/24"), "dev", &host_link]);
        sh(&["link", "set", &host_link, "up"]);
        let cidr = format!("{address}/24");
        sh(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"]);
        sh(&["-n", &netns, "link", "set", "eth0", "up"]);
        for &port in ports {
            let path = format!("/var/run/netns/{netns}");
            let address = address.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let ns = std::fs::File::open(path).unwrap();
                // SAFETY: setns on this thread only, with a namespace fd we hold open.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0);
                let listener = std::net::TcpListener::bind((address.as_str(), port)).unwrap();
                ready_tx.send(()).unwrap();
                for conn in listener.incoming().flatten() {
                    let _ = std::io::Write::write_all(&mut &conn, b"hello\n");
                }
            });
            ready_rx.recv().unwrap();
        }
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", &self.host_link])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

/// Boots a guest whose init runs `probes` (name, address, port), returns the console.
async fn probe_from_guest(
    name: &str,
    egress: EgressPolicy,
    slot: u32,
    probes: &[(&str, String, u16)],
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let vmm = vmm(&dir.path().join("vms"));
    let mut script = "/bin/busybox mount -t proc proc /proc\n".to_string();
    for (name, addr, port) in probes {
        script.push_str(&format!(
            "echo \"{name}=[$(/bin/busybox nc -w 3 {addr} {port} </dev/null)]\"\n"
        ));
    }
    script.push_str("/bin/busybox reboot -f\n");
    let rootfs = probe_rootfs(dir.path(), &script);
    let mut spec = common::spec(common::id(name), common::kernel(), rootfs);
    spec.boot_args = format!("{DEFAULT_BOOT_ARGS} rootfstype=ext4 init=/init");
    spec.network = Some(NetworkSpec {
        slot,
        egress,
        dns: vec![],
    });
    let mut vm = vmm.start(spec).await.unwrap();
    let _guard = common::ReclaimOnPanic(vmm.clone(), vm.tag().to_string());
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(&exit.console_log).unwrap();
    assert_eq!(exit.cause, ExitCause::GuestShutdown, "{console}");
    let tag = vm.tag().to_string();
    vm.cleanup().await.unwrap();
    assert_eq!(leftovers(&tag, dir.path()), Vec::<String>::new());
    console
}

#[tokio::test]
async fn a_real_guest_reaches_the_outside_and_only_the_allowed_host_port() {
    let slot = 4103;
    let host_veth = AddressPool::default()
        .addresses(slot)
        .unwrap()
        .host_veth
        .to_string();
    greeter(18090);
    greeter(18091);
    let outside = Outside::new("outside-a", "198.19.100", &[18092]);
    let policy = EgressPolicy {
        host_port: Some(18090),
        allow: None,
        ..EgressPolicy::default()
    };
    let console = probe_from_guest(
        "egress",
        policy,
        slot,
        &[
            ("ALLOWED", host_veth.clone(), 18090),
            ("OTHER_PORT", host_veth, 18091),
            ("HOST_MAIN_ADDRESS", host_address(), 18090),
            ("OUTSIDE", outside.address.clone(), 18092),
        ],
    )
    .await;
    assert!(console.contains("ALLOWED=[hello]"), "{console}");
    assert!(console.contains("OTHER_PORT=[]"), "{console}");
    assert!(console.contains("HOST_MAIN_ADDRESS=[]"), "{console}");
    assert!(console.contains("OUTSIDE=[hello]"), "{console}");
}

#[tokio::test]
async fn an_allowlist_limits_the_guest_to_its_entries() {
    let outside = Outside::new("outside-b", "198.19.113", &[18093, 18094]);
    let policy = EgressPolicy {
        host_port: None,
        allow: Some(vec![format!("{}/32:18093", outside.address)
            .parse()
            .unwrap()]),
        ..EgressPolicy::default()
    };
    let console = probe_from_guest(
        "listed",
        policy,
        4104,
        &[
            ("LISTED", outside.address.clone(), 18093),
            ("UNLISTED", outside.address.clone(), 18094),
        ],
    )
    .await;
    assert!(console.contains("LISTED=[hello]"), "{console}");
    assert!(console.contains("UNLISTED=[]"), "{console}");
}
