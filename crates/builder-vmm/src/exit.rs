//! How a VM ended, in the terms the node agent reports: the guest shut down, the guest kernel
//! panicked, the VMM failed, the VMM crashed, we killed it, or it ran out of time.
//!
//! Only what the VMM process itself tells counts: its exit status, our own action, and for an
//! exit status the VMM shares with its own failures, the VMM's log (its stderr, which the guest
//! cannot write). Never the console: a build can print anything there, `Kernel panic - not
//! syncing` included. A guest panic is seen through QEMU's pvpanic device ([`PanicSignal`]);
//! Firecracker has none, so there a panicking guest's exit looks like a shutdown, and the node
//! agent, which gets no report from it, says the VM stopped before its agent reported.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::process::ProcessExit;

/// How much of the end of the VMM's log is searched for its own error reports.
const VMM_LOG_TAIL_BYTES: u64 = 64 * 1024;

/// How a VMM tells, from outside the guest, that the guest kernel panicked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PanicSignal {
    /// It cannot (Firecracker: no pvpanic device; `panic=` reboots the guest, and the VMM
    /// exits 0 as after a shutdown).
    Unseen,
    /// It exits with `code` (QEMU: a pvpanic device and `-action panic=exit-failure`). QEMU
    /// exits with the same code when it fails by itself, and then says why on its stderr in
    /// lines starting `{program}: ` (other than warnings), which tells the two apart.
    ExitCode { code: i32, program: String },
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum ExitCause {
    /// The guest rebooted or powered off (`reboot=k`) and the VMM exited with 0.
    GuestShutdown,
    /// The guest kernel panicked, as the VMM tells it (QEMU's pvpanic device; Firecracker
    /// cannot tell).
    GuestPanic,
    /// The VMM exited with a non-zero code (e.g. Firecracker's 1 on `KVM_EXIT_INTERNAL_ERROR`).
    VmmFailed { code: i32 },
    /// A signal we did not send ended the VMM.
    VmmCrashed { signal: i32 },
    /// The VMM is gone but was not our child, so its status is unknown.
    VmmGone,
    /// [`crate::Vm::kill`] stopped it.
    Killed,
    /// It ran past its timeout and was killed.
    TimedOut { after_s: u64 },
}

impl ExitCause {
    /// True only for a guest that shut itself down cleanly.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitCause::GuestShutdown)
    }
}

/// What [`crate::Vm::wait`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmExit {
    #[serde(flatten)]
    pub cause: ExitCause,
    /// The raw exit code of the VMM process, when it exited by itself.
    pub vmm_exit_code: Option<i32>,
    /// The guest's serial console, in the VM's work dir.
    pub console_log: PathBuf,
    /// The VMM's own log (QEMU's stderr, Firecracker's logger), in the VM's work dir.
    pub vmm_log: PathBuf,
    #[serde(rename = "runtime_ms", serialize_with = "millis")]
    pub runtime: Duration,
}

fn millis<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u128(duration.as_millis())
}

/// Who stopped the VM, if we did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Killed,
    TimedOut(Duration),
}

/// Maps the process status and our own action to an [`ExitCause`]; `vmm_log` is the VMM's
/// own log, which `panic` may need to tell a guest panic from the VMM's own failure.
pub(crate) fn classify(
    exit: ProcessExit,
    stop: Option<Stop>,
    panic: &PanicSignal,
    vmm_log: &Path,
) -> ExitCause {
    match (stop, exit) {
        (Some(Stop::TimedOut(after)), _) => ExitCause::TimedOut {
            after_s: after.as_secs(),
        },
        (Some(Stop::Killed), _) => ExitCause::Killed,
        (None, ProcessExit::Code(code)) if panic.is_panic(code, vmm_log) => ExitCause::GuestPanic,
        (None, ProcessExit::Code(0)) => ExitCause::GuestShutdown,
        (None, ProcessExit::Code(code)) => ExitCause::VmmFailed { code },
        (None, ProcessExit::Signal(signal)) => ExitCause::VmmCrashed { signal },
        (None, ProcessExit::Unknown) => ExitCause::VmmGone,
    }
}

impl PanicSignal {
    /// Whether the VMM exiting with `code` means the guest panicked.
    fn is_panic(&self, code: i32, vmm_log: &Path) -> bool {
        match self {
            PanicSignal::Unseen => false,
            PanicSignal::ExitCode {
                code: panic_code,
                program,
            } => code == *panic_code && !vmm_reported_error(vmm_log, program),
        }
    }
}

