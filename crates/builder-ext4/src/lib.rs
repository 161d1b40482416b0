//! A native ext4 writer: a tree ([`Tree`]) goes straight into a sparse ext4 file, one
//! sequential pass, every content byte read once from its source ([`Contents`]) and written
//! once, the SHA-256 computed on the way when asked for. No staging directory, no
//! `mkfs.ext4`, no loop mount, no root.
//!
//! The file system: 4 KiB blocks, 256-byte inodes, extents, `flex_bg` (all bitmaps and inode
//! tables at the start), `metadata_csum`, `64bit`, `dir_nlink`, `extra_isize`, `huge_file`,
//! `sparse_super` backups, optionally a journal, `dir_index` with a hashed index (htree) in
//! every directory of more than one block, no resize inode. The size either fits the content
//! plus free space or is fixed (a mostly empty scratch disk: its inode tables and journal stay
//! holes). Inode numbers follow a depth-first walk with names sorted; UUID, directory hash
//! seed and every time the tree does not define come from [`Options`]. Same tree and options
//! in, same bytes out.
//!
//! `input` defines the tree; `layout` plans every block before anything is written; `output`
//! writes and hashes; `format`, `htree` and `xattr` own the on-disk encodings. `fresh` makes
//! new disks for a VM (random ids, an empty disk of a fixed size); `superblock` reads back
//! whether an existing file system was cleanly unmounted.

#![deny(clippy::cast_possible_truncation)]

mod error;
mod format;
pub mod fresh;
mod htree;
mod input;
mod layout;
mod output;
pub mod superblock;
mod xattr;

use std::path::Path;

pub use error::{EntryProblem, Ext4Error};
pub use input::{Contents, InMemory, Kind, Meta, Node, NodeId, ReadContent, Tree, ROOT};
pub use xattr::{footprint as xattr_footprint, BLOCK_ROOM as XATTR_ROOM};

use format::BLOCK;
use layout::{Item, Owner};

/// How large the file system is.
#[derive(Debug, Clone, Copy)]
pub enum Size {
    /// Right-sized for the tree: its blocks and inodes plus `free_space_percent` of each, at
    /// least `min_free_bytes` free (and 1024 free inodes).
    Fit {
        free_space_percent: u32,
        min_free_bytes: u64,
    },
    /// `bytes` (rounded down to whole blocks), one inode per 16 KiB as `mkfs.ext4` gives.
    Fixed { bytes: u64 },
}

/// How the output file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Created, or truncated when it exists (never through a symlink).
    Replace,
    /// Created with mode 0600; an existing file is an error.
    NewPrivate,
}

/// How to write the file system.
#[derive(Debug, Clone)]
pub struct Options {
    pub size: Size,
    /// Volume label, at most 16 bytes.
    pub label: String,
    pub uuid: [u8; 16],
    /// Seed of the directory index hashes (half MD4).
    pub hash_seed: [u8; 16],
    /// Time of the file system itself (creation, last write and check) and of the inodes it
    /// adds (`lost+found`, the journal).
    pub time: i64,
    /// Whether the file system has a journal (for one that is mounted read-write).
    pub journal: bool,
    /// Whether to compute the SHA-256 of the output (of every byte, holes included).
    pub sha256: bool,
    /// Whether to `fsync` the output before returning (a disk a VM on this host opens at once
    /// needs none).
    pub sync: bool,
    pub create: Create,
}

/// What [`write`] produced.
#[derive(Debug)]
pub struct Written {
    pub size_bytes: u64,
    /// Hex SHA-256 of the whole file, when [`Options::sha256`] asked for it.
    pub sha256: Option<String>,
    /// Directory entries of the tree (hardlinks counted per name, root excluded).
    pub entries: u64,
}

/// Writes `tree`, whose files' bytes come from `contents`, as an ext4 file system into `path`.
pub fn write<C: Contents>(
    tree: &Tree<C::File>,
    contents: &C,
    options: &Options,
    path: &Path,
) -> Result<Written, Ext4Error> {
    let layout = layout::plan(tree, contents, options)?;
    let geo = &layout.geo;
    let mut out = output::Output::create(path, options.create, options.sha256, options.sync)
        .map_err(|source| Ext4Error::Output {
            op: "create",
            path: path.to_owned(),
            source,
        })?;
    let write_err = |source| Ext4Error::Output {
        op: "write",
        path: path.to_owned(),
        source,
    };
    // The file whose data is being written, kept open across its extents.
    let mut open_file: Option<(u32, C::Reader<'_>)> = None;
    for placed in &layout.items {
        out.skip_to(placed.start * BLOCK);
        match &placed.item {
            Item::Superblock { group } => {
                let sb = format::superblock(geo, &layout.superblock_counts, *group);
                // The primary copy sits at byte 1024; backups start their block.
                let before = if *group == 0 { 1024 } else { 0 };
                out.zeros(before);
                out.put(&sb).map_err(write_err)?;
                out.zeros(BLOCK - before - 1024);
            }
            Item::Descriptors => {
                for (group, desc) in (0u64..).zip(&layout.descs) {
                    out.put(&format::group_desc(geo, group, desc))
                        .map_err(write_err)?;
                }
            }
            Item::BlockBitmap { group } => out
                .put(&layout.block_bitmaps[format::index(*group)])
                .map_err(write_err)?,
            Item::InodeBitmap { group } => out
                .put(&layout.inode_bitmaps[format::index(*group)])
                .map_err(write_err)?,
            Item::InodeTable { group } => {
                let first = group * geo.inodes_per_group;
                let end = first + geo.inodes_per_group;
                // Inodes past the last one in use are zeros, placed at once.
                let used_end = (layout.inodes.len() as u64).clamp(first, end);
                for index in first..used_end {
                    match &layout.inodes[format::index(index)] {
                        Some(inode) => out
                            .put(&format::inode(geo, format::ino_of(index), inode))
                            .map_err(write_err)?,
                        None => out.zeros(format::INODE_SIZE as u64),
                    }
                }
                out.zeros((end - used_end) * format::INODE_SIZE as u64);
            }
            Item::Bytes(bytes) => out.put(bytes).map_err(write_err)?,
            Item::FileData { ino, logical } => {
                let Owner::Node(node) = layout.owners[*ino as usize - 1] else {
                    unreachable!("only the tree's files have file data")
                };
                let Kind::File(file) = &tree.nodes[node].kind else {
                    unreachable!("file data belongs to regular files")
                };
                let read_err = |source| Ext4Error::Content {
                    op: "read the content of",
                    path: layout.path_of(node),
                    source,
                };
                // A file's extents follow each other: open it once for all of them.
                let reader = match &mut open_file {
                    Some((open_ino, reader)) if open_ino == ino => reader,
                    slot => {
                        &slot
                            .insert((*ino, contents.open(file).map_err(read_err)?))
                            .1
                    }
                };
                let from = logical * BLOCK;
                let until = ((logical + placed.len) * BLOCK).min(contents.len(file));
                let mut at = from;
                while at < until {
                    let n = (until - at).min(1 << 20);
                    let dst = out.tail(format::index(n)).map_err(write_err)?;
                    reader.read_exact_at(dst, at).map_err(read_err)?;
                    at += n;
                }
                out.skip_to((placed.start + placed.len) * BLOCK);
            }
        }
    }
    let digest = out.finish(geo.blocks * BLOCK).map_err(write_err)?;
    Ok(Written {
        size_bytes: geo.blocks * BLOCK,
        sha256: digest.map(hex::encode),
        entries: layout.entries,
    })
}
