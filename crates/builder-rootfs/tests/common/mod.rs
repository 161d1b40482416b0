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

use builder_rootfs::{convert, convert_layer_dirs, ConvertOptions, ConvertReport, ImageConfig};
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

/// An image as the daemon's overlay2 store holds it: `docker image inspect`'s `Id`, `Config`
/// and the layers' `diff` directories, lowest first.
pub struct LayerDirs {
    pub id: String,
    pub config: ImageConfig,
    pub dirs: Vec<PathBuf>,
}

/// Reads where the layers of `tag` are (fails the test unless the daemon uses overlay2).
pub fn layer_dirs(tag: &str) -> LayerDirs {
    let json = run(docker().args(["image", "inspect", "-f", "{{json .}}", tag]));
    let inspect: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let driver = &inspect["GraphDriver"];
    assert_eq!(driver["Name"], "overlay2", "{driver}");
    let data = &driver["Data"];
    let mut dirs: Vec<PathBuf> = data["LowerDir"]
        .as_str()
        .map(|lower| lower.split(':').rev().map(PathBuf::from).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from(data["UpperDir"].as_str().unwrap()));
    assert_eq!(
        dirs.len(),
        inspect["RootFS"]["Layers"].as_array().unwrap().len(),
        "{data}"
    );
    LayerDirs {
        id: inspect["Id"].as_str().unwrap().to_owned(),
        config: serde_json::from_value(inspect["Config"].clone()).unwrap(),
        dirs,
    }
}

/// Converts `tag` from its layer directories, with default options and a work area inside
/// `scratch`.
pub fn convert_layer_dirs_in(scratch: &Path, tag: &str, output: &Path) -> ConvertReport {
    let work = scratch.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let options = ConvertOptions {
        work_dir: work,
        ..ConvertOptions::default()
    };
    let image = layer_dirs(tag);
    convert_layer_dirs(&image.id, image.config, &image.dirs, output, &options)
        .unwrap_or_else(|e| panic!("conversion from layer directories failed: {}", chain(&e)))
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
        snapshot.hardlinks = sorted_groups(groups.into_values());
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
        snapshot.hardlinks = sorted_groups(inodes.into_values());
        snapshot
    }
}

