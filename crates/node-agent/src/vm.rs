//! The node agent's view of a builder VM: a [`Launcher`] starts one from a [`LaunchSpec`] and
//! hands back a [`RunningVm`] to wait on, kill and clean up. Every host side effect of a VM
//! (processes, TAPs, netns, cgroups, work dirs) sits behind these traits, so the scheduler and
//! supervisor are the same code whichever VMM (or test double) is underneath.
//!
//! The VM-facing routes ([`VmRoutes`]: the guest's report and logs, uploaded sources) are
//! served to each VM on an address of its own while it runs ([`VmListener`]), bound by the
//! launcher, which alone knows where the VM reaches the host.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use builder_contract::{BuildParams, Secrets};
use builder_vmm::firecracker::metrics::MetricsTotals;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Kernel arguments every builder VM boots with, before the build parameters. Requests are
/// checked against the command-line limit with these in front.
pub const BASE_BOOT_ARGS: &str = builder_vmm::DEFAULT_BOOT_ARGS;

/// Room kept on the kernel command line for what the VMM layer adds after the boot arguments:
/// the guest's `ip=` (at most 95 bytes with two resolvers) and, under QEMU/TCG,
/// `tsc_early_khz=`.
pub const VMM_ADDED_ARGS_BYTES: usize = 128;

/// `boot_args` followed by a placeholder as long as [`VMM_ADDED_ARGS_BYTES`]: the base a build's
/// parameters are measured against ([`builder_contract::BuildParams::split_kernel_cmdline`]), so
/// what the VMM layer adds cannot push them over the limit.
pub fn cmdline_budget_base(boot_args: &str) -> String {
    format!("{boot_args} {}", "x".repeat(VMM_ADDED_ARGS_BYTES - 1))
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start the builder VM of build {build_id}")]
    Launch {
        build_id: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot wait for the builder VM of build {build_id}")]
    Wait {
        build_id: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot kill the builder VM of build {build_id}")]
    Kill {
        build_id: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot clean up after the builder VM of build {build_id}")]
    Cleanup {
        build_id: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot reclaim what a previous run left behind")]
    Reclaim(#[source] BoxError),
}

/// Everything needed to start one build's VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub build_id: String,
    /// Goes on the kernel command line (after [`Launcher::boot_args`]); without build args when
    /// they did not fit, which are then in `secrets.build_args`.
    pub params: BuildParams,
    /// Goes on the read-only config drive, never on the command line.
    pub secrets: Secrets,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disk_gib: u32,
    /// Host CPUs the VM is pinned to (one per vCPU, from the node's allocator).
    pub cpus: Vec<u32>,
    pub egress_allow: Vec<String>,
    /// Where the serial console is written; it outlives the VM's work dir.
    pub console_log: PathBuf,
    /// Where the VMM's own logs are kept once the VM is gone (the launcher writes it at
    /// cleanup, before the VM's work dir goes).
    pub vmm_log: PathBuf,
    /// The VM-facing routes, to serve on the address the VM reaches the host at while it runs
    /// ([`VmRoutes::serve`], then [`point_at_host`]); `None` when `callback_url` names where
    /// the VMs reach this node.
    pub vm_routes: Option<VmRoutes>,
    /// The build's time limit; the supervisor enforces it, a launcher may add a backstop.
    pub timeout: Duration,
}

/// The routes a builder VM uses (see [`crate::api::vm_router`]), to be served to one VM.
#[derive(Clone)]
pub struct VmRoutes(axum::Router);

impl std::fmt::Debug for VmRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmRoutes")
    }
}

impl VmRoutes {
    pub fn new(router: axum::Router) -> Self {
        VmRoutes(router)
    }

    /// Serves the routes on `addr` until the answer is dropped. The address need not exist
    /// yet (`IP_FREEBIND`): a launcher binds before the VM's network is made, so the listener
    /// is there before the VM can call.
    pub fn serve(&self, addr: SocketAddr) -> std::io::Result<VmListener> {
        use std::os::fd::AsRawFd;
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor, and a pointer to an int that outlives the call,
        // with its size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_FREEBIND,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.bind(addr)?;
        let listener = socket.listen(64)?;
        let addr = listener.local_addr()?;
        let router = self.0.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!(%addr, error = %e, "the VM-facing listener failed");
            }
        });
        Ok(VmListener { addr, task })
    }
}

