//! The QEMU driver: `qemu-system-x86_64 -M microvm` with the same ELF kernel and the same
//! virtio-mmio disks and network as Firecracker, run inside the VM's network namespace
//! (`ip netns exec`) and pinned to its CPUs (`taskset -c`), serial console to a file,
//! `-no-reboot` so a guest reboot (`reboot=k`) ends the process.
//!
//! Acceleration is KVM or TCG, chosen by [`Accel`]; `auto` uses KVM when `/dev/kvm` answers.
//! Where KVM is nested and emulated it "works" but crawls, so an operator forces TCG with
//! `BUILDER_VMM_ACCEL=tcg`. Under TCG the kernel is told the TSC frequency (`tsc_early_khz=`),
//! or it stalls calibrating it. More than one vCPU under TCG on a busy 2-core host was seen to
//! livelock; use `vcpus = 1` there.
//!
//! ACPI is off: QEMU then lists the virtio-mmio devices on the kernel command line
//! (`virtio_mmio.device=`), in the order given, so the disks are `vda`, `vdb`, `vdc`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;

use crate::cleanup::CleanupStack;
use crate::net::TAP;
use crate::process::Process;
use crate::vm::{locate_binary, LaunchPlan, Launched, LocateError};

/// Environment variable that picks the accelerator (`auto`, `kvm`, `tcg`).
pub const ACCEL_ENV: &str = "BUILDER_VMM_ACCEL";
const CONSOLE_FILE: &str = "console.log";
const LOG_FILE: &str = "qemu.log";
/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
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
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// Hardware acceleration for QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and reports the stable API, else TCG.
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
            Accel::Auto if kvm_usable() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }
}

fn kvm_usable() -> bool {
    let Ok(kvm) = OpenOptions::new().read(true).write(true).open("/dev/kvm") else {
        return false;
    };
    // SAFETY: an argument-less ioctl on an open fd.
    unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION) == KVM_API_VERSION }
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
}

impl QemuConfig {
    /// `QEMU_BIN` or `qemu-system-x86_64` on `PATH`; the accelerator from [`ACCEL_ENV`].
    pub fn from_env() -> Result<Self, LocateError> {
        Ok(QemuConfig {
            qemu_bin: locate_binary("QEMU_BIN", "qemu-system-x86_64")?,
            accel: Accel::from_env().map_err(|e| LocateError::Config {
                reason: e.to_string(),
            })?,
        })
    }

    /// Kernel arguments this driver needs: the TSC frequency under TCG.
    pub(crate) fn extra_boot_args(&self) -> Vec<String> {
        match (self.accel.resolve(), host_tsc_khz()) {
            (Accel::Tcg, Some(khz)) => vec![format!("tsc_early_khz={khz}")],
            _ => vec![],
        }
    }

    /// The full command line: `ip netns exec`, `taskset`, then QEMU.
    pub(crate) fn command_line(&self, plan: &LaunchPlan<'_>) -> Vec<String> {
        let mut argv: Vec<String> = vec![];
        if let Some(net) = plan.net {
            argv.extend(["ip", "netns", "exec", &net.tag].map(String::from));
        }
        if let Some(cpus) = plan.cpus {
            argv.extend(["taskset".into(), "-c".into(), cpus.to_string()]);
        }
        let (accel, cpu) = match self.accel.resolve() {
            Accel::Kvm => ("kvm", "host"),
            _ => ("tcg", "max"),
        };
        let path = |p: &Path| p.display().to_string().replace(',', ",,");
        argv.push(self.qemu_bin.display().to_string());
        argv.extend(
            [
                "-name",
                plan.tag,
                "-M",
                &format!("microvm,accel={accel},acpi=off"),
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
                "-kernel",
                &path(plan.kernel),
                "-append",
                &plan.cmdline,
                "-serial",
                &format!("file:{}", path(&plan.work_dir.join(CONSOLE_FILE))),
            ]
            .map(String::from),
        );
        for drive in &plan.drives {
            let mut spec = format!(
                "id={},file={},format=raw,if=none",
                drive.id,
                path(&drive.path)
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
        if let Some(net) = plan.net {
            argv.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={TAP},script=no,downscript=no"),
                "-device".into(),
                format!(
                    "virtio-net-device,netdev=net0,mac={}",
                    net.addresses.guest_mac()
                ),
            ]);
        }
        argv
    }

    /// Starts QEMU, pushing the kill onto `stack`.
    pub(crate) fn launch(
        &self,
        plan: &LaunchPlan<'_>,
        stack: &mut CleanupStack,
    ) -> Result<Launched, QemuError> {
        let argv = self.command_line(plan);
        let log_path = plan.work_dir.join(LOG_FILE);
        let log_error = |source| QemuError::Log {
            path: log_path.clone(),
            source,
        };
        let log = File::create(&log_path).map_err(log_error)?;
        let log_err = log.try_clone().map_err(log_error)?;
        let spawn_error = |source| QemuError::Spawn {
            command: argv.join(" "),
            source,
        };
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(spawn_error)?;
        // The child is reaped through its pidfd, never through `child`.
        let pid = child.id() as i32;
        let process = Arc::new(Process::open(pid).map_err(spawn_error)?);
        stack.push(format!("kill QEMU (pid {pid})"), {
            let process = process.clone();
            move || process.kill_and_reap().map(drop).map_err(Into::into)
        });
        Ok(Launched {
            process,
            console_log: plan.work_dir.join(CONSOLE_FILE),
            vmm_log: log_path,
            jailer_log: None,
            collect: vec![],
            api_socket: None,
            metrics: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::net::{AddressPool, EgressPolicy, NetworkPlan, NetworkSpec};
    use crate::vm::DriveFile;

    #[test]
    fn command_line_runs_in_the_netns_pinned_with_disks_in_order() {
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
        };
        let plan = LaunchPlan {
            tag: "bvm-a",
            work_dir: Path::new("/w/bvm-a"),
            kernel: Path::new("/k/vmlinux"),
            drives: vec![
                drive("rootfs", "/r/root,fs.ext4", true),
                drive("scratch", "/w/bvm-a/scratch.ext4", false),
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
        };
        let argv = config.command_line(&plan).join(" ");
        assert!(
            argv.starts_with(
                "ip netns exec bvm-a taskset -c 2,3 /usr/bin/qemu-system-x86_64 -name bvm-a \
                 -M microvm,accel=tcg,acpi=off -cpu max -m 512 -smp 1"
            ),
            "{argv}"
        );
        assert!(argv.contains("-no-reboot"), "{argv}");
        assert!(argv.contains("-serial file:/w/bvm-a/console.log"), "{argv}");
        let rootfs = argv
            .find("-drive id=rootfs,file=/r/root,,fs.ext4,format=raw,if=none,readonly=on")
            .expect("commas in paths are escaped");
        let scratch = argv
            .find("-drive id=scratch,file=/w/bvm-a/scratch.ext4,format=raw,if=none -device")
            .unwrap();
        assert!(rootfs < scratch, "vda is the rootfs, vdb the scratch disk");
        assert!(argv.ends_with(
            "-netdev tap,id=net0,ifname=tap0,script=no,downscript=no \
             -device virtio-net-device,netdev=net0,mac=06:00:0a:c8:00:16"
        ));
        assert_eq!(
            "fast".parse::<Accel>().unwrap_err().to_string(),
            "`fast` is not an accelerator; use auto, kvm or tcg"
        );
    }
}
