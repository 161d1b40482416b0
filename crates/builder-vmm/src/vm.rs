//! The one interface over both drivers: [`Vmm::start`] turns a [`VmSpec`] into a running
//! [`Vm`] (work dir, disks, network, VMM process, each pushing its undo), [`Vm::wait`] and
//! [`Vm::kill`] end it and say why, and [`Vm::cleanup`] removes everything it made.
//!
//! Work dir `<work_root>/bvm-<id>`: `scratch.ext4` (vdb), `config.ext4` (vdc), `console.log`,
//! the VMM's log, Firecracker's metrics. The rootfs (vda) is attached read-only from where it
//! is, the cache disk (vdd) read-write from where it is, in place: it is the caller's file, so
//! [`Vm::cleanup`] leaves it there (given back to root, mode 0600) and removes the rest of the
//! work dir: copy logs out between `wait` and `cleanup`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use builder_contract::params::check_cmdline_len;
use builder_contract::ParamError;

use crate::cleanup::{remove_dir_all_if_exists, CleanupErrors, CleanupStack};
use crate::disk::{self, DiskError};
use crate::exit::{classify, PanicSignal, Stop, VmExit};
use crate::firecracker::metrics::{MetricsFileError, MetricsTotals};
use crate::firecracker::{FirecrackerConfig, FirecrackerError};
use crate::host::{Host, SystemHost};
use crate::net::{AddressPool, NetError, NetworkPlan, VmAddresses};
use crate::process::Process;
use crate::qemu::{QemuConfig, QemuError};
use crate::reclaim::{self, ReclaimReport};
use crate::spec::{CpuSet, SpecError, VmSpec, TAG_PREFIX};

/// Why a VMM binary could not be found or configured.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("{env} points to {path}, which is not an executable file")]
    NotExecutable { env: &'static str, path: PathBuf },
    #[error("`{name}` is not on PATH; install it or set {env} to its path")]
    NotFound {
        name: &'static str,
        env: &'static str,
    },
    #[error("invalid VMM configuration: {reason}")]
    Config { reason: String },
}

/// The binary named by `env`, else `name` found on `PATH`.
pub fn locate_binary(env: &'static str, name: &'static str) -> Result<PathBuf, LocateError> {
    if let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(LocateError::NotExecutable { env, path })
        };
    }
    find_on_path(name).ok_or(LocateError::NotFound { name, env })
}

/// The executable `name` in the first `PATH` directory that has it, as a command run by name
/// would find it.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why a VM could not be started or watched.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("the kernel command line is not valid")]
    Cmdline(#[from] ParamError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Firecracker(#[from] FirecrackerError),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error("cannot create the VM work dir {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch or signal the VMM process {pid}")]
    Process {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("{source}; undoing the partial start also failed: {cleanup}")]
    StartAndCleanup {
        #[source]
        source: Box<VmError>,
        cleanup: CleanupErrors,
    },
}

/// Which VMM runs the VMs.
#[derive(Debug, Clone)]
pub enum Driver {
    Firecracker(FirecrackerConfig),
    Qemu(QemuConfig),
}

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// Parent of every VM's work dir.
    pub work_root: PathBuf,
    pub pool: AddressPool,
    pub driver: Driver,
}

/// One disk as the drivers attach it, in guest order (vda, vdb, vdc, vdd).
#[derive(Debug, Clone)]
pub(crate) struct DriveFile {
    pub id: &'static str,
    pub path: PathBuf,
    pub read_only: bool,
    /// Shared between VMs (the rootfs): never re-owned.
    pub shared: bool,
    /// The caller's file (the cache disk): attached where it is, never copied into a jail.
    pub in_place: bool,
}

/// What a driver needs to start the VMM.
#[derive(Debug)]
pub(crate) struct LaunchPlan<'a> {
    pub tag: &'a str,
    pub work_dir: &'a Path,
    pub kernel: &'a Path,
    pub drives: Vec<DriveFile>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub cpus: Option<&'a CpuSet>,
    pub net: Option<&'a NetworkPlan>,
}

