//! The [`Launcher`] over the `builder-vmm` layer: turns a [`LaunchSpec`] into a [`VmSpec`]
//! (scratch disk, config drive with the secrets, network slot, egress rules, CPU pinning, the
//! VM-facing listener on the host end of the VM's veth and the URLs pointing at it) and a
//! started VM into a [`RunningVm`], which keeps the console and the VMM's logs when it goes.
//!
//! Every VM this node starts is tagged `bvm-<node tag>-<build id>`, the node tag being derived
//! from the node id, so the reclaim at start removes this node's leftovers and never another
//! node agent's (or another program's) VMs on the same host.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder_vmm::firecracker::metrics::MetricsTotals;
use builder_vmm::qemu::{KvmProbe, ACCEL_ENV};
use builder_vmm::{
    Accel, AddressPool, CpuSet, Driver, EgressPolicy, EgressRule, FirecrackerConfig, IdRange,
    NetworkSpec, QemuConfig, Vm, VmSpec, Vmm, VmmConfig, DEFAULT_BOOT_ARGS, TAG_PREFIX,
};
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::config::{Config, VmmKind};
use crate::vm::{
    point_at_host, Check, LaunchSpec, Launcher, RunningVm, VmError, VmExit, VmListener,
};

/// How long past the build's own timeout the VMM layer's backstop kills a VM.
const BACKSTOP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot find the VMM binaries")]
    Locate(#[source] builder_vmm::LocateError),
    #[error("cannot read the image manifest {path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the image manifest {path} is not valid")]
    ManifestJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The part of `builder-vm.json` (written by `make builder-vm` beside the rootfs) the node
/// agent reads: where the image's init is.
#[derive(Debug, serde::Deserialize)]
struct Manifest {
    agent_path: String,
}

/// The VMM layer's boot arguments, plus `init=` the image's agent when the rootfs has a
/// manifest beside it; `boot_args` from the config replaces both.
fn boot_args(config: &Config) -> Result<String, SetupError> {
    if let Some(args) = &config.boot_args {
        return Ok(args.clone());
    }
    let path = config.rootfs.with_file_name("builder-vm.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(DEFAULT_BOOT_ARGS.to_string())
        }
        Err(source) => return Err(SetupError::Manifest { path, source }),
    };
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| SetupError::ManifestJson { path, source })?;
    Ok(format!("{DEFAULT_BOOT_ARGS} init={}", manifest.agent_path))
}

/// The builder-vmm driver for this host.
pub struct VmmLauncher {
    vmm: Vmm,
    kernel: PathBuf,
    rootfs: PathBuf,
    /// `<node tag>-`: the start of every VM id of this node.
    id_prefix: String,
    pool: AddressPool,
    slots: Arc<Mutex<BTreeSet<u32>>>,
    dns: Vec<Ipv4Addr>,
    /// `vm_egress_allow_private`: what every VM may reach although private.
    allow_private: Vec<EgressRule>,
    choice: VmmChoice,
    boot_args: String,
}

/// The VMM this node runs its builder VMs with: `vmm` resolved ([`choose_vmm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmChoice {
    /// [`VmmKind::Qemu`] or [`VmmKind::Firecracker`], never `Auto`.
    pub vmm: VmmKind,
    /// [`Accel::Kvm`] or [`Accel::Tcg`] (emulated), never `Auto`.
    pub accel: Accel,
    /// Why `vmm = "auto"` chose it; `None` when the config named the VMM.
    pub auto_because: Option<String>,
}

impl VmmChoice {
    /// The `vmm` and `accel` labels: `qemu`/`firecracker`, `kvm`/`tcg`.
    pub fn labels(&self) -> (&'static str, &'static str) {
        let vmm = match self.vmm {
            VmmKind::Firecracker => "firecracker",
            _ => "qemu",
        };
        (vmm, self.accel.name())
    }

    /// `firecracker, kvm`, `qemu, kvm` or `qemu, tcg (emulated)`, and why when auto chose it.
    pub fn describe(&self) -> String {
        let (vmm, accel) = self.labels();
        let emulated = if self.accel == Accel::Tcg {
            " (emulated)"
        } else {
            ""
        };
        match &self.auto_because {
            Some(why) => format!("{vmm}, {accel}{emulated}; vmm = auto: {why}"),
            None => format!("{vmm}, {accel}{emulated}"),
        }
    }
}

