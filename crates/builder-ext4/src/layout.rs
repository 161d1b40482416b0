//! Planning the file system before a byte is written: inode numbers (depth first, names
//! sorted), the size (content + metadata + free space) and inode count, and the place of every
//! block. The result is a list of [`Placed`] items in block order that [`super::write`] streams
//! out front to back, so the output is written once, sequentially, and hashed on the way.
//!
//! Block order: superblock and descriptors, every group's block bitmap, inode bitmap and inode
//! table (`flex_bg` lets them all sit at the start), the journal, directory / symlink / xattr
//! blocks in inode order, file data in inode order, extent tree blocks; superblock backups of
//! groups 1, 3, 5, 7, 9, 25, ... where `sparse_super` puts them, with runs split around them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::{EntryProblem, Ext4Error};
use crate::format::{
    self, dirent_type, extent_tree, extent_tree_blocks, Extent, Geometry, GroupDesc, Inode, BLOCK,
    BLOCKS_PER_GROUP, DESC_SIZE, EXTENTS_FL, FAST_SYMLINK_MAX, FIRST_INO, INDEX_FL,
    INODES_PER_BLOCK, JOURNAL_INO, LINK_MAX, MAX_EXTENT_LEN, ROOT_INO, S_IFBLK, S_IFCHR, S_IFDIR,
    S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK,
};
use crate::htree;
use crate::input::{Contents, Kind, Meta, NodeId, ReadContent, Tree, ROOT};
use crate::xattr::{self, Placement};
use crate::{Options, Size};

const LOST_FOUND: &[u8] = b"lost+found";
/// Deepest directory nesting accepted (the walk recurses; a path of 2048 levels is already
/// longer than `PATH_MAX`).
const MAX_DEPTH: usize = 2048;
/// Longest name, and longest symlink target, ext4 stores with 4 KiB blocks.
const MAX_NAME: usize = 255;
const MAX_SYMLINK_TARGET: usize = 4095;
/// The range of seconds ext4 with 256-byte inodes stores (34 bits from 1901-12-13).
const MTIME_RANGE: std::ops::RangeInclusive<i64> = -(1 << 31)..=0x3_7FFF_FFFF;
/// The most blocks a file system gets: 16 TiB, what a 32-bit block count holds (the fields
/// are 64-bit, but group numbers and the descriptor table stay small).
const MAX_BLOCKS: u64 = 1 << 32;
/// Bytes per inode of a fixed-size file system, `mkfs.ext4`'s default.
const FIXED_BYTES_PER_INODE: u64 = 16 << 10;
/// The largest file ext4 holds with 4 KiB blocks: 2^32 - 1 logical blocks.
const MAX_FILE_BYTES: u64 = (u32::MAX as u64) * BLOCK;
/// Files at least this large are probed for holes (`SEEK_DATA`); smaller ones are taken whole.
const PROBE_HOLES_FROM: u64 = 1 << 20;

/// What an inode number stands for.
#[derive(Clone, Copy)]
pub(crate) enum Owner {
    /// Reserved inodes that hold nothing (1, 3–7, 9, 10, and 8 without a journal).
    Unused,
    Node(NodeId),
    LostFound,
    Journal,
}

/// One piece of the output, `len` blocks at block `start`.
pub(crate) struct Placed {
    pub start: u64,
    pub len: u64,
    pub item: Item,
}

pub(crate) enum Item {
    /// The superblock copy of a group (the primary at byte 1024 of block 0).
    Superblock {
        group: u64,
    },
    /// The group descriptor table (every copy is the same).
    Descriptors,
    BlockBitmap {
        group: u64,
    },
    InodeBitmap {
        group: u64,
    },
    InodeTable {
        group: u64,
    },
    /// Metadata encoded while planning: directory, symlink, xattr, extent tree and journal
    /// superblock blocks.
    Bytes(Vec<u8>),
    /// `len` blocks of inode `ino`'s content from logical block `logical`.
    FileData {
        ino: u32,
        logical: u64,
    },
}

/// The planned file system.
pub(crate) struct Layout<'t> {
    pub geo: Geometry,
    /// Index `ino - 1`, up to the last inode in use.
    pub owners: Vec<Owner>,
    pub inodes: Vec<Option<Inode>>,
    pub items: Vec<Placed>,
    pub descs: Vec<GroupDesc>,
    pub block_bitmaps: Vec<Vec<u8>>,
    pub inode_bitmaps: Vec<Vec<u8>>,
    pub superblock_counts: format::SuperblockCounts,
    /// Directory entries from the image (hardlinks counted per name, root excluded).
    pub entries: u64,
    first_name: Vec<Option<(NodeId, &'t [u8])>>,
}

impl Layout<'_> {
    /// `/path/of/node` in the tree, for error messages.
    pub fn path_of(&self, node: NodeId) -> PathBuf {
        tree_path(&self.first_name, node)
    }
}

