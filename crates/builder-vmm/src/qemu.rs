//! The QEMU driver: `qemu-system-x86_64 -M microvm` with the same ELF kernel and the same
//! virtio-mmio disks and network as Firecracker, confined as Firecracker's jailer confines
//! Firecracker ([`crate::jail`]): its own uid and gid from [`QemuConfig::ids`], cgroup CPU and
//! memory limits ([`crate::cgroup`], the guest's RAM plus [`QEMU_OVERHEAD_MIB`], plus
//! [`TCG_TB_MIB`] under TCG), the VM's network namespace, a mount namespace chrooted into
//! `<chroot_base>/qemu/<tag>` holding only its kernel and disks (and the read-only system files
//! the binary loads), no capabilities, `no_new_privs`, and QEMU's own seccomp filter
//! (`-sandbox on` denying obsolete calls, privilege changes, spawning and resource control).
//! The TAP is opened here, in the VM's namespace, and handed over as an fd
//! (`-netdev tap,fd=N`): QEMU never needs `/dev/net/tun` nor `CAP_NET_ADMIN`. The serial
//! console is QEMU's stdout, a file of the work dir opened here, so nothing in the jail but
//! the scratch disk and the cache disk is writable by the VM's uid (each handed to it, mode
//! 0600, and bound in place: the cache disk is the caller's file, never copied, and its bind
//! lives only in QEMU's mount namespace, gone with QEMU); `-no-reboot` makes a guest reboot
//! (`reboot=k`) end the process. CPU pinning is the cgroup's `cpuset.cpus`.
//!
//! Acceleration is KVM or TCG, chosen by [`Accel`]; `auto` uses KVM when `/dev/kvm` answers
//! ([`KvmProbe`]). Where KVM is nested and emulated it "works" but crawls, so an operator forces
//! TCG with `BUILDER_VMM_ACCEL=tcg`. Under TCG the kernel is told the TSC frequency
//! (`tsc_early_khz=`), or it stalls calibrating it. More than one vCPU under TCG on a busy 2-core
//! host was seen to livelock; use `vcpus = 1` there.
//!
//! ACPI is on, for the pvpanic device (a guest panic makes QEMU exit 1, see
//! [`crate::exit`]); the virtio-mmio devices are listed there in the order given, so the disks
//! are `vda`, `vdb`, `vdc`, `vdd`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;

use crate::cgroup::{self, CgroupError, CgroupVersion, Joined, PARENT_CGROUP};
use crate::cleanup::{remove_dir_all_if_exists, CleanupStack};
use crate::exit::PanicSignal;
use crate::jail::{self, IdRange, Jail, JailError};
use crate::net::{NetworkPlan, TAP};
use crate::process::Process;
use crate::vm::{locate_binary, DriveFile, LaunchPlan, Launched, LocateError};

/// Environment variable that picks the accelerator (`auto`, `kvm`, `tcg`).
pub const ACCEL_ENV: &str = "BUILDER_VMM_ACCEL";
/// Where [`QemuConfig::from_env`] puts the jails (the node agent uses its work dir).
pub const DEFAULT_CHROOT_BASE: &str = "/var/lib/builder-vmm/jail";
/// The ids [`QemuConfig::from_env`] leases VMs from.
pub const DEFAULT_IDS: IdRange = IdRange {
    uid_base: 2_000_000,
    gid_base: 2_000_000,
    count: 4096,
};
/// Memory allowed to QEMU beyond the guest's RAM: its code, libraries, device emulation and
/// I/O buffers. Measured here: the QEMU of a 256 MiB guest that had just booted its kernel under
/// TCG had 117 MiB resident, 38 MiB of it files (binary, libraries), the rest the guest's pages
/// touched so far and translated code.
pub const QEMU_OVERHEAD_MIB: u64 = 192;
/// TCG's translation cache (`-accel tcg,tb-size=`), added to the memory limit under TCG.
pub const TCG_TB_MIB: u64 = 256;
const CONSOLE_FILE: &str = "console.log";
const LOG_FILE: &str = "qemu.log";
/// The kernel's path in the jail.
const KERNEL: &str = "/vmlinux";
/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_API_VERSION: libc::c_int = 12;

