//! Producing the ext4 file: sizing, `mkfs.ext4 -d` with pinned features and deterministic
//! identifiers, and one post-processing pass.
//!
//! `mkfs.ext4 -d` copies each inode's ctime from the staging directory, i.e. the moment the
//! converter wrote it, which would make two conversions differ, and gives the root directory
//! fixed attributes instead of the image's. [`finish_inodes`] rewrites the ctime of every
//! in-use inode to its mtime, gives the root inode the image's mode, owner and mtime, and
//! recomputes the inode checksums, reading the superblock, group descriptors, inode bitmaps
//! and inode tables directly.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{io_err, ConvertError};
use crate::materialize::Usage;
use crate::tree::Meta;

const BLOCK: u64 = 4096;
const ROOT_INODE: u32 = 2;
const INODE_SIZE: u64 = 256;
const BLOCKS_PER_GROUP: u64 = 32768;
/// `E2FSPROGS_FAKE_TIME`: superblock times, and times of the root and lost+found.
const FAKE_TIME: &str = "1";
/// How often mkfs is retried with a larger file when the estimate was too small.
const SIZE_ATTEMPTS: u32 = 3;

/// Features are pinned here so the host's /etc/mke2fs.conf cannot change the output.
/// Journal kept: the application writes to its rootfs and the VM can be killed at any time,
/// and the init does not run fsck. No resize_inode (its reserved GDT blocks cost space; an
/// offline resize2fs still works), no orphan_file (older guest kernels).
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\treserved_ratio = 0
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

pub(crate) struct Sizing {
    pub blocks: u64,
    pub inodes: u64,
    pub journal_mib: u64,
}

/// Size = content + metadata + free space (`free_percent` of the used size, at least
/// `min_free_bytes`); inode count = what the tree uses plus the same share free.
pub(crate) fn size_for(usage: &Usage, free_percent: u32, min_free_bytes: u64) -> Sizing {
    let reserved_inodes = 11 + 1; // reserved inodes 1..=11, lost+found
    let used_inodes = usage.inodes + reserved_inodes;
    let inodes =
        (used_inodes + (used_inodes * u64::from(free_percent) / 100).max(1024)).next_multiple_of(8);
    let data = usage.blocks + 4; // lost+found
    let journal_blocks = (data / 32).clamp(1024, 16384).next_multiple_of(256);
    let inode_table = (inodes * INODE_SIZE).div_ceil(BLOCK);
    let rough = data + journal_blocks + inode_table;
    let groups = rough.div_ceil(BLOCKS_PER_GROUP) + 1;
    // Bitmaps, superblock and descriptor backups, flex_bg padding, plus slack for extent
    // tree blocks of fragmented files.
    let metadata = groups * 4 + groups.div_ceil(64) * 16 + 64 + data / 256;
    let used = rough + metadata;
    let free = (used * u64::from(free_percent) / 100).max(min_free_bytes.div_ceil(BLOCK));
    Sizing {
        blocks: (used + free).next_multiple_of(256),
        inodes,
        journal_mib: journal_blocks / 256,
    }
}

