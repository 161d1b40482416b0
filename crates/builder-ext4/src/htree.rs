//! Directory blocks. A directory whose entries fit one block is that block, entries in name
//! order. A larger one gets a hashed index (`dir_index`, "htree") as the kernel reads it and
//! `e2fsck` checks it: block 0 is the index root (`.`, `..` and `dx_root`), then, when more
//! leaves than one root holds, a level of index nodes, then the leaf blocks, entries in hash
//! order. The hash is the signed half-MD4 of `fs/ext4/hash.c` with the superblock's seed (the
//! superblock's default hash version); a run of equal hashes that spans two leaves marks the
//! second leaf's index entry as a continuation (the low bit), as the kernel does.

use crate::error::Ext4Error;
use crate::format::{crc32c, inode_seed, put16, put32, BLOCK, BLOCK_USIZE, DIR_BLOCK_ROOM};

/// What the directory blocks of one file system are checksummed and hashed with.
pub(crate) struct Seeds {
    /// The file system's checksum seed.
    pub csum: u32,
    /// The superblock's `s_hash_seed`.
    pub hash: [u8; 16],
}

/// The encoded blocks of one directory.
pub(crate) struct DirBlocks {
    pub bytes: Vec<u8>,
    /// Whether block 0 is an index root (the inode then carries `EXT4_INDEX_FL`).
    pub indexed: bool,
}

impl DirBlocks {
    pub fn count(&self) -> u64 {
        self.bytes.len() as u64 / BLOCK
    }
}

/// A directory entry before encoding: name, inode, file type.
pub(crate) type DirEntry = (Vec<u8>, u32, u8);

/// `dx_root_info.hash_version`: half MD4 (signed, as the superblock's flags say).
const HASH_HALF_MD4: u8 = 1;
/// Where the root's `dx_countlimit` is: after `.` (12 bytes), `..`'s header and name (12) and
/// `dx_root_info` (8).
const ROOT_ENTRIES_AT: usize = 32;
/// Where an index node's `dx_countlimit` is: after a fake entry header spanning the block.
const NODE_ENTRIES_AT: usize = 8;
/// Index entries the root and a node hold, the last 8 bytes being the checksum tail.
const ROOT_LIMIT: usize = (BLOCK_USIZE - ROOT_ENTRIES_AT - 8) / 8;
const NODE_LIMIT: usize = (BLOCK_USIZE - NODE_ENTRIES_AT - 8) / 8;

