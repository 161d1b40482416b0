//! The durable state: builds, their event history and seen report signatures (all pruned by
//! age, see [`crate::node::Node::prune`]), in SQLite (one
//! host) or PostgreSQL (a queue shared by several hosts) through one code path over
//! `sqlx::Any`. The SQL is portable; the only dialect difference is the row-lock suffix, which
//! is `FOR UPDATE [SKIP LOCKED]` on PostgreSQL and nothing on SQLite, where the pool has a
//! single connection and every transaction is therefore the only writer.
//!
//! Credential values never come here: a build row holds only their names (`credentials`) and,
//! when it has any, the node that holds the values (`pinned_node`), which alone claims it.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::credentials::CredentialNames;
use crate::model::{BuildRequest, BuildState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the database {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply the database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("the database refused to {what}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the row of build {id} holds an invalid {column}")]
    Corrupt { id: String, column: &'static str },
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// A bindable column value. NULLs carry their type, which PostgreSQL needs.
#[derive(Debug, Clone)]
pub enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}
impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(Some(v.to_string()))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(Some(v))
    }
}
impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        Value::Text(v)
    }
}

/// Columns to set along with a state change.
#[derive(Debug, Default, Clone)]
pub struct Update {
    columns: Vec<(&'static str, Value)>,
}

impl Update {
    pub fn set(mut self, column: &'static str, value: impl Into<Value>) -> Self {
        self.columns.push((column, value.into()));
        self
    }
}

/// One row of `builds`.
#[derive(Debug, Clone)]
pub struct BuildRow {
    pub id: String,
    pub state: BuildState,
    pub phase: Option<String>,
    /// The request without its credential values.
    pub request: BuildRequest,
    /// The names of its credentials.
    pub credentials: CredentialNames,
    /// The only node that may claim it (the one holding its credentials).
    pub pinned_node: Option<String>,
    pub requester: String,
    pub repo_url: String,
    pub revision: String,
    pub commit_sha: Option<String>,
    pub notify_url: Option<String>,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub timeout_s: u64,
    pub node_id: Option<String>,
    pub cpus: Option<String>,
    pub cancel_requested: bool,
    pub error_class: Option<String>,
    pub error_phase: Option<String>,
    pub error_message: Option<String>,
    pub rootfs_location: Option<String>,
    pub rootfs_size_bytes: Option<i64>,
    pub rootfs_sha256: Option<String>,
    pub image_digest: Option<String>,
    pub report: Option<String>,
    pub vmm_exit_code: Option<i64>,
    pub log_tail: Option<String>,
    pub webhook_state: String,
    pub webhook_attempts: i64,
    pub webhook_error: Option<String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub vm_started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub updated_at_ms: i64,
    /// The name of the build cache's key it ran with (the namespace is the requester's).
    pub cache_key: Option<String>,
    pub cache_id: Option<String>,
    /// `hit`, `miss`, `off` or `error` ([`crate::cache::CacheOutcome`]).
    pub cache: Option<String>,
}

/// One row of `build_events`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EventRow {
    pub seq: i64,
    pub at_ms: i64,
    pub from_state: Option<String>,
    pub to_state: String,
    pub node_id: Option<String>,
    pub detail: Option<String>,
}

/// A new build, as inserted by `POST /v1/builds`.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub id: String,
    /// Without credential values ([`BuildRequest::take_credentials`]).
    pub request: BuildRequest,
    pub credentials: CredentialNames,
    /// Set when the build has credentials: the node holding them.
    pub pinned_node: Option<String>,
    pub requester: String,
    pub revision: String,
    pub timeout_s: u64,
    pub created_at_ms: i64,
}