/// Per-inode facts gathered before sizing.
struct Needs {
    /// Logical block ranges holding data (files), or the block count (slow symlinks).
    ranges: Vec<(u64, u64)>,
    /// A directory's blocks, encoded.
    dir: Option<htree::DirBlocks>,
    xattrs: Placement,
}

pub(crate) fn plan<'t, C: Contents>(
    tree: &'t Tree<C::File>,
    contents: &C,
    options: &Options,
) -> Result<Layout<'t>, Ext4Error> {
    if options.label.len() > 16 {
        return Err(Ext4Error::InvalidOption {
            option: "label",
            reason: format!("{:?} is longer than 16 bytes", options.label),
        });
    }
    if !matches!(tree.nodes.first(), Some(n) if matches!(n.kind, Kind::Dir(_))) {
        return Err(Ext4Error::InvalidEntry {
            path: PathBuf::from("/"),
            problem: EntryProblem::RootNotDirectory,
        });
    }
    // 1. Inode numbers, link counts, entries.
    let mut node_ino = vec![0u32; tree.nodes.len()];
    let mut links = vec![0u32; tree.nodes.len()];
    let mut owners = vec![Owner::Unused; FIRST_INO as usize - 1];
    owners[ROOT_INO as usize - 1] = Owner::Node(ROOT);
    if options.journal {
        owners[JOURNAL_INO as usize - 1] = Owner::Journal;
    }
    node_ino[ROOT] = ROOT_INO;
    let has_lost_found = tree
        .children(ROOT)
        .is_some_and(|c| c.contains_key(LOST_FOUND));
    if !has_lost_found {
        owners.push(Owner::LostFound);
    }
    let mut numbering = Numbering {
        node_ino: &mut node_ino,
        links: &mut links,
        owners: &mut owners,
        parent_ino: vec![0; tree.nodes.len()],
        first_name: vec![None; tree.nodes.len()],
        entries: 0,
    };
    numbering.number(tree, ROOT, 0)?;
    let Numbering {
        mut parent_ino,
        first_name,
        entries,
        ..
    } = numbering;
    parent_ino[ROOT] = ROOT_INO;
    for (node, &count) in links.iter().enumerate() {
        if count > LINK_MAX && !matches!(tree.nodes[node].kind, Kind::Dir(_)) {
            return Err(Ext4Error::LimitExceeded {
                what: "hardlinks to one file",
                limit: u64::from(LINK_MAX),
            });
        }
    }

    // 2. What every inode needs. Directories are encoded now (their size depends on their
    // index), with the checksum seed and hash seed the options fix.
    let uuid = options.uuid;
    let csum_seed = format::crc32c(!0, &uuid);
    let dir_seeds = htree::Seeds {
        csum: csum_seed,
        hash: options.hash_seed,
    };
    let mut needs: Vec<Needs> = Vec::with_capacity(owners.len());
    for (index, owner) in owners.iter().enumerate() {
        let ino = format::ino_of(index as u64);
        needs.push(match *owner {
            Owner::Unused | Owner::Journal => Needs {
                ranges: Vec::new(),
                dir: None,
                xattrs: Placement::None,
            },
            Owner::LostFound => Needs {
                ranges: Vec::new(),
                dir: Some(htree::dir_blocks(&dir_seeds, ino, ROOT_INO, Vec::new())?),
                xattrs: Placement::None,
            },
            Owner::Node(node) => {
                let invalid = |problem| Ext4Error::InvalidEntry {
                    path: tree_path(&first_name, node),
                    problem,
                };
                let meta = &tree.nodes[node].meta;
                check_meta(meta).map_err(invalid)?;
                let mut dir = None;
                let ranges = match &tree.nodes[node].kind {
                    Kind::Dir(_) => {
                        let entries = dir_entries(tree, node, &node_ino, !has_lost_found).collect();
                        dir = Some(htree::dir_blocks(
                            &dir_seeds,
                            ino,
                            parent_ino[node],
                            entries,
                        )?);
                        Vec::new()
                    }
                    Kind::File(file) => {
                        let len = contents.len(file);
                        if len > MAX_FILE_BYTES {
                            return Err(Ext4Error::LimitExceeded {
                                what: "bytes in one file (ext4 with 4 KiB blocks)",
                                limit: MAX_FILE_BYTES,
                            });
                        }
                        data_ranges(contents, file, len).map_err(|source| Ext4Error::Content {
                            op: "open the content of",
                            path: tree_path(&first_name, node),
                            source,
                        })?
                    }
                    Kind::Symlink(target)
                        if target.is_empty()
                            || target.len() > MAX_SYMLINK_TARGET
                            || target.contains(&0) =>
                    {
                        return Err(invalid(EntryProblem::BadSymlinkTarget));
                    }
                    Kind::Symlink(target) if target.len() > FAST_SYMLINK_MAX => vec![(0, 1)],
                    _ => Vec::new(),
                };
                Needs {
                    ranges,
                    dir,
                    xattrs: xattr::placement(&meta.xattrs),
                }
            }
        });
    }

    // 3. Size.
    let content_blocks: u64 = needs
        .iter()
        .map(|n| {
            let dir_blocks = n.dir.as_ref().map_or(0, htree::DirBlocks::count);
            let blocks: u64 = n.ranges.iter().map(|r| r.1).sum::<u64>() + dir_blocks;
            let extents = n.ranges.len()
                + usize::from(dir_blocks > 0)
                + format::index(n.ranges.iter().map(|r| r.1 / MAX_EXTENT_LEN).sum::<u64>());
            blocks
                + extent_tree_blocks(extents + 1)
                + u64::from(matches!(n.xattrs, Placement::Block))
        })
        .sum();
    let used_inodes = owners.len() as u64;
    let (blocks, inodes_per_group, gdt_blocks, journal_blocks) = match options.size {
        Size::Fit {
            free_space_percent,
            min_free_bytes,
        } => {
            let journal_blocks = if options.journal {
                (content_blocks / 32)
                    .clamp(1024, 16384)
                    .next_multiple_of(256)
            } else {
                0
            };
            let (blocks, ipg, gdt) = fit(
                content_blocks,
                journal_blocks,
                used_inodes,
                free_space_percent,
                min_free_bytes,
            );
            (blocks, ipg, gdt, journal_blocks)
        }
        Size::Fixed { bytes } => {
            let (blocks, ipg, gdt) = fixed(bytes, used_inodes)?;
            let journal_blocks = if options.journal {
                default_journal_blocks(blocks)
            } else {
                0
            };
            (blocks, ipg, gdt, journal_blocks)
        }
    };
    if blocks > MAX_BLOCKS {
        return Err(Ext4Error::LimitExceeded {
            what: "blocks in one file system (16 TiB of 4 KiB blocks)",
            limit: MAX_BLOCKS,
        });
    }
    let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
    if groups * inodes_per_group > u64::from(u32::MAX) {
        return Err(Ext4Error::LimitExceeded {
            what: "inodes in one file system",
            limit: u64::from(u32::MAX),
        });
    }
    let geo = Geometry {
        blocks,
        groups,
        inodes_per_group,
        gdt_blocks,
        uuid,
        hash_seed: options.hash_seed,
        csum_seed,
        time: options.time,
        label: options.label.as_bytes().to_vec(),
        journal: options.journal,
    };

    // 4. Place every block.
    let mut alloc = Allocator::new(&geo);
    let mut items = Vec::new();
    for group in (0..groups).filter(|&g| Geometry::has_backup(g)) {
        let start = group * BLOCKS_PER_GROUP;
        items.push(Placed {
            start,
            len: 1,
            item: Item::Superblock { group },
        });
        items.push(Placed {
            start: start + 1,
            len: gdt_blocks,
            item: Item::Descriptors,
        });
    }
    // Every group's block bitmap, then every inode bitmap, then every inode table.
    let mut per_group = |len: u64, item: fn(u64) -> Item| -> Result<Vec<u64>, Ext4Error> {
        (0..groups)
            .map(|group| {
                let start = alloc.contiguous(len)?;
                items.push(Placed {
                    start,
                    len,
                    item: item(group),
                });
                Ok(start)
            })
            .collect()
    };
    let block_bitmap_at = per_group(1, |group| Item::BlockBitmap { group })?;
    let inode_bitmap_at = per_group(1, |group| Item::InodeBitmap { group })?;
    let inode_table_at = per_group(geo.itable_blocks(), |group| Item::InodeTable { group })?;

    let mut extents: Vec<Vec<Extent>> = vec![Vec::new(); owners.len()];
    if options.journal {
        let journal_extents = alloc.extents(0, journal_blocks)?;
        items.push(Placed {
            start: journal_extents[0].start,
            len: 1,
            item: Item::Bytes(format::journal_superblock(&geo, journal_blocks).to_vec()),
        });
        extents[JOURNAL_INO as usize - 1] = journal_extents;
    }

    // Directory, symlink and xattr blocks.
    let mut xattr_block_at = vec![0u64; owners.len()];
    let mut indexed = vec![false; owners.len()];
    for (index, owner) in owners.iter().enumerate() {
        let bytes = match *owner {
            Owner::LostFound | Owner::Node(_) if needs[index].dir.is_some() => {
                let dir = needs[index].dir.take().expect("checked");
                indexed[index] = dir.indexed;
                Some(dir.bytes)
            }
            Owner::Node(node) => match &tree.nodes[node].kind {
                Kind::Symlink(target) if target.len() > FAST_SYMLINK_MAX => {
                    let mut block = target.clone();
                    block.resize(format::BLOCK_USIZE, 0);
                    Some(block)
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(bytes) = bytes {
            let blocks = bytes.len() as u64 / BLOCK;
            let placed = alloc.extents(0, blocks)?;
            let mut offset = 0usize;
            for e in &placed {
                let end = offset + format::index(u64::from(e.len) * BLOCK);
                items.push(Placed {
                    start: e.start,
                    len: u64::from(e.len),
                    item: Item::Bytes(bytes[offset..end].to_vec()),
                });
                offset = end;
            }
            extents[index] = placed;
        }
        if let (Placement::Block, Owner::Node(node)) = (&needs[index].xattrs, owner) {
            let at = alloc.contiguous(1)?;
            xattr_block_at[index] = at;
            items.push(Placed {
                start: at,
                len: 1,
                item: Item::Bytes(
                    xattr::block(geo.csum_seed, at, &tree.nodes[*node].meta.xattrs).to_vec(),
                ),
            });
        }
    }

    // File data.
    for (index, owner) in owners.iter().enumerate() {
        let Owner::Node(node) = *owner else { continue };
        if !matches!(tree.nodes[node].kind, Kind::File(_)) {
            continue;
        }
        for &(logical, len) in &needs[index].ranges {
            let placed = alloc.extents(logical, len)?;
            for e in &placed {
                items.push(Placed {
                    start: e.start,
                    len: u64::from(e.len),
                    item: Item::FileData {
                        ino: format::ino_of(index as u64),
                        logical: u64::from(e.logical),
                    },
                });
            }
            extend_merged(&mut extents[index], &placed);
        }
    }

    // Extent trees, and the inodes themselves.
    let mut inodes: Vec<Option<Inode>> = Vec::with_capacity(owners.len());
    let mut used_dirs = vec![0u32; format::index(groups)];
    for (index, owner) in owners.iter().enumerate() {
        let ino = format::ino_of(index as u64);
        let tree_blocks = extent_tree_blocks(extents[index].len());
        let mut tree_at = Vec::with_capacity(format::index(tree_blocks));
        for _ in 0..tree_blocks {
            tree_at.push(alloc.contiguous(1)?);
        }
        let (i_block, nodes) = extent_tree(&geo, ino, &extents[index], &tree_at);
        for (at, node_block) in tree_at.iter().zip(nodes) {
            items.push(Placed {
                start: *at,
                len: 1,
                item: Item::Bytes(node_block.to_vec()),
            });
        }
        let data_blocks: u64 = extents[index].iter().map(|e| u64::from(e.len)).sum();
        let xattr_blocks = u64::from(xattr_block_at[index] != 0);
        let sectors = (data_blocks + tree_blocks + xattr_blocks) * (BLOCK / 512);
        // An inode of the file system's own: root's, the fixed time, extents, no xattrs.
        let own = |mode: u16, size: u64, links: u16| {
            Some(Inode {
                mode,
                uid: 0,
                gid: 0,
                size,
                links,
                sectors,
                flags: EXTENTS_FL,
                mtime: geo.time,
                i_block,
                xattr_block: 0,
                inline_xattrs: None,
            })
        };
        let inode = match *owner {
            Owner::Unused => None,
            Owner::Journal => own(S_IFREG | 0o600, journal_blocks * BLOCK, 1),
            Owner::LostFound => own(S_IFDIR | 0o700, data_blocks * BLOCK, 2),
            Owner::Node(node) => {
                let n = &tree.nodes[node];
                let (kind_mode, size, flags, i_block, links) = match &n.kind {
                    Kind::Dir(children) => {
                        let subdirs = children
                            .values()
                            .filter(|&&c| matches!(tree.nodes[c].kind, Kind::Dir(_)))
                            .count()
                            + usize::from(node == ROOT && !has_lost_found);
                        // More than LINK_MAX counts 1 (dir_nlink).
                        let links = u32::try_from(subdirs + 2).unwrap_or(u32::MAX);
                        (
                            S_IFDIR,
                            data_blocks * BLOCK,
                            EXTENTS_FL | if indexed[index] { INDEX_FL } else { 0 },
                            i_block,
                            if links > LINK_MAX { 1 } else { links },
                        )
                    }
                    Kind::File(file) => (
                        S_IFREG,
                        contents.len(file),
                        EXTENTS_FL,
                        i_block,
                        links[node],
                    ),
                    Kind::Symlink(target) if target.len() > FAST_SYMLINK_MAX => (
                        S_IFLNK,
                        target.len() as u64,
                        EXTENTS_FL,
                        i_block,
                        links[node],
                    ),
                    Kind::Symlink(target) => {
                        let mut inline = [0u8; 60];
                        inline[..target.len()].copy_from_slice(target);
                        (S_IFLNK, target.len() as u64, 0, inline, links[node])
                    }
                    Kind::CharDevice { major, minor } => {
                        (S_IFCHR, 0, 0, device(*major, *minor), links[node])
                    }
                    Kind::BlockDevice { major, minor } => {
                        (S_IFBLK, 0, 0, device(*major, *minor), links[node])
                    }
                    Kind::Fifo => (S_IFIFO, 0, 0, [0u8; 60], links[node]),
                    Kind::Socket => (S_IFSOCK, 0, 0, [0u8; 60], links[node]),
                };
                Some(Inode {
                    mode: kind_mode | permission_bits(n.meta.mode),
                    uid: n.meta.uid,
                    gid: n.meta.gid,
                    size,
                    links: u16::try_from(links).expect("link counts are at most LINK_MAX"),
                    sectors,
                    flags,
                    mtime: n.meta.mtime,
                    i_block,
                    xattr_block: xattr_block_at[index],
                    inline_xattrs: match &needs[index].xattrs {
                        Placement::Inline(area) => Some(area.clone()),
                        _ => None,
                    },
                })
            }
        };
        if inode.as_ref().is_some_and(|i| i.mode & 0o170000 == S_IFDIR) {
            used_dirs[format::index(index as u64 / inodes_per_group)] += 1;
        }
        inodes.push(inode);
    }
    items.sort_by_key(|p| p.start);

    // 5. Bitmaps and descriptors.
    let mut descs = Vec::with_capacity(format::index(groups));
    let mut block_bitmaps = Vec::with_capacity(format::index(groups));
    let mut inode_bitmaps = Vec::with_capacity(format::index(groups));
    let mut free_blocks_total = 0u64;
    let mut free_inodes_total = 0u64;
    for group in 0..groups {
        let (bitmap, free_blocks) = alloc.group_bitmap(group);
        let first_ino = group * inodes_per_group;
        let used_in_group = (owners.len() as u64)
            .saturating_sub(first_ino)
            .min(inodes_per_group);
        let mut ibitmap = vec![0u8; format::BLOCK_USIZE];
        set_bits(&mut ibitmap, 0, used_in_group);
        set_bits(&mut ibitmap, inodes_per_group, BLOCK * 8);
        let free_inodes =
            format::field32(inodes_per_group - used_in_group, "free inodes of a group");
        free_blocks_total += u64::from(free_blocks);
        free_inodes_total += u64::from(free_inodes);
        descs.push(GroupDesc {
            block_bitmap: block_bitmap_at[format::index(group)],
            inode_bitmap: inode_bitmap_at[format::index(group)],
            inode_table: inode_table_at[format::index(group)],
            free_blocks,
            free_inodes,
            used_dirs: used_dirs[format::index(group)],
            itable_unused: free_inodes,
            block_bitmap_csum: format::crc32c(geo.csum_seed, &bitmap),
            inode_bitmap_csum: format::crc32c(
                geo.csum_seed,
                &ibitmap[..(inodes_per_group / 8) as usize],
            ),
        });
        block_bitmaps.push(bitmap);
        inode_bitmaps.push(ibitmap);
    }
    let journal = inodes[JOURNAL_INO as usize - 1].as_ref();
    let superblock_counts = format::SuperblockCounts {
        free_blocks: free_blocks_total,
        free_inodes: free_inodes_total,
        journal_blocks: journal.map_or([0; 60], |j| j.i_block),
        journal_size: journal.map_or(0, |j| j.size),
    };
    Ok(Layout {
        geo,
        owners,
        inodes,
        items,
        descs,
        block_bitmaps,
        inode_bitmaps,
        superblock_counts,
        entries,
        first_name,
    })
}

/// The size of a file system fitted to its content: `content` blocks (data, directories,
/// extent trees, xattr blocks), `journal` blocks and `used_inodes`, plus `percent` of the
/// content's blocks and inodes free (at least `min_free_bytes` and 1024 inodes). Returns the
/// blocks, inodes per group and descriptor blocks.
fn fit(
    content: u64,
    journal: u64,
    used_inodes: u64,
    percent: u32,
    min_free_bytes: u64,
) -> (u64, u64, u64) {
    let percent = u64::from(percent);
    let wanted_inodes = used_inodes + (used_inodes * percent / 100).max(1024);
    let free = (content * percent / 100).max(min_free_bytes.div_ceil(BLOCK));
    let mut groups = 1u64;
    loop {
        let ipg = wanted_inodes
            .div_ceil(groups)
            .next_multiple_of(INODES_PER_BLOCK)
            .max(INODES_PER_BLOCK);
        if ipg > BLOCKS_PER_GROUP {
            groups = wanted_inodes.div_ceil(BLOCKS_PER_GROUP);
            continue;
        }
        let gdt = (groups * DESC_SIZE as u64).div_ceil(BLOCK);
        let backups = (0..groups).filter(|&g| Geometry::has_backup(g)).count() as u64;
        // Runs split around each backup can each cost one more extent tree block.
        let overhead = backups * (1 + gdt) + groups * (2 + ipg / INODES_PER_BLOCK) + backups;
        // Every group holding inodes must exist, also when inodes, not blocks, need them.
        let mut total =
            (overhead + journal + content + free).max((groups - 1) * BLOCKS_PER_GROUP + 1);
        let last = total % BLOCKS_PER_GROUP;
        let last_group = total / BLOCKS_PER_GROUP;
        if last != 0 && Geometry::has_backup(last_group) && last < 2 + gdt {
            total += 2 + gdt - last;
        }
        let needed = total.div_ceil(BLOCKS_PER_GROUP);
        if needed <= groups {
            return (total, ipg, gdt);
        }
        groups = needed;
    }
}

/// The geometry of a file system of `bytes`, as `mkfs.ext4` would size it: one inode per
/// [`FIXED_BYTES_PER_INODE`] (at least `used_inodes`), a last group too small for its
/// superblock backup left out. Returns the blocks, inodes per group and descriptor blocks.
fn fixed(bytes: u64, used_inodes: u64) -> Result<(u64, u64, u64), Ext4Error> {
    let mut blocks = bytes / BLOCK;
    let gdt_of =
        |blocks: u64| (blocks.div_ceil(BLOCKS_PER_GROUP) * DESC_SIZE as u64).div_ceil(BLOCK);
    let last = blocks % BLOCKS_PER_GROUP;
    if last != 0
        && blocks > BLOCKS_PER_GROUP
        && Geometry::has_backup(blocks / BLOCKS_PER_GROUP)
        && last < 2 + gdt_of(blocks)
    {
        blocks -= last;
    }
    let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
    if groups == 0 {
        return Err(Ext4Error::TooSmall { blocks });
    }
    let inodes = (blocks * BLOCK / FIXED_BYTES_PER_INODE).max(used_inodes);
    let ipg = inodes
        .div_ceil(groups)
        .next_multiple_of(INODES_PER_BLOCK)
        .max(INODES_PER_BLOCK);
    if ipg > BLOCKS_PER_GROUP {
        return Err(Ext4Error::TooSmall { blocks });
    }
    Ok((blocks, ipg, gdt_of(blocks)))
}

/// `mkfs.ext4`'s journal size for a file system of `blocks` 4 KiB blocks
/// (`ext2fs_default_journal_size`).
fn default_journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..32_768 => 1024,
        32_768..262_144 => 4096,
        262_144..524_288 => 8192,
        524_288..4_194_304 => 16_384,
        4_194_304..8_388_608 => 32_768,
        8_388_608..16_777_216 => 65_536,
        16_777_216..33_554_432 => 131_072,
        _ => 262_144,
    }
}

