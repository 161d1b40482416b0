//! The node's pull-through registry mirror: for each configured upstream registry (`[[mirror]]`
//! in the config) a supervised `docker-registry serve` child in proxy mode on a loopback port,
//! its storage under `mirror_dir`, the upstream's credentials only in its 0600 config file; and
//! the `/v2` reverse proxy the VM-facing listener serves ([`Mirror::answer`]), which picks the
//! upstream by the request's `Host` (dockerd in a VM sends the upstream's `host:port`, the
//! node having redirected its connections there) and refuses anything but pulls.
//!
//! A registry in proxy mode still asks the upstream for a tag's manifest on every pull by tag,
//! so the proxy keeps a small tag cache: a tag answered within `mirror_tag_ttl_s` is answered
//! again by its digest, which the registry serves from its storage without the upstream. With
//! `GET /v2/` answered here, a second pull within the TTL never reaches the upstream.
//!
//! A child that exits is restarted with [`builder_retry`]'s backoff, and is only started once
//! its upstream answers `/v2/` (the registry panics at start otherwise). Children die with the
//! node (`PR_SET_PDEATHSIG`, and killed when the [`Mirror`] is dropped); a start-up pass kills
//! those a crashed previous run left, by their pid files.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use builder_retry::RetryPolicy;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncBufReadExt;
use url::Url;

use crate::credentials::scrub;
use crate::metrics::MirrorMetrics;
use crate::vm::Check;

/// The registry binary (Debian's `docker-registry` package).
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long a started registry has to answer `/v2/`.
const REGISTRY_START: Duration = Duration::from_secs(30);
/// A registry that served this long before exiting starts again from the first backoff step.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// The restart backoff (its attempt count is unused: a mirror is restarted for ever).
const RESTART_BACKOFF: RetryPolicy = RetryPolicy {
    attempts: 0,
    first_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(30),
};
/// How long a readiness probe or an upstream probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of an error answer read (to scrub the upstream's credentials from it).
const MAX_ERROR_BODY: usize = 64 << 10;
/// The request headers passed on to the registry.
const REQUEST_HEADERS: [HeaderName; 4] = [
    header::ACCEPT,
    header::RANGE,
    header::IF_NONE_MATCH,
    header::USER_AGENT,
];
/// The answer headers passed back to the VM.
const ANSWER_HEADERS: [&str; 7] = [
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "etag",
    "docker-content-digest",
    "docker-distribution-api-version",
];

/// One `[[mirror]]` entry of the config file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorEntry {
    pub upstream: String,
    pub remote_url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// One mirrored upstream registry, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorUpstream {
    /// `host:port` as written in `FROM` lines, and as the VM's dockerd sends it in `Host`.
    pub upstream: String,
    /// The same, as the address the node redirects the VMs' connections from.
    pub addr: SocketAddrV4,
    /// Where the registry fetches from (no credentials in it).
    pub remote_url: Url,
    /// The upstream login: user name and the file holding the password.
    pub login: Option<(String, PathBuf)>,
}

/// The mirror's configuration: `mirror_dir`, `mirror_tag_ttl_s` and the `[[mirror]]` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    pub dir: PathBuf,
    /// How long a tag's manifest digest is answered without asking the upstream; zero: never.
    pub tag_ttl: Duration,
    pub upstreams: Vec<MirrorUpstream>,
}

/// Why a `[[mirror]]` entry is refused; each names the entry's field.
#[derive(Debug, thiserror::Error)]
pub enum MirrorConfigError {
    #[error(
        "`mirror[{index}].upstream` {value:?} is not an IPv4 address and port (`host:port` as \
         written in FROM lines; host names are not supported yet)"
    )]
    Upstream { index: usize, value: String },
    #[error("`mirror[{index}].upstream` {value:?} is mirrored twice")]
    Duplicate { index: usize, value: String },
    #[error("`mirror[{index}].remote_url` {value:?} is refused: {reason}")]
    RemoteUrl {
        index: usize,
        value: String,
        reason: &'static str,
    },
    #[error("`mirror[{index}]` sets `{given}` but not `{missing}`: a login needs both")]
    LoginPair {
        index: usize,
        given: &'static str,
        missing: &'static str,
    },
}

