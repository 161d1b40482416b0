//! The on-disk encodings of ext4 this writer produces: superblock, group descriptors, inodes,
//! extent tree nodes, directory blocks and the jbd2 journal superblock, with their CRC-32C
//! checksums (`metadata_csum`). Everything is little endian except the journal (big endian).
//!
//! Field offsets follow the kernel's `fs/ext4/ext4.h` and `include/linux/jbd2.h`.
//!
//! No value is narrowed by a bare cast (the crate denies `clippy::cast_possible_truncation`):
//! a field split into `_lo` and `_hi` halves takes [`lo16`]/[`hi16`]/[`lo32`]/[`hi32`], and a
//! value that must fit its field whole goes through [`field32`]/[`field16`], which name the
//! field if the planner ever let one through that does not.

/// File system block size.
pub(crate) const BLOCK: u64 = 4096;
pub(crate) const BLOCK_USIZE: usize = 4096;
const _: () = assert!(BLOCK_USIZE as u64 == BLOCK);
pub(crate) const BLOCKS_PER_GROUP: u64 = 32768;
pub(crate) const INODE_SIZE: usize = 256;
pub(crate) const INODES_PER_BLOCK: u64 = BLOCK / INODE_SIZE as u64;
pub(crate) const DESC_SIZE: usize = 64;
/// `i_extra_isize`: the extended inode fields up to `i_projid`.
const EXTRA_ISIZE: u16 = 32;
/// Where in-inode extended attributes start: after the 128-byte base inode and the extra fields.
pub(crate) const INLINE_XATTR_START: usize = 128 + EXTRA_ISIZE as usize;
pub(crate) const ROOT_INO: u32 = 2;
pub(crate) const JOURNAL_INO: u32 = 8;
pub(crate) const FIRST_INO: u32 = 11;
/// An initialized extent covers at most this many blocks.
pub(crate) const MAX_EXTENT_LEN: u64 = 32768;
/// Extent entries (or index entries) in the inode's `i_block` and in a tree block.
pub(crate) const EXTENTS_IN_INODE: usize = 4;
pub(crate) const EXTENTS_IN_BLOCK: usize = (BLOCK_USIZE - 12 - 4) / 12;
/// Bytes of a directory block available to entries: the last 12 hold the checksum tail.
pub(crate) const DIR_BLOCK_ROOM: usize = BLOCK_USIZE - 12;
/// Most links an inode can have (`EXT4_LINK_MAX`); directories above it count 1 (`dir_nlink`).
pub(crate) const LINK_MAX: u32 = 65000;
/// A symlink target shorter than this is stored in the inode itself.
pub(crate) const FAST_SYMLINK_MAX: usize = 59;

pub(crate) const S_IFIFO: u16 = 0o010000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFSOCK: u16 = 0o140000;

/// `EXT4_EXTENTS_FL`.
pub(crate) const EXTENTS_FL: u32 = 0x80000;
/// `EXT4_INDEX_FL`: the directory has a hashed index.
pub(crate) const INDEX_FL: u32 = 0x1000;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// `EXT4_BG_INODE_ZEROED`: the inode table is zeroed (it is, as holes of a fresh file).
const BG_INODE_ZEROED: u16 = 0x4;

/// `v` as an index into something held in memory.
pub(crate) fn index(v: u64) -> usize {
    usize::try_from(v).expect("an index into memory fits usize")
}

/// The inode number of inode table slot `index` (the planner keeps inode counts within u32).
pub(crate) fn ino_of(index: u64) -> u32 {
    u32::try_from(index + 1).expect("inode numbers fit u32")
}

/// The low 16 bits of `v` (a field's `_lo` half).
pub(crate) fn lo16(v: u32) -> u16 {
    let [a, b, _, _] = v.to_le_bytes();
    u16::from_le_bytes([a, b])
}

/// The high 16 bits of `v` (a field's `_hi` half).
pub(crate) fn hi16(v: u32) -> u16 {
    let [_, _, c, d] = v.to_le_bytes();
    u16::from_le_bytes([c, d])
}

/// The low 32 bits of `v` (a field's `_lo` half).
pub(crate) fn lo32(v: u64) -> u32 {
    let [a, b, c, d, ..] = v.to_le_bytes();
    u32::from_le_bytes([a, b, c, d])
}

/// The high 32 bits of `v` (a field's `_hi` half; of a 48-bit block number, `lo16` of it).
pub(crate) fn hi32(v: u64) -> u32 {
    let [.., e, f, g, h] = v.to_le_bytes();
    u32::from_le_bytes([e, f, g, h])
}

