//! The Firecracker driver: the VMM is started by the jailer (`--daemonize`, its own uid/gid,
//! a chroot under `chroot_base`, the VM's network namespace, cgroup limits), the kernel and
//! disks are hard-linked into the chroot (copied when on another filesystem), and the VM is
//! configured and started over the API socket. The cache disk, the caller's file, is never
//! copied: it is bound into the chroot before the jailer runs, as the jailer's mount namespace
//! is a copy of ours taken when it starts (and its chroot bind is recursive), while a bind
//! made later would not reach it where the host's mounts are private; removing the chroot
//! unmounts it ([`crate::cleanup`]). Console, log and metrics files are written in
//! the chroot and copied into the VM's work dir when it exits.
//!
//! The jailer forks when it daemonizes, so this process makes itself a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`): the orphaned Firecracker becomes our child and its exit code
//! can be read.

pub mod api;
pub mod metrics;

use std::fs;
use std::io;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{
    ActionType, ApiClient, ApiError, BootSource, Drive, InstanceAction, Logger, MachineConfig,
    Metrics, NetworkInterface, Serial,
};

use metrics::{MetricsFileError, MetricsTotals};

use crate::cgroup::{self, CgroupVersion, PARENT_CGROUP};
use crate::cleanup::{remove_jail_dir, CleanupStack};
use crate::net::TAP;
use crate::process::{Process, ProcessExit};
use crate::vm::{locate_binary, DriveFile, LaunchPlan, Launched, LocateError};

/// Where Firecracker listens inside its chroot (the default of `--api-sock`).
const API_SOCKET: &str = "run/firecracker.socket";
/// How long the jailer gets to daemonize and Firecracker to open its socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const CONSOLE_FILE: &str = "console.log";
const LOG_FILE: &str = "firecracker.log";
const METRICS_FILE: &str = "metrics.json";
const JAILER_LOG_FILE: &str = "jailer.log";