fn build_from_row(row: &AnyRow) -> Result<BuildRow, DbError> {
    let get = |e| DbError::Query {
        what: "return a build row",
        source: e,
    };
    let id: String = row.try_get("id").map_err(get)?;
    let corrupt = |column| DbError::Corrupt {
        id: id.clone(),
        column,
    };
    let state: String = row.try_get("state").map_err(get)?;
    let request: String = row.try_get("request").map_err(get)?;
    let int = |c: &str| row.try_get::<i64, _>(c).map_err(get);
    let opt_int = |c: &str| row.try_get::<Option<i64>, _>(c).map_err(get);
    let text = |c: &str| row.try_get::<String, _>(c).map_err(get);
    let opt_text = |c: &str| row.try_get::<Option<String>, _>(c).map_err(get);
    let credentials = match opt_text("credentials")? {
        Some(json) => serde_json::from_str(&json).map_err(|_| corrupt("credentials"))?,
        None => CredentialNames::default(),
    };
    Ok(BuildRow {
        state: BuildState::parse(&state).ok_or_else(|| corrupt("state"))?,
        request: serde_json::from_str(&request).map_err(|_| corrupt("request"))?,
        credentials,
        pinned_node: opt_text("pinned_node")?,
        phase: opt_text("phase")?,
        requester: text("requester")?,
        repo_url: text("repo_url")?,
        revision: text("revision")?,
        commit_sha: opt_text("commit_sha")?,
        notify_url: opt_text("notify_url")?,
        vcpus: u32::try_from(int("vcpus")?).map_err(|_| corrupt("vcpus"))?,
        mem_mib: u64::try_from(int("mem_mib")?).map_err(|_| corrupt("mem_mib"))?,
        timeout_s: u64::try_from(int("timeout_s")?).map_err(|_| corrupt("timeout_s"))?,
        node_id: opt_text("node_id")?,
        cpus: opt_text("cpus")?,
        cancel_requested: int("cancel_requested")? != 0,
        error_class: opt_text("error_class")?,
        error_phase: opt_text("error_phase")?,
        error_message: opt_text("error_message")?,
        rootfs_location: opt_text("rootfs_location")?,
        rootfs_size_bytes: opt_int("rootfs_size_bytes")?,
        rootfs_sha256: opt_text("rootfs_sha256")?,
        image_digest: opt_text("image_digest")?,
        report: opt_text("report")?,
        vmm_exit_code: opt_int("vmm_exit_code")?,
        log_tail: opt_text("log_tail")?,
        webhook_state: text("webhook_state")?,
        webhook_attempts: int("webhook_attempts")?,
        webhook_error: opt_text("webhook_error")?,
        created_at_ms: int("created_at_ms")?,
        started_at_ms: opt_int("started_at_ms")?,
        vm_started_at_ms: opt_int("vm_started_at_ms")?,
        finished_at_ms: opt_int("finished_at_ms")?,
        updated_at_ms: int("updated_at_ms")?,
        cache_key: opt_text("cache_key")?,
        cache_id: opt_text("cache_id")?,
        cache: opt_text("cache")?,
        id,
    })
}

type Query<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

fn bind(query: Query<'_>, value: Value) -> Query<'_> {
    match value {
        Value::Int(v) => query.bind(v),
        Value::Text(v) => query.bind(v),
    }
}

/// The result of a state change: the row after it and the state before it.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: BuildState,
    pub row: BuildRow,
}

/// Which builds a list shows; every part left out matches everything.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub state: Option<BuildState>,
    /// Exactly this requester.
    pub requester: Option<String>,
    /// Text the repository URL contains, compared without regard to case.
    pub repo_contains: Option<String>,
}

impl BuildFilter {
    /// `repo_contains` as a `LIKE` pattern (`%`, `_` and `\` in it taken literally), or `''`.
    fn repo_like_pattern(&self) -> String {
        self.repo_contains.as_deref().map_or(String::new(), |text| {
            let mut pattern = String::from("%");
            for c in text.to_lowercase().chars() {
                if matches!(c, '%' | '_' | '\\') {
                    pattern.push('\\');
                }
                pattern.push(c);
            }
            pattern.push('%');
            pattern
        })
    }
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
}