/// Resolves `vmm` from what the host offers, without touching it: under `auto`, Firecracker
/// (with KVM) when `/dev/kvm` is usable and Firecracker and its jailer were found
/// (`firecracker` is `Err(why not)` otherwise), else QEMU under TCG (KVM only when
/// [`ACCEL_ENV`] says `kvm`); [`ACCEL_ENV`]`=tcg` makes `auto` QEMU under TCG whatever KVM does.
/// A named VMM is kept: Firecracker always with KVM, QEMU with the accelerator asked for
/// (`auto`: KVM when usable).
pub fn choose_vmm(
    requested: VmmKind,
    accel: Accel,
    kvm: &KvmProbe,
    firecracker: &Result<(), String>,
) -> VmmChoice {
    let named = |vmm, accel| VmmChoice {
        vmm,
        accel,
        auto_because: None,
    };
    let qemu_accel = |fallback| match accel {
        Accel::Auto => fallback,
        forced => forced,
    };
    match requested {
        VmmKind::Firecracker => named(VmmKind::Firecracker, Accel::Kvm),
        VmmKind::Qemu => named(
            VmmKind::Qemu,
            qemu_accel(if kvm.is_usable() {
                Accel::Kvm
            } else {
                Accel::Tcg
            }),
        ),
        VmmKind::Auto => {
            let (vmm, accel, why) = match (accel, kvm, firecracker) {
                (Accel::Tcg, _, _) => (VmmKind::Qemu, Accel::Tcg, format!("{ACCEL_ENV}=tcg")),
                (_, KvmProbe::Unusable(why), _) => {
                    (VmmKind::Qemu, qemu_accel(Accel::Tcg), why.clone())
                }
                (_, KvmProbe::Usable, Err(why)) => (
                    VmmKind::Qemu,
                    qemu_accel(Accel::Tcg),
                    format!("KVM is usable but {why}"),
                ),
                (_, KvmProbe::Usable, Ok(())) => (
                    VmmKind::Firecracker,
                    Accel::Kvm,
                    "KVM is usable and Firecracker is installed".to_string(),
                ),
            };
            VmmChoice {
                vmm,
                accel,
                auto_because: Some(why),
            }
        }
    }
}

/// Builds the launcher the config asks for (`vmm`, [`ACCEL_ENV`]; [`choose_vmm`]).
pub fn launcher(config: &Config) -> Result<Arc<dyn Launcher>, SetupError> {
    let accel = Accel::from_env().map_err(|e| {
        SetupError::Locate(builder_vmm::LocateError::Config {
            reason: e.to_string(),
        })
    })?;
    let firecracker = FirecrackerConfig::from_env(
        config.work_dir.join("jail"),
        config.jailer_uid,
        config.jailer_gid,
    );
    let found = firecracker.as_ref().map(drop).map_err(ToString::to_string);
    let choice = choose_vmm(config.vmm, accel, &KvmProbe::run(), &found);
    launcher_with(config, choice, firecracker)
}

/// The launcher of `choice`, with Firecracker's configuration when it was found.
fn launcher_with(
    config: &Config,
    choice: VmmChoice,
    firecracker: Result<FirecrackerConfig, builder_vmm::LocateError>,
) -> Result<Arc<dyn Launcher>, SetupError> {
    let driver = match choice.vmm {
        VmmKind::Firecracker => Driver::Firecracker(firecracker.map_err(SetupError::Locate)?),
        _ => Driver::Qemu(QemuConfig {
            accel: choice.accel,
            chroot_base: config.work_dir.join("jail"),
            ids: IdRange {
                uid_base: config.qemu_uid_base,
                gid_base: config.qemu_gid_base,
                count: config.vm_network.slots(),
            },
            ..QemuConfig::from_env().map_err(SetupError::Locate)?
        }),
    };
    tracing::info!(vmm = %choice.describe(), "VMM chosen");
    let pool = config.vm_network;
    let digest = Sha256::digest(config.node_id.as_bytes());
    Ok(Arc::new(VmmLauncher {
        vmm: Vmm::new(VmmConfig {
            work_root: config.vms_dir(),
            pool,
            driver,
        }),
        kernel: config.kernel.clone(),
        rootfs: config.rootfs.clone(),
        id_prefix: format!("{}-", &hex::encode(digest)[..8]),
        pool,
        slots: Arc::default(),
        dns: config.vm_dns.clone(),
        allow_private: config.vm_egress_allow_private.clone(),
        choice,
        boot_args: boot_args(config)?,
    }))
}

