//! The node's side of the build caches ([`builder_cache`]): the pool opened at start, each
//! build's fork before its VM launches and its commit or discard after the VM exited, what of
//! that is recorded on the build (its `cache` outcome and an event line), and the rootfs a
//! build of an unchanged image may reuse instead of converting and uploading it again.

use std::sync::Arc;
use std::time::Duration;

use builder_cache::{CacheEntry, CacheError, CacheFork, CacheKey, CachePool};
use builder_contract::RootfsReuse;

use crate::db::{BuildRow, Db, DbError, Update};
use crate::metrics::Metrics;

/// How long a VM with a cache disk may take to power off after its report: the guest stops
/// dockerd and unmounts the cache first.
pub const POWEROFF_WITH_CACHE: Duration = Duration::from_secs(90);

/// What a build got of the build cache, as recorded in its `cache` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A fork of its key's committed disk.
    Hit,
    /// A new empty disk: the key had none (or `no_cache`).
    Miss,
    /// No cache disk: the node has the cache off.
    Off,
    /// No cache disk: the fork failed (the build ran without one).
    Error,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Off => "off",
            CacheOutcome::Error => "error",
        }
    }
}

/// A build's fork, between its VM's launch and the end of the VM.
#[derive(Debug)]
pub struct BuildFork {
    fork: CacheFork,
    /// `no_cache`: a new empty disk that is never committed.
    keep: bool,
}

impl BuildFork {
    pub fn path(&self) -> &std::path::Path {
        &self.fork.path
    }

    /// The id of the key whose cache this is; `None` for a `no_cache` disk (no key's).
    pub fn cache_id(&self) -> Option<String> {
        self.keep.then(|| self.fork.key.id().to_string())
    }
}

/// Why a fork is not committed, for the build's event line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// The build did not succeed (or its report was refused).
    NotSucceeded,
    /// The VM did not power itself off after its report: it was killed, so the disk may be
    /// mid-write.
    Killed,
    /// The request asked for `no_cache`.
    NoCache,
}

impl DiscardReason {
    fn as_str(self) -> &'static str {
        match self {
            DiscardReason::NotSucceeded => "the build did not succeed",
            DiscardReason::Killed => "the VM did not power itself off after its report",
            DiscardReason::NoCache => "the build asked for no_cache",
        }
    }
}

/// Opens the pool of `config` off the runtime's threads, logging what opening it did (a
/// reflink image mounted, leftover forks of a previous run removed).
pub async fn open_pool(config: builder_cache::PoolConfig) -> Result<Arc<CachePool>, CacheError> {
    let pool = tokio::task::spawn_blocking(move || CachePool::open(config))
        .await
        .expect("opening the cache pool does not panic")?;
    for note in pool.notes() {
        tracing::info!(note = %note, "build cache");
    }
    Ok(Arc::new(pool))
}

/// Closes the pool once the node has drained (no fork is live): a stopping node leaves no
/// reflink image mounted; the next start mounts it again.
pub async fn close_pool(pool: &Arc<CachePool>) {
    let pool = pool.clone();
    match tokio::task::spawn_blocking(move || pool.close())
        .await
        .expect("closing the cache pool does not panic")
    {
        Ok(true) => tracing::info!("build cache: unmounted the XFS reflink image"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = crate::error_chain(&e), "build cache"),
    }
}

/// Forks the build's cache disk (a new empty one with `no_cache`) and records the outcome and
/// an event line; a fork that fails is recorded as `error` and the build runs without a disk.
pub async fn fork(
    pool: Option<&Arc<CachePool>>,
    db: &Db,
    node_id: &str,
    metrics: &Metrics,
    row: &BuildRow,
    namespace: &str,
) -> Option<BuildFork> {
    let name = row.request.cache_name().to_string();
    let Some(pool) = pool else {
        record(db, node_id, row, None, CacheOutcome::Off, None).await;
        return None;
    };
    let no_cache = row.request.no_cache;
    // A `no_cache` build gets a key of its own (the build id), so it starts empty.
    let key = if no_cache {
        CacheKey::new(namespace, &format!("no-cache:{}", row.id))
    } else {
        CacheKey::new(namespace, &name)
    };
    let forked = match key {
        Ok(key) => {
            let pool = pool.clone();
            let fork_id = row.id.clone();
            tokio::task::spawn_blocking(move || pool.fork(&key, &fork_id))
                .await
                .expect("a cache fork does not panic")
        }
        Err(e) => Err(e),
    };
    match forked {
        Ok(fork) => {
            metrics.observe_cache_fork(fork.took);
            let outcome = if fork.hit {
                CacheOutcome::Hit
            } else {
                CacheOutcome::Miss
            };
            let detail = format!(
                "build cache {}: forked key {:?} ({}) by {} in {} ms",
                outcome.as_str(),
                fork.key.name(),
                fork.key.id(),
                fork.method,
                fork.took.as_millis()
            );
            let id = (!no_cache).then(|| fork.key.id().to_string());
            record(db, node_id, row, id, outcome, Some(&detail)).await;
            Some(BuildFork {
                fork,
                keep: !no_cache,
            })
        }
        Err(e) => {
            let error = crate::error_chain(&e);
            tracing::warn!(
                build_id = row.id,
                error,
                "cannot fork the build cache; the build runs without one"
            );
            let detail = format!("build cache error, the build runs without one: {error}");
            record(db, node_id, row, None, CacheOutcome::Error, Some(&detail)).await;
            None
        }
    }
}

