//! The per-VM cleanup stack: every resource a VM creates pushes the step that undoes it, and
//! [`CleanupStack::run`] undoes them newest first (E2B style), on success, error and timeout
//! alike. A failing step does not stop the others; every failure is returned.

use std::path::Path;
use std::{fmt, fs, io};

/// The error type an undo step returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Undo = Box<dyn FnOnce() -> Result<(), BoxError> + Send>;

/// Undo steps, run last-in first-out.
#[derive(Default)]
pub struct CleanupStack {
    steps: Vec<(String, Undo)>,
}

impl fmt::Debug for CleanupStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.steps.iter().map(|(what, _)| what))
            .finish()
    }
}

/// One undo step that failed.
#[derive(Debug, thiserror::Error)]
#[error("cleanup step `{step}` failed")]
pub struct CleanupError {
    /// What the step was undoing.
    pub step: String,
    #[source]
    pub source: BoxError,
}

/// Every undo step that failed during one [`CleanupStack::run`], in the order they ran.
#[derive(Debug, thiserror::Error)]
#[error("{} cleanup step(s) failed: {}", .0.len(), summary(.0))]
pub struct CleanupErrors(pub Vec<CleanupError>);

fn summary(errors: &[CleanupError]) -> String {
    errors
        .iter()
        .map(|e| format!("{} ({})", e.step, e.source))
        .collect::<Vec<_>>()
        .join("; ")
}

impl CleanupStack {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the undo of a resource that now exists. `what` names it in errors and logs.
    pub fn push<F>(&mut self, what: impl Into<String>, undo: F)
    where
        F: FnOnce() -> Result<(), BoxError> + Send + 'static,
    {
        self.steps.push((what.into(), Box::new(undo)));
    }

    /// Steps still to run.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs every step, newest first, and empties the stack.
    pub fn run(&mut self) -> Result<(), CleanupErrors> {
        let mut errors = vec![];
        while let Some((step, undo)) = self.steps.pop() {
            match undo() {
                Ok(()) => tracing::debug!(%step, "cleaned up"),
                Err(source) => {
                    tracing::warn!(%step, error = %source, "cleanup step failed");
                    errors.push(CleanupError { step, source });
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CleanupErrors(errors))
        }
    }
}

/// Removes a directory tree; one that is already gone is not an error.
pub(crate) fn remove_dir_all_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn runs_newest_first_and_continues_past_failures() {
        let order = Arc::new(Mutex::new(vec![]));
        let mut stack = CleanupStack::new();
        for name in ["workdir", "netns", "process"] {
            let order = order.clone();
            stack.push(name, move || {
                order.lock().unwrap().push(name);
                if name == "netns" {
                    return Err("busy".into());
                }
                Ok(())
            });
        }
        let errors = stack.run().unwrap_err();
        assert_eq!(*order.lock().unwrap(), ["process", "netns", "workdir"]);
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].step, "netns");
        assert_eq!(errors.to_string(), "1 cleanup step(s) failed: netns (busy)");
        assert!(stack.is_empty());
        assert!(stack.run().is_ok(), "a second run has nothing left to do");
    }
}
