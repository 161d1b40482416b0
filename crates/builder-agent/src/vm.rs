//! Life inside the builder VM: `builder-agent` is the VM's init (pid 1).
//!
//! pid 1 mounts the kernel filesystems, the per-build scratch disk and the read-only config
//! drive, then runs the build in a child process (`builder-agent vm-build`) and does nothing
//! but reap orphans until that child exits — so the child's own waits on git and dockerd are
//! never stolen. The child starts dockerd on the scratch disk, runs the pipeline and stops
//! dockerd. pid 1 then syncs, unmounts and reboots; with `reboot=k` on the kernel command line
//! the VMM (Firecracker or QEMU with `-no-reboot`) exits.
//!
//! Disk layout: `/dev/vda` the shared builder rootfs (mounted read-only by the kernel),
//! `/dev/vdb` the scratch disk (ext4, writable: Docker's data, the checkout, the output, the
//! log), `/dev/vdc` the config drive (ext4, read-only: `secrets.json`).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use builder_contract::report::exit_code;

use crate::notify::RetryPolicy;
use crate::pipeline::{self, RunOptions};

pub const SCRATCH_DEVICE: &str = "/dev/vdb";
pub const CONFIG_DEVICE: &str = "/dev/vdc";
pub const SCRATCH_MOUNT: &str = "/mnt/scratch";
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
    for (dir, target) in [
        ("docker", "/var/lib/docker"),
        ("containerd", "/var/lib/containerd"),
        ("log", "/var/log"),
        ("tmp", "/var/tmp"),
    ] {
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

fn power_off() -> ! {
    // SAFETY: plain syscalls; sync before unmounting so the log and output reach the disk.
    unsafe { libc::sync() };
    for target in [
        "/var/log",
        "/var/tmp",
        "/var/lib/containerd",
        "/var/lib/docker",
        SCRATCH_MOUNT,
    ] {
        let path = CString::new(target).expect("no NUL");
        // SAFETY: valid path pointer.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    builder_guest::reboot()
}

/// The build child: start dockerd, run the pipeline, stop dockerd. Returns the exit code.
pub fn build() -> i32 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let mut dockerd = match start_dockerd() {
        Ok(child) => child,
        Err(e) => {
            console(&format!("error: {e}"));
            return exit_code::INTERNAL_ERROR;
        }
    };
    let ready = runtime.block_on(wait_for_dockerd());
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
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
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dockerd.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = dockerd.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = dockerd.kill();
    outcome.exit_code()
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