/// Why the Firecracker VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    #[error("cannot run the jailer {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the jailer exited with {status} before starting Firecracker: {output}")]
    Jailer { status: String, output: String },
    #[error("{what} did not appear at {path} within {STARTUP_TIMEOUT:?}")]
    Startup { what: &'static str, path: PathBuf },
    #[error("cannot watch the process {pid}")]
    Watch {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot place {from} into the chroot as {to}")]
    Stage {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {from} into the chroot as {to}")]
    Bind {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// How to run Firecracker on this host.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    pub firecracker_bin: PathBuf,
    pub jailer_bin: PathBuf,
    /// The jailer's `--chroot-base-dir`; best on the filesystem of the rootfs and work dirs, so
    /// disks are hard-linked rather than copied.
    pub chroot_base: PathBuf,
    /// Unprivileged uid/gid Firecracker runs as.
    pub uid: u32,
    pub gid: u32,
    pub cgroup_version: CgroupVersion,
}

impl FirecrackerConfig {
    /// Finds the binaries from `FIRECRACKER_BIN` / `JAILER_BIN`, else on `PATH`, and detects
    /// the cgroup version.
    pub fn from_env(chroot_base: PathBuf, uid: u32, gid: u32) -> Result<Self, LocateError> {
        Ok(FirecrackerConfig {
            firecracker_bin: locate_binary("FIRECRACKER_BIN", "firecracker")?,
            jailer_bin: locate_binary("JAILER_BIN", "jailer")?,
            chroot_base,
            uid,
            gid,
            cgroup_version: CgroupVersion::detect(),
        })
    }

    /// `<chroot_base>/<exec file name>`: the jailer puts each VM's chroot in here.
    pub fn jail_dir(&self) -> PathBuf {
        let exec_name = self
            .firecracker_bin
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("firecracker"));
        self.chroot_base.join(exec_name)
    }

    /// The chroot of one VM (`.../<tag>/root`).
    pub fn chroot(&self, tag: &str) -> PathBuf {
        self.jail_dir().join(tag).join("root")
    }

    /// The metrics of every VM whose tag starts with `prefix` and whose chroot holds a metrics
    /// file (running VMs: the chroot goes with the VM's cleanup), by tag.
    pub fn metrics_matching(
        &self,
        prefix: &str,
    ) -> Vec<(String, Result<MetricsTotals, MetricsFileError>)> {
        let Ok(entries) = fs::read_dir(self.jail_dir()) else {
            return Vec::new();
        };
        let mut found: Vec<_> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|tag| tag.starts_with(prefix))
            .filter_map(|tag| {
                let file = self.chroot(&tag).join(METRICS_FILE);
                match MetricsTotals::read(&file) {
                    Err(e) if e.source.kind() == io::ErrorKind::NotFound => None,
                    result => Some((tag, result)),
                }
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    fn jailer_command(&self, plan: &LaunchPlan<'_>) -> Command {
        let mut command = Command::new(&self.jailer_bin);
        command
            .arg("--id")
            .arg(plan.tag)
            .arg("--exec-file")
            .arg(&self.firecracker_bin)
            .args([
                "--uid",
                &self.uid.to_string(),
                "--gid",
                &self.gid.to_string(),
            ])
            .arg("--chroot-base-dir")
            .arg(&self.chroot_base)
            .args(["--cgroup-version", self.cgroup_version.as_arg()])
            .args(["--parent-cgroup", PARENT_CGROUP]);
        for limit in self.cgroup_version.limits(
            plan.cpus,
            plan.vcpus,
            plan.mem_mib,
            cgroup::FIRECRACKER_OVERHEAD_MIB,
        ) {
            command.arg("--cgroup").arg(limit);
        }
        if let Some(net) = plan.net {
            command.arg("--netns").arg(net.netns_path());
        }
        command.arg("--daemonize");
        command
    }

    /// Starts the VM described by `plan`, pushing every undo onto `stack`.
    pub(crate) async fn launch(
        &self,
        plan: &LaunchPlan<'_>,
        stack: &mut CleanupStack,
    ) -> Result<Launched, FirecrackerError> {
        become_subreaper();
        let jail = self.jail_dir().join(plan.tag);
        let root = self.chroot(plan.tag);
        // Pushed before the jailer runs: it may leave a half-made chroot or cgroup behind.
        stack.push(format!("remove jailer chroot {}", jail.display()), {
            let jail = jail.clone();
            move || remove_jail_dir(&jail).map_err(Into::into)
        });
        stack.push(format!("remove cgroups {}/{}", PARENT_CGROUP, plan.tag), {
            let tag = plan.tag.to_string();
            move || cgroup::remove(&tag).map(drop).map_err(Into::into)
        });
        for drive in plan.drives.iter().filter(|d| d.in_place) {
            bind_in_place(
                &drive.path,
                &root.join(drive_file_name(drive)),
                (self.uid, self.gid),
            )?;
        }

        let jailer_log = plan.work_dir.join(JAILER_LOG_FILE);
        let log_file = fs::File::create(&jailer_log).map_err(|source| FirecrackerError::Spawn {
            path: jailer_log.clone(),
            source,
        })?;
        let err_file = log_file
            .try_clone()
            .map_err(|source| FirecrackerError::Spawn {
                path: jailer_log.clone(),
                source,
            })?;
        let jailer = self
            .jailer_command(plan)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|source| FirecrackerError::Spawn {
                path: self.jailer_bin.clone(),
                source,
            })?;
        let jailer_pid = jailer.id() as i32;
        let jailer = Process::open(jailer_pid).map_err(|source| FirecrackerError::Watch {
            pid: jailer_pid,
            source,
        })?;
        let process = self.await_firecracker(&jailer, &root, &jailer_log).await?;
        let process = Arc::new(process);
        stack.push(format!("kill Firecracker (pid {})", process.pid()), {
            let process = process.clone();
            move || process.kill_and_reap().map(drop).map_err(Into::into)
        });

        let socket = root.join(API_SOCKET);
        let mut api = connect(&socket).await?;
        self.configure(&mut api, plan, &root).await?;
        api.put(
            "/actions",
            &InstanceAction {
                action_type: ActionType::InstanceStart,
            },
        )
        .await?;
        let collect = [CONSOLE_FILE, LOG_FILE, METRICS_FILE]
            .into_iter()
            .map(|name| (root.join(name), plan.work_dir.join(name)))
            .collect();
        Ok(Launched {
            process,
            console_log: root.join(CONSOLE_FILE),
            vmm_log: plan.work_dir.join(LOG_FILE),
            jailer_log: Some(jailer_log),
            collect,
            api_socket: Some(socket),
            metrics: Some(root.join(METRICS_FILE)),
        })
    }

    /// Waits until the jailer has daemonized and returns the Firecracker process: the jailer's
    /// own pid if it exec'd in place, otherwise its orphaned child.
    async fn await_firecracker(
        &self,
        jailer: &Process,
        root: &Path,
        jailer_log: &Path,
    ) -> Result<Process, FirecrackerError> {
        let pid_file = root.join("firecracker.pid");
        let watch = |pid| move |source| FirecrackerError::Watch { pid, source };
        let failed = |status: ProcessExit| FirecrackerError::Jailer {
            status: format!("{status:?}"),
            output: fs::read_to_string(jailer_log).unwrap_or_default(),
        };
        let read_pid = || {
            fs::read_to_string(&pid_file)
                .ok()?
                .trim()
                .parse::<i32>()
                .ok()
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut jailer_status = None;
        let pid = loop {
            if let Some(pid) = read_pid() {
                break pid;
            }
            match jailer_status {
                // The parent exits once it has forked; the child writes the pid file.
                Some(ProcessExit::Code(0)) | None => {}
                Some(status) => return Err(failed(status)),
            }
            if Instant::now() > deadline {
                return Err(FirecrackerError::Startup {
                    what: "Firecracker's pid file",
                    path: pid_file,
                });
            }
            if jailer_status.is_some() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            } else if let Ok(status) =
                tokio::time::timeout(Duration::from_millis(5), jailer.wait()).await
            {
                jailer_status = Some(status.map_err(watch(jailer.pid()))?);
            }
        };
        if pid != jailer.pid() {
            // The jailer forked: once the parent is reaped its child is reparented to us.
            let status = match jailer_status {
                Some(status) => status,
                None => jailer.wait().await.map_err(watch(jailer.pid()))?,
            };
            if status != ProcessExit::Code(0) {
                return Err(failed(status));
            }
        }
        Process::open(pid).map_err(watch(pid))
    }

    /// Links the files into the chroot and sends the configuration.
    async fn configure(
        &self,
        api: &mut ApiClient,
        plan: &LaunchPlan<'_>,
        root: &Path,
    ) -> Result<(), FirecrackerError> {
        api.put(
            "/logger",
            &Logger {
                log_path: LOG_FILE.into(),
                level: Some("Info".into()),
                show_level: Some(true),
                show_log_origin: Some(false),
            },
        )
        .await?;
        api.put(
            "/metrics",
            &Metrics {
                metrics_path: METRICS_FILE.into(),
            },
        )
        .await?;
        api.put(
            "/serial",
            &Serial {
                serial_out_path: CONSOLE_FILE.into(),
            },
        )
        .await?;
        stage(plan.kernel, &root.join("vmlinux"), None)?;
        api.put(
            "/boot-source",
            &BootSource {
                kernel_image_path: "vmlinux".into(),
                boot_args: Some(plan.cmdline.clone()),
            },
        )
        .await?;
        for drive in &plan.drives {
            let name = drive_file_name(drive);
            if !drive.in_place {
                // Writable or secret drives are per-VM: hand them to the jailed uid.
                let owner = (!drive.shared).then_some((self.uid, self.gid));
                stage(&drive.path, &root.join(&name), owner)?;
            }
            api.put(
                &format!("/drives/{}", drive.id),
                &Drive {
                    drive_id: drive.id.to_string(),
                    path_on_host: name,
                    is_root_device: false,
                    is_read_only: drive.read_only,
                },
            )
            .await?;
        }
        if let Some(net) = plan.net {
            api.put(
                "/network-interfaces/eth0",
                &NetworkInterface {
                    iface_id: "eth0".into(),
                    host_dev_name: TAP.into(),
                    guest_mac: Some(net.addresses.guest_mac()),
                },
            )
            .await?;
        }
        api.put(
            "/machine-config",
            &MachineConfig {
                vcpu_count: plan.vcpus,
                mem_size_mib: plan.mem_mib,
                smt: false,
            },
        )
        .await?;
        Ok(())
    }
}

fn become_subreaper() {
    // SAFETY: prctl with an integer argument; failure only means exit codes are unknown.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper");
    }
}

/// Connects to the API socket, which appears (bound, then listening) shortly after the pid file.
async fn connect(socket: &Path) -> Result<ApiClient, FirecrackerError> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        match ApiClient::connect(socket).await {
            Ok(api) => return Ok(api),
            Err(ApiError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                if Instant::now() > deadline {
                    return Err(FirecrackerError::Startup {
                        what: "the Firecracker API socket",
                        path: socket.to_path_buf(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A drive's file name in the chroot (`cache.ext4`), relative as the API wants it.
fn drive_file_name(drive: &DriveFile) -> String {
    format!("{}.ext4", drive.id)
}

/// Binds the caller's file `from` at `to` in the chroot (made here, before the jailer runs),
/// `nosuid,nodev,noexec`, and hands `from` to the jailed uid, mode 0600.
fn bind_in_place(from: &Path, to: &Path, owner: (u32, u32)) -> Result<(), FirecrackerError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let error = |source| FirecrackerError::Bind {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    let c_path = |path: &Path| {
        std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| error(io::Error::from(io::ErrorKind::InvalidInput)))
    };
    let (source, target) = (c_path(from)?, c_path(to)?);
    if let Some(parent) = to.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(error)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(error)?;
    // SAFETY: mount with C strings we own and null pointers where the call allows them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    // SAFETY: as above; the remount applies the flags to the bind just made.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    Ok(crate::jail::hand_over(from, owner)?)
}

/// Hard-links `from` to `to` (copies across filesystems), optionally handing it to `owner`.
fn stage(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> Result<(), FirecrackerError> {
    let error = |source| FirecrackerError::Stage {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    match fs::hard_link(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to).map_err(error)?;
        }
        Err(e) => return Err(error(e)),
    }
    if let Some((uid, gid)) = owner {
        chown(to, Some(uid), Some(gid)).map_err(error)?;
    }
    Ok(())
}
