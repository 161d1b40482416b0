//! Shared test support: the real Docker daemon (`DOCKER_HOST`, `BUILDER_TEST_BASE_IMAGE`, set up
//! by `scripts/services.sh`), converting, `e2fsck`, a loop mount of the result, and a
//! comparable snapshot of a file tree taken either from a tar stream or a mounted directory.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use builder_rootfs::{convert, ConvertOptions, ConvertReport};
use sha2::{Digest, Sha256};

/// `/usr/bin/docker` against the test daemon; fails the test if the daemon is not configured.
pub fn docker() -> Command {
    let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| {
        panic!("DOCKER_HOST is not set: start the test services with scripts/services.sh (it exports DOCKER_HOST and BUILDER_TEST_BASE_IMAGE)")
    });
    let mut command = Command::new("/usr/bin/docker");
    command.env("DOCKER_HOST", host);
    command
}

/// The busybox base image the tests build on.
pub fn base_image() -> String {
    std::env::var("BUILDER_TEST_BASE_IMAGE").unwrap_or_else(|_| {
        panic!(
            "BUILDER_TEST_BASE_IMAGE is not set: start the test services with scripts/services.sh"
        )
    })
}

/// Runs a command, failing the test with its output if it fails; returns stdout.
pub fn run(command: &mut Command) -> Vec<u8> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// `docker build` of `context` tagged `tag`.
pub fn build(context: &Path, tag: &str) {
    run(docker()
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", tag])
        .arg(context));
}

/// `docker save` of `tag` into `archive`.
pub fn save(tag: &str, archive: &Path) {
    run(docker().args(["save", "-o"]).arg(archive).arg(tag));
}

/// `docker export` of a (never started) container of `tag` into `archive`.
pub fn export(tag: &str, archive: &Path) {
    let id = String::from_utf8(run(docker().args(["create", tag, "/bin/true"]))).unwrap();
    let id = id.trim();
    run(docker().args(["export", "-o"]).arg(archive).arg(id));
    run(docker().args(["rm", id]));
}

pub fn remove_image(tag: &str) {
    run(docker().args(["rmi", "-f", tag]));
}

/// Converts with default options and a work area inside `scratch`.
pub fn convert_in(scratch: &Path, archive: &Path, output: &Path) -> ConvertReport {
    let work = scratch.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let options = ConvertOptions {
        work_dir: work,
        ..ConvertOptions::default()
    };
    convert(archive, output, &options)
        .unwrap_or_else(|e| panic!("conversion failed: {}", chain(&e)))
}

pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// `e2fsck -fn`: the file system must be clean.
pub fn e2fsck(image: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(image));
}

/// A read-only loop mount, unmounted on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn new(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(image)
            .arg(dir.path()));
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File { size: u64, sha256: String },
    Dir,
    Symlink(Vec<u8>),
    Char(u64, u64),
    Block(u64, u64),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Path (relative, no leading `/`) → attributes, plus hardlink groups (each sorted, groups
/// of two or more names).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: BTreeMap<Vec<u8>, Attrs>,
    pub hardlinks: Vec<Vec<Vec<u8>>>,
}

fn hash(reader: &mut dyn Read) -> (u64, String) {
    let mut hasher = Sha256::new();
    let size = std::io::copy(reader, &mut hasher).unwrap();
    (size, hex::encode(hasher.finalize()))
}

fn clean(path: &[u8]) -> Vec<u8> {
    let parts: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    parts.join(&b'/')
}

