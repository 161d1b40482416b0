//! What a build is to the node agent: its states, the request a client submits, and the check
//! that turns a request into the guest's [`BuildParams`] with the build contract's own parser.
//! A request's credential values ([`Credentials`]) are checked here too and then taken out of it
//! ([`BuildRequest::take_credentials`]) before it is stored.

use std::collections::BTreeMap;
use std::fmt;

use builder_contract::params::{parse_platform, parse_target};
use builder_contract::secrets::{check_registry_host, check_secret_id};
use builder_contract::{BuildArgs, BuildInputs, BuildParams, ParamError};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::credentials::{CredentialNames, Credentials, RegistryLogin, SecretValue};

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
    /// The Dockerfile stage to build (`--target`); default the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Only `linux/amd64`, the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// `--build-arg` values by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// Values for `RUN --mount=type=secret,id=ID`, by id. Never stored: see
    /// [`crate::credentials`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretValue>,
    /// A token for cloning `repo_url` over HTTP(S). Never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_token: Option<SecretValue>,
    /// The user name sent with `git_token` (default: the guest's, `x-access-token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_username: Option<String>,
    /// Logins for pulling `FROM` images, by registry host (`host[:port]`). Never stored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registry_auths: BTreeMap<String, RegistryLogin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_key: Option<String>,
    /// Where the one final webhook goes, signed with the node's notify secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    /// Default: [`DEFAULT_VCPUS`], or the node's `capacity_vcpus` when that is smaller; the
    /// node fills it in when it accepts the request ([`BuildRequest::resolve_resources`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Default: [`DEFAULT_MEM_MIB`], or the node's `capacity_mem_mib` when that is smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
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
    /// The build cache's key within the requester's namespace (default: `repo_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// Build with a new empty cache disk, and do not commit it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_cache: bool,
    /// Convert and upload the rootfs even when the image digest equals the last one uploaded
    /// to the same destination.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_upload: bool,
}

/// A build's vCPUs when its request gives none and the node has as many.
pub const DEFAULT_VCPUS: u32 = 2;
/// A build's memory when its request gives none and the node has as much.
pub const DEFAULT_MEM_MIB: u64 = 2048;
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

impl Limits {
    /// The vCPUs and memory of a build that gives `vcpus` / `mem_mib`, or not: a value given is
    /// kept (and checked by [`BuildRequest::to_params`]), one left out is the default clamped to
    /// this node's capacity, so a request without them fits an empty node of any size.
    pub fn resources(&self, vcpus: Option<u32>, mem_mib: Option<u64>) -> (u32, u64) {
        (
            vcpus.unwrap_or(DEFAULT_VCPUS.min(self.max_vcpus)),
            mem_mib.unwrap_or(DEFAULT_MEM_MIB.min(self.max_mem_mib)),
        )
    }
}

const MAX_TIMEOUT_S: u64 = 24 * 3600;
/// The longest registry user name and git user name accepted.
const MAX_USERNAME_BYTES: usize = 256;
const MAX_DISK_GIB: u32 = 1024;
const MIN_MEM_MIB: u64 = 256;

impl BuildRequest {
    /// Fills in `vcpus` and `mem_mib` when the request leaves them out ([`Limits::resources`]),
    /// so what is stored, scheduled and shown is what the build gets.
    pub fn resolve_resources(&mut self, limits: Limits) {
        let (vcpus, mem_mib) = limits.resources(self.vcpus, self.mem_mib);
        self.vcpus = Some(vcpus);
        self.mem_mib = Some(mem_mib);
    }

    /// The build's vCPUs and memory after [`BuildRequest::resolve_resources`]; before it, the
    /// defaults unclamped.
    pub fn resources(&self) -> (u32, u64) {
        (
            self.vcpus.unwrap_or(DEFAULT_VCPUS),
            self.mem_mib.unwrap_or(DEFAULT_MEM_MIB),
        )
    }

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
        let mut params = BuildParams::from_cmdline(&cmdline, build_id)?;
        params.target = self.target.as_deref().map(parse_target).transpose()?;
        if let Some(platform) = &self.platform {
            params.platform = parse_platform(platform)?;
        }
        params.build_args = BuildArgs::new(self.build_args.clone())?;
        // Build args that do not fit go to the config drive; everything else must fit.
        params.split_kernel_cmdline(&crate::vm::cmdline_budget_base(crate::vm::BASE_BOOT_ARGS))?;
        self.check_credentials()?;
        if let Some(url) = &self.notify_url {
            builder_contract::params::parse_notify_url(url)?;
        }
        for rule in &self.egress_allow {
            rule.parse::<builder_vmm::EgressRule>()
                .map_err(|e| field("egress_allow", e.to_string()))?;
        }
        let (vcpus, mem_mib) = limits.resources(self.vcpus, self.mem_mib);
        if vcpus == 0 || vcpus > limits.max_vcpus {
            return Err(field(
                "vcpus",
                format!("must be 1 to {} (this node's capacity)", limits.max_vcpus),
            ));
        }
        if !(MIN_MEM_MIB..=limits.max_mem_mib).contains(&mem_mib) {
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
        if let Some(key) = &self.cache_key {
            // The name's check; the namespace is the requester's, known when the build runs.
            builder_cache::CacheKey::new("requester", key)
                .map_err(|e| field("cache_key", e.to_string()))?;
        }
        Ok(params)
    }

