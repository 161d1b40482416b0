//! The VMM process, watched through a pidfd: readable when it exits (child or not), signalled
//! without pid-reuse races, and reaped with `waitid(P_PIDFD)` to learn its exit status. QEMU is
//! our child; the jailer's daemonized Firecracker becomes one because the Firecracker driver
//! makes this process a child subreaper.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It is gone, but it was not our child, so its status is unknown.
    Unknown,
}

/// A running process.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
}

impl Process {
    /// Watches `pid`. Must be called from within a Tokio runtime.
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open until it is dropped.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Process { pid, pidfd })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: the fd is a live pidfd; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Reaps the process if it has exited: `Ok(None)` while it runs.
    fn try_reap(&self, block: bool) -> io::Result<Option<ProcessExit>> {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
        // SAFETY: valid pidfd, valid pointer to a siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                flags,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ECHILD) {
                // Not our child: the pidfd being readable is all we can know.
                let timeout_ms = if block { 10_000 } else { 0 };
                return Ok(self
                    .exited_within(timeout_ms)
                    .then_some(ProcessExit::Unknown));
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded, so si_pid/si_status are the fields of a SIGCHLD siginfo.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(match info.si_code {
            libc::CLD_EXITED => ProcessExit::Code(status),
            _ => ProcessExit::Signal(status),
        }))
    }

    fn exited_within(&self, timeout_ms: i32) -> bool {
        let mut poll = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll, 1, timeout_ms) == 1 }
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait(&self) -> io::Result<ProcessExit> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            if let Some(exit) = self.try_reap(false)? {
                return Ok(exit);
            }
            ready.clear_ready();
        }
    }

    /// Sends SIGKILL and waits for the process to be gone (blocking: for cleanup steps).
    pub fn kill_and_reap(&self) -> io::Result<ProcessExit> {
        self.signal(libc::SIGKILL)?;
        match self.try_reap(true)? {
            Some(exit) => Ok(exit),
            None => Err(io::Error::other(
                "waitid returned before the process exited",
            )),
        }
    }
}