/// Whether the end of the VMM's log holds an error report of `program` (`{program}: ...`, not a
/// warning). The guest cannot write this log.
fn vmm_reported_error(vmm_log: &Path, program: &str) -> bool {
    let Ok(mut file) = File::open(vmm_log) else {
        return false;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(VMM_LOG_TAIL_BYTES)))
        .is_err()
    {
        return false;
    }
    let mut tail = vec![];
    if file.read_to_end(&mut tail).is_err() {
        return false;
    }
    let prefix = format!("{program}: ");
    String::from_utf8_lossy(&tail).lines().any(|line| {
        line.strip_prefix(&prefix)
            .is_some_and(|said| !said.starts_with("warning: "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let dir = tempfile::tempdir().unwrap();
        let quiet = dir.path().join("quiet.log");
        std::fs::write(&quiet, "").unwrap();
        let unseen = &PanicSignal::Unseen;
        let code = ProcessExit::Code;
        assert_eq!(
            classify(code(0), None, unseen, &quiet),
            ExitCause::GuestShutdown
        );
        assert_eq!(
            classify(code(1), None, unseen, &quiet),
            ExitCause::VmmFailed { code: 1 }
        );
        assert_eq!(
            classify(ProcessExit::Signal(11), None, unseen, &quiet),
            ExitCause::VmmCrashed { signal: 11 }
        );
        assert_eq!(
            classify(ProcessExit::Signal(9), Some(Stop::Killed), unseen, &quiet),
            ExitCause::Killed
        );
        assert_eq!(
            classify(
                ProcessExit::Signal(9),
                Some(Stop::TimedOut(Duration::from_secs(20))),
                unseen,
                &quiet
            ),
            ExitCause::TimedOut { after_s: 20 }
        );
        assert_eq!(
            classify(
                ProcessExit::Unknown,
                None,
                unseen,
                &dir.path().join("missing")
            ),
            ExitCause::VmmGone
        );
    }

    #[test]
    fn a_panic_is_the_vmms_exit_never_the_consoles_text() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = PanicSignal::ExitCode {
            code: 1,
            program: "qemu-system-x86_64".into(),
        };
        // What a build can print: the console is not looked at, whatever the VMM.
        let console = dir.path().join("console.log");
        std::fs::write(&console, "[ 1.0] Kernel panic - not syncing: VFS\n").unwrap();
        for panic in [&PanicSignal::Unseen, &qemu] {
            assert_eq!(
                classify(ProcessExit::Code(0), None, panic, &console),
                ExitCause::GuestShutdown
            );
        }
        // QEMU's pvpanic exit, its log quiet or with warnings only: the guest panicked.
        let log = dir.path().join("qemu.log");
        std::fs::write(
            &log,
            "qemu-system-x86_64: warning: TCG doesn't support requested feature\n",
        )
        .unwrap();
        let code = ProcessExit::Code;
        assert_eq!(classify(code(1), None, &qemu, &log), ExitCause::GuestPanic);
        assert_eq!(
            classify(code(1), None, &qemu, &dir.path().join("none")),
            ExitCause::GuestPanic
        );
        // The same code after QEMU said it failed by itself: its own failure.
        std::fs::write(
            &log,
            "qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file\n",
        )
        .unwrap();
        assert_eq!(
            classify(code(1), None, &qemu, &log),
            ExitCause::VmmFailed { code: 1 }
        );
        assert_eq!(
            classify(code(2), None, &qemu, &dir.path().join("none")),
            ExitCause::VmmFailed { code: 2 }
        );
    }

    #[test]
    fn serializes_flat_for_the_node_agent() {
        let exit = VmExit {
            cause: ExitCause::TimedOut { after_s: 20 },
            vmm_exit_code: None,
            console_log: "/w/console.log".into(),
            vmm_log: "/w/qemu.log".into(),
            runtime: Duration::from_millis(20_005),
        };
        assert_eq!(
            serde_json::to_value(&exit).unwrap(),
            serde_json::json!({
                "cause": "timed_out",
                "after_s": 20,
                "vmm_exit_code": null,
                "console_log": "/w/console.log",
                "vmm_log": "/w/qemu.log",
                "runtime_ms": 20_005,
            })
        );
    }
}
