//! Build parameters: the keys the guest agent reads from the kernel command line.
//!
//! One parser serves `/proc/cmdline` inside the builder VM and `builder-agent run --params "..."`
//! on a host. A command line is a whitespace-separated list of `key=value` words; values that
//! contain spaces, `%` or other bytes outside the unreserved set are percent-encoded. Words that
//! are not build parameters (`console=ttyS0`, `reboot=k`, a bare `quiet`, ...) belong to the
//! kernel and are ignored, so the same parser reads a full kernel command line.
//!
//! `build_args` is one word whose decoded value is itself form-encoded (`KEY=VALUE&KEY=VALUE`).
//! When the build args would push the command line over the VMM's limit, the node agent leaves
//! them off it and puts them on the config drive instead ([`BuildParams::split_kernel_cmdline`]);
//! the guest merges them back ([`BuildParams::merge_overflow_build_args`]).

use std::collections::BTreeMap;
use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use url::Url;

/// Firecracker refuses a kernel command line longer than this (bytes, without the trailing NUL).
pub const MAX_KERNEL_CMDLINE_BYTES: usize = 2048;

/// Dockerfile used when the `dockerfile` key is absent.
pub const DEFAULT_DOCKERFILE: &str = "Dockerfile";

/// The only platform builds are made for now (what `platform` defaults to and must be).
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

/// The command-line keys, in the order [`BuildParams::to_cmdline`] writes them.
pub const PARAM_KEYS: [&str; 12] = [
    "build_id",
    "repo_url",
    "commit_sha",
    "dockerfile",
    "target",
    "platform",
    "s3_bucket",
    "s3_key",
    "notify_url",
    "reuse_rootfs",
    "mirrored_registries",
    "build_args",
];

/// At most this many build args.
pub const MAX_BUILD_ARGS: usize = 100;
/// A build arg's value is at most this many bytes.
pub const MAX_BUILD_ARG_VALUE_BYTES: usize = 16 * 1024;
/// At most this many `mirrored_registries`.
pub const MAX_MIRRORED_REGISTRIES: usize = 8;

/// Bytes left as they are when a value is encoded: RFC 3986 unreserved plus `/` and `:`, which
/// keeps URLs and paths readable on the console.
const VALUE_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/')
    .remove(b':');

/// A parameter that could not be accepted. Each variant names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A required key is absent.
    #[error("the build parameter `{key}` is required but was not given")]
    Missing { key: &'static str },
    /// A key was given twice.
    #[error("the build parameter `{key}` is given more than once")]
    Duplicate { key: &'static str },
    /// A value is not valid percent-encoded UTF-8.
    #[error("the value of `{key}` is not valid percent-encoded UTF-8")]
    Encoding { key: &'static str },
    /// A value was decoded but breaks the rules for its key.
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// The encoded command line does not fit the VMM's limit.
    #[error(
        "the kernel command line would be {len} bytes, over the {max}-byte limit; shorten \
         repo_url, s3_key or notify_url"
    )]
    CmdlineTooLong { len: usize, max: usize },
    /// Build args came both on the command line and on the config drive.
    #[error(
        "`build_args` is given both on the command line and on the config drive; the node \
         agent puts them in one place"
    )]
    BuildArgsTwice,
}

impl ParamError {
    /// The key this error is about, if it concerns one key.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ParamError::Missing { key }
            | ParamError::Duplicate { key }
            | ParamError::Encoding { key }
            | ParamError::Invalid { key, .. } => Some(key),
            ParamError::BuildArgsTwice => Some("build_args"),
            ParamError::CmdlineTooLong { .. } => None,
        }
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ParamError {
    ParamError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// What to check out: a full commit id, or a ref for convenience.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Revision {
    /// A full SHA-1 (40 hex digits) or SHA-256 (64 hex digits) object id, lower case.
    Commit(String),
    /// A branch, tag or other ref name (`main`, `refs/tags/v1`).
    Ref(String),
}

impl Revision {
    /// Parses a `commit_sha` value: full hex ids are commits, anything else must be a valid ref.
    pub fn parse(value: &str) -> Result<Self, ParamError> {
        const KEY: &str = "commit_sha";
        let is_hex = !value.is_empty() && value.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex && (value.len() == 40 || value.len() == 64) {
            return Ok(Revision::Commit(value.to_ascii_lowercase()));
        }
        if is_hex && value.len() >= 7 {
            return Err(invalid(
                KEY,
                format!(
                    "`{value}` looks like an abbreviated or malformed SHA ({} hex digits); give \
                     the full 40-digit commit id or a ref name",
                    value.len()
                ),
            ));
        }
        check_ref_name(value).map_err(|reason| invalid(KEY, reason))?;
        Ok(Revision::Ref(value.to_string()))
    }

