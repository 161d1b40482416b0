//! The pool itself: its directory layout (`keys/<id>/disk.ext4` and `keys/<id>/meta.json`
//! per committed key, `forks/<fork_id>.ext4` per live fork, `lock`, all on one file system so
//! that a commit is a `rename(2)`), the lock that serializes metadata changes between the
//! threads of one process (a mutex) and between processes (`flock` on `lock`), the counters,
//! and eviction.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use builder_ext4::{fresh, superblock};

use crate::fork::copy_disk;
use crate::io_err;
use crate::meta::{KeyMeta, META_FILE};
use crate::{
    reflink_pool, CacheEntry, CacheError, CacheFork, CacheId, CacheKey, CacheStats, Committed,
    ForkMethod, PoolConfig, PoolNote,
};

/// File name of a key's committed disk in its directory.
const DISK_FILE: &str = "disk.ext4";
/// Filesystem label of every cache disk.
pub const CACHE_DISK_LABEL: &str = "cache";
/// The longest fork id.
const MAX_FORK_ID_LEN: usize = 64;

/// The node's pool of cache disks.
#[derive(Debug)]
pub struct CachePool {
    config: PoolConfig,
    keys_dir: PathBuf,
    forks_dir: PathBuf,
    method: ForkMethod,
    notes: Vec<PoolNote>,
    lock_file: File,
    state: Mutex<PoolState>,
}

// The node agent shares one pool between its blocking tasks.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<CachePool>();
};

#[derive(Debug, Default)]
struct PoolState {
    stats: CacheStats,
    /// The last time stamp handed out, so that this process's stamps strictly increase.
    last_stamp_unix_ms: u64,
    /// [`CachePool::close`] ran: no more forks.
    closed: bool,
}

/// The pool's lock, held: the in-process mutex and the `flock` on the lock file.
struct PoolLock<'a> {
    state: MutexGuard<'a, PoolState>,
    file: &'a File,
}

impl Drop for PoolLock<'_> {
    fn drop(&mut self) {
        // SAFETY: flock on an open descriptor has no memory effects.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl PoolLock<'_> {
    /// Now, in ms since the epoch, later than any stamp this pool handed out before.
    fn stamp(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let stamp = now.max(self.state.last_stamp_unix_ms + 1);
        self.state.last_stamp_unix_ms = stamp;
        stamp
    }
}