/// Inode numbers given depth first, names in order, with what else that walk learns.
struct Numbering<'a, 't> {
    node_ino: &'a mut [u32],
    /// Names per node.
    links: &'a mut [u32],
    owners: &'a mut Vec<Owner>,
    /// The inode of each directory's parent.
    parent_ino: Vec<u32>,
    /// The first (parent, name) each node was reached by, for error messages.
    first_name: Vec<Option<(NodeId, &'t [u8])>>,
    entries: u64,
}

impl<'t> Numbering<'_, 't> {
    /// Numbers what `dir` (at `depth`) holds, checking every name on the way.
    fn number<F>(&mut self, tree: &'t Tree<F>, dir: NodeId, depth: usize) -> Result<(), Ext4Error> {
        if depth > MAX_DEPTH {
            return Err(Ext4Error::LimitExceeded {
                what: "directory depth",
                limit: MAX_DEPTH as u64,
            });
        }
        let children = tree.children(dir).expect("numbering starts at a directory");
        for (name, &child) in children {
            let invalid = |problem| Ext4Error::InvalidEntry {
                path: tree_path(&self.first_name, dir).join(OsStr::from_bytes(name)),
                problem,
            };
            if name.len() > MAX_NAME {
                return Err(invalid(EntryProblem::NameTooLong));
            }
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(invalid(EntryProblem::BadName));
            }
            let Some(node) = tree.nodes.get(child) else {
                return Err(invalid(EntryProblem::NoSuchNode { node: child }));
            };
            let is_dir = matches!(node.kind, Kind::Dir(_));
            self.entries += 1;
            self.links[child] += 1;
            if self.node_ino[child] != 0 {
                if is_dir {
                    return Err(invalid(EntryProblem::DirectoryHardlink));
                }
                continue;
            }
            self.owners.push(Owner::Node(child));
            self.node_ino[child] =
                u32::try_from(self.owners.len()).map_err(|_| Ext4Error::LimitExceeded {
                    what: "inodes in one file system",
                    limit: u64::from(u32::MAX),
                })?;
            self.first_name[child] = Some((dir, name));
            if is_dir {
                self.parent_ino[child] = self.node_ino[dir];
                self.number(tree, child, depth + 1)?;
            }
        }
        Ok(())
    }
}

