//! The HTTP API (`/v1`, JSON, bearer-token auth), the guest's report, progress and log
//! endpoints (HMAC-signed with the build's own key, replays refused; progress is the only source
//! of a running build's phase), source uploads and the read-only git repositories they become
//! ([`crate::sources`]), each build's logs by source, health,
//! readiness and metrics. [`router`] is the operator's listener (everything); [`vm_router`]
//! the VM-facing one (the guest's posts, uploaded sources and pulls through the registry
//! mirror only). Every failure is an
//! [`ApiError`], and [`ApiError::status`] is the one place that maps errors to status codes.
//! A submitted build's credential values go to its file ([`crate::credentials`]); answers show
//! only their names.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use builder_contract::logs::{log_path, report_path, MAX_GUEST_LOG_BYTES};
use builder_contract::progress::progress_path;
use builder_contract::signature::{self, SignatureError, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::upload::{
    upload_path, PartRequest, SignedRequest, UploadComplete, UploadStart, UploadStarted,
    UploadStep, UploadVerified,
};
use builder_contract::{BuildInputs, BuildReport, LogSource, Phase, ProgressEvent};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::credentials::{scrub, CredentialError, CredentialNames};
use crate::db::{BuildFilter, BuildRow, DbError, EventRow, NewBuild};
use crate::metrics::Snapshot;
use crate::model::{BuildRequest, BuildState, RequestError};
use crate::node::{Node, Signal};
use crate::sources::{SourceError, Sources, Uploaded};
use crate::tokens::{Caller, ScopeError};
use crate::uploads::UploadError;
use crate::vm::Check;

const MAX_LIST_LIMIT: u32 = 500;
const LOG_POLL: Duration = Duration::from_millis(250);
/// The disk space the work dir needs for a VM's scratch disk and logs.
const MIN_FREE_DISK_BYTES: u64 = 1 << 30;
/// The largest upload completion: an ETag and number for each of S3's 10 000 parts.
const MAX_UPLOAD_COMPLETE_BODY: u64 = builder_contract::upload::MAX_PARTS * 128 + 1024;
/// How long a progress post waits for the build's supervisor to apply it.
const PROGRESS_ANSWER: Duration = Duration::from_secs(5);
/// The largest guest log post: the most the guest sends, and room for scrubbing's growth.
const MAX_GUEST_LOG_BODY: u64 = MAX_GUEST_LOG_BYTES + (64 << 10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error("`notify_url` is refused")]
    NotifyTarget(#[from] crate::notify::RestrictedTarget),
    #[error("the token {token} is not an admin token, and only those may do this")]
    AdminOnly { token: String },
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the request body is not valid JSON for this endpoint: {0}")]
    BadJson(String),
    #[error("cannot read the request body")]
    Body(#[source] BytesRejection),
    #[error(transparent)]
    Invalid(#[from] RequestError),
    #[error("invalid query: {0}")]
    Query(String),
    #[error("no build has the id {id}")]
    NotFound { id: String },
    #[error("`source` {given:?} is not a log source here; valid ones are {valid}")]
    LogSource { given: String, valid: String },
    #[error(
        "build {id} has no {source_name} log on this node (not written or sent, pruned, or the \
         build ran on another node)"
    )]
    NoLog { id: String, source_name: LogSource },
    #[error("cannot read or keep the {source_name} log of build {id}")]
    KeepLog {
        id: String,
        source_name: LogSource,
        #[source]
        source: std::io::Error,
    },
    #[error("build {id} is already {state}")]
    Finished { id: String, state: BuildState },
    #[error("the report for build {id} is refused: {reason}")]
    BadReport { id: String, reason: String },
    #[error("the report signature for build {id} is not valid")]
    Signature {
        id: String,
        #[source]
        source: SignatureError,
    },
    #[error("this report for build {id} was already received (replay)")]
    Replay { id: String },
    #[error("the progress event for build {id} is about build {about}")]
    ProgressOtherBuild { id: String, about: String },
    #[error(
        "the progress event for build {id} is ignored: phase {phase} does not follow {}",
        last.map_or("the start", Phase::as_str)
    )]
    ProgressNotForward {
        id: String,
        phase: Phase,
        last: Option<Phase>,
    },
    #[error("the node agent is draining and admits no new builds")]
    Draining,
    #[error("no source has this URL (it ended with its builds, or never existed)")]
    NoSource,
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the database failed")]
    Db(#[from] DbError),
    #[error("the build's credentials cannot be kept")]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("this node has no build cache (`cache = false`)")]
    CacheOff,
    #[error("no build cache has the id {id}")]
    NoCache { id: String },
    #[error("the build cache failed")]
    Cache(#[from] builder_cache::CacheError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized | ApiError::Signature { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Scope(_) | ApiError::NotifyTarget(_) | ApiError::AdminOnly { .. } => {
                StatusCode::FORBIDDEN
            }
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadJson(_)
            | ApiError::Body(_)
            | ApiError::Invalid(_)
            | ApiError::Query(_)
            | ApiError::LogSource { .. }
            | ApiError::BadReport { .. }
            | ApiError::ProgressOtherBuild { .. } => StatusCode::BAD_REQUEST,
            ApiError::Source(SourceError::BadBundle { .. }) => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. }
            | ApiError::NoSource
            | ApiError::NoLog { .. }
            | ApiError::CacheOff
            | ApiError::NoCache { .. } => StatusCode::NOT_FOUND,
            ApiError::Cache(builder_cache::CacheError::CacheIdSyntax { .. }) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Finished { .. }
            | ApiError::Replay { .. }
            | ApiError::ProgressNotForward { .. } => StatusCode::CONFLICT,
            ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Db(_)
            | ApiError::Source(_)
            | ApiError::Credentials(_)
            | ApiError::KeepLog { .. }
            | ApiError::Cache(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Upload(e) => match e {
                UploadError::Invalid { .. } => StatusCode::BAD_REQUEST,
                _ if e.is_refusal() => StatusCode::CONFLICT,
                UploadError::Store { .. } => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            ApiError::Invalid(e) => e.field(),
            ApiError::Scope(e) => Some(e.field),
            ApiError::NotifyTarget(_) => Some("notify_url"),
            ApiError::LogSource { .. } => Some("source"),
            ApiError::Upload(e) => e.field(),
            _ => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = crate::error_chain(&self), "request failed");
        }
        let body = ErrorBody {
            error: crate::error_chain(&self),
            field: self.field().map(str::to_string),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("a header value"),
            );
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The routes builder VMs use: the signed report and logs, uploaded sources. Each VM gets them
/// on a listener of its own ([`vm_router`]); the operator's listener serves them too, for a
/// node whose `callback_url` points there.
fn vm_routes() -> Router<Arc<Node>> {
    Router::new()
        .route(&report_path("{id}"), post(complete))
        .route(&progress_path("{id}"), post(progress))
        .route(
            &log_path("{id}", "{source}"),
            post(guest_log).layer(DefaultBodyLimit::max(MAX_GUEST_LOG_BODY as usize)),
        )
        .route("/v1/sources/{token}/repo.git/{*path}", get(source_file))
        .route(&upload_path("{id}", UploadStep::Start), post(upload_start))
        .route(&upload_path("{id}", UploadStep::Part), post(upload_part))
        .route(
            &upload_path("{id}", UploadStep::Complete),
            post(upload_complete).layer(DefaultBodyLimit::max(MAX_UPLOAD_COMPLETE_BODY as usize)),
        )
}

