//! Reads back the state of an existing ext4 file system from its primary superblock: whether
//! it was cleanly unmounted. A file system with a journal keeps `EXT4_VALID_FS` in `s_state`
//! while mounted and marks itself with the `RECOVER` incompat flag ("needs journal recovery")
//! until it is unmounted, so a disk is clean when `s_state` has `EXT4_VALID_FS`, not
//! `EXT4_ERROR_FS`, and `RECOVER` is clear.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Byte offset of the primary superblock.
const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;
const STATE_VALID_FS: u16 = 0x1;
const STATE_ERROR_FS: u16 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;

/// Why a superblock could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("cannot read the ext4 superblock of {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no ext4 file system (superblock magic {magic:#06x})")]
    NotExt4 { path: PathBuf, magic: u16 },
}

/// What the superblock says about how the file system was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperblockState {
    /// `s_state` has `EXT4_VALID_FS` (cleanly unmounted, or mounted with a journal).
    pub valid: bool,
    /// `s_state` has `EXT4_ERROR_FS`: the kernel found errors.
    pub errors: bool,
    /// The `RECOVER` incompat flag: mounted now, or not unmounted since (journal to replay).
    pub needs_recovery: bool,
}

impl SuperblockState {
    /// Cleanly unmounted, no errors recorded: safe to use as it is.
    pub fn clean(&self) -> bool {
        self.valid && !self.errors && !self.needs_recovery
    }
}

/// Reads the state of the ext4 file system in the image (or block device) at `path`.
pub fn read(path: &Path) -> Result<SuperblockState, SuperblockError> {
    let read_err = |source| SuperblockError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut sb = [0u8; 0x68];
    file.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
        .map_err(read_err)?;
    let u16_at = |at: usize| u16::from_le_bytes([sb[at], sb[at + 1]]);
    let magic = u16_at(0x38);
    if magic != MAGIC {
        return Err(SuperblockError::NotExt4 {
            path: path.to_owned(),
            magic,
        });
    }
    let state = u16_at(0x3A);
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    Ok(SuperblockState {
        valid: state & STATE_VALID_FS != 0,
        errors: state & STATE_ERROR_FS != 0,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
    })
}