    /// The string as given on the command line.
    pub fn as_str(&self) -> &str {
        match self {
            Revision::Commit(s) | Revision::Ref(s) => s,
        }
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rules of `git check-ref-format` that matter for a name we pass to `git fetch`.
fn check_ref_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a commit SHA or ref name is required".into());
    }
    if name.len() > 255 {
        return Err("the ref name is longer than 255 bytes".into());
    }
    if name.starts_with('-') {
        return Err(format!("`{name}` starts with `-`"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(*c))
    {
        return Err(format!(
            "`{name}` contains the character {c:?}, not allowed in a ref"
        ));
    }
    if name.contains("..") || name.contains("@{") || name.contains("//") {
        return Err(format!(
            "`{name}` contains `..`, `@{{` or `//`, not allowed in a ref"
        ));
    }
    if name.starts_with('/') || name.ends_with('/') || name.ends_with('.') || name == "@" {
        return Err(format!("`{name}` is not a valid ref name"));
    }
    if name
        .split('/')
        .any(|part| part.starts_with('.') || part.ends_with(".lock"))
    {
        return Err(format!(
            "`{name}` has a component starting with `.` or ending with `.lock`"
        ));
    }
    Ok(())
}

/// A Dockerfile path relative to the repository root, normalised (no `.` parts, no `//`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoPath(String);

impl RepoPath {
    /// Accepts a relative path that stays inside the repository.
    pub fn parse(key: &'static str, value: &str) -> Result<Self, ParamError> {
        if value.is_empty() {
            return Err(invalid(key, "the path is empty"));
        }
        if value.starts_with('/') {
            return Err(invalid(
                key,
                format!("`{value}` is absolute; give a path relative to the repository root"),
            ));
        }
        if value.contains('\0') || value.chars().any(char::is_control) {
            return Err(invalid(key, "the path contains control characters"));
        }
        let mut parts = Vec::new();
        for part in value.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(invalid(
                        key,
                        format!("`{value}` climbs out of the repository with `..`"),
                    ))
                }
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(invalid(
                key,
                format!("`{value}` names the repository root, not a file"),
            ));
        }
        Ok(RepoPath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RepoPath {
    type Error = ParamError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        RepoPath::parse("dockerfile", &value)
    }
}

impl From<RepoPath> for String {
    fn from(value: RepoPath) -> Self {
        value.0
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the rootfs goes in S3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Location {
    pub bucket: String,
    pub key: String,
}

impl S3Location {
    pub fn new(bucket: &str, key: &str) -> Result<Self, ParamError> {
        check_bucket(bucket).map_err(|reason| invalid("s3_bucket", reason))?;
        check_key(key).map_err(|reason| invalid("s3_key", reason))?;
        Ok(S3Location {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The key of the image-config JSON uploaded beside the rootfs.
    pub fn config_key(&self) -> String {
        format!("{}.json", self.key)
    }

    /// The key of the build's report, written beside the rootfs whether the build succeeded
    /// or failed.
    pub fn status_key(&self) -> String {
        format!("{}.status.json", self.key)
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// S3 bucket naming rules (the general-purpose bucket rules of AWS).
fn check_bucket(bucket: &str) -> Result<(), String> {
    if !(3..=63).contains(&bucket.len()) {
        return Err(format!("`{bucket}` must be 3 to 63 characters long"));
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(format!(
            "`{bucket}` may only contain lower-case letters, digits, `.` and `-`"
        ));
    }
    let first_last_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !first_last_ok(bucket.as_bytes()[0]) || !first_last_ok(bucket.as_bytes()[bucket.len() - 1]) {
        return Err(format!(
            "`{bucket}` must start and end with a letter or digit"
        ));
    }
    if bucket.contains("..") || bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!(
            "`{bucket}` must not contain `..` or look like an IP address"
        ));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the object key is empty".into());
    }
    if key.len() > 1024 - ".status.json".len() {
        return Err("the object key is longer than 1012 bytes".into());
    }
    if key.starts_with('/') {
        return Err(format!("`{key}` starts with `/`"));
    }
    if key.chars().any(char::is_control) {
        return Err("the object key contains control characters".into());
    }
    if key.split('/').any(|p| p == ".." || p == ".") {
        return Err(format!("`{key}` contains a `.` or `..` path segment"));
    }
    Ok(())
}

fn check_build_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("the build id must be 1 to 64 characters long".into());
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || !id.as_bytes()[0].is_ascii_alphanumeric()
    {
        return Err(format!(
            "`{id}` may only contain letters, digits, `-`, `_` and `.`, and must start with a \
             letter or digit"
        ));
    }
    Ok(())
}

/// A Dockerfile stage name for `target`: what the Dockerfile frontend accepts after `AS`.
pub fn parse_target(value: &str) -> Result<String, ParamError> {
    const KEY: &str = "target";
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.as_bytes()[0].is_ascii_alphabetic()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(invalid(
            KEY,
            format!(
                "`{value}` is not a stage name: 1 to 128 letters, digits, `-`, `_` or `.`, \
                 starting with a letter"
            ),
        ));
    }
    Ok(value.to_string())
}

/// Checks a `platform`: only [`DEFAULT_PLATFORM`] is built for now.
pub fn parse_platform(value: &str) -> Result<String, ParamError> {
    if value != DEFAULT_PLATFORM {
        return Err(invalid(
            "platform",
            format!("`{value}` is not supported; builds are made for {DEFAULT_PLATFORM} only"),
        ));
    }
    Ok(value.to_string())
}

/// `--build-arg` values by name, checked: names as in a Dockerfile `ARG` (`[A-Za-z_][A-Za-z0-9_]*`,
/// at most 128 bytes), values any UTF-8 without NUL up to [`MAX_BUILD_ARG_VALUE_BYTES`], at most
/// [`MAX_BUILD_ARGS`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct BuildArgs(BTreeMap<String, String>);

impl BuildArgs {
    /// Checks every name and value.
    pub fn new(args: BTreeMap<String, String>) -> Result<Self, ParamError> {
        const KEY: &str = "build_args";
        if args.len() > MAX_BUILD_ARGS {
            return Err(invalid(
                KEY,
                format!(
                    "{} build args; at most {MAX_BUILD_ARGS} are accepted",
                    args.len()
                ),
            ));
        }
        for (name, value) in &args {
            let name_ok = !name.is_empty()
                && name.len() <= 128
                && (name.as_bytes()[0].is_ascii_alphabetic() || name.starts_with('_'))
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return Err(invalid(
                    KEY,
                    format!(
                        "`{name}` is not a build arg name: letters, digits and `_`, not \
                         starting with a digit, at most 128 bytes"
                    ),
                ));
            }
            if value.len() > MAX_BUILD_ARG_VALUE_BYTES {
                return Err(invalid(
                    KEY,
                    format!(
                        "the value of `{name}` is {} bytes; at most {MAX_BUILD_ARG_VALUE_BYTES} \
                         are accepted",
                        value.len()
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(invalid(KEY, format!("the value of `{name}` contains NUL")));
            }
        }
        Ok(BuildArgs(args))
    }

    /// Reads the form-encoded value of the `build_args` word (`KEY=VALUE&...`).
    pub fn parse_form(value: &str) -> Result<Self, ParamError> {
        let mut args = BTreeMap::new();
        for (name, value) in url::form_urlencoded::parse(value.as_bytes()) {
            if args.insert(name.to_string(), value.into_owned()).is_some() {
                return Err(invalid(
                    "build_args",
                    format!("the build arg `{name}` is given more than once"),
                ));
            }
        }
        BuildArgs::new(args)
    }

    /// The form-encoded value of the `build_args` word.
    pub fn to_form(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.0)
            .finish()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl TryFrom<BTreeMap<String, String>> for BuildArgs {
    type Error = ParamError;
    fn try_from(value: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        BuildArgs::new(value)
    }
}

impl From<BuildArgs> for BTreeMap<String, String> {
    fn from(value: BuildArgs) -> Self {
        value.0
    }
}

/// Parses and checks a `repo_url`: `https`, `http`, `git` or `ssh` with a host.
pub fn parse_repo_url(value: &str) -> Result<Url, ParamError> {
    const KEY: &str = "repo_url";
    let url =
        Url::parse(value).map_err(|e| invalid(KEY, format!("`{value}` is not a URL: {e}")))?;
    match url.scheme() {
        "https" | "http" | "git" | "ssh" => {}
        other => {
            return Err(invalid(
                KEY,
                format!("the scheme `{other}` is not supported; use https, http, git or ssh"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(KEY, format!("`{value}` has no host")));
    }
    if url.password().is_some() {
        return Err(invalid(
            KEY,
            "the URL carries a password; put the git token in the secrets file instead",
        ));
    }
    Ok(url)
}

/// Parses and checks a `notify_url`: `http` or `https` with a host.
pub fn parse_notify_url(value: &str) -> Result<Url, ParamError> {
    const KEY: &str = "notify_url";
    let url =
        Url::parse(value).map_err(|e| invalid(KEY, format!("`{value}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            KEY,
            format!(
                "the scheme `{}` is not supported; use http or https",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(KEY, format!("`{value}` has no host")));
    }
    if url.password().is_some() || !url.username().is_empty() {
        return Err(invalid(
            KEY,
            "the URL carries credentials; the webhook is signed instead",
        ));
    }
    Ok(url)
}

/// Everything one build needs to know that is not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildParams {
    pub build_id: String,
    pub repo_url: Url,
    pub revision: Revision,
    pub dockerfile: RepoPath,
    /// The stage to build (`--target`); absent: the last one.
    #[serde(default)]
    pub target: Option<String>,
    /// The platform built for; only [`DEFAULT_PLATFORM`] for now.
    #[serde(default = "default_platform")]
    pub platform: String,
    /// `--build-arg` values.
    #[serde(default)]
    pub build_args: BuildArgs,
    /// Absent: the rootfs is written to a local directory instead of S3.
    pub s3: Option<S3Location>,
    /// Absent: no webhook is sent.
    pub notify_url: Option<Url>,
    /// The rootfs already at the destination, from the cache key's last successful build: when
    /// this build's image has the same digest, it is not converted and uploaded again.
    #[serde(default)]
    pub reuse: Option<RootfsReuse>,
    /// Registries (`host:port`) the node mirrors: the VM's connections to them reach the node's
    /// pull-through mirror over plain HTTP, so its dockerd treats them as insecure registries.
    #[serde(default)]
    pub mirrored_registries: Vec<String>,
}

/// The existing rootfs a build may reuse (`reuse_rootfs` on the command line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsReuse {
    /// `sha256:<hex>` of the image the existing rootfs was converted from.
    pub image_digest: String,
    /// SHA-256 (hex) and size of the existing rootfs object.
    pub sha256: String,
    pub size_bytes: u64,
}

impl RootfsReuse {
    /// Parses a `reuse_rootfs` value: `<image_digest>,<sha256>,<size_bytes>`.
    pub fn parse(value: &str) -> Result<Self, ParamError> {
        const KEY: &str = "reuse_rootfs";
        let fields: Vec<&str> = value.split(',').collect();
        let [image_digest, sha256, size_bytes] = fields[..] else {
            return Err(invalid(
                KEY,
                format!(
                    "`{value}` is not `<image_digest>,<sha256>,<size_bytes>` ({} fields)",
                    fields.len()
                ),
            ));
        };
        if !image_digest
            .strip_prefix("sha256:")
            .is_some_and(is_lower_sha256_hex)
        {
            return Err(invalid(
                KEY,
                format!("the image digest `{image_digest}` is not `sha256:` and 64 lower-case hex digits"),
            ));
        }
        if !is_lower_sha256_hex(sha256) {
            return Err(invalid(
                KEY,
                format!("the rootfs SHA-256 `{sha256}` is not 64 lower-case hex digits"),
            ));
        }
        let size_bytes = size_bytes.parse::<u64>().map_err(|e| {
            invalid(
                KEY,
                format!("the rootfs size `{size_bytes}` is not a byte count: {e}"),
            )
        })?;
        Ok(RootfsReuse {
            image_digest: image_digest.to_string(),
            sha256: sha256.to_string(),
            size_bytes,
        })
    }

    /// The `reuse_rootfs` value, as [`RootfsReuse::parse`] reads it.
    pub fn to_cmdline_value(&self) -> String {
        format!("{},{},{}", self.image_digest, self.sha256, self.size_bytes)
    }
}

fn is_lower_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a `mirrored_registries` value: comma-separated `host:port`, the host an IPv4 literal
/// or a DNS name, the port 1-65535, at most [`MAX_MIRRORED_REGISTRIES`], none twice.
pub fn parse_mirrored_registries(value: &str) -> Result<Vec<String>, ParamError> {
    const KEY: &str = "mirrored_registries";
    let registries: Vec<String> = value.split(',').map(str::to_string).collect();
    if registries.len() > MAX_MIRRORED_REGISTRIES {
        return Err(invalid(
            KEY,
            format!(
                "{} registries; at most {MAX_MIRRORED_REGISTRIES} are accepted",
                registries.len()
            ),
        ));
    }
    for (index, registry) in registries.iter().enumerate() {
        check_registry_address(registry).map_err(|reason| invalid(KEY, reason))?;
        if registries[..index].contains(registry) {
            return Err(invalid(
                KEY,
                format!("`{registry}` is given more than once"),
            ));
        }
    }
    Ok(registries)
}

/// A registry address: `host:port` with an IPv4 literal or DNS name and a port 1-65535.
fn check_registry_address(registry: &str) -> Result<(), String> {
    let Some((host, port)) = registry.rsplit_once(':') else {
        return Err(format!("`{registry}` is not `host:port`"));
    };
    let port_ok = port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0')
        && port.parse::<u16>().is_ok();
    if !port_ok {
        return Err(format!("`{registry}` has no port from 1 to 65535"));
    }
    let is_ipv4 = host.parse::<std::net::Ipv4Addr>().is_ok();
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let is_dns_name = host.len() <= 253
        && host.split('.').all(label_ok)
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !is_ipv4 && !is_dns_name {
        return Err(format!(
            "the host of `{registry}` is neither an IPv4 address nor a DNS name"
        ));
    }
    Ok(())
}

fn default_platform() -> String {
    DEFAULT_PLATFORM.to_string()
}

/// The raw `key=value` pairs before validation.
#[derive(Debug, Default)]
struct RawParams {
    values: [Option<String>; PARAM_KEYS.len()],
}

impl RawParams {
    fn from_cmdline(cmdline: &str) -> Result<Self, ParamError> {
        let mut raw = RawParams::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some((name, value)) = word.split_once('=') else {
                continue;
            };
            let Some(index) = PARAM_KEYS.iter().position(|k| *k == name) else {
                continue;
            };
            let key = PARAM_KEYS[index];
            let decoded = percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| ParamError::Encoding { key })?
                .into_owned();
            if raw.values[index].replace(decoded).is_some() {
                return Err(ParamError::Duplicate { key });
            }
        }
        Ok(raw)
    }

    fn take(&mut self, key: &'static str) -> Option<String> {
        let index = PARAM_KEYS.iter().position(|k| *k == key)?;
        self.values[index].take()
    }
}

impl BuildParams {
    /// Reads the build parameters from a command line (a kernel command line or `--params`).
    ///
    /// `default_build_id` is used when the command line names none (a host run); inside the VM
    /// the node agent always passes one.
    pub fn from_cmdline(cmdline: &str, default_build_id: &str) -> Result<Self, ParamError> {
        let mut raw = RawParams::from_cmdline(cmdline)?;
        let build_id = raw
            .take("build_id")
            .unwrap_or_else(|| default_build_id.to_string());
        check_build_id(&build_id).map_err(|reason| invalid("build_id", reason))?;
        let repo_url = raw
            .take("repo_url")
            .ok_or(ParamError::Missing { key: "repo_url" })?;
        let revision = raw
            .take("commit_sha")
            .ok_or(ParamError::Missing { key: "commit_sha" })?;
        let dockerfile = raw
            .take("dockerfile")
            .unwrap_or_else(|| DEFAULT_DOCKERFILE.to_string());
        let s3 = match (raw.take("s3_bucket"), raw.take("s3_key")) {
            (Some(bucket), Some(key)) => Some(S3Location::new(&bucket, &key)?),
            (None, None) => None,
            (Some(_), None) => return Err(ParamError::Missing { key: "s3_key" }),
            (None, Some(_)) => return Err(ParamError::Missing { key: "s3_bucket" }),
        };
        let notify_url = raw
            .take("notify_url")
            .map(|u| parse_notify_url(&u))
            .transpose()?;
        let target = raw.take("target").map(|t| parse_target(&t)).transpose()?;
        let platform = parse_platform(&raw.take("platform").unwrap_or_else(default_platform))?;
        let build_args = raw
            .take("build_args")
            .map(|a| BuildArgs::parse_form(&a))
            .transpose()?
            .unwrap_or_default();
        let reuse = raw
            .take("reuse_rootfs")
            .map(|r| RootfsReuse::parse(&r))
            .transpose()?;
        let mirrored_registries = raw
            .take("mirrored_registries")
            .map(|r| parse_mirrored_registries(&r))
            .transpose()?
            .unwrap_or_default();
        let params = BuildParams {
            build_id,
            repo_url: parse_repo_url(&repo_url)?,
            revision: Revision::parse(&revision)?,
            dockerfile: RepoPath::parse("dockerfile", &dockerfile)?,
            target,
            platform,
            build_args,
            s3,
            notify_url,
            reuse,
            mirrored_registries,
        };
        Ok(params)
    }

    /// The parameters as command-line words, percent-encoded, in [`PARAM_KEYS`] order.
    pub fn to_cmdline(&self) -> String {
        let build_args = self.build_args.to_form();
        let reuse = self.reuse.as_ref().map(RootfsReuse::to_cmdline_value);
        let mirrored_registries = self.mirrored_registries.join(",");
        let mut pairs: Vec<(&str, &str)> = vec![
            ("build_id", &self.build_id),
            ("repo_url", self.repo_url.as_str()),
            ("commit_sha", self.revision.as_str()),
            ("dockerfile", self.dockerfile.as_str()),
        ];
        if let Some(target) = &self.target {
            pairs.push(("target", target));
        }
        if self.platform != DEFAULT_PLATFORM {
            pairs.push(("platform", &self.platform));
        }
        if let Some(s3) = &self.s3 {
            pairs.push(("s3_bucket", &s3.bucket));
            pairs.push(("s3_key", &s3.key));
        }
        if let Some(url) = &self.notify_url {
            pairs.push(("notify_url", url.as_str()));
        }
        if let Some(reuse) = &reuse {
            pairs.push(("reuse_rootfs", reuse));
        }
        if !self.mirrored_registries.is_empty() {
            pairs.push(("mirrored_registries", &mirrored_registries));
        }
        if !self.build_args.is_empty() {
            pairs.push(("build_args", &build_args));
        }
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, VALUE_ENCODE_SET)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A full kernel command line: `base` (the VMM's boot args) followed by the parameters,
    /// checked against [`MAX_KERNEL_CMDLINE_BYTES`].
    pub fn kernel_cmdline(&self, base: &str) -> Result<String, ParamError> {
        let cmdline = format!("{} {}", base.trim(), self.to_cmdline());
        check_cmdline_len(cmdline.trim_start())
    }

    /// Like [`BuildParams::kernel_cmdline`], but when only the build args make it too long,
    /// leaves them off and returns them to go on the config drive instead.
    pub fn split_kernel_cmdline(
        &self,
        base: &str,
    ) -> Result<(String, Option<BuildArgs>), ParamError> {
        match self.kernel_cmdline(base) {
            Ok(cmdline) => Ok((cmdline, None)),
            Err(ParamError::CmdlineTooLong { .. }) if !self.build_args.is_empty() => {
                let without = BuildParams {
                    build_args: BuildArgs::default(),
                    ..self.clone()
                };
                Ok((without.kernel_cmdline(base)?, Some(self.build_args.clone())))
            }
            Err(e) => Err(e),
        }
    }

    /// What the report echoes of these parameters, with the ids of the build secrets.
    pub fn inputs(&self, secret_ids: Vec<String>) -> crate::BuildInputs {
        crate::BuildInputs {
            dockerfile: self.dockerfile.to_string(),
            target: self.target.clone(),
            platform: self.platform.clone(),
            build_args: self.build_args.as_map().clone(),
            secret_ids,
        }
    }

    /// Takes the build args the node agent put on the config drive (see
    /// [`BuildParams::split_kernel_cmdline`]).
    pub fn merge_overflow_build_args(&mut self, overflow: &BuildArgs) -> Result<(), ParamError> {
        if overflow.is_empty() {
            return Ok(());
        }
        if !self.build_args.is_empty() {
            return Err(ParamError::BuildArgsTwice);
        }
        self.build_args = overflow.clone();
        Ok(())
    }
}

/// The decoded value of one key, without validating the rest of the command line.
///
/// Used to still deliver the failure webhook when other parameters are invalid.
pub fn raw_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.split_once('='))
        .find(|(name, _)| *name == key)
        .and_then(|(_, value)| percent_decode_str(value).decode_utf8().ok())
        .map(|v| v.into_owned())
}

/// Returns `cmdline` if it fits the VMM's kernel command-line limit.
pub fn check_cmdline_len(cmdline: &str) -> Result<String, ParamError> {
    if cmdline.len() > MAX_KERNEL_CMDLINE_BYTES {
        return Err(ParamError::CmdlineTooLong {
            len: cmdline.len(),
            max: MAX_KERNEL_CMDLINE_BYTES,
        });
    }
    Ok(cmdline.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn parse(cmdline: &str) -> Result<BuildParams, ParamError> {
        BuildParams::from_cmdline(cmdline, "host-1")
    }

    #[test]
    fn reads_a_kernel_cmdline_and_ignores_kernel_words() {
        let p = parse(&format!(
            "console=ttyS0 reboot=k quiet build_id=b1 repo_url=https://git.example/app.git \
             commit_sha={SHA} dockerfile=docker/Dockerfile.prod s3_bucket=builds s3_key=a/b.ext4 \
             notify_url=http://10.0.0.1:8080/hook panic=1"
        ))
        .unwrap();
        assert_eq!(p.build_id, "b1");
        assert_eq!(p.repo_url.as_str(), "https://git.example/app.git");
        assert_eq!(p.revision, Revision::Commit(SHA.into()));
        assert_eq!(p.dockerfile.as_str(), "docker/Dockerfile.prod");
        assert_eq!(p.s3, Some(S3Location::new("builds", "a/b.ext4").unwrap()));
        assert_eq!(p.notify_url.unwrap().as_str(), "http://10.0.0.1:8080/hook");
    }

    #[test]
    fn defaults_apply() {
        let p = parse("repo_url=git://h/r commit_sha=main").unwrap();
        assert_eq!(p.build_id, "host-1");
        assert_eq!(p.dockerfile.as_str(), "Dockerfile");
        assert_eq!(p.revision, Revision::Ref("main".into()));
        assert!(p.s3.is_none() && p.notify_url.is_none());
    }

    #[test]
    fn round_trips_through_percent_encoding() {
        let mut p = parse("repo_url=https://h/r commit_sha=main").unwrap();
        p.dockerfile = RepoPath::parse("dockerfile", "dir with space/Dockerfile%x").unwrap();
        p.s3 = Some(S3Location::new("b-1", "k y/ü.ext4").unwrap());
        let line = p.to_cmdline();
        assert!(!line.contains("with space"), "{line}");
        assert_eq!(
            parse(&line).unwrap(),
            BuildParams {
                build_id: "host-1".into(),
                ..p
            }
        );
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let cases = [
            (
                "repo_url=ftp://h/r commit_sha=main",
                "repo_url",
                "scheme `ftp`",
            ),
            (
                "repo_url=file:///etc commit_sha=main",
                "repo_url",
                "scheme `file`",
            ),
            (
                "repo_url=https://u:p@h/r commit_sha=main",
                "repo_url",
                "password",
            ),
            (
                "repo_url=https://h/r commit_sha=abc123def",
                "commit_sha",
                "malformed SHA",
            ),
            ("repo_url=https://h/r commit_sha=a..b", "commit_sha", "`..`"),
            (
                "repo_url=https://h/r commit_sha=-x",
                "commit_sha",
                "starts with `-`",
            ),
            (
                "repo_url=https://h/r commit_sha=main dockerfile=/etc/passwd",
                "dockerfile",
                "absolute",
            ),
            (
                "repo_url=https://h/r commit_sha=main dockerfile=a/../../x",
                "dockerfile",
                "climbs out",
            ),
            (
                "repo_url=https://h/r commit_sha=main s3_bucket=Bad_Bucket s3_key=k",
                "s3_bucket",
                "lower-case",
            ),
            (
                "repo_url=https://h/r commit_sha=main s3_bucket=bb s3_key=k",
                "s3_bucket",
                "3 to 63",
            ),
            (
                "repo_url=https://h/r commit_sha=main s3_bucket=bucket s3_key=/k",
                "s3_key",
                "starts with `/`",
            ),
            (
                "repo_url=https://h/r commit_sha=main s3_bucket=bucket",
                "s3_key",
                "required",
            ),
            (
                "repo_url=https://h/r commit_sha=main notify_url=ftp://x/",
                "notify_url",
                "scheme",
            ),
            (
                "repo_url=https://h/r commit_sha=main build_id=../x",
                "build_id",
                "may only contain",
            ),
            ("commit_sha=main", "repo_url", "required"),
            ("repo_url=https://h/r", "commit_sha", "required"),
            (
                "repo_url=https://h/r repo_url=https://h/s commit_sha=main",
                "repo_url",
                "more than once",
            ),
            (
                "repo_url=https://h/r commit_sha=%ff",
                "commit_sha",
                "percent-encoded",
            ),
        ];
        for (line, key, needle) in cases {
            let err = parse(line).expect_err(line);
            assert_eq!(err.key(), Some(key), "{line}: {err}");
            let text = err.to_string();
            assert!(text.contains(key), "{line}: {text}");
            assert!(text.contains(needle), "{line}: `{text}` lacks `{needle}`");
        }
    }

    #[test]
    fn kernel_cmdline_is_limited_to_2048_bytes() {
        let mut p = parse("repo_url=https://h/r commit_sha=main").unwrap();
        assert!(p.kernel_cmdline("console=ttyS0 reboot=k").is_ok());
        p.repo_url = Url::parse(&format!("https://h/{}", "a".repeat(2100))).unwrap();
        let err = p.kernel_cmdline("console=ttyS0").unwrap_err();
        assert!(
            matches!(err, ParamError::CmdlineTooLong { max: 2048, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("2048-byte limit"));
    }

    #[test]
    fn target_platform_and_build_args_round_trip() {
        let mut p = parse(&format!(
            "repo_url=https://h/r commit_sha={SHA} target=prod platform=linux/amd64"
        ))
        .unwrap();
        assert_eq!(p.target.as_deref(), Some("prod"));
        assert_eq!(p.platform, "linux/amd64");
        p.build_args = BuildArgs::new(BTreeMap::from([
            ("GREETING".to_string(), "hello world & more=1%".to_string()),
            ("_V".to_string(), "ü+".to_string()),
        ]))
        .unwrap();
        let line = p.to_cmdline();
        assert_eq!(line.split_ascii_whitespace().count(), 6, "{line}");
        assert_eq!(parse(&line).unwrap(), p);
    }

    #[test]
    fn bad_targets_platforms_and_build_args_name_their_key() {
        for (line, key, needle) in [
            ("target=-x", "target", "not a stage name"),
            ("platform=linux/arm64", "platform", "linux/amd64 only"),
            ("build_args=1A%3Dx", "build_args", "not a build arg name"),
            ("build_args=A%3D1%26A%3D2", "build_args", "more than once"),
            ("build_args=A%3D%2500", "build_args", "NUL"),
        ] {
            let err = parse(&format!("repo_url=https://h/r commit_sha=main {line}")).unwrap_err();
            assert_eq!(err.key(), Some(key), "{line}: {err}");
            assert!(err.to_string().contains(needle), "{line}: {err}");
        }
        let big = "x".repeat(MAX_BUILD_ARG_VALUE_BYTES + 1);
        let err = BuildArgs::new(BTreeMap::from([("A".into(), big)])).unwrap_err();
        assert!(err.to_string().contains("at most 16384"), "{err}");
    }

    #[test]
    fn build_args_too_long_for_the_cmdline_go_to_the_config_drive() {
        let mut p = parse("repo_url=https://h/r commit_sha=main").unwrap();
        p.build_args =
            BuildArgs::new(BTreeMap::from([("BIG".to_string(), "v".repeat(3000))])).unwrap();
        assert!(p.kernel_cmdline("console=ttyS0").is_err());
        let (cmdline, overflow) = p.split_kernel_cmdline("console=ttyS0").unwrap();
        assert!(!cmdline.contains("build_args"), "{cmdline}");
        let overflow = overflow.unwrap();
        let mut guest = BuildParams::from_cmdline(&cmdline, "host-1").unwrap();
        guest.merge_overflow_build_args(&overflow).unwrap();
        assert_eq!(guest.build_args, p.build_args);
        assert_eq!(
            guest.merge_overflow_build_args(&overflow),
            Err(ParamError::BuildArgsTwice)
        );
        let small = parse("repo_url=https://h/r commit_sha=main build_args=A%3D1").unwrap();
        assert_eq!(small.split_kernel_cmdline("").unwrap().1, None);
    }

    #[test]
    fn reuse_and_mirrored_registries_round_trip() {
        let mut p = parse("repo_url=https://h/r commit_sha=main").unwrap();
        assert_eq!(p.reuse, None);
        assert!(p.mirrored_registries.is_empty());
        p.reuse = Some(RootfsReuse {
            image_digest: format!("sha256:{}", "a1".repeat(32)),
            sha256: "0f".repeat(32),
            size_bytes: 734_003_200,
        });
        p.mirrored_registries = vec![
            "registry-1.docker.io:443".into(),
            "10.0.0.7:5000".into(),
            "ghcr.io:443".into(),
        ];
        let line = p.to_cmdline();
        assert!(
            line.contains(&format!(
                "reuse_rootfs=sha256:{}%2C{}%2C734003200",
                "a1".repeat(32),
                "0f".repeat(32)
            )),
            "{line}"
        );
        assert!(
            line.contains(
                "mirrored_registries=registry-1.docker.io:443%2C10.0.0.7:5000%2Cghcr.io:443"
            ),
            "{line}"
        );
        assert_eq!(parse(&line).unwrap(), p);
        // Both together stay well inside the kernel's limit beside a long S3 key.
        p.s3 = Some(S3Location::new("builds", &"k".repeat(600)).unwrap());
        let cmdline = p.kernel_cmdline("console=ttyS0 reboot=k panic=1").unwrap();
        assert!(
            cmdline.len() < MAX_KERNEL_CMDLINE_BYTES,
            "{}",
            cmdline.len()
        );
        assert_eq!(BuildParams::from_cmdline(&cmdline, "x").unwrap(), p);
    }

    #[test]
    fn bad_reuse_and_mirrored_registries_name_their_key() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let sha = "b".repeat(64);
        let nine = (1..=9)
            .map(|i| format!("r{i}.example:5000"))
            .collect::<Vec<_>>()
            .join(",");
        for (value, key, needle) in [
            (
                format!("reuse_rootfs={digest},{sha}"),
                "reuse_rootfs",
                "2 fields",
            ),
            (
                format!("reuse_rootfs={digest},{sha},1,2"),
                "reuse_rootfs",
                "4 fields",
            ),
            (
                format!("reuse_rootfs=sha512:{},{sha},1", "a".repeat(64)),
                "reuse_rootfs",
                "image digest",
            ),
            (
                format!("reuse_rootfs=sha256:{},{sha},1", "A".repeat(64)),
                "reuse_rootfs",
                "lower-case hex",
            ),
            (
                format!("reuse_rootfs={digest},{},1", "b".repeat(63)),
                "reuse_rootfs",
                "rootfs SHA-256",
            ),
            (
                format!("reuse_rootfs={digest},{sha},-1"),
                "reuse_rootfs",
                "not a byte count",
            ),
            (
                "mirrored_registries=docker.io".into(),
                "mirrored_registries",
                "not `host:port`",
            ),
            (
                "mirrored_registries=docker.io:0".into(),
                "mirrored_registries",
                "1 to 65535",
            ),
            (
                "mirrored_registries=docker.io:65536".into(),
                "mirrored_registries",
                "1 to 65535",
            ),
            (
                "mirrored_registries=docker.io:+443".into(),
                "mirrored_registries",
                "1 to 65535",
            ),
            (
                "mirrored_registries=[::1]:5000".into(),
                "mirrored_registries",
                "neither an IPv4",
            ),
            (
                "mirrored_registries=10.0.0.300:5000".into(),
                "mirrored_registries",
                "neither an IPv4",
            ),
            (
                "mirrored_registries=-bad.example:5000".into(),
                "mirrored_registries",
                "neither an IPv4",
            ),
            (
                "mirrored_registries=".into(),
                "mirrored_registries",
                "not `host:port`",
            ),
            (
                "mirrored_registries=a.io:1,b.io:2,a.io:1".into(),
                "mirrored_registries",
                "more than once",
            ),
            (
                format!("mirrored_registries={nine}"),
                "mirrored_registries",
                "at most 8",
            ),
        ] {
            let err = parse(&format!("repo_url=https://h/r commit_sha=main {value}")).unwrap_err();
            assert_eq!(err.key(), Some(key), "{value}: {err}");
            let text = err.to_string();
            assert!(text.contains(key), "{value}: {text}");
            assert!(text.contains(needle), "{value}: `{text}` lacks `{needle}`");
        }
    }

    #[test]
    fn sha256_commits_and_uppercase_are_commits() {
        let long = "A".repeat(64);
        assert_eq!(
            Revision::parse(&long).unwrap(),
            Revision::Commit("a".repeat(64))
        );
        assert_eq!(
            Revision::parse("v1.2").unwrap(),
            Revision::Ref("v1.2".into())
        );
        assert_eq!(
            Revision::parse("cafe").unwrap(),
            Revision::Ref("cafe".into())
        );
    }
}
