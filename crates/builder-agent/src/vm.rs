//! Life inside the builder VM: `builder-agent` is the VM's init (pid 1).
//!
//! pid 1 mounts the kernel filesystems, the per-build scratch disk, the cache disk when there
//! is one and the read-only config drive, then runs the build in a child process
//! (`builder-agent vm-build`) and does nothing but reap orphans until that child exits — so the
//! child's own waits on git and dockerd are never stolen. The child writes dockerd's config
//! (the image's `/etc/docker/daemon.json` plus the mirrored registries as insecure ones and,
//! with a cache disk, BuildKit's garbage collection), starts dockerd, runs the pipeline, prunes
//! dangling images from a cache disk after a successful build and stops dockerd gracefully.
//! pid 1 then ends what is left, syncs, unmounts (the cache disk cleanly: the node keeps it
//! only when its superblock says so) and reboots; with `reboot=k` on the kernel command line
//! the VMM (Firecracker or QEMU with `-no-reboot`) exits.
//!
//! Disk layout: `/dev/vda` the shared builder rootfs (mounted read-only by the kernel),
//! `/dev/vdb` the scratch disk (ext4, writable: the checkout, the output, the log, and Docker's
//! data when there is no cache disk), `/dev/vdc` the config drive (ext4, read-only:
//! `secrets.json`), `/dev/vdd` when the node attaches one: the build's fork of its cache key's
//! cache disk (ext4, writable: Docker's and containerd's data, BuildKit's cache with them).

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use builder_contract::report::exit_code;
use builder_contract::{BuildParams, BuildStatus};
use serde_json::{json, Map, Value};

use crate::notify::RetryPolicy;
use crate::pipeline::{self, RunOptions};

pub const SCRATCH_DEVICE: &str = "/dev/vdb";
pub const CONFIG_DEVICE: &str = "/dev/vdc";
pub const CACHE_DEVICE: &str = "/dev/vdd";
pub const SCRATCH_MOUNT: &str = "/mnt/scratch";
pub const CACHE_MOUNT: &str = "/mnt/cache";
pub const CONFIG_MOUNT: &str = "/run/builder-config";
pub const SECRETS_FILE: &str = "/run/builder-config/secrets.json";
/// Base images loaded into dockerd before the build: baked into the builder rootfs by
/// `make builder-vm PRELOAD_IMAGES=...` (the "pre-pull common base images" knob), and per
/// build on the config drive.
pub const IMAGE_DIRS: [&str; 2] = ["/usr/share/builder-vm/images", "/run/builder-config/images"];
/// The console line the host looks for: `builder-agent: exit=<code>`.
pub const EXIT_MARKER: &str = "builder-agent: exit=";
const DOCKER_SOCKET: &str = "/run/docker.sock";
/// The Docker daemon's stdout and stderr; handed to the node agent with the build log.
const DOCKERD_LOG: &str = "/var/log/dockerd.log";
const DOCKERD_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long dockerd gets to stop after SIGTERM before it is killed.
const DOCKERD_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The daemon config the image ships (read-only, like the whole rootfs).
const IMAGE_DAEMON_CONFIG: &str = "/etc/docker/daemon.json";
/// The daemon config dockerd is started with: the image's plus this build's settings.
const DAEMON_CONFIG: &str = "/run/docker-daemon.json";
/// Docker's and containerd's directories: on the cache disk when there is one, else on the
/// scratch disk.
const DOCKER_DIRS: [(&str, &str); 2] = [
    ("docker", "/var/lib/docker"),
    ("containerd", "/var/lib/containerd"),
];
/// The scratch disk's other directories.
const SCRATCH_DIRS: [(&str, &str); 2] = [("log", "/var/log"), ("tmp", "/var/tmp")];
/// Tries of a clean unmount of the cache disk, and the wait between them.
const CACHE_UNMOUNT_TRIES: u32 = 5;
const CACHE_UNMOUNT_RETRY: Duration = Duration::from_millis(200);
/// How long pid 1 waits for the processes still running at the end to exit on SIGTERM.
const STRAGGLERS_TIMEOUT: Duration = Duration::from_secs(5);

fn console(message: &str) {
    eprintln!("builder-agent: {message}");
}

fn bind(source: &str, target: &str) -> Result<(), String> {
    std::fs::create_dir_all(source).map_err(|e| format!("cannot create {source}: {e}"))?;
    builder_guest::mount(source, target, "", libc::MS_BIND, "")
}

