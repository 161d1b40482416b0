//! The `builder-agent` command line: `run` (one build), `convert` (image archive → ext4),
//! `convert-image` (image in the Docker daemon → ext4, as the pipeline converts), `upload` (a
//! file to S3, as the pipeline uploads a rootfs).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use builder_contract::report::exit_code;
use builder_contract::{ErrorClass, S3Location, Secrets};
use clap::{Parser, Subcommand};

use crate::notify::RetryPolicy;
use crate::pipeline::{self, RunOptions};

#[derive(Debug, Parser)]
#[command(
    name = "builder-agent",
    version,
    about = "Builds one container image from a git repository into a bootable ext4 root filesystem."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one build: clone, docker build, convert to ext4, upload, notify.
    Run(RunArgs),
    /// Convert a `docker save` or OCI image archive into an ext4 root filesystem.
    Convert(ConvertArgs),
    /// Convert an image in the Docker daemon into an ext4 root filesystem, as a build does:
    /// from its overlay2 layer directories when readable here, else through `docker save`.
    ConvertImage(ConvertImageArgs),
    /// Upload a file to S3 as a build uploads its rootfs (multipart, several parts in flight,
    /// retries) and print what it took as JSON.
    Upload(UploadArgs),
    /// Inside the builder VM: be its init (what pid 1 runs when started with no arguments).
    VmInit,
    /// Inside the builder VM: start dockerd and run the build (started by `vm-init`).
    #[command(hide = true)]
    VmBuild,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Build parameters as `key=value` words (the kernel command-line keys: repo_url,
    /// commit_sha, dockerfile, target, platform, build_args, s3_bucket, s3_key, notify_url,
    /// build_id). Default: /proc/cmdline.
    #[arg(long)]
    params: Option<String>,
    /// JSON file with S3 credentials, the webhook secret, a git token, build secrets and
    /// registry logins.
    #[arg(long)]
    secrets: Option<PathBuf>,
    /// Where the rootfs goes when no s3_bucket is given (`DIR/<build_id>/rootfs.ext4`).
    #[arg(long, default_value = "out")]
    out_dir: PathBuf,
    /// Scratch space for the checkout, context and image archive.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The build log.
    #[arg(long, default_value = "/var/log/build.log")]
    log_file: PathBuf,
    /// The Docker daemon.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker_host: String,
    /// The Docker CLI with the buildx plugin, which runs the build.
    #[arg(long, env = "BUILDER_DOCKER_CLI", default_value = crate::buildkit::DEFAULT_DOCKER_CLI)]
    docker_cli: PathBuf,
    /// Webhook delivery attempts before giving up.
    #[arg(long, default_value_t = RetryPolicy::default().attempts)]
    notify_attempts: u32,
    /// Longest delay before the second webhook attempt, in milliseconds (doubles each time;
    /// each wait is drawn at random below it).
    #[arg(long, default_value_t = RetryPolicy::default().first_delay.as_millis() as u64)]
    notify_first_delay_ms: u64,
    /// Multipart upload part size in MiB.
    #[arg(long, default_value_t = builder_s3::DEFAULT_PART_SIZE >> 20)]
    part_size_mib: u64,
    /// Keep the scratch directory after the build.
    #[arg(long)]
    keep_work: bool,
    /// The static init injected into the rootfs (default: `builder-init` beside this binary).
    #[arg(long, env = "BUILDER_INIT")]
    init: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ConvertArgs {
    /// `docker save` archive or OCI image layout archive.
    image: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
struct ConvertImageArgs {
    /// Image name or id in the daemon.
    image: String,
    #[command(flatten)]
    output: OutputArgs,
    /// The Docker daemon.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker_host: String,
}

#[derive(Debug, clap::Args)]
struct UploadArgs {
    /// The file to upload.
    file: PathBuf,
    /// JSON file whose `s3` holds the endpoint and credentials (the secrets file of `run`).
    #[arg(long)]
    secrets: PathBuf,
    #[arg(long)]
    bucket: String,
    #[arg(long)]
    key: String,
    /// Multipart upload part size in MiB.
    #[arg(long, default_value_t = builder_s3::DEFAULT_PART_SIZE >> 20)]
    part_size_mib: u64,
    /// Parts sent at once.
    #[arg(long, default_value_t = builder_s3::DEFAULT_PARTS_IN_FLIGHT)]
    parts_in_flight: usize,
}

/// The ext4 file to write and how.
#[derive(Debug, clap::Args)]
struct OutputArgs {
    /// The ext4 file to write.
    output: PathBuf,
    /// Scratch space.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Free space left in the filesystem, in percent of its content.
    #[arg(long)]
    free_space_percent: Option<u32>,
    /// The static init injected into the rootfs (default: `builder-init` beside this binary).
    #[arg(long, env = "BUILDER_INIT", conflicts_with = "no_init")]
    init: Option<PathBuf>,
    /// Write the image's filesystem only, without the init that makes it bootable.
    #[arg(long)]
    no_init: bool,
}

/// `builder-init` in the directory of the running executable.
pub fn default_init() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("builder-init")))
        .unwrap_or_else(|| PathBuf::from("builder-init"))
}

