//! Secrets: what a build needs that must never appear on the kernel command line.
//!
//! Every process in the builder VM can read `/proc/cmdline`, so credentials travel in a JSON file
//! instead: `--secrets FILE` on a host, a read-only config drive inside the VM. Every field is
//! optional. [`Secrets::redaction_values`] lists the strings a log must never show.
//!
//! Besides credentials, the file carries what a build's `RUN --mount=type=secret` steps read
//! (`build_secrets`), registry logins for private `FROM` images (`registry_auths`), and, when
//! they do not fit the kernel command line, the build args (`build_args`: not secret, but the
//! config drive is the VM's only other channel).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::params::BuildArgs;

/// Credentials and endpoint of the S3-compatible store the rootfs is uploaded to: the node
/// agent's own (`s3_credentials_file`), and a host run's (`builder-agent run --secrets`,
/// `builder-agent upload`). A builder VM never gets them: its node grants it each request of
/// its one upload ([`crate::upload`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Credentials {
    /// Base URL of the S3 API, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:8333`.
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// A login for one registry (`docker login`'s user name and password or token).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

/// The secrets file.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    #[serde(default)]
    pub s3: Option<S3Credentials>,
    /// Key of the HMAC-SHA256 signature on the completion webhook.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// Token for cloning private repositories over HTTP(S).
    #[serde(default)]
    pub git_token: Option<String>,
    /// User name sent with `git_token` (default `x-access-token`, what GitHub and Gitea accept).
    #[serde(default)]
    pub git_username: Option<String>,
    /// Values for `RUN --mount=type=secret,id=ID`, by id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_secrets: BTreeMap<String, String>,
    /// Logins for pulling `FROM` images, by registry host (`host[:port]`; `docker.io` for
    /// Docker Hub).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registry_auths: BTreeMap<String, RegistryCredentials>,
    /// Build args the kernel command line had no room for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_args: Option<BuildArgs>,
}

/// Checks a build secret's id: what `--mount=type=secret,id=` can name and a file name can hold.
pub fn check_secret_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a secret id: 1 to 64 letters, digits, `-`, `_` or `.`, starting with \
             a letter or digit"
        ))
    }
}

/// Checks a registry host for `registry_auths`: `host` or `host:port`, as `FROM` names it.
pub fn check_registry_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(format!(
            "`{host}` is not a registry host: give `host` or `host:port` as `FROM` names it"
        ))
    }
}

/// Why the secrets file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read the secrets file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the secrets file {path} has an invalid `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

impl Secrets {
    /// Reads a secrets file.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let text = std::fs::read(path).map_err(|source| SecretsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let secrets: Secrets =
            serde_json::from_slice(&text).map_err(|source| SecretsError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        secrets
            .check()
            .map_err(|(field, reason)| SecretsError::Invalid {
                path: path.to_path_buf(),
                field,
                reason,
            })?;
        Ok(secrets)
    }

    /// Checks the ids of build secrets and the hosts of registry logins; the error names the
    /// field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for id in self.build_secrets.keys() {
            check_secret_id(id).map_err(|reason| ("build_secrets", reason))?;
        }
        for host in self.registry_auths.keys() {
            check_registry_host(host).map_err(|reason| ("registry_auths", reason))?;
        }
        Ok(())
    }

    /// Every secret value, for scrubbing logs (empty values are left out).
    pub fn redaction_values(&self) -> Vec<String> {
        let mut values = vec![];
        if let Some(s3) = &self.s3 {
            values.push(s3.secret_access_key.clone());
            values.push(s3.access_key_id.clone());
            values.extend(s3.session_token.clone());
        }
        values.extend(self.webhook_secret.clone());
        values.extend(self.git_token.clone());
        values.extend(self.build_secrets.values().cloned());
        values.extend(self.registry_auths.values().map(|c| c.password.clone()));
        values.retain(|v| !v.is_empty());
        values
    }
}

/// Secrets are never printed, not even by `{:?}`.
impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |present: bool| if present { "<set>" } else { "<unset>" };
        f.debug_struct("Secrets")
            .field("s3", &self.s3.as_ref().map(|s| &s.endpoint))
            .field("webhook_secret", &set(self.webhook_secret.is_some()))
            .field("git_token", &set(self.git_token.is_some()))
            .field(
                "build_secrets",
                &self.build_secrets.keys().collect::<Vec<_>>(),
            )
            .field(
                "registry_auths",
                &self.registry_auths.keys().collect::<Vec<_>>(),
            )
            .field("build_args", &self.build_args)
            .finish()
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refuses_unknown_fields_and_never_debug_prints_values() {
        let s: Secrets = serde_json::from_str(
            r#"{"s3":{"endpoint":"http://127.0.0.1:1","access_key_id":"AK","secret_access_key":"SK"},
                "webhook_secret":"WS","git_token":"GT"}"#,
        )
        .unwrap();
        assert_eq!(s.s3.as_ref().unwrap().region, "us-east-1");
        let debug = format!("{s:?}");
        for v in ["SK", "WS", "GT"] {
            assert!(!debug.contains(v), "{debug}");
        }
        assert_eq!(s.redaction_values(), ["SK", "AK", "WS", "GT"]);
        let err = serde_json::from_str::<Secrets>(r#"{"token":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `token`"), "{err}");
    }

    #[test]
    fn build_secrets_and_registry_logins_are_checked_and_redacted() {
        let s: Secrets = serde_json::from_str(
            r#"{"build_secrets":{"npm-token":"NPMV"},
                "registry_auths":{"registry.example:5000":{"username":"u","password":"RP"}}}"#,
        )
        .unwrap();
        assert_eq!(s.check(), Ok(()));
        assert_eq!(s.redaction_values(), ["NPMV", "RP"]);
        let debug = format!("{s:?}");
        assert!(debug.contains("npm-token") && !debug.contains("NPMV") && !debug.contains("RP"));
        for (json, field) in [
            (r#"{"build_secrets":{"../x":"v"}}"#, "build_secrets"),
            (
                r#"{"registry_auths":{"h:99999":{"username":"u","password":"p"}}}"#,
                "registry_auths",
            ),
        ] {
            let s: Secrets = serde_json::from_str(json).unwrap();
            assert_eq!(s.check().unwrap_err().0, field, "{json}");
        }
    }
}
