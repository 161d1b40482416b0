//! What the tests share: writing a tree, `e2fsck -fn`, a read-only loop mount, and reading a
//! mounted file system back into the same shape the expected side is built in.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use builder_ext4::{Create, InMemory, Kind, Options, Size, Tree, ROOT};

/// Whether the tests that mount can run; prints why not when they cannot.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: loop mounts need root (CI runs the tests as root)");
    }
    root
}

pub fn options(size: Size, journal: bool) -> Options {
    Options {
        size,
        label: "test".into(),
        uuid: *b"builder-ext4 tst",
        hash_seed: *b"hash seed 0123ab",
        time: 1_700_000_000,
        journal,
        sha256: false,
        sync: false,
        create: Create::Replace,
    }
}

/// Writes `tree` to `path` and checks it with `e2fsck -fn`.
pub fn write_checked(tree: &Tree<Vec<u8>>, options: &Options, path: &Path) {
    builder_ext4::write(tree, &InMemory, options, path).expect("the tree is written");
    e2fsck(path);
}

/// `e2fsck -fn` finds nothing to fix.
pub fn e2fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("e2fsck runs");
    assert!(
        out.status.success(),
        "e2fsck -fn {} exited {:?}:\n{}{}",
        image.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop mount, unmounted on drop.
pub struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    pub fn new(image: &Path, options: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "ext4", "-o", options])
            .arg(image)
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -o {options} {}", image.display());
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

/// One name as seen in a file system.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub links: u64,
    /// File content, symlink target, or `major:minor` of a device.
    pub data: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Every name below `root` (relative path → what it is), and which names share an inode.
pub fn read_back(root: &Path) -> (BTreeMap<PathBuf, Seen>, Vec<Vec<PathBuf>>) {
    let mut seen = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let meta = std::fs::symlink_metadata(root).unwrap();
    seen.insert(PathBuf::from("/"), seen_of(root, &meta));
    walk(root, Path::new("/"), &mut seen, &mut by_ino);
    let shared = by_ino.into_values().filter(|v| v.len() > 1).collect();
    (seen, shared)
}

fn walk(
    dir: &Path,
    rel: &Path,
    seen: &mut BTreeMap<PathBuf, Seen>,
    by_ino: &mut BTreeMap<u64, Vec<PathBuf>>,
) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = rel.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if !meta.is_dir() {
            by_ino.entry(meta.ino()).or_default().push(rel.clone());
        }
        seen.insert(rel.clone(), seen_of(&path, &meta));
        if meta.is_dir() {
            walk(&path, &rel, seen, by_ino);
        }
    }
}