    /// The name of the build's cache key: `cache_key`, else the repository URL.
    pub fn cache_name(&self) -> &str {
        self.cache_key.as_deref().unwrap_or(&self.repo_url)
    }

    /// Where the rootfs goes. The node keeps no build output (the rootfs is deleted with the
    /// VM's scratch disk), so a build must name an S3 bucket, and the node must be able to
    /// upload to it (`uploads`: it has S3 credentials, `s3_credentials_file`). Checked at
    /// admission only, so builds stored before a configuration change still run.
    pub fn check_output(&self, uploads: bool) -> Result<(), RequestError> {
        let field = |reason: &str| RequestError::Field {
            field: "s3_bucket",
            reason: reason.to_string(),
        };
        match (&self.s3_bucket, uploads) {
            (None, _) => Err(field(
                "is required: this node keeps no build output (the rootfs is deleted with the \
                 VM's scratch disk); give `s3_bucket` and `s3_key` to have it uploaded to S3",
            )),
            (Some(_), false) => Err(field(
                "cannot be used: this node has no S3 credentials (`s3_credentials_file` is not \
                 set), so it has no way to upload the rootfs",
            )),
            (Some(_), true) => Ok(()),
        }
    }

    fn check_credentials(&self) -> Result<(), RequestError> {
        let field = |field, reason: String| RequestError::Field { field, reason };
        for id in self.secrets.keys() {
            check_secret_id(id).map_err(|reason| field("secrets", reason))?;
        }
        if let Some(token) = &self.git_token {
            if token.0.is_empty() || token.0.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(field(
                    "git_token",
                    "the token is empty or holds whitespace or control characters".into(),
                ));
            }
        }
        if let Some(name) = &self.git_username {
            if self.git_token.is_none() {
                return Err(field(
                    "git_username",
                    "is sent with `git_token`, which is not given".into(),
                ));
            }
            check_username(name).map_err(|reason| field("git_username", reason))?;
        }
        for (host, login) in &self.registry_auths {
            check_registry_host(host).map_err(|reason| field("registry_auths", reason))?;
            check_username(&login.username).map_err(|reason| {
                field(
                    "registry_auths",
                    format!("the login for `{host}`: {reason}"),
                )
            })?;
            if login.password.0.is_empty() {
                return Err(field(
                    "registry_auths",
                    format!("the login for `{host}` has an empty password"),
                ));
            }
        }
        Ok(())
    }

    /// Takes the credential values out of the request, leaving it fit to be stored.
    pub fn take_credentials(&mut self) -> Credentials {
        Credentials {
            build_secrets: std::mem::take(&mut self.secrets),
            git_token: self.git_token.take(),
            git_username: self.git_username.take(),
            registry_auths: std::mem::take(&mut self.registry_auths),
        }
    }

    /// What this request asks to build, for reports the node writes itself; `names` are the
    /// credentials it was accepted with.
    pub fn inputs(&self, names: &CredentialNames) -> BuildInputs {
        BuildInputs {
            dockerfile: self
                .dockerfile
                .clone()
                .unwrap_or_else(|| builder_contract::params::DEFAULT_DOCKERFILE.to_string()),
            target: self.target.clone(),
            platform: self
                .platform
                .clone()
                .unwrap_or_else(|| builder_contract::params::DEFAULT_PLATFORM.to_string()),
            build_args: self.build_args.clone(),
            secret_ids: names.secret_ids.clone(),
        }
    }
}

