//! Who calls the API and what they may do. Every API token is a requester: the `api_token_file`
//! token is the admin (requester `api`, any bucket, any webhook host), and the tokens file
//! (`api_tokens_file`, written by `node-agent token add|remove`) holds scoped ones, each with
//! its name (the requester of every build it submits), the SHA-256 of the token (never the
//! token), the buckets and key prefixes it may write, the webhook hosts it may call, whether it
//! is an admin, and its own webhook key (the node signs its builds' webhooks with it, so no
//! requester can sign a webhook another one trusts).
//!
//! [`Tokens`] answers for the daemon: it re-reads the file when it changes (so `token add` and
//! `token remove` need no restart), refuses the file's tokens while it is invalid or readable
//! by others, and compares the hash of a presented token with every known hash in constant
//! time. [`Caller`] is an authenticated token and its scope checks; [`TokensFile`] the file
//! itself, as the CLI edits it (under a lock, written whole and renamed, mode 0600).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::model::BuildRequest;

/// The requester of the `api_token_file` token (and of builds submitted before scopes).
pub const ADMIN_REQUESTER: &str = "api";
/// The beginning of every token `token add` makes, so one is recognisable in a leak scan.
const TOKEN_PREFIX: &str = "nat_";
/// The longest token name.
const MAX_NAME_BYTES: usize = 64;

/// A token's name: the requester of the builds it submits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenName(String);

impl TokenName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TokenName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TokenName {
    type Error = TokenError;

    /// 1 to 64 of `A-Z a-z 0-9 . _ @ -`, not starting with a punctuation mark, and not the
    /// admin token's own name.
    fn try_from(name: String) -> Result<Self, TokenError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'));
        if !valid {
            return Err(TokenError::Name { name });
        }
        if name == ADMIN_REQUESTER {
            return Err(TokenError::ReservedName { name });
        }
        Ok(TokenName(name))
    }
}

impl From<TokenName> for String {
    fn from(name: TokenName) -> String {
        name.0
    }
}

/// Where a token may write: a bucket (`*`: any) and a key prefix (empty: any key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BucketScope {
    bucket: String,
    prefix: String,
}

impl TryFrom<String> for BucketScope {
    type Error = TokenError;

    /// `BUCKET`, `BUCKET/PREFIX` or `*`.
    fn try_from(text: String) -> Result<Self, TokenError> {
        let (bucket, prefix) = text.split_once('/').unwrap_or((&text, ""));
        let bad = |reason: &str| TokenError::Bucket {
            value: text.clone(),
            reason: reason.to_string(),
        };
        if bucket == "*" {
            if !prefix.is_empty() {
                return Err(bad("`*` (any bucket) takes no prefix"));
            }
        } else if bucket.is_empty()
            || !bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        {
            return Err(bad(
                "the bucket must be lower-case letters, digits, `.` and `-`",
            ));
        }
        if prefix.starts_with('/') {
            return Err(bad("the key prefix starts with `/`"));
        }
        Ok(BucketScope {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl From<BucketScope> for String {
    fn from(scope: BucketScope) -> String {
        if scope.prefix.is_empty() {
            scope.bucket
        } else {
            format!("{}/{}", scope.bucket, scope.prefix)
        }
    }
}

impl BucketScope {
    fn any() -> Self {
        BucketScope {
            bucket: "*".into(),
            prefix: String::new(),
        }
    }

    fn covers_bucket(&self, bucket: &str) -> bool {
        self.bucket == "*" || self.bucket == bucket
    }
}

/// A webhook host a token may call: `HOST` (any port), `HOST:PORT`, or `*` (any host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostScope {
    host: String,
    port: Option<u16>,
}

impl TryFrom<String> for HostScope {
    type Error = TokenError;

    fn try_from(text: String) -> Result<Self, TokenError> {
        if text == "*" {
            return Ok(HostScope {
                host: text,
                port: None,
            });
        }
        let bad = || TokenError::NotifyHost {
            value: text.clone(),
        };
        // Parsed as a URL's authority, so the host is spelled as `Url::host_str` spells it.
        let url = Url::parse(&format!("http://{text}/")).map_err(|_| bad())?;
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        let port = match url.port() {
            Some(port) => Some(port),
            // `Url` drops a scheme's default port; it was given all the same.
            None if text.ends_with(":80") => Some(80),
            None => None,
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad());
        }
        Ok(HostScope {
            host: host.to_string(),
            port,
        })
    }
}

impl From<HostScope> for String {
    fn from(scope: HostScope) -> String {
        match scope.port {
            Some(port) => format!("{}:{port}", scope.host),
            None => scope.host,
        }
    }
}

impl HostScope {
    fn any() -> Self {
        HostScope {
            host: "*".into(),
            port: None,
        }
    }

    fn covers(&self, url: &Url) -> bool {
        self.host == "*"
            || (url.host_str() == Some(self.host.as_str())
                && self
                    .port
                    .is_none_or(|port| url.port_or_known_default() == Some(port)))
    }
}

/// One token of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: TokenName,
    /// Hex SHA-256 of the token; the token itself is nowhere on the node.
    pub sha256: String,
    /// Hex key the node signs this requester's webhooks with.
    pub webhook_key: String,
    /// All builds, cancelling any, the dashboard, requests naming another requester.
    #[serde(default)]
    pub admin: bool,
    /// Where its builds may upload (`s3_bucket` and a prefix of `s3_key`).
    #[serde(default)]
    pub buckets: Vec<BucketScope>,
    /// The hosts its `notify_url`s may name.
    #[serde(default)]
    pub notify_hosts: Vec<HostScope>,
    /// The build-cache namespace of its builds (default: its name); tokens given the same one
    /// share their caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_namespace: Option<TokenName>,
}

/// The webhook key of a removed token, kept so the webhooks of its builds still pending are
/// signed with their requester's key (not the node's) until a new token takes the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredKey {
    pub name: TokenName,
    pub webhook_key: String,
}

