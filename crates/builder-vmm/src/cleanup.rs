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

/// Removes a jail directory tree, first unmounting every mount at or below it (the binds of
/// files used in place, see [`crate::firecracker`]), deepest first, so removing it never
/// fails on a mount point nor reaches into a bound file system.
pub(crate) fn remove_jail_dir(path: &Path) -> io::Result<()> {
    for mount in mounts_under(path)?.iter().rev() {
        let target = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a mount point"))?;
        // SAFETY: umount2 with a C string we own and no flags.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot unmount {}: {e}", mount.display()),
            ));
        }
    }
    remove_dir_all_if_exists(path)
}

/// The mount points at or below `dir` in this process's mount namespace, in mount order.
fn mounts_under(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let table = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_point)
        .filter(|mount| mount.starts_with(dir))
        .collect())
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and backslash as
/// octal escapes (`\040`).
fn unescape_mount_point(field: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match octal {
            Some(byte) if bytes[i] == b'\\' => {
                out.push(byte);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out).into()
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

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(
            unescape_mount_point("/a\\040b/c\\134d"),
            Path::new("/a b/c\\d")
        );
        assert_eq!(unescape_mount_point("/plain"), Path::new("/plain"));
    }
}
