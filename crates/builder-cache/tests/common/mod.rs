//! What the pool's tests share: root checks, loop mounts that are undone when dropped (a
//! failing test leaves none behind), fsck, file hashing.

#![allow(dead_code)] // Each test binary uses its own part.

use std::path::{Path, PathBuf};
use std::process::Command;

use builder_cache::{CacheKey, CachePool, PoolConfig};
use sha2::{Digest, Sha256};

/// Whether we are root (loop mounts need it); says SKIPPED when not.
pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: loop mounts need root");
    }
    root
}

pub fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Something mounted on `dir`; unmounted when dropped.
pub struct Mounted {
    pub dir: PathBuf,
    /// The temporary directory made to mount on, removed after the unmount.
    _made: Option<tempfile::TempDir>,
}

impl Mounted {
    /// Loop-mounts the ext4 `image` on a new temporary directory (`options`: "rw" or "ro").
    pub fn ext4(image: &Path, options: &str) -> Mounted {
        let made = tempfile::tempdir().unwrap();
        let dir = made.path().to_owned();
        let options = format!("loop,{options}");
        run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                image.as_os_str(),
                dir.as_os_str(),
            ],
        );
        Mounted {
            dir,
            _made: Some(made),
        }
    }

    /// Takes charge of whatever is (or will be) mounted on `dir`.
    pub fn at(dir: &Path) -> Mounted {
        Mounted {
            dir: dir.to_owned(),
            _made: None,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        while Command::new("umount")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {}
    }
}

/// Writes `content` to `name` in the fork's file system (mounted, written, unmounted).
pub fn write_into(image: &Path, name: &str, content: &[u8]) {
    let mounted = Mounted::ext4(image, "rw");
    std::fs::write(mounted.dir.join(name), content).unwrap();
}

/// Reads `name` from the image's file system (mounted read-only); `None` when absent.
pub fn read_from(image: &Path, name: &str) -> Option<Vec<u8>> {
    let mounted = Mounted::ext4(image, "ro");
    std::fs::read(mounted.dir.join(name)).ok()
}

/// `e2fsck -fn` finds nothing wrong.
pub fn fsck_clean(image: &Path) {
    run("e2fsck", &["-fn".as_ref(), image.as_os_str()]);
}

pub fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

pub fn key(name: &str) -> CacheKey {
    CacheKey::new("tests", name).unwrap()
}

/// A pool in `dir` with small disks and a generous limit.
pub fn config(dir: &Path) -> PoolConfig {
    PoolConfig {
        dir: dir.to_owned(),
        max_bytes: 1 << 40,
        disk_mib: 256,
        reflink_image_bytes: None,
    }
}

/// The committed disk of `key` in a pool at `dir`.
pub fn committed_disk(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join("keys").join(key.id().as_str()).join("disk.ext4")
}

/// Forks `key` and commits it untouched.
pub fn commit_untouched(pool: &CachePool, key: &CacheKey, fork_id: &str) {
    let fork = pool.fork(key, fork_id).unwrap();
    pool.commit(fork).unwrap();
}
