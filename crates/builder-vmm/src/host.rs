//! Host side effects of the network setup: every link, address, route and namespace change
//! ([`NetOp`], done over netlink), every `nft` and `iptables-restore` run and every sysctl the
//! VMM layer makes goes through [`Host`] (youki style), so unit tests record the exact
//! operations and the real implementation, [`SystemHost`], performs them.
//!
//! Work inside a VM's network namespace is done by a short-lived thread that enters the
//! namespace with `setns(2)`: netlink sockets it opens and commands it spawns belong to the
//! namespace, so no `ip netns exec` (and its mount namespace and sysfs remount) is needed.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::netlink::{self, NetOp};

/// Where `ip netns` keeps its named network namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// One command line to run on the host, with optional standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCommand {
    pub program: &'static str,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    /// The named network namespace it runs in; `None`: the host's.
    pub netns: Option<String>,
}

impl HostCommand {
    pub fn new<I, S>(program: &'static str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        HostCommand {
            program,
            args: args.into_iter().map(Into::into).collect(),
            stdin: None,
            netns: None,
        }
    }

    /// The same command fed `input` on its standard input.
    pub fn with_stdin(mut self, input: String) -> Self {
        self.stdin = Some(input);
        self
    }

    /// The same command run inside the network namespace `netns`.
    pub fn in_netns(mut self, netns: &str) -> Self {
        self.netns = Some(netns.to_string());
        self
    }
}

impl fmt::Display for HostCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(netns) = &self.netns {
            write!(f, "[netns {netns}] ")?;
        }
        write!(f, "{}", self.program)?;
        for arg in &self.args {
            write!(f, " {arg}")?;
        }
        if self.stdin.is_some() {
            write!(f, " <stdin>")?;
        }
        Ok(())
    }
}

/// A sysctl to set, on the host or in a named network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    /// Dotted name, e.g. `net.ipv4.ip_forward`.
    pub key: &'static str,
    pub value: &'static str,
    pub netns: Option<String>,
}

impl Sysctl {
    /// The file under `/proc/sys` that holds it.
    pub fn path(&self) -> PathBuf {
        Path::new("/proc/sys").join(self.key.replace('.', "/"))
    }
}

impl fmt::Display for Sysctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(netns) = &self.netns {
            write!(f, "[netns {netns}] ")?;
        }
        write!(f, "sysctl {}={}", self.key, self.value)
    }
}

/// One step of a setup: a network change, a command or a sysctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    Net(NetOp),
    Run(HostCommand),
    Sysctl(Sysctl),
}

impl HostOp {
    /// Performs the step on `host`.
    pub fn apply(&self, host: &dyn Host) -> Result<(), HostError> {
        match self {
            HostOp::Net(op) => host.net(op),
            HostOp::Run(command) => host.run(command).map(drop),
            HostOp::Sysctl(sysctl) => host.sysctl(sysctl),
        }
    }
}

impl fmt::Display for HostOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostOp::Net(op) => op.fmt(f),
            HostOp::Run(command) => command.fmt(f),
            HostOp::Sysctl(sysctl) => sysctl.fmt(f),
        }
    }
}

/// Why a host command failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{op}` failed")]
    Net {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set `{sysctl}` through {path}")]
    Sysctl {
        sysctl: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Performs host side effects.
pub trait Host: Send + Sync + fmt::Debug {
    /// Runs a command; returns its standard output.
    fn run(&self, command: &HostCommand) -> Result<String, HostError>;

    /// Sets a sysctl, unless it already has the value.
    fn sysctl(&self, sysctl: &Sysctl) -> Result<(), HostError>;

    /// Changes a link, address, route or named namespace.
    fn net(&self, op: &NetOp) -> Result<(), HostError>;
}

/// The real host: spawns the programs found on `PATH`, writes `/proc/sys`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHost;

/// Runs `work` on a new thread that has entered the network namespace `netns` (the calling
/// thread's namespaces stay as they are); `None` runs it here.
fn in_netns<T: Send>(
    netns: Option<&str>,
    work: impl FnOnce() -> Result<T, HostError> + Send,
) -> Result<T, HostError> {
    let Some(netns) = netns else {
        return work();
    };
    let path = Path::new(NETNS_RUN_DIR).join(netns);
    let netns_error = |source| HostError::Netns {
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(netns_error)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an open namespace fd changes only this thread, which ends
                // when `work` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(netns_error(std::io::Error::last_os_error()));
                }
                work()
            })
            .join()
            .expect("a namespace worker does not panic")
    })
}

impl Host for SystemHost {
    fn net(&self, op: &NetOp) -> Result<(), HostError> {
        in_netns(op.netns(), || {
            netlink::apply(op).map_err(|source| HostError::Net {
                op: op.to_string(),
                source,
            })
        })
    }

    fn sysctl(&self, sysctl: &Sysctl) -> Result<(), HostError> {
        let path = sysctl.path();
        let error = |source| HostError::Sysctl {
            sysctl: sysctl.to_string(),
            path: path.clone(),
            source,
        };
        in_netns(sysctl.netns.as_deref(), || {
            let current = std::fs::read_to_string(&path).map_err(error)?;
            if current.trim() != sysctl.value {
                std::fs::write(&path, sysctl.value).map_err(error)?;
            }
            Ok(())
        })
    }

    fn run(&self, command: &HostCommand) -> Result<String, HostError> {
        in_netns(command.netns.as_deref(), || run_here(command))
    }
}

/// Runs `command` in the calling thread's namespaces.
fn run_here(command: &HostCommand) -> Result<String, HostError> {
    let spawn_error = |source| HostError::Spawn {
        command: command.to_string(),
        source,
    };
    let mut child = Command::new(command.program)
        .args(&command.args)
        .stdin(if command.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (&command.stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(HostError::Failed {
            command: command.to_string(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
