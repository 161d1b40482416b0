//! Host side effects of the network setup: every `ip`, `iptables` and `sysctl` the VMM layer
//! runs goes through [`Host`] (youki style), so unit tests record the exact commands and the
//! real implementation, [`SystemHost`], runs them.

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

/// One command line to run on the host, with optional standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCommand {
    pub program: &'static str,
    pub args: Vec<String>,
    pub stdin: Option<String>,
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
        }
    }

    /// The same command fed `input` on its standard input.
    pub fn with_stdin(mut self, input: String) -> Self {
        self.stdin = Some(input);
        self
    }
}

impl fmt::Display for HostCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
}

/// Runs host commands; returns standard output.
pub trait Host: Send + Sync + fmt::Debug {
    fn run(&self, command: &HostCommand) -> Result<String, HostError>;
}

/// The real host: spawns the programs found on `PATH`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHost;

impl Host for SystemHost {
    fn run(&self, command: &HostCommand) -> Result<String, HostError> {
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
}