/// Why QEMU could not be started.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("`{value}` is not an accelerator; use auto, kvm or tcg")]
    Accel { value: String },
    #[error("cannot create {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start `{command}`; when a step of its confinement failed, {log} names it")]
    Spawn {
        command: String,
        log: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch QEMU (pid {pid})")]
    Watch {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the TAP {TAP} in the network namespace {netns}")]
    Tap {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// Hardware acceleration for QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable ([`KvmProbe`]), else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for Accel {
    type Err = QemuError;
    fn from_str(value: &str) -> Result<Self, QemuError> {
        match value {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(QemuError::Accel {
                value: value.to_string(),
            }),
        }
    }
}

impl Accel {
    /// [`ACCEL_ENV`], or `auto` when unset.
    pub fn from_env() -> Result<Self, QemuError> {
        std::env::var(ACCEL_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .map_or(Ok(Accel::Auto), |v| v.parse())
    }

    /// Auto resolved to what this host offers.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto if KvmProbe::run().is_usable() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }

    /// `kvm`, `tcg` or `auto`, as [`ACCEL_ENV`] spells it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What `/dev/kvm` offers this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbe {
    /// It opens read-write, reports the stable API (`KVM_GET_API_VERSION` = 12) and creates a
    /// VM (`KVM_CREATE_VM`).
    Usable,
    /// Why not, e.g. `/dev/kvm: No such file or directory (os error 2)`.
    Unusable(String),
}

impl KvmProbe {
    /// Probes `/dev/kvm`.
    pub fn run() -> Self {
        let kvm = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")
        {
            Ok(kvm) => kvm,
            Err(e) => return KvmProbe::Unusable(format!("/dev/kvm: {e}")),
        };
        // SAFETY: an argument-less ioctl on an open fd.
        let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION) };
        if version != KVM_API_VERSION {
            return KvmProbe::Unusable(format!(
                "/dev/kvm reports API version {version}, not {KVM_API_VERSION}"
            ));
        }
        // SAFETY: KVM_CREATE_VM takes the machine type (0) and returns a new fd or -1.
        let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0 as libc::c_ulong) };
        if vm < 0 {
            let e = io::Error::last_os_error();
            return KvmProbe::Unusable(format!("/dev/kvm cannot create a VM: {e}"));
        }
        // SAFETY: the fd KVM_CREATE_VM just returned; nothing else owns it.
        unsafe { libc::close(vm) };
        KvmProbe::Usable
    }

    pub fn is_usable(&self) -> bool {
        *self == KvmProbe::Usable
    }
}

/// The host TSC frequency in kHz, from `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse::<f64>()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// How to run QEMU on this host.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu_bin: PathBuf,
    pub accel: Accel,
    /// Each VM's jail is `<chroot_base>/qemu/<tag>`.
    pub chroot_base: PathBuf,
    /// The uids and gids QEMU runs as, one pair per running VM.
    pub ids: IdRange,
}

/// A drive's file name in the jail.
fn drive_path(drive: &DriveFile) -> String {
    format!("/{}.ext4", drive.id)
}

impl QemuConfig {
    /// `QEMU_BIN` or `qemu-system-x86_64` on `PATH`; the accelerator from [`ACCEL_ENV`]; jails
    /// under [`DEFAULT_CHROOT_BASE`], ids from [`DEFAULT_IDS`].
    pub fn from_env() -> Result<Self, LocateError> {
        Ok(QemuConfig {
            qemu_bin: locate_binary("QEMU_BIN", "qemu-system-x86_64")?,
            accel: Accel::from_env().map_err(|e| LocateError::Config {
                reason: e.to_string(),
            })?,
            chroot_base: DEFAULT_CHROOT_BASE.into(),
            ids: DEFAULT_IDS,
        })
    }