fn boxed(build_id: &str, e: impl std::error::Error + Send + Sync + 'static) -> VmError {
    VmError::Launch {
        build_id: build_id.to_string(),
        source: Box::new(e),
    }
}

#[derive(Debug, thiserror::Error)]
enum LaunchError {
    #[error("all {slots} network slots of {pool} are in use")]
    NoSlot { slots: u32, pool: AddressPool },
    #[error("{field} = {value} is more than the VMM accepts")]
    TooBig { field: &'static str, value: u64 },
    #[error("cannot serve the VM-facing routes on {addr}")]
    VmListener {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot link the console log {link} to {target}")]
    Console {
        link: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl VmmLauncher {
    fn take_slot(&self) -> Option<u32> {
        let mut used = self.slots.lock().expect("slot lock");
        let slot = (0..self.pool.slots()).find(|s| !used.contains(s))?;
        used.insert(slot);
        Some(slot)
    }

    async fn start(
        &self,
        spec: LaunchSpec,
        slot: u32,
    ) -> Result<(Vm, Option<VmListener>), VmError> {
        let id = spec.build_id.clone();
        let addresses = self.pool.addresses(slot).map_err(|e| boxed(&id, e))?;
        let host = IpAddr::V4(addresses.host_veth);
        let mut params = spec.params;
        // The VM-facing routes, on the host end of the VM's veth, bound before the VM exists.
        let listener = match (&spec.vm_routes, &params.notify_url) {
            (Some(routes), Some(url)) => {
                let addr =
                    std::net::SocketAddr::new(host, url.port_or_known_default().unwrap_or(80));
                let listener = routes
                    .serve(addr)
                    .map_err(|source| boxed(&id, LaunchError::VmListener { addr, source }))?;
                Some(listener)
            }
            _ => None,
        };
        // A callback on loopback or the wildcard address is this host: from inside the VM that
        // is the host end of its veth. So is a source uploaded to this node agent, served on
        // the same port (`node-agent submit DIR`).
        let host_port = point_at_host(
            &mut params,
            host,
            listener.as_ref().map(|l| l.addr().port()),
        );
        let allow = spec
            .egress_allow
            .iter()
            .map(|r| r.parse::<EgressRule>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| boxed(&id, e))?;
        let too_big = |field, value| boxed(&id, LaunchError::TooBig { field, value });
        let vm_spec = VmSpec {
            id: format!("{}{}", self.id_prefix, spec.build_id),
            kernel: self.kernel.clone(),
            rootfs: self.rootfs.clone(),
            scratch_mib: u64::from(spec.disk_gib) * 1024,
            secrets: Some(spec.secrets),
            cache_disk: spec.cache_disk.clone(),
            vcpus: u8::try_from(spec.vcpus).map_err(|_| too_big("vcpus", u64::from(spec.vcpus)))?,
            mem_mib: u32::try_from(spec.mem_mib).map_err(|_| too_big("mem_mib", spec.mem_mib))?,
            boot_args: self.boot_args.clone(),
            params: Some(params),
            network: Some(NetworkSpec {
                slot,
                egress: EgressPolicy {
                    host_port,
                    allow: (!allow.is_empty()).then_some(allow),
                    allow_private: self.allow_private.clone(),
                    redirect_to_host: spec.registry_redirects.clone(),
                },
                dns: self.dns.clone(),
            }),
            timeout: spec.timeout + BACKSTOP,
            cpus: (!spec.cpus.is_empty()).then(|| CpuSet::new(spec.cpus.clone())),
        };
        let vm = self.vmm.start(vm_spec).await.map_err(|e| boxed(&id, e))?;
        let _ = std::fs::remove_file(&spec.console_log);
        if let Err(source) = std::os::unix::fs::symlink(vm.console_log(), &spec.console_log) {
            let error = LaunchError::Console {
                link: spec.console_log.clone(),
                target: vm.console_log().to_path_buf(),
                source,
            };
            let mut vm = vm;
            let _ = vm.kill().await;
            let _ = vm.cleanup().await;
            return Err(boxed(&id, error));
        }
        Ok((vm, listener))
    }
}

impl Launcher for VmmLauncher {
    fn boot_args(&self) -> &str {
        &self.boot_args
    }

    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<Box<dyn RunningVm>, VmError>> {
        Box::pin(async move {
            let Some(slot) = self.take_slot() else {
                return Err(boxed(
                    &spec.build_id,
                    LaunchError::NoSlot {
                        slots: self.pool.slots(),
                        pool: self.pool,
                    },
                ));
            };
            let build_id = spec.build_id.clone();
            let console_log = spec.console_log.clone();
            let vmm_log = spec.vmm_log.clone();
            match self.start(spec, slot).await {
                Ok((vm, listener)) => Ok(Box::new(BuilderVm {
                    build_id,
                    vm,
                    console_log,
                    vmm_log,
                    listener,
                    slot,
                    slots: self.slots.clone(),
                }) as Box<dyn RunningVm>),
                Err(e) => {
                    self.slots.lock().expect("slot lock").remove(&slot);
                    Err(e)
                }
            }
        })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<u64, VmError>> {
        Box::pin(async move {
            let prefix = format!("{TAG_PREFIX}{}", self.id_prefix);
            let vmm = self.vmm.clone();
            let report = tokio::task::spawn_blocking(move || vmm.reclaim_matching(&prefix))
                .await
                .map_err(|e| VmError::Reclaim(Box::new(e)))?;
            for error in &report.errors {
                tracing::warn!(error, "reclaim could not remove something");
            }
            Ok(report.total() as u64)
        })
    }

    fn readiness(&self) -> Vec<Check> {
        let file = |name: &str, path: &Path| match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Check::new(
                name,
                true,
                format!("{} ({} bytes)", path.display(), m.len()),
            ),
            Ok(_) => Check::new(name, false, format!("{} is not a file", path.display())),
            Err(e) => Check::new(name, false, format!("{}: {e}", path.display())),
        };
        // QEMU opens the kernel and the rootfs as the VM's own uid.
        let qemu = matches!(self.vmm.config().driver, Driver::Qemu(_));
        let image = |name: &str, path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() && qemu && m.permissions().mode() & 0o004 == 0 => Check::new(
                    name,
                    false,
                    format!(
                        "{} is not readable by other users, and QEMU opens it as the VM's uid",
                        path.display()
                    ),
                ),
                _ => file(name, path),
            }
        };
        let mut checks = vec![image("kernel", &self.kernel), image("rootfs", &self.rootfs)];
        match &self.vmm.config().driver {
            Driver::Qemu(q) => checks.push(file("qemu", &q.qemu_bin)),
            Driver::Firecracker(f) => {
                checks.push(file("firecracker", &f.firecracker_bin));
                checks.push(file("jailer", &f.jailer_bin));
            }
        }
        if self.choice.accel == Accel::Kvm {
            let kvm = KvmProbe::run();
            let detail = match &kvm {
                KvmProbe::Usable => "/dev/kvm is usable".to_string(),
                KvmProbe::Unusable(why) => why.clone(),
            };
            checks.push(Check::new("kvm", kvm.is_usable(), detail));
        }
        checks.push(Check::new("vmm", true, self.choice.describe()));
        // Every VM network is set up with these (namespace firewall, host NAT rules).
        for tool in ["nft", "iptables-restore"] {
            let found = builder_vmm::vm::find_on_path(tool);
            checks.push(Check::new(
                tool,
                found.is_some(),
                found.map_or_else(
                    || format!("`{tool}` is not on PATH; VM networks need it"),
                    |path| path.display().to_string(),
                ),
            ));
        }
        checks
    }

    fn vmm_info(&self) -> Option<(&'static str, &'static str)> {
        Some(self.choice.labels())
    }

    fn vmm_metrics(&self) -> Vec<(String, MetricsTotals)> {
        let prefix = format!("{TAG_PREFIX}{}", self.id_prefix);
        let mut found = Vec::new();
        for (tag, totals) in self.vmm.metrics_matching(&prefix) {
            let build_id = tag[prefix.len()..].to_string();
            match totals {
                Ok(totals) => found.push((build_id, totals)),
                Err(error) => tracing::warn!(build_id, error = %error, "VM metrics not read"),
            }
        }
        found
    }
}

/// Concatenates the VMM's logs into `to`, each under a line naming it; a log the VMM never
/// wrote is left out.
fn keep_vmm_logs(logs: &[&Path], to: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::fs::File::create(to)?;
    for log in logs {
        let Ok(mut from) = std::fs::File::open(log) else {
            continue;
        };
        let name = log.file_name().unwrap_or_default().to_string_lossy();
        writeln!(out, "--- {name} ---")?;
        std::io::copy(&mut from, &mut out)?;
    }
    Ok(())
}

struct BuilderVm {
    build_id: String,
    vm: Vm,
    console_log: PathBuf,
    /// Where the VMM's logs are kept ([`LaunchSpec::vmm_log`]).
    vmm_log: PathBuf,
    /// The VM-facing routes on the host end of the VM's veth, until cleanup.
    listener: Option<VmListener>,
    slot: u32,
    slots: Arc<Mutex<BTreeSet<u32>>>,
}

fn exit_of(exit: builder_vmm::VmExit) -> VmExit {
    let description = match &exit.cause {
        builder_vmm::ExitCause::GuestShutdown => "shut down".to_string(),
        builder_vmm::ExitCause::GuestPanic => "kernel panicked".to_string(),
        builder_vmm::ExitCause::VmmFailed { code } => format!("VMM exited with status {code}"),
        builder_vmm::ExitCause::VmmCrashed { signal } => {
            format!("VMM was killed by signal {signal}")
        }
        builder_vmm::ExitCause::VmmGone => "VMM disappeared".to_string(),
        builder_vmm::ExitCause::Killed => "was killed".to_string(),
        builder_vmm::ExitCause::TimedOut { after_s } => {
            format!("ran past the VMM's {after_s} s backstop")
        }
    };
    VmExit {
        code: exit.vmm_exit_code,
        description,
    }
}

impl RunningVm for BuilderVm {
    fn pid(&self) -> Option<u32> {
        u32::try_from(self.vm.pid()).ok()
    }

    fn wait(&mut self) -> BoxFuture<'_, Result<VmExit, VmError>> {
        Box::pin(async move {
            self.vm
                .wait()
                .await
                .map(exit_of)
                .map_err(|e| VmError::Wait {
                    build_id: self.build_id.clone(),
                    source: Box::new(e),
                })
        })
    }

    fn kill(&mut self) -> BoxFuture<'_, Result<(), VmError>> {
        Box::pin(async move {
            self.vm.kill().await.map(|_| ()).map_err(|e| VmError::Kill {
                build_id: self.build_id.clone(),
                source: Box::new(e),
            })
        })
    }