impl MirrorConfig {
    /// Checks the `[[mirror]]` entries.
    pub fn resolve(
        entries: Vec<MirrorEntry>,
        dir: PathBuf,
        tag_ttl_s: u64,
    ) -> Result<Self, MirrorConfigError> {
        let mut upstreams: Vec<MirrorUpstream> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            let addr: SocketAddrV4 =
                entry
                    .upstream
                    .parse()
                    .map_err(|_| MirrorConfigError::Upstream {
                        index,
                        value: entry.upstream.clone(),
                    })?;
            if upstreams.iter().any(|u| u.addr == addr) {
                return Err(MirrorConfigError::Duplicate {
                    index,
                    value: entry.upstream,
                });
            }
            let refused = |reason| MirrorConfigError::RemoteUrl {
                index,
                value: entry.remote_url.clone(),
                reason,
            };
            let remote_url =
                Url::parse(&entry.remote_url).map_err(|_| refused("it is not a URL"))?;
            if !matches!(remote_url.scheme(), "http" | "https") {
                return Err(refused("only http and https are supported"));
            }
            if !remote_url.username().is_empty() || remote_url.password().is_some() {
                return Err(refused(
                    "it holds credentials: set `username` and `password_file` instead",
                ));
            }
            if remote_url.path() != "/" || remote_url.query().is_some() {
                return Err(refused("a registry URL has no path or query"));
            }
            let login = match (entry.username, entry.password_file) {
                (Some(user), Some(file)) => Some((user, file)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(MirrorConfigError::LoginPair {
                        index,
                        given: "username",
                        missing: "password_file",
                    })
                }
                (None, Some(_)) => {
                    return Err(MirrorConfigError::LoginPair {
                        index,
                        given: "password_file",
                        missing: "username",
                    })
                }
            };
            upstreams.push(MirrorUpstream {
                upstream: addr.to_string(),
                addr,
                remote_url,
                login,
            });
        }
        Ok(MirrorConfig {
            dir,
            tag_ttl: Duration::from_secs(tag_ttl_s),
            upstreams,
        })
    }
}

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot create the mirror directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the password file {path} of the mirror of {upstream}")]
    Password {
        upstream: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the password file {path} of the mirror of {upstream} is empty")]
    EmptyPassword { upstream: String, path: PathBuf },
}

/// Why one run of an upstream's registry ended (logged, and shown by `/readyz` meanwhile).
#[derive(Debug, thiserror::Error)]
enum RegistryRunError {
    #[error("the upstream {url} does not answer /v2/ yet")]
    UpstreamDown {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot write the registry config {path}")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find a free loopback port for the registry")]
    Port(#[source] std::io::Error),
    #[error("cannot start {REGISTRY_BIN}")]
    Spawn(#[source] std::io::Error),
    #[error("the registry did not answer /v2/ within {}s", REGISTRY_START.as_secs())]
    NotAnswering,
    #[error("the registry exited ({status})")]
    Exited { status: std::process::ExitStatus },
    #[error("cannot wait for the registry")]
    Wait(#[source] std::io::Error),
}

/// What one proxied request came to, the `result` label of `node_agent_mirror_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PullResult {
    /// `GET /v2/`, answered by the node.
    Local,
    /// A tag answered by its cached digest.
    TagCache,
    /// Passed to the registry as asked.
    Proxied,
    /// The registry is not serving (starting, restarting) or failed to answer.
    Unavailable,
}

impl PullResult {
    fn as_str(self) -> &'static str {
        match self {
            PullResult::Local => "local",
            PullResult::TagCache => "tag_cache",
            PullResult::Proxied => "proxied",
            PullResult::Unavailable => "unavailable",
        }
    }
}