/// The blocks of directory `ino` (whose parent is `parent`) holding `entries` besides `.`
/// and `..`.
pub(crate) fn dir_blocks(
    seeds: &Seeds,
    ino: u32,
    parent: u32,
    entries: Vec<DirEntry>,
) -> Result<DirBlocks, Ext4Error> {
    let seed = inode_seed(seeds.csum, ino);
    let dots = [(b".".to_vec(), ino, 2u8), (b"..".to_vec(), parent, 2u8)];
    let mut linear = Leaf::new();
    if dots.iter().chain(&entries).all(|e| linear.push(e)) {
        return Ok(DirBlocks {
            bytes: linear.finish(seed).to_vec(),
            indexed: false,
        });
    }

    let hash_seed = seed_words(&seeds.hash);
    let mut hashed: Vec<(u32, DirEntry)> = entries
        .into_iter()
        .map(|e| (name_hash(&e.0, &hash_seed), e))
        .collect();
    hashed.sort_unstable_by(|a, b| (a.0, &a.1 .0).cmp(&(b.0, &b.1 .0)));

    // Leaves, each with the hash its index entry carries.
    let mut leaves: Vec<(u32, [u8; BLOCK_USIZE])> = Vec::new();
    let mut leaf = Leaf::new();
    let mut leaf_hash = 0;
    let mut last_hash = 0;
    for (hash, entry) in &hashed {
        if !leaf.push(entry) {
            leaves.push((leaf_hash, leaf.finish(seed)));
            leaf = Leaf::new();
            // A hash continuing from the previous leaf is marked as a collision.
            leaf_hash = if *hash == last_hash { hash | 1 } else { *hash };
            assert!(leaf.push(entry), "one entry fits an empty block");
        }
        last_hash = *hash;
    }
    leaves.push((leaf_hash, leaf.finish(seed)));

    let mut blocks: Vec<[u8; BLOCK_USIZE]> = Vec::new();
    if leaves.len() <= ROOT_LIMIT {
        let root_entries: Vec<(u32, u32)> = (1u32..).zip(&leaves).map(|(b, l)| (l.0, b)).collect();
        blocks.push(root(seed, ino, parent, 0, &root_entries));
    } else {
        let groups: Vec<&[(u32, [u8; BLOCK_USIZE])]> = leaves.chunks(NODE_LIMIT).collect();
        if groups.len() > ROOT_LIMIT {
            return Err(Ext4Error::LimitExceeded {
                what: "entries in one directory (a two-level index)",
                limit: (ROOT_LIMIT * NODE_LIMIT) as u64,
            });
        }
        let nodes = u32::try_from(groups.len()).expect("at most ROOT_LIMIT nodes");
        let mut next_leaf = 1 + nodes;
        let mut root_entries = Vec::with_capacity(groups.len());
        let mut node_blocks = Vec::with_capacity(groups.len());
        for (block, group) in (1u32..).zip(&groups) {
            root_entries.push((group[0].0, block));
            let entries: Vec<(u32, u32)> = group
                .iter()
                .map(|l| {
                    next_leaf += 1;
                    (l.0, next_leaf - 1)
                })
                .collect();
            node_blocks.push(index_node(seed, &entries));
        }
        blocks.push(root(seed, ino, parent, 1, &root_entries));
        blocks.extend(node_blocks);
    }
    blocks.extend(leaves.into_iter().map(|l| l.1));
    Ok(DirBlocks {
        bytes: blocks.concat(),
        indexed: true,
    })
}

/// One block of directory entries being filled, closed by the checksum tail.
struct Leaf {
    block: [u8; BLOCK_USIZE],
    used: usize,
    last: usize,
}

impl Leaf {
    fn new() -> Self {
        Leaf {
            block: [0; BLOCK_USIZE],
            used: 0,
            last: 0,
        }
    }

    /// Adds `(name, inode, type)`; false (and nothing added) when the block is full.
    fn push(&mut self, (name, inode, kind): &DirEntry) -> bool {
        let len = dirent_len(name);
        if self.used + len > DIR_BLOCK_ROOM {
            return false;
        }
        let at = self.used;
        put32(&mut self.block, at, *inode);
        put16(
            &mut self.block,
            at + 4,
            small(len, "directory entry length"),
        );
        self.block[at + 6] = u8::try_from(name.len()).expect("names are at most 255 bytes");
        self.block[at + 7] = *kind;
        self.block[at + 8..at + 8 + name.len()].copy_from_slice(name);
        self.last = at;
        self.used += len;
        true
    }

    /// The block: the last entry's record stretched to the tail, the tail, the checksum.
    fn finish(mut self, seed: u32) -> [u8; BLOCK_USIZE] {
        let b = &mut self.block;
        put16(
            b,
            self.last + 4,
            small(DIR_BLOCK_ROOM - self.last, "record length"),
        );
        put16(b, DIR_BLOCK_ROOM + 4, 12);
        b[DIR_BLOCK_ROOM + 7] = 0xDE;
        let csum = crc32c(seed, &b[..DIR_BLOCK_ROOM]);
        put32(b, DIR_BLOCK_ROOM + 8, csum);
        self.block
    }
}

/// Bytes a directory entry named `name` takes at least.
fn dirent_len(name: &[u8]) -> usize {
    (8 + name.len()).next_multiple_of(4)
}

/// A length within a block as its 16-bit field.
fn small(len: usize, field: &str) -> u16 {
    u16::try_from(len).unwrap_or_else(|_| panic!("the {field} {len} fits a block"))
}