/// The VM-facing listener's routes: [`vm_routes`] and the registry mirror's `/v2` (pulls
/// only, by `Host`, [`crate::mirror::Mirror::answer`]), and nothing else (no operator API, no
/// metrics, no health). The mirror is not on the operator's listener: it pulls with the node's
/// upstream logins and asks for no token.
pub fn vm_router(node: Arc<Node>, sources: Arc<Sources>) -> Router {
    let limit = node.config.max_body_bytes as usize;
    vm_routes()
        .route("/v2/", any(registry_mirror))
        .route("/v2/{*path}", any(registry_mirror))
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(sources))
        .with_state(node)
}

/// The operator's listener: the API, the VM routes, health, readiness and metrics.
pub fn router(node: Arc<Node>, sources: Arc<Sources>) -> Router {
    let limit = node.config.max_body_bytes as usize;
    let source_limit = node.config.max_source_bytes as usize;
    let authed = Router::new()
        .route(
            "/v1/sources",
            post(upload_source).layer(DefaultBodyLimit::max(source_limit)),
        )
        .route("/v1/builds", post(submit).get(list))
        .route("/v1/builds/{id}", get(show))
        .route("/v1/builds/{id}/logs", get(logs))
        .route("/v1/builds/{id}/cancel", post(cancel))
        .route("/v1/caches", get(list_caches))
        .route("/v1/caches/{id}", get(show_cache).delete(delete_cache))
        .route_layer(middleware::from_fn_with_state(node.clone(), auth));
    Router::new()
        .merge(authed)
        .merge(crate::dashboard::router(node.clone()))
        .merge(vm_routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(sources))
        .with_state(node)
}