/// Refuses metadata ext4 cannot store: mode bits beyond 0o7777, an mtime out of range,
/// extended attributes it has no name for or no room for.
fn check_meta(meta: &Meta) -> Result<(), EntryProblem> {
    if meta.mode & !0o7777 != 0 {
        return Err(EntryProblem::BadMode { mode: meta.mode });
    }
    if !MTIME_RANGE.contains(&meta.mtime) {
        return Err(EntryProblem::BadMtime { mtime: meta.mtime });
    }
    let mut total = 0;
    for (name, value) in &meta.xattrs {
        total += (name.len() <= MAX_NAME && !name.contains(&0))
            .then(|| xattr::footprint(name, value))
            .flatten()
            .ok_or_else(|| EntryProblem::BadXattrName {
                name: String::from_utf8_lossy(name).into_owned(),
            })?;
    }
    if total > xattr::BLOCK_ROOM {
        return Err(EntryProblem::XattrsTooLarge {
            bytes: total,
            max: xattr::BLOCK_ROOM,
        });
    }
    Ok(())
}

/// The permission bits of a mode [`check_meta`] accepted.
fn permission_bits(mode: u32) -> u16 {
    u16::try_from(mode & 0o7777).expect("12 bits fit 16")
}

/// `/path/of/node` in the tree, for error messages.
fn tree_path(first_name: &[Option<(NodeId, &[u8])>], mut node: NodeId) -> PathBuf {
    let mut names = Vec::new();
    while let Some((parent, name)) = first_name[node] {
        names.push(name);
        node = parent;
    }
    let mut path = std::path::PathBuf::from("/");
    for name in names.iter().rev() {
        path.push(OsStr::from_bytes(name));
    }
    path
}

