//! How a VM ended, in the terms the node agent reports: the guest shut down, the guest kernel
//! panicked, the VMM failed, the VMM crashed, we killed it, or it ran out of time.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::process::ProcessExit;

/// What the console shows when the guest kernel panics.
const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// How much of the end of the console log is searched for [`PANIC_MARKER`].
const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum ExitCause {
    /// The guest rebooted or powered off (`reboot=k`) and the VMM exited with 0.
    GuestShutdown,
    /// The VMM exited with 0 after the guest kernel panicked (`panic=` reboots it).
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

/// Maps the process status and our own action to an [`ExitCause`].
pub(crate) fn classify(exit: ProcessExit, stop: Option<Stop>, console: &Path) -> ExitCause {
    match (stop, exit) {
        (Some(Stop::TimedOut(after)), _) => ExitCause::TimedOut {
            after_s: after.as_secs(),
        },
        (Some(Stop::Killed), _) => ExitCause::Killed,
        (None, ProcessExit::Code(0)) if console_shows_panic(console) => ExitCause::GuestPanic,
        (None, ProcessExit::Code(0)) => ExitCause::GuestShutdown,
        (None, ProcessExit::Code(code)) => ExitCause::VmmFailed { code },
        (None, ProcessExit::Signal(signal)) => ExitCause::VmmCrashed { signal },
        (None, ProcessExit::Unknown) => ExitCause::VmmGone,
    }
}

fn console_shows_panic(console: &Path) -> bool {
    let Ok(mut file) = File::open(console) else {
        return false;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES)))
        .is_err()
    {
        return false;
    }
    let mut tail = vec![];
    file.read_to_end(&mut tail).is_ok() && String::from_utf8_lossy(&tail).contains(PANIC_MARKER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let dir = tempfile::tempdir().unwrap();
        let quiet = dir.path().join("quiet.log");
        std::fs::write(&quiet, "reboot: Restarting system\n").unwrap();
        let panicked = dir.path().join("panic.log");
        std::fs::write(&panicked, "[ 1.0] Kernel panic - not syncing: VFS\n").unwrap();
        let code = ProcessExit::Code;
        assert_eq!(classify(code(0), None, &quiet), ExitCause::GuestShutdown);
        assert_eq!(classify(code(0), None, &panicked), ExitCause::GuestPanic);
        assert_eq!(
            classify(code(1), None, &quiet),
            ExitCause::VmmFailed { code: 1 }
        );
        assert_eq!(
            classify(ProcessExit::Signal(11), None, &quiet),
            ExitCause::VmmCrashed { signal: 11 }
        );
        assert_eq!(
            classify(ProcessExit::Signal(9), Some(Stop::Killed), &quiet),
            ExitCause::Killed
        );
        assert_eq!(
            classify(
                ProcessExit::Signal(9),
                Some(Stop::TimedOut(Duration::from_secs(20))),
                &quiet
            ),
            ExitCause::TimedOut { after_s: 20 }
        );
        assert_eq!(
            classify(ProcessExit::Unknown, None, &dir.path().join("missing")),
            ExitCause::VmmGone
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
