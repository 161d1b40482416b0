//! Writes the merged tree into a fresh directory that `mkfs.ext4 -d` then copies.
//!
//! Only `*at` system calls relative to directory descriptors this module opened itself are
//! used, with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, and every name is a single validated
//! component, so nothing outside the directory can be reached even if the tree were wrong.
//! Zero-filled 4 KiB blocks of file content become holes. Ownership is set before the mode
//! (chown clears setuid), xattrs after both (chown clears `security.capability`), and times
//! last, children before their directory.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;
use crate::source::Sources;
use crate::tree::{Content, Kind, Meta, NodeId, Tree, ROOT};

const BLOCK: u64 = 4096;
const COPY_CHUNK: usize = 1 << 20;

/// What the written tree needs in an ext4 file system, for sizing it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Usage {
    /// Distinct inodes (hardlinks counted once), the root excluded.
    pub inodes: u64,
    /// Directory entries, the root excluded.
    pub entries: u64,
    /// 4 KiB blocks of file data (holes excluded), long symlinks, directories and xattr blocks.
    pub blocks: u64,
}

pub(crate) fn materialize(
    tree: &Tree,
    sources: &Sources,
    dir: &Path,
) -> Result<Usage, ConvertError> {
    let root = open_dir_path(dir).map_err(|source| ConvertError::Io {
        op: "open the staging directory",
        path: dir.to_owned(),
        source,
    })?;
    let mut writer = Writer {
        root: root.as_raw_fd(),
        tree,
        sources,
        dir,
        first_paths: HashMap::new(),
        usage: Usage::default(),
        buf: vec![0; COPY_CHUNK],
    };
    let mut path = Vec::new();
    writer.write_children(root.as_raw_fd(), ROOT, &mut path)?;
    writer.usage.blocks += dir_blocks(tree, ROOT);
    let root_meta = &tree.nodes[ROOT].meta;
    set_owner_mode(root.as_raw_fd(), None, root_meta, true)
        .and_then(|()| set_xattrs(root.as_raw_fd(), None, root_meta))
        .and_then(|()| set_times(root.as_raw_fd(), None, root_meta.mtime))
        .map_err(|source| ConvertError::Io {
            op: "set the attributes of",
            path: dir.to_owned(),
            source,
        })?;
    Ok(writer.usage)
}

struct Writer<'a> {
    /// The staging root, which hardlink sources are resolved against.
    root: RawFd,
    tree: &'a Tree,
    sources: &'a Sources,
    dir: &'a Path,
    /// Path (relative to the staging root) where each multiply-linked inode was first written.
    first_paths: HashMap<NodeId, CString>,
    usage: Usage,
    buf: Vec<u8>,
}

