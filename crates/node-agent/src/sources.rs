//! Uploaded sources: what `node-agent submit DIR` sends instead of a repository URL. The CLI
//! uploads a git bundle (`POST /v1/sources`); this module fetches it into a bare repository of
//! its own under `<work_dir>/sources/<token>/repo.git`, runs `git update-server-info`, and the
//! API serves the repository read-only over git's "dumb" HTTP protocol at
//! `<callback_url>/v1/sources/<token>/repo.git`, the address builder VMs already reach for
//! their reports. The 128-bit random token is the only credential: the URL is handed to one
//! build and is unguessable.
//!
//! A source lives as long as the builds that use it: submits naming its URL are recorded in
//! its `source.json`, and [`Sources::sweep`] (every [`SWEEP_INTERVAL`], at start and at
//! shutdown) removes a source once all its builds are terminal, or, when no build ever named
//! it, [`UNUSED_TTL`] after its upload.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::db::{Db, DbError};

/// How often finished sources are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How long a source no build has named is kept.
pub const UNUSED_TTL: Duration = Duration::from_secs(15 * 60);
/// The only branch of an uploaded bundle and of the served repository.
pub const BRANCH: &str = "refs/heads/main";
const META: &str = "source.json";
const REPO: &str = "repo.git";
const TOKEN_BYTES: usize = 16;

/// Why a source could not be stored, read or removed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run git {args} in {dir}")]
    Spawn {
        args: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("git {args} failed in {dir}: {stderr}")]
    Git {
        args: String,
        dir: PathBuf,
        stderr: String,
    },
    #[error("the upload is not a git bundle with the branch {BRANCH}: {reason}")]
    BadBundle { reason: String },
    #[error("the source metadata {path} is not valid")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the database failed while sweeping sources")]
    Db(#[from] DbError),
}

/// The environment of the daemon's own git runs: no system or user config applies.
const ISOLATED: [(&str, &str); 2] = [
    ("GIT_CONFIG_NOSYSTEM", "1"),
    ("GIT_CONFIG_GLOBAL", "/dev/null"),
];