/// What a driver hands back.
#[derive(Debug)]
pub(crate) struct Launched {
    pub process: Arc<Process>,
    /// Where the console is written while the VM runs.
    pub console_log: PathBuf,
    pub vmm_log: PathBuf,
    /// The jailer's stdout and stderr, in the work dir (Firecracker only).
    pub jailer_log: Option<PathBuf>,
    /// Files copied into the work dir when the VMM exits (from, to).
    pub collect: Vec<(PathBuf, PathBuf)>,
    pub api_socket: Option<PathBuf>,
    /// Firecracker's metrics file while the VM runs.
    pub metrics: Option<PathBuf>,
}

/// Starts VMs on this host.
#[derive(Debug, Clone)]
pub struct Vmm {
    config: VmmConfig,
    host: Arc<dyn Host>,
}

impl Vmm {
    pub fn new(config: VmmConfig) -> Self {
        Self::with_host(config, Arc::new(SystemHost))
    }

    /// A VMM whose network commands go through `host`.
    pub fn with_host(config: VmmConfig, host: Arc<dyn Host>) -> Self {
        Vmm { config, host }
    }

    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// The work dir a VM with this tag gets.
    pub fn work_dir(&self, tag: &str) -> PathBuf {
        self.config.work_root.join(tag)
    }

    /// Starts a VM. On failure everything created so far is removed again.
    pub async fn start(&self, spec: VmSpec) -> Result<Vm, VmError> {
        spec.validate()?;
        let mut stack = CleanupStack::new();
        match self.start_with(&spec, &mut stack).await {
            Ok(mut vm) => {
                vm.cleanup = stack;
                Ok(vm)
            }
            Err(source) => {
                let cleanup = tokio::task::spawn_blocking(move || stack.run())
                    .await
                    .expect("the cleanup task does not panic");
                match cleanup {
                    Ok(()) => Err(source),
                    Err(cleanup) => Err(VmError::StartAndCleanup {
                        source: Box::new(source),
                        cleanup,
                    }),
                }
            }
        }
    }

    async fn start_with(&self, spec: &VmSpec, stack: &mut CleanupStack) -> Result<Vm, VmError> {
        let tag = spec.tag();
        let began = Instant::now();
        let work_dir = self.work_dir(&tag);
        let work_dir_error = |source| VmError::WorkDir {
            path: work_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.config.work_root).map_err(work_dir_error)?;
        std::fs::create_dir(&work_dir).map_err(work_dir_error)?;
        stack.push(format!("remove work dir {}", work_dir.display()), {
            let work_dir = work_dir.clone();
            move || remove_dir_all_if_exists(&work_dir).map_err(Into::into)
        });

        let mut drives = vec![DriveFile {
            id: "rootfs",
            path: spec.rootfs.clone(),
            read_only: true,
            shared: true,
            in_place: false,
        }];
        let scratch = work_dir.join("scratch.ext4");
        disk::create_scratch_disk(&scratch, spec.scratch_mib)?;
        drives.push(DriveFile {
            id: "scratch",
            path: scratch,
            read_only: false,
            shared: false,
            in_place: false,
        });
        if let Some(secrets) = &spec.secrets {
            let config = work_dir.join("config.ext4");
            disk::create_config_drive(&config, secrets)?;
            drives.push(DriveFile {
                id: "config",
                path: config,
                read_only: true,
                shared: false,
                in_place: false,
            });
        }
        if let Some(cache) = &spec.cache_disk {
            drives.push(DriveFile {
                id: "cache",
                path: cache.clone(),
                read_only: false,
                shared: false,
                in_place: true,
            });
            // The driver hands it to the VM's uid; once the VMM is gone it is root's again.
            stack.push(
                format!("give the cache disk {} back to root", cache.display()),
                {
                    let cache = cache.clone();
                    move || crate::jail::hand_over(&cache, (0, 0)).map_err(Into::into)
                },
            );
        }

        let disks = began.elapsed();
        let tap_owner = match &self.config.driver {
            Driver::Firecracker(fc) => Some(fc.uid),
            Driver::Qemu(_) => None,
        };
        let net = spec
            .network
            .clone()
            .map(|net| NetworkPlan::new(&tag, self.config.pool, net, tap_owner))
            .transpose()?;
        if let Some(net) = &net {
            let host = self.host.clone();
            let plan = net.clone();
            let mut net_stack = CleanupStack::new();
            let applied = tokio::task::spawn_blocking(move || {
                let result = plan.apply(&host, &mut net_stack);
                (result, net_stack)
            })
            .await
            .expect("the network setup task does not panic");
            let (result, mut net_stack) = applied;
            // The network's undos run as one step, in their own LIFO order.
            stack.push(format!("remove network of {tag}"), move || {
                net_stack.run().map_err(Into::into)
            });
            result?;
        }

        let network = began.elapsed() - disks;
        let mut base = vec![spec.boot_args.trim().to_string()];
        if let Some(net) = &net {
            base.push(net.kernel_ip_param());
        }
        if let Driver::Qemu(qemu) = &self.config.driver {
            base.extend(qemu.extra_boot_args());
        }
        let base = base.join(" ");
        let cmdline = match &spec.params {
            Some(params) => params.kernel_cmdline(&base)?,
            None => check_cmdline_len(&base)?,
        };

        let plan = LaunchPlan {
            tag: &tag,
            work_dir: &work_dir,
            kernel: &spec.kernel,
            drives,
            cmdline,
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
            cpus: spec.cpus.as_ref(),
            net: net.as_ref(),
        };
        let started = Instant::now();
        let launched = match &self.config.driver {
            Driver::Firecracker(fc) => fc.launch(&plan, stack).await?,
            Driver::Qemu(qemu) => qemu.launch(&plan, stack)?,
        };
        // Where the start went, for the admission benchmark (scripts/bench-node-agent.sh).
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        tracing::info!(
            vm = %tag,
            pid = launched.process.pid(),
            disks_ms = ms(disks),
            network_ms = ms(network),
            spawn_ms = ms(began.elapsed() - disks - network),
            "VM started"
        );
        let cmdline = plan.cmdline;
        Ok(Vm {
            tag,
            work_dir,
            cmdline,
            addresses: net.map(|n| n.addresses),
            started,
            deadline: started + spec.timeout,
            timeout: spec.timeout,
            launched,
            panic: match &self.config.driver {
                Driver::Firecracker(_) => PanicSignal::Unseen,
                Driver::Qemu(qemu) => qemu.panic_signal(),
            },
            stop: Arc::new(Mutex::new(None)),
            exit: None,
            cleanup: CleanupStack::new(),
        })
    }