/// Runs `mkfs.ext4 -d staging` into `output`, growing the file if the estimate was too small.
pub(crate) fn make_filesystem(
    staging: &Path,
    output: &Path,
    work: &Path,
    sizing: &Sizing,
    image_id: &str,
) -> Result<(), ConvertError> {
    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF).map_err(io_err("write", &conf))?;
    let uuid = derived_uuid(image_id, "filesystem uuid");
    let hash_seed = derived_uuid(image_id, "directory hash seed");
    let mkfs = find_tool("mkfs.ext4").ok_or_else(|| ConvertError::Mkfs {
        path: output.to_owned(),
        detail: "mkfs.ext4 is not installed (looked in $PATH, /usr/sbin and /sbin)".into(),
        disk_full: false,
    })?;
    let mut blocks = sizing.blocks;
    for attempt in 1..=SIZE_ATTEMPTS {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(output)
            .map_err(io_err("create", output))?;
        file.set_len(blocks * BLOCK)
            .map_err(io_err("size", output))?;
        drop(file);
        let result = Command::new(&mkfs)
            .env("MKE2FS_CONFIG", &conf)
            .env("E2FSPROGS_FAKE_TIME", FAKE_TIME)
            .env("LC_ALL", "C")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .arg("-N")
            .arg(sizing.inodes.to_string())
            .arg("-J")
            .arg(format!("size={}", sizing.journal_mib))
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!(
                "hash_seed={hash_seed},nodiscard,assume_storage_prezeroed=1"
            ))
            .arg("-d")
            .arg(staging)
            .arg(output)
            .output()
            .map_err(|e| ConvertError::Mkfs {
                path: output.to_owned(),
                detail: format!("cannot run it: {e}"),
                disk_full: false,
            })?;
        if result.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&result.stderr).trim().to_owned();
        let too_small = stderr.contains("Could not allocate")
            || stderr.contains("No free space in the directory");
        if too_small && attempt < SIZE_ATTEMPTS {
            tracing::warn!(
                blocks,
                "the file system estimate was too small, retrying larger"
            );
            blocks += blocks / 2;
            continue;
        }
        return Err(ConvertError::Mkfs {
            path: output.to_owned(),
            detail: format!("{}: {stderr}", result.status),
            disk_full: stderr.contains("No space left on device"),
        });
    }
    unreachable!("the last attempt returns")
}