    /// `<chroot_base>/qemu`: every VM's jail is in here, named by its tag.
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base.join("qemu")
    }

    /// Memory QEMU may use beyond the guest's RAM under `accel`.
    pub fn memory_overhead_mib(accel: Accel) -> u64 {
        match accel {
            Accel::Tcg => QEMU_OVERHEAD_MIB + TCG_TB_MIB,
            _ => QEMU_OVERHEAD_MIB,
        }
    }

    /// How a guest panic shows: QEMU exits 1 (`-action panic=exit-failure`), and its own
    /// failures say so on stderr under its program name.
    pub(crate) fn panic_signal(&self) -> PanicSignal {
        PanicSignal::ExitCode {
            code: 1,
            program: self.qemu_bin.file_name().map_or_else(
                || "qemu-system-x86_64".into(),
                |n| n.to_string_lossy().into(),
            ),
        }
    }

    /// Kernel arguments this driver needs: the TSC frequency under TCG.
    pub(crate) fn extra_boot_args(&self) -> Vec<String> {
        match (self.accel.resolve(), host_tsc_khz()) {
            (Accel::Tcg, Some(khz)) => vec![format!("tsc_early_khz={khz}")],
            _ => vec![],
        }
    }

    /// QEMU's command line, with the paths it has in its jail and the TAP as `tap_fd`.
    pub(crate) fn command_line(
        &self,
        plan: &LaunchPlan<'_>,
        accel: Accel,
        tap_fd: Option<RawFd>,
    ) -> Vec<String> {
        let accel = match accel {
            Accel::Kvm => "kvm".to_string(),
            _ => format!("tcg,tb-size={TCG_TB_MIB}"),
        };
        let cpu = if accel == "kvm" { "host" } else { "max" };
        let mut argv: Vec<String> = vec![self.qemu_bin.display().to_string()];
        argv.extend(
            [
                "-name",
                plan.tag,
                "-M",
                "microvm,acpi=on",
                "-accel",
                &accel,
                "-cpu",
                cpu,
                "-m",
                &plan.mem_mib.to_string(),
                "-smp",
                &plan.vcpus.to_string(),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-device",
                "pvpanic",
                "-action",
                "panic=exit-failure",
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                "-kernel",
                KERNEL,
                "-append",
                &plan.cmdline,
                "-serial",
                "stdio",
            ]
            .map(String::from),
        );
        for drive in &plan.drives {
            let mut spec = format!(
                "id={},file={},format=raw,if=none",
                drive.id,
                drive_path(drive)
            );
            if drive.read_only {
                spec.push_str(",readonly=on");
            }
            argv.extend([
                "-drive".into(),
                spec,
                "-device".into(),
                format!("virtio-blk-device,drive={}", drive.id),
            ]);
        }
        if let (Some(net), Some(fd)) = (plan.net, tap_fd) {
            argv.extend([
                "-netdev".into(),
                format!("tap,id=net0,fd={fd}"),
                "-device".into(),
                format!(
                    "virtio-net-device,netdev=net0,mac={}",
                    net.addresses.guest_mac()
                ),
            ]);
        }
        argv
    }

    /// Starts QEMU in its jail, pushing every undo onto `stack`: the id lease, the cgroups,
    /// the jail directory, and the kill.
    pub(crate) fn launch(
        &self,
        plan: &LaunchPlan<'_>,
        stack: &mut CleanupStack,
    ) -> Result<Launched, QemuError> {
        let accel = self.accel.resolve();
        let lease = self.ids.lease()?;
        let ids = lease.ids();
        stack.push(format!("release uid {}", ids.0), move || {
            drop(lease);
            Ok(())
        });
        stack.push(format!("remove cgroups {PARENT_CGROUP}/{}", plan.tag), {
            let tag = plan.tag.to_string();
            move || cgroup::remove(&tag).map(drop).map_err(Into::into)
        });
        let limits = CgroupVersion::detect().limits(
            plan.cpus,
            plan.vcpus,
            plan.mem_mib,
            Self::memory_overhead_mib(accel),
        );
        let cgroups = Joined::open(&cgroup::create(plan.tag, &limits)?)?;

        let root = self.jail_dir().join(plan.tag);
        stack.push(format!("remove jail {}", root.display()), {
            let root = root.clone();
            move || remove_dir_all_if_exists(&root).map_err(Into::into)
        });
        let netns = plan.net.map(open_netns).transpose()?;
        let tap = match (plan.net, &netns) {
            (Some(net), Some(ns)) => Some(open_tap(net, ns)?),
            _ => None,
        };
        let mut jail = Jail::new(&root, ids, cgroups, netns)?;
        jail.bind_binary(&self.qemu_bin)?;
        jail.bind_file(plan.kernel, KERNEL, false)?;
        for drive in &plan.drives {
            if !drive.shared {
                if drive.read_only {
                    jail::lend_read_only(&drive.path, ids.1)?;
                } else {
                    jail::hand_over(&drive.path, ids)?;
                }
            }
            jail.bind_file(&drive.path, &drive_path(drive), !drive.read_only)?;
        }
        if accel == Accel::Kvm {
            jail.add_kvm()?;
        }
        if let Some(tap) = &tap {
            jail.inherit(tap.as_raw_fd());
        }

        let argv = self.command_line(plan, accel, tap.as_ref().map(AsRawFd::as_raw_fd));
        let log_path = plan.work_dir.join(LOG_FILE);
        let console_path = plan.work_dir.join(CONSOLE_FILE);
        let create = |path: &Path| {
            File::create(path).map_err(|source| QemuError::Log {
                path: path.to_path_buf(),
                source,
            })
        };
        let console = create(&console_path)?;
        let log = create(&log_path)?;
        let log_err = log.try_clone().map_err(|source| QemuError::Log {
            path: log_path.clone(),
            source,
        })?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log_err);
        // SAFETY: `Jail::enter` makes only async-signal-safe system calls on data prepared
        // before the fork (no allocation, no locks), as `pre_exec` requires.
        unsafe { command.pre_exec(move || jail.enter()) };
        let spawned = command.spawn();
        // The parent's copies of the jail's fds (netns, cgroups) and of the TAP close here.
        drop(command);
        drop(tap);
        let child = spawned.map_err(|source| QemuError::Spawn {
            command: argv.join(" "),
            log: log_path.clone(),
            source,
        })?;
        // The child is reaped through its pidfd, never through `child`.
        let pid = child.id() as i32;
        let process =
            Arc::new(Process::open(pid).map_err(|source| QemuError::Watch { pid, source })?);
        stack.push(format!("kill QEMU (pid {pid})"), {
            let process = process.clone();
            move || process.kill_and_reap().map(drop).map_err(Into::into)
        });
        drop(log);
        Ok(Launched {
            process,
            console_log: console_path,
            vmm_log: log_path,
            jailer_log: None,
            collect: vec![],
            api_socket: None,
            metrics: None,
        })
    }
}