impl Writer<'_> {
    fn write_children(
        &mut self,
        dirfd: RawFd,
        dir: NodeId,
        path: &mut Vec<u8>,
    ) -> Result<(), ConvertError> {
        let children = self
            .tree
            .children(dir)
            .expect("write_children is called on directories");
        for (name, &child) in children {
            let len = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            self.write_node(dirfd, name, child, path)?;
            path.truncate(len);
        }
        // Times last: creating the children above changed this directory's entries.
        for (name, &child) in children {
            let cname = cstring(name);
            set_times(dirfd, Some(&cname), self.tree.nodes[child].meta.mtime)
                .map_err(|source| self.io("set the times of", path, name, source))?;
        }
        Ok(())
    }

    fn write_node(
        &mut self,
        dirfd: RawFd,
        name: &[u8],
        id: NodeId,
        path: &[u8],
    ) -> Result<(), ConvertError> {
        let node = &self.tree.nodes[id];
        let cname = cstring(name);
        self.usage.entries += 1;
        if let Some(first) = self.first_paths.get(&id) {
            // SAFETY: both paths are NUL-terminated; the first is relative to the staging
            // root, made of components this module created as real directories.
            let rc = unsafe { libc::linkat(self.root, first.as_ptr(), dirfd, cname.as_ptr(), 0) };
            return check(rc).map_err(|source| self.io("hardlink", path, b"", source));
        }
        self.usage.inodes += 1;
        if !matches!(node.kind, Kind::Dir(_)) {
            self.first_paths.insert(id, cstring(path));
        }
        if xattr_block_needed(&node.meta) {
            self.usage.blocks += 1;
        }
        let result = match &node.kind {
            Kind::Dir(_) => {
                // SAFETY: cname is NUL-terminated, dirfd is an open directory.
                check(unsafe { libc::mkdirat(dirfd, cname.as_ptr(), 0o700) })
                    .map_err(|source| self.io("create the directory", path, b"", source))?;
                let fd = open_at(dirfd, &cname, libc::O_DIRECTORY | libc::O_RDONLY)
                    .map_err(|source| self.io("open the directory", path, b"", source))?;
                let mut child_path = path.to_vec();
                self.write_children(fd.as_raw_fd(), id, &mut child_path)?;
                self.usage.blocks += dir_blocks(self.tree, id);
                set_owner_mode(fd.as_raw_fd(), None, &node.meta, true)
                    .and_then(|()| set_xattrs(fd.as_raw_fd(), None, &node.meta))
            }
            Kind::File(content) => {
                let fd = open_at(dirfd, &cname, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY)
                    .map_err(|source| self.io("create", path, b"", source))?;
                let file = File::from(fd);
                self.copy_content(&file, content)
                    .map_err(|source| self.io("write", path, b"", source))?;
                set_owner_mode(file.as_raw_fd(), None, &node.meta, true)
                    .and_then(|()| set_xattrs(file.as_raw_fd(), None, &node.meta))
            }
            Kind::Symlink(target) => {
                if target.len() >= 60 {
                    self.usage.blocks += 1;
                }
                let ctarget = cstring(target);
                // SAFETY: both strings are NUL-terminated, dirfd is an open directory.
                check(unsafe { libc::symlinkat(ctarget.as_ptr(), dirfd, cname.as_ptr()) })
                    .and_then(|()| set_owner_mode(dirfd, Some(&cname), &node.meta, false))
                    .and_then(|()| set_xattrs(dirfd, Some(&cname), &node.meta))
            }
            Kind::CharDevice { major, minor } => {
                make_node(dirfd, &cname, libc::S_IFCHR, *major, *minor, &node.meta)
            }
            Kind::BlockDevice { major, minor } => {
                make_node(dirfd, &cname, libc::S_IFBLK, *major, *minor, &node.meta)
            }
            Kind::Fifo => make_node(dirfd, &cname, libc::S_IFIFO, 0, 0, &node.meta),
        };
        result.map_err(|source| self.io("write", path, b"", source))
    }

    /// Copies `len` bytes at `offset` of a source into `file`, leaving zero blocks as holes.
    fn copy_content(&mut self, file: &File, content: &Content) -> io::Result<()> {
        let located = self.sources.locate(content)?;
        let (source, offset, len) = (located.file(), located.offset, located.len);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_CHUNK as u64) as usize;
            let buf = &mut self.buf[..n];
            source.read_exact_at(buf, offset + done)?;
            let mut start = 0;
            while start < n {
                let end = (start + BLOCK as usize).min(n);
                if !is_zero(&buf[start..end]) {
                    // Extend the run of non-zero blocks as far as it goes.
                    let mut run_end = end;
                    while run_end < n {
                        let next = (run_end + BLOCK as usize).min(n);
                        if is_zero(&buf[run_end..next]) {
                            break;
                        }
                        run_end = next;
                    }
                    file.write_all_at(&buf[start..run_end], done + start as u64)?;
                    self.usage.blocks += ((run_end - start) as u64).div_ceil(BLOCK);
                    start = run_end;
                } else {
                    start = end;
                }
            }
            done += n as u64;
        }
        file.set_len(len)
    }

    fn io(&self, op: &'static str, path: &[u8], suffix: &[u8], source: io::Error) -> ConvertError {
        let mut full: PathBuf = self.dir.to_owned();
        full.push(std::ffi::OsStr::from_bytes(path));
        if !suffix.is_empty() {
            full.push(std::ffi::OsStr::from_bytes(suffix));
        }
        ConvertError::Io {
            op,
            path: full,
            source,
        }
    }
}

/// Whether a block (at most 4 KiB) is all zeros; a slice comparison is a `memcmp`.
fn is_zero(block: &[u8]) -> bool {
    static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    block == &ZEROS[..block.len()]
}

