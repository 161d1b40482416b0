//! New disks for a VM to mount: written with mode 0600 (an existing file is an error), a
//! random UUID and directory hash seed each, a root-owned root directory made now. The empty
//! disk ([`write_empty_disk`]) is a fixed-size file system with a journal whose inode tables,
//! journal and free space are holes, so a 4 GiB disk is a few hundred KiB of metadata.

use std::path::Path;
use std::time::SystemTime;

use crate::{write, Create, Ext4Error, InMemory, Meta, Options, Size, Tree, Written, ROOT};

/// A root-owned 0755 directory made now.
pub fn root_meta_now() -> Meta {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: now,
        xattrs: Vec::new(),
    }
}

/// Writes `tree` as a new file system at `path` (created 0600, not there yet) with a random
/// UUID and hash seed, its time the root's mtime.
pub fn write_new(
    path: &Path,
    tree: &Tree<Vec<u8>>,
    size: Size,
    label: &str,
    journal: bool,
) -> Result<Written, Ext4Error> {
    let mut ids = [0u8; 32];
    getrandom::getrandom(&mut ids).map_err(|e| Ext4Error::Random {
        path: path.to_path_buf(),
        source: e.raw_os_error().map_or_else(
            || std::io::Error::other(e.to_string()),
            std::io::Error::from_raw_os_error,
        ),
    })?;
    let (uuid, hash_seed) = ids.split_at(16);
    let options = Options {
        size,
        label: label.to_owned(),
        uuid: uuid.try_into().expect("16 bytes"),
        hash_seed: hash_seed.try_into().expect("16 bytes"),
        time: tree.nodes[ROOT].meta.mtime,
        journal,
        sha256: false,
        sync: false,
        create: Create::NewPrivate,
    };
    write(tree, &InMemory, &options, path)
}

/// Writes an empty file system with a journal (only `lost+found`) of `bytes` (rounded down to
/// whole blocks) at `path` (created 0600, not there yet), labelled `label`.
pub fn write_empty_disk(path: &Path, bytes: u64, label: &str) -> Result<Written, Ext4Error> {
    let tree = Tree::new(root_meta_now());
    write_new(path, &tree, Size::Fixed { bytes }, label, true)
}
