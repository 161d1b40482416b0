//! One build, end to end: parameters → clone → checkout → docker build → convert (from the
//! daemon's layer directories, or docker save) → upload → webhook, each phase timed, the first failure classed and reported.
//! When the node offers the rootfs already at the destination (`reuse_rootfs`) and the image
//! built has that rootfs's image digest, convert and upload are skipped and the report names
//! the existing object (`reused`).
//!
//! Whatever happens, the build ends with exactly one report: written to the log, printed on
//! stdout, and POSTed to `notify_url` when one was given and can be read, even when the other
//! parameters are invalid. A build reporting to a node agent first hands it the build log and
//! the Docker daemon's ([`crate::guest_logs`]). Scratch files and the built image are removed
//! at the end.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use builder_contract::params::raw_value;
use builder_contract::upload::{upload_url, UploadStep};
use builder_contract::{
    BuildParams, BuildReport, BuildStatus, ErrorClass, LogSource, Phase, PhaseTiming,
    RootfsArtifact, S3Location, Secrets,
};
use builder_rootfs::{ConvertOptions, ConvertReport};
use builder_s3::{DirectUpload, GrantedObject, NodeGrant, ObjectAttributes, S3Client, Uploader};
use url::Url;

use crate::buildkit::{
    registry_login_secrets, use_builtin_frontend_if_unreachable, Buildx, ImageBuild,
};
use crate::context::{write_context, ContextError};
use crate::convert::{convert_image, create_work_dir};
use crate::docker::DockerDaemon;
use crate::error::{is_disk_full, BuildError};
use crate::git::{Checkout, Git};
use crate::log::BuildLog;
use crate::notify::{deliver, NotifyError, RetryPolicy};
use crate::phase_events::PhaseEvents;

/// Everything `builder-agent run` was told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The parameters as a command line (`--params`, or `/proc/cmdline` in the VM).
    pub cmdline: String,
    /// Build id when the command line names none.
    pub default_build_id: String,
    pub secrets_file: Option<PathBuf>,
    /// Where the rootfs goes when no `s3_bucket` is given: `<out_dir>/<build_id>/rootfs.ext4`.
    pub out_dir: PathBuf,
    /// Scratch space: the checkout, the context, the image archive.
    pub work_dir: PathBuf,
    pub log_file: Option<PathBuf>,
    /// The Docker daemon's log (in the VM), sent to the node agent with the build log.
    pub dockerd_log: Option<PathBuf>,
    pub docker_host: String,
    /// The Docker CLI with the buildx plugin.
    pub docker_cli: PathBuf,
    pub notify_retry: RetryPolicy,
    pub part_size: u64,
    /// Keep the scratch directory (for debugging).
    pub keep_work: bool,
    /// The static init injected into the rootfs, which makes it bootable.
    pub init: PathBuf,
}

/// The report, and whether it reached the webhook.
pub struct Outcome {
    pub report: BuildReport,
    pub notify: Option<Result<(), NotifyError>>,
}

impl Outcome {
    /// Exit code: the build's outcome; a successful build whose webhook was lost is an
    /// internal error, since nobody was told.
    pub fn exit_code(&self) -> i32 {
        match (&self.report.error, &self.notify) {
            (None, Some(Err(_))) => builder_contract::report::exit_code::INTERNAL_ERROR,
            _ => self.report.exit_code(),
        }
    }
}

/// What the phases found out, kept even when a later phase fails.
#[derive(Default)]
struct Progress {
    commit: Option<String>,
    image_id: Option<String>,
    rootfs: Option<RootfsArtifact>,
    phases: Vec<PhaseTiming>,
    /// Each phase's start, told to the node agent (when the build reports to one).
    events: Option<PhaseEvents>,
}

/// How long the end of a build waits for progress events still queued.
const PHASE_EVENTS_DRAIN: Duration = Duration::from_secs(5);

