//! The node agent's view of a builder VM: a [`Launcher`] starts one from a [`LaunchSpec`] and
//! hands back a [`RunningVm`] to wait on, kill and clean up. Every host side effect of a VM
//! (processes, TAPs, netns, cgroups, work dirs) sits behind these traits, so the scheduler and
//! supervisor are the same code whichever VMM (or test double) is underneath.
//!
//! The VM-facing routes ([`VmRoutes`]: the guest's report and logs, uploaded sources) are
//! served to each VM on an address of its own while it runs ([`VmListener`]), bound by the
//! launcher, which alone knows where the VM reaches the host, within per-listener connection
//! and time limits ([`VmListenerLimits`]).

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
    /// The build's fork of its cache key's disk ([`builder_cache::CacheFork`]), attached
    /// read-write; `None`: the build runs without a cache.
    pub cache_disk: Option<PathBuf>,
    /// The upstream registries the node mirrors ([`crate::mirror`]): the VM's connections to
    /// them are redirected to its VM-facing listener.
    pub registry_redirects: Vec<std::net::SocketAddrV4>,
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

/// The limits of each VM-facing listener, so that one VM flooding its own listener cannot
/// starve another VM's or the operator API: at most `max_connections` served at once (one more
/// is closed as soon as it is accepted), `header_timeout` to send a request's headers (and
/// between requests of a kept-alive connection), `idle_timeout` without a byte read or
/// written. Request bodies are limited by the routes ([`crate::api::vm_router`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmListenerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl VmListenerLimits {
    /// `vm_max_connections`, `vm_header_timeout_s`, `vm_idle_timeout_s`.
    pub fn of(config: &crate::config::Config) -> Self {
        VmListenerLimits {
            max_connections: config.vm_max_connections,
            header_timeout: Duration::from_secs(config.vm_header_timeout_s),
            idle_timeout: Duration::from_secs(config.vm_idle_timeout_s),
        }
    }
}

/// The kernel's queue of connections not yet accepted, per VM listener.
const VM_LISTEN_BACKLOG: u32 = 64;
/// The most a VM connection buffers of a request's head (hyper's own minimum is 8 KiB).
const VM_MAX_BUF_BYTES: usize = 64 << 10;
/// How long the accept loop waits after an accept error (out of descriptors, say).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The routes a builder VM uses (see [`crate::api::vm_router`]), to be served to one VM.
#[derive(Clone)]
pub struct VmRoutes {
    router: axum::Router,
    limits: VmListenerLimits,
}

impl std::fmt::Debug for VmRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRoutes")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl VmRoutes {
    pub fn new(router: axum::Router, limits: VmListenerLimits) -> Self {
        VmRoutes { router, limits }
    }

    /// Serves the routes on `addr` until the answer is dropped, within [`VmListenerLimits`].
    /// The address need not exist yet (`IP_FREEBIND`): a launcher binds before the VM's
    /// network is made, so the listener is there before the VM can call.
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
        let listener = socket.listen(VM_LISTEN_BACKLOG)?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, self.router.clone(), self.limits));
        Ok(VmListener { addr, task })
    }
}

/// Accepts the VM's connections for as long as the task runs; each is served on a task of the
/// loop's own [`tokio::task::JoinSet`], so aborting the loop ends them too.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: VmListenerLimits,
) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "the VM-facing listener cannot accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the cap: reset at once, so the flood costs the VM, not this node.
            let _ = stream.set_zero_linger();
            drop(stream);
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max_connections = limits.max_connections,
                    "a VM opens more connections than its listener serves; closed"
                );
            }
            tokio::task::yield_now().await;
            continue;
        };
        let router = router.clone();
        connections.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
            let service = hyper_util::service::TowerToHyperService::new(router);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(VM_MAX_BUF_BYTES)
                .serve_connection(io, service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "a VM connection ended");
            }
            drop(permit);
        });
    }
}

/// A connection that fails with [`std::io::ErrorKind::TimedOut`] once neither a read nor a
/// write has made progress for its timeout: a VM that stops reading its answer or sending its
/// body does not keep a connection forever.
struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// The outcome of polling the inner stream: progress moves the deadline, waiting checks it.
    fn after<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        match polled {
            Poll::Ready(result) => {
                let next = tokio::time::Instant::now() + self.timeout;
                self.deadline.as_mut().reset(next);
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no byte read or written in {:?}", self.timeout),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        this.after(cx, polled)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after(cx, polled)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.after(cx, polled)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_shutdown(cx);
        this.after(cx, polled)
    }
}

/// The VM-facing routes served to one VM; dropping it stops listening and ends its connections.
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
