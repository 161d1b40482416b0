//! Layers read straight from the Docker daemon's overlay2 store (`<data-root>/overlay2/<id>/diff`)
//! instead of a layer tar: the directory is walked and every entry is applied to the tree as
//! the entry of the tar Docker itself makes of that directory (moby 20.10 `pkg/archive`:
//! `TarWithOptions` with the overlay whiteout converter, which `docker save` and `docker export`
//! stream), through the same validation:
//!
//! - entries in `filepath.Walk` order (depth first, names sorted bytewise), the layer
//!   directory itself left out;
//! - a character device 0:0 `NAME` is the whiteout `.wh.NAME`; a directory with
//!   `trusted.overlay.opaque` = `y` is followed by `.wh..wh..opq`;
//! - mode bits, numeric uid/gid, mtime in whole seconds (truncated), device numbers, only the
//!   `security.capability` xattr; a later name of an inode already seen in this layer (link
//!   count > 1) is a hardlink to the first; sockets are left out;
//! - regular files become [`Sources`] layer files, opened only when written.
//!
//! Overlayfs features a layer tar cannot express (`trusted.overlay.redirect`,
//! `trusted.overlay.metacopy`, other opaque values, `user.overlay.*` of rootless overlayfs) and
//! pre-1970 mtimes are refused with [`ConvertError::UnsupportedLayerDir`], so the caller can
//! fall back to `docker save`. The walk only uses descriptors of directories it opened itself
//! (`openat` with `O_NOFOLLOW | O_DIRECTORY`, `fstatat` with `AT_SYMLINK_NOFOLLOW`,
//! `readlinkat`, `l*xattr` below `/proc/self/fd/<dir>`): it never follows a symlink and never
//! leaves the layer directory.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::archive::{lossy, Span};
use crate::error::{ConvertError, EntryProblem};
use crate::source::Sources;
use crate::tree::{
    check_mtime, check_xattr, symlink, Content, Kind, Meta, Parsed, ParsedKind, Tree, Unpacked,
    OPAQUE, WHITEOUT_PREFIX,
};

/// The one xattr Docker's layer tars carry (`ReadSecurityXattrToTarHeader`).
const CAPABILITY: &[u8] = b"security.capability";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// Overlayfs xattrs whose meaning a layer tar cannot carry.
const REFUSED_XATTRS: &[&[u8]] = &[
    b"trusted.overlay.redirect",
    b"trusted.overlay.metacopy",
    b"trusted.overlay.whiteout",
    b"trusted.overlay.whiteouts",
];
/// The xattr namespace of overlayfs mounted with `userxattr` (rootless).
const USER_OVERLAY_PREFIX: &[u8] = b"user.overlay.";

/// Applies the layer directory `dir` (index `layer` in `sources`, found at `path`) on top of
/// `tree`.
pub(crate) fn apply(
    tree: &mut Tree,
    sources: &mut Sources,
    layer: usize,
    dir: &File,
    path: &Path,
) -> Result<(), ConvertError> {
    let mut walk = Walk {
        tree,
        sources,
        layer,
        layer_path: path,
        unpacked: Unpacked::default(),
        seen: HashMap::new(),
    };
    walk.run(dir)
}

/// A directory being walked: its descriptor, its sorted names, the next one to visit and the
/// length of its path in the layer.
struct Level {
    dir: File,
    names: Vec<CString>,
    next: usize,
    path_len: usize,
}

struct Walk<'a> {
    tree: &'a mut Tree,
    sources: &'a mut Sources,
    layer: usize,
    layer_path: &'a Path,
    unpacked: Unpacked,
    /// Inode → first path, for files with more than one link (Docker's `SeenFiles`).
    seen: HashMap<u64, Vec<u8>>,
}