/// The VM-facing routes served to one VM; dropping it stops listening.
#[derive(Debug)]
pub struct VmListener {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl VmListener {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for VmListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Points the URLs of `params` that name this host (loopback, the wildcard address,
/// `localhost`) at `host`: the report URL, and an uploaded source's URL when it is served on
/// the report URL's port; both get `port` when given (the VM-facing listener's). Returns the
/// port the VM must be let through to on `host`, when the report URL names this host.
pub fn point_at_host(params: &mut BuildParams, host: IpAddr, port: Option<u16>) -> Option<u16> {
    let is_local = |url: &url::Url| match url.host_str().and_then(|h| h.parse::<IpAddr>().ok()) {
        Some(ip) => ip.is_loopback() || ip.is_unspecified(),
        None => url.host_str() == Some("localhost"),
    };
    let url = params.notify_url.as_mut().filter(|url| is_local(url))?;
    let original_port = url.port_or_known_default();
    let point = |url: &mut url::Url| {
        let _ = url.set_host(Some(&host.to_string()));
        if let Some(port) = port {
            let _ = url.set_port(Some(port));
        }
        url.port_or_known_default()
    };
    let host_port = point(url);
    if is_local(&params.repo_url) && params.repo_url.port_or_known_default() == original_port {
        point(&mut params.repo_url);
    }
    host_port
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// The VMM's exit status, when it exited (not killed by a signal).
    pub code: Option<i32>,
    /// A sentence for logs and error messages (`exited with status 0`, `killed by signal 9`).
    pub description: String,
}

/// One started VM. Dropping it without [`RunningVm::cleanup`] leaves host state behind for the
/// next start's reclaim.
pub trait RunningVm: Send {
    /// The VMM process id.
    fn pid(&self) -> Option<u32>;
    /// Resolves when the VMM process has exited.
    fn wait(&mut self) -> BoxFuture<'_, Result<VmExit, VmError>>;
    /// Kills the VMM now.
    fn kill(&mut self) -> BoxFuture<'_, Result<(), VmError>>;
    /// Removes everything the VM created on the host, last created first.
    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), VmError>>;
}

/// One readiness check of `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Check {
            name: name.to_string(),
            ok,
            detail: detail.into(),
        }
    }
}

/// Starts builder VMs on this host.
pub trait Launcher: Send + Sync {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Box<dyn RunningVm>, VmError>>;
    /// The kernel arguments before the build parameters (the VMM layer then adds up to
    /// [`VMM_ADDED_ARGS_BYTES`]); build args that do not fit after them go to the config drive.
    fn boot_args(&self) -> &str {
        BASE_BOOT_ARGS
    }
    /// Removes what a crashed previous run left (VMs, TAPs, netns, cgroups, work dirs) and says
    /// how many things it removed.
    fn reclaim(&self) -> BoxFuture<'_, Result<u64, VmError>>;
    /// Whether a VM could be launched now (binaries, kernel, image, KVM or TCG).
    fn readiness(&self) -> Vec<Check>;
    /// The VMM and its acceleration, as the `vmm` and `accel` labels of
    /// `node_agent_vmm_info`: (`qemu` or `firecracker`, `kvm` or `tcg`); `None` for a launcher
    /// without a VMM.
    fn vmm_info(&self) -> Option<(&'static str, &'static str)> {
        None
    }
    /// The VMM's own counters for each running VM, by build id: Firecracker's metrics files
    /// (none under QEMU, which writes no such file). Reads files: call off the async runtime.
    fn vmm_metrics(&self) -> Vec<(String, MetricsTotals)>;
}
