//! Why a file system could not be written: the output failed, a file's content could not be
//! read, the tree holds something ext4 cannot store (each naming the path), the tree does
//! not fit the size asked for, or a new disk got no random ids.

use std::path::PathBuf;

/// Why [`crate::write`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The output file could not be created or written.
    #[error("cannot {op} {path}")]
    Output {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A regular file's content could not be opened or read (`path` is its path in the tree).
    #[error("cannot {op} {path}")]
    Content {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tree holds more of something than ext4 can store.
    #[error("the image exceeds the limit on {what} ({limit})")]
    LimitExceeded { what: &'static str, limit: u64 },
    /// An entry of the tree cannot be stored in ext4.
    #[error("the entry {path} cannot be stored in ext4: {problem}")]
    InvalidEntry {
        path: PathBuf,
        problem: EntryProblem,
    },
    /// The options ask for something the writer cannot make.
    #[error("invalid ext4 option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    /// The file system (planned, or of the fixed size asked for) is too small for the tree.
    #[error("the ext4 file system of {blocks} blocks is too small for its content")]
    TooSmall { blocks: u64 },
    /// No random UUID and hash seed could be had for a new disk.
    #[error("cannot pick a random UUID for {path}")]
    Random {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A value does not fit the on-disk field that stores it.
    #[error("the {field} ({value}) does not fit its on-disk field")]
    FieldOverflow { field: &'static str, value: u64 },
}

/// Why one entry cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum EntryProblem {
    #[error("its name is empty, `.`, `..`, or holds a `/` or NUL byte")]
    BadName,
    #[error("its name is longer than 255 bytes")]
    NameTooLong,
    #[error("the symlink target is empty or longer than 4095 bytes")]
    BadSymlinkTarget,
    #[error(
        "the extended attribute name {name:?} cannot be stored (names start with user., \
         trusted. or security., or are a POSIX ACL, and are at most 255 bytes)"
    )]
    BadXattrName { name: String },
    #[error("the extended attributes take {bytes} bytes, more than the {max} ext4 can hold")]
    XattrsTooLarge { bytes: usize, max: usize },
    #[error("the mtime {mtime} is outside the range ext4 can store")]
    BadMtime { mtime: i64 },
    #[error("the mode {mode:o} has bits beyond the permission bits (0o7777)")]
    BadMode { mode: u32 },
    #[error("the root (node 0) is not a directory")]
    RootNotDirectory,
    #[error("the node {node} does not exist")]
    NoSuchNode { node: usize },
    #[error("it is a second name of a directory (directories cannot be hardlinked)")]
    DirectoryHardlink,
}