fn cstring(bytes: &[u8]) -> CString {
    CString::new(bytes).expect("tree names and targets never contain NUL")
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir_path(dir: &Path) -> io::Result<OwnedFd> {
    let cpath = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    open_at(libc::AT_FDCWD, &cpath, libc::O_DIRECTORY | libc::O_RDONLY)
}

/// `openat` that never follows a symlink in the last component.
fn open_at(dirfd: RawFd, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; the returned descriptor is owned by the OwnedFd.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn make_node(
    dirfd: RawFd,
    name: &CString,
    kind: libc::mode_t,
    major: u32,
    minor: u32,
    meta: &Meta,
) -> io::Result<()> {
    let dev = libc::makedev(major, minor);
    // SAFETY: name is NUL-terminated, dirfd is an open directory.
    check(unsafe { libc::mknodat(dirfd, name.as_ptr(), kind | 0o600, dev) })?;
    set_owner_mode(dirfd, Some(name), meta, true)?;
    set_xattrs(dirfd, Some(name), meta)
}

/// Sets uid/gid, then the mode (when `chmod`; symlinks have none). With `name`, the entry is
/// `name` in `fd` and is not followed; without, it is `fd` itself.
fn set_owner_mode(fd: RawFd, name: Option<&CString>, meta: &Meta, chmod: bool) -> io::Result<()> {
    // SAFETY: plain system calls on descriptors and NUL-terminated names.
    unsafe {
        match name {
            Some(name) => {
                check(libc::fchownat(
                    fd,
                    name.as_ptr(),
                    meta.uid,
                    meta.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                ))?;
                if chmod {
                    // The entry was just created by us and is not a symlink.
                    check(libc::fchmodat(fd, name.as_ptr(), meta.mode, 0))?;
                }
            }
            None => {
                check(libc::fchown(fd, meta.uid, meta.gid))?;
                if chmod {
                    check(libc::fchmod(fd, meta.mode))?;
                }
            }
        }
    }
    Ok(())
}

fn set_xattrs(fd: RawFd, name: Option<&CString>, meta: &Meta) -> io::Result<()> {
    if meta.xattrs.is_empty() {
        return Ok(());
    }
    // For an entry named in a directory, go through the directory's /proc/self/fd link: the
    // link is resolved to the directory, and lsetxattr does not follow the last component.
    let path = name.map(|name| {
        let mut path = format!("/proc/self/fd/{fd}/").into_bytes();
        path.extend_from_slice(name.as_bytes());
        cstring(&path)
    });
    for (key, value) in &meta.xattrs {
        let key = cstring(key);
        // SAFETY: key and path are NUL-terminated, value is a valid buffer of its length.
        let rc = unsafe {
            match &path {
                Some(path) => libc::lsetxattr(
                    path.as_ptr(),
                    key.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                ),
                None => libc::fsetxattr(fd, key.as_ptr(), value.as_ptr().cast(), value.len(), 0),
            }
        };
        check(rc)?;
    }
    Ok(())
}

/// Sets atime and mtime to `mtime` (seconds) without following a symlink.
fn set_times(fd: RawFd, name: Option<&CString>, mtime: i64) -> io::Result<()> {
    let time = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: times is a valid array of two timespecs; name (if any) is NUL-terminated.
    check(unsafe {
        match name {
            Some(name) => {
                libc::utimensat(fd, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
            }
            None => libc::futimens(fd, times.as_ptr()),
        }
    })
}

/// Blocks a directory's entries take in a linear ext4 directory (8-byte header, name padded
/// to 4 bytes, plus `.` and `..`), with a spare block for blocks not filled to the end.
fn dir_blocks(tree: &Tree, dir: NodeId) -> u64 {
    let bytes: u64 = tree
        .children(dir)
        .map(|c| {
            c.keys()
                .map(|name| 8 + (name.len() as u64).div_ceil(4) * 4)
                .sum()
        })
        .unwrap_or(0)
        + 24;
    bytes.div_ceil(BLOCK) + u64::from(bytes > BLOCK)
}

/// Whether the xattrs of an inode overflow the ~100 bytes a 256-byte inode holds inline.
fn xattr_block_needed(meta: &Meta) -> bool {
    let bytes: usize = meta
        .xattrs
        .iter()
        .map(|(k, v)| 16 + k.len().div_ceil(4) * 4 + v.len().div_ceil(4) * 4)
        .sum();
    bytes > 96
}
