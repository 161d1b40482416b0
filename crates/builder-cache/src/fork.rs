//! Copying a committed disk into a new fork file, the two ways the pool knows: `FICLONE`
//! (the new file shares every extent of the old one, a metadata operation) and a sparse copy
//! (only the allocated ranges, found with `SEEK_DATA`/`SEEK_HOLE`, copied in the kernel with
//! `copy_file_range`). Also the probe that tells whether a directory's file system reflinks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{io_err, CacheError, ForkMethod};

/// Creates `dst` (mode 0600, not there yet) as a copy of the open `src` made by `method`; a
/// half-made `dst` is removed.
pub(crate) fn copy_disk(src: &File, dst: &Path, method: ForkMethod) -> Result<(), CacheError> {
    let out = create_private(dst)?;
    let copied = match method {
        ForkMethod::Reflink => {
            clone_file(src, &out).map_err(io_err("reflink (FICLONE) the committed disk into", dst))
        }
        ForkMethod::SparseCopy => {
            sparse_copy(src, &out).map_err(io_err("copy the committed disk into", dst))
        }
    };
    if copied.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    copied
}

/// Whether files in `dir` can be cloned with `FICLONE` (tried on two small files made and
/// removed there).
pub(crate) fn dir_reflinks(dir: &Path) -> Result<bool, CacheError> {
    let (a, b) = (
        dir.join(format!(".reflink-probe-{}-a", std::process::id())),
        dir.join(format!(".reflink-probe-{}-b", std::process::id())),
    );
    let probe = || -> Result<bool, CacheError> {
        std::fs::write(&a, [0x5a; 4096]).map_err(io_err("write the reflink probe", &a))?;
        let src = File::open(&a).map_err(io_err("open the reflink probe", &a))?;
        let dst = create_private(&b)?;
        match clone_file(&src, &dst) {
            Ok(()) => Ok(true),
            Err(e) if cannot_reflink(&e) => Ok(false),
            Err(e) => Err(io_err("reflink (FICLONE) the probe", &b)(e)),
        }
    };
    let reflinks = probe();
    for probe_file in [&a, &b] {
        let _ = std::fs::remove_file(probe_file);
    }
    reflinks
}

/// The errors `FICLONE` gives where the file system does not do it.
fn cannot_reflink(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EXDEV | libc::ENOTTY | libc::ENOSYS)
    )
}

fn create_private(path: &Path) -> Result<File, CacheError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))
}

fn clone_file(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source's file descriptor as its argument; both descriptors are
    // open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies the data ranges of `src` into `dst` (empty) at the same offsets, leaving holes.
fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let from = libc::off_t::try_from(from).map_err(io::Error::other)?;
        // SAFETY: lseek on an open descriptor has no memory effects.
        let at = unsafe { libc::lseek(src_fd, from, whence) };
        match at {
            -1 => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            at => Ok(Some(u64::try_from(at).map_err(io::Error::other)?)),
        }
    };
    let mut at = 0;
    while at < len {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let (mut src_off, mut dst_off) = (
            libc::loff_t::try_from(data).map_err(io::Error::other)?,
            libc::loff_t::try_from(data).map_err(io::Error::other)?,
        );
        let mut left = hole - data;
        while left > 0 {
            let chunk = usize::try_from(left.min(1 << 30)).map_err(io::Error::other)?;
            // SAFETY: both descriptors are open; the offsets are ours and the kernel updates
            // them; no user buffer is involved.
            let n = unsafe {
                libc::copy_file_range(src_fd, &mut src_off, dst_fd, &mut dst_off, chunk, 0)
            };
            match n {
                -1 => return Err(io::Error::last_os_error()),
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                n => left -= u64::try_from(n).map_err(io::Error::other)?,
            }
        }
        at = hole;
    }
    Ok(())
}