impl Walk<'_> {
    /// Applies every entry below `root`, depth first (an explicit stack: paths may be
    /// [`crate::tree::MAX_DEPTH`] deep).
    fn run(&mut self, root: &File) -> Result<(), ConvertError> {
        let dir = root
            .try_clone()
            .map_err(|e| self.io("open the directory", b"", e))?;
        let names = list_dir(dir.as_raw_fd()).map_err(|e| self.io("list the directory", b"", e))?;
        let mut stack = vec![Level {
            dir,
            names,
            next: 0,
            path_len: 0,
        }];
        let mut path = Vec::new();
        while let Some(level) = stack.last_mut() {
            let Some(name) = level.names.get(level.next) else {
                stack.pop();
                continue;
            };
            level.next += 1;
            path.truncate(level.path_len);
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.to_bytes());
            if let Some(dir) = self.entry(level.dir.as_raw_fd(), name, &path)? {
                let names = list_dir(dir.as_raw_fd())
                    .map_err(|e| self.io("list the directory", &path, e))?;
                stack.push(Level {
                    dir,
                    names,
                    next: 0,
                    path_len: path.len(),
                });
            }
        }
        Ok(())
    }

    /// Applies the entry `name` of the directory `dir`, at `path` in the layer; returns the
    /// entry opened when it is a directory to walk.
    fn entry(
        &mut self,
        dir: RawFd,
        name: &CStr,
        path: &[u8],
    ) -> Result<Option<File>, ConvertError> {
        let st = fstatat(dir, name).map_err(|e| self.io("stat", path, e))?;
        let format = st.st_mode & libc::S_IFMT;
        if format == libc::S_IFSOCK {
            // tar cannot hold a socket: Docker logs it and leaves it out.
            return Ok(None);
        }
        self.tree.count_entry()?;
        if format == libc::S_IFCHR && st.st_rdev == 0 {
            let mut whiteout = path[..path.len() - name.to_bytes().len()].to_vec();
            whiteout.extend_from_slice(WHITEOUT_PREFIX);
            whiteout.extend_from_slice(name.to_bytes());
            return self.apply(&whiteout, None).map(|()| None);
        }
        let xattrs = self.xattrs(dir, name, path, format)?;
        if st.st_mtime < 0 {
            return Err(self.unsupported(path, "has an mtime before 1970"));
        }
        let mtime = st.st_mtime as u64;
        check_mtime(mtime).map_err(|p| self.invalid(path, p))?;
        let meta = Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: mtime as i64,
            xattrs: xattrs.keep,
        };
        if format == libc::S_IFDIR {
            self.apply(
                path,
                Some(Parsed {
                    kind: ParsedKind::Dir,
                    meta,
                }),
            )?;
            if xattrs.opaque {
                self.tree.count_entry()?;
                let mut marker = path.to_vec();
                marker.push(b'/');
                marker.extend_from_slice(OPAQUE);
                self.apply(&marker, None)?;
            }
            let child =
                open_dir_at(dir, name).map_err(|e| self.io("open the directory", path, e))?;
            let opened = fstat(child.as_raw_fd()).map_err(|e| self.io("stat", path, e))?;
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) {
                return Err(self.io(
                    "open the directory",
                    path,
                    io::Error::other("it was replaced while the layer was read"),
                ));
            }
            return Ok(Some(child));
        }
        if st.st_nlink > 1 {
            if let Some(first) = self.seen.get(&st.st_ino) {
                let kind = ParsedKind::Hardlink(first.clone());
                return self.apply(path, Some(Parsed { kind, meta })).map(|()| None);
            }
            self.seen.insert(st.st_ino, path.to_vec());
        }
        let kind = match format {
            libc::S_IFREG => {
                let source = self.sources.add_layer_file(self.layer, path.to_vec());
                ParsedKind::Other(Kind::File(Content {
                    source,
                    span: Span {
                        offset: 0,
                        len: st.st_size as u64,
                    },
                }))
            }
            libc::S_IFLNK => {
                let target =
                    readlink_at(dir, name).map_err(|e| self.io("read the symlink", path, e))?;
                symlink(target).map_err(|p| self.invalid(path, p))?
            }
            libc::S_IFCHR => ParsedKind::Other(Kind::CharDevice {
                major: libc::major(st.st_rdev),
                minor: libc::minor(st.st_rdev),
            }),
            libc::S_IFBLK => ParsedKind::Other(Kind::BlockDevice {
                major: libc::major(st.st_rdev),
                minor: libc::minor(st.st_rdev),
            }),
            libc::S_IFIFO => ParsedKind::Other(Kind::Fifo),
            _ => {
                return Err(self.unsupported(path, &format!("has the unknown file type {format:o}")))
            }
        };
        self.apply(path, Some(Parsed { kind, meta })).map(|()| None)
    }

    fn apply(&mut self, path: &[u8], entry: Option<Parsed>) -> Result<(), ConvertError> {
        self.tree
            .apply_path(path, entry, &mut self.unpacked)
            .map_err(|p| self.invalid(path, p))
    }

    /// Reads the entry's xattrs: what Docker keeps, whether it is an opaque directory, and a
    /// refusal for overlayfs features a tar cannot express.
    fn xattrs(
        &self,
        dir: RawFd,
        name: &CStr,
        path: &[u8],
        format: u32,
    ) -> Result<Xattrs, ConvertError> {
        let mut found = Xattrs::default();
        let proc_path = proc_path(dir, name);
        let names = list_xattrs(&proc_path).map_err(|e| self.io("list the xattrs of", path, e))?;
        let mut total = 0;
        for xattr in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if REFUSED_XATTRS.contains(&xattr) || xattr.starts_with(USER_OVERLAY_PREFIX) {
                return Err(
                    self.unsupported(path, &format!("has the overlayfs xattr {}", lossy(xattr)))
                );
            }
            if xattr == OPAQUE_XATTR && format == libc::S_IFDIR {
                let value = get_xattr(&proc_path, xattr)
                    .map_err(|e| self.io("read the xattrs of", path, e))?;
                if value != b"y" {
                    return Err(self.unsupported(
                        path,
                        &format!("has trusted.overlay.opaque = {:?}", lossy(&value)),
                    ));
                }
                found.opaque = true;
            } else if xattr == CAPABILITY {
                let value = get_xattr(&proc_path, xattr)
                    .map_err(|e| self.io("read the xattrs of", path, e))?;
                check_xattr(xattr, &value, &mut total).map_err(|p| self.invalid(path, p))?;
                found.keep.push((xattr.to_vec(), value));
            }
        }
        Ok(found)
    }

    fn invalid(&self, path: &[u8], problem: EntryProblem) -> ConvertError {
        ConvertError::InvalidEntry {
            layer: self.layer_path.display().to_string(),
            entry: lossy(path),
            problem,
        }
    }

    fn unsupported(&self, path: &[u8], reason: &str) -> ConvertError {
        ConvertError::UnsupportedLayerDir {
            layer: self.layer_path.to_owned(),
            entry: lossy(path),
            reason: reason.to_owned(),
        }
    }

    fn io(&self, op: &'static str, path: &[u8], source: io::Error) -> ConvertError {
        ConvertError::Io {
            op,
            path: self.layer_path.join(OsStr::from_bytes(path)),
            source,
        }
    }
}