impl Progress {
    /// Runs one phase, logging its start and end and recording its duration.
    async fn phase<T>(
        &mut self,
        log: &BuildLog,
        phase: Phase,
        work: impl Future<Output = Result<T, BuildError>>,
    ) -> Result<T, BuildError> {
        log.line(&format!("==> {phase}"));
        if let Some(events) = &self.events {
            events.started(phase);
        }
        let started = Instant::now();
        let result = work.await;
        let duration_ms = started.elapsed().as_millis() as u64;
        self.phases.push(PhaseTiming { phase, duration_ms });
        match &result {
            Ok(_) => log.line(&format!(
                "<== {phase} done in {:.2} s",
                duration_ms as f64 / 1000.0
            )),
            Err(_) => log.line(&format!(
                "<== {phase} failed after {:.2} s",
                duration_ms as f64 / 1000.0
            )),
        }
        result
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Runs one build and reports it. Never panics on bad input; every failure is in the report.
pub async fn run(options: &RunOptions) -> Outcome {
    let started_at = SystemTime::now();
    let started = Instant::now();
    let mut log = match BuildLog::create(options.log_file.as_deref(), true) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("warning: cannot open the build log: {e}; logging to stderr only");
            BuildLog::create(None, true).expect("a log without a file cannot fail")
        }
    };
    log.line(&format!("builder-agent {}", env!("CARGO_PKG_VERSION")));

    let secrets = match &options.secrets_file {
        Some(path) => Secrets::load(path)
            .map_err(|e| BuildError::from_chain(Phase::Params, ErrorClass::Internal, &e)),
        None => Ok(Secrets::default()),
    };
    if let Ok(secrets) = &secrets {
        log.redact(secrets.redaction_values());
        log.redact(Git::derived_secrets(git_credentials(secrets)));
        log.redact(registry_login_secrets(&secrets.registry_auths));
    }
    let log = Arc::new(log);
    let params = BuildParams::from_cmdline(&options.cmdline, &options.default_build_id)
        .and_then(|mut params| {
            if let Some(overflow) = secrets.as_ref().ok().and_then(|s| s.build_args.as_ref()) {
                params.merge_overflow_build_args(overflow)?;
            }
            Ok(params)
        })
        .map_err(|e| BuildError::from_chain(Phase::Params, ErrorClass::User, &e));

    let mut progress = Progress::default();
    let result = match (&params, &secrets) {
        (Ok(params), Ok(secrets)) => {
            progress.events = params.notify_url.as_ref().and_then(|url| {
                let secret = secrets.webhook_secret.as_deref()?;
                PhaseEvents::start(log.clone(), url, &params.build_id, secret)
            });
            log.line(&format!(
                "build {}: {} at {} (Dockerfile {}{}, {}{})",
                params.build_id,
                params.repo_url,
                params.revision,
                params.dockerfile,
                params
                    .target
                    .as_ref()
                    .map(|t| format!(", target {t}"))
                    .unwrap_or_default(),
                params.platform,
                if params.build_args.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", build args {}",
                        params
                            .build_args
                            .iter()
                            .map(|(k, _)| k.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                },
            ));
            let result = execute(options, params, secrets, &log, &mut progress).await;
            if let Some(events) = progress.events.take() {
                events.finish(&log, PHASE_EVENTS_DRAIN).await;
            }
            result
        }
        (Err(e), _) | (_, Err(e)) => Err(BuildError {
            phase: e.phase,
            class: e.class,
            message: e.message.clone(),
        }),
    };