/// The entries of directory `dir` but `.` and `..`: for the root when the tree has none,
/// `lost+found` (inode 11), then its children, as (name, inode, type).
fn dir_entries<'a, F>(
    tree: &'a Tree<F>,
    dir: NodeId,
    node_ino: &'a [u32],
    with_lost_found: bool,
) -> impl Iterator<Item = (Vec<u8>, u32, u8)> + 'a {
    let lost_found =
        (dir == ROOT && with_lost_found).then(|| (LOST_FOUND.to_vec(), FIRST_INO, 2u8));
    lost_found
        .into_iter()
        .chain(
            tree.children(dir)
                .expect("a directory")
                .iter()
                .map(move |(name, &child)| {
                    (
                        name.clone(),
                        node_ino[child],
                        dirent_type(type_bits(&tree.nodes[child].kind)),
                    )
                }),
        )
}

fn type_bits<F>(kind: &Kind<F>) -> u16 {
    match kind {
        Kind::Dir(_) => S_IFDIR,
        Kind::File(_) => S_IFREG,
        Kind::Symlink(_) => S_IFLNK,
        Kind::CharDevice { .. } => S_IFCHR,
        Kind::BlockDevice { .. } => S_IFBLK,
        Kind::Fifo => S_IFIFO,
        Kind::Socket => S_IFSOCK,
    }
}