/// The index root: `.` and `..` (spanning the block), `dx_root_info`, the entries
/// `(hash, block)` (the first one's hash is implied), the checksum tail.
fn root(seed: u32, ino: u32, parent: u32, levels: u8, entries: &[(u32, u32)]) -> [u8; BLOCK_USIZE] {
    let mut b = [0u8; BLOCK_USIZE];
    put32(&mut b, 0, ino);
    put16(&mut b, 4, 12);
    b[6] = 1;
    b[7] = 2;
    b[8] = b'.';
    put32(&mut b, 12, parent);
    put16(&mut b, 16, small(BLOCK_USIZE - 12, "record length"));
    b[18] = 2;
    b[19] = 2;
    b[20..22].copy_from_slice(b"..");
    // dx_root_info: reserved, hash version, its own length, levels below the root, flags.
    b[28] = HASH_HALF_MD4;
    b[29] = 8;
    b[30] = levels;
    index_entries(&mut b, ROOT_ENTRIES_AT, ROOT_LIMIT, entries, seed);
    b
}

/// An index node: a fake entry spanning the block, the entries, the checksum tail.
fn index_node(seed: u32, entries: &[(u32, u32)]) -> [u8; BLOCK_USIZE] {
    let mut b = [0u8; BLOCK_USIZE];
    put16(&mut b, 4, small(BLOCK_USIZE, "record length"));
    index_entries(&mut b, NODE_ENTRIES_AT, NODE_LIMIT, entries, seed);
    b
}

/// Writes `dx_countlimit` and the entries at `at`, and the `dx_tail` checksum after `limit`
/// entries (`ext4_dx_csum`).
fn index_entries(b: &mut [u8], at: usize, limit: usize, entries: &[(u32, u32)], seed: u32) {
    put16(b, at, small(limit, "index limit"));
    put16(b, at + 2, small(entries.len(), "index count"));
    for (i, &(hash, block)) in entries.iter().enumerate() {
        let entry = at + 8 * i;
        if i > 0 {
            put32(b, entry, hash);
        }
        put32(b, entry + 4, block);
    }
    let tail = at + 8 * limit;
    let csum = crc32c(
        crc32c(seed, &b[..at + 8 * entries.len()]),
        &b[tail..tail + 4],
    );
    let csum = crc32c(csum, &[0; 4]);
    put32(b, tail + 4, csum);
}