/// Commits the fork when `commit` is `Ok`, else discards it for the reason given; records an
/// event line either way. Never leaves the fork behind (a refused or failed commit removes it).
pub async fn settle(
    pool: &Arc<CachePool>,
    db: &Db,
    node_id: &str,
    metrics: &Metrics,
    row: &BuildRow,
    fork: BuildFork,
    commit: Result<(), DiscardReason>,
) {
    let commit = if fork.keep {
        commit
    } else {
        Err(DiscardReason::NoCache)
    };
    let pool = pool.clone();
    let detail = match commit {
        Ok(()) => {
            let committed = tokio::task::spawn_blocking(move || pool.commit(fork.fork))
                .await
                .expect("a cache commit does not panic");
            match committed {
                Ok(c) => {
                    metrics.observe_cache_commit(c.took);
                    format!(
                        "build cache committed in {} ms ({} bytes){}",
                        c.took.as_millis(),
                        c.entry.bytes,
                        evicted_text(&c.evicted)
                    )
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    tracing::warn!(
                        build_id = row.id,
                        error,
                        "the build cache was not committed"
                    );
                    format!("build cache not committed: {error}")
                }
            }
        }
        Err(reason) => {
            let discarded = tokio::task::spawn_blocking(move || pool.discard(fork.fork))
                .await
                .expect("a cache discard does not panic");
            match discarded {
                Ok(()) => format!("build cache discarded: {}", reason.as_str()),
                Err(e) => {
                    let error = crate::error_chain(&e);
                    tracing::error!(build_id = row.id, error, "cannot discard the cache fork");
                    format!("build cache discarded ({}), but: {error}", reason.as_str())
                }
            }
        }
    };
    note(db, node_id, row, &detail, Update::default()).await;
}

/// The rootfs build `row` may reuse: the one of its requester's last succeeded build of the
/// same cache (`cache_id`) to the same location, unless the request asks for `force_upload`.
pub async fn reuse_offer(
    db: &Db,
    row: &BuildRow,
    cache_id: &str,
) -> Result<Option<RootfsReuse>, DbError> {
    let (Some(bucket), Some(key)) = (
        row.request.s3_bucket.as_deref(),
        row.request.s3_key.as_deref(),
    ) else {
        return Ok(None);
    };
    if row.request.force_upload {
        return Ok(None);
    }
    let Ok(location) = builder_contract::S3Location::new(bucket, key) else {
        return Ok(None);
    };
    let last = db
        .last_upload(&row.requester, cache_id, &location.to_string())
        .await?;
    Ok(last.and_then(|last| {
        Some(RootfsReuse {
            image_digest: last.image_digest?,
            sha256: last.rootfs_sha256?,
            size_bytes: u64::try_from(last.rootfs_size_bytes?).ok()?,
        })
    }))
}

fn evicted_text(evicted: &[CacheEntry]) -> String {
    if evicted.is_empty() {
        return String::new();
    }
    let keys: Vec<String> = evicted
        .iter()
        .map(|e| format!("{}/{:?} ({})", e.namespace, e.name, e.id))
        .collect();
    format!("; evicted {}", keys.join(", "))
}

/// Records the build's cache columns and, when given, an event line.
async fn record(
    db: &Db,
    node_id: &str,
    row: &BuildRow,
    cache_id: Option<String>,
    outcome: CacheOutcome,
    detail: Option<&str>,
) {
    let update = Update::default()
        .set("cache_key", row.request.cache_name())
        .set("cache_id", cache_id)
        .set("cache", outcome.as_str());
    match detail {
        Some(detail) => note(db, node_id, row, detail, update).await,
        None => {
            if let Err(e) = db.update(&row.id, update).await {
                tracing::warn!(
                    build_id = row.id,
                    error = crate::error_chain(&e),
                    "cannot record the build cache"
                );
            }
        }
    }
}

async fn note(db: &Db, node_id: &str, row: &BuildRow, detail: &str, update: Update) {
    if let Err(e) = db.note(&row.id, node_id, detail, update).await {
        tracing::warn!(
            build_id = row.id,
            error = crate::error_chain(&e),
            detail,
            "cannot record the build cache"
        );
    }
}