impl Snapshot {
    /// Reads a tar stream as `docker export` writes it (hardlinks as `Link` entries).
    pub fn from_tar(archive: &Path) -> Self {
        let mut snapshot = Snapshot::default();
        let mut groups: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        let mut tar = tar::Archive::new(File::open(archive).unwrap());
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = clean(&entry.path_bytes());
            if path.is_empty() {
                continue;
            }
            let header = entry.header().clone();
            let mut xattrs = BTreeMap::new();
            if let Some(extensions) = entry.pax_extensions().unwrap() {
                for extension in extensions {
                    let extension = extension.unwrap();
                    if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(name.to_vec(), extension.value_bytes().to_vec());
                    }
                }
            }
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let kind = match header.entry_type() {
                tar::EntryType::Regular => {
                    let (size, sha256) = hash(&mut entry);
                    Kind::File { size, sha256 }
                }
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(link.unwrap()),
                tar::EntryType::Char => Kind::Char(
                    header.device_major().unwrap().unwrap().into(),
                    header.device_minor().unwrap().unwrap().into(),
                ),
                tar::EntryType::Block => Kind::Block(
                    header.device_major().unwrap().unwrap().into(),
                    header.device_minor().unwrap().unwrap().into(),
                ),
                tar::EntryType::Fifo => Kind::Fifo,
                tar::EntryType::Link => {
                    let target = clean(&link.unwrap());
                    let attrs = snapshot.entries[&target].clone();
                    groups
                        .entry(target.clone())
                        .or_insert_with(|| vec![target])
                        .push(path.clone());
                    snapshot.entries.insert(path, attrs);
                    continue;
                }
                other => panic!("unexpected entry type {other:?} in {}", archive.display()),
            };
            snapshot.entries.insert(
                path,
                Attrs {
                    kind,
                    mode: header.mode().unwrap() & 0o7777,
                    uid: header.uid().unwrap(),
                    gid: header.gid().unwrap(),
                    mtime: header.mtime().unwrap() as i64,
                    xattrs,
                },
            );
        }
        snapshot.hardlinks = groups
            .into_values()
            .map(|mut g| {
                g.sort();
                g
            })
            .collect();
        snapshot.hardlinks.sort();
        snapshot
    }

    /// Walks a mounted file system.
    pub fn from_dir(root: &Path) -> Self {
        let mut snapshot = Snapshot::default();
        let mut inodes: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(relative) = stack.pop() {
            for child in std::fs::read_dir(root.join(&relative)).unwrap() {
                let child = child.unwrap();
                let rel = relative.join(child.file_name());
                let full = root.join(&rel);
                let meta = std::fs::symlink_metadata(&full).unwrap();
                let ft = meta.file_type();
                let kind = if ft.is_file() {
                    let (size, sha256) = hash(&mut File::open(&full).unwrap());
                    Kind::File { size, sha256 }
                } else if ft.is_dir() {
                    stack.push(rel.clone());
                    Kind::Dir
                } else if ft.is_symlink() {
                    Kind::Symlink(
                        std::fs::read_link(&full)
                            .unwrap()
                            .as_os_str()
                            .as_bytes()
                            .to_vec(),
                    )
                } else if ft.is_char_device() {
                    Kind::Char(libc_major(meta.rdev()), libc_minor(meta.rdev()))
                } else if ft.is_block_device() {
                    Kind::Block(libc_major(meta.rdev()), libc_minor(meta.rdev()))
                } else if ft.is_fifo() {
                    Kind::Fifo
                } else {
                    panic!("unexpected file type at {}", full.display())
                };
                let path = rel.as_os_str().as_bytes().to_vec();
                if !ft.is_dir() && meta.nlink() > 1 {
                    inodes.entry(meta.ino()).or_default().push(path.clone());
                }
                let xattrs = xattr::list(&full)
                    .unwrap()
                    .map(|name| {
                        let value = xattr::get(&full, &name).unwrap().unwrap_or_default();
                        (name.as_bytes().to_vec(), value)
                    })
                    .collect();
                snapshot.entries.insert(
                    path,
                    Attrs {
                        kind,
                        mode: meta.mode() & 0o7777,
                        uid: meta.uid().into(),
                        gid: meta.gid().into(),
                        mtime: meta.mtime(),
                        xattrs,
                    },
                );
            }
        }
        snapshot.hardlinks = inodes
            .into_values()
            .map(|mut g| {
                g.sort();
                g
            })
            .collect();
        snapshot.hardlinks.sort();
        snapshot
    }
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}
