//! A converted image boots: repository → `builder-agent run` → rootfs.ext4 → QEMU microvm
//! (through builder-vmm, with the guest kernel of `make builder-vm`) → the image's entrypoint
//! runs as its user, in its directory, with its environment, under builder-init as pid 1, and
//! its exit code comes back on the console before the VM powers itself off.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use builder_vmm::{
    AddressPool, Driver, ExitCause, QemuConfig, VmSpec, Vmm, VmmConfig, DEFAULT_BOOT_ARGS,
};
use support::*;

/// The guest kernel: `BUILDER_VMM_TEST_KERNEL`, else `build/vms/vmlinux`.
fn kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("BUILDER_VMM_TEST_KERNEL") {
        return path.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/vms/vmlinux");
    assert!(
        path.exists(),
        "no guest kernel: run scripts/build-kernel.sh build/vms/vmlinux"
    );
    path
}

#[tokio::test]
async fn a_converted_image_boots_and_runs_its_entrypoint() {
    let repo = TestRepo::new("boot");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM {}\nENV GREETING=hello-from-the-microvm\nWORKDIR /srv/app\nUSER app\n\
             ENTRYPOINT [\"/bin/sh\", \"-c\"]\n\
             CMD [\"echo \\\"$GREETING uid=$(id -u) gid=$(id -g) cwd=$(pwd) init=$(cat /proc/1/comm) \
             home=$HOME\\\"; sleep 1 & wait; exit 7\"]\n",
            env("BUILDER_TEST_BASE_IMAGE")
        ),
    );
    repo.commit("first");
    let scratch = Scratch::new();
    let id = unique("boot");
    let run = tokio::task::spawn_blocking({
        let params = format!("build_id={id} repo_url={} commit_sha=main", repo.url());
        move || (scratch.run(&params, &[]), scratch)
    });
    let (run, scratch) = run.await.unwrap();
    assert_eq!(run.code, 0, "{}", run.log);
    let rootfs = run.rootfs(&id);
    let config = ext4_cat(&rootfs, builder_contract::image::CONFIG_PATH).expect("config injected");
    assert!(config.contains("hello-from-the-microvm"), "{config}");

    let vmm = Vmm::new(VmmConfig {
        work_root: scratch.path().join("vms"),
        pool: AddressPool::default(),
        driver: Driver::Qemu(QemuConfig::from_env().unwrap()),
    });
    let spec = VmSpec {
        id: format!("app-{}", std::process::id()),
        kernel: kernel(),
        rootfs,
        scratch_mib: 16,
        secrets: None,
        cache_disk: None,
        vcpus: 1,
        mem_mib: 256,
        boot_args: format!(
            "{DEFAULT_BOOT_ARGS} init={}",
            builder_contract::image::INIT_PATH
        ),
        params: None,
        network: None,
        timeout: Duration::from_secs(120),
        cpus: None,
    };
    let mut vm = vmm.start(spec).await.unwrap();
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(&exit.console_log).unwrap();
    vm.cleanup().await.unwrap();
    assert!(
        matches!(exit.cause, ExitCause::GuestShutdown),
        "{exit:?}\n{console}"
    );
    assert!(
        console.contains(
            "hello-from-the-microvm uid=1000 gid=1000 cwd=/srv/app init=init home=/home/app"
        ),
        "{console}"
    );
    assert!(console.contains("builder-init: exit=7"), "{console}");
}
