//! The completion report: what the guest agent tells the world when a build ends.
//!
//! The same JSON is the webhook body, the summary at the end of the build log and (in part) the
//! S3 object metadata. A failure carries the phase it happened in and its class: `user` when the
//! customer's input is at fault (bad parameters, missing commit, failing `RUN`), `internal` when
//! the platform is (daemon down, S3 refusing).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The phases of one build, in order (the order they compare in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Params,
    Clone,
    Checkout,
    Build,
    Export,
    Convert,
    Upload,
    Notify,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Params => "params",
            Phase::Clone => "clone",
            Phase::Checkout => "checkout",
            Phase::Build => "build",
            Phase::Export => "export",
            Phase::Convert => "convert",
            Phase::Upload => "upload",
            Phase::Notify => "notify",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is at fault when a build fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The customer's repository, Dockerfile or parameters.
    User,
    /// The platform: a daemon, the store, the network, a bug.
    Internal,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::User => "user",
            ErrorClass::Internal => "internal",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Succeeded,
    Failed,
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
        })
    }
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildFailure {
    pub class: ErrorClass,
    pub phase: Phase,
    pub message: String,
}

/// How long one phase took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub duration_ms: u64,
}

/// The converted root filesystem and where it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsArtifact {
    /// `s3://bucket/key`, or a local path when the build ran without S3.
    pub location: String,
    /// Where the image config JSON went (beside the rootfs).
    pub config_location: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// The object was already there from an earlier build of the same image and was not
    /// converted or uploaded again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

/// What was asked to be built, echoed in the report: the Dockerfile, stage, platform and build
/// args, and the ids (never the values) of the build secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildInputs {
    pub dockerfile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub platform: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_ids: Vec<String>,
}

/// The webhook body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildReport {
    pub build_id: String,
    pub status: BuildStatus,
    pub repo_url: String,
    /// The revision as requested.
    pub revision: String,
    /// The commit that was built, once known.
    pub commit_sha: Option<String>,
    /// The built image's id (`sha256:...` of its config), once known.
    pub image_digest: Option<String>,
    /// What was built, once the parameters were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<BuildInputs>,
    pub rootfs: Option<RootfsArtifact>,
    pub error: Option<BuildFailure>,
    /// Phases that ran, in order, with their durations.
    pub phases: Vec<PhaseTiming>,
    pub started_at_unix_ms: u64,
    pub duration_ms: u64,
}

/// Process exit codes of `builder-agent run` on a host.
pub mod exit_code {
    pub const SUCCESS: i32 = 0;
    /// The build failed because of the customer's input.
    pub const USER_ERROR: i32 = 1;
    /// The build failed because of the platform.
    pub const INTERNAL_ERROR: i32 = 2;
    /// The command line of `builder-agent` itself is wrong.
    pub const USAGE: i32 = 64;
}

impl BuildReport {
    /// The exit code that tells this outcome.
    pub fn exit_code(&self) -> i32 {
        match &self.error {
            None => exit_code::SUCCESS,
            Some(f) if f.class == ErrorClass::User => exit_code::USER_ERROR,
            Some(_) => exit_code::INTERNAL_ERROR,
        }
    }
}
