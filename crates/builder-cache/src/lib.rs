//! The node's build caches.
//!
//! A cache key ([`CacheKey`]: a namespace, normally the requester, and a name, normally the
//! repository URL) owns one committed ext4 disk holding a builder VM's Docker data root and
//! BuildKit cache. Each build of the key gets its own writable fork of that disk
//! ([`CachePool::fork`]); when the build succeeds the fork replaces the committed disk
//! atomically ([`CachePool::commit`]), otherwise it is thrown away ([`CachePool::discard`]).
//! The pool's total is held under a limit by evicting whole keys, least recently used first.
//!
//! `key` owns keys and ids, `pool` the directory layout, locking, commit and eviction, `meta`
//! a key's `meta.json`, `fork` the copying of disks (reflink or sparse copy), `reflink_pool`
//! the XFS image mounted on the pool's directory when its own file system cannot reflink.
//! Every call blocks (run it off an async runtime's threads); the pool is `Send + Sync`.

mod fork;
mod key;
mod meta;
mod pool;
mod reflink_pool;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use key::{CacheId, CacheKey};
pub use pool::{CachePool, CACHE_DISK_LABEL};

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache key name `{name}` is not valid: use 1 to {max} printable characters")]
    KeyName { name: String, max: usize },
    #[error("the cache key namespace is empty")]
    KeyNamespaceEmpty,
    #[error("`{value}` is not a cache id: use 32 lower-case hex digits")]
    CacheIdSyntax { value: String },
    #[error("the fork id `{fork_id}` is not valid: use 1 to 64 of a-z, 0-9 and -")]
    ForkId { fork_id: String },
    #[error("{path} is not a fork of this cache pool")]
    ForeignFork { path: PathBuf },
    #[error("the cache disk {path} was not cleanly unmounted, so it was not committed")]
    NotClean { path: PathBuf },
    #[error("cannot tell whether the cache disk {path} was cleanly unmounted")]
    Superblock {
        path: PathBuf,
        #[source]
        source: builder_ext4::superblock::SuperblockError,
    },
    #[error("cannot make a new cache disk {path}")]
    NewDisk {
        path: PathBuf,
        #[source]
        source: builder_ext4::Ext4Error,
    },
    #[error("the cache metadata {path} is not valid")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the cache metadata {path} is missing beside its committed disk")]
    MetaMissing { path: PathBuf },
    #[error("the cache pool {dir} is closed: the node agent is stopping")]
    Closed { dir: PathBuf },
    #[error("cannot unmount the XFS reflink image from the cache pool {dir}")]
    Unmount {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a fork is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkMethod {
    /// `FICLONE`: shares every extent, O(metadata) (XFS with reflink, btrfs).
    Reflink,
    /// Copies the allocated ranges (`SEEK_DATA`/`SEEK_HOLE`), O(data) (any filesystem).
    SparseCopy,
}

impl ForkMethod {
    /// The method's name as a label value (`reflink`, `sparse_copy`), as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ForkMethod::Reflink => "reflink",
            ForkMethod::SparseCopy => "sparse_copy",
        }
    }
}

impl std::fmt::Display for ForkMethod {
    /// The method in prose: `reflink`, `sparse copy`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForkMethod::Reflink => "reflink",
            ForkMethod::SparseCopy => "sparse copy",
        })
    }
}

/// Where the pool lives and how big things may get.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's directory (`keys/`, `forks/`, its lock file).
    pub dir: PathBuf,
    /// The sum of the committed disks' allocated bytes is held under this by eviction.
    pub max_bytes: u64,
    /// Size of a new (empty) cache disk; sparse.
    pub disk_mib: u64,
    /// When `dir`'s filesystem cannot reflink: a sparse XFS image of this size is made at
    /// `<dir>.xfs` and loop-mounted on `dir` (`None`: fall back to sparse copies).
    pub reflink_image_bytes: Option<u64>,
}

/// Something [`CachePool::open`] did or could not do that the caller should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolNote {
    /// The reflink image is mounted on the pool's directory (`made`: created now).
    ReflinkImageMounted { image: PathBuf, made: bool },
    /// No reflink image could be used: forks are sparse copies.
    ReflinkImageUnavailable { image: PathBuf, reason: String },
    /// What a previous run left behind was removed.
    LeftoversRemoved { forks: u64, half_made_keys: u64 },
}

impl std::fmt::Display for PoolNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolNote::ReflinkImageMounted { image, made: true } => write!(
                f,
                "made the XFS reflink image {} and mounted it on the cache pool",
                image.display()
            ),
            PoolNote::ReflinkImageMounted { image, made: false } => write!(
                f,
                "mounted the existing XFS reflink image {} on the cache pool",
                image.display()
            ),
            PoolNote::ReflinkImageUnavailable { image, reason } => write!(
                f,
                "cannot use the XFS reflink image {}, so cache forks are sparse copies: {reason}",
                image.display()
            ),
            PoolNote::LeftoversRemoved {
                forks,
                half_made_keys,
            } => write!(
                f,
                "removed {forks} forks and {half_made_keys} half-made keys a previous run left"
            ),
        }
    }
}

/// One key's committed cache, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheEntry {
    pub id: CacheId,
    pub namespace: String,
    pub name: String,
    /// Allocated bytes of the committed disk (extents shared with forks counted in full).
    pub bytes: u64,
    pub created_unix_ms: u64,
    pub last_used_unix_ms: u64,
    pub commits: u64,
}

/// A build's private, writable copy of its key's committed disk (or a new empty one).
#[derive(Debug)]
pub struct CacheFork {
    pub key: CacheKey,
    /// The disk the VM gets read-write.
    pub path: PathBuf,
    /// Made from a committed disk (false: a new empty disk).
    pub hit: bool,
    /// The pool's method, which made the fork on a hit (a miss writes a new disk).
    pub method: ForkMethod,
    pub took: Duration,
}

/// What a commit did.
#[derive(Debug, Clone)]
pub struct Committed {
    pub entry: CacheEntry,
    pub took: Duration,
    /// Keys evicted to stay under the limit afterwards.
    pub evicted: Vec<CacheEntry>,
}

/// Counters since the pool was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub commits: u64,
    pub discards: u64,
    /// Commits refused because the disk was not cleanly unmounted.
    pub refused: u64,
    pub evictions: u64,
    /// Allocated bytes of all committed disks now.
    pub bytes: u64,
    pub keys: u64,
}

/// Maps an I/O error on `path` while doing `action`.
fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_owned();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}
