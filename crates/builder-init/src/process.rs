//! Start the application, forward signals to it, reap every zombie, report its exit code.
//!
//! The signals init forwards are blocked and taken synchronously with `sigwaitinfo` (a blocked
//! signal is delivered even to pid 1, which the kernel otherwise shields from signals it has
//! no handler for). The child unblocks them before `execve`.

use std::time::{Duration, Instant};

use crate::config::Launch;

const FORWARDED: [libc::c_int; 8] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// The shell's convention: the exit status, or 128 + the signal that killed it.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Runs the application to its end; returns its exit code.
pub fn supervise(launch: &Launch) -> Result<i32, String> {
    let set = signal_set();
    let mut argv: Vec<*const libc::c_char> = launch.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut env: Vec<*const libc::c_char> = launch.env.iter().map(|e| e.as_ptr()).collect();
    env.push(std::ptr::null());
    let cwd = std::ffi::CString::new(launch.cwd.as_str()).map_err(|_| "WorkingDir has a NUL")?;
    let groups: Vec<libc::gid_t> = launch.credentials.groups.clone();
    // SAFETY: init is single-threaded, so the child may run anything until execve; every
    // pointer used in the child was prepared above and stays valid.
    let pid = unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::fork()
    };
    if pid < 0 {
        return Err(format!("cannot fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the child, before execve.
        unsafe {
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::setsid();
            let fail = |what: &str| {
                eprintln!(
                    "builder-init: error: {what} failed: {}",
                    std::io::Error::last_os_error()
                );
                libc::_exit(127)
            };
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                fail("setgroups");
            }
            if libc::setgid(launch.credentials.gid) != 0 {
                fail("setgid");
            }
            if libc::setuid(launch.credentials.uid) != 0 {
                fail("setuid");
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                fail(&format!("chdir to {}", launch.cwd));
            }
            libc::execve(launch.program.as_ptr(), argv.as_ptr(), env.as_ptr());
            fail(&format!("exec of {:?}", launch.program));
        }
    }
    loop {
        // SAFETY: waiting on a set of blocked signals.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig == libc::SIGCHLD {
            if let Some(code) = reap(pid) {
                return Ok(code);
            }
        } else if sig > 0 {
            // SAFETY: forwarding to our child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Reaps every exited child; returns the application's code if it was among them.
fn reap(app: libc::pid_t) -> Option<i32> {
    let mut code = None;
    loop {
        let mut status = 0;
        // SAFETY: non-blocking waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return code;
        }
        if pid == app {
            code = Some(exit_code(status));
        }
    }
}

/// Asks every remaining process to stop, then kills what is left after `grace`.
pub fn terminate_all(grace: Duration) {
    // SAFETY: signalling every process but ourselves, then reaping.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: as above.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return;
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: a null status pointer is allowed; WNOHANG never blocks.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}