/// A builder VM's pull through the node's registry mirror.
async fn registry_mirror(State(node): State<Arc<Node>>, request: Request) -> Response {
    node.mirror.answer(request).await
}

/// Lets a request with a known bearer token through, its [`Caller`] in the request's
/// extensions for the handlers to authorize with.
async fn auth(State(node): State<Arc<Node>>, mut request: Request, next: Next) -> Response {
    let Some(caller) = bearer_caller(&node, request.headers()) else {
        return ApiError::Unauthorized.into_response();
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The caller whose token the request's `Authorization: Bearer` header carries.
pub(crate) fn bearer_caller(node: &Node, headers: &HeaderMap) -> Option<Caller> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    token_caller(node, given)
}

/// The caller `given` is the token of: the admin's `api_token_file` token or one of the tokens
/// file, compared by their SHA-256 in constant time ([`crate::tokens::Tokens::authenticate`]).
pub(crate) fn token_caller(node: &Node, given: &str) -> Option<Caller> {
    node.tokens.authenticate(given)
}

fn body_bytes(node: &Node, body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body_within(body, node.config.max_body_bytes)
}

/// A request's body, or why it could not be read: over the route's `limit` (413 naming it) or
/// broken.
fn body_within(body: Result<Bytes, BytesRejection>, limit: u64) -> ApiResult<Bytes> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::Body(rejection)
        }
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// A build request; serde's message about a value of the wrong shape quotes the value, so any
/// value under a credential field is replaced by `***` in it.
fn parse_build_request(bytes: &[u8]) -> ApiResult<BuildRequest> {
    serde_json::from_slice(bytes).map_err(|e| {
        let mut values = Vec::new();
        if let Ok(body) = serde_json::from_slice::<serde_json::Value>(bytes) {
            for field in ["secrets", "git_token", "registry_auths"] {
                if let Some(value) = body.get(field) {
                    scalars(value, &mut values);
                }
            }
        }
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        ApiError::BadJson(scrub(&e.to_string(), &values))
    })
}

/// Every string and number in `value`, as it is and as serde quotes it (escaped).
fn scalars(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => {
            out.push(s.clone());
            out.push(format!("{s:?}"));
        }
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| scalars(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| scalars(v, out)),
        serde_json::Value::Bool(_) | serde_json::Value::Null => {}
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Submitted {
    pub id: String,
    pub state: BuildState,
}

async fn submit(
    State(node): State<Arc<Node>>,
    Extension(sources): Extension<Arc<Sources>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    let bytes = body_bytes(&node, body)?;
    if node.is_draining() {
        return Err(ApiError::Draining);
    }
    let mut request = parse_build_request(&bytes)?;
    let id = crate::new_build_id();
    let params = request.to_params(&id, &node.config.vm_base_url(), node.limits())?;
    request.check_output(node.uploads())?;
    // Valid, then within the token's scope (403 naming the field), then to an address the
    // node may call.
    let requester = caller.requester_of(&request)?;
    caller.check_scope(&request)?;
    // (`to_params` has refused a notify_url that is not a URL.)
    if let Some(Ok(url)) = request.notify_url.as_deref().map(url::Url::parse) {
        node.config.notify_allow.check_url(&url)?;
    }
    request.requester = Some(requester.clone());
    // What is stored and shown is what the build gets: left-out resources become this node's.
    request.resolve_resources(node.limits());
    let credentials = request.take_credentials();
    // Written before the row exists, so no scheduler can claim the build without it; only this
    // node has the file, so only this node may claim the build.
    let pinned_node = if credentials.is_empty() {
        None
    } else {
        node.credentials.write(&id, &credentials)?;
        Some(node.config.node_id.clone())
    };
    let new = NewBuild {
        id: id.clone(),
        credentials: credentials.names(),
        pinned_node,
        requester,
        revision: params.revision.to_string(),
        timeout_s: request.timeout_s.unwrap_or(node.config.default_timeout_s),
        created_at_ms: crate::now_ms(),
        request,
    };
    let row = match node.db.insert(&new).await {
        Ok(row) => row,
        Err(e) => {
            if let Err(e) = node.credentials.remove(&id) {
                tracing::error!(
                    build_id = id,
                    error = crate::error_chain(&e),
                    "cannot remove the credentials file of a build that was not stored; the \
                     sweep retries"
                );
            }
            return Err(e.into());
        }
    };
    // After the insert: the sweeper keeps a source while a build it names is not terminal.
    if let Err(e) = sources.register(&new.request.repo_url, &id) {
        tracing::warn!(
            build_id = id,
            error = crate::error_chain(&e),
            "the build's uploaded source is not kept for it: it goes 15 minutes after its upload"
        );
    }
    node.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(Submitted {
            id,
            state: row.state,
        }),
    ))
}