/// A user name for a registry login or `git_token`: what goes before the `:` of HTTP basic
/// authentication.
fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_USERNAME_BYTES
        || name.chars().any(|c| c == ':' || c.is_control())
    {
        return Err(format!(
            "`{name}` is not a user name: 1 to {MAX_USERNAME_BYTES} bytes without `:` or \
             control characters"
        ));
    }
    Ok(())
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
                r#"{"repo_url":"https://g.example/r","ref":"m","cache_key":""}"#,
                "cache_key",
            ),
            (
                r#"{"repo_url":"https://g.example/r","ref":"m","cache_key":"a\nb"}"#,
                "cache_key",
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

    #[test]
    fn a_build_without_a_bucket_or_a_node_without_s3_credentials_is_refused() {
        let with =
            request(r#"{"repo_url":"https://g.example/r","ref":"m","s3_bucket":"b","s3_key":"k"}"#);
        with.check_output(true).unwrap();
        let err = with.check_output(false).unwrap_err();
        assert_eq!(err.field(), Some("s3_bucket"));
        assert!(err.to_string().contains("s3_credentials_file"), "{err}");
        let without = request(r#"{"repo_url":"https://g.example/r","ref":"m"}"#);
        for uploads in [true, false] {
            let err = without.check_output(uploads).unwrap_err();
            assert_eq!(err.field(), Some("s3_bucket"));
            assert!(err.to_string().contains("keeps no build output"), "{err}");
        }
    }

    #[test]
    fn resources_left_out_fit_the_node_and_resources_given_are_checked() {
        let base = Url::parse("http://10.0.0.1:7070").unwrap();
        let small = Limits {
            max_vcpus: 1,
            max_mem_mib: 1024,
        };
        let mut left_out = request(r#"{"repo_url":"https://g.example/r","ref":"m"}"#);
        left_out.to_params("b1", &base, small).unwrap();
        left_out.resolve_resources(small);
        assert_eq!((left_out.vcpus, left_out.mem_mib), (Some(1), Some(1024)));
        assert_eq!(left_out.resources(), (1, 1024));
        let stored = serde_json::to_value(&left_out).unwrap();
        assert_eq!(
            (&stored["vcpus"], &stored["mem_mib"]),
            (&1.into(), &1024.into())
        );

        // A node with room gets the defaults, not its whole capacity.
        let mut roomy = request(r#"{"repo_url":"https://g.example/r","ref":"m"}"#);
        roomy.resolve_resources(LIMITS);
        assert_eq!(roomy.resources(), (DEFAULT_VCPUS, DEFAULT_MEM_MIB));
        // Given values are kept as they are.
        let mut given =
            request(r#"{"repo_url":"https://g.example/r","ref":"m","vcpus":3,"mem_mib":300}"#);
        given.resolve_resources(LIMITS);
        assert_eq!(given.resources(), (3, 300));

        // ... and one above the capacity is refused, naming its field.
        for (json, field) in [
            (r#""vcpus":2"#, "vcpus"),
            (r#""vcpus":0"#, "vcpus"),
            (r#""mem_mib":2048"#, "mem_mib"),
            (r#""vcpus":1,"mem_mib":1025"#, "mem_mib"),
        ] {
            let json = format!(r#"{{"repo_url":"https://g.example/r","ref":"m",{json}}}"#);
            let err = request(&json).to_params("b1", &base, small).unwrap_err();
            assert_eq!(err.field(), Some(field), "{json}: {err}");
            assert!(err.to_string().contains("this node's capacity"), "{err}");
        }
    }

    #[test]
    fn build_inputs_and_credentials_are_checked_and_credentials_taken_out() {
        let base = Url::parse("http://10.0.0.1:7070").unwrap();
        let mut ok = request(
            r#"{"repo_url":"https://git.example/r.git","ref":"main","target":"prod",
                "platform":"linux/amd64","build_args":{"A":"1"},"secrets":{"npm":"NPMV"},
                "git_token":"GTV","git_username":"bot",
                "registry_auths":{"r.example:5000":{"username":"u","password":"RPV"}}}"#,
        );
        let params = ok.to_params("b1", &base, LIMITS).unwrap();
        assert_eq!(params.target.as_deref(), Some("prod"));
        assert_eq!(params.build_args.as_map()["A"], "1");
        let credentials = ok.take_credentials();
        assert_eq!(credentials.values(), ["NPMV", "GTV", "RPV"]);
        let stored = serde_json::to_string(&ok).unwrap();
        for value in ["NPMV", "GTV", "RPV", "bot"] {
            assert!(!stored.contains(value), "{stored}");
        }
        let inputs = ok.inputs(&credentials.names());
        assert_eq!(inputs.secret_ids, ["npm"]);
        assert_eq!(inputs.platform, "linux/amd64");
        assert_eq!(inputs.dockerfile, "Dockerfile");

        // Build args too long for the command line are accepted: they go to the config drive.
        let big = "v".repeat(3000);
        let json = format!(
            r#"{{"repo_url":"https://g.example/r","ref":"m","build_args":{{"BIG":"{big}"}}}}"#
        );
        request(&json).to_params("b1", &base, LIMITS).unwrap();

        for (json, field) in [
            (r#""platform":"linux/arm64""#, "platform"),
            (r#""target":"-x""#, "target"),
            (r#""build_args":{"1A":"x"}"#, "build_args"),
            (r#""secrets":{"../x":"v"}"#, "secrets"),
            (r#""git_token":"a b""#, "git_token"),
            (r#""git_token":"""#, "git_token"),
            (r#""git_username":"bot""#, "git_username"),
            (r#""git_token":"t","git_username":"a:b""#, "git_username"),
            (
                r#""registry_auths":{"h:0":{"username":"u","password":"p"}}"#,
                "registry_auths",
            ),
            (
                r#""registry_auths":{"h":{"username":"","password":"p"}}"#,
                "registry_auths",
            ),
            (
                r#""registry_auths":{"h":{"username":"u","password":""}}"#,
                "registry_auths",
            ),
        ] {
            let json = format!(r#"{{"repo_url":"https://g.example/r","ref":"m",{json}}}"#);
            let err = request(&json).to_params("b1", &base, LIMITS).unwrap_err();
            assert_eq!(err.field(), Some(field), "{json}: {err}");
        }
        let err = request(r#"{"repo_url":"https://g.example/r","ref":"m","git_token":"S 1"}"#)
            .to_params("b1", &base, LIMITS)
            .unwrap_err();
        assert!(!err.to_string().contains("S 1"), "{err}");
    }
}