/// Parses the command line, runs it, returns the process exit code.
pub fn main() -> i32 {
    // The kernel starts init with no arguments (`init=/usr/local/bin/builder-agent`).
    if std::process::id() == 1 && std::env::args_os().len() == 1 {
        crate::vm::init();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit_code::USAGE
            } else {
                exit_code::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Convert(args) => convert(args),
        Command::ConvertImage(args) => convert_image(args),
        Command::Upload(args) => upload(args),
        Command::VmInit => crate::vm::init(),
        Command::VmBuild => crate::vm::build(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn run(args: RunArgs) -> i32 {
    let cmdline = match args.params {
        Some(params) => params,
        None => match std::fs::read_to_string("/proc/cmdline") {
            Ok(text) => text,
            Err(e) => {
                eprintln!("error: no --params given and /proc/cmdline cannot be read: {e}");
                return exit_code::USAGE;
            }
        },
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let options = RunOptions {
        cmdline,
        default_build_id: format!("host-{}-{}", now.as_secs(), std::process::id()),
        secrets_file: args.secrets,
        out_dir: args.out_dir,
        work_dir: args
            .work_dir
            .unwrap_or_else(|| std::env::temp_dir().join("builder-agent")),
        log_file: Some(args.log_file),
        dockerd_log: None,
        docker_host: args.docker_host,
        docker_cli: args.docker_cli,
        notify_retry: RetryPolicy {
            attempts: args.notify_attempts,
            first_delay: Duration::from_millis(args.notify_first_delay_ms),
            ..RetryPolicy::default()
        },
        part_size: args.part_size_mib << 20,
        keep_work: args.keep_work,
        init: args.init.unwrap_or_else(default_init),
    };
    let outcome = runtime().block_on(pipeline::run(&options));
    println!(
        "{}",
        serde_json::to_string_pretty(&outcome.report).expect("a report always serializes")
    );
    outcome.exit_code()
}

impl OutputArgs {
    fn options(&self) -> builder_rootfs::ConvertOptions {
        let mut options = builder_rootfs::ConvertOptions::default();
        if let Some(dir) = &self.work_dir {
            options.work_dir = dir.clone();
        }
        if let Some(percent) = self.free_space_percent {
            options.free_space_percent = percent;
        }
        if !self.no_init {
            options.init = Some(self.init.clone().unwrap_or_else(default_init));
        }
        options
    }
}

/// Prints what a conversion produced as JSON, with `extra` fields.
fn print_report(report: &builder_rootfs::ConvertReport, extra: serde_json::Value) {
    let mut json = serde_json::json!({
        "image_id": report.image_id,
        "size_bytes": report.size_bytes,
        "sha256": report.sha256,
        "entries": report.entries,
        "config": report.config,
    });
    if let (Some(json), serde_json::Value::Object(extra)) = (json.as_object_mut(), extra) {
        json.extend(extra);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json).expect("a report always serializes")
    );
}

fn convert(args: ConvertArgs) -> i32 {
    match builder_rootfs::convert(&args.image, &args.output.output, &args.output.options()) {
        Ok(report) => {
            print_report(&report, serde_json::json!({}));
            exit_code::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", crate::error::chain(&e));
            if e.is_user_caused() {
                exit_code::USER_ERROR
            } else {
                exit_code::INTERNAL_ERROR
            }
        }
    }
}

fn convert_image(args: ConvertImageArgs) -> i32 {
    let log = match crate::log::BuildLog::create(None, true) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("error: cannot start the log: {e}");
            return exit_code::INTERNAL_ERROR;
        }
    };
    let options = args.output.options();
    let result = runtime().block_on(async {
        let docker = crate::docker::DockerDaemon::connect(&args.docker_host).await?;
        crate::convert::convert_image(&docker, &log, &args.image, &args.output.output, &options)
            .await
    });
    match result {
        Ok((report, route)) => {
            let fallback = match &route {
                crate::convert::ImageRoute::DockerSave(reason) => Some(reason.as_str()),
                crate::convert::ImageRoute::LayerDirs => None,
            };
            print_report(
                &report,
                serde_json::json!({ "route": route.name(), "fallback_reason": fallback }),
            );
            exit_code::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            if e.class == ErrorClass::User {
                exit_code::USER_ERROR
            } else {
                exit_code::INTERNAL_ERROR
            }
        }
    }
}

fn upload(args: UploadArgs) -> i32 {
    let location = match S3Location::new(&args.bucket, &args.key) {
        Ok(location) => location,
        Err(e) => {
            eprintln!("error: {e}");
            return exit_code::USAGE;
        }
    };
    let credentials = match Secrets::load(&args.secrets) {
        Ok(Secrets { s3: Some(s3), .. }) => s3,
        Ok(_) => {
            eprintln!(
                "error: the secrets file {} has no `s3` credentials",
                args.secrets.display()
            );
            return exit_code::USAGE;
        }
        Err(e) => {
            eprintln!("error: {}", crate::error::chain(&e));
            return exit_code::USAGE;
        }
    };
    let started = Instant::now();
    let result = runtime().block_on(async {
        let client = builder_s3::S3Client::new(credentials)?;
        let direct = builder_s3::DirectUpload::new(
            &client,
            &location.bucket,
            &location.key,
            builder_s3::ObjectAttributes {
                content_type: "application/octet-stream",
                metadata: &[],
            },
        );
        builder_s3::Uploader::default()
            .with_parts_in_flight(args.parts_in_flight)
            .upload(
                &direct,
                &args.file,
                None,
                args.part_size_mib << 20,
                |_, _| {},
            )
            .await
    });
    match result {
        Ok(()) => {
            let json = serde_json::json!({
                "location": location.to_string(),
                "seconds": started.elapsed().as_secs_f64(),
                "part_size_mib": args.part_size_mib,
                "parts_in_flight": args.parts_in_flight,
            });
            println!("{json}");
            exit_code::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", crate::error::chain(&e));
            exit_code::INTERNAL_ERROR
        }
    }
}
