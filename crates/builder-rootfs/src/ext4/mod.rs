//! A native ext4 writer: the merged tree goes straight into a right-sized, sparse ext4 file,
//! one sequential pass, every content byte read once from its source and written once, the
//! SHA-256 computed on the way. No staging directory, no `mkfs.ext4`, no loop mount.
//!
//! The file system: 4 KiB blocks, 256-byte inodes, extents, `flex_bg` (all bitmaps and inode
//! tables at the start), `metadata_csum`, `64bit`, `dir_nlink`, `extra_isize`, `huge_file`,
//! `sparse_super` backups, a journal (the application writes to its rootfs and the VM can be
//! killed at any moment), linear directories (`dir_index` is on, so the kernel indexes a
//! directory once it grows), no resize inode. Inode numbers follow a depth-first walk with
//! names sorted; UUID and directory hash seed derive from the image id; times the image does
//! not define are [`crate::tree::DEFAULT_MTIME`]. Same tree in, same bytes out.
//!
//! `layout` plans every block before anything is written; `output` writes and hashes;
//! `format` and `xattr` own the on-disk encodings.

mod format;
mod layout;
mod output;
mod xattr;

use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) use xattr::{footprint as xattr_footprint, BLOCK_ROOM as XATTR_ROOM};

use crate::error::{io_err, ConvertError};
use crate::source::{Located, Sources};
use crate::tree::{Kind, Tree};
use format::BLOCK;
use layout::{Item, Owner};

/// How much room the file system leaves.
pub(crate) struct Ext4Options {
    /// Free space as a percentage of what the content uses.
    pub free_space_percent: u32,
    /// Free space at least, in bytes.
    pub min_free_bytes: u64,
}

/// What [`write`] produced.
pub(crate) struct Written {
    pub size_bytes: u64,
    pub sha256: String,
    /// Directory entries from the image (hardlinks counted per name, root excluded).
    pub entries: u64,
}

/// Writes `tree` as an ext4 file system into `path` (created or truncated).
pub(crate) fn write(
    tree: &Tree,
    sources: &Sources,
    image_id: &str,
    options: &Ext4Options,
    path: &Path,
) -> Result<Written, ConvertError> {
    let layout = layout::plan(tree, sources, image_id, options)?;
    let geo = &layout.geo;
    let mut out = output::Output::create(path).map_err(io_err("create", path))?;
    let write_err = |source| ConvertError::Io {
        op: "write",
        path: path.to_owned(),
        source,
    };
    // The file whose data is being written, kept open across its extents.
    let mut open_file: Option<(u32, Located<'_>)> = None;
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
                for (group, desc) in layout.descs.iter().enumerate() {
                    out.put(&format::group_desc(geo, group as u64, desc))
                        .map_err(write_err)?;
                }
            }
            Item::BlockBitmap { group } => out
                .put(&layout.block_bitmaps[*group as usize])
                .map_err(write_err)?,
            Item::InodeBitmap { group } => out
                .put(&layout.inode_bitmaps[*group as usize])
                .map_err(write_err)?,
            Item::InodeTable { group } => {
                let first = group * geo.inodes_per_group;
                for index in first..first + geo.inodes_per_group {
                    match layout.inodes.get(index as usize) {
                        Some(Some(inode)) => out
                            .put(&format::inode(geo, index as u32 + 1, inode))
                            .map_err(write_err)?,
                        _ => out.zeros(format::INODE_SIZE as u64),
                    }
                }
            }
            Item::Bytes(bytes) => out.put(bytes).map_err(write_err)?,
            Item::FileData { ino, logical } => {
                let Owner::Node(node) = layout.owners[*ino as usize - 1] else {
                    unreachable!("only image files have file data")
                };
                let Kind::File(content) = &tree.nodes[node].kind else {
                    unreachable!("file data belongs to regular files")
                };
                let read_err = |source| ConvertError::Io {
                    op: "read the content of",
                    path: layout.path_of(node),
                    source,
                };
                // A file's extents follow each other: open it once for all of them.
                let located = match &mut open_file {
                    Some((open_ino, located)) if open_ino == ino => located,
                    slot => {
                        &slot
                            .insert((*ino, sources.locate(content).map_err(read_err)?))
                            .1
                    }
                };
                let from = logical * BLOCK;
                let until = ((logical + placed.len) * BLOCK).min(located.len);
                let mut at = from;
                while at < until {
                    let n = (until - at).min(1 << 20) as usize;
                    let dst = out.tail(n).map_err(write_err)?;
                    located
                        .file()
                        .read_exact_at(dst, located.offset + at)
                        .map_err(read_err)?;
                    at += n as u64;
                }
                out.skip_to((placed.start + placed.len) * BLOCK);
            }
        }
    }
    let digest = out.finish(geo.blocks * BLOCK).map_err(write_err)?;
    Ok(Written {
        size_bytes: geo.blocks * BLOCK,
        sha256: hex::encode(digest),
        entries: layout.entries,
    })
}
