//! The node's build caches (INTERFACE SKELETON: bodies to be written).
//!
//! A cache key ([`CacheKey`]: a namespace, normally the requester, and a name, normally the
//! repository URL) owns one committed ext4 disk holding a builder VM's Docker data root and
//! BuildKit cache. Each build of the key gets its own writable fork of that disk
//! ([`CachePool::fork`]); when the build succeeds the fork replaces the committed disk
//! atomically ([`CachePool::commit`]), otherwise it is thrown away ([`CachePool::discard`]).
//! The pool's total is held under a limit by evicting whole keys, least recently used first.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache key name `{name}` is not valid: use 1 to {max} printable characters")]
    KeyName { name: String, max: usize },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The id of a cache key on disk and in the API: 32 lower-case hex digits of
/// SHA-256(namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct CacheId(String);

impl CacheId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CacheId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for CacheId {
    type Err = CacheError;
    fn from_str(_value: &str) -> Result<Self, CacheError> {
        todo!()
    }
}

/// A cache key: builds share a cache only when both parts are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    id: CacheId,
    namespace: String,
    name: String,
}

impl CacheKey {
    pub const MAX_NAME_LEN: usize = 256;

    pub fn new(_namespace: &str, _name: &str) -> Result<Self, CacheError> {
        todo!()
    }
    pub fn id(&self) -> &CacheId {
        &self.id
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn name(&self) -> &str {
        &self.name
    }
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

/// The node's pool of cache disks.
#[derive(Debug)]
pub struct CachePool {
    config: PoolConfig,
}

impl CachePool {
    /// Opens (creating, and mounting a reflink image when configured) the pool, and removes the
    /// forks a previous run left behind.
    pub fn open(config: PoolConfig) -> Result<CachePool, CacheError> {
        let _ = &config.dir;
        todo!()
    }
    pub fn fork_method(&self) -> ForkMethod {
        todo!()
    }
    /// A writable fork of `key`'s committed disk for one build (`fork_id` unique among live
    /// forks, e.g. the build id); a miss makes a new empty disk.
    pub fn fork(&self, _key: &CacheKey, _fork_id: &str) -> Result<CacheFork, CacheError> {
        todo!()
    }
    /// Makes the fork its key's committed disk, atomically, if its ext4 was cleanly unmounted;
    /// then evicts down to the limit.
    pub fn commit(&self, _fork: CacheFork) -> Result<Committed, CacheError> {
        todo!()
    }
    /// Throws the fork away; the committed disk stays as it was.
    pub fn discard(&self, _fork: CacheFork) -> Result<(), CacheError> {
        todo!()
    }
    pub fn list(&self) -> Result<Vec<CacheEntry>, CacheError> {
        todo!()
    }
    /// Removes a key's committed disk; `None` when it has none.
    pub fn remove(&self, _id: &CacheId) -> Result<Option<CacheEntry>, CacheError> {
        todo!()
    }
    pub fn stats(&self) -> CacheStats {
        todo!()
    }
}