/// Hardlink groups (paths of one inode) in a comparable order: each sorted, then all.
fn sorted_groups(groups: impl Iterator<Item = Vec<Vec<u8>>>) -> Vec<Vec<Vec<u8>>> {
    let mut groups: Vec<Vec<Vec<u8>>> = groups
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

/// Tar archives written byte by byte (ustar headers, PAX records), so tests can put anything
/// in them: `..`, absolute names, lying sizes, bad checksums.
pub mod craft {
    use std::path::Path;

    #[derive(Clone)]
    pub struct Entry<'a> {
        pub path: &'a [u8],
        pub kind: u8,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub mtime: u64,
        pub link: &'a [u8],
        pub device: (u32, u32),
        pub data: &'a [u8],
        /// Size written in the header when it must lie about `data`.
        pub claimed_size: Option<u64>,
        pub xattrs: &'a [(&'a str, &'a [u8])],
    }

    pub fn file<'a>(path: &'a [u8], data: &'a [u8]) -> Entry<'a> {
        Entry {
            path,
            kind: b'0',
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            link: b"",
            device: (0, 0),
            data,
            claimed_size: None,
            xattrs: &[],
        }
    }

    pub fn dir(path: &[u8]) -> Entry<'_> {
        Entry {
            kind: b'5',
            mode: 0o755,
            ..file(path, b"")
        }
    }

    pub fn symlink<'a>(path: &'a [u8], target: &'a [u8]) -> Entry<'a> {
        Entry {
            kind: b'2',
            mode: 0o777,
            link: target,
            ..file(path, b"")
        }
    }

    pub fn hardlink<'a>(path: &'a [u8], target: &'a [u8]) -> Entry<'a> {
        Entry {
            kind: b'1',
            link: target,
            ..file(path, b"")
        }
    }

    /// A numeric field: octal text, or GNU base-256 (high bit set, big endian) when the value
    /// is too large for it.
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{:0width$o}", value, width = field.len() - 1);
        if text.len() < field.len() {
            field[..text.len()].copy_from_slice(text.as_bytes());
            field[text.len()] = 0;
        } else {
            field.fill(0);
            let at = field.len() - 8;
            field[at..].copy_from_slice(&value.to_be_bytes());
            field[0] |= 0x80;
        }
    }

    /// One 512-byte ustar header with a correct checksum.
    pub fn header(e: &Entry<'_>, path: &[u8], size: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        assert!(path.len() <= 100 && e.link.len() <= 100);
        h[..path.len()].copy_from_slice(path);
        octal(&mut h[100..108], e.mode.into());
        octal(&mut h[108..116], e.uid.into());
        octal(&mut h[116..124], e.gid.into());
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], e.mtime);
        h[156] = e.kind;
        h[157..157 + e.link.len()].copy_from_slice(e.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], e.device.0.into());
        octal(&mut h[337..345], e.device.1.into());
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        octal(&mut h[148..155], sum.into());
        h
    }

    fn pad(out: &mut Vec<u8>) {
        out.resize(out.len().next_multiple_of(512), 0);
    }

    fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
        let body = [b" ".as_slice(), key, b"=", value, b"\n"].concat();
        let mut len = body.len() + 1;
        while format!("{len}").len() + body.len() != len {
            len += 1;
        }
        [format!("{len}").as_bytes(), &body].concat()
    }

    /// A layer tar of `entries` (PAX records for long names and xattrs), with end blocks.
    pub fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            append(&mut out, e);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    pub fn append(out: &mut Vec<u8>, e: &Entry<'_>) {
        let mut records = Vec::new();
        let path = if e.path.len() > 100 {
            records.extend(pax_record(b"path", e.path));
            &b"././@PaxHeader"[..]
        } else {
            e.path
        };
        for (key, value) in e.xattrs {
            records.extend(pax_record(format!("SCHILY.xattr.{key}").as_bytes(), value));
        }
        if !records.is_empty() {
            let pax = Entry {
                kind: b'x',
                ..file(b"", b"")
            };
            out.extend_from_slice(&header(&pax, b"././@PaxHeader", records.len() as u64));
            out.extend_from_slice(&records);
            pad(out);
        }
        let size = e.claimed_size.unwrap_or(e.data.len() as u64);
        out.extend_from_slice(&header(e, path, size));
        out.extend_from_slice(e.data);
        pad(out);
    }

    /// Writes a `docker save` archive whose one layer holds one regular file `name` of `size`
    /// bytes, zero except for `pieces` (offset in the file, bytes), without writing the
    /// zeros: the archive is sparse on disk.
    pub fn sparse_file_archive(path: &Path, name: &[u8], size: u64, pieces: &[(u64, &[u8])]) {
        use std::os::unix::fs::FileExt;
        let inner_header = header(&file(name, b""), name, size);
        let inner_len = 512 + size.next_multiple_of(512) + 1024;
        let manifest = serde_json::json!([{ "Config": "c.json", "Layers": ["l/layer.tar"] }]);
        let mut head = Vec::new();
        append(
            &mut head,
            &file(b"manifest.json", &serde_json::to_vec(&manifest).unwrap()),
        );
        append(&mut head, &file(b"c.json", CONFIG));
        let layer_entry = Entry {
            claimed_size: Some(inner_len),
            ..file(b"l/layer.tar", b"")
        };
        head.extend_from_slice(&header(&layer_entry, b"l/layer.tar", inner_len));
        let data_start = head.len() as u64 + 512;
        head.extend_from_slice(&inner_header);
        let out = std::fs::File::create(path).unwrap();
        out.write_all_at(&head, 0).unwrap();
        for (offset, bytes) in pieces {
            out.write_all_at(bytes, data_start + offset).unwrap();
        }
        out.set_len(head.len() as u64 + inner_len - 512 + 1024)
            .unwrap();
    }

    /// Writes a Docker 20.10 `docker save` archive with the given layers and config.
    pub fn docker_archive(path: &Path, layers: &[Vec<u8>], config: &[u8]) {
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        let config_name = format!("{}.json", sha256_hex(config));
        let mut layer_names = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let name = format!("{i:064}/layer.tar");
            members.push((name.clone(), layer.clone()));
            layer_names.push(name);
        }
        members.push((config_name.clone(), config.to_vec()));
        let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": ["crafted:latest"], "Layers": layer_names }]);
        members.push((
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        ));
        write_outer(path, &members, &[]);
    }

    /// An outer tar of regular members plus symlink members (name, target).
    pub fn write_outer(path: &Path, members: &[(String, Vec<u8>)], links: &[(&str, &str)]) {
        let mut out = Vec::new();
        for (name, data) in members {
            append(&mut out, &file(name.as_bytes(), data));
        }
        for (name, target) in links {
            append(&mut out, &symlink(name.as_bytes(), target.as_bytes()));
        }
        out.extend_from_slice(&[0u8; 1024]);
        std::fs::write(path, out).unwrap();
    }

    pub fn sha256_hex(data: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(data))
    }

    pub const CONFIG: &[u8] = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/app"],"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
}