/// One upstream's registry child and what it is doing.
#[derive(Debug)]
struct UpstreamRegistry {
    upstream: MirrorUpstream,
    dir: PathBuf,
    /// The upstream URL with the login in its userinfo: only ever written to the 0600 config.
    remote_with_login: Url,
    /// The password and its percent-encoded form, scrubbed from everything passed on.
    secrets: Vec<String>,
    state: Mutex<RegistryState>,
}

#[derive(Debug, Clone)]
struct RegistryState {
    /// The registry's address while it answers.
    serving: Option<SocketAddr>,
    pid: Option<u32>,
    detail: String,
}

/// What `/readyz` and tests see of one upstream's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorStatus {
    pub upstream: String,
    /// The registry's loopback address while it serves.
    pub serving: Option<SocketAddr>,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TagKey {
    upstream: String,
    name: String,
    tag: String,
    /// The request's `Accept` values: the manifest a tag resolves to depends on them.
    accept: String,
}

#[derive(Debug, Clone)]
struct CachedTag {
    digest: String,
    at: Instant,
}

/// The running mirror: one supervised registry per upstream, the tag cache and the proxy.
#[derive(Debug)]
pub struct Mirror {
    instances: Vec<Arc<UpstreamRegistry>>,
    tag_ttl: Duration,
    tags: Mutex<HashMap<TagKey, CachedTag>>,
    metrics: Arc<MirrorMetrics>,
    http: reqwest::Client,
    supervisors: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Mirror {
    /// Stops the supervisors; each one's registry child is killed as its task drops it.
    fn drop(&mut self) {
        for task in &self.supervisors {
            task.abort();
        }
    }
}

/// The directory of an upstream's registry under `mirror_dir`.
fn instance_dir(dir: &Path, upstream: &MirrorUpstream) -> PathBuf {
    dir.join(upstream.upstream.replace(':', "_"))
}

impl Mirror {
    /// Kills the registries a previous run left, reads the passwords and starts one supervised
    /// registry per upstream (in the background: `/readyz` says when each serves).
    pub fn start(config: &MirrorConfig, metrics: Arc<MirrorMetrics>) -> Result<Self, MirrorError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds");
        let mut instances = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            let dir = instance_dir(&config.dir, upstream);
            create_private_dir(&dir)?;
            kill_leftover(&dir);
            let mut remote_with_login = upstream.remote_url.clone();
            let mut secrets = Vec::new();
            if let Some((user, file)) = &upstream.login {
                let password = std::fs::read_to_string(file)
                    .map_err(|source| MirrorError::Password {
                        upstream: upstream.upstream.clone(),
                        path: file.clone(),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if password.is_empty() {
                    return Err(MirrorError::EmptyPassword {
                        upstream: upstream.upstream.clone(),
                        path: file.clone(),
                    });
                }
                // Cannot fail: the URL is http(s) with a host.
                let _ = remote_with_login.set_username(user);
                let _ = remote_with_login.set_password(Some(&password));
                if let Some(encoded) = remote_with_login.password() {
                    secrets.push(encoded.to_string());
                }
                secrets.push(password);
            }
            metrics.track(&upstream.upstream);
            instances.push(Arc::new(UpstreamRegistry {
                upstream: upstream.clone(),
                dir,
                remote_with_login,
                secrets,
                state: Mutex::new(RegistryState {
                    serving: None,
                    pid: None,
                    detail: "starting".to_string(),
                }),
            }));
        }
        let supervisors = instances
            .iter()
            .map(|instance| {
                tokio::spawn(supervise(instance.clone(), http.clone(), metrics.clone()))
            })
            .collect();
        Ok(Mirror {
            instances,
            tag_ttl: config.tag_ttl,
            tags: Mutex::new(HashMap::new()),
            metrics,
            http,
            supervisors,
        })
    }

    /// The upstreams' addresses, whose connections the node redirects to a VM's listener.
    pub fn redirects(&self) -> Vec<SocketAddrV4> {
        self.instances.iter().map(|i| i.upstream.addr).collect()
    }