/// Runs `git ARGS` in `dir` with `env` added, returning its stdout, trimmed.
pub(crate) fn git<K, V>(dir: &Path, args: &[&str], env: &[(K, V)]) -> Result<String, SourceError>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let joined = args.join(" ");
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| SourceError::Spawn {
            args: joined.clone(),
            dir: dir.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(SourceError::Git {
            args: joined,
            dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// What `POST /v1/sources` answers: the URL and commit a build request names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Uploaded {
    pub id: String,
    pub repo_url: Url,
    pub commit_sha: String,
}

/// `<token>/source.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    commit_sha: String,
    created_at_ms: i64,
    /// Builds submitted with this source's URL.
    builds: Vec<String>,
}

/// The uploaded sources of this node.
#[derive(Debug)]
pub struct Sources {
    dir: PathBuf,
    base: Url,
    /// Serializes `source.json` updates against the sweeper.
    meta_lock: Mutex<()>,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SourceError {
    let path = path.to_path_buf();
    move |source| SourceError::Io {
        action,
        path,
        source,
    }
}

fn is_token(s: &str) -> bool {
    s.len() == TOKEN_BYTES * 2
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Sources {
    /// Sources kept in `dir` (created), served under `base` (the node's callback URL).
    pub fn new(dir: PathBuf, base: Url) -> Result<Self, SourceError> {
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(Sources {
            dir,
            base,
            meta_lock: Mutex::new(()),
        })
    }

    /// The URL a build clones source `token` from.
    pub fn url(&self, token: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!("/v1/sources/{token}/{REPO}"));
        url.set_query(None);
        url
    }

    /// The token of `url` when it names a source of this node.
    fn token_of(&self, url: &str) -> Option<String> {
        let url = Url::parse(url).ok()?;
        let token = url
            .path()
            .strip_prefix("/v1/sources/")?
            .strip_suffix(&format!("/{REPO}"))?;
        (is_token(token) && self.dir.join(token).is_dir()).then(|| token.to_string())
    }

    /// Stores the bundle `bytes` as a new source. Blocking: runs git.
    pub fn add(&self, bytes: &[u8]) -> Result<Uploaded, SourceError> {
        let token = crate::random_hex(TOKEN_BYTES);
        let root = self.dir.join(&token);
        std::fs::create_dir(&root).map_err(io("create", &root))?;
        let result = self.fill(&root, &token, bytes);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&root);
        }
        result
    }

    fn fill(&self, root: &Path, token: &str, bytes: &[u8]) -> Result<Uploaded, SourceError> {
        let bundle = root.join("upload.bundle");
        std::fs::write(&bundle, bytes).map_err(io("write", &bundle))?;
        let repo = root.join(REPO);
        let bundle_arg = bundle.to_string_lossy().into_owned();
        git(
            root,
            &["init", "-q", "--bare", "--initial-branch=main", REPO],
            &ISOLATED,
        )?;
        let refspec = format!("{BRANCH}:{BRANCH}");
        git(
            &repo,
            &["fetch", "-q", "--no-tags", &bundle_arg, &refspec],
            &ISOLATED,
        )
        .map_err(|e| SourceError::BadBundle {
            reason: match e {
                SourceError::Git { stderr, .. } => stderr,
                other => other.to_string(),
            },
        })?;
        std::fs::remove_file(&bundle).map_err(io("remove", &bundle))?;
        git(&repo, &["update-server-info"], &ISOLATED)?;
        let commit_sha = git(&repo, &["rev-parse", "--verify", BRANCH], &ISOLATED)?;
        self.write_meta(
            root,
            &Meta {
                commit_sha: commit_sha.clone(),
                created_at_ms: crate::now_ms(),
                builds: Vec::new(),
            },
        )?;
        tracing::info!(
            source = token,
            commit_sha,
            bytes = bytes.len(),
            "source uploaded"
        );
        Ok(Uploaded {
            id: token.to_string(),
            repo_url: self.url(token),
            commit_sha,
        })
    }

    fn read_meta(&self, root: &Path) -> Result<Meta, SourceError> {
        let path = root.join(META);
        let text = std::fs::read(&path).map_err(io("read", &path))?;
        serde_json::from_slice(&text).map_err(|source| SourceError::Meta { path, source })
    }

    fn write_meta(&self, root: &Path, meta: &Meta) -> Result<(), SourceError> {
        let path = root.join(META);
        let tmp = root.join(format!("{META}.tmp"));
        let json = serde_json::to_vec(meta).expect("source metadata serializes");
        std::fs::write(&tmp, json).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("replace", &path))
    }

    /// Records that build `build_id` clones `repo_url`, when that is one of these sources, so
    /// the source is kept until the build ends.
    pub fn register(&self, repo_url: &str, build_id: &str) -> Result<(), SourceError> {
        let Some(token) = self.token_of(repo_url) else {
            return Ok(());
        };
        let _guard = self.meta_lock.lock().unwrap_or_else(|e| e.into_inner());
        let root = self.dir.join(&token);
        let mut meta = self.read_meta(&root)?;
        meta.builds.push(build_id.to_string());
        self.write_meta(&root, &meta)
    }

    /// The file of source `token` at `path` inside its repository, when `path` is one the
    /// dumb HTTP protocol reads (refs, packs, loose objects) and it exists.
    pub fn file(&self, token: &str, path: &str) -> Option<PathBuf> {
        if !is_token(token) || !is_dumb_http_path(path) {
            return None;
        }
        let file = self.dir.join(token).join(REPO).join(path);
        file.is_file().then_some(file)
    }

    /// Removes the sources whose builds have all ended, and those no build named within
    /// [`UNUSED_TTL`]; returns how many it removed.
    pub async fn sweep(&self, db: &Db) -> Result<usize, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        let mut removed = 0;
        for root in entries.filter_map(Result::ok).map(|e| e.path()) {
            let meta = {
                let _guard = self.meta_lock.lock().unwrap_or_else(|e| e.into_inner());
                self.read_meta(&root)
            };
            let (done, builds) = match meta {
                // An upload still being written, or the remains of one that failed mid-way.
                Err(_) => (age_of(&root) > UNUSED_TTL, 0),
                Ok(meta) if meta.builds.is_empty() => {
                    let age = crate::now_ms() - meta.created_at_ms;
                    (age > UNUSED_TTL.as_millis() as i64, 0)
                }
                Ok(meta) => {
                    let mut all_ended = true;
                    for id in &meta.builds {
                        if let Some(row) = db.get(id).await? {
                            all_ended &= row.state.is_terminal();
                        }
                    }
                    (all_ended, meta.builds.len())
                }
            };
            if !done {
                continue;
            }
            // Under the lock, and only if no submit registered a build on it meanwhile.
            let _guard = self.meta_lock.lock().unwrap_or_else(|e| e.into_inner());
            if self
                .read_meta(&root)
                .is_ok_and(|now| now.builds.len() != builds)
            {
                continue;
            }
            std::fs::remove_dir_all(&root).map_err(io("remove", &root))?;
            tracing::info!(source = %root.display(), "source removed");
            removed += 1;
        }
        Ok(removed)
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until the task is aborted.
    pub async fn sweep_forever(self: Arc<Self>, db: Db) {
        loop {
            tokio::time::sleep(SWEEP_INTERVAL).await;
            if let Err(e) = self.sweep(&db).await {
                tracing::warn!(error = crate::error_chain(&e), "source sweep failed");
            }
        }
    }
}

/// How long ago `path` was last modified (zero when unknown).
fn age_of(path: &Path) -> Duration {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default()
}

/// The files git's dumb HTTP client asks for: `HEAD`, `info/refs`, `objects/info/packs`,
/// `objects/info/{alternates,http-alternates}`, loose objects and packs. Nothing else of the
/// repository (config, hooks, index) is served.
fn is_dumb_http_path(path: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return false;
    }
    match path.split('/').collect::<Vec<_>>()[..] {
        ["HEAD"] | ["info", "refs"] => true,
        ["objects", "info", "packs" | "alternates" | "http-alternates"] => true,
        ["objects", "pack", name] => name
            .strip_prefix("pack-")
            .and_then(|n| n.strip_suffix(".pack").or_else(|| n.strip_suffix(".idx")))
            .is_some_and(|h| hex(h, 40) || hex(h, 64)),
        ["objects", dir, file] => hex(dir, 2) && (hex(file, 38) || hex(file, 62)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_dumb_protocol_files_are_served() {
        for ok in [
            "HEAD",
            "info/refs",
            "objects/info/packs",
            "objects/ab/0123456789012345678901234567890123456a",
            "objects/pack/pack-0123456789012345678901234567890123456789.pack",
            "objects/pack/pack-0123456789012345678901234567890123456789.idx",
        ] {
            assert!(is_dumb_http_path(ok), "{ok}");
        }
        for bad in [
            "config",
            "hooks/pre-receive",
            "../source.json",
            "objects/../config",
            "/etc/passwd",
            "info/refs/",
            "objects/pack/pack-x.pack",
            "objects/zz/0123456789012345678901234567890123456a",
            "",
        ] {
            assert!(!is_dumb_http_path(bad), "{bad}");
        }
        assert!(is_token("0123456789abcdef0123456789abcdef"));
        assert!(!is_token("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_token("../x"));
    }
}