/// `v` as the 32-bit on-disk `field`, which the planner keeps it within.
pub(crate) fn field32(v: u64, field: &str) -> u32 {
    u32::try_from(v).unwrap_or_else(|_| panic!("the {field} ({v}) exceeds its 32-bit field"))
}

/// `v` as the 16-bit on-disk `field`, which the planner keeps it within.
pub(crate) fn field16(v: usize, field: &str) -> u16 {
    u16::try_from(v).unwrap_or_else(|_| panic!("the {field} ({v}) exceeds its 16-bit field"))
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put32_be(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// CRC-32C (Castagnoli) without pre- or post-inversion, as ext4 chains it.
pub(crate) fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    static TABLE: [[u32; 256]; 8] = {
        let mut table = [[0u32; 256]; 8];
        let mut i = 0u32;
        while i < 256 {
            let mut c = i;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[0][i as usize] = c;
            i += 1;
        }
        let mut i = 0;
        while i < 256 {
            let mut t = 1;
            while t < 8 {
                let prev = table[t - 1][i];
                table[t][i] = (prev >> 8) ^ table[0][(prev & 0xFF) as usize];
                t += 1;
            }
            i += 1;
        }
        table
    };
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        crc = TABLE[7][(lo & 0xFF) as usize]
            ^ TABLE[6][((lo >> 8) & 0xFF) as usize]
            ^ TABLE[5][((lo >> 16) & 0xFF) as usize]
            ^ TABLE[4][(lo >> 24) as usize]
            ^ TABLE[3][chunk[4] as usize]
            ^ TABLE[2][chunk[5] as usize]
            ^ TABLE[1][chunk[6] as usize]
            ^ TABLE[0][chunk[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = TABLE[0][((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// The seconds field and the `_extra` field (epoch bits, no nanoseconds) of a timestamp, as
/// `ext4_encode_extra_time` splits it.
pub(crate) fn encode_time(seconds: i64) -> (u32, u32) {
    let low = lo32(seconds.cast_unsigned());
    let extra = ((seconds - i64::from(low.cast_signed())) >> 32) & 0b11;
    (low, u32::try_from(extra).expect("two bits"))
}

/// The file system as a whole: what the superblock and group descriptors describe.
pub(crate) struct Geometry {
    pub blocks: u64,
    pub groups: u64,
    pub inodes_per_group: u64,
    pub gdt_blocks: u64,
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    /// `crc32c(~0, uuid)`: the seed of every metadata checksum.
    pub csum_seed: u32,
    /// Timestamp of the file system itself (creation, last write, last check).
    pub time: i64,
    /// Volume label, at most 16 bytes.
    pub label: Vec<u8>,
    /// Whether inode 8 holds a journal.
    pub journal: bool,
}

impl Geometry {
    pub fn inodes(&self) -> u64 {
        self.groups * self.inodes_per_group
    }

    pub fn itable_blocks(&self) -> u64 {
        self.inodes_per_group / INODES_PER_BLOCK
    }

    /// Whether `group` holds a superblock and descriptor backup (`sparse_super`): groups 0, 1
    /// and powers of 3, 5 and 7.
    pub fn has_backup(group: u64) -> bool {
        if group <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&base| {
            let mut n = base;
            while n < group {
                n *= base;
            }
            n == group
        })
    }
}

/// What the superblock records besides the geometry.
pub(crate) struct SuperblockCounts {
    pub free_blocks: u64,
    pub free_inodes: u64,
    /// The journal inode's `i_block` and size, backed up in the superblock.
    pub journal_blocks: [u8; 60],
    pub journal_size: u64,
}

/// The 1024-byte superblock as stored in `group` (0 for the primary copy).
pub(crate) fn superblock(geo: &Geometry, counts: &SuperblockCounts, group: u64) -> [u8; 1024] {
    let mut sb = [0u8; 1024];
    put32(&mut sb, 0x00, field32(geo.inodes(), "inode count"));
    put32(&mut sb, 0x04, lo32(geo.blocks));
    put32(&mut sb, 0x0C, lo32(counts.free_blocks));
    put32(
        &mut sb,
        0x10,
        field32(counts.free_inodes, "free inode count"),
    );
    put32(&mut sb, 0x14, 0); // first data block
    put32(&mut sb, 0x18, 2); // log2(block size) - 10
    put32(&mut sb, 0x1C, 2); // log2(cluster size) - 10
    put32(&mut sb, 0x20, field32(BLOCKS_PER_GROUP, "blocks per group"));
    put32(
        &mut sb,
        0x24,
        field32(BLOCKS_PER_GROUP, "clusters per group"),
    );
    put32(
        &mut sb,
        0x28,
        field32(geo.inodes_per_group, "inodes per group"),
    );
    let (time, _) = encode_time(geo.time);
    put32(&mut sb, 0x30, time); // last write
    put16(&mut sb, 0x36, 0xFFFF); // max mount count: no periodic check
    put16(&mut sb, 0x38, 0xEF53);
    put16(&mut sb, 0x3A, 1); // state: clean
    put16(&mut sb, 0x3C, 1); // errors: continue
    put32(&mut sb, 0x40, time); // last check
    put32(&mut sb, 0x4C, 1); // dynamic revision
    put32(&mut sb, 0x54, FIRST_INO);
    put16(&mut sb, 0x58, field16(INODE_SIZE, "inode size"));
    // s_block_group_nr is 16 bits; mke2fs stores the low half too.
    put16(&mut sb, 0x5A, lo16(lo32(group)));
    let journal = if geo.journal { COMPAT_HAS_JOURNAL } else { 0 };
    put32(&mut sb, 0x5C, journal | COMPAT_EXT_ATTR | COMPAT_DIR_INDEX);
    put32(
        &mut sb,
        0x60,
        INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG,
    );
    put32(
        &mut sb,
        0x64,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM,
    );
    sb[0x68..0x78].copy_from_slice(&geo.uuid);
    sb[0x78..0x78 + geo.label.len()].copy_from_slice(&geo.label);
    if geo.journal {
        put32(&mut sb, 0xE0, JOURNAL_INO);
    }
    sb[0xEC..0xFC].copy_from_slice(&geo.hash_seed);
    sb[0xFC] = 1; // default directory hash: half MD4
    sb[0xFD] = u8::from(geo.journal); // s_jnl_blocks backs up the journal inode's blocks
    put16(&mut sb, 0xFE, field16(DESC_SIZE, "descriptor size"));
    put32(&mut sb, 0x100, 0x0004 | 0x0008); // default mount options: user_xattr, acl
    put32(&mut sb, 0x108, time); // mkfs time
    sb[0x10C..0x148].copy_from_slice(&counts.journal_blocks);
    put32(&mut sb, 0x148, hi32(counts.journal_size));
    put32(&mut sb, 0x14C, lo32(counts.journal_size));
    put32(&mut sb, 0x150, hi32(geo.blocks));
    put32(&mut sb, 0x158, hi32(counts.free_blocks));
    put16(&mut sb, 0x15C, EXTRA_ISIZE);
    put16(&mut sb, 0x15E, EXTRA_ISIZE);
    put32(&mut sb, 0x160, 0x1); // directory hashes use signed chars (x86)
    sb[0x174] = 4; // 16 groups per flex group
    sb[0x175] = 1; // checksum type: crc32c
    let csum = crc32c(!0, &sb[..0x3FC]);
    put32(&mut sb, 0x3FC, csum);
    sb
}

/// One group's descriptor fields.
pub(crate) struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

/// The 64-byte descriptor of `group`, checksummed.
pub(crate) fn group_desc(geo: &Geometry, group: u64, d: &GroupDesc) -> [u8; DESC_SIZE] {
    let mut b = [0u8; DESC_SIZE];
    put32(&mut b, 0x00, lo32(d.block_bitmap));
    put32(&mut b, 0x04, lo32(d.inode_bitmap));
    put32(&mut b, 0x08, lo32(d.inode_table));
    put16(&mut b, 0x0C, lo16(d.free_blocks));
    put16(&mut b, 0x0E, lo16(d.free_inodes));
    put16(&mut b, 0x10, lo16(d.used_dirs));
    put16(&mut b, 0x12, BG_INODE_ZEROED);
    put16(&mut b, 0x18, lo16(d.block_bitmap_csum));
    put16(&mut b, 0x1A, lo16(d.inode_bitmap_csum));
    put16(&mut b, 0x1C, lo16(d.itable_unused));
    put32(&mut b, 0x20, hi32(d.block_bitmap));
    put32(&mut b, 0x24, hi32(d.inode_bitmap));
    put32(&mut b, 0x28, hi32(d.inode_table));
    put16(&mut b, 0x2C, hi16(d.free_blocks));
    put16(&mut b, 0x2E, hi16(d.free_inodes));
    put16(&mut b, 0x30, hi16(d.used_dirs));
    put16(&mut b, 0x32, hi16(d.itable_unused));
    put16(&mut b, 0x38, hi16(d.block_bitmap_csum));
    put16(&mut b, 0x3A, hi16(d.inode_bitmap_csum));
    let group = field32(group, "group number").to_le_bytes();
    let csum = crc32c(crc32c(geo.csum_seed, &group), &b);
    // bg_checksum is the low half of the CRC.
    put16(&mut b, 0x1E, lo16(csum));
    b
}

/// The checksum seed of everything that belongs to inode `ino` (the inode itself, its extent
/// tree and directory blocks): the file system seed, then the inode number and generation (0).
pub(crate) fn inode_seed(csum_seed: u32, ino: u32) -> u32 {
    crc32c(crc32c(csum_seed, &ino.to_le_bytes()), &0u32.to_le_bytes())
}

/// An inode's fields, before encoding.
pub(crate) struct Inode {
    /// File type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    /// In 512-byte units: data, extent tree and xattr blocks.
    pub sectors: u64,
    pub flags: u32,
    pub mtime: i64,
    pub i_block: [u8; 60],
    pub xattr_block: u64,
    /// The in-inode extended attribute area (after the extra fields), if any.
    pub inline_xattrs: Option<Box<[u8]>>,
}

/// The 256-byte on-disk inode `ino`, checksummed. Access, change and creation times are the
/// modification time.
pub(crate) fn inode(geo: &Geometry, ino: u32, n: &Inode) -> [u8; INODE_SIZE] {
    let mut b = [0u8; INODE_SIZE];
    put16(&mut b, 0x00, n.mode);
    put16(&mut b, 0x02, lo16(n.uid));
    put32(&mut b, 0x04, lo32(n.size));
    let (time, extra) = encode_time(n.mtime);
    for at in [0x08, 0x0C, 0x10, 0x90] {
        put32(&mut b, at, time);
    }
    put16(&mut b, 0x18, lo16(n.gid));
    put16(&mut b, 0x1A, n.links);
    put32(&mut b, 0x1C, lo32(n.sectors));
    put32(&mut b, 0x20, n.flags);
    b[0x28..0x64].copy_from_slice(&n.i_block);
    put32(&mut b, 0x68, lo32(n.xattr_block));
    put32(&mut b, 0x6C, hi32(n.size));
    // i_blocks_high and i_file_acl_high: bits 32..48.
    put16(&mut b, 0x74, lo16(hi32(n.sectors)));
    put16(&mut b, 0x76, lo16(hi32(n.xattr_block)));
    put16(&mut b, 0x78, hi16(n.uid));
    put16(&mut b, 0x7A, hi16(n.gid));
    put16(&mut b, 0x80, EXTRA_ISIZE);
    for at in [0x84, 0x88, 0x8C, 0x94] {
        put32(&mut b, at, extra);
    }
    if let Some(area) = &n.inline_xattrs {
        b[INLINE_XATTR_START..INLINE_XATTR_START + area.len()].copy_from_slice(area);
    }
    let csum = crc32c(inode_seed(geo.csum_seed, ino), &b);
    put16(&mut b, 0x7C, lo16(csum));
    put16(&mut b, 0x82, hi16(csum));
    b
}

/// A contiguous run of a file: `len` blocks at logical block `logical`, physical `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u32,
}

/// One extent tree node: the header, then its 12-byte entries (leaf extents at depth 0,
/// index entries above).
fn extent_node(b: &mut [u8], entries: &[(u32, [u8; 12])], max: usize, depth: u16) {
    put16(b, 0, 0xF30A);
    put16(b, 2, field16(entries.len(), "extent node entry count"));
    put16(b, 4, field16(max, "extent node capacity"));
    put16(b, 6, depth);
    for (i, (_, entry)) in entries.iter().enumerate() {
        b[12 + 12 * i..24 + 12 * i].copy_from_slice(entry);
    }
}

fn leaf_entry(e: &Extent) -> [u8; 12] {
    let mut b = [0u8; 12];
    put32(&mut b, 0, e.logical);
    put16(
        &mut b,
        4,
        u16::try_from(e.len).expect("extents are at most 32768 blocks"),
    );
    // ee_start_hi: bits 32..48 of the block number.
    put16(&mut b, 6, lo16(hi32(e.start)));
    put32(&mut b, 8, lo32(e.start));
    b
}

fn index_entry(logical: u32, block: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    put32(&mut b, 0, logical);
    put32(&mut b, 4, lo32(block));
    put16(&mut b, 8, lo16(hi32(block)));
    b
}

/// How many tree blocks an extent tree over `extents` extents needs (0 when they fit in the
/// inode).
pub(crate) fn extent_tree_blocks(extents: usize) -> u64 {
    let mut nodes = extents;
    let mut blocks = 0;
    while nodes > EXTENTS_IN_INODE {
        nodes = nodes.div_ceil(EXTENTS_IN_BLOCK);
        blocks += nodes as u64;
    }
    blocks
}

/// Builds the extent tree of inode `ino`: returns its `i_block` and the tree blocks, which
/// are written at `tree_blocks` (as many as [`extent_tree_blocks`] says), leaves first.
pub(crate) fn extent_tree(
    geo: &Geometry,
    ino: u32,
    extents: &[Extent],
    tree_blocks: &[u64],
) -> ([u8; 60], Vec<[u8; BLOCK_USIZE]>) {
    // Each level's entries with the first logical block they cover: the extents, then, while
    // they do not fit in the inode, one index entry per full block of the level below.
    let mut level: Vec<(u32, [u8; 12])> =
        extents.iter().map(|e| (e.logical, leaf_entry(e))).collect();
    let mut blocks = Vec::new();
    let mut next = tree_blocks.iter();
    let mut depth = 0u16;
    while level.len() > EXTENTS_IN_INODE {
        let mut upper = Vec::new();
        for chunk in level.chunks(EXTENTS_IN_BLOCK) {
            let mut b = [0u8; BLOCK_USIZE];
            extent_node(&mut b, chunk, EXTENTS_IN_BLOCK, depth);
            let at = *next.next().expect("enough tree blocks were allocated");
            upper.push((chunk[0].0, index_entry(chunk[0].0, at)));
            blocks.push(b);
        }
        level = upper;
        depth += 1;
    }
    let mut i_block = [0u8; 60];
    extent_node(&mut i_block, &level, EXTENTS_IN_INODE, depth);
    let seed = inode_seed(geo.csum_seed, ino);
    for b in &mut blocks {
        let tail = 12 + 12 * EXTENTS_IN_BLOCK;
        let csum = crc32c(seed, &b[..tail]);
        put32(b, tail, csum);
    }
    (i_block, blocks)
}

/// Directory entry file types.
pub(crate) fn dirent_type(mode: u16) -> u8 {
    match mode & 0o170000 {
        S_IFREG => 1,
        S_IFDIR => 2,
        S_IFCHR => 3,
        S_IFBLK => 4,
        S_IFIFO => 5,
        S_IFSOCK => 6,
        S_IFLNK => 7,
        _ => 0,
    }
}

/// The jbd2 superblock (v2) of an empty internal journal of `blocks` blocks.
pub(crate) fn journal_superblock(geo: &Geometry, blocks: u64) -> [u8; BLOCK_USIZE] {
    let mut b = [0u8; BLOCK_USIZE];
    put32_be(&mut b, 0x00, 0xC03B_3998);
    put32_be(&mut b, 0x04, 4); // superblock v2
    put32_be(&mut b, 0x0C, field32(BLOCK, "journal block size"));
    put32_be(&mut b, 0x10, field32(blocks, "journal length"));
    put32_be(&mut b, 0x14, 1); // first log block
    put32_be(&mut b, 0x18, 1); // first expected sequence
    b[0x30..0x40].copy_from_slice(&geo.uuid);
    put32_be(&mut b, 0x40, 1); // one user: this file system
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
        let bytewise = long.iter().fold(!0u32, |crc, &b| crc32c(crc, &[b]));
        assert_eq!(crc32c(!0, &long), bytewise);
    }

    #[test]
    fn times_keep_their_epoch_bits() {
        assert_eq!(encode_time(1), (1, 0));
        assert_eq!(encode_time(0x8000_0000), (0x8000_0000, 1));
        assert_eq!(encode_time(0x3_7FFF_FFFF), (0x7FFF_FFFF, 3));
        assert_eq!(encode_time(-1), (u32::MAX, 0));
    }

    #[test]
    fn backup_groups_are_0_1_and_powers_of_3_5_7() {
        let backups: Vec<u64> = (0..100).filter(|&g| Geometry::has_backup(g)).collect();
        assert_eq!(backups, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
    }

    #[test]
    fn extent_tree_sizes() {
        assert_eq!(extent_tree_blocks(4), 0);
        assert_eq!(extent_tree_blocks(5), 1);
        assert_eq!(extent_tree_blocks(340 * 4), 4);
        assert_eq!(extent_tree_blocks(340 * 4 + 1), 5 + 1);
    }
}
