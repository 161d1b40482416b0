//! Secrets: what a build needs that must never appear on the kernel command line.
//!
//! Every process in the builder VM can read `/proc/cmdline`, so credentials travel in a JSON file
//! instead: `--secrets FILE` on a host, a read-only config drive inside the VM. Every field is
//! optional. [`Secrets::redaction_values`] lists the strings a log must never show.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Credentials and endpoint of the S3-compatible store the rootfs is uploaded to.
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
}

impl Secrets {
    /// Reads a secrets file.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let text = std::fs::read(path).map_err(|source| SecretsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| SecretsError::Parse {
            path: path.to_path_buf(),
            source,
        })
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
}
