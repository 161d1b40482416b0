//! The QEMU jail: what Firecracker's jailer does for Firecracker, done here for QEMU. Each VM's
//! QEMU runs
//!
//! - as a uid and gid of its own, leased from an [`IdRange`] ([`IdLease`]: an exclusive `flock`
//!   on a file under [`ID_LOCK_DIR`], so no two VMs on the host share one, whichever process
//!   started them; the lock goes with the VM's cleanup, or with its process when that dies);
//! - in cgroups with its CPU and memory limits ([`crate::cgroup`], the same limits the jailer
//!   writes), joined before exec;
//! - in the VM's network namespace;
//! - in a mount namespace of its own, chrooted into `<jail dir>/<tag>`: a root-owned directory
//!   holding only empty mount points, onto which the child binds read-only the system files
//!   QEMU's binary needs (`/usr`, `/lib*`, `/etc/ld.so.cache`), read-only the kernel, the shared
//!   rootfs and the config drive, read-write (noexec) the scratch disk alone; and a private
//!   `/dev` tmpfs with `null`, `urandom` and, under KVM, a `kvm` node owned by the VM's uid;
//! - with no supplementary groups, no capabilities (a setuid away from root drops them) and
//!   `PR_SET_NO_NEW_PRIVS`; QEMU then adds its own seccomp filter (`-sandbox`).
//!
//! Nothing of the jail is mounted in the host's namespace: the binds exist only in QEMU's
//! private mount namespace (made `MS_PRIVATE` before the first bind, so none propagates back)
//! and vanish with its last process. Removing the jail is removing a directory of empty files.
//!
//! **Why in Rust, between fork and exec, and not util-linux `unshare`/`setpriv`.** The steps
//! are a dozen system calls whose order matters (join the cgroups while still root, enter the
//! netns before the new mount namespace, bind before chroot, chroot before dropping the uid,
//! `no_new_privs` last); chaining `unshare --mount` and `setpriv` cannot bind files into a
//! chroot between them without a shell script in the middle, and would add two programs (and
//! their versions' flags) to what the confinement depends on. Here everything is prepared in
//! the parent (paths as C strings, files opened, mount points made) and the child
//! ([`Jail::enter`]) runs only async-signal-safe system calls: no allocation, no locks. A step
//! that fails writes its name to the child's stderr (QEMU's log) and fails the spawn with the
//! errno.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cgroup::Joined;

/// Where the leases of VM uids are locked, host-wide.
pub const ID_LOCK_DIR: &str = "/run/builder-vmm/ids";

/// Host paths every jail gets read-only, when the host has them: the QEMU binary and the
/// libraries it loads. A path that is a symlink on the host is the same symlink in the jail.
const SYSTEM_PATHS: [&str; 4] = ["/usr", "/lib", "/lib64", "/etc/ld.so.cache"];

/// Why a jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("all {count} uids from {base} are leased to running VMs")]
    NoFreeId { base: u32, count: u32 },
    #[error("cannot lease a VM uid: {path}")]
    Lease {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare the jail: {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} contains a NUL byte")]
    Nul { path: PathBuf },
}

/// The uids and gids VMs run as: `uid_base + n` and `gid_base + n` for `n` below `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub uid_base: u32,
    pub gid_base: u32,
    pub count: u32,
}

impl IdRange {
    /// Leases the first free pair of the range.
    pub fn lease(&self) -> Result<IdLease, JailError> {
        self.lease_in(Path::new(ID_LOCK_DIR))
    }

    fn lease_in(&self, lock_dir: &Path) -> Result<IdLease, JailError> {
        let error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Lease { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(error(lock_dir))?;
        for n in 0..self.count {
            let uid = self.uid_base + n;
            let path = lock_dir.join(uid.to_string());
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(error(&path))?;
            // SAFETY: flock on an fd we own; LOCK_NB makes it return at once.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(IdLease {
                    uid,
                    gid: self.gid_base + n,
                    _lock: file,
                });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(error(&path)(e));
            }
        }
        Err(JailError::NoFreeId {
            base: self.uid_base,
            count: self.count,
        })
    }
}