    /// The upstreams as `FROM` lines name them, for the VM's dockerd (`insecure-registries`).
    pub fn registries(&self) -> Vec<String> {
        self.instances
            .iter()
            .map(|i| i.upstream.upstream.clone())
            .collect()
    }

    /// Each upstream's registry: where it serves and its pid.
    pub fn status(&self) -> Vec<MirrorStatus> {
        self.instances
            .iter()
            .map(|i| {
                let state = i.state();
                MirrorStatus {
                    upstream: i.upstream.upstream.clone(),
                    serving: state.serving,
                    pid: state.pid,
                }
            })
            .collect()
    }

    /// The `mirror` readiness check: every upstream's registry answers `/v2/` now; `None`
    /// when nothing is mirrored.
    pub async fn check(&self) -> Option<Check> {
        if self.instances.is_empty() {
            return None;
        }
        let mut ok = true;
        let mut details = Vec::new();
        for instance in &self.instances {
            let state = instance.state();
            let answering = match state.serving {
                Some(addr) => self
                    .http
                    .get(format!("http://{addr}/v2/"))
                    .timeout(PROBE_TIMEOUT)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                None => false,
            };
            ok &= answering;
            let detail = if answering {
                format!(
                    "answers on {}",
                    state.serving.expect("answering means serving")
                )
            } else {
                state.detail
            };
            details.push(format!("{}: {detail}", instance.upstream.upstream));
        }
        Some(Check::new("mirror", ok, details.join("; ")))
    }