/// The hash seed as the kernel reads it: four little-endian words.
fn seed_words(seed: &[u8; 16]) -> [u32; 4] {
    let word = |i: usize| u32::from_le_bytes([seed[i], seed[i + 1], seed[i + 2], seed[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The major hash of `name` (`ext4fs_dirhash` with `DX_HASH_HALF_MD4`, signed chars): the low
/// bit cleared, the end-of-directory value avoided.
pub(crate) fn name_hash(name: &[u8], seed: &[u32; 4]) -> u32 {
    let mut buf = if seed.iter().any(|&w| w != 0) {
        *seed
    } else {
        [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476]
    };
    let mut rest = name;
    loop {
        half_md4_transform(&mut buf, &str2hashbuf_signed(rest));
        if rest.len() <= 32 {
            break;
        }
        rest = &rest[32..];
    }
    let hash = buf[1] & !1;
    // EXT4_HTREE_EOF_32BIT << 1 is reserved for the end of the directory.
    if hash == 0x7FFF_FFFF << 1 {
        (0x7FFF_FFFF - 1) << 1
    } else {
        hash
    }
}

/// `str2hashbuf_signed` with 8 words: up to 32 bytes of `msg`, each a signed char, padded
/// with its (remaining) length.
fn str2hashbuf_signed(msg: &[u8]) -> [u32; 8] {
    let len = msg.len();
    let len_byte = u32::from(u8::try_from(len.min(255)).expect("at most 255"));
    let mut pad = len_byte | (len_byte << 8);
    pad |= pad << 16;
    let mut out = [pad; 8];
    let mut val = pad;
    let mut word = 0;
    for (i, &c) in msg.iter().take(32).enumerate() {
        val = i32::from(c as i8).cast_unsigned().wrapping_add(val << 8);
        if i % 4 == 3 {
            out[word] = val;
            word += 1;
            val = pad;
        }
    }
    if word < 8 {
        out[word] = val;
    }
    out
}

/// `half_md4_transform` of `fs/ext4/hash.c`: three passes of eight steps.
fn half_md4_transform(buf: &mut [u32; 4], input: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let mut state = *buf;
    let steps = |indices: [usize; 8], shifts: [u32; 4]| {
        std::array::from_fn::<_, 8, _>(|n| (indices[n], shifts[n % 4]))
    };
    md4_pass(
        &mut state,
        f,
        0,
        steps([0, 1, 2, 3, 4, 5, 6, 7], [3, 7, 11, 19]),
        input,
    );
    md4_pass(
        &mut state,
        g,
        K2,
        steps([1, 3, 5, 7, 0, 2, 4, 6], [3, 5, 9, 13]),
        input,
    );
    md4_pass(
        &mut state,
        h,
        K3,
        steps([3, 7, 2, 6, 1, 5, 0, 4], [3, 9, 11, 15]),
        input,
    );
    for (word, add) in buf.iter_mut().zip(state) {
        *word = word.wrapping_add(add);
    }
}

/// One pass of MD4: step `n` adds `func` of the other three words and `input[index] + k` to
/// word a, d, c, b in turn (`n % 4`), then rotates it left by its shift.
fn md4_pass(
    state: &mut [u32; 4],
    func: impl Fn(u32, u32, u32) -> u32,
    k: u32,
    steps: [(usize, u32); 8],
    input: &[u32; 8],
) {
    for (n, (index, shift)) in steps.into_iter().enumerate() {
        // a, d, c, b: the word updated, and after it the other three in their turn.
        let target = (4 - n % 4) % 4;
        let (x, y, z) = (
            state[(target + 1) % 4],
            state[(target + 2) % 4],
            state[(target + 3) % 4],
        );
        state[target] = state[target]
            .wrapping_add(func(x, y, z))
            .wrapping_add(input[index].wrapping_add(k))
            .rotate_left(shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_directories_stay_one_linear_block() {
        let seeds = Seeds {
            csum: 1,
            hash: [7; 16],
        };
        let entries = (0..100u32)
            .map(|i| (format!("f{i:03}").into_bytes(), 20 + i, 1))
            .collect();
        let dir = dir_blocks(&seeds, 12, 2, entries).unwrap();
        assert_eq!((dir.count(), dir.indexed), (1, false));
        assert_eq!(&dir.bytes[8..9], b".");
    }

    #[test]
    fn large_directories_get_an_index_over_hash_ordered_leaves() {
        let seeds = Seeds {
            csum: 1,
            hash: [7; 16],
        };
        let entries: Vec<DirEntry> = (0..2000u32)
            .map(|i| (format!("entry-{i:05}").into_bytes(), 20 + i, 1))
            .collect();
        let dir = dir_blocks(&seeds, 12, 2, entries).unwrap();
        assert!(dir.indexed);
        let root = &dir.bytes[..BLOCK_USIZE];
        assert_eq!((root[28], root[29], root[30]), (HASH_HALF_MD4, 8, 0));
        let count = usize::from(u16::from_le_bytes([root[34], root[35]]));
        assert_eq!(count as u64, dir.count() - 1, "one index entry per leaf");
        let hashes: Vec<u32> = (1..count)
            .map(|i| u32::from_le_bytes(root[32 + 8 * i..36 + 8 * i].try_into().unwrap()))
            .collect();
        assert!(hashes.windows(2).all(|w| w[0] < w[1]), "{hashes:x?}");
    }
}