/// The tokens file: `[[token]]` tables of [`TokenEntry`], and `[[retired]]` webhook keys of
/// removed tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
    #[serde(default, rename = "retired", skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<RetiredKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the token name {name:?} is not valid: 1 to 64 letters, digits, `.`, `_`, `@` or `-`, \
         starting with a letter or digit"
    )]
    Name { name: String },
    #[error("the token name {name:?} is the `api_token_file` token's own requester")]
    ReservedName { name: String },
    #[error("--bucket {value:?} is not valid: {reason}")]
    Bucket { value: String, reason: String },
    #[error("--notify-host {value:?} is not HOST, HOST:PORT or `*`")]
    NotifyHost { value: String },
    #[error("the tokens file {path} already has a token named {name} (give --replace to issue it a new token and webhook key)")]
    Exists { path: PathBuf, name: TokenName },
    #[error("the tokens file {path} has no token named {name}")]
    Unknown { path: PathBuf, name: String },
    #[error("cannot read the tokens file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "the tokens file {path} has mode {mode:o}: it holds webhook keys, so it must be \
         readable by its owner only (chmod 600)"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("the tokens file {path} has a token entry {name} whose `sha256` is not 64 hex digits")]
    Hash { path: PathBuf, name: TokenName },
    #[error("the tokens file {path} names {name} twice")]
    Twice { path: PathBuf, name: TokenName },
    #[error("cannot write the tokens file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A request outside its token's scope: 403, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token {token} may not do this: `{field}` {reason}")]
pub struct ScopeError {
    pub token: String,
    pub field: &'static str,
    pub reason: String,
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Whether two hashes are equal, in a time that does not depend on where they differ.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An authenticated token: its requester, rights and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub admin: bool,
    buckets: Vec<BucketScope>,
    notify_hosts: Vec<HostScope>,
    /// The namespace of its build caches: its token's `cache_namespace`, else its name.
    pub cache_namespace: String,
    /// The HMAC key of its dashboard sessions: the token's hash, which only the node has.
    session_key: [u8; 32],
}

impl Caller {
    /// Whether this caller may see build rows of `requester`.
    pub fn sees(&self, requester: &str) -> bool {
        self.admin || self.name == requester
    }

    /// The key of this caller's dashboard sessions.
    pub fn session_key(&self) -> &[u8; 32] {
        &self.session_key
    }

    /// The requester a build this caller submits gets: its own name; an admin may name
    /// another. A non-admin naming another requester is refused.
    pub fn requester_of(&self, request: &BuildRequest) -> Result<String, ScopeError> {
        match &request.requester {
            None => Ok(self.name.clone()),
            Some(r) if *r == self.name || self.admin => Ok(r.clone()),
            Some(r) => Err(self.refuse(
                "requester",
                format!("is {r:?}, but this token submits as {:?} only", self.name),
            )),
        }
    }