/// A uid and gid no other VM on this host runs as while this value lives.
#[derive(Debug)]
pub struct IdLease {
    pub uid: u32,
    pub gid: u32,
    _lock: File,
}

impl IdLease {
    /// `(uid, gid)`.
    pub fn ids(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }
}

/// One bind mount made in the child: `source` onto `target` (inside the jail).
#[derive(Debug)]
struct Bind {
    source: CString,
    target: CString,
    /// `MS_RDONLY`, `MS_NOSUID`, ... applied by a remount of the bind.
    flags: libc::c_ulong,
}

/// A device node made in the jail's private `/dev`.
#[derive(Debug)]
struct DeviceNode {
    path: CString,
    mode: libc::mode_t,
    dev: libc::dev_t,
    /// Owned by the VM's ids rather than root.
    owned: bool,
}

/// One VM's jail, prepared in the parent; [`Jail::enter`] confines the child.
#[derive(Debug)]
pub struct Jail {
    root: PathBuf,
    root_c: CString,
    dev_c: CString,
    binds: Vec<Bind>,
    nodes: Vec<DeviceNode>,
    uid: u32,
    gid: u32,
    netns: Option<OwnedFd>,
    cgroups: Joined,
    /// Fds the child keeps across exec (the TAP).
    inherit: Vec<RawFd>,
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul {
        path: path.to_path_buf(),
    })
}