    /// Firecracker's counters for each running VM whose tag starts with `prefix`, by tag
    /// (see [`crate::firecracker::metrics`]); QEMU writes no metrics file, so none there.
    pub fn metrics_matching(
        &self,
        prefix: &str,
    ) -> Vec<(String, Result<MetricsTotals, MetricsFileError>)> {
        match &self.config.driver {
            Driver::Firecracker(fc) => fc.metrics_matching(prefix),
            Driver::Qemu(_) => Vec::new(),
        }
    }

    /// Removes what VMs of a crashed run left behind (see [`reclaim`]).
    pub fn reclaim(&self) -> ReclaimReport {
        self.reclaim_matching(TAG_PREFIX)
    }

    /// [`Vmm::reclaim`] limited to resources whose tag starts with `prefix` (`bvm-...`).
    pub fn reclaim_matching(&self, prefix: &str) -> ReclaimReport {
        let chroots = match &self.config.driver {
            Driver::Firecracker(fc) => fc.jail_dir(),
            Driver::Qemu(qemu) => qemu.jail_dir(),
        };
        reclaim::reclaim(
            self.host.as_ref(),
            &reclaim::ReclaimScope {
                prefix,
                work_root: &self.config.work_root,
                jail_dir: Some(&chroots),
            },
        )
    }
}

/// Kills a running VM from another task while one waits on it.
#[derive(Debug, Clone)]
pub struct KillHandle {
    process: Arc<Process>,
    stop: Arc<Mutex<Option<Stop>>>,
}

impl KillHandle {
    /// Sends SIGKILL; the waiter's [`VmExit`] then says `Killed`.
    pub fn kill(&self) -> Result<(), VmError> {
        self.stop
            .lock()
            .expect("stop lock")
            .get_or_insert(Stop::Killed);
        self.process
            .signal(libc::SIGKILL)
            .map_err(|source| VmError::Process {
                pid: self.process.pid(),
                source,
            })
    }
}