    /// Answers a VM's `/v2` request: `GET`/`HEAD` only, to the registry of the upstream its
    /// `Host` names; `GET /v2/` locally; a tag's manifest from the tag cache when fresh.
    pub async fn answer(&self, request: Request) -> Response {
        let method = request.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return registry_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                format!("builder VMs may only pull through this mirror: {method} is refused"),
            );
        }
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let Some(instance) = self.instances.iter().find(|i| i.upstream.upstream == host) else {
            return registry_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                format!("this node mirrors no registry {host:?}"),
            );
        };
        let upstream = instance.upstream.upstream.as_str();
        let path = request.uri().path();
        if path == "/v2/" || path == "/v2" {
            self.metrics
                .observe_request(upstream, PullResult::Local.as_str());
            return (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (
                        HeaderName::from_static("docker-distribution-api-version"),
                        "registry/2.0",
                    ),
                ],
                "{}",
            )
                .into_response();
        }
        let headers = request.headers();
        let tag = manifest_tag(path).map(|(name, tag)| TagKey {
            upstream: upstream.to_string(),
            name: name.to_string(),
            tag: tag.to_string(),
            accept: accept_of(headers),
        });
        if let Some(key) = &tag {
            if let Some(digest) = self.cached_digest(key) {
                let by_digest = format!("/v2/{}/manifests/{digest}", key.name);
                match self.forward(instance, &method, &by_digest, headers).await {
                    Ok(answer) if answer.status().is_success() => {
                        self.metrics
                            .observe_request(upstream, PullResult::TagCache.as_str());
                        return answer;
                    }
                    // Gone from the registry's storage, say: ask as the VM did.
                    _ => self.forget(key),
                }
            }
        }
        let path_and_query = request.uri().path_and_query().map_or(path, |p| p.as_str());
        match self
            .forward(instance, &method, path_and_query, headers)
            .await
        {
            Ok(answer) => {
                if let Some(key) = tag {
                    self.remember(key, &answer);
                }
                self.metrics
                    .observe_request(upstream, PullResult::Proxied.as_str());
                answer
            }
            Err(answer) => {
                self.metrics
                    .observe_request(upstream, PullResult::Unavailable.as_str());
                answer
            }
        }
    }

    fn cached_digest(&self, key: &TagKey) -> Option<String> {
        let tags = self.tags.lock().expect("mirror tags lock");
        tags.get(key)
            .filter(|c| c.at.elapsed() < self.tag_ttl)
            .map(|c| c.digest.clone())
    }

    fn forget(&self, key: &TagKey) {
        self.tags.lock().expect("mirror tags lock").remove(key);
    }

    /// Keeps the digest of a tag's successful manifest answer, when the cache is on.
    fn remember(&self, key: TagKey, answer: &Response) {
        if self.tag_ttl.is_zero() || !answer.status().is_success() {
            return;
        }
        let Some(digest) = answer
            .headers()
            .get("docker-content-digest")
            .and_then(|d| d.to_str().ok())
            .filter(|d| is_digest(d))
        else {
            return;
        };
        let mut tags = self.tags.lock().expect("mirror tags lock");
        tags.retain(|_, c| c.at.elapsed() < self.tag_ttl);
        tags.insert(
            key,
            CachedTag {
                digest: digest.to_string(),
                at: Instant::now(),
            },
        );
    }

    /// The registry's answer to `method path_and_query`, its body streamed (an error answer's
    /// body read and the upstream's credentials scrubbed from it); `Err` with a registry-style
    /// 503 when the registry is not serving or did not answer.
    async fn forward(
        &self,
        instance: &UpstreamRegistry,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Response, Response> {
        let upstream = &instance.upstream.upstream;
        let unavailable = |why: String| {
            registry_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("the mirror of {upstream} cannot answer now: {why}"),
            )
        };
        let Some(addr) = instance.state().serving else {
            return Err(unavailable(instance.state().detail));
        };
        let mut request = self
            .http
            .request(method.clone(), format!("http://{addr}{path_and_query}"));
        for name in &REQUEST_HEADERS {
            for value in headers.get_all(name) {
                request = request.header(name, value);
            }
        }
        let answer = request
            .send()
            .await
            .map_err(|e| unavailable(scrub(&crate::error_chain(&e), &instance.secret_refs())))?;
        let status = answer.status();
        let mut passed = HeaderMap::new();
        for name in ANSWER_HEADERS {
            for value in answer.headers().get_all(name) {
                passed.append(HeaderName::from_static(name), value.clone());
            }
        }
        let body = if status.is_success() || method == Method::HEAD {
            Body::from_stream(answer.bytes_stream())
        } else {
            let mut bytes = Vec::new();
            let mut chunks = answer.bytes_stream();
            while let Some(Ok(chunk)) = chunks.next().await {
                bytes.extend_from_slice(&chunk);
                if bytes.len() >= MAX_ERROR_BODY {
                    bytes.truncate(MAX_ERROR_BODY);
                    break;
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            passed.remove(header::CONTENT_LENGTH);
            Body::from(scrub(&text, &instance.secret_refs()))
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = passed;
        Ok(response)
    }
}

impl UpstreamRegistry {
    fn state(&self) -> RegistryState {
        self.state.lock().expect("mirror state lock").clone()
    }

    fn set_state(&self, serving: Option<SocketAddr>, pid: Option<u32>, detail: String) {
        *self.state.lock().expect("mirror state lock") = RegistryState {
            serving,
            pid,
            detail,
        };
    }

    fn secret_refs(&self) -> Vec<&str> {
        self.secrets.iter().map(String::as_str).collect()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.yml")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("registry.pid")
    }

    /// The registry's config on `port` (JSON, which YAML reads): proxy mode, log level warn
    /// (info prints the remote URL, password included), written 0600.
    fn write_config(&self, port: u16) -> Result<(), RegistryRunError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let config = serde_json::json!({
            "version": "0.1",
            "log": {"level": "warn", "accesslog": {"disabled": true}},
            "storage": {
                "filesystem": {"rootdirectory": self.dir.join("data")},
                "delete": {"enabled": true},
            },
            "http": {"addr": format!("127.0.0.1:{port}"), "secret": crate::random_hex(16)},
            "proxy": {"remoteurl": self.remote_with_login.as_str()},
        });
        let path = self.config_path();
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(config.to_string().as_bytes())
        };
        write().map_err(|source| RegistryRunError::WriteConfig {
            path: path.clone(),
            source,
        })
    }

    /// One run: waits for the upstream, starts the registry, serves until it exits.
    async fn run(&self, http: &reqwest::Client) -> Result<(), RegistryRunError> {
        let probe = self
            .upstream
            .remote_url
            .join("v2/")
            .expect("a registry URL takes /v2/");
        http.get(probe.clone())
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .map_err(|source| RegistryRunError::UpstreamDown {
                url: probe,
                source: source.without_url(),
            })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(RegistryRunError::Port)?
            .port();
        self.write_config(port)?;
        let mut command = tokio::process::Command::new(REGISTRY_BIN);
        command
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; it only asks the kernel to kill the child when this thread's process dies.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(RegistryRunError::Spawn)?;
        let pid = child.id();
        if let Some(pid) = pid {
            if let Err(e) = std::fs::write(self.pid_path(), pid.to_string()) {
                tracing::warn!(
                    upstream = self.upstream.upstream,
                    error = %e,
                    "cannot write the mirror registry's pid file"
                );
            }
        }
        let name = &self.upstream.upstream;
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(log_lines(stdout, name.clone(), self.secrets.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(log_lines(stderr, name.clone(), self.secrets.clone()));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.set_state(None, pid, format!("starting on {addr}"));
        let outcome = tokio::select! {
            status = child.wait() => match status {
                Ok(status) => Err(RegistryRunError::Exited { status }),
                Err(e) => Err(RegistryRunError::Wait(e)),
            },
            answered = answers(http, addr) => if answered {
                tracing::info!(upstream = self.upstream.upstream, %addr, "registry mirror serving");
                self.set_state(Some(addr), pid, format!("answers on {addr}"));
                match child.wait().await {
                    Ok(status) => Err(RegistryRunError::Exited { status }),
                    Err(e) => Err(RegistryRunError::Wait(e)),
                }
            } else {
                Err(RegistryRunError::NotAnswering)
            },
        };
        // Killed here when it is still running (it did not answer in time).
        drop(child);
        let _ = std::fs::remove_file(self.pid_path());
        outcome
    }
}

/// Supervises an upstream's registry for ever: runs it, and after it exits (or could not
/// start) waits [`RESTART_BACKOFF`] and runs it again.
async fn supervise(
    instance: Arc<UpstreamRegistry>,
    http: reqwest::Client,
    metrics: Arc<MirrorMetrics>,
) {
    let upstream = instance.upstream.upstream.clone();
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let ran = instance.run(&http).await;
        if started.elapsed() >= STABLE_RUN {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = RESTART_BACKOFF.delay(failures);
        let error = ran.err().map_or_else(String::new, |e| {
            scrub(&crate::error_chain(&e), &instance.secret_refs())
        });
        tracing::warn!(
            upstream,
            error,
            delay_ms = delay.as_millis() as u64,
            "the registry mirror is not serving; it starts again after a pause"
        );
        instance.set_state(None, None, format!("{error}; starting again"));
        metrics.observe_restart(&upstream);
        tokio::time::sleep(delay).await;
    }
}

/// Whether the registry at `addr` answers `/v2/` within [`REGISTRY_START`].
async fn answers(http: &reqwest::Client, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + REGISTRY_START;
    while Instant::now() < deadline {
        let answer = http
            .get(format!("http://{addr}/v2/"))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Logs the registry's output lines (warnings and errors at level warn), credentials scrubbed.
async fn log_lines(
    output: impl tokio::io::AsyncRead + Unpin,
    upstream: String,
    secrets: Vec<String>,
) {
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let mut lines = tokio::io::BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(upstream, line = scrub(&line, &secrets), "registry mirror");
    }
}

/// Makes `dir` (mode 0700: it holds the config with the upstream's password).
fn create_private_dir(dir: &Path) -> Result<(), MirrorError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| MirrorError::Dir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Kills the registry a previous run of the node left in `dir` (its pid file names it, and the
/// process is that registry: its command line names this directory's config).
fn kill_leftover(dir: &Path) {
    let pid_path = dir.join("registry.pid");
    let Some(pid) = std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
    else {
        return;
    };
    let config = dir.join("config.yml");
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.first()
            .is_some_and(|a| a.ends_with(b"docker-registry"))
            && args
                .iter()
                .any(|a| *a == config.as_os_str().as_encoded_bytes())
    });
    if ours {
        // SAFETY: kill(2) with a pid read from our pid file and checked above to be a registry
        // of this directory; it touches no memory.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        tracing::info!(pid, dir = %dir.display(), "killed a registry mirror a previous run left");
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pid_path);
}

/// Whether process `pid` still runs: it exists and is not a zombie (its leader shows `Z` once
/// killed, while its other threads finish dying; the kill cannot be stopped then).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// `(name, tag)` of a `/v2/<name>/manifests/<tag>` path; `None` for other paths and for
/// manifests by digest.
fn manifest_tag(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, reference) = rest.rsplit_once("/manifests/")?;
    (!name.is_empty() && !reference.is_empty() && !reference.contains(':'))
        .then_some((name, reference))
}

/// Whether `value` looks like a content digest (`algorithm:hex`).
fn is_digest(value: &str) -> bool {
    value.split_once(':').is_some_and(|(algorithm, hex)| {
        !algorithm.is_empty()
            && algorithm.bytes().all(|b| b.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// The request's `Accept` values, joined.
fn accept_of(headers: &HeaderMap) -> String {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
}

/// A registry-style error answer (`{"errors":[{"code","message"}]}`).
fn registry_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        HeaderName::from_static("docker-distribution-api-version"),
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(upstream: &str, remote_url: &str) -> MirrorEntry {
        MirrorEntry {
            upstream: upstream.into(),
            remote_url: remote_url.into(),
            username: None,
            password_file: None,
        }
    }

    #[test]
    fn entries_are_checked_and_each_refusal_names_its_field() {
        let ok = MirrorConfig::resolve(
            vec![MirrorEntry {
                username: Some("u".into()),
                password_file: Some("/p".into()),
                ..entry("198.18.0.2:5000", "https://registry.example:5000")
            }],
            "/m".into(),
            300,
        )
        .unwrap();
        assert_eq!(ok.upstreams[0].addr, "198.18.0.2:5000".parse().unwrap());
        assert_eq!(ok.upstreams[0].login, Some(("u".into(), "/p".into())));
        assert_eq!(ok.tag_ttl, Duration::from_secs(300));
        for (entries, words) in [
            (
                vec![entry("registry:5000", "http://a")],
                "`mirror[0].upstream`",
            ),
            (vec![entry("10.0.0.1", "http://a")], "`mirror[0].upstream`"),
            (
                vec![
                    entry("10.0.0.1:5000", "http://a"),
                    entry("10.0.0.1:5000", "http://b"),
                ],
                "`mirror[1].upstream` \"10.0.0.1:5000\" is mirrored twice",
            ),
            (
                vec![entry("10.0.0.1:5000", "ftp://a")],
                "`mirror[0].remote_url`",
            ),
            (
                vec![entry("10.0.0.1:5000", "http://u:p@a")],
                "holds credentials",
            ),
            (vec![entry("10.0.0.1:5000", "http://a/x")], "no path"),
            (
                vec![MirrorEntry {
                    username: Some("u".into()),
                    ..entry("10.0.0.1:5000", "http://a")
                }],
                "`mirror[0]` sets `username` but not `password_file`",
            ),
        ] {
            let err = MirrorConfig::resolve(entries, "/m".into(), 300)
                .unwrap_err()
                .to_string();
            assert!(err.contains(words), "{words} not in: {err}");
        }
    }

    #[test]
    fn only_manifests_by_tag_are_cached() {
        assert_eq!(
            manifest_tag("/v2/library/busybox/manifests/latest"),
            Some(("library/busybox", "latest"))
        );
        assert_eq!(manifest_tag("/v2/a/manifests/sha256:abcd"), None);
        assert_eq!(manifest_tag("/v2/a/blobs/sha256:abcd"), None);
        assert!(is_digest("sha256:0123abcdef"));
        assert!(!is_digest("sha256:../x"));
    }
}