fn seen_of(path: &Path, meta: &std::fs::Metadata) -> Seen {
    let ft = meta.file_type();
    let (kind, data) = if ft.is_dir() {
        ("dir", Vec::new())
    } else if ft.is_file() {
        ("file", std::fs::read(path).unwrap())
    } else if ft.is_symlink() {
        let target = std::fs::read_link(path).unwrap();
        ("symlink", target.as_os_str().as_bytes().to_vec())
    } else if ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_char_device() { "char" } else { "block" };
        let rdev = meta.rdev();
        (
            kind,
            format!("{}:{}", libc::major(rdev), libc::minor(rdev)).into_bytes(),
        )
    } else if ft.is_fifo() {
        ("fifo", Vec::new())
    } else {
        ("socket", Vec::new())
    };
    let xattrs = if ft.is_dir() || ft.is_file() {
        xattr::list(path)
            .unwrap()
            .map(|name| {
                let value = xattr::get(path, &name).unwrap().unwrap_or_default();
                (name.as_bytes().to_vec(), value)
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    Seen {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        size: meta.len(),
        links: meta.nlink(),
        data,
        xattrs,
    }
}

/// What the file system written from `tree` must show, in [`read_back`]'s shape. `lost+found`
/// is added when the tree has none, as the writer does.
pub fn expected(tree: &Tree<Vec<u8>>, time: i64) -> (BTreeMap<PathBuf, Seen>, Vec<Vec<PathBuf>>) {
    let mut names: Vec<Vec<PathBuf>> = vec![Vec::new(); tree.nodes.len()];
    names[ROOT].push(PathBuf::from("/"));
    let mut stack = vec![(ROOT, PathBuf::from("/"))];
    while let Some((dir, path)) = stack.pop() {
        for (name, &child) in tree.children(dir).unwrap() {
            let child_path = path.join(OsStr::from_bytes(name));
            names[child].push(child_path.clone());
            if matches!(tree.nodes[child].kind, Kind::Dir(_)) {
                stack.push((child, child_path));
            }
        }
    }
    let has_lost_found = tree
        .children(ROOT)
        .unwrap()
        .contains_key(&b"lost+found"[..]);
    let mut seen = BTreeMap::new();
    let mut shared = Vec::new();
    for (id, node) in tree.nodes.iter().enumerate() {
        let (kind, data, size) = match &node.kind {
            Kind::Dir(_) => ("dir", Vec::new(), None),
            Kind::File(bytes) => ("file", bytes.clone(), Some(bytes.len() as u64)),
            Kind::Symlink(target) => ("symlink", target.clone(), Some(target.len() as u64)),
            Kind::CharDevice { major, minor } => {
                ("char", format!("{major}:{minor}").into_bytes(), Some(0))
            }
            Kind::BlockDevice { major, minor } => {
                ("block", format!("{major}:{minor}").into_bytes(), Some(0))
            }
            Kind::Fifo => ("fifo", Vec::new(), Some(0)),
            Kind::Socket => ("socket", Vec::new(), Some(0)),
        };
        let links = match &node.kind {
            Kind::Dir(children) => {
                let subdirs = children
                    .values()
                    .filter(|&&c| matches!(tree.nodes[c].kind, Kind::Dir(_)))
                    .count();
                2 + subdirs as u64 + u64::from(id == ROOT && !has_lost_found)
            }
            _ => names[id].len() as u64,
        };
        if names[id].len() > 1 {
            let mut group = names[id].clone();
            group.sort();
            shared.push(group);
        }
        for path in &names[id] {
            seen.insert(
                path.clone(),
                Seen {
                    kind,
                    mode: node.meta.mode,
                    uid: node.meta.uid,
                    gid: node.meta.gid,
                    mtime: node.meta.mtime,
                    // Directories are whole blocks: checked apart from the rest.
                    size: size.unwrap_or(u64::MAX),
                    links,
                    data: data.clone(),
                    xattrs: node.meta.xattrs.iter().cloned().collect(),
                },
            );
        }
    }
    if !has_lost_found {
        seen.insert(
            PathBuf::from("/lost+found"),
            Seen {
                kind: "dir",
                mode: 0o700,
                uid: 0,
                gid: 0,
                mtime: time,
                size: u64::MAX,
                links: 2,
                data: Vec::new(),
                xattrs: BTreeMap::new(),
            },
        );
    }
    shared.sort();
    (seen, shared)
}

/// [`read_back`] with directory sizes checked (whole blocks) and then masked like
/// [`expected`]'s.
pub fn read_back_masked(root: &Path) -> (BTreeMap<PathBuf, Seen>, Vec<Vec<PathBuf>>) {
    let (mut seen, mut shared) = read_back(root);
    for (path, s) in &mut seen {
        if s.kind == "dir" {
            assert!(
                s.size > 0 && s.size % 4096 == 0,
                "{}: {}",
                path.display(),
                s.size
            );
            s.size = u64::MAX;
        }
    }
    for group in &mut shared {
        group.sort();
    }
    shared.sort();
    (seen, shared)
}

/// The size a tree with `Size::Fit` gets: what `free_space_percent` leaves.
pub fn fit(free_space_percent: u32) -> Size {
    Size::Fit {
        free_space_percent,
        min_free_bytes: 0,
    }
}