/// The jail's path for a host path (`/usr` → `<root>/usr`).
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Jail {
    /// Makes the jail directory `root` (which must not exist; its parent is created root-only)
    /// with the mount points of QEMU's files, to run as `uid` and `gid`. Read-only binds are made
    /// `nosuid,nodev`; the writable ones `nosuid,nodev,noexec`.
    pub fn new(
        root: &Path,
        (uid, gid): (u32, u32),
        cgroups: Joined,
        netns: Option<OwnedFd>,
    ) -> Result<Self, JailError> {
        let prepare = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Prepare { path, source }
        };
        if let Some(parent) = root.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(prepare(parent))?;
        }
        fs::DirBuilder::new()
            .mode(0o755)
            .create(root)
            .map_err(prepare(root))?;
        let dev = root.join("dev");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&dev)
            .map_err(prepare(&dev))?;
        let mut jail = Jail {
            root_c: cstring(root)?,
            dev_c: cstring(&dev)?,
            root: root.to_path_buf(),
            binds: vec![],
            nodes: vec![],
            uid,
            gid,
            netns,
            cgroups,
            inherit: vec![],
        };
        for (name, mode, major, minor) in [("null", 0o666, 1, 3), ("urandom", 0o444, 1, 9)] {
            jail.nodes.push(DeviceNode {
                path: cstring(&dev.join(name))?,
                mode: libc::S_IFCHR | mode,
                dev: libc::makedev(major, minor),
                owned: false,
            });
        }
        for path in SYSTEM_PATHS.map(Path::new) {
            jail.add_system_path(path)?;
        }
        Ok(jail)
    }

    /// The jail's root directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn add_system_path(&mut self, path: &Path) -> Result<(), JailError> {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return Ok(());
        };
        let target = inside(&self.root, path);
        if meta.file_type().is_symlink() {
            let link = fs::read_link(path).map_err(|source| JailError::Prepare {
                path: path.to_path_buf(),
                source,
            })?;
            make_parent(&target)?;
            return std::os::unix::fs::symlink(link, &target).map_err(|source| {
                JailError::Prepare {
                    path: target.clone(),
                    source,
                }
            });
        }
        self.bind(path, &target, false)
    }

    /// Binds the host file `source` at `name` in the jail (`/vmlinux`, `/scratch.ext4`, ...);
    /// read-only unless `writable`.
    pub fn bind_file(
        &mut self,
        source: &Path,
        name: &str,
        writable: bool,
    ) -> Result<(), JailError> {
        let target = inside(&self.root, Path::new(name));
        self.bind(source, &target, writable)
    }

    /// Binds the binary at its own path, unless a system path already brings it.
    pub fn bind_binary(&mut self, binary: &Path) -> Result<(), JailError> {
        let covered = SYSTEM_PATHS
            .iter()
            .any(|p| binary.starts_with(p) && fs::metadata(p).is_ok_and(|m| m.is_dir()));
        if covered {
            return Ok(());
        }
        self.bind(binary, &inside(&self.root, binary), false)
    }

    fn bind(&mut self, source: &Path, target: &Path, writable: bool) -> Result<(), JailError> {
        let meta = fs::metadata(source).map_err(|source_error| JailError::Prepare {
            path: source.to_path_buf(),
            source: source_error,
        })?;
        make_parent(target)?;
        let made = if meta.is_dir() {
            fs::DirBuilder::new().mode(0o755).create(target)
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(target)
                .map(drop)
        };
        made.map_err(|e| JailError::Prepare {
            path: target.to_path_buf(),
            source: e,
        })?;
        let flags = libc::MS_NOSUID
            | libc::MS_NODEV
            | if writable {
                libc::MS_NOEXEC
            } else {
                libc::MS_RDONLY
            };
        self.binds.push(Bind {
            source: cstring(source)?,
            target: cstring(target)?,
            flags,
        });
        Ok(())
    }

    /// A `/dev/kvm` in the jail, owned by the VM's uid (KVM only).
    pub fn add_kvm(&mut self) -> Result<(), JailError> {
        self.nodes.push(DeviceNode {
            path: cstring(&self.root.join("dev/kvm"))?,
            mode: libc::S_IFCHR | 0o600,
            dev: libc::makedev(10, 232),
            owned: true,
        });
        Ok(())
    }

    /// Keeps `fd` open across exec in the child (it is close-on-exec in the parent).
    pub fn inherit(&mut self, fd: RawFd) {
        self.inherit.push(fd);
    }

    /// Confines the calling process (the child between fork and exec): cgroups, netns, mount
    /// namespace with the binds and `/dev`, chroot, no groups, the VM's gid and uid,
    /// `no_new_privs`, the inherited fds. Only async-signal-safe system calls.
    pub fn enter(&self) -> io::Result<()> {
        step(self.cgroups.enter(), b"joining the cgroups")?;
        if let Some(netns) = &self.netns {
            // SAFETY: setns with a namespace fd we own.
            let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            check(rc, b"entering the network namespace")?;
        }
        // SAFETY: unshare with a flag: this process gets its own copy of the mount table.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        check(rc, b"unsharing the mount namespace")?;
        // SAFETY: mount with static C strings and null pointers where the call allows them.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        check(rc, b"making the mounts private")?;
        for bind in &self.binds {
            // SAFETY: mount with C strings prepared in the parent and null pointers the call
            // allows.
            let rc = unsafe {
                libc::mount(
                    bind.source.as_ptr(),
                    bind.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            check(rc, b"binding a file into the jail")?;
            // SAFETY: as above; the remount applies the flags to the bind just made.
            let rc = unsafe {
                libc::mount(
                    std::ptr::null(),
                    bind.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | bind.flags,
                    std::ptr::null(),
                )
            };
            check(rc, b"restricting a bind in the jail")?;
        }
        // SAFETY: mount of a tmpfs with static C strings on a path prepared in the parent.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                self.dev_c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=0755,size=64k".as_ptr().cast(),
            )
        };
        check(rc, b"mounting the jail's /dev")?;
        for node in &self.nodes {
            // SAFETY: mknod with a C string prepared in the parent.
            let rc = unsafe { libc::mknod(node.path.as_ptr(), node.mode, node.dev) };
            check(rc, b"making a device node in the jail")?;
            // mknod is subject to the umask: set the mode the node is meant to have.
            // SAFETY: chmod/chown with the same C string.
            let rc = unsafe { libc::chmod(node.path.as_ptr(), node.mode & 0o7777) };
            check(rc, b"setting a device node's mode")?;
            if node.owned {
                // SAFETY: as above.
                let rc = unsafe { libc::chown(node.path.as_ptr(), self.uid, self.gid) };
                check(rc, b"handing a device node to the VM's uid")?;
            }
        }
        // SAFETY: chdir/chroot with a C string prepared in the parent, then a static one.
        let rc = unsafe { libc::chdir(self.root_c.as_ptr()) };
        check(rc, b"entering the jail")?;
        // SAFETY: as above.
        let rc = unsafe { libc::chroot(c".".as_ptr()) };
        check(rc, b"chroot")?;
        // SAFETY: as above.
        let rc = unsafe { libc::chdir(c"/".as_ptr()) };
        check(rc, b"chdir /")?;
        // SAFETY: an empty group list.
        let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
        check(rc, b"dropping supplementary groups")?;
        // SAFETY: integer arguments.
        let rc = unsafe { libc::setresgid(self.gid, self.gid, self.gid) };
        check(rc, b"setting the VM's gid")?;
        // SAFETY: integer arguments; leaving uid 0 clears every capability.
        let rc = unsafe { libc::setresuid(self.uid, self.uid, self.uid) };
        check(rc, b"setting the VM's uid")?;
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        check(rc, b"setting no_new_privs")?;
        for &fd in &self.inherit {
            // SAFETY: fcntl on an fd the parent opened for the child; clears FD_CLOEXEC.
            let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
            check(rc, b"keeping the TAP open")?;
        }
        Ok(())
    }
}