/// Mounts everything the build needs. Runs in pid 1.
fn prepare_filesystems() -> Result<(), String> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    builder_guest::mount("proc", "/proc", "proc", nosuid, "")?;
    builder_guest::mount("sysfs", "/sys", "sysfs", nosuid, "")?;
    builder_guest::mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    builder_guest::mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    )?;
    builder_guest::mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    builder_guest::mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    builder_guest::mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    builder_guest::mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "")?;
    builder_guest::mount(SCRATCH_DEVICE, SCRATCH_MOUNT, "ext4", libc::MS_NOATIME, "")?;
    let docker_disk = if mount_cache_disk() {
        CACHE_MOUNT
    } else {
        SCRATCH_MOUNT
    };
    for (dir, target) in DOCKER_DIRS {
        bind(&format!("{docker_disk}/{dir}"), target)?;
    }
    for (dir, target) in SCRATCH_DIRS {
        bind(&format!("{SCRATCH_MOUNT}/{dir}"), target)?;
    }
    if Path::new(CONFIG_DEVICE).exists() {
        builder_guest::mount(
            CONFIG_DEVICE,
            CONFIG_MOUNT,
            "ext4",
            libc::MS_RDONLY | nosuid,
            "",
        )?;
    }
    // The kernel's `ip=` autoconfiguration lists its name servers in resolv.conf syntax;
    // /etc/resolv.conf in the image is a link to /run/resolv.conf.
    let pnp = std::fs::read_to_string("/proc/net/pnp").unwrap_or_default();
    let _ = std::fs::write("/run/resolv.conf", pnp);
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    Ok(())
}

/// Mounts the cache disk when the node attached one; says on the console whether it is warm.
/// A cache disk that cannot be mounted is left alone and the build runs on the scratch disk.
fn mount_cache_disk() -> bool {
    if !Path::new(CACHE_DEVICE).exists() {
        return false;
    }
    if let Err(e) = builder_guest::mount(CACHE_DEVICE, CACHE_MOUNT, "ext4", libc::MS_NOATIME, "") {
        console(&format!(
            "warning: cache disk: {e}; building on the scratch disk"
        ));
        return false;
    }
    if Path::new(CACHE_MOUNT).join("docker").is_dir() {
        let used = disk_usage(CACHE_MOUNT).map_or(0, |(_, used)| used);
        console(&format!("cache disk: warm, {} MiB used", used >> 20));
    } else {
        console("cache disk: new");
    }
    true
}

/// Whether the cache disk is mounted (a directory on another device than its parent).
fn cache_disk_mounted() -> bool {
    let dev = |path: &str| std::fs::metadata(path).map(|m| m.dev());
    matches!((dev(CACHE_MOUNT), dev("/mnt")), (Ok(cache), Ok(parent)) if cache != parent)
}

/// `(size, used)` in bytes of the filesystem at `path`.
fn disk_usage(path: &str) -> Option<(u64, u64)> {
    let path = CString::new(path).ok()?;
    // SAFETY: `statvfs` is a plain C struct of integers, for which all zero bytes are valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let size = st.f_blocks * st.f_frsize;
    Some((size, size - st.f_bfree * st.f_frsize))
}

/// pid 1: prepare, run the build child, reap, power off. Never returns.
pub fn init() -> ! {
    let started = Instant::now();
    let code = match prepare_filesystems() {
        Ok(()) => {
            console(&format!(
                "filesystems ready in {} ms",
                started.elapsed().as_millis()
            ));
            supervise_build()
        }
        Err(e) => {
            console(&format!("error: {e}"));
            exit_code::INTERNAL_ERROR
        }
    };
    console(&format!("exit={code}"));
    power_off()
}

/// Runs `builder-agent vm-build` and reaps every process until it exits; returns its code.
fn supervise_build() -> i32 {
    let child = match Command::new("/proc/self/exe").arg("vm-build").spawn() {
        Ok(child) => child,
        Err(e) => {
            console(&format!("error: cannot start the build: {e}"));
            return exit_code::INTERNAL_ERROR;
        }
    };
    let build_pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == build_pid {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                exit_code::INTERNAL_ERROR
            };
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return exit_code::INTERNAL_ERROR;
        }
    }
}

