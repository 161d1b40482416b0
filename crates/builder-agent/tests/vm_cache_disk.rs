//! The builder VM's cache disk, in a real VM: `build/vms/` (`make builder-vm`) booted with
//! QEMU through builder-vmm, an empty cache disk as `/dev/vdd`. The build itself fails at its
//! clone (the VM has no network); what is checked is the guest around it: the disk is mounted
//! and holds Docker's data, dockerd stops on SIGTERM, and pid 1 unmounts the disk cleanly, so
//! the next VM finds it warm. Ignored by default (two boots, minutes under TCG):
//! `cargo test -p builder-agent --test vm_cache_disk -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use builder_contract::{BuildParams, Secrets};
use builder_vmm::{AddressPool, Driver, QemuConfig, VmSpec, Vmm, VmmConfig, DEFAULT_BOOT_ARGS};

/// `build/vms/`, where `make builder-vm` puts the kernel and the builder rootfs.
fn builder_vm_file(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../build/vms")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run make builder-vm",
        path.display()
    );
    path
}

/// Boots the builder VM on `cache_disk` and returns its console.
async fn boot(vmm: &Vmm, id: &str, cache_disk: &Path) -> String {
    let params = BuildParams::from_cmdline(
        &format!("build_id={id} repo_url=http://192.0.2.1/none.git commit_sha=main"),
        id,
    )
    .unwrap();
    let spec = VmSpec {
        id: id.to_string(),
        kernel: builder_vm_file("vmlinux"),
        rootfs: builder_vm_file("builder-rootfs.ext4"),
        scratch_mib: 1024,
        secrets: Some(Secrets::default()),
        cache_disk: Some(cache_disk.to_path_buf()),
        vcpus: 1,
        mem_mib: 1024,
        boot_args: format!("{DEFAULT_BOOT_ARGS} init=/usr/local/bin/builder-agent"),
        params: Some(params),
        network: None,
        timeout: Duration::from_secs(300),
        cpus: None,
    };
    let mut vm = vmm.start(spec).await.unwrap();
    let exit = vm.wait().await.unwrap();
    let console = std::fs::read_to_string(&exit.console_log).unwrap();
    vm.cleanup().await.unwrap();
    console
}

/// `dumpe2fs -h`'s view of an ext4 image: clean, and no journal left to replay.
fn cleanly_unmounted(image: &Path) -> Result<(), String> {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let state = text
        .lines()
        .find_map(|line| line.strip_prefix("Filesystem state:"))
        .map(str::trim);
    if state != Some("clean") || text.contains("needs_recovery") {
        return Err(text);
    }
    Ok(())
}

#[tokio::test]
#[ignore = "boots the builder VM twice (make builder-vm first)"]
async fn the_cache_disk_holds_docker_s_data_and_is_unmounted_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.ext4");
    builder_vmm::disk::create_scratch_disk(&cache, 2048).unwrap();
    let vmm = Vmm::new(VmmConfig {
        work_root: dir.path().join("vms"),
        pool: AddressPool::default(),
        driver: Driver::Qemu(QemuConfig::from_env().unwrap()),
    });
    let prefix = format!("cache-{}", std::process::id());

    let first = boot(&vmm, &format!("{prefix}-1"), &cache).await;
    for needle in [
        "cache disk: new",
        "dockerd ready in",
        "dockerd stopped in",
        "cache disk: unmounted cleanly",
    ] {
        assert!(first.contains(needle), "no `{needle}` in:\n{first}");
    }
    assert!(
        !first.contains("pruned"),
        "a failed build prunes nothing:\n{first}"
    );
    cleanly_unmounted(&cache).unwrap();

    let second = boot(&vmm, &format!("{prefix}-2"), &cache).await;
    assert!(
        second.contains("cache disk: warm, ") && second.contains("cache disk: unmounted cleanly"),
        "{second}"
    );
    cleanly_unmounted(&cache).unwrap();
}
