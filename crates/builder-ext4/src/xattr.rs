//! Extended attributes in ext4: which names it can store (by prefix index), the space they
//! take, and their encoding, either in the inode (after the extra fields) or, when they do not
//! fit there, all in one xattr block. POSIX ACLs arrive in the VFS format (`getxattr`, tar)
//! and are stored in ext4's own, shorter format.

use super::format::{
    crc32c, field16, field32, put16, put32, BLOCK_USIZE, INLINE_XATTR_START, INODE_SIZE,
};

const MAGIC: u32 = 0xEA02_0000;
/// Header of an xattr block.
const BLOCK_HEADER: usize = 32;
/// Entry header before the name.
const ENTRY_HEADER: usize = 16;

/// Name prefixes ext4 stores as an index, longest first where one is a prefix of another.
const PREFIXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
];

/// The prefix index and the stored rest of `name`; `None` when ext4 cannot store it.
pub(crate) fn split_name(name: &[u8]) -> Option<(u8, &[u8])> {
    PREFIXES.iter().find_map(|&(prefix, index)| {
        let rest = name.strip_prefix(prefix)?;
        // The ACL names are whole names; the others need something after the prefix.
        match index {
            2 | 3 => rest.is_empty().then_some((index, rest)),
            _ => (!rest.is_empty()).then_some((index, rest)),
        }
    })
}

/// Room in one xattr block for entries and values (header and end marker excluded).
pub const BLOCK_ROOM: usize = BLOCK_USIZE - BLOCK_HEADER - 4;
/// Room in the inode for entries and values (magic and end marker excluded).
const INLINE_ROOM: usize = INODE_SIZE - INLINE_XATTR_START - 4 - 4;

/// Bytes `name = value` takes in an xattr block or inode: entry header, stored name and
/// value, each padded to 4 bytes. `None` when ext4 cannot store the name.
pub fn footprint(name: &[u8], value: &[u8]) -> Option<usize> {
    let (index, rest) = split_name(name)?;
    let value_len = stored_value(index, value).map_or(value.len(), |v| v.len());
    Some((ENTRY_HEADER + rest.len()).next_multiple_of(4) + value_len.next_multiple_of(4))
}

/// The stored form of a value: POSIX ACLs are converted from the VFS format
/// (`posix_acl_xattr_header` v2 + 8-byte entries) to ext4's (v1, 4-byte entries except for
/// named users and groups). `None` when the value is stored as is (or is not a valid ACL, in
/// which case it is stored as is and the kernel will refuse it, as it would from `setxattr`).
fn stored_value(index: u8, value: &[u8]) -> Option<Vec<u8>> {
    if index != 2 && index != 3 {
        return None;
    }
    let (header, entries) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for entry in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        out.extend_from_slice(&entry[..4]);
        // ACL_USER and ACL_GROUP carry an id.
        if tag == 0x02 || tag == 0x08 {
            out.extend_from_slice(&entry[4..8]);
        }
    }
    Some(out)
}

/// Where an inode's extended attributes go.
pub(crate) enum Placement {
    None,
    /// The in-inode area (from [`INLINE_XATTR_START`] to the end of the inode).
    Inline(Box<[u8]>),
    /// One xattr block (its number is only known later: see [`block`]).
    Block,
}

struct Stored<'a> {
    index: u8,
    name: &'a [u8],
    value: std::borrow::Cow<'a, [u8]>,
}

fn stored(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Stored<'_>> {
    let mut all: Vec<Stored<'_>> = xattrs
        .iter()
        .map(|(name, value)| {
            let (index, rest) = split_name(name).expect("the tree only holds names ext4 can store");
            Stored {
                index,
                name: rest,
                value: stored_value(index, value).map_or(value.into(), Into::into),
            }
        })
        .collect();
    // The order the kernel keeps and searches block entries in.
    all.sort_by(|a, b| (a.index, a.name.len(), a.name).cmp(&(b.index, b.name.len(), b.name)));
    all
}