/// pid 1's end: stops what is still running, syncs, unmounts (the cache disk cleanly when it
/// can) and reboots.
fn power_off() -> ! {
    end_stragglers();
    // SAFETY: a plain syscall; sync before unmounting so the log and output reach the disk.
    unsafe { libc::sync() };
    for (_, target) in SCRATCH_DIRS.iter().chain(&DOCKER_DIRS) {
        if let Err(e) = umount(target, 0) {
            console(&format!("warning: {e}; detaching it"));
            let _ = umount(target, libc::MNT_DETACH);
        }
    }
    if cache_disk_mounted() {
        unmount_cache_disk();
    }
    let _ = umount(SCRATCH_MOUNT, libc::MNT_DETACH);
    builder_guest::reboot()
}

/// Unmounts the cache disk so that ext4 marks it clean, retrying while it is busy; a disk that
/// stays busy is detached instead (and the node will not keep it).
fn unmount_cache_disk() {
    let mut result = umount(CACHE_MOUNT, 0);
    for _ in 1..CACHE_UNMOUNT_TRIES {
        if result.is_ok() {
            break;
        }
        std::thread::sleep(CACHE_UNMOUNT_RETRY);
        result = umount(CACHE_MOUNT, 0);
    }
    match result {
        Ok(()) => console("cache disk: unmounted cleanly"),
        Err(e) => {
            console(&format!("cache disk: not cleanly unmounted ({e})"));
            let _ = umount(CACHE_MOUNT, libc::MNT_DETACH);
        }
    }
}