impl CachePool {
    /// Opens (creating, and mounting a reflink image when configured) the pool, and removes the
    /// forks a previous run left behind and the keys it left half made.
    pub fn open(config: PoolConfig) -> Result<CachePool, CacheError> {
        let mut notes = Vec::new();
        let method = reflink_pool::prepare(&config.dir, config.reflink_image_bytes, &mut notes)?;
        let (keys_dir, forks_dir) = (config.dir.join("keys"), config.dir.join("forks"));
        for dir in [&keys_dir, &forks_dir] {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let lock_path = config.dir.join("lock");
        let lock_file = File::options()
            .create(true)
            .append(true)
            .open(&lock_path)
            .map_err(io_err("open the lock file", &lock_path))?;
        let mut pool = CachePool {
            config,
            keys_dir,
            forks_dir,
            method,
            notes,
            lock_file,
            state: Mutex::new(PoolState::default()),
        };
        let (forks, half_made_keys) = {
            let mut lock = pool.lock()?;
            let forks = pool.remove_leftover_forks()?;
            let half_made_keys = pool.remove_half_made_keys()?;
            pool.recount(&mut lock)?;
            (forks, half_made_keys)
        };
        if forks + half_made_keys > 0 {
            pool.notes.push(PoolNote::LeftoversRemoved {
                forks,
                half_made_keys,
            });
        }
        Ok(pool)
    }

    pub fn fork_method(&self) -> ForkMethod {
        self.method
    }

    /// Ends the pool's use by this process (when no fork is live any more: the node agent
    /// calls it after draining): no fork is made after it, and the XFS reflink image mounted on
    /// the pool's directory is unmounted (lazily: this pool's lock file is still open in it),
    /// so a stopped node leaves no mount behind. True when an image was unmounted.
    pub fn close(&self) -> Result<bool, CacheError> {
        let mut lock = self.lock()?;
        lock.state.closed = true;
        if self.config.reflink_image_bytes.is_none() {
            return Ok(false);
        }
        reflink_pool::release(&self.config.dir)
    }

    /// What opening the pool did that the caller should log (a reflink image mounted, or why
    /// none could be; leftovers removed).
    pub fn notes(&self) -> &[PoolNote] {
        &self.notes
    }

    /// A writable fork of `key`'s committed disk for one build (`fork_id` unique among live
    /// forks, e.g. the build id: 1 to 64 of `a-z`, `0-9`, `-`); a miss makes a new empty disk.
    pub fn fork(&self, key: &CacheKey, fork_id: &str) -> Result<CacheFork, CacheError> {
        if self.state().closed {
            return Err(CacheError::Closed {
                dir: self.config.dir.clone(),
            });
        }
        let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
        if fork_id.is_empty() || fork_id.len() > MAX_FORK_ID_LEN || !fork_id.bytes().all(valid) {
            return Err(CacheError::ForkId {
                fork_id: fork_id.to_owned(),
            });
        }
        let began = Instant::now();
        let path = self.forks_dir.join(format!("{fork_id}.ext4"));
        let committed = self.open_committed(key)?;
        let hit = committed.is_some();
        match committed {
            Some(disk) => copy_disk(&disk, &path, self.method)?,
            None => {
                fresh::write_empty_disk(&path, self.config.disk_mib << 20, CACHE_DISK_LABEL)
                    .map_err(|source| CacheError::NewDisk {
                        path: path.clone(),
                        source,
                    })?;
            }
        }
        let mut state = self.state();
        if hit {
            state.stats.hits += 1;
        } else {
            state.stats.misses += 1;
        }
        Ok(CacheFork {
            key: key.clone(),
            path,
            hit,
            method: self.method,
            took: began.elapsed(),
        })
    }

    /// Makes the fork its key's committed disk, atomically, if its ext4 was cleanly unmounted;
    /// then evicts down to the limit. A fork that is not committed is removed.
    pub fn commit(&self, fork: CacheFork) -> Result<Committed, CacheError> {
        let began = Instant::now();
        self.check_own(&fork)?;
        let committed = self.commit_fork(&fork, began);
        if committed.is_err() {
            let _ = std::fs::remove_file(&fork.path);
        }
        committed
    }

    /// Throws the fork away; the committed disk stays as it was.
    pub fn discard(&self, fork: CacheFork) -> Result<(), CacheError> {
        self.check_own(&fork)?;
        std::fs::remove_file(&fork.path).map_err(io_err("remove the fork", &fork.path))?;
        self.state().stats.discards += 1;
        Ok(())
    }

    /// Every committed key, most recently used first.
    pub fn list(&self) -> Result<Vec<CacheEntry>, CacheError> {
        let mut entries = self.scan()?;
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used_unix_ms));
        Ok(entries)
    }

    /// Removes a key's committed disk; `None` when it has none. Its live forks stay.
    pub fn remove(&self, id: &CacheId) -> Result<Option<CacheEntry>, CacheError> {
        let mut lock = self.lock()?;
        let entry = self.entry(id)?;
        if entry.is_some() {
            let key_dir = self.keys_dir.join(id.as_str());
            std::fs::remove_dir_all(&key_dir).map_err(io_err("remove", &key_dir))?;
            self.recount(&mut lock)?;
        }
        Ok(entry)
    }

    pub fn stats(&self) -> CacheStats {
        self.state().stats
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> Result<PoolLock<'_>, CacheError> {
        let state = self.state();
        loop {
            // SAFETY: flock on an open descriptor has no memory effects.
            if unsafe { libc::flock(self.lock_file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let source = std::io::Error::last_os_error();
            if source.kind() != std::io::ErrorKind::Interrupted {
                return Err(CacheError::Io {
                    action: "lock",
                    path: self.config.dir.join("lock"),
                    source,
                });
            }
        }
        Ok(PoolLock {
            state,
            file: &self.lock_file,
        })
    }

    /// The key's committed disk, opened, its use recorded; `None` on a miss.
    fn open_committed(&self, key: &CacheKey) -> Result<Option<File>, CacheError> {
        let mut lock = self.lock()?;
        let key_dir = self.keys_dir.join(key.id().as_str());
        let disk_path = key_dir.join(DISK_FILE);
        let disk = match File::open(&disk_path) {
            Ok(disk) => disk,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    action: "open",
                    path: disk_path,
                    source,
                })
            }
        };
        let Some(mut meta) = KeyMeta::read(&key_dir)? else {
            return Err(CacheError::MetaMissing {
                path: key_dir.join(META_FILE),
            });
        };
        meta.last_used_unix_ms = lock.stamp();
        meta.write(&key_dir)?;
        sync_dir(&key_dir)?;
        Ok(Some(disk))
    }

    fn check_own(&self, fork: &CacheFork) -> Result<(), CacheError> {
        if fork.path.parent() == Some(self.forks_dir.as_path()) {
            Ok(())
        } else {
            Err(CacheError::ForeignFork {
                path: fork.path.clone(),
            })
        }
    }

    fn commit_fork(&self, fork: &CacheFork, began: Instant) -> Result<Committed, CacheError> {
        let clean = superblock::read(&fork.path)
            .map_err(|source| CacheError::Superblock {
                path: fork.path.clone(),
                source,
            })?
            .clean();
        if !clean {
            self.state().stats.refused += 1;
            return Err(CacheError::NotClean {
                path: fork.path.clone(),
            });
        }
        File::open(&fork.path)
            .and_then(|disk| disk.sync_all())
            .map_err(io_err("sync", &fork.path))?;

        let mut lock = self.lock()?;
        let id = fork.key.id();
        let key_dir = self.keys_dir.join(id.as_str());
        let new_key = match std::fs::create_dir(&key_dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(source) => {
                return Err(CacheError::Io {
                    action: "create",
                    path: key_dir,
                    source,
                })
            }
        };
        let now = lock.stamp();
        let mut meta = KeyMeta::read(&key_dir)?.unwrap_or(KeyMeta {
            namespace: fork.key.namespace().to_owned(),
            name: fork.key.name().to_owned(),
            created_unix_ms: now,
            last_used_unix_ms: now,
            commits: 0,
        });
        meta.commits += 1;
        meta.last_used_unix_ms = now;
        // Metadata first: a crash before the rename leaves a key without a disk, which the
        // next open removes as half made.
        meta.write(&key_dir)?;
        let disk_path = key_dir.join(DISK_FILE);
        std::fs::rename(&fork.path, &disk_path)
            .map_err(io_err("rename the fork to", &disk_path))?;
        sync_dir(&key_dir)?;
        sync_dir(&self.forks_dir)?;
        if new_key {
            sync_dir(&self.keys_dir)?;
        }
        lock.state.stats.commits += 1;
        let evicted = self.evict(&mut lock, id)?;
        self.recount(&mut lock)?;
        let entry = self.entry(id)?.ok_or_else(|| CacheError::Io {
            action: "find the committed disk",
            path: disk_path,
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        Ok(Committed {
            entry,
            took: began.elapsed(),
            evicted,
        })
    }

    /// Removes whole keys, least recently used first, but never `keep`, until the committed
    /// disks take no more than the limit.
    fn evict(
        &self,
        lock: &mut PoolLock<'_>,
        keep: &CacheId,
    ) -> Result<Vec<CacheEntry>, CacheError> {
        let mut entries = self.scan()?;
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.sort_by_key(|e| e.last_used_unix_ms);
        let mut evicted = Vec::new();
        for entry in entries {
            if total <= self.config.max_bytes {
                break;
            }
            if entry.id == *keep {
                continue;
            }
            let key_dir = self.keys_dir.join(entry.id.as_str());
            std::fs::remove_dir_all(&key_dir).map_err(io_err("evict", &key_dir))?;
            total -= entry.bytes;
            lock.state.stats.evictions += 1;
            evicted.push(entry);
        }
        if !evicted.is_empty() {
            sync_dir(&self.keys_dir)?;
        }
        Ok(evicted)
    }

    fn recount(&self, lock: &mut PoolLock<'_>) -> Result<(), CacheError> {
        let entries = self.scan()?;
        lock.state.stats.bytes = entries.iter().map(|e| e.bytes).sum();
        lock.state.stats.keys = entries.len() as u64;
        Ok(())
    }

    /// Every key with a committed disk and its metadata, unordered.
    fn scan(&self) -> Result<Vec<CacheEntry>, CacheError> {
        let mut entries = Vec::new();
        for dir_entry in read_dir(&self.keys_dir)? {
            let Ok(id) = dir_entry.file_name().to_string_lossy().parse::<CacheId>() else {
                continue;
            };
            entries.extend(self.entry(&id)?);
        }
        Ok(entries)
    }

    /// The key's committed entry; `None` when it has no disk or no metadata (yet).
    fn entry(&self, id: &CacheId) -> Result<Option<CacheEntry>, CacheError> {
        let key_dir = self.keys_dir.join(id.as_str());
        let disk_path = key_dir.join(DISK_FILE);
        let bytes = match std::fs::metadata(&disk_path) {
            Ok(stat) => std::os::unix::fs::MetadataExt::blocks(&stat) * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    action: "stat",
                    path: disk_path,
                    source,
                })
            }
        };
        Ok(KeyMeta::read(&key_dir)?.map(|meta| CacheEntry {
            id: id.clone(),
            namespace: meta.namespace,
            name: meta.name,
            bytes,
            created_unix_ms: meta.created_unix_ms,
            last_used_unix_ms: meta.last_used_unix_ms,
            commits: meta.commits,
        }))
    }

    /// Removes every file in `forks/`: no build survives a restart.
    fn remove_leftover_forks(&self) -> Result<u64, CacheError> {
        let mut removed = 0;
        for entry in read_dir(&self.forks_dir)? {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_err("remove the leftover fork", &path))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes the key directories without a disk or readable metadata (a commit that crashed
    /// half way), and whatever else is in `keys/`.
    fn remove_half_made_keys(&self) -> Result<u64, CacheError> {
        let mut removed = 0;
        for dir_entry in read_dir(&self.keys_dir)? {
            let path = dir_entry.path();
            let whole = match dir_entry.file_name().to_string_lossy().parse::<CacheId>() {
                Ok(id) => matches!(self.entry(&id), Ok(Some(_))),
                Err(_) => false,
            };
            if !whole {
                let removed_path = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed_path.map_err(io_err("remove the half-made key", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, CacheError> {
    std::fs::read_dir(dir)
        .and_then(|entries| entries.collect::<Result<Vec<_>, _>>())
        .map_err(io_err("list", dir))
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the directory", dir))
}