    fn refuse(&self, field: &'static str, reason: String) -> ScopeError {
        ScopeError {
            token: self.name.clone(),
            field,
            reason,
        }
    }

    /// Refuses a request whose output or webhook lies outside this token's scope.
    pub fn check_scope(&self, request: &BuildRequest) -> Result<(), ScopeError> {
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(", ")
            }
        };
        if let Some(bucket) = &request.s3_bucket {
            let scopes: Vec<&BucketScope> = self
                .buckets
                .iter()
                .filter(|s| s.covers_bucket(bucket))
                .collect();
            if scopes.is_empty() {
                return Err(self.refuse(
                    "s3_bucket",
                    format!(
                        "{bucket:?} is not a bucket it may write to (it may: {})",
                        list(self.buckets.iter().cloned().map(String::from).collect())
                    ),
                ));
            }
            let key = request.s3_key.as_deref().unwrap_or("");
            if !scopes.iter().any(|s| key.starts_with(&s.prefix)) {
                return Err(self.refuse(
                    "s3_key",
                    format!(
                        "{key:?} is not under a key prefix it may write to in {bucket} (it may: \
                         {})",
                        list(scopes.iter().map(|s| format!("{:?}", s.prefix)).collect())
                    ),
                ));
            }
        }
        if let Some(url) = &request.notify_url {
            let covered =
                Url::parse(url).is_ok_and(|url| self.notify_hosts.iter().any(|h| h.covers(&url)));
            if !covered {
                return Err(self.refuse(
                    "notify_url",
                    format!(
                        "names a host it may not send webhooks to (it may: {})",
                        list(
                            self.notify_hosts
                                .iter()
                                .cloned()
                                .map(String::from)
                                .collect()
                        )
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl TokenEntry {
    fn caller(&self, session_key: [u8; 32]) -> Caller {
        Caller {
            name: self.name.to_string(),
            admin: self.admin,
            buckets: self.buckets.clone(),
            notify_hosts: self.notify_hosts.clone(),
            cache_namespace: self.cache_namespace().to_string(),
            session_key,
        }
    }

    /// The namespace of this token's build caches: `cache_namespace`, else its name.
    fn cache_namespace(&self) -> &str {
        self.cache_namespace.as_ref().unwrap_or(&self.name).as_str()
    }
}

/// The file's entries with their hashes decoded, as the daemon checks them.
#[derive(Debug, Default)]
struct Loaded {
    entries: Vec<(TokenEntry, [u8; 32])>,
    retired: Vec<RetiredKey>,
}

/// What identifies a version of the file: its contents' SHA-256 and its mode (timestamps and
/// inode numbers can repeat within a clock tick; the file is small and read on every check).
type Stamp = Option<([u8; 32], u32)>;

struct Cache {
    stamp: Stamp,
    loaded: Arc<Loaded>,
}

/// The daemon's tokens: the admin token of `api_token_file` and the tokens file, re-read
/// whenever it changes.
pub struct Tokens {
    path: PathBuf,
    admin: Caller,
    cache: Mutex<Option<Cache>>,
}

impl Tokens {
    pub fn new(path: PathBuf, admin_token: &str) -> Self {
        Tokens {
            path,
            admin: Caller {
                name: ADMIN_REQUESTER.to_string(),
                admin: true,
                buckets: vec![BucketScope::any()],
                notify_hosts: vec![HostScope::any()],
                cache_namespace: ADMIN_REQUESTER.to_string(),
                session_key: sha256(admin_token),
            },
            cache: Mutex::new(None),
        }
    }

    /// The file's tokens as of now: re-read when its stamp changed; none while it is missing,
    /// invalid or readable by others (the error is logged once per version of the file).
    fn loaded(&self) -> Arc<Loaded> {
        let stamp = std::fs::read(&self.path).ok().map(|bytes| {
            let mode = std::fs::metadata(&self.path).map_or(0, |m| m.permissions().mode());
            (Sha256::digest(&bytes).into(), mode)
        });
        let mut cache = self.cache.lock().expect("tokens cache lock");
        if let Some(c) = cache.as_ref().filter(|c| c.stamp == stamp) {
            return c.loaded.clone();
        }
        let loaded = match stamp.map(|_| TokensFile::load(&self.path)) {
            None => Loaded::default(),
            Some(Ok(file)) => Loaded {
                retired: file.retired,
                entries: file
                    .tokens
                    .into_iter()
                    .filter_map(|e| {
                        let hash = hex::decode(&e.sha256).ok()?.try_into().ok()?;
                        Some((e, hash))
                    })
                    .collect(),
            },
            Some(Err(e)) => {
                tracing::error!(
                    error = crate::error_chain(&e),
                    "the tokens file is refused: none of its tokens is accepted until it is fixed"
                );
                Loaded::default()
            }
        };
        let loaded = Arc::new(loaded);
        *cache = Some(Cache {
            stamp,
            loaded: loaded.clone(),
        });
        loaded
    }

    /// The caller `token` authenticates, if any. Its hash is compared with every known hash,
    /// each comparison in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        let given = sha256(token);
        let loaded = self.loaded();
        let mut found = None;
        if same_hash(&given, &self.admin.session_key) {
            found = Some(self.admin.clone());
        }
        for (entry, hash) in &loaded.entries {
            if same_hash(&given, hash) && found.is_none() {
                found = Some(entry.caller(*hash));
            }
        }
        found
    }

    /// The admin caller `name` of a dashboard session, if it (still) is one.
    pub fn admin_named(&self, name: &str) -> Option<Caller> {
        if name == ADMIN_REQUESTER {
            return Some(self.admin.clone());
        }
        self.loaded()
            .entries
            .iter()
            .find(|(e, _)| e.admin && e.name.as_str() == name)
            .map(|(e, hash)| e.caller(*hash))
    }

    /// The namespace of `requester`'s build caches: its token's `cache_namespace`, else the
    /// requester itself (also for a requester without a token, such as the admin's).
    pub fn cache_namespace(&self, requester: &str) -> String {
        self.loaded()
            .entries
            .iter()
            .find(|(e, _)| e.name.as_str() == requester)
            .map_or(requester, |(e, _)| e.cache_namespace())
            .to_string()
    }

    /// The key that signs webhooks of `requester`'s builds: its token's own (or, once the
    /// token is removed, the key it had), or `None` for a requester that never had a token
    /// (the admin's builds: the node's notify secret).
    pub fn webhook_key(&self, requester: &str) -> Option<String> {
        let loaded = self.loaded();
        let current = loaded
            .entries
            .iter()
            .find(|(e, _)| e.name.as_str() == requester)
            .map(|(e, _)| &e.webhook_key);
        let retired = || {
            loaded
                .retired
                .iter()
                .find(|r| r.name.as_str() == requester)
                .map(|r| &r.webhook_key)
        };
        current.or_else(retired).cloned()
    }
}

/// A token as `token add` hands it out, once.
#[derive(Debug)]
pub struct Issued {
    pub token: String,
    pub webhook_key: String,
}

impl TokensFile {
    /// Reads and checks the file (mode 0600 or stricter, unique names, hashes).
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Mode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let file: TokensFile = toml::from_str(&text).map_err(|source| TokenError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let mut names = std::collections::HashSet::new();
        for e in &file.tokens {
            if !names.insert(&e.name) {
                return Err(TokenError::Twice {
                    path: path.to_path_buf(),
                    name: e.name.clone(),
                });
            }
            if e.sha256.len() != 64 || hex::decode(&e.sha256).is_err() {
                return Err(TokenError::Hash {
                    path: path.to_path_buf(),
                    name: e.name.clone(),
                });
            }
        }
        Ok(file)
    }

    /// The file, or an empty one when it does not exist yet.
    fn load_or_empty(path: &Path) -> Result<Self, TokenError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokensFile::default()),
            _ => TokensFile::load(path),
        }
    }

    /// Runs `change` on the file under an exclusive lock (`PATH.lock`) and writes the result
    /// whole (a temporary file, mode 0600, synced, renamed over the file).
    pub fn edit<T>(
        path: &Path,
        change: impl FnOnce(&mut TokensFile) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let write = |source| TokenError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(write)?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(write)?;
        flock(&lock).map_err(write)?;
        let mut file = TokensFile::load_or_empty(path)?;
        let answer = change(&mut file)?;
        let text = toml::to_string(&file).expect("the tokens file serializes to TOML");
        let mut tmp_path = path.as_os_str().to_owned();
        tmp_path.push(".tmp");
        let tmp_path = PathBuf::from(tmp_path);
        let _ = std::fs::remove_file(&tmp_path);
        let mut tmp = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(write)?;
        tmp.write_all(text.as_bytes()).map_err(write)?;
        tmp.sync_all().map_err(write)?;
        std::fs::rename(&tmp_path, path).map_err(write)?;
        Ok(answer)
    }

    /// `token add`: a new entry (or, with `replace`, a new token and webhook key for an
    /// existing name); the token and key are returned to be shown once.
    pub fn add(
        path: &Path,
        name: TokenName,
        admin: bool,
        buckets: Vec<BucketScope>,
        notify_hosts: Vec<HostScope>,
        cache_namespace: Option<TokenName>,
        replace: bool,
    ) -> Result<Issued, TokenError> {
        TokensFile::edit(path, |file| {
            if let Some(i) = file.tokens.iter().position(|e| e.name == name) {
                if !replace {
                    return Err(TokenError::Exists {
                        path: path.to_path_buf(),
                        name,
                    });
                }
                file.tokens.remove(i);
            }
            // The new key supersedes a removed token's.
            file.retired.retain(|r| r.name != name);
            let issued = Issued {
                token: format!("{TOKEN_PREFIX}{}", crate::random_hex(32)),
                webhook_key: crate::random_hex(32),
            };
            file.tokens.push(TokenEntry {
                name,
                sha256: hex::encode(sha256(&issued.token)),
                webhook_key: issued.webhook_key.clone(),
                admin,
                buckets,
                notify_hosts,
                cache_namespace,
            });
            Ok(issued)
        })
    }

    /// `token remove`: the token stops working; its webhook key is kept as retired.
    pub fn remove(path: &Path, name: &str) -> Result<(), TokenError> {
        TokensFile::edit(path, |file| {
            let Some(i) = file.tokens.iter().position(|e| e.name.as_str() == name) else {
                return Err(TokenError::Unknown {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                });
            };
            let removed = file.tokens.remove(i);
            file.retired.retain(|r| r.name != removed.name);
            file.retired.push(RetiredKey {
                name: removed.name,
                webhook_key: removed.webhook_key,
            });
            Ok(())
        })
    }

    /// `token list`: the entries (their secrets are for the node only).
    pub fn list(path: &Path) -> Result<Vec<TokenEntry>, TokenError> {
        Ok(TokensFile::load_or_empty(path)?.tokens)
    }
}

/// Takes an exclusive lock on `file`, waiting for it.
fn flock(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a descriptor this process owns (`file` outlives the call) and a
    // plain integer operation; it touches no memory of ours.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> BuildRequest {
        serde_json::from_value(json).unwrap()
    }

    fn caller(buckets: &[&str], hosts: &[&str]) -> Caller {
        TokenEntry {
            name: TokenName::try_from("alice".to_string()).unwrap(),
            sha256: String::new(),
            webhook_key: String::new(),
            admin: false,
            buckets: buckets
                .iter()
                .map(|b| BucketScope::try_from(b.to_string()).unwrap())
                .collect(),
            notify_hosts: hosts
                .iter()
                .map(|h| HostScope::try_from(h.to_string()).unwrap())
                .collect(),
            cache_namespace: None,
        }
        .caller([0; 32])
    }

    #[test]
    fn scopes_name_the_field_outside_them() {
        let c = caller(
            &["rootfs/alice/", "shared"],
            &["hooks.alice.example", "127.0.0.1:8080"],
        );
        let field = |json: serde_json::Value| {
            let mut body = serde_json::json!({"repo_url": "https://g/r", "ref": "main"});
            for (k, v) in json.as_object().unwrap() {
                body[k] = v.clone();
            }
            c.check_scope(&request(body)).err().map(|e| e.field)
        };
        assert_eq!(
            field(serde_json::json!({"s3_bucket": "rootfs", "s3_key": "alice/x"})),
            None
        );
        assert_eq!(
            field(serde_json::json!({"s3_bucket": "shared", "s3_key": "any/x"})),
            None
        );
        assert_eq!(
            field(serde_json::json!({"s3_bucket": "other", "s3_key": "alice/x"})),
            Some("s3_bucket")
        );
        assert_eq!(
            field(serde_json::json!({"s3_bucket": "rootfs", "s3_key": "bob/x"})),
            Some("s3_key")
        );
        for (url, allowed) in [
            ("https://hooks.alice.example/h", true),
            ("http://HOOKS.alice.example:9000/h", true),
            ("http://127.0.0.1:8080/h", true),
            ("http://127.0.0.1:8081/h", false),
            ("http://hooks.alice.example.evil/h", false),
            ("http://evil/hooks.alice.example", false),
        ] {
            let got = field(serde_json::json!({"notify_url": url}));
            assert_eq!(got.is_none(), allowed, "{url}");
            if !allowed {
                assert_eq!(got, Some("notify_url"));
            }
        }
    }

    #[test]
    fn only_admins_name_another_requester() {
        let mut c = caller(&[], &[]);
        let named =
            |r: &str| request(serde_json::json!({"repo_url": "https://g/r", "requester": r}));
        assert_eq!(c.requester_of(&named("alice")).unwrap(), "alice");
        assert_eq!(
            c.requester_of(&named("bob")).unwrap_err().field,
            "requester"
        );
        c.admin = true;
        assert_eq!(c.requester_of(&named("bob")).unwrap(), "bob");
    }

    #[test]
    fn names_and_scopes_are_checked() {
        for bad in ["", "api", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(TokenName::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
        for bad in ["", "Bad_Bucket", "*/x", "b//x"] {
            assert!(BucketScope::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
        for bad in ["", "a b", "user@host", "h:99999"] {
            assert!(HostScope::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_file_keeps_hashes_and_is_re_read_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let tokens = Tokens::new(path.clone(), "legacy");
        assert_eq!(tokens.authenticate("legacy").unwrap().name, ADMIN_REQUESTER);
        let name = TokenName::try_from("alice".to_string()).unwrap();
        let issued =
            TokensFile::add(&path, name.clone(), false, vec![], vec![], None, false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&issued.token), "the token is stored: {text}");
        assert!(text.contains(&issued.webhook_key));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(tokens.authenticate(&issued.token).unwrap().name, "alice");
        assert!(tokens.authenticate("nat_wrong").is_none());
        assert_eq!(
            tokens.webhook_key("alice"),
            Some(issued.webhook_key.clone())
        );
        assert_eq!(tokens.webhook_key("never-had-one"), None);
        // Build caches: its own namespace, unless it is given one to share.
        assert_eq!(tokens.cache_namespace("alice"), "alice");
        assert_eq!(tokens.cache_namespace(ADMIN_REQUESTER), ADMIN_REQUESTER);
        let team = TokenName::try_from("team".to_string()).unwrap();
        let bot = TokensFile::add(
            &path,
            TokenName::try_from("bot".to_string()).unwrap(),
            false,
            vec![],
            vec![],
            Some(team),
            false,
        )
        .unwrap();
        assert_eq!(tokens.cache_namespace("bot"), "team");
        assert_eq!(
            tokens.authenticate(&bot.token).unwrap().cache_namespace,
            "team"
        );
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("cache_namespace = \"team\""));
        assert!(matches!(
            TokensFile::add(&path, name, false, vec![], vec![], None, false),
            Err(TokenError::Exists { .. })
        ));
        // Readable by others: refused as a whole.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(tokens.authenticate(&issued.token).is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(tokens.authenticate(&issued.token).is_some());
        TokensFile::remove(&path, "alice").unwrap();
        assert!(tokens.authenticate(&issued.token).is_none());
        // Its builds' pending webhooks are still signed with its key, until the name is
        // issued again.
        assert_eq!(
            tokens.webhook_key("alice"),
            Some(issued.webhook_key.clone())
        );
        let again = TokensFile::add(
            &path,
            TokenName::try_from("alice".to_string()).unwrap(),
            false,
            vec![],
            vec![],
            None,
            false,
        )
        .unwrap();
        assert_eq!(tokens.webhook_key("alice"), Some(again.webhook_key));
        assert!(TokensFile::load(&path).unwrap().retired.is_empty());
        TokensFile::remove(&path, "alice").unwrap();
        assert!(matches!(
            TokensFile::remove(&path, "alice"),
            Err(TokenError::Unknown { .. })
        ));
    }
}