fn umount(target: &str, flags: libc::c_int) -> Result<(), String> {
    let path = CString::new(target).map_err(|_| format!("{target} has a NUL"))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(format!(
            "cannot unmount {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Ends the processes still running after the build child (none when dockerd stopped as it
/// should; they would keep the cache disk busy): SIGTERM, then SIGKILL after
/// [`STRAGGLERS_TIMEOUT`], reaping them.
fn end_stragglers() {
    for (signal, wait) in [
        (libc::SIGTERM, STRAGGLERS_TIMEOUT),
        (libc::SIGKILL, STRAGGLERS_TIMEOUT),
    ] {
        // SAFETY: plain syscall; from pid 1, -1 signals every process but pid 1 itself.
        if unsafe { libc::kill(-1, signal) } != 0 {
            return; // ESRCH: nothing is left.
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid < 0 {
                return; // ECHILD: all of them are gone.
            }
            if pid == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The build child: configure and start dockerd, run the pipeline, prune a cache disk, stop
/// dockerd. Returns the exit code.
pub fn build() -> i32 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // Parsed here only for dockerd's config; invalid parameters are reported by the pipeline.
    let mirrored_registries = BuildParams::from_cmdline(&cmdline, "vm")
        .map(|params| params.mirrored_registries)
        .unwrap_or_default();
    let cache_disk_bytes = cache_disk_mounted()
        .then(|| disk_usage(CACHE_MOUNT).map(|(size, _)| size))
        .flatten();
    let mut dockerd = match write_daemon_config(&mirrored_registries, cache_disk_bytes)
        .and_then(|()| start_dockerd())
    {
        Ok(child) => child,
        Err(e) => {
            console(&format!("error: {e}"));
            return exit_code::INTERNAL_ERROR;
        }
    };
    let ready = runtime.block_on(wait_for_dockerd());
    let options = RunOptions {
        cmdline,
        default_build_id: "vm".into(),
        secrets_file: Path::new(SECRETS_FILE)
            .exists()
            .then(|| PathBuf::from(SECRETS_FILE)),
        out_dir: PathBuf::from(SCRATCH_MOUNT).join("out"),
        work_dir: PathBuf::from(SCRATCH_MOUNT).join("work"),
        log_file: Some(PathBuf::from("/var/log/build.log")),
        dockerd_log: Some(PathBuf::from(DOCKERD_LOG)),
        docker_host: format!("unix://{DOCKER_SOCKET}"),
        docker_cli: crate::buildkit::DEFAULT_DOCKER_CLI.into(),
        notify_retry: RetryPolicy::default(),
        part_size: builder_s3::DEFAULT_PART_SIZE,
        keep_work: false,
        init: crate::cli::default_init(),
    };
    match &ready {
        Ok(()) => runtime.block_on(load_base_images()),
        Err(e) => console(&format!(
            "warning: {e}; the build will report the daemon's state"
        )),
    }
    let outcome = runtime.block_on(pipeline::run(&options));
    if cache_disk_bytes.is_some() && outcome.report.status == BuildStatus::Succeeded {
        runtime.block_on(prune_dangling_images());
    }
    stop_dockerd(&mut dockerd);
    outcome.exit_code()
}

/// Stops dockerd with SIGTERM so it shuts down cleanly (and containerd with it), killing it
/// only after [`DOCKERD_STOP_TIMEOUT`].
fn stop_dockerd(dockerd: &mut std::process::Child) {
    let started = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dockerd.id() as libc::pid_t, libc::SIGTERM) };
    while started.elapsed() < DOCKERD_STOP_TIMEOUT {
        if let Ok(Some(_)) = dockerd.try_wait() {
            console(&format!(
                "dockerd stopped in {} ms",
                started.elapsed().as_millis()
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    console(&format!(
        "warning: dockerd did not stop within {} s; killing it",
        DOCKERD_STOP_TIMEOUT.as_secs()
    ));
    let _ = dockerd.kill();
    let _ = dockerd.wait();
}

/// Removes the dangling images from the cache disk so it does not grow with every build.
async fn prune_dangling_images() {
    let pruned =
        match crate::docker::DockerDaemon::connect(&format!("unix://{DOCKER_SOCKET}")).await {
            Ok(docker) => docker.prune_dangling_images().await,
            Err(e) => Err(e.to_string()),
        };
    match pruned {
        Ok((images, bytes)) => console(&format!(
            "cache disk: pruned {images} dangling images ({} MiB)",
            bytes >> 20
        )),
        Err(e) => console(&format!("warning: cache disk: {e}")),
    }
}

/// Writes [`DAEMON_CONFIG`]: the image's daemon config with this build's settings.
fn write_daemon_config(
    mirrored_registries: &[String],
    cache_disk_bytes: Option<u64>,
) -> Result<(), String> {
    let image_config = match std::fs::read_to_string(IMAGE_DAEMON_CONFIG) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {IMAGE_DAEMON_CONFIG}: {e}")),
    };
    let config = daemon_config(
        image_config.as_deref(),
        mirrored_registries,
        cache_disk_bytes,
    )?;
    let text = serde_json::to_vec_pretty(&config).expect("a JSON value always serializes");
    std::fs::write(DAEMON_CONFIG, text).map_err(|e| format!("cannot write {DAEMON_CONFIG}: {e}"))
}

/// The daemon config: `image_config` (the image's `daemon.json`, kept as it is) with the
/// mirrored registries added to `insecure-registries` (the node's mirror speaks plain HTTP)
/// and, with a cache disk of `cache_disk_bytes`, BuildKit's garbage collection keeping at most
/// half of it.
fn daemon_config(
    image_config: Option<&str>,
    mirrored_registries: &[String],
    cache_disk_bytes: Option<u64>,
) -> Result<Value, String> {
    let mut config: Map<String, Value> = match image_config {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("{IMAGE_DAEMON_CONFIG} is not a JSON object: {e}"))?,
        None => Map::new(),
    };
    if !mirrored_registries.is_empty() {
        let insecure = config
            .entry("insecure-registries")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .ok_or_else(|| {
                format!("`insecure-registries` in {IMAGE_DAEMON_CONFIG} is not a list")
            })?;
        for registry in mirrored_registries {
            if !insecure.iter().any(|r| r == registry.as_str()) {
                insecure.push(json!(registry));
            }
        }
    }
    if let Some(bytes) = cache_disk_bytes {
        let builder = config
            .entry("builder")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| format!("`builder` in {IMAGE_DAEMON_CONFIG} is not an object"))?;
        // Docker 26.1's schema (`BuilderGCConfig`); sizes in go-units, where MB means MiB.
        builder.insert(
            "gc".into(),
            json!({"enabled": true, "defaultKeepStorage": format!("{}MB", (bytes / 2) >> 20)}),
        );
    }
    Ok(Value::Object(config))
}

fn start_dockerd() -> Result<std::process::Child, String> {
    let log = std::fs::File::create(DOCKERD_LOG)
        .map_err(|e| format!("cannot create {DOCKERD_LOG}: {e}"))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot open the dockerd log: {e}"))?;
    Command::new("dockerd")
        .args([
            "--host",
            &format!("unix://{DOCKER_SOCKET}"),
            "--data-root",
            "/var/lib/docker",
            "--exec-root",
            "/run/docker",
            "--pidfile",
            "/run/docker.pid",
            "--config-file",
            DAEMON_CONFIG,
        ])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start dockerd: {e}"))
}

/// `docker load`s every `*.tar` of [`IMAGE_DIRS`]; a failure is reported and the build goes on
/// (a `FROM` that needed the image then fails with the daemon's own clear message).
async fn load_base_images() {
    let docker =
        match crate::docker::DockerDaemon::connect(&format!("unix://{DOCKER_SOCKET}")).await {
            Ok(docker) => docker,
            Err(e) => return console(&format!("warning: {e}")),
        };
    for dir in IMAGE_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut archives: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        archives.sort();
        for archive in archives {
            let started = Instant::now();
            match docker.load(&archive).await {
                Ok(said) => console(&format!(
                    "loaded {} in {} ms: {said}",
                    archive.display(),
                    started.elapsed().as_millis()
                )),
                Err(e) => console(&format!("warning: {e}")),
            }
        }
    }
}

async fn wait_for_dockerd() -> Result<(), String> {
    let started = Instant::now();
    while started.elapsed() < DOCKERD_READY_TIMEOUT {
        if let Ok(docker) =
            bollard::Docker::connect_with_unix(DOCKER_SOCKET, 5, bollard::API_DEFAULT_VERSION)
        {
            if docker.ping().await.is_ok() {
                console(&format!(
                    "dockerd ready in {} ms",
                    started.elapsed().as_millis()
                ));
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "dockerd did not answer within {} s (see {DOCKERD_LOG})",
        DOCKERD_READY_TIMEOUT.as_secs()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image's daemon.json, as scripts/build-builder-vm.sh installs it.
    const SHIPPED: &str = include_str!("../../../vm/rootfs-overlay/etc/docker/daemon.json");

    /// What Docker 26.1's `dockerd --validate` says of `config`.
    fn validate(config: &Value) -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.json");
        std::fs::write(&path, serde_json::to_vec(config).unwrap()).unwrap();
        Command::new("dockerd")
            .arg("--validate")
            .arg("--config-file")
            .arg(&path)
            .output()
            .expect("dockerd is installed (scripts/services.sh)")
    }

    #[test]
    fn the_daemon_config_keeps_the_image_s_and_adds_registries_and_gc() {
        let registries = ["10.0.0.1:5000".to_string(), "ghcr.io:443".to_string()];
        let config = daemon_config(Some(SHIPPED), &registries, Some(8 << 30)).unwrap();
        let shipped: Map<String, Value> = serde_json::from_str(SHIPPED).unwrap();
        for (key, value) in &shipped {
            assert_eq!(config.get(key), Some(value), "{key}");
        }
        assert_eq!(
            config["insecure-registries"],
            json!(["10.0.0.1:5000", "ghcr.io:443"])
        );
        assert_eq!(
            config["builder"],
            json!({"gc": {"enabled": true, "defaultKeepStorage": "4096MB"}})
        );
        let out = validate(&config);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Without a cache disk or mirrors: the image's config as it is.
        let plain = daemon_config(Some(SHIPPED), &[], None).unwrap();
        assert_eq!(plain, Value::Object(shipped));
        assert_eq!(daemon_config(None, &[], None).unwrap(), json!({}));
    }

    #[test]
    fn the_daemon_config_merges_into_what_the_image_sets() {
        let image = r#"{"insecure-registries": ["10.0.0.1:5000"], "builder": {"history": {"maxAge": "1h"}}}"#;
        let registries = ["10.0.0.1:5000".to_string(), "10.0.0.2:5000".to_string()];
        let config = daemon_config(Some(image), &registries, Some(1 << 30)).unwrap();
        assert_eq!(
            config["insecure-registries"],
            json!(["10.0.0.1:5000", "10.0.0.2:5000"])
        );
        assert_eq!(config["builder"]["history"], json!({"maxAge": "1h"}));
        assert_eq!(config["builder"]["gc"]["defaultKeepStorage"], "512MB");

        let err = daemon_config(Some(r#"{"builder": []}"#), &[], Some(1 << 30)).unwrap_err();
        assert!(err.contains("`builder`"), "{err}");
        let err = daemon_config(Some("[]"), &[], None).unwrap_err();
        assert!(err.contains("not a JSON object"), "{err}");
    }
}
