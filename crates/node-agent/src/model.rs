//! What a build is to the node agent: its states, the request a client submits, and the check
//! that turns a request into the guest's [`BuildParams`] with the build contract's own parser.

use std::fmt;

use builder_contract::{BuildParams, ParamError};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use url::Url;

/// The life of a build. Every change is a row in `build_events` and one JSON log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    Queued,
    Starting,
    Running,
    Uploading,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl BuildState {
    pub const ALL: [BuildState; 8] = [
        BuildState::Queued,
        BuildState::Starting,
        BuildState::Running,
        BuildState::Uploading,
        BuildState::Succeeded,
        BuildState::Failed,
        BuildState::TimedOut,
        BuildState::Cancelled,
    ];
    /// States in which a VM may exist for the build.
    pub const ACTIVE: [BuildState; 3] = [
        BuildState::Starting,
        BuildState::Running,
        BuildState::Uploading,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Starting => "starting",
            BuildState::Running => "running",
            BuildState::Uploading => "uploading",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::TimedOut => "timed_out",
            BuildState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded
                | BuildState::Failed
                | BuildState::TimedOut
                | BuildState::Cancelled
        )
    }
}

impl fmt::Display for BuildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/builds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    pub repo_url: String,
    /// A full commit id; or give `ref`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    /// A branch or tag; or give `commit_sha`.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_key: Option<String>,
    /// Where the one final webhook goes, signed with the node's notify secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    #[serde(default = "default_disk_gib")]
    pub disk_gib: u32,
    /// Default: the node's `default_timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// When given, the only destinations (`CIDR` or `CIDR:PORT`) the VM may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
    /// Who asked, for the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
}

fn default_vcpus() -> u32 {
    2
}
fn default_mem_mib() -> u64 {
    2048
}
fn default_disk_gib() -> u32 {
    4
}

/// A request field that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error("invalid `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

impl RequestError {
    pub fn field(&self) -> Option<&'static str> {
        match self {
            RequestError::Param(e) => e.key(),
            RequestError::Field { field, .. } => Some(field),
        }
    }
}

/// Limits a request is checked against: the node's capacity and timeout ceiling.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_mem_mib: u64,
}

const MAX_TIMEOUT_S: u64 = 24 * 3600;
const MAX_DISK_GIB: u32 = 1024;
const MIN_MEM_MIB: u64 = 256;

impl BuildRequest {
    /// The guest's parameters for this request, parsed by the contract's own parser so a client
    /// gets the same errors the guest would give. `notify_url` is the node agent's callback (the
    /// requester's URL is only checked here and kept in the database).
    pub fn to_params(
        &self,
        build_id: &str,
        callback: &Url,
        limits: Limits,
    ) -> Result<BuildParams, RequestError> {
        let field = |field, reason: String| RequestError::Field { field, reason };
        let revision = match (&self.commit_sha, &self.git_ref) {
            (Some(_), Some(_)) => {
                return Err(field(
                    "ref",
                    "give either `commit_sha` or `ref`, not both".into(),
                ))
            }
            (Some(v), None) | (None, Some(v)) => Some(v),
            (None, None) => None,
        };
        let mut words = vec![
            ("build_id", Some(build_id)),
            ("repo_url", Some(self.repo_url.as_str())),
            ("commit_sha", revision.map(String::as_str)),
            ("dockerfile", self.dockerfile.as_deref()),
            ("s3_bucket", self.s3_bucket.as_deref()),
            ("s3_key", self.s3_key.as_deref()),
        ];
        let callback = callback_url(callback, build_id);
        words.push(("notify_url", Some(callback.as_str())));
        let cmdline = words
            .into_iter()
            .filter_map(|(k, v)| {
                v.map(|v| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
            })
            .collect::<Vec<_>>()
            .join(" ");
        let params = BuildParams::from_cmdline(&cmdline, build_id)?;
        params.kernel_cmdline(crate::vm::BASE_BOOT_ARGS)?;
        if let Some(url) = &self.notify_url {
            builder_contract::params::parse_notify_url(url)?;
        }
        for rule in &self.egress_allow {
            rule.parse::<builder_vmm::EgressRule>()
                .map_err(|e| field("egress_allow", e.to_string()))?;
        }
        if self.vcpus == 0 || self.vcpus > limits.max_vcpus {
            return Err(field(
                "vcpus",
                format!("must be 1 to {} (this node's capacity)", limits.max_vcpus),
            ));
        }
        if self.mem_mib < MIN_MEM_MIB || self.mem_mib > limits.max_mem_mib {
            return Err(field(
                "mem_mib",
                format!(
                    "must be {MIN_MEM_MIB} to {} MiB (this node's capacity)",
                    limits.max_mem_mib
                ),
            ));
        }
        if self.disk_gib == 0 || self.disk_gib > MAX_DISK_GIB {
            return Err(field("disk_gib", format!("must be 1 to {MAX_DISK_GIB}")));
        }
        if let Some(t) = self.timeout_s {
            if t == 0 || t > MAX_TIMEOUT_S {
                return Err(field("timeout_s", format!("must be 1 to {MAX_TIMEOUT_S}")));
            }
        }
        Ok(params)
    }
}

/// The URL a builder VM posts its report to.
pub fn callback_url(base: &Url, build_id: &str) -> Url {
    let mut url = base.clone();
    url.set_path(&format!("/v1/internal/builds/{build_id}/complete"));
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> BuildRequest {
        serde_json::from_str(json).unwrap()
    }

    const LIMITS: Limits = Limits {
        max_vcpus: 4,
        max_mem_mib: 8192,
    };

    #[test]
    fn errors_name_the_field_the_contract_names() {
        let base = Url::parse("http://10.0.0.1:7070").unwrap();
        let ok = request(
            r#"{"repo_url":"https://git.example/r.git","ref":"main","notify_url":"https://me.example/hook"}"#,
        );
        let params = ok.to_params("b1", &base, LIMITS).unwrap();
        assert_eq!(
            params.notify_url.unwrap().as_str(),
            "http://10.0.0.1:7070/v1/internal/builds/b1/complete"
        );
        assert_eq!(params.dockerfile.as_str(), "Dockerfile");
        for (json, field) in [
            (r#"{"repo_url":"file:///etc","ref":"main"}"#, "repo_url"),
            (
                r#"{"repo_url":"https://g.example/r","commit_sha":"abc1234"}"#,
                "commit_sha",
            ),
            (r#"{"repo_url":"https://g.example/r"}"#, "commit_sha"),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","commit_sha":"m"}"#,
                "ref",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","dockerfile":"../x"}"#,
                "dockerfile",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","s3_bucket":"b"}"#,
                "s3_key",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","notify_url":"ftp://x"}"#,
                "notify_url",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","vcpus":5}"#,
                "vcpus",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","mem_mib":10}"#,
                "mem_mib",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","timeout_s":0}"#,
                "timeout_s",
            ),
        ] {
            let err = request(json).to_params("b1", &base, LIMITS).unwrap_err();
            assert_eq!(err.field(), Some(field), "{json}: {err}");
        }
    }
}
