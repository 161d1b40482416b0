//! Giving the pool's directory a file system that reflinks: when the directory's own cannot,
//! a sparse XFS image `<dir>.xfs` is made once (`mkfs.xfs -m reflink=1`) and loop-mounted on
//! the directory; a later open finds it mounted (`/proc/self/mountinfo`) or mounts the image
//! it left. Whatever goes wrong here only costs speed: the pool falls back to sparse copies
//! and says why in a [`PoolNote`].

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fork::dir_reflinks;
use crate::{io_err, CacheError, ForkMethod, PoolNote};

/// Makes `dir` (and its parents) and picks how forks are made there, mounting a reflink
/// image on it when `image_bytes` asks for one and the directory's file system cannot reflink.
pub(crate) fn prepare(
    dir: &Path,
    image_bytes: Option<u64>,
    notes: &mut Vec<PoolNote>,
) -> Result<ForkMethod, CacheError> {
    std::fs::create_dir_all(dir).map_err(io_err("create the cache pool directory", dir))?;
    // Two daemons starting at once: the second waits, then finds the image mounted. (The lock
    // is on the directory's own inode, under the mount; closing the descriptor releases it.)
    let dir_lock = File::open(dir).map_err(io_err("open", dir))?;
    // SAFETY: flock on an open descriptor has no memory effects.
    if unsafe { libc::flock(dir_lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err("lock", dir)(std::io::Error::last_os_error()));
    }
    if dir_reflinks(dir)? {
        return Ok(ForkMethod::Reflink);
    }
    let Some(bytes) = image_bytes else {
        return Ok(ForkMethod::SparseCopy);
    };
    let image = image(dir);
    match mount_image(dir, &image, bytes) {
        Ok(made) => {
            notes.push(PoolNote::ReflinkImageMounted { image, made });
            Ok(ForkMethod::Reflink)
        }
        Err(reason) => {
            notes.push(PoolNote::ReflinkImageUnavailable { image, reason });
            Ok(ForkMethod::SparseCopy)
        }
    }
}

/// Mounts `image` (made first, of `bytes`, when it is not there) on `dir`; true when it was
/// made now. The error is the reason, for a note.
fn mount_image(dir: &Path, image: &Path, bytes: u64) -> Result<bool, String> {
    if is_mount_point(dir)? {
        return Err(format!(
            "{} is already a mount point, of a file system that cannot reflink",
            dir.display()
        ));
    }
    let made = !image.exists();
    if made {
        make_image(image, bytes).inspect_err(|_| {
            let _ = std::fs::remove_file(image);
        })?;
    }
    run(Command::new("mount")
        .args(["-t", "xfs", "-o", "loop"])
        .arg(image)
        .arg(dir))?;
    match dir_reflinks(dir) {
        Ok(true) => Ok(made),
        Ok(false) => Err(format!(
            "{} mounted on {} does not reflink",
            image.display(),
            dir.display()
        )),
        Err(e) => Err(error_chain(&e)),
    }
}

/// Unmounts the reflink image from `dir` when one is mounted there (`<dir>.xfs` exists and
/// `dir` is a mount point); lazily, so open descriptors in it stay valid until closed, and the
/// loop device goes with the last of them. True when it unmounted.
pub(crate) fn release(dir: &Path) -> Result<bool, CacheError> {
    let image_path = image(dir);
    let mounted = is_mount_point(dir).map_err(|reason| CacheError::Unmount {
        dir: dir.to_path_buf(),
        source: std::io::Error::other(reason),
    })?;
    if !image_path.exists() || !mounted {
        return Ok(false);
    }
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| {
        CacheError::Unmount {
            dir: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        }
    })?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(CacheError::Unmount {
            dir: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(true)
}

/// The reflink image of the pool at `dir`: `<dir>.xfs`.
fn image(dir: &Path) -> PathBuf {
    let mut image = OsString::from(dir);
    image.push(".xfs");
    PathBuf::from(image)
}

fn make_image(image: &Path, bytes: u64) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
    file.set_len(bytes)
        .map_err(|e| format!("cannot size {} to {bytes} bytes: {e}", image.display()))?;
    run(Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(image))
}

/// Runs `command`; the error says what failed and how.
fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether something is mounted on `dir`, as `/proc/self/mountinfo` lists it.
fn is_mount_point(dir: &Path) -> Result<bool, String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let dir = dir.as_os_str().to_string_lossy();
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| unescape_mount_point(mount_point) == dir))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount_point(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escaped
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_point;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mount_point(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_point(r"/plain\0"), r"/plain\0");
    }
}
