//! Build credentials: the values of a request's build secrets (`RUN --mount=type=secret`), git
//! token and registry logins. They never reach the database, the node's logs, events or API
//! answers; the database keeps only their names ([`CredentialNames`]). From admission until the
//! build ends the values are in one file per build, `<work_dir>/credentials/<id>.json` (mode
//! 0600, in a directory of mode 0700), which the supervisor reads when it starts the VM (they go
//! onto its config drive) and which is removed as soon as the build is terminal: by
//! [`crate::node::Node::finish`], and by [`CredentialStore::sweep`] at start and every
//! [`SWEEP_INTERVAL`] for builds that ended elsewhere (a queued build cancelled through another
//! node) or that the database does not know.
//!
//! Only the node that holds the file can start such a build, so the database pins it to the
//! node that accepted it (`pinned_node`, see [`crate::db::Db::claim`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use builder_contract::{RegistryCredentials, Secrets};
use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError};

/// How often files of builds that ended elsewhere are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How old a file whose build the database does not know must be before a running node's sweep
/// removes it (the file is written just before the build's row is inserted).
const UNKNOWN_GRACE: Duration = Duration::from_secs(60);

/// A value that must not be shown: serialized as itself, printed by `Debug` as `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(pub String);

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One registry login of a request (`registry_auths`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    pub username: String,
    pub password: SecretValue,
}

/// The credential values of one build, as its file holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_secrets: BTreeMap<String, SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_token: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_username: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registry_auths: BTreeMap<String, RegistryLogin>,
}

/// What the database and the API keep of a build's credentials: names, never values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialNames {
    /// Ids of the build secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_ids: Vec<String>,
    /// Registries a login was given for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_hosts: Vec<String>,
    /// Whether a git token was given.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub git_token: bool,
}

impl CredentialNames {
    pub fn is_empty(&self) -> bool {
        self.secret_ids.is_empty() && self.registry_hosts.is_empty() && !self.git_token
    }
}

impl Credentials {
    pub fn is_empty(&self) -> bool {
        self.build_secrets.is_empty() && self.git_token.is_none() && self.registry_auths.is_empty()
    }

    pub fn names(&self) -> CredentialNames {
        CredentialNames {
            secret_ids: self.build_secrets.keys().cloned().collect(),
            registry_hosts: self.registry_auths.keys().cloned().collect(),
            git_token: self.git_token.is_some(),
        }
    }

    /// Puts the values into the VM's secrets file.
    pub fn add_to(self, secrets: &mut Secrets) {
        secrets.build_secrets = self
            .build_secrets
            .into_iter()
            .map(|(id, value)| (id, value.0))
            .collect();
        secrets.registry_auths = self
            .registry_auths
            .into_iter()
            .map(|(host, login)| {
                let credentials = RegistryCredentials {
                    username: login.username,
                    password: login.password.0,
                };
                (host, credentials)
            })
            .collect();
        secrets.git_token = self.git_token.map(|t| t.0);
        secrets.git_username = self.git_username;
    }

