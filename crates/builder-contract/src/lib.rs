//! The build contract: what the node agent tells a builder VM (parameters on the kernel command
//! line, secrets on a config drive) and what the VM hands back (a signed webhook, its progress
//! and its own logs signed the same way).
//!
//! Both sides depend on this crate and nothing else defines these formats.

pub mod image;
pub mod logs;
pub mod params;
pub mod progress;
pub mod report;
pub mod secrets;
pub mod signature;
pub mod upload;

pub use image::ImageConfig;
pub use logs::LogSource;
pub use params::{BuildArgs, BuildParams, ParamError, RepoPath, Revision, RootfsReuse, S3Location};
pub use progress::ProgressEvent;
pub use report::{
    BuildFailure, BuildInputs, BuildReport, BuildStatus, ErrorClass, Phase, PhaseTiming,
    RootfsArtifact,
};
pub use secrets::{RegistryCredentials, S3Credentials, Secrets, SecretsError};