/// An executable named `name` in `$PATH` or the sbin directories, which an init process's
/// minimal `PATH` (or none) tends to lack.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A UUID (8-4-4-4-12 hex) derived from the image id and a purpose.
fn derived_uuid(image_id: &str, purpose: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"builder-rootfs ")
        .chain_update(purpose)
        .chain_update(b" ")
        .chain_update(image_id)
        .finalize();
    let h = hex::encode(&digest[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Sets ctime := mtime (with nanoseconds) on every in-use inode, the root directory's
/// attributes to `root`, and fixes the checksums.
pub(crate) fn finish_inodes(path: &Path, root: &Meta) -> Result<(), ConvertError> {
    let layout = |reason: &str| ConvertError::Ext4Layout {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let read = io_err("read", path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("open", path))?;
    let mut sb = [0u8; 1024];
    file.read_exact_at(&mut sb, 1024).map_err(read)?;
    if le16(&sb, 0x38) != 0xEF53 || le32(&sb, 0x18) != 2 {
        return Err(layout("not an ext4 file system with 4 KiB blocks"));
    }
    let inodes_count = u64::from(le32(&sb, 0x0));
    let inodes_per_group = u64::from(le32(&sb, 0x28));
    let inode_size = u64::from(le16(&sb, 0x58));
    let incompat = le32(&sb, 0x60);
    let ro_compat = le32(&sb, 0x64);
    let is_64bit = incompat & 0x80 != 0;
    let desc_size = if is_64bit {
        u64::from(le16(&sb, 0xFE))
    } else {
        32
    };
    let metadata_csum = ro_compat & 0x400 != 0;
    let csum_seed = if incompat & 0x2000 != 0 {
        le32(&sb, 0x270)
    } else {
        crc32c(!0, &sb[0x68..0x78])
    };
    if inodes_per_group == 0 || !(128..=1024).contains(&inode_size) || desc_size < 32 {
        return Err(layout("implausible superblock values"));
    }
    let groups = inodes_count.div_ceil(inodes_per_group);
    let mut gdt = vec![0u8; (groups * desc_size) as usize];
    file.read_exact_at(&mut gdt, BLOCK)
        .map_err(io_err("read", path))?;
    let mut bitmap = vec![0u8; BLOCK as usize];
    let mut table = vec![0u8; (inodes_per_group * inode_size) as usize];
    for group in 0..groups {
        let desc = &gdt[(group * desc_size) as usize..((group + 1) * desc_size) as usize];
        if le16(desc, 0x12) & 0x1 != 0 {
            continue; // INODE_UNINIT: no inode in use
        }
        let hi = |at: usize| {
            if is_64bit {
                u64::from(le32(desc, at)) << 32
            } else {
                0
            }
        };
        let bitmap_block = u64::from(le32(desc, 0x4)) | hi(0x24);
        let table_block = u64::from(le32(desc, 0x8)) | hi(0x28);
        file.read_exact_at(&mut bitmap, bitmap_block * BLOCK)
            .map_err(io_err("read", path))?;
        file.read_exact_at(&mut table, table_block * BLOCK)
            .map_err(io_err("read", path))?;
        let mut dirty = vec![false; table.len().div_ceil(BLOCK as usize)];
        for index in 0..inodes_per_group as usize {
            if bitmap[index / 8] & (1 << (index % 8)) == 0 {
                continue;
            }
            let at = index * inode_size as usize;
            let inode = &mut table[at..at + inode_size as usize];
            if le16(inode, 0x0) == 0 {
                continue; // reserved inode that holds nothing
            }
            let extra = if inode_size > 128 {
                le16(inode, 0x80) as usize
            } else {
                0
            };
            let number = (group * inodes_per_group + index as u64 + 1) as u32;
            if number == ROOT_INODE {
                set_root_attributes(inode, extra, root);
            }
            let mtime = le32(inode, 0x10);
            let mut changed = number == ROOT_INODE || le32(inode, 0x0C) != mtime;
            inode[0x0C..0x10].copy_from_slice(&mtime.to_le_bytes());
            if extra >= 12 {
                // i_ctime_extra at 0x84, i_mtime_extra at 0x88.
                let mtime_extra = le32(inode, 0x88);
                changed |= le32(inode, 0x84) != mtime_extra;
                inode[0x84..0x88].copy_from_slice(&mtime_extra.to_le_bytes());
            }
            if !changed {
                continue;
            }
            if metadata_csum {
                let has_hi = extra >= 4;
                inode[0x7C..0x7E].fill(0);
                if has_hi {
                    inode[0x82..0x84].fill(0);
                }
                let seed = crc32c(crc32c(csum_seed, &number.to_le_bytes()), &inode[0x64..0x68]);
                let csum = crc32c(seed, inode);
                inode[0x7C..0x7E].copy_from_slice(&(csum as u16).to_le_bytes());
                if has_hi {
                    inode[0x82..0x84].copy_from_slice(&((csum >> 16) as u16).to_le_bytes());
                }
            }
            dirty[at / BLOCK as usize] = true;
        }
        for (block, _) in dirty.iter().enumerate().filter(|(_, d)| **d) {
            let start = block * BLOCK as usize;
            file.write_all_at(
                &table[start..start + BLOCK as usize],
                table_block * BLOCK + start as u64,
            )
            .map_err(io_err("write", path))?;
        }
    }
    file.sync_all().map_err(io_err("sync", path))
}

/// Mode bits, owner and times of the root directory inode (mkfs gives it 0755, its own
/// owner and the fake time).
fn set_root_attributes(inode: &mut [u8], extra: usize, root: &Meta) {
    let mode = (u32::from(le16(inode, 0x0)) & 0o170000) | (root.mode & 0o7777);
    inode[0x00..0x02].copy_from_slice(&(mode as u16).to_le_bytes());
    inode[0x02..0x04].copy_from_slice(&(root.uid as u16).to_le_bytes());
    inode[0x78..0x7A].copy_from_slice(&((root.uid >> 16) as u16).to_le_bytes());
    inode[0x18..0x1A].copy_from_slice(&(root.gid as u16).to_le_bytes());
    inode[0x7A..0x7C].copy_from_slice(&((root.gid >> 16) as u16).to_le_bytes());
    let seconds = (root.mtime as u32).to_le_bytes();
    // The extra fields hold the epoch bits (above 32) in their low two bits, nanoseconds above.
    let epoch = (((root.mtime >> 32) & 0b11) as u32).to_le_bytes();
    for at in [0x08, 0x0C, 0x10] {
        inode[at..at + 4].copy_from_slice(&seconds);
    }
    if extra >= 16 {
        for at in [0x84, 0x88, 0x8C] {
            inode[at..at + 4].copy_from_slice(&epoch);
        }
    }
}

/// CRC-32C (Castagnoli) without pre- or post-inversion, as ext4 chains it.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// Apparent size and hex sha256 of a file.
pub(crate) fn digest_file(path: &Path) -> Result<(u64, String), ConvertError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let size =
        std::io::copy(&mut file, &mut HashWriter(&mut hasher)).map_err(io_err("read", path))?;
    Ok((size, hex::encode(hasher.finalize())))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }
}