fn open_netns(net: &NetworkPlan) -> Result<OwnedFd, QemuError> {
    let path = PathBuf::from(net.netns_path());
    File::open(&path)
        .map(OwnedFd::from)
        .map_err(|source| QemuError::Netns { path, source })
}

/// Opens the VM's TAP from inside its namespace (on a thread of its own that enters it), for
/// QEMU to inherit.
fn open_tap(net: &NetworkPlan, netns: &OwnedFd) -> Result<OwnedFd, QemuError> {
    let error = |source| QemuError::Tap {
        netns: PathBuf::from(net.netns_path()),
        source,
    };
    let ns = netns.try_clone().map_err(error)?;
    let opened = std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<OwnedFd> {
                // SAFETY: setns of this thread only, with a namespace fd we own.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let tun = crate::netlink::tap_open(TAP, true)?;
                Ok(OwnedFd::from(tun))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the TAP thread panicked")))
    });
    opened.map_err(error)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::net::{AddressPool, EgressPolicy, NetworkPlan, NetworkSpec};
    use crate::vm::DriveFile;

    #[test]
    fn command_line_has_jail_paths_sandbox_and_tap_fd_with_disks_in_order() {
        let net = NetworkPlan::new(
            "bvm-a",
            AddressPool::default(),
            NetworkSpec {
                slot: 2,
                egress: EgressPolicy::default(),
                dns: vec![],
            },
            None,
        )
        .unwrap();
        let cpus: crate::CpuSet = "2-3".parse().unwrap();
        let drive = |id, path: &str, read_only| DriveFile {
            id,
            path: path.into(),
            read_only,
            shared: false,
            in_place: id == "cache",
        };
        let plan = LaunchPlan {
            tag: "bvm-a",
            work_dir: Path::new("/w/bvm-a"),
            kernel: Path::new("/k/vmlinux"),
            drives: vec![
                drive("rootfs", "/r/root,fs.ext4", true),
                drive("scratch", "/w/bvm-a/scratch.ext4", false),
                drive("config", "/w/bvm-a/config.ext4", true),
                drive("cache", "/pool/forks/f1.ext4", false),
            ],
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            mem_mib: 512,
            cpus: Some(&cpus),
            net: Some(&net),
        };
        let config = QemuConfig {
            qemu_bin: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            chroot_base: "/j".into(),
            ids: DEFAULT_IDS,
        };
        let argv = config.command_line(&plan, Accel::Tcg, Some(7)).join(" ");
        assert!(
            argv.starts_with(
                "/usr/bin/qemu-system-x86_64 -name bvm-a -M microvm,acpi=on \
                 -accel tcg,tb-size=256 -cpu max -m 512 -smp 1"
            ),
            "{argv}"
        );
        assert!(argv.contains("-no-reboot"), "{argv}");
        assert!(
            argv.contains("-device pvpanic -action panic=exit-failure"),
            "a guest panic is QEMU's exit status: {argv}"
        );
        assert!(
            argv.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{argv}"
        );
        assert!(argv.contains("-kernel /vmlinux"), "{argv}");
        assert!(argv.contains("-serial stdio"), "{argv}");
        // Paths are the jail's, never the host's.
        let rootfs = argv
            .find("-drive id=rootfs,file=/rootfs.ext4,format=raw,if=none,readonly=on")
            .unwrap();
        let scratch = argv
            .find("-drive id=scratch,file=/scratch.ext4,format=raw,if=none -device")
            .unwrap();
        let config_drive = argv
            .find("-drive id=config,file=/config.ext4,format=raw,if=none,readonly=on -device")
            .unwrap();
        let cache = argv
            .find(
                "-drive id=cache,file=/cache.ext4,format=raw,if=none \
                 -device virtio-blk-device,drive=cache",
            )
            .unwrap();
        assert!(
            rootfs < scratch && scratch < config_drive && config_drive < cache,
            "vda is the rootfs, vdb the scratch disk, vdc the config drive, vdd the cache: {argv}"
        );
        assert!(
            !argv.contains("/w/bvm-a") && !argv.contains("/r/root") && !argv.contains("/pool"),
            "{argv}"
        );
        assert!(argv.ends_with(
            "-netdev tap,id=net0,fd=7 \
             -device virtio-net-device,netdev=net0,mac=06:00:0a:c8:00:16"
        ));
        let kvm = config.command_line(&plan, Accel::Kvm, None).join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
        assert!(!kvm.contains("-netdev"), "no TAP fd, no NIC: {kvm}");
        assert_eq!(QemuConfig::memory_overhead_mib(Accel::Kvm), 192);
        assert_eq!(QemuConfig::memory_overhead_mib(Accel::Tcg), 192 + 256);
        assert_eq!(
            "fast".parse::<Accel>().unwrap_err().to_string(),
            "`fast` is not an accelerator; use auto, kvm or tcg"
        );
    }
}