    /// Every non-empty value, for [`scrub`].
    pub fn values(&self) -> Vec<&str> {
        self.build_secrets
            .values()
            .chain(self.git_token.iter())
            .chain(self.registry_auths.values().map(|l| &l.password))
            .map(|v| v.0.as_str())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

/// `text` with every one of `values` replaced by `***`.
pub fn scrub(text: &str, values: &[&str]) -> String {
    let mut text = text.to_string();
    for value in values {
        if text.contains(value) {
            text = text.replace(value, "***");
        }
    }
    text
}

/// Why a credentials file could not be written, read or removed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot {action} the credentials file {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the credentials file {path} is not valid")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the database failed while sweeping credentials files")]
    Db(#[from] DbError),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CredentialError {
    let path = path.to_path_buf();
    move |source| CredentialError::Io {
        action,
        path,
        source,
    }
}

/// The per-build credentials files of this node.
#[derive(Debug)]
pub struct CredentialStore {
    dir: PathBuf,
}

impl CredentialStore {
    /// The files in `dir`, created with mode 0700 (and set to it when it exists).
    pub fn new(dir: PathBuf) -> Result<Self, CredentialError> {
        std::fs::create_dir_all(&dir).map_err(io("create the directory of", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restrict the directory of", &dir))?;
        Ok(CredentialStore { dir })
    }

    fn path(&self, build_id: &str) -> PathBuf {
        self.dir.join(format!("{build_id}.json"))
    }

    /// Writes the file of `build_id` (mode 0600, replaced atomically).
    pub fn write(&self, build_id: &str, credentials: &Credentials) -> Result<(), CredentialError> {
        let path = self.path(build_id);
        let tmp = self.dir.join(format!("{build_id}.json.tmp"));
        let json = serde_json::to_vec(credentials).expect("credentials serialize");
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()));
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(CredentialError::Io {
                action: "write",
                path: tmp,
                source,
            });
        }
        std::fs::rename(&tmp, &path).map_err(io("replace", &path))
    }

    /// The credentials of `build_id`; `None` when it has no file here.
    pub fn read(&self, build_id: &str) -> Result<Option<Credentials>, CredentialError> {
        let path = self.path(build_id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CredentialError::Io {
                    action: "read",
                    path,
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CredentialError::Json { path, source })
    }

    /// Removes the file of `build_id`; true when there was one.
    pub fn remove(&self, build_id: &str) -> Result<bool, CredentialError> {
        let path = self.path(build_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(CredentialError::Io {
                action: "remove",
                path,
                source,
            }),
        }
    }

    /// Removes the files of terminal builds, and of builds the database does not know when the
    /// file is older than `unknown_after` (zero at start, before the API takes requests);
    /// returns how many it removed.
    pub async fn sweep(&self, db: &Db, unknown_after: Duration) -> Result<usize, CredentialError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        let mut removed = 0;
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let build_id = name
                .strip_suffix(".json.tmp")
                .or_else(|| name.strip_suffix(".json"))
                .unwrap_or(name);
            let remove = match db.get(build_id).await? {
                Some(row) => row.state.is_terminal(),
                None => age_of(&path) >= unknown_after,
            };
            if remove {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(CredentialError::Io {
                            action: "remove",
                            path,
                            source,
                        })
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until the task is aborted.
    pub async fn sweep_forever(&self, db: Db) {
        loop {
            tokio::time::sleep(SWEEP_INTERVAL).await;
            match self.sweep(&db, UNKNOWN_GRACE).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "credentials files of ended builds removed"),
                Err(e) => {
                    tracing::warn!(error = crate::error_chain(&e), "credentials sweep failed")
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_stay_out_of_debug_and_are_scrubbed() {
        let credentials = Credentials {
            build_secrets: BTreeMap::from([("npm".into(), SecretValue("NPM-VALUE".into()))]),
            git_token: Some(SecretValue("GIT-VALUE".into())),
            git_username: Some("bot".into()),
            registry_auths: BTreeMap::from([(
                "registry.example:5000".into(),
                RegistryLogin {
                    username: "u".into(),
                    password: SecretValue("REG-VALUE".into()),
                },
            )]),
        };
        let debug = format!("{credentials:?}");
        for value in credentials.values() {
            assert!(!debug.contains(value), "{debug}");
        }
        assert_eq!(
            scrub("a NPM-VALUE b REG-VALUE", &credentials.values()),
            "a *** b ***"
        );
        let names = credentials.names();
        assert_eq!(names.secret_ids, ["npm"]);
        assert_eq!(names.registry_hosts, ["registry.example:5000"]);
        assert!(names.git_token);
        let mut secrets = Secrets::default();
        credentials.add_to(&mut secrets);
        assert_eq!(secrets.build_secrets["npm"], "NPM-VALUE");
        assert_eq!(
            secrets.registry_auths["registry.example:5000"].password,
            "REG-VALUE"
        );
        assert_eq!(secrets.git_token.as_deref(), Some("GIT-VALUE"));
        assert_eq!(secrets.git_username.as_deref(), Some("bot"));
    }

    #[test]
    fn files_are_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::new(dir.path().join("credentials")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("credentials")), 0o700);
        let credentials = Credentials {
            git_token: Some(SecretValue("t".into())),
            ..Default::default()
        };
        store.write("b1", &credentials).unwrap();
        assert_eq!(mode(&store.path("b1")), 0o600);
        assert_eq!(store.read("b1").unwrap(), Some(credentials));
        assert!(store.remove("b1").unwrap());
        assert_eq!(store.read("b1").unwrap(), None);
        assert!(!store.remove("b1").unwrap());
    }
}
