//! The one error type of a build: which phase failed, whose fault it was, and why.
//!
//! Every phase returns [`BuildError`]; the pipeline turns the first one into the report's
//! `error` field, the log's last line and the exit code.

use std::error::Error as StdError;
use std::fmt;

use builder_contract::{BuildFailure, ErrorClass, Phase};

#[derive(Debug)]
pub struct BuildError {
    pub phase: Phase,
    pub class: ErrorClass,
    /// The whole message, cause chain included.
    pub message: String,
}

impl BuildError {
    /// The customer's input is at fault.
    pub fn user(phase: Phase, message: impl Into<String>) -> Self {
        BuildError {
            phase,
            class: ErrorClass::User,
            message: message.into(),
        }
    }

    /// The platform is at fault.
    pub fn internal(phase: Phase, message: impl Into<String>) -> Self {
        BuildError {
            phase,
            class: ErrorClass::Internal,
            message: message.into(),
        }
    }

    /// A build that ran out of disk space: the image does not fit the build disk.
    pub fn disk_full(phase: Phase, context: &str) -> Self {
        BuildError::user(
            phase,
            format!("{context}: no space left on the build disk; the image is too large for it"),
        )
    }

    /// An error with its `#[source]` chain, classed by `class`.
    pub fn from_chain(phase: Phase, class: ErrorClass, err: &(dyn StdError + 'static)) -> Self {
        BuildError {
            phase,
            class,
            message: chain(err),
        }
    }

    pub fn to_failure(&self) -> BuildFailure {
        BuildFailure {
            class: self.class,
            phase: self.phase,
            message: self.message.clone(),
        }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error in phase {}: {}",
            self.class, self.phase, self.message
        )
    }
}

impl StdError for BuildError {}

/// `error: cause: cause` — an error and all its sources on one line.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// True when an I/O error anywhere in the chain is ENOSPC (or EDQUOT).
pub fn is_disk_full(err: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
        }
        current = e.source();
    }
    false
}