impl Db {
    /// Connects (creating a SQLite file if needed) and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            Dialect::Sqlite
        };
        let url = &sqlite_url_creating(url);
        if dialect == Dialect::Sqlite {
            if let Some(parent) = url
                .strip_prefix("sqlite://")
                .map(|p| std::path::Path::new(p.split('?').next().unwrap_or(p)))
                .and_then(|p| p.parent())
            {
                // A missing directory is reported by the connect below.
                let _ = std::fs::create_dir_all(parent);
            }
        }
        let max = match dialect {
            Dialect::Sqlite => 1,
            Dialect::Postgres => 8,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // A commit then syncs the write-ahead log once instead of a rollback
                        // journal and the database file (about 1.3 ms against 4 on the
                        // benchmark host, twice per admission); `synchronous` stays FULL, so a
                        // committed build survives a power loss as before.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|source| DbError::Connect {
                url: redact_url(url),
                source,
            })?;
        MIGRATOR.run(&pool).await.map_err(DbError::Migrate)?;
        Ok(Db { pool, dialect })
    }

    fn lock(&self, skip_locked: bool) -> &'static str {
        match (self.dialect, skip_locked) {
            (Dialect::Sqlite, _) => "",
            (Dialect::Postgres, false) => " FOR UPDATE",
            (Dialect::Postgres, true) => " FOR UPDATE SKIP LOCKED",
        }
    }

    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1")
            .fetch_one(&self.pool)
            .await
            .map_err(q("answer a ping"))?;
        Ok(())
    }

    pub async fn insert(&self, b: &NewBuild) -> Result<BuildRow, DbError> {
        let mut tx = self.pool.begin().await.map_err(q("begin a transaction"))?;
        let request = serde_json::to_string(&b.request).expect("a request serializes");
        let credentials = (!b.credentials.is_empty())
            .then(|| serde_json::to_string(&b.credentials).expect("credential names serialize"));
        sqlx::query(
            "INSERT INTO builds (id, state, request, requester, repo_url, revision, notify_url, \
             vcpus, mem_mib, timeout_s, webhook_state, created_at_ms, updated_at_ms, \
             credentials, pinned_node) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14)",
        )
        .bind(&b.id)
        .bind(BuildState::Queued.as_str())
        .bind(request)
        .bind(&b.requester)
        .bind(&b.request.repo_url)
        .bind(&b.revision)
        .bind(b.request.notify_url.clone())
        .bind(i64::from(b.request.resources().0))
        .bind(b.request.resources().1 as i64)
        .bind(b.timeout_s as i64)
        .bind(if b.request.notify_url.is_some() {
            "waiting"
        } else {
            "none"
        })
        .bind(b.created_at_ms)
        .bind(credentials)
        .bind(b.pinned_node.clone())
        .execute(&mut *tx)
        .await
        .map_err(q("insert a build"))?;
        insert_event(
            &mut tx,
            &b.id,
            b.created_at_ms,
            None,
            BuildState::Queued,
            None,
            "submitted",
        )
        .await?;
        tx.commit().await.map_err(q("commit a new build"))?;
        tracing::info!(
            target: "audit",
            build_id = b.id,
            to = BuildState::Queued.as_str(),
            requester = b.requester.as_str(),
            repo_url = b.request.repo_url.as_str(),
            revision = b.revision.as_str(),
            dockerfile = b
                .request
                .dockerfile
                .as_deref()
                .unwrap_or(builder_contract::params::DEFAULT_DOCKERFILE),
            target = b.request.target.as_deref(),
            secret_ids = b.credentials.secret_ids.join(","),
            registry_hosts = b.credentials.registry_hosts.join(","),
            git_token = b.credentials.git_token,
            pinned_node = b.pinned_node.as_deref(),
            s3_bucket = b.request.s3_bucket.as_deref(),
            s3_key = b.request.s3_key.as_deref(),
            "submitted"
        );
        self.get(&b.id).await?.ok_or_else(|| DbError::Corrupt {
            id: b.id.clone(),
            column: "id",
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<BuildRow>, DbError> {
        sqlx::query("SELECT * FROM builds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read a build"))?
            .as_ref()
            .map(build_from_row)
            .transpose()
    }

    /// The builds that pass `filter`, newest first; `cursor` is the last id of the previous
    /// page.
    pub async fn list(
        &self,
        filter: &BuildFilter,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Vec<BuildRow>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM builds WHERE ($1 = '' OR state = $1) AND ($2 = '' OR id < $2) \
             AND ($3 = '' OR requester = $3) \
             AND ($4 = '' OR lower(repo_url) LIKE $4 ESCAPE '\\') \
             ORDER BY id DESC LIMIT $5",
        )
        .bind(filter.state.map_or("", BuildState::as_str))
        .bind(cursor.unwrap_or(""))
        .bind(filter.requester.as_deref().unwrap_or(""))
        .bind(filter.repo_like_pattern())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("list builds"))?;
        rows.iter().map(build_from_row).collect()
    }

    pub async fn events(&self, id: &str) -> Result<Vec<EventRow>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, from_state, to_state, node_id, detail FROM build_events \
             WHERE build_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("read build events"))?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    seq: r.try_get("seq")?,
                    at_ms: r.try_get("at_ms")?,
                    from_state: r.try_get("from_state")?,
                    to_state: r.try_get("to_state")?,
                    node_id: r.try_get("node_id")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(q("read build events"))
    }

    /// Number of builds in each state.
    pub async fn count_by_state(&self) -> Result<Vec<(BuildState, i64)>, DbError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM builds GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(q("count builds"))?;
        let mut counts = Vec::new();
        for r in &rows {
            let state: String = r.try_get("state").map_err(q("count builds"))?;
            let n: i64 = r.try_get("n").map_err(q("count builds"))?;
            if let Some(s) = BuildState::parse(&state) {
                counts.push((s, n));
            }
        }
        Ok(counts)
    }

    /// Moves a build from one of `from` to `to`, setting `update`'s columns and recording the
    /// event. `None` when the build is not in one of `from` (someone else moved it first).
    pub async fn transition(
        &self,
        id: &str,
        from: &[BuildState],
        to: BuildState,
        node_id: &str,
        detail: &str,
        update: Update,
    ) -> Result<Option<Transition>, DbError> {
        let mut tx = self.pool.begin().await.map_err(q("begin a transaction"))?;
        let t = self
            .transition_in(&mut tx, id, from, to, node_id, detail, update)
            .await?;
        tx.commit().await.map_err(q("commit a state change"))?;
        Ok(t)
    }

    #[allow(clippy::too_many_arguments)]
    async fn transition_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: &str,
        from: &[BuildState],
        to: BuildState,
        node_id: &str,
        detail: &str,
        update: Update,
    ) -> Result<Option<Transition>, DbError> {
        let sql = format!("SELECT state FROM builds WHERE id = $1{}", self.lock(false));
        let Some(row) = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(q("lock a build"))?
        else {
            return Ok(None);
        };
        let current: String = row.try_get("state").map_err(q("lock a build"))?;
        let current = BuildState::parse(&current).ok_or_else(|| DbError::Corrupt {
            id: id.to_string(),
            column: "state",
        })?;
        if !from.contains(&current) {
            return Ok(None);
        }
        let now = crate::now_ms();
        let mut sets = vec!["state = $1".to_string(), "updated_at_ms = $2".to_string()];
        for (i, (column, _)) in update.columns.iter().enumerate() {
            sets.push(format!("{column} = ${}", i + 3));
        }
        let sql = format!(
            "UPDATE builds SET {} WHERE id = ${}",
            sets.join(", "),
            update.columns.len() + 3
        );
        let mut query = sqlx::query(&sql).bind(to.as_str()).bind(now);
        for (_, value) in update.columns {
            query = bind(query, value);
        }
        query
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(q("change a build's state"))?;
        insert_event(tx, id, now, Some(current), to, Some(node_id), detail).await?;
        let row = sqlx::query("SELECT * FROM builds WHERE id = $1")
            .bind(id)
            .fetch_one(&mut **tx)
            .await
            .map_err(q("read a build"))?;
        let row = build_from_row(&row)?;
        tracing::info!(
            target: "audit",
            build_id = id,
            from = current.as_str(),
            to = to.as_str(),
            node_id,
            requester = row.requester.as_str(),
            repo_url = row.repo_url.as_str(),
            revision = row.revision.as_str(),
            commit_sha = row.commit_sha.as_deref(),
            detail,
            "build state changed"
        );
        Ok(Some(Transition { from: current, row }))
    }

    /// Takes the oldest queued build that fits `free_vcpus` and `free_mem_mib` for `node_id`,
    /// moving it to `starting`. Builds pinned to another node (their credentials are there) are
    /// left to it. On PostgreSQL rows another node is claiming are skipped.
    pub async fn claim(
        &self,
        node_id: &str,
        free_vcpus: u32,
        free_mem_mib: u64,
    ) -> Result<Option<BuildRow>, DbError> {
        let mut tx = self.pool.begin().await.map_err(q("begin a transaction"))?;
        let sql = format!(
            "SELECT id FROM builds WHERE state = $1 AND vcpus <= $2 AND mem_mib <= $3 \
             AND (pinned_node IS NULL OR pinned_node = $4) ORDER BY id LIMIT 1{}",
            self.lock(true)
        );
        let Some(row) = sqlx::query(&sql)
            .bind(BuildState::Queued.as_str())
            .bind(i64::from(free_vcpus))
            .bind(free_mem_mib as i64)
            .bind(node_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("find a queued build"))?
        else {
            return Ok(None);
        };
        let id: String = row.try_get("id").map_err(q("find a queued build"))?;
        let t = self
            .transition_in(
                &mut tx,
                &id,
                &[BuildState::Queued],
                BuildState::Starting,
                node_id,
                "admitted",
                Update::default()
                    .set("node_id", node_id)
                    .set("started_at_ms", crate::now_ms()),
            )
            .await?;
        tx.commit().await.map_err(q("commit a claim"))?;
        Ok(t.map(|t| t.row))
    }

    /// Sets columns without a state change.
    pub async fn update(&self, id: &str, update: Update) -> Result<(), DbError> {
        let mut sets = vec!["updated_at_ms = $1".to_string()];
        for (i, (column, _)) in update.columns.iter().enumerate() {
            sets.push(format!("{column} = ${}", i + 2));
        }
        let sql = format!(
            "UPDATE builds SET {} WHERE id = ${}",
            sets.join(", "),
            update.columns.len() + 2
        );
        let mut query = sqlx::query(&sql).bind(crate::now_ms());
        for (_, value) in update.columns {
            query = bind(query, value);
        }
        query
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("update a build"))?;
        Ok(())
    }

    /// Records an event of a build without changing its state (`from` and `to` are both its
    /// current one), with `update`. Nothing when the build is gone.
    pub async fn note(
        &self,
        id: &str,
        node_id: &str,
        detail: &str,
        update: Update,
    ) -> Result<(), DbError> {
        let Some(row) = self.get(id).await? else {
            return Ok(());
        };
        self.transition(id, &[row.state], row.state, node_id, detail, update)
            .await?;
        Ok(())
    }

    /// The newest succeeded build of `requester` with cache `cache_id` whose rootfs is at
    /// `location` (`s3://bucket/key`) and that has an image digest and the rootfs's SHA-256
    /// and size: the rootfs a new build of the same image there may reuse.
    pub async fn last_upload(
        &self,
        requester: &str,
        cache_id: &str,
        location: &str,
    ) -> Result<Option<BuildRow>, DbError> {
        sqlx::query(
            "SELECT * FROM builds WHERE cache_id = $1 AND state = $2 AND requester = $3 \
             AND rootfs_location = $4 AND image_digest IS NOT NULL \
             AND rootfs_sha256 IS NOT NULL AND rootfs_size_bytes IS NOT NULL \
             ORDER BY finished_at_ms DESC LIMIT 1",
        )
        .bind(cache_id)
        .bind(BuildState::Succeeded.as_str())
        .bind(requester)
        .bind(location)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("find the last upload to a location"))?
        .as_ref()
        .map(build_from_row)
        .transpose()
    }

    /// Asks the node running a build to cancel it. False when the build is not active.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE builds SET cancel_requested = 1, updated_at_ms = $1 \
             WHERE id = $2 AND state IN ($3, $4, $5)",
        )
        .bind(crate::now_ms())
        .bind(id)
        .bind(BuildState::ACTIVE[0].as_str())
        .bind(BuildState::ACTIVE[1].as_str())
        .bind(BuildState::ACTIVE[2].as_str())
        .execute(&self.pool)
        .await
        .map_err(q("request a cancel"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Ids of this node's builds in `states`.
    pub async fn node_builds(
        &self,
        node_id: &str,
        states: &[BuildState],
    ) -> Result<Vec<BuildRow>, DbError> {
        let placeholders: Vec<String> = (0..states.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT * FROM builds WHERE node_id = $1 AND state IN ({}) ORDER BY id",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(node_id);
        for s in states {
            query = query.bind(s.as_str());
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(q("list a node's builds"))?;
        rows.iter().map(build_from_row).collect()
    }

    /// This node's finished builds whose requester webhook is still to be delivered.
    pub async fn pending_webhooks(&self, node_id: &str) -> Result<Vec<BuildRow>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM builds WHERE node_id = $1 AND webhook_state = 'pending' ORDER BY id",
        )
        .bind(node_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list pending webhooks"))?;
        rows.iter().map(build_from_row).collect()
    }

    /// Deletes up to `limit` builds that ended before `before_ms` (and whose requester webhook
    /// is no longer being delivered) with their events, in one transaction. Returns their ids
    /// and how many events went.
    pub async fn prune_builds(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> Result<(Vec<String>, u64), DbError> {
        let terminal: Vec<BuildState> = BuildState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        let placeholders: Vec<String> =
            (0..terminal.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "SELECT id FROM builds WHERE COALESCE(finished_at_ms, updated_at_ms) < $1 \
             AND webhook_state <> 'pending' AND state IN ({}) ORDER BY id LIMIT $2{}",
            placeholders.join(", "),
            self.lock(true)
        );
        let mut tx = self.pool.begin().await.map_err(q("begin a transaction"))?;
        let mut query = sqlx::query(&sql).bind(before_ms).bind(i64::from(limit));
        for s in &terminal {
            query = query.bind(s.as_str());
        }
        let ids = query
            .fetch_all(&mut *tx)
            .await
            .map_err(q("find ended builds to prune"))?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(q("find ended builds to prune"))?;
        if ids.is_empty() {
            return Ok((ids, 0));
        }
        let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let list = list.join(", ");
        let events_sql = format!("DELETE FROM build_events WHERE build_id IN ({list})");
        let builds_sql = format!("DELETE FROM builds WHERE id IN ({list})");
        let with_ids = |sql| {
            ids.iter()
                .fold(sqlx::query(sql), |q, id| q.bind(id.clone()))
        };
        let events = with_ids(&events_sql)
            .execute(&mut *tx)
            .await
            .map_err(q("delete the events of pruned builds"))?
            .rows_affected();
        with_ids(&builds_sql)
            .execute(&mut *tx)
            .await
            .map_err(q("delete pruned builds"))?;
        tx.commit().await.map_err(q("commit pruned builds"))?;
        Ok((ids, events))
    }

    /// Deletes the report signatures recorded before `before_ms`; says how many went.
    pub async fn prune_signatures(&self, before_ms: i64) -> Result<u64, DbError> {
        let done = sqlx::query("DELETE FROM seen_signatures WHERE at_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await
            .map_err(q("prune report signatures"))?;
        Ok(done.rows_affected())
    }

    /// Records a report signature; false when it was seen before (a replay).
    pub async fn record_signature(&self, signature: &str, id: &str) -> Result<bool, DbError> {
        let done = sqlx::query(
            "INSERT INTO seen_signatures (signature, build_id, at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(signature)
        .bind(id)
        .bind(crate::now_ms())
        .execute(&self.pool)
        .await
        .map_err(q("record a report signature"))?;
        Ok(done.rows_affected() > 0)
    }
}

async fn insert_event(
    tx: &mut Transaction<'static, Any>,
    id: &str,
    at_ms: i64,
    from: Option<BuildState>,
    to: BuildState,
    node_id: Option<&str>,
    detail: &str,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO build_events (build_id, seq, at_ms, from_state, to_state, node_id, detail) \
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5, $6 FROM build_events \
         WHERE build_id = $1",
    )
    .bind(id)
    .bind(at_ms)
    .bind(from.map(|s| s.as_str().to_string()))
    .bind(to.as_str())
    .bind(node_id.map(str::to_string))
    .bind(detail)
    .execute(&mut **tx)
    .await
    .map_err(q("record a build event"))?;
    Ok(())
}

/// A SQLite URL that creates its file when missing: `mode=rwc` is added to one that names no
/// `mode` (sqlx opens an existing file only, `mode=rw`, by default), keeping its other query
/// parameters. Other URLs, in-memory databases and an explicit `mode` are left as they are.
pub fn sqlite_url_creating(url: &str) -> String {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return url.to_string();
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let path = path.trim_start_matches("//");
    let has_mode = query
        .is_some_and(|q| url::form_urlencoded::parse(q.as_bytes()).any(|(key, _)| key == "mode"));
    if path.is_empty() || path == ":memory:" || has_mode {
        return url.to_string();
    }
    match query {
        Some("") => format!("{url}mode=rwc"),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    }
}

/// The URL without its password, for error messages.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sqlite_url_without_a_mode_creates_its_file() {
        for (url, want) in [
            ("sqlite:///var/x.db", "sqlite:///var/x.db?mode=rwc"),
            ("sqlite://x.db", "sqlite://x.db?mode=rwc"),
            ("sqlite:x.db", "sqlite:x.db?mode=rwc"),
            ("sqlite:///x.db?", "sqlite:///x.db?mode=rwc"),
            (
                "sqlite:///x.db?cache=shared",
                "sqlite:///x.db?cache=shared&mode=rwc",
            ),
            ("sqlite:///x.db?mode=ro", "sqlite:///x.db?mode=ro"),
            (
                "sqlite:///x.db?cache=private&mode=rw",
                "sqlite:///x.db?cache=private&mode=rw",
            ),
            ("sqlite:///x.db?mode=rwc", "sqlite:///x.db?mode=rwc"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("sqlite://:memory:", "sqlite://:memory:"),
            ("sqlite://?mode=memory", "sqlite://?mode=memory"),
            ("postgres://u:p@h/db", "postgres://u:p@h/db"),
            (
                "postgresql://h/db?sslmode=disable",
                "postgresql://h/db?sslmode=disable",
            ),
        ] {
            assert_eq!(sqlite_url_creating(url), want, "{url}");
        }
    }

    #[tokio::test]
    async fn a_new_sqlite_file_is_created_through_a_url_without_a_mode() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/new.db");
        for url in [
            format!("sqlite://{}", file.display()),
            format!(
                "sqlite://{}?cache=private",
                dir.path().join("other.db").display()
            ),
        ] {
            let db = Db::open(&url).await.unwrap();
            db.ping().await.unwrap();
        }
        assert!(file.is_file());
        assert!(dir.path().join("other.db").is_file());
        // An explicit mode is kept: `rw` opens an existing file only.
        let missing = dir.path().join("missing.db");
        let err = Db::open(&format!("sqlite://{}?mode=rw", missing.display()))
            .await
            .err()
            .expect("mode=rw does not create a file");
        assert!(matches!(err, DbError::Connect { .. }), "{err}");
        assert!(!missing.exists());
    }

    #[tokio::test]
    async fn sqlite_commits_through_a_write_ahead_log() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let row = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(row.try_get::<String, _>(0).unwrap(), "wal");
        assert!(dir.path().join("node-agent.db-wal").exists());
    }

    #[tokio::test]
    async fn a_build_pinned_to_a_node_is_claimed_by_that_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let request: BuildRequest = serde_json::from_value(serde_json::json!(
            {"repo_url": "https://g.example/r", "ref": "main", "vcpus": 1, "mem_mib": 512}
        ))
        .unwrap();
        let credentials = CredentialNames {
            secret_ids: vec!["npm".into()],
            ..Default::default()
        };
        let new = |pinned_node: Option<&str>| NewBuild {
            id: crate::new_build_id(),
            request: request.clone(),
            credentials: credentials.clone(),
            pinned_node: pinned_node.map(str::to_string),
            requester: "t".into(),
            revision: "main".into(),
            timeout_s: 60,
            created_at_ms: crate::now_ms(),
        };
        let pinned = db.insert(&new(Some("node-a"))).await.unwrap();
        assert_eq!(pinned.credentials, credentials);
        assert_eq!(pinned.pinned_node.as_deref(), Some("node-a"));
        assert!(db.claim("node-b", 4, 4096).await.unwrap().is_none());
        let claimed = db.claim("node-a", 4, 4096).await.unwrap().unwrap();
        assert_eq!(claimed.id, pinned.id);
        assert_eq!(claimed.node_id.as_deref(), Some("node-a"));
        let free = db.insert(&new(None)).await.unwrap();
        assert_eq!(
            db.claim("node-b", 4, 4096).await.unwrap().unwrap().id,
            free.id
        );
    }
}