/// `POST /v1/sources`: a git bundle with the branch `main` becomes a repository builds can
/// clone; the answer names its URL and commit.
async fn upload_source(
    State(node): State<Arc<Node>>,
    Extension(sources): Extension<Arc<Sources>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Uploaded>)> {
    let bytes = body_within(body, node.config.max_source_bytes)?;
    if node.is_draining() {
        return Err(ApiError::Draining);
    }
    let uploaded = tokio::task::spawn_blocking(move || sources.add(&bytes))
        .await
        .expect("the source upload task does not panic")?;
    Ok((StatusCode::CREATED, Json(uploaded)))
}

/// `GET /v1/sources/{token}/repo.git/{path}`: git's dumb HTTP protocol, read-only, no bearer
/// token (the VM has none; the random token in the URL is the credential).
async fn source_file(
    Extension(sources): Extension<Arc<Sources>>,
    Path((token, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let path_on_disk = sources.file(&token, &path).ok_or(ApiError::NoSource)?;
    // Streamed from disk (a pack can be as large as `max_source_bytes`), never read whole.
    let file = tokio::fs::File::open(&path_on_disk)
        .await
        .map_err(|_| ApiError::NoSource)?;
    let len = file.metadata().await.map_err(|_| ApiError::NoSource)?.len();
    let content_type = if path.starts_with("objects/") && path != "objects/info/packs" {
        "application/x-git-loose-object"
    } else {
        "text/plain; charset=utf-8"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response())
}

/// A build as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct BuildView {
    pub id: String,
    pub state: BuildState,
    pub phase: Option<String>,
    pub requester: String,
    pub repo_url: String,
    pub revision: String,
    pub commit_sha: Option<String>,
    pub dockerfile: Option<String>,
    /// What was built: the guest's account once it reported, else the request's.
    #[serde(default)]
    pub inputs: BuildInputs,
    /// The names of the build's credentials (never their values).
    #[serde(default)]
    pub credentials: CredentialNames,
    /// The node that holds the build's credentials and alone may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_node: Option<String>,
    pub node_id: Option<String>,
    pub cpus: Option<String>,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub timeout_s: u64,
    pub timings: Timings,
    pub error: Option<ErrorView>,
    pub rootfs: Option<RootfsView>,
    pub image_digest: Option<String>,
    pub vmm_exit_code: Option<i64>,
    pub webhook: WebhookView,
    /// Absent for builds that have not started (or ran before the build cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<BuildCacheView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventRow>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Timings {
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub vm_started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Submission to the VMM process started.
    pub admission_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub phases: Vec<builder_contract::PhaseTiming>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorView {
    pub class: Option<String>,
    pub phase: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RootfsView {
    pub location: String,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    /// The object of an earlier build of the same image, not converted or uploaded again.
    #[serde(default)]
    pub reused: bool,
}

/// The build cache a build ran with.
#[derive(Debug, Serialize, Deserialize)]
pub struct BuildCacheView {
    /// The key's name (its namespace is the requester's).
    pub key: Option<String>,
    /// The key's id (`GET /v1/caches/{id}`); none for `no_cache` and when there was no disk.
    pub id: Option<String>,
    /// `hit`, `miss`, `off` or `error`.
    pub outcome: String,
}

/// One cache key's committed disk (`GET /v1/caches`).
#[derive(Debug, Serialize, Deserialize)]
pub struct CacheView {
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// Allocated bytes of the committed disk.
    pub bytes: u64,
    pub created_unix_ms: u64,
    pub last_used_unix_ms: u64,
    pub commits: u64,
}

impl From<builder_cache::CacheEntry> for CacheView {
    fn from(e: builder_cache::CacheEntry) -> Self {
        CacheView {
            id: e.id.to_string(),
            namespace: e.namespace,
            name: e.name,
            bytes: e.bytes,
            created_unix_ms: e.created_unix_ms,
            last_used_unix_ms: e.last_used_unix_ms,
            commits: e.commits,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CacheList {
    pub caches: Vec<CacheView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WebhookView {
    pub state: String,
    pub attempts: i64,
    pub error: Option<String>,
}

impl BuildView {
    pub fn new(row: BuildRow, events: Option<Vec<EventRow>>) -> Self {
        let report = row
            .report
            .as_deref()
            .and_then(|r| serde_json::from_str::<BuildReport>(r).ok());
        let inputs = report
            .as_ref()
            .and_then(|r| r.inputs.clone())
            .unwrap_or_else(|| row.request.inputs(&row.credentials));
        let reused = report
            .as_ref()
            .and_then(|r| r.rootfs.as_ref())
            .is_some_and(|r| r.reused);
        let phases = report.map(|r| r.phases).unwrap_or_default();
        BuildView {
            cache: row.cache.map(|outcome| BuildCacheView {
                key: row.cache_key,
                id: row.cache_id,
                outcome,
            }),
            timings: Timings {
                created_at_ms: row.created_at_ms,
                started_at_ms: row.started_at_ms,
                vm_started_at_ms: row.vm_started_at_ms,
                finished_at_ms: row.finished_at_ms,
                admission_ms: row.vm_started_at_ms.map(|t| t - row.created_at_ms),
                duration_ms: row
                    .finished_at_ms
                    .zip(row.started_at_ms)
                    .map(|(f, s)| f - s),
                phases,
            },
            error: row.error_message.map(|message| ErrorView {
                class: row.error_class,
                phase: row.error_phase,
                message: Some(message),
            }),
            rootfs: row.rootfs_location.map(|location| RootfsView {
                location,
                size_bytes: row.rootfs_size_bytes,
                sha256: row.rootfs_sha256,
                reused,
            }),
            webhook: WebhookView {
                state: row.webhook_state,
                attempts: row.webhook_attempts,
                error: row.webhook_error,
            },
            dockerfile: row.request.dockerfile.clone(),
            inputs,
            credentials: row.credentials,
            pinned_node: row.pinned_node,
            id: row.id,
            state: row.state,
            phase: row.phase,
            requester: row.requester,
            repo_url: row.repo_url,
            revision: row.revision,
            commit_sha: row.commit_sha,
            node_id: row.node_id,
            cpus: row.cpus,
            vcpus: row.vcpus,
            mem_mib: row.mem_mib,
            timeout_s: row.timeout_s,
            image_digest: row.image_digest,
            vmm_exit_code: row.vmm_exit_code,
            events,
        }
    }
}

async fn load(node: &Node, id: &str) -> ApiResult<BuildRow> {
    node.db
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound { id: id.to_string() })
}

/// Build `id` if `caller` may see it: an admin any, a requester its own; another requester's
/// build is not found, so its id tells nothing.
async fn load_for(node: &Node, caller: &Caller, id: &str) -> ApiResult<BuildRow> {
    let row = load(node, id).await?;
    if !caller.sees(&row.requester) {
        return Err(ApiError::NotFound { id: id.to_string() });
    }
    Ok(row)
}

async fn show(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    let row = load_for(&node, &caller, &id).await?;
    let events = node.db.events(&id).await?;
    Ok(Json(BuildView::new(row, Some(events))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    /// Only this requester's builds.
    requester: Option<String>,
    /// Only builds whose repository URL contains this text (case-insensitive).
    repo: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BuildList {
    pub builds: Vec<BuildView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

async fn list(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<BuildList>> {
    let Query(query) = query.map_err(|e| ApiError::Query(e.body_text()))?;
    let state = query
        .state
        .as_deref()
        .map(|s| {
            BuildState::parse(s)
                .ok_or_else(|| ApiError::Query(format!("`state` {s:?} is not a build state")))
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::Query(format!(
            "`limit` must be 1 to {MAX_LIST_LIMIT}"
        )));
    }
    let mut requester = query.requester.filter(|r| !r.is_empty());
    if !caller.admin {
        // A requester lists its own builds only; asking for another's finds none.
        if requester.as_ref().is_some_and(|r| *r != caller.name) {
            return Ok(Json(BuildList {
                builds: vec![],
                next_cursor: None,
            }));
        }
        requester = Some(caller.name.clone());
    }
    let filter = BuildFilter {
        state,
        requester,
        repo_contains: query.repo.filter(|r| !r.is_empty()),
    };
    let rows = node
        .db
        .list(&filter, limit, query.cursor.as_deref())
        .await?;
    let next_cursor = (rows.len() == limit as usize).then(|| rows[rows.len() - 1].id.clone());
    Ok(Json(BuildList {
        builds: rows.into_iter().map(|r| BuildView::new(r, None)).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheQuery {
    /// Only this namespace's caches (admins: any; others: their own).
    namespace: Option<String>,
}

/// The node's cache pool, or why there is none.
fn cache_pool(node: &Node) -> ApiResult<Arc<builder_cache::CachePool>> {
    node.cache_pool.clone().ok_or(ApiError::CacheOff)
}

/// Runs a blocking call on the cache pool off the runtime's threads.
async fn on_pool<T: Send + 'static>(
    pool: Arc<builder_cache::CachePool>,
    call: impl FnOnce(&builder_cache::CachePool) -> Result<T, builder_cache::CacheError>
        + Send
        + 'static,
) -> ApiResult<T> {
    Ok(tokio::task::spawn_blocking(move || call(&pool))
        .await
        .expect("a cache pool call does not panic")?)
}

/// The caches of the caller's namespace; an admin's of all, or of `?namespace=`.
async fn list_caches(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<CacheQuery>, QueryRejection>,
) -> ApiResult<Json<CacheList>> {
    let Query(query) = query.map_err(|e| ApiError::Query(e.body_text()))?;
    let namespace = match query.namespace.filter(|n| !n.is_empty()) {
        Some(n) if caller.admin || n == caller.cache_namespace => Some(n),
        Some(_) => {
            return Err(ApiError::AdminOnly {
                token: caller.name.clone(),
            })
        }
        None if caller.admin => None,
        None => Some(caller.cache_namespace.clone()),
    };
    let entries = on_pool(cache_pool(&node)?, builder_cache::CachePool::list).await?;
    Ok(Json(CacheList {
        caches: entries
            .into_iter()
            .filter(|e| namespace.as_ref().is_none_or(|n| *n == e.namespace))
            .map(CacheView::from)
            .collect(),
    }))
}

/// Cache `id` if `caller` may see it (an admin any, others their namespace's); another
/// namespace's cache is not found, so its id tells nothing.
async fn cache_for(node: &Node, caller: &Caller, id: &str) -> ApiResult<builder_cache::CacheEntry> {
    let cache_id: builder_cache::CacheId = id.parse()?;
    let entries = on_pool(cache_pool(node)?, builder_cache::CachePool::list).await?;
    entries
        .into_iter()
        .find(|e| e.id == cache_id && (caller.admin || e.namespace == caller.cache_namespace))
        .ok_or_else(|| ApiError::NoCache { id: id.to_string() })
}

async fn show_cache(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<CacheView>> {
    Ok(Json(cache_for(&node, &caller, &id).await?.into()))
}

/// Removes a cache's committed disk; builds running with a fork of it keep their fork.
async fn delete_cache(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<CacheView>> {
    let cache_id = cache_for(&node, &caller, &id).await?.id;
    let removed = on_pool(cache_pool(&node)?, move |pool| pool.remove(&cache_id)).await?;
    let entry = removed.ok_or_else(|| ApiError::NoCache { id: id.clone() })?;
    tracing::info!(
        target: "audit",
        cache_id = id,
        namespace = entry.namespace,
        by = caller.name,
        "build cache deleted"
    );
    Ok(Json(CacheView::from(entry)))
}

async fn cancel(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    load_for(&node, &caller, &id).await?;
    match node.cancel(&id).await? {
        None => Err(ApiError::NotFound { id }),
        Some(state) if state.is_terminal() && state != BuildState::Cancelled => {
            Err(ApiError::Finished { id, state })
        }
        Some(state) => Ok((StatusCode::ACCEPTED, Json(Submitted { id, state }))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    follow: Option<bool>,
    source: Option<String>,
}

/// A build's log `source` (default the console): the console followed live while the build
/// runs here, else what is kept.
async fn logs(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::Query(e.body_text()))?;
    let source = match query.source.as_deref() {
        None => LogSource::Console,
        Some(name) => LogSource::parse(name).ok_or_else(|| ApiError::LogSource {
            given: name.to_string(),
            valid: LogSource::names(),
        })?,
    };
    let row = load_for(&node, &caller, &id).await?;
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if source != LogSource::Console {
        return match tokio::fs::read(node.config.log_file(&id, source)).await {
            Ok(bytes) => Ok((text_plain, bytes).into_response()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ApiError::NoLog {
                id,
                source_name: source,
            }),
            Err(e) => Err(ApiError::KeepLog {
                id,
                source_name: source,
                source: e,
            }),
        };
    }
    let path = node.config.log_path(&id);
    let follow = query.follow.unwrap_or(true) && !row.state.is_terminal();
    if !follow && !path.exists() {
        return Ok((text_plain, row.log_tail.unwrap_or_default()).into_response());
    }
    struct Tail {
        node: Arc<Node>,
        id: String,
        path: std::path::PathBuf,
        offset: u64,
        follow: bool,
        last_round: bool,
    }
    let tail = Tail {
        node,
        id,
        path,
        offset: 0,
        follow,
        last_round: false,
    };
    // Read what the file has, wait while the build runs, read once more when it has ended; a
    // build that ends without a log here (it ran on another node) gets the stored tail.
    let stream = futures_util::stream::unfold(tail, |mut t| async move {
        loop {
            let mut buf = Vec::new();
            if let Ok(mut f) = tokio::fs::File::open(&t.path).await {
                if f.seek(std::io::SeekFrom::Start(t.offset)).await.is_ok() {
                    let _ = f.read_to_end(&mut buf).await;
                }
            }
            if !buf.is_empty() {
                t.offset += buf.len() as u64;
                return Some((Ok::<_, std::io::Error>(Bytes::from(buf)), t));
            }
            if !t.follow || t.last_round {
                return None;
            }
            match t.node.db.get(&t.id).await {
                Ok(Some(r)) if !r.state.is_terminal() => tokio::time::sleep(LOG_POLL).await,
                Ok(Some(r)) if t.offset == 0 && !t.path.exists() => {
                    t.last_round = true;
                    let stored = r.log_tail.unwrap_or_default();
                    if !stored.is_empty() {
                        return Some((Ok(Bytes::from(stored)), t));
                    }
                }
                _ => t.last_round = true,
            }
        }
    });
    Ok((text_plain, Body::from_stream(stream)).into_response())
}

/// Checks a post of the guest of build `id`: the build runs here, the body is signed with its
/// key within the tolerance, and this signature was not seen before (else a replay).
async fn authenticate_guest(
    node: &Node,
    id: &str,
    headers: &HeaderMap,
    bytes: &[u8],
) -> ApiResult<()> {
    let Some(key) = node.build_key(id) else {
        let row = load(node, id).await?;
        return Err(ApiError::Finished {
            id: id.to_string(),
            state: row.state,
        });
    };
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let now = (crate::now_ms() / 1000) as u64;
    let verified = signature::verify(
        key.as_bytes(),
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        bytes,
        now,
        signature::DEFAULT_TOLERANCE_SECS,
    )
    .map_err(|source| ApiError::Signature {
        id: id.to_string(),
        source,
    })?;
    // Recorded decoded: another spelling of a seen signature is the same replay.
    if !node.db.record_signature(&verified.canonical(), id).await? {
        return Err(ApiError::Replay { id: id.to_string() });
    }
    Ok(())
}

/// The JSON body of a post of build `id`'s guest, once [`authenticate_guest`] accepted it.
async fn guest_json<T: serde::de::DeserializeOwned>(
    node: &Node,
    id: &str,
    headers: &HeaderMap,
    bytes: &[u8],
) -> ApiResult<T> {
    authenticate_guest(node, id, headers, bytes).await?;
    parse_json(bytes)
}

/// One of the guest's own logs ([`LogSource::GUEST`]), signed like its report; kept scrubbed
/// and within `max_log_bytes`.
async fn guest_log(
    State(node): State<Arc<Node>>,
    Path((id, source)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let source = LogSource::parse(&source)
        .filter(|s| s.is_guest())
        .ok_or_else(|| ApiError::LogSource {
            given: source,
            valid: LogSource::GUEST.map(LogSource::as_str).join(", "),
        })?;
    let bytes = body_within(body, MAX_GUEST_LOG_BODY)?;
    authenticate_guest(&node, &id, &headers, &bytes).await?;
    let row = load(&node, &id).await?;
    node.keep_guest_log(&row, source, &bytes)
        .await
        .map_err(|e| ApiError::KeepLog {
            id,
            source_name: source,
            source: e,
        })?;
    Ok(StatusCode::NO_CONTENT)
}

/// The guest's signed report.
async fn complete(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let bytes = body_bytes(&node, body)?;
    let report: BuildReport = guest_json(&node, &id, &headers, &bytes).await?;
    if report.build_id != id {
        return Err(ApiError::BadReport {
            reason: format!("it is about build {}", report.build_id),
            id,
        });
    }
    if !node.signal(&id, Signal::Report(Box::new(report))).await {
        return Err(finished(&node, id).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The guest's signed progress: it started a phase. The build's supervisor records it when it
/// moves the build forward (the upload phase: `running -> uploading`) and refuses it otherwise;
/// a build that is not running here any more refuses it like a report.
async fn progress(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let bytes = body_bytes(&node, body)?;
    let event: ProgressEvent = guest_json(&node, &id, &headers, &bytes).await?;
    if event.build_id != id {
        return Err(ApiError::ProgressOtherBuild {
            id,
            about: event.build_id,
        });
    }
    let (applied, answer) = tokio::sync::oneshot::channel();
    let signal = Signal::Progress {
        phase: event.phase,
        applied,
    };
    // No answer (in time): the supervisor is ending the build.
    let answer = match node.signal(&id, signal).await {
        true => tokio::time::timeout(PROGRESS_ANSWER, answer)
            .await
            .ok()
            .and_then(Result::ok),
        false => None,
    };
    match answer {
        Some(Ok(())) => Ok(StatusCode::NO_CONTENT),
        Some(Err(last)) => Err(ApiError::ProgressNotForward {
            id,
            phase: event.phase,
            last,
        }),
        None => Err(finished(&node, id).await),
    }
}

/// The refusal of a post about build `id`, which no supervisor here runs any more.
async fn finished(node: &Node, id: String) -> ApiError {
    match load(node, &id).await {
        Ok(row) => ApiError::Finished {
            id,
            state: row.state,
        },
        Err(e) => e,
    }
}

/// The guest's upload, step 1 ([`crate::uploads`]): the node creates the multipart upload of
/// the build's own location and presigns its config's PUT.
async fn upload_start(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<UploadStarted>> {
    let bytes = body_bytes(&node, body)?;
    let start: UploadStart = guest_json(&node, &id, &headers, &bytes).await?;
    let row = load(&node, &id).await?;
    Ok(Json(node.upload_grants.start(&row, start).await?))
}

/// The guest's upload, step 2: a presigned UploadPart of one part of the declared digest.
async fn upload_part(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SignedRequest>> {
    let bytes = body_bytes(&node, body)?;
    let request: PartRequest = guest_json(&node, &id, &headers, &bytes).await?;
    Ok(Json(node.upload_grants.part(&id, request)?))
}

/// The guest's upload, step 3: the node completes the upload with its own key and checks it.
async fn upload_complete(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<UploadVerified>> {
    let bytes = body_within(body, MAX_UPLOAD_COMPLETE_BODY)?;
    let request: UploadComplete = guest_json(&node, &id, &headers, &bytes).await?;
    Ok(Json(node.upload_grants.complete(&id, request).await?))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

async fn readyz(State(node): State<Arc<Node>>) -> (StatusCode, Json<Readiness>) {
    let mut checks = node.readiness();
    checks.push(match node.db.ping().await {
        Ok(()) => Check::new("database", true, "answers"),
        Err(e) => Check::new("database", false, crate::error_chain(&e)),
    });
    checks.push(disk_check(&node.config.work_dir));
    checks.push(vm_dns_check(&node.config.vm_dns));
    checks.extend(node.mirror.check().await);
    checks.push(Check::new(
        "admitting",
        !node.is_draining(),
        if node.is_draining() {
            "draining"
        } else {
            "admitting builds"
        },
    ));
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, checks }))
}

/// The name servers the builder VMs get (`vm_dns`); none is only possible when configured so.
fn vm_dns_check(servers: &[std::net::Ipv4Addr]) -> Check {
    let detail = if servers.is_empty() {
        "none: `vm_dns` is set empty, builds cannot resolve names".to_string()
    } else {
        servers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Check::new("vm_dns", true, detail)
}

fn disk_check(dir: &std::path::Path) -> Check {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap_or_default();
    // SAFETY: `statvfs` is a plain C struct of integers, for which all zero bytes are valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated C string that outlives the call, and `st` is a
    // writable struct of the type statvfs fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Check::new(
            "disk",
            false,
            format!(
                "cannot statvfs {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ),
        );
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    Check::new(
        "disk",
        free >= MIN_FREE_DISK_BYTES,
        format!("{} MiB free in {}", free >> 20, dir.display()),
    )
}

async fn metrics(State(node): State<Arc<Node>>) -> ApiResult<Response> {
    let (used_vcpus, used_mem_mib, _) = node.usage();
    let snapshot = Snapshot {
        by_state: node.db.count_by_state().await?,
        capacity_vcpus: node.config.capacity_vcpus,
        capacity_mem_mib: node.config.capacity_mem_mib,
        used_vcpus,
        used_mem_mib,
        vms: {
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.vmm_metrics())
                .await
                .unwrap_or_default()
        },
        cache: node
            .cache_pool
            .as_ref()
            .map(|pool| (pool.stats(), pool.fork_method())),
    };
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.metrics.render(&snapshot),
    )
        .into_response())
}