    /// Keeps the console (the link becomes a copy) and the VMM's logs (one file, each under a
    /// line naming it), stops the VM-facing listener and removes everything else.
    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), VmError>> {
        Box::pin(async move {
            let BuilderVm {
                build_id,
                mut vm,
                console_log,
                vmm_log,
                listener,
                slot,
                slots,
            } = *self;
            drop(listener);
            let exit = vm.kill().await.ok();
            let source = exit.map_or_else(|| vm.console_log().to_path_buf(), |e| e.console_log);
            let _ = std::fs::remove_file(&console_log);
            if let Err(e) = std::fs::copy(&source, &console_log) {
                tracing::warn!(build_id, error = %e, from = %source.display(), "console log not kept");
            }
            if let Err(e) = keep_vmm_logs(&vm.vmm_logs(), &vmm_log) {
                tracing::warn!(build_id, error = %e, to = %vmm_log.display(), "VMM logs not kept");
            }
            let result = vm.cleanup().await;
            slots.lock().expect("slot lock").remove(&slot);
            result.map_err(|e| VmError::Cleanup {
                build_id,
                source: Box::new(e),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_firecracker_where_kvm_works_and_it_is_installed_else_qemu_under_tcg() {
        let usable = KvmProbe::Usable;
        let no_kvm = KvmProbe::Unusable("/dev/kvm: No such file or directory (os error 2)".into());
        let found = Ok(());
        let missing = Err("`firecracker` is not on PATH".to_string());
        let choose = |requested, accel, kvm: &KvmProbe, fc: &Result<(), String>| {
            let c = choose_vmm(requested, accel, kvm, fc);
            ((c.vmm, c.accel), c.describe())
        };
        use Accel::{Auto, Kvm, Tcg};
        use VmmKind::{Firecracker, Qemu};
        assert_eq!(
            choose(VmmKind::Auto, Auto, &usable, &found),
            (
                (Firecracker, Kvm),
                "firecracker, kvm; vmm = auto: KVM is usable and Firecracker is installed".into()
            )
        );
        assert_eq!(
            choose(VmmKind::Auto, Auto, &no_kvm, &found),
            (
                (Qemu, Tcg),
                "qemu, tcg (emulated); vmm = auto: /dev/kvm: No such file or directory (os error 2)"
                    .into()
            )
        );
        assert_eq!(
            choose(VmmKind::Auto, Auto, &usable, &missing),
            (
                (Qemu, Tcg),
                "qemu, tcg (emulated); vmm = auto: KVM is usable but `firecracker` is not on PATH"
                    .into()
            )
        );
        // BUILDER_VMM_ACCEL=tcg (a nested KVM that only seems to work): QEMU under TCG.
        assert_eq!(
            choose(VmmKind::Auto, Tcg, &usable, &found),
            (
                (Qemu, Tcg),
                "qemu, tcg (emulated); vmm = auto: BUILDER_VMM_ACCEL=tcg".into()
            )
        );
        // BUILDER_VMM_ACCEL=kvm without Firecracker: QEMU, with KVM as asked.
        assert_eq!(choose(VmmKind::Auto, Kvm, &usable, &missing).0, (Qemu, Kvm));
        // A named VMM is kept.
        assert_eq!(
            choose(Qemu, Auto, &usable, &found),
            ((Qemu, Kvm), "qemu, kvm".into())
        );
        assert_eq!(choose(Qemu, Auto, &no_kvm, &found).0, (Qemu, Tcg));
        assert_eq!(choose(Qemu, Tcg, &usable, &found).0, (Qemu, Tcg));
        assert_eq!(
            choose(Firecracker, Auto, &no_kvm, &missing),
            ((Firecracker, Kvm), "firecracker, kvm".into())
        );
    }

    #[test]
    fn readiness_and_the_info_gauge_name_the_vmm_and_whether_it_is_emulated() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&crate::config::ServeArgs {
            work_dir: Some(dir.path().to_path_buf()),
            vm_dns: Some(vec![Ipv4Addr::new(192, 0, 2, 53)]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.vmm, VmmKind::Auto, "the default");
        let missing = Err(builder_vmm::LocateError::NotFound {
            name: "firecracker",
            env: "FIRECRACKER_BIN",
        });
        let choice = choose_vmm(
            config.vmm,
            Accel::Auto,
            &KvmProbe::Unusable("/dev/kvm: gone".into()),
            &Err("no firecracker".into()),
        );
        for (name, mode) in [("vmlinux", 0o644), ("rootfs.ext4", 0o600)] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"image").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = Config {
            kernel: dir.path().join("vmlinux"),
            rootfs: dir.path().join("rootfs.ext4"),
            ..config
        };
        let launcher = launcher_with(&config, choice, missing).unwrap();
        let checks = launcher.readiness();
        let check = |name: &str| checks.iter().find(|c| c.name == name).unwrap();
        assert!(check("kernel").ok, "{:?}", check("kernel"));
        assert!(!check("rootfs").ok);
        assert!(
            check("rootfs").detail.ends_with(
                "rootfs.ext4 is not readable by other users, and QEMU opens it as the VM's uid"
            ),
            "{:?}",
            check("rootfs")
        );
        let vmm = checks.iter().find(|c| c.name == "vmm").unwrap();
        assert!(vmm.ok);
        assert_eq!(
            vmm.detail,
            "qemu, tcg (emulated); vmm = auto: /dev/kvm: gone"
        );
        assert!(checks.iter().all(|c| c.name != "kvm"), "TCG needs no KVM");
        assert_eq!(launcher.vmm_info(), Some(("qemu", "tcg")));
    }
}