    let build_id = match &params {
        Ok(p) => p.build_id.clone(),
        Err(_) => {
            raw_value(&options.cmdline, "build_id").unwrap_or(options.default_build_id.clone())
        }
    };
    let report = BuildReport {
        build_id: build_id.clone(),
        status: if result.is_ok() {
            BuildStatus::Succeeded
        } else {
            BuildStatus::Failed
        },
        repo_url: raw_value(&options.cmdline, "repo_url").unwrap_or_default(),
        revision: raw_value(&options.cmdline, "commit_sha").unwrap_or_default(),
        commit_sha: progress.commit,
        image_digest: progress.image_id,
        inputs: params.as_ref().ok().map(|p| {
            p.inputs(
                secrets
                    .as_ref()
                    .map(|s| s.build_secrets.keys().cloned().collect())
                    .unwrap_or_default(),
            )
        }),
        rootfs: progress.rootfs,
        error: result.as_ref().err().map(BuildError::to_failure),
        phases: progress.phases,
        started_at_unix_ms: unix_ms(started_at),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    match &result {
        Ok(()) => log.line(&format!(
            "build {build_id} succeeded in {:.1} s: {}",
            report.duration_ms as f64 / 1000.0,
            report
                .rootfs
                .as_ref()
                .map(|r| r.location.as_str())
                .unwrap_or_default()
        )),
        Err(e) => log.line(&format!("build {build_id} failed: {e}")),
    }

    if let (Ok(params), Ok(secrets)) = (&params, &secrets) {
        record_status(&log, params, secrets, &report).await;
        send_logs(&log, params, secrets, options).await;
    }
    let notify = notify(&log, &params, options, secrets.as_ref().ok(), &report).await;
    log.line(&format!(
        "report: {}",
        serde_json::to_string(&report).expect("a report always serializes")
    ));
    log.sync();
    Outcome { report, notify }
}

/// Writes the report beside the rootfs as `<s3_key>.status.json` when this run holds S3
/// credentials of its own (a host run); a build granted its upload by a node agent leaves it
/// to the node, which writes it for every build that ends. Best effort: a status that cannot be
/// written is logged, and the webhook still tells.
async fn record_status(
    log: &BuildLog,
    params: &BuildParams,
    secrets: &Secrets,
    report: &BuildReport,
) {
    let (Some(location), Some(credentials)) = (&params.s3, &secrets.s3) else {
        return;
    };
    let written = match S3Client::new(credentials.clone()) {
        Ok(client) => client.put_status(location, report).await,
        Err(e) => Err(e),
    };
    let key = location.status_key();
    match written {
        Ok(()) => log.line(&format!(
            "status {} written to s3://{}/{key}",
            report.status, location.bucket
        )),
        Err(e) => log.line(&format!(
            "warning: cannot write the build status to s3://{}/{key}: {}",
            location.bucket,
            crate::error::chain(&e)
        )),
    }
}

/// Hands the build log and the Docker daemon's to the node agent, before the report (which
/// ends the VM), on success and failure alike; only when the report goes to a node agent.
async fn send_logs(log: &BuildLog, params: &BuildParams, secrets: &Secrets, options: &RunOptions) {
    let (Some(url), Some(secret)) = (&params.notify_url, secrets.webhook_secret.as_deref()) else {
        return;
    };
    let logs: Vec<(LogSource, &Path)> = [
        (LogSource::Build, options.log_file.as_deref()),
        (LogSource::Dockerd, options.dockerd_log.as_deref()),
    ]
    .into_iter()
    .filter_map(|(source, path)| Some((source, path?)))
    .collect();
    crate::guest_logs::send(log, url, &params.build_id, secret.as_bytes(), &logs).await;
}

/// Sends the webhook if there is somewhere to send it.
async fn notify(
    log: &BuildLog,
    params: &Result<BuildParams, BuildError>,
    options: &RunOptions,
    secrets: Option<&Secrets>,
    report: &BuildReport,
) -> Option<Result<(), NotifyError>> {
    // With invalid parameters, a notify_url that is itself valid still gets the failure.
    let url: Url = match params {
        Ok(p) => p.notify_url.clone()?,
        Err(_) => {
            builder_contract::params::parse_notify_url(&raw_value(&options.cmdline, "notify_url")?)
                .ok()?
        }
    };
    let Some(secret) = secrets.and_then(|s| s.webhook_secret.as_deref()) else {
        let error = NotifyError::NoSecret { url };
        log.line(&format!("webhook: not sent: {error}"));
        return Some(Err(error));
    };
    log.line(&format!("==> {}", Phase::Notify));
    let started = Instant::now();
    let result = deliver(log, &url, secret.as_bytes(), report, options.notify_retry).await;
    if let Err(e) = &result {
        log.line(&format!("webhook: giving up: {e}"));
    }
    log.line(&format!(
        "<== {} in {:.2} s",
        Phase::Notify,
        started.elapsed().as_secs_f64()
    ));
    Some(result)
}

fn git_credentials(secrets: &Secrets) -> Option<(&str, &str)> {
    secrets.git_token.as_deref().map(|token| {
        (
            secrets.git_username.as_deref().unwrap_or("x-access-token"),
            token,
        )
    })
}

/// The phases proper. Cleans up its scratch directory and image whatever the result.
async fn execute(
    options: &RunOptions,
    params: &BuildParams,
    secrets: &Secrets,
    log: &BuildLog,
    progress: &mut Progress,
) -> Result<(), BuildError> {
    let grantable = params.notify_url.as_ref().is_some_and(|url| {
        secrets.webhook_secret.is_some()
            && upload_url(url, &params.build_id, UploadStep::Start).is_some()
    });
    if params.s3.is_some() && secrets.s3.is_none() && !grantable {
        return Err(BuildError::internal(
            Phase::Params,
            "s3_bucket is set but the secrets file has no `s3` credentials, and the build does \
             not report to a node agent that could grant the upload",
        ));
    }
    let scratch = options.work_dir.join(&params.build_id);
    std::fs::create_dir_all(&scratch).map_err(|e| {
        BuildError::internal(
            Phase::Params,
            format!("cannot create {}: {e}", scratch.display()),
        )
    })?;
    let tag = format!("builder-vm/build:{}", params.build_id.to_ascii_lowercase());
    let mut docker = None;
    let result = build(
        options,
        params,
        secrets,
        log,
        progress,
        &scratch,
        &tag,
        &mut docker,
    )
    .await;
    if let Some(docker) = &docker {
        docker.remove(log, &tag).await;
    }
    if options.keep_work {
        log.line(&format!(
            "keeping the scratch directory {}",
            scratch.display()
        ));
    } else if let Err(e) = std::fs::remove_dir_all(&scratch) {
        log.line(&format!(
            "warning: cannot remove {}: {e}",
            scratch.display()
        ));
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn build(
    options: &RunOptions,
    params: &BuildParams,
    secrets: &Secrets,
    log: &BuildLog,
    progress: &mut Progress,
    scratch: &Path,
    tag: &str,
    docker_slot: &mut Option<DockerDaemon>,
) -> Result<(), BuildError> {
    let git = Git::new(git_credentials(secrets));
    let source = scratch.join("src");
    progress
        .phase(
            log,
            Phase::Clone,
            git.fetch(log, &params.repo_url, &params.revision, &source),
        )
        .await?;
    let Checkout {
        commit,
        committed_at,
    } = progress
        .phase(log, Phase::Checkout, git.checkout(log, &source))
        .await?;
    log.line(&format!("commit {commit}"));
    progress.commit = Some(commit.clone());

    let context = scratch.join("context.tar");
    let image_id = progress
        .phase(log, Phase::Build, async {
            let docker = docker_slot.insert(DockerDaemon::connect(&options.docker_host).await?);
            use_builtin_frontend_if_unreachable(
                docker,
                log,
                &source.join(params.dockerfile.as_str()),
            )
            .await?;
            let summary = write_context(&source, &params.dockerfile, &context, committed_at)
                .map_err(|e| match &e {
                    ContextError::Io { .. } if is_disk_full(&e) => {
                        BuildError::disk_full(Phase::Build, "writing the build context")
                    }
                    ContextError::Io { .. } => {
                        BuildError::from_chain(Phase::Build, ErrorClass::Internal, &e)
                    }
                    _ => BuildError::from_chain(Phase::Build, ErrorClass::User, &e),
                })?;
            log.line(&format!(
                "context: {} files ({} left out by .dockerignore)",
                summary.files, summary.ignored
            ));
            let _ = std::fs::remove_dir_all(&source);
            // No build id among the labels: an unchanged rebuild must give the same image id
            // for its rootfs to be reused (BuildKit does, cache hits and all).
            let labels = BTreeMap::from([("builder-vm.commit".to_string(), commit.clone())]);
            let buildx = Buildx::new(
                &options.docker_cli,
                &options.docker_host,
                &scratch.join("buildx"),
            )?;
            let id = buildx
                .build(
                    log,
                    &ImageBuild {
                        context: &context,
                        dockerfile: params.dockerfile.as_str(),
                        tag,
                        labels: &labels,
                        target: params.target.as_deref(),
                        platform: &params.platform,
                        build_args: &params.build_args,
                        secrets: &secrets.build_secrets,
                        registry_auths: &secrets.registry_auths,
                    },
                )
                .await;
            let _ = std::fs::remove_file(&context);
            id
        })
        .await?;
    log.line(&format!("image {image_id}"));
    progress.image_id = Some(image_id.clone());
    if let Some(artifact) = reused_rootfs(log, params, &image_id) {
        progress.rootfs = Some(artifact);
        return Ok(());
    }
    let docker = docker_slot.as_ref().expect("the build phase connected");

    let (rootfs_path, config_path) = match &params.s3 {
        Some(_) => (scratch.join("rootfs.ext4"), scratch.join("rootfs.json")),
        None => {
            let dir = options.out_dir.join(&params.build_id);
            std::fs::create_dir_all(&dir).map_err(|e| {
                BuildError::internal(
                    Phase::Convert,
                    format!("cannot create {}: {e}", dir.display()),
                )
            })?;
            (dir.join("rootfs.ext4"), dir.join("rootfs.json"))
        }
    };
    let converted = progress
        .phase(
            log,
            Phase::Convert,
            convert(
                docker,
                log,
                tag,
                &rootfs_path,
                &config_path,
                scratch,
                &options.init,
            ),
        )
        .await?;

    let artifact = match &params.s3 {
        Some(location) => {
            let object = GrantedObject {
                sha256: converted.sha256.clone(),
                image_digest: image_id.clone(),
                commit_sha: commit.clone(),
            };
            progress
                .phase(
                    log,
                    Phase::Upload,
                    upload(
                        options,
                        params,
                        secrets,
                        log,
                        location,
                        &rootfs_path,
                        &config_path,
                        object,
                    ),
                )
                .await?;
            s3_artifact(location, converted.size_bytes, &converted.sha256, false)
        }
        None => RootfsArtifact {
            location: rootfs_path.display().to_string(),
            config_location: config_path.display().to_string(),
            size_bytes: converted.size_bytes,
            sha256: converted.sha256.clone(),
            reused: false,
        },
    };
    progress.rootfs = Some(artifact);
    Ok(())
}

/// The rootfs offered for reuse, when this build goes to S3 and its image is the one that
/// rootfs was made from.
fn reused_rootfs(log: &BuildLog, params: &BuildParams, image_id: &str) -> Option<RootfsArtifact> {
    let (Some(reuse), Some(location)) = (&params.reuse, &params.s3) else {
        return None;
    };
    if reuse.image_digest != image_id {
        log.line(&format!(
            "image {image_id} differs from {}'s ({}): converting and uploading",
            location, reuse.image_digest
        ));
        return None;
    }
    log.line(&format!(
        "image {image_id} is the one already at {location}: not converted or uploaded again"
    ));
    Some(s3_artifact(location, reuse.size_bytes, &reuse.sha256, true))
}

/// The report's rootfs at `location`, its image config beside it.
fn s3_artifact(
    location: &S3Location,
    size_bytes: u64,
    sha256: &str,
    reused: bool,
) -> RootfsArtifact {
    RootfsArtifact {
        location: location.to_string(),
        config_location: format!("s3://{}/{}", location.bucket, location.config_key()),
        size_bytes,
        sha256: sha256.to_string(),
        reused,
    }
}

/// The grant of the node agent the build reports to, when it reports to one (and can sign).
fn node_grant(params: &BuildParams, secrets: &Secrets, object: GrantedObject) -> Option<NodeGrant> {
    NodeGrant::new(
        params.notify_url.as_ref()?,
        &params.build_id,
        secrets.webhook_secret.as_deref()?.as_bytes(),
        object,
    )
}

/// Uploads the image config to `<s3_key>.json` and the rootfs to `s3_key` (the config first:
/// the rootfs object appearing means the build is complete), each request signed with the
/// secrets' `s3` credentials when there are some (a host run), else granted by the node agent
/// the build reports to (the builder VM holds no S3 key); one engine either way.
#[allow(clippy::too_many_arguments)]
async fn upload(
    options: &RunOptions,
    params: &BuildParams,
    secrets: &Secrets,
    log: &BuildLog,
    location: &S3Location,
    rootfs: &Path,
    config: &Path,
    object: GrantedObject,
) -> Result<(), BuildError> {
    let failed =
        |e: &builder_s3::S3Error| BuildError::from_chain(Phase::Upload, ErrorClass::Internal, e);
    let config = std::fs::read(config).map_err(|e| {
        BuildError::internal(Phase::Upload, format!("cannot read the image config: {e}"))
    })?;
    let mut next_report = 0u64;
    let progress = |sent: u64, total: u64| {
        let percent = sent * 100 / total.max(1);
        // Every 10 % or so (parts land unevenly), and always the end.
        if percent >= next_report || sent == total {
            log.line(&format!("upload: {sent} of {total} bytes ({percent} %)"));
            next_report = percent + 10;
        }
    };
    let uploader = Uploader::default();
    match &secrets.s3 {
        Some(credentials) => {
            let client = S3Client::new(credentials.clone()).map_err(|e| failed(&e))?;
            let metadata = vec![
                ("build-id".to_string(), params.build_id.clone()),
                ("commit-sha".to_string(), object.commit_sha.clone()),
                ("status".to_string(), BuildStatus::Succeeded.to_string()),
                ("rootfs-sha256".to_string(), object.sha256.clone()),
                ("image-digest".to_string(), object.image_digest.clone()),
            ];
            let config_key = location.config_key();
            let direct = DirectUpload::new(
                &client,
                &location.bucket,
                &location.key,
                ObjectAttributes {
                    content_type: "application/octet-stream",
                    metadata: &metadata,
                },
            )
            .with_companion(
                &config_key,
                ObjectAttributes {
                    content_type: "application/json",
                    metadata: &metadata,
                },
            );
            uploader
                .upload(
                    &direct,
                    rootfs,
                    Some(config.into()),
                    options.part_size,
                    progress,
                )
                .await
        }
        None => {
            let grant = node_grant(params, secrets, object).ok_or_else(|| {
                BuildError::internal(
                    Phase::Upload,
                    "no S3 credentials and no node to grant the upload",
                )
            })?;
            log.line("upload: granted by the node agent (this VM holds no S3 key)");
            uploader
                .upload(
                    &grant,
                    rootfs,
                    Some(config.into()),
                    options.part_size,
                    progress,
                )
                .await
        }
    }
    .map_err(|e| failed(&e))
}

/// Converts the image into the rootfs and writes the image config beside it.
async fn convert(
    docker: &DockerDaemon,
    log: &BuildLog,
    image: &str,
    rootfs: &Path,
    config: &Path,
    scratch: &Path,
    init: &Path,
) -> Result<ConvertReport, BuildError> {
    let options = ConvertOptions {
        work_dir: scratch.join("convert"),
        init: Some(init.to_path_buf()),
        ..ConvertOptions::default()
    };
    create_work_dir(&options.work_dir)?;
    let result = convert_image(docker, log, image, rootfs, &options).await;
    let _ = std::fs::remove_dir_all(&options.work_dir);
    let (report, route) = result?;
    log.line(&format!("rootfs made from {}", route.name()));
    let json =
        serde_json::to_vec_pretty(&report.config).expect("an image config always serializes");
    std::fs::write(config, json).map_err(|e| {
        if is_disk_full(&e) {
            BuildError::disk_full(Phase::Convert, "writing the image config")
        } else {
            BuildError::internal(
                Phase::Convert,
                format!("cannot write {}: {e}", config.display()),
            )
        }
    })?;
    log.line(&format!(
        "rootfs: {} bytes, {} entries, sha256 {}",
        report.size_bytes, report.entries, report.sha256
    ));
    Ok(report)
}
