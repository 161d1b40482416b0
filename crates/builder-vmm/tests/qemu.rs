//! The QEMU driver for real: a kernel boots under `-M microvm` with all three disks and the
//! network, panics for want of a root filesystem and makes QEMU exit; the console is captured;
//! a timeout and a kill are detected; cleanup and reclaim leave nothing.
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

fn vmm(work_root: &Path) -> Vmm {
    Vmm::new(VmmConfig {
        work_root: work_root.to_path_buf(),
        pool: AddressPool::default(),
        driver: Driver::Qemu(QemuConfig::from_env().unwrap()),
    })
}

fn network(slot: u32) -> NetworkSpec {
    NetworkSpec {
        slot,
        egress: EgressPolicy::default(),
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
    }
}

/// A spec whose guest panics at root mount and then hangs (`panic=0`) until stopped.
fn hanging(name: &str, dir: &Path) -> VmSpec {
    let mut spec = common::spec(common::id(name), common::kernel(), common::rootfs(dir));
    spec.boot_args = DEFAULT_BOOT_ARGS.replace("panic=-1", "panic=0");
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
    assert_eq!(exit.cause, ExitCause::GuestPanic, "{console}");
    assert_eq!(exit.vmm_exit_code, Some(0));
    for disk in ["[vda]", "[vdb]", "[vdc]"] {
        assert!(console.contains(disk), "{disk} missing:\n{console}");
    }
    assert!(
        console.contains(&format!("ipaddr={guest}")),
        "the guest took its address from ip=:\n{console}"
    );
    assert!(exit.runtime < Duration::from_secs(60));

    let prefix = vm.tag().to_string();
    vm.cleanup().await.unwrap();
    assert_eq!(
        common::leftovers(&prefix, &[&dir.path().join("vms")]),
        Vec::<String>::new()
    );
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
    assert_eq!(
        common::leftovers(&prefix, &[&dir.path().join("vms")]),
        Vec::<String>::new()
    );
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
    // QEMU itself (exec'd by `ip netns exec` and `taskset`) runs pinned, in the VM's namespace.
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
    // The daemon dies: the handle and its cleanup stack are gone, the VM keeps running.
    drop(vm);
    assert!(!common::leftovers(&tag, &[&work_root]).is_empty());

    let report = vmm.reclaim_matching(&tag);
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(report.processes, 1, "{report:?}");
    assert_eq!(report.netns, 1, "{report:?}");
    assert_eq!(report.veths, 1, "{report:?}");
    assert_eq!(report.iptables_rules, 4, "{report:?}");
    assert_eq!(report.work_dirs, 1, "{report:?}");
    assert_eq!(common::leftovers(&tag, &[&work_root]), Vec::<String>::new());
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
    assert_eq!(common::leftovers(&tag, &[&work_root]), Vec::<String>::new());
}