/// Chooses where `xattrs` go: in the inode when they fit, else in one block.
pub(crate) fn placement(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Placement {
    if xattrs.is_empty() {
        return Placement::None;
    }
    let all = stored(xattrs);
    let size: usize = all
        .iter()
        .map(|s| {
            (ENTRY_HEADER + s.name.len()).next_multiple_of(4) + s.value.len().next_multiple_of(4)
        })
        .sum();
    if size > INLINE_ROOM {
        return Placement::Block;
    }
    let mut area = vec![0u8; INODE_SIZE - INLINE_XATTR_START];
    put32(&mut area, 0, MAGIC);
    // Value offsets are relative to the first entry, right after the magic.
    encode(&all, &mut area[4..]);
    Placement::Inline(area.into_boxed_slice())
}

/// The xattr block at block number `at` holding all of `xattrs`.
pub(crate) fn block(csum_seed: u32, at: u64, xattrs: &[(Vec<u8>, Vec<u8>)]) -> [u8; BLOCK_USIZE] {
    let all = stored(xattrs);
    let mut b = [0u8; BLOCK_USIZE];
    put32(&mut b, 0x00, MAGIC);
    put32(&mut b, 0x04, 1); // reference count
    put32(&mut b, 0x08, 1); // blocks
                            // Value offsets in a block are relative to the block start.
    let hashes = encode_at(&all, &mut b, BLOCK_HEADER);
    // Block hash (`ext4_xattr_rehash`).
    let hash = hashes
        .iter()
        .fold(0u32, |hash, &h| (hash << 16) ^ (hash >> 16) ^ h);
    put32(&mut b, 0x0C, hash);
    let csum = crc32c(crc32c(csum_seed, &at.to_le_bytes()), &b);
    put32(&mut b, 0x10, csum);
    b
}

/// Encodes entries from the start of `region` and values from its end; offsets relative to
/// the region start.
fn encode(all: &[Stored<'_>], region: &mut [u8]) {
    encode_at(all, region, 0);
}

/// Like [`encode`] with entries starting at `first`; returns the entry hashes.
fn encode_at(all: &[Stored<'_>], region: &mut [u8], first: usize) -> Vec<u32> {
    let mut entry = first;
    let mut value_end = region.len();
    let mut hashes = Vec::with_capacity(all.len());
    for s in all {
        let value_at = value_end - s.value.len().next_multiple_of(4);
        region[value_at..value_at + s.value.len()].copy_from_slice(&s.value);
        value_end = value_at;
        let hash = entry_hash(s.name, &s.value);
        hashes.push(hash);
        region[entry] =
            u8::try_from(s.name.len()).expect("names are checked to be at most 255 bytes");
        region[entry + 1] = s.index;
        put16(
            region,
            entry + 2,
            if s.value.is_empty() {
                0
            } else {
                field16(value_at, "xattr value offset")
            },
        );
        put32(region, entry + 4, 0); // value inode
        put32(
            region,
            entry + 8,
            field32(s.value.len() as u64, "xattr value size"),
        );
        put32(region, entry + 12, hash);
        region[entry + ENTRY_HEADER..entry + ENTRY_HEADER + s.name.len()].copy_from_slice(s.name);
        entry += (ENTRY_HEADER + s.name.len()).next_multiple_of(4);
    }
    hashes
}

/// `ext4_xattr_hash_entry`: name bytes (as signed chars, like the kernel on x86), then the
/// value as little-endian 32-bit words.
fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash = 0u32;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ (c as i8 as i32 as u32);
    }
    for word in value.chunks(4) {
        let mut w = [0u8; 4];
        w[..word.len()].copy_from_slice(word);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_prefix_indexes() {
        assert_eq!(split_name(b"user.a"), Some((1, &b"a"[..])));
        assert_eq!(
            split_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(split_name(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(split_name(b"system.data"), None);
        assert_eq!(split_name(b"user."), None);
        assert_eq!(split_name(b"os2.x"), None);
    }

    #[test]
    fn acls_are_stored_in_the_ext4_format() {
        // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let disk = stored_value(2, &vfs).unwrap();
        assert_eq!(disk.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&disk[..4], &1u32.to_le_bytes());
        assert_eq!(footprint(b"system.posix_acl_access", &vfs), Some(16 + 28));
    }

    #[test]
    fn a_capability_fits_in_the_inode() {
        let cap = vec![1u8; 20];
        let xattrs = vec![(b"security.capability".to_vec(), cap)];
        assert!(matches!(placement(&xattrs), Placement::Inline(_)));
        let big = vec![(b"user.big".to_vec(), vec![7u8; 200])];
        assert!(matches!(placement(&big), Placement::Block));
    }
}