#[derive(Default)]
struct Xattrs {
    /// What a layer tar carries.
    keep: Vec<(Vec<u8>, Vec<u8>)>,
    opaque: bool,
}

/// The names in the directory `fd`, `.` and `..` left out, sorted bytewise.
fn list_dir(fd: RawFd) -> io::Result<Vec<CString>> {
    // SAFETY: fcntl duplicates a descriptor we own; fdopendir takes the duplicate.
    let dup = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: dup is a valid directory descriptor now owned by the stream.
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so dup is still ours to close.
        unsafe { libc::close(dup) };
        return Err(err);
    }
    // fdopendir does not rewind: start at the beginning whatever the descriptor's offset.
    // SAFETY: stream is a valid directory stream.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; readdir returns NULL with errno set on error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: stream is a valid directory stream.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let errno = io::Error::last_os_error();
            break match errno.raw_os_error() {
                Some(0) => Ok(()),
                _ => Err(errno),
            };
        }
        // SAFETY: d_name of a returned entry is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: stream is valid and closed once, which closes dup.
    unsafe { libc::closedir(stream) };
    result?;
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn fstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: name is NUL-terminated, st is large enough for a stat.
    check(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and filled st.
    Ok(unsafe { st.assume_init() })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is large enough for a stat.
    check(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled st.
    Ok(unsafe { st.assume_init() })
}

/// Opens the subdirectory `name` of `dir`, refusing a symlink.
fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: name is NUL-terminated.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    // SAFETY: the kernel just returned this descriptor, nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The target of the symlink `name` in `dir`, whatever its length.
fn readlink_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: name is NUL-terminated, buf is writable for its length.
        let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// `/proc/self/fd/<dir>/<name>`: a path the `l*xattr` calls resolve to the entry `name` of the
/// directory `dir` itself (the magic link is the directory; the last component is not
/// followed).
fn proc_path(dir: RawFd, name: &CStr) -> CString {
    let mut path = format!("/proc/self/fd/{dir}/").into_bytes();
    path.extend_from_slice(name.to_bytes());
    CString::new(path).expect("a directory entry name has no NUL")
}

/// The NUL-separated xattr names of `path` (not following a symlink).
fn list_xattrs(path: &CStr) -> io::Result<Vec<u8>> {
    // SAFETY: path is NUL-terminated; `buf` is null with length 0, or writable for its length.
    read_sized(|buf, len| unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) })
}

/// The value of the xattr `name` of `path` (not following a symlink).
fn get_xattr(path: &CStr, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = CString::new(name).expect("an xattr name from listxattr has no NUL");
    // SAFETY: path and name are NUL-terminated; `buf` is null with length 0, or writable for
    // its length.
    read_sized(|buf, len| unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.cast(), len) })
}

/// Runs an xattr call that reports the size it needs when given no buffer (`call(null, 0)`)
/// and fills a buffer otherwise, again while the attribute grows in between (`ERANGE`).
fn read_sized(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        let n = call(buf.as_mut_ptr(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a layer directory given by the daemon (its path is trusted; what is inside is not).
pub(crate) fn open_layer_dir(path: &Path) -> Result<File, ConvertError> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
        .map_err(|source| ConvertError::Io {
            op: "open the layer directory",
            path: path.to_owned(),
            source,
        })
}