fn make_parent(target: &Path) -> Result<(), JailError> {
    let Some(parent) = target.parent() else {
        return Ok(());
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(|source| JailError::Prepare {
            path: parent.to_path_buf(),
            source,
        })
}

/// `rc < 0` → the errno, after writing which step failed to stderr (async-signal-safe).
fn check(rc: libc::c_int, what: &'static [u8]) -> io::Result<()> {
    if rc >= 0 {
        return Ok(());
    }
    step(Err(io::Error::last_os_error()), what)
}

fn step(result: io::Result<()>, what: &'static [u8]) -> io::Result<()> {
    if result.is_err() {
        let prefix: &[u8] = b"builder-vmm jail: failed ";
        for part in [prefix, what, b"\n"] {
            // SAFETY: write of a static buffer to stderr; its result does not matter.
            unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
        }
    }
    result
}

/// Makes `file` writable by the VM alone (the scratch disk): owner `uid:gid`, mode 0600.
pub fn hand_over(file: &Path, (uid, gid): (u32, u32)) -> Result<(), JailError> {
    let error = |source| JailError::Prepare {
        path: file.to_path_buf(),
        source,
    };
    std::os::unix::fs::chown(file, Some(uid), Some(gid)).map_err(error)?;
    fs::set_permissions(file, fs::Permissions::from_mode(0o600)).map_err(error)
}

/// Makes `file` readable by the VM's group and writable by nobody but root (the config
/// drive): owner `root:gid`, mode 0440.
pub fn lend_read_only(file: &Path, gid: u32) -> Result<(), JailError> {
    let error = |source| JailError::Prepare {
        path: file.to_path_buf(),
        source,
    };
    std::os::unix::fs::chown(file, Some(0), Some(gid)).map_err(error)?;
    fs::set_permissions(file, fs::Permissions::from_mode(0o440)).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let range = IdRange {
            uid_base: 5000,
            gid_base: 7000,
            count: 2,
        };
        let a = range.lease_in(dir.path()).unwrap();
        let b = range.lease_in(dir.path()).unwrap();
        assert_eq!((a.uid, a.gid, b.uid, b.gid), (5000, 7000, 5001, 7001));
        let err = range.lease_in(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "all 2 uids from 5000 are leased to running VMs"
        );
        drop(a);
        assert_eq!(range.lease_in(dir.path()).unwrap().uid, 5000);
    }
}