/// A device number in `i_block`, in the old 16-bit form when it fits, as the kernel stores it.
fn device(major: u32, minor: u32) -> [u8; 60] {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        format::put32(&mut b, 0, (major << 8) | minor);
    } else {
        format::put32(
            &mut b,
            4,
            (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12),
        );
    }
    b
}

/// Logical block ranges of `file` (`len` bytes) that hold data: the whole file, except that
/// large files are asked for their holes ([`ReadContent::data_ranges`]), which stay holes.
fn data_ranges<C: Contents>(
    contents: &C,
    file: &C::File,
    len: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    let blocks = len.div_ceil(BLOCK);
    if len < PROBE_HOLES_FROM {
        // Taken whole without opening it (a layer directory's file is opened only to be read).
        return Ok(if blocks == 0 {
            Vec::new()
        } else {
            vec![(0, blocks)]
        });
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (data, hole) in contents.open(file)?.data_ranges(len)? {
        let (first, last) = (data / BLOCK, hole.min(len).div_ceil(BLOCK));
        if first >= last {
            continue;
        }
        if ranges.last().is_some_and(|&(start, _)| first < start) {
            return Err(std::io::Error::other("the data ranges are not in order"));
        }
        match ranges.last_mut() {
            Some((start, count)) if *start + *count >= first => {
                *count = (*count).max(last - *start);
            }
            _ => ranges.push((first, last - first)),
        }
    }
    Ok(ranges)
}

/// Sets bits `from..to` of `bitmap` (least significant bit first), whole bytes at once.
fn set_bits(bitmap: &mut [u8], from: u64, to: u64) {
    let mut bit = from;
    while bit < to {
        if bit.is_multiple_of(8) && to - bit >= 8 {
            let end = bit + (to - bit) / 8 * 8;
            bitmap[format::index(bit / 8)..format::index(end / 8)].fill(0xFF);
            bit = end;
        } else {
            bitmap[format::index(bit / 8)] |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

/// Appends `placed` to `extents`, joining runs that continue each other.
fn extend_merged(extents: &mut Vec<Extent>, placed: &[Extent]) {
    for e in placed {
        if let Some(last) = extents.last_mut() {
            if last.logical + last.len == e.logical
                && last.start + u64::from(last.len) == e.start
                && u64::from(last.len + e.len) <= MAX_EXTENT_LEN
            {
                last.len += e.len;
                continue;
            }
        }
        extents.push(*e);
    }
}

/// Hands out blocks front to back, stepping over superblock and descriptor backups.
struct Allocator {
    next: u64,
    blocks: u64,
    /// Backup areas (start, len), in order.
    reserved: Vec<(u64, u64)>,
    used: Vec<u64>,
}

impl Allocator {
    fn new(geo: &Geometry) -> Self {
        let reserved: Vec<(u64, u64)> = (0..geo.groups)
            .filter(|&g| Geometry::has_backup(g))
            .map(|g| (g * BLOCKS_PER_GROUP, 1 + geo.gdt_blocks))
            .collect();
        let mut alloc = Allocator {
            next: 1 + geo.gdt_blocks,
            blocks: geo.blocks,
            used: vec![0; format::index(geo.blocks.div_ceil(64))],
            reserved: reserved.clone(),
        };
        for (start, len) in reserved {
            alloc.mark(start, len);
        }
        alloc
    }

    fn mark(&mut self, start: u64, len: u64) {
        for block in start..start + len {
            self.used[(block / 64) as usize] |= 1 << (block % 64);
        }
    }

    /// The block bitmap of `group` (blocks past the end count as used) and its free blocks.
    fn group_bitmap(&self, group: u64) -> (Vec<u8>, u32) {
        let mut bitmap = Vec::with_capacity(format::BLOCK_USIZE);
        let mut free = 0;
        for first in (0..BLOCKS_PER_GROUP).step_by(64) {
            let first = group * BLOCKS_PER_GROUP + first;
            let mut word = self
                .used
                .get(format::index(first / 64))
                .copied()
                .unwrap_or(0);
            let valid = self.blocks.saturating_sub(first);
            if valid < 64 {
                word |= !0u64 << valid;
            }
            free += word.count_zeros();
            bitmap.extend_from_slice(&word.to_le_bytes());
        }
        (bitmap, free)
    }

    /// The next reserved area that ends after `at`.
    fn reserved_after(&self, at: u64) -> Option<(u64, u64)> {
        let i = self.reserved.partition_point(|&(s, l)| s + l <= at);
        self.reserved.get(i).copied()
    }

    fn too_small(&self) -> Ext4Error {
        Ext4Error::TooSmall {
            blocks: self.blocks,
        }
    }

    /// `len` blocks in one run.
    fn contiguous(&mut self, len: u64) -> Result<u64, Ext4Error> {
        loop {
            match self.reserved_after(self.next) {
                Some((s, l)) if s < self.next + len => self.next = s + l,
                _ => break,
            }
        }
        let at = self.next;
        if at + len > self.blocks {
            return Err(self.too_small());
        }
        self.mark(at, len);
        self.next += len;
        Ok(at)
    }

    /// `len` blocks for logical blocks from `logical`, as extents split around reserved
    /// areas and at the longest extent.
    fn extents(&mut self, logical: u64, len: u64) -> Result<Vec<Extent>, Ext4Error> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            if let Some((s, l)) = self.reserved_after(self.next) {
                if s <= self.next {
                    self.next = s + l;
                    continue;
                }
            }
            let room = self
                .reserved_after(self.next)
                .map_or(self.blocks, |(s, _)| s)
                - self.next;
            let take = (len - done).min(room).min(MAX_EXTENT_LEN);
            if take == 0 || self.next + take > self.blocks {
                return Err(self.too_small());
            }
            out.push(Extent {
                logical: format::field32(logical + done, "logical block"),
                start: self.next,
                len: format::field32(take, "extent length"),
            });
            self.mark(self.next, take);
            self.next += take;
            done += take;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitted_sizes_hold_their_inodes_also_when_inodes_need_more_groups_than_blocks() {
        for (content, inodes) in [(100, 20), (50_000, 3000), (1000, 80_000), (10, 200_000)] {
            let (blocks, ipg, gdt) = fit(content, 1024, inodes, 20, 0);
            let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
            assert!(
                groups * ipg >= inodes + 1024,
                "{content} blocks, {inodes} inodes"
            );
            assert!(blocks > content + 1024 + groups * ipg / INODES_PER_BLOCK);
            assert_eq!(gdt, (groups * DESC_SIZE as u64).div_ceil(BLOCK));
        }
    }

    #[test]
    fn fixed_sizes_follow_mkfs() {
        // 4 GiB: 32 full groups, one inode per 16 KiB, a 64 MiB journal.
        let (blocks, ipg, gdt) = fixed(4 << 30, 11).unwrap();
        assert_eq!((blocks, ipg, gdt), (1 << 20, 8192, 1));
        assert_eq!(default_journal_blocks(blocks), 16_384);
        // A last group too small for its superblock backup is left out.
        let (blocks, _, _) = fixed((BLOCKS_PER_GROUP + 1) * BLOCK, 11).unwrap();
        assert_eq!(blocks, BLOCKS_PER_GROUP);
        assert!(matches!(
            fixed(BLOCK - 1, 11),
            Err(Ext4Error::TooSmall { .. })
        ));
    }
}