/// A started VM. Dropping it without [`Vm::cleanup`] leaves everything running (what a crash
/// does); [`Vmm::reclaim`] finds it again.
#[derive(Debug)]
pub struct Vm {
    tag: String,
    work_dir: PathBuf,
    cmdline: String,
    addresses: Option<VmAddresses>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    launched: Launched,
    /// How this VMM tells a guest panic.
    panic: PanicSignal,
    stop: Arc<Mutex<Option<Stop>>>,
    exit: Option<VmExit>,
    cleanup: CleanupStack,
}

impl Vm {
    /// `bvm-<id>`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn pid(&self) -> i32 {
        self.launched.process.pid()
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The kernel command line the VM was booted with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The guest's console as it is being written (follow it for live logs).
    pub fn console_log(&self) -> &Path {
        &self.launched.console_log
    }

    /// The VMM's own logs in the work dir, complete once it has exited (and gone with
    /// [`Vm::cleanup`]): its log ([`VmExit::vmm_log`]) and, under Firecracker, the jailer's
    /// output.
    pub fn vmm_logs(&self) -> Vec<&Path> {
        std::iter::once(self.launched.vmm_log.as_path())
            .chain(self.launched.jailer_log.as_deref())
            .collect()
    }

    pub fn addresses(&self) -> Option<&VmAddresses> {
        self.addresses.as_ref()
    }

    /// Firecracker's API socket (`None` under QEMU).
    pub fn api_socket(&self) -> Option<&Path> {
        self.launched.api_socket.as_deref()
    }

    /// Firecracker's metrics file as it is being written (`None` under QEMU); flush it with
    /// `PUT /actions {"action_type": "FlushMetrics"}` on [`Vm::api_socket`].
    pub fn metrics_file(&self) -> Option<&Path> {
        self.launched.metrics.as_deref()
    }

    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            process: self.launched.process.clone(),
            stop: self.stop.clone(),
        }
    }

    /// Waits until the VMM exits, killing it at the spec's timeout; then collects its files into
    /// the work dir and says why it ended. Cancel-safe; later calls return the same exit.
    pub async fn wait(&mut self) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        let process = self.launched.process.clone();
        let error = |source| VmError::Process {
            pid: process.pid(),
            source,
        };
        let status = tokio::select! {
            status = process.wait() => status.map_err(error)?,
            () = tokio::time::sleep_until(self.deadline.into()) => {
                self.stop.lock().expect("stop lock").get_or_insert(Stop::TimedOut(self.timeout));
                process.signal(libc::SIGKILL).map_err(error)?;
                process.wait().await.map_err(error)?
            }
        };
        for (from, to) in &self.launched.collect {
            if let Err(e) = std::fs::copy(from, to) {
                tracing::debug!(from = %from.display(), error = %e, "VMM file not collected");
            }
        }
        let console_log = match self.launched.collect.first() {
            Some((_, to)) if to.exists() => to.clone(),
            _ => self.launched.console_log.clone(),
        };
        let stop = *self.stop.lock().expect("stop lock");
        let exit = VmExit {
            cause: classify(status, stop, &self.panic, &self.launched.vmm_log),
            vmm_exit_code: match status {
                crate::process::ProcessExit::Code(code) => Some(code),
                _ => None,
            },
            console_log,
            vmm_log: self.launched.vmm_log.clone(),
            runtime: self.started.elapsed(),
        };
        tracing::info!(vm = %self.tag, cause = ?exit.cause, "VM exited");
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    /// Kills the VM and waits for it.
    pub async fn kill(&mut self) -> Result<VmExit, VmError> {
        if self.exit.is_none() {
            self.kill_handle().kill()?;
        }
        self.wait().await
    }

    /// Runs the cleanup stack: kills the VMM if still running, removes the chroot, cgroups,
    /// network, disks and work dir. Every failure is reported; none stops the rest.
    pub async fn cleanup(mut self) -> Result<(), CleanupErrors> {
        let mut stack = std::mem::take(&mut self.cleanup);
        tokio::task::spawn_blocking(move || stack.run())
            .await
            .expect("the cleanup task does not panic")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.cleanup.is_empty() {
            tracing::warn!(vm = %self.tag, steps = self.cleanup.len(),
                "VM dropped without cleanup; reclaim will find its leftovers");
        }
    }
}
