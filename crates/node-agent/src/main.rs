//! `node-agent`: `serve` runs the daemon; the other commands are its command-line client.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use builder_contract::LogSource;
use clap::{Parser, Subcommand};
use node_agent::client::{self, Client, Connection};
use node_agent::config::{Config, ServeArgs};
use node_agent::flags::InputFlags;
use node_agent::local_source::bundle_dir;
use node_agent::model::BuildRequest;
use node_agent::node::Node;
use node_agent::tokens::{BucketScope, HostScope, TokenName, TokensFile};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Builds container images from git repos inside throw-away microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent daemon.
    Serve(Box<ServeArgs>),
    /// Submit a build.
    Submit(Box<SubmitArgs>),
    /// Show one build.
    Status {
        #[command(flatten)]
        conn: Connection,
        id: String,
        /// Print the full JSON.
        #[arg(long)]
        json: bool,
    },
    /// List builds, newest first.
    List {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        state: Option<String>,
        /// Only this requester's builds.
        #[arg(long)]
        requester: Option<String>,
        /// Only builds whose repository URL contains this text (any case).
        #[arg(long)]
        repo: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a build.
    Cancel {
        #[command(flatten)]
        conn: Connection,
        id: String,
    },
    /// Print a build's log: the console (followed while the build runs), or another source.
    Logs {
        #[command(flatten)]
        conn: Connection,
        id: String,
        #[arg(long)]
        no_follow: bool,
        /// Which log: console, vmm (the VMM's own), build (the guest agent's), dockerd.
        #[arg(long, default_value = "console", value_parser = parse_log_source)]
        source: LogSource,
    },
    /// List or delete the build caches (the token's namespace's; an admin's all).
    Cache {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Manage the scoped API tokens of this host's node agent (its tokens file; the running
    /// daemon picks changes up without a restart).
    Token {
        #[command(flatten)]
        file: TokenFileArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// Where the tokens file is: as `serve` with the same config would find it.
#[derive(Debug, clap::Args)]
struct TokenFileArgs {
    /// The daemon's TOML config file.
    #[arg(long, env = "NODE_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The daemon's state directory (the file defaults to `<work_dir>/api-tokens.toml`).
    #[arg(long, env = "NODE_AGENT_WORK_DIR", global = true)]
    work_dir: Option<PathBuf>,
    /// The tokens file itself.
    #[arg(long, env = "NODE_AGENT_API_TOKENS_FILE", global = true)]
    api_tokens_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token: prints the token and its requester's webhook key, once.
    Add {
        /// The token's name: the requester of the builds it submits.
        name: String,
        /// A bucket its builds may upload to, optionally with the key prefix they must use
        /// (`rootfs/team-a/`); `*` for any (repeatable).
        #[arg(long = "bucket", value_name = "BUCKET[/PREFIX]")]
        buckets: Vec<String>,
        /// A host its `notify_url`s may name, optionally with the port; `*` for any
        /// (repeatable).
        #[arg(long = "notify-host", value_name = "HOST[:PORT]")]
        notify_hosts: Vec<String>,
        /// May see and cancel every build, use the dashboard and submit for other requesters.
        #[arg(long)]
        admin: bool,
        /// The namespace of its build caches (default: its name); tokens given the same
        /// namespace share their caches, no others do.
        #[arg(long, value_name = "NAMESPACE")]
        cache_namespace: Option<String>,
        /// Issue a new token and webhook key for an existing name (the old ones stop working).
        #[arg(long)]
        replace: bool,
    },
    /// List the tokens: names, rights and scopes (never a secret).
    List,
    /// Remove a token: it stops working at once.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// The caches, most recently used first: id, bytes, commits, namespace/name.
    List {
        /// Only this namespace's (admin tokens; others see their own only).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Delete a cache's committed disk (builds running with a fork of it keep their fork).
    Delete { id: String },
}

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    #[command(flatten)]
    conn: Connection,
    /// Git repository URL, or a local directory: uploaded to the node agent as one commit
    /// (a git work tree's committed state, any other directory as it is).
    repo: String,
    /// Branch or tag to build (repository URLs only).
    #[arg(long = "ref", conflicts_with = "commit")]
    git_ref: Option<String>,
    /// Full commit id to build (repository URLs only).
    #[arg(long)]
    commit: Option<String>,
    /// Build a local directory in a git work tree as it is on disk, uncommitted changes
    /// included, instead of its committed state.
    #[arg(long)]
    snapshot: bool,
    #[arg(long)]
    dockerfile: Option<String>,
    #[command(flatten)]
    inputs: InputFlags,
    #[arg(long)]
    s3_bucket: Option<String>,
    #[arg(long)]
    s3_key: Option<String>,
    #[arg(long)]
    notify_url: Option<String>,
    /// Default: 2, or the node's capacity when that is smaller.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Default: 2048, or the node's capacity when that is smaller.
    #[arg(long)]
    mem_mib: Option<u64>,
    #[arg(long, default_value_t = 4)]
    disk_gib: u32,
    #[arg(long)]
    timeout_s: Option<u64>,
    /// The build's requester (admin tokens only; default the token's own name).
    #[arg(long)]
    requester: Option<String>,
    /// The build cache's key (default: the repository URL; for a local directory
    /// `dir:<its canonical path>`, as its upload's URL is new each time).
    #[arg(long)]
    cache_key: Option<String>,
    /// Build with a new empty cache disk and do not keep it.
    #[arg(long)]
    no_cache: bool,
    /// Convert and upload the rootfs even when the image did not change.
    #[arg(long)]
    force_upload: bool,
    /// Follow the build to its end, streaming its log.
    #[arg(long)]
    wait: bool,
}

/// `--source`: a log source by name, or an error listing the valid ones.
fn parse_log_source(name: &str) -> Result<LogSource, String> {
    LogSource::parse(name)
        .ok_or_else(|| format!("not a log source; valid ones are {}", LogSource::names()))
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::exit(2);
        }
    }
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Serve(args) => serve(*args).await.map(|()| 0),
        Command::Submit(args) => {
            let SubmitArgs {
                conn,
                repo,
                git_ref,
                commit,
                dockerfile,
                inputs,
                s3_bucket,
                s3_key,
                notify_url,
                vcpus,
                mem_mib,
                disk_gib,
                timeout_s,
                wait,
                snapshot,
                requester,
                cache_key,
                no_cache,
                force_upload,
            } = *args;
            let client = Client::new(&conn)?;
            // Read the flags' files before a directory is uploaded for nothing.
            let mut request = BuildRequest {
                repo_url: repo.clone(),
                commit_sha: None,
                git_ref: None,
                dockerfile,
                target: None,
                platform: None,
                build_args: Default::default(),
                secrets: Default::default(),
                git_token: None,
                git_username: None,
                registry_auths: Default::default(),
                s3_bucket,
                s3_key,
                notify_url,
                vcpus,
                mem_mib,
                disk_gib,
                timeout_s,
                egress_allow: vec![],
                // The token's own name (an admin token may name another with --requester).
                requester,
                cache_key,
                no_cache,
                force_upload,
            };
            inputs.apply(&mut request)?;
            // The node refuses it too (it keeps no output); refused here before an upload.
            if request.s3_bucket.is_none() {
                bail!(
                    "--s3-bucket (and --s3-key) is required: the node agent keeps no build \
                     output, the rootfs is deleted with the VM unless it is uploaded to S3"
                );
            }
            let (repo, commit) = if Path::new(&repo).is_dir() {
                if git_ref.is_some() || commit.is_some() {
                    bail!("--ref and --commit name a revision of a repository URL; {repo} is a local directory, built as it is committed (or with --snapshot, as it is on disk)");
                }
                let dir = PathBuf::from(&repo);
                if request.cache_key.is_none() {
                    let path = dir
                        .canonicalize()
                        .with_context(|| format!("cannot resolve the path of {repo}"))?;
                    request.cache_key = Some(format!("dir:{}", path.display()));
                }
                let bundle = tokio::task::spawn_blocking(move || bundle_dir(&dir, snapshot))
                    .await?
                    .with_context(|| format!("cannot make a git bundle of {repo}"))?;
                let size = bundle.bytes.len();
                let uploaded = client
                    .upload_source(bundle.bytes)
                    .await
                    .with_context(|| format!("cannot upload {} ({size} bytes)", bundle.what))?;
                if uploaded.commit_sha != bundle.commit_sha {
                    bail!(
                        "the node agent stored commit {} of the upload, not {}",
                        uploaded.commit_sha,
                        bundle.commit_sha
                    );
                }
                eprintln!(
                    "uploaded {} as commit {} ({size} bytes)",
                    bundle.what, uploaded.commit_sha
                );
                (uploaded.repo_url.to_string(), Some(uploaded.commit_sha))
            } else if snapshot {
                bail!("--snapshot applies to a local directory; {repo} is not one");
            } else {
                (repo, commit)
            };
            request.repo_url = repo;
            request.commit_sha = commit;
            request.git_ref = git_ref;
            let submitted = client.submit(&request).await?;
            println!("{}", submitted.id);
            if !wait {
                return Ok(0);
            }
            let view = client.wait(&submitted.id).await?;
            println!("{}", client::summary(&view));
            if let Some(r) = &view.rootfs {
                println!(
                    "rootfs: {} ({} bytes, sha256 {}){}",
                    r.location,
                    r.size_bytes.unwrap_or(0),
                    r.sha256.as_deref().unwrap_or("-"),
                    if r.reused {
                        ", reused: the image did not change"
                    } else {
                        ""
                    }
                );
            }
            Ok(client::exit_code(&view))
        }
        Command::Status { conn, id, json } => {
            let view = Client::new(&conn)?.status(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{}", client::summary(&view));
                if let Some(cache) = client::cache_summary(&view) {
                    println!("{cache}");
                }
            }
            Ok(client::exit_code(&view))
        }
        Command::List {
            conn,
            state,
            requester,
            repo,
            limit,
            cursor,
        } => {
            let list = Client::new(&conn)?
                .list(&client::ListQuery {
                    state: state.as_deref(),
                    requester: requester.as_deref(),
                    repo: repo.as_deref(),
                    limit,
                    cursor: cursor.as_deref(),
                })
                .await?;
            for b in &list.builds {
                println!("{}", client::summary(b));
            }
            if let Some(c) = list.next_cursor {
                eprintln!("(more: --cursor {c})");
            }
            Ok(0)
        }
        Command::Cancel { conn, id } => {
            let s = Client::new(&conn)?.cancel(&id).await?;
            println!("{} {}", s.id, s.state);
            Ok(0)
        }
        Command::Cache { conn, command } => {
            let client = Client::new(&conn)?;
            match command {
                CacheCommand::List { namespace } => {
                    for c in client.caches(namespace.as_deref()).await?.caches {
                        println!("{}", client::cache_line(&c));
                    }
                }
                CacheCommand::Delete { id } => {
                    let c = client.delete_cache(&id).await?;
                    eprintln!("deleted {}", client::cache_line(&c));
                }
            }
            Ok(0)
        }
        Command::Token { file, command } => token(file, command).map(|()| 0),
        Command::Logs {
            conn,
            id,
            no_follow,
            source,
        } => {
            Client::new(&conn)?
                .logs(&id, source, !no_follow, |line| println!("{line}"))
                .await?;
            Ok(0)
        }
    }
}

/// `node-agent token ...` on the tokens file `serve` would use.
fn token(file: TokenFileArgs, command: TokenCommand) -> Result<()> {
    let args = ServeArgs {
        config: file.config,
        work_dir: file.work_dir,
        api_tokens_file: file.api_tokens_file,
        ..Default::default()
    };
    let path = Config::api_tokens_file_of(&args).context("cannot load the configuration")?;
    match command {
        TokenCommand::Add {
            name,
            buckets,
            notify_hosts,
            admin,
            cache_namespace,
            replace,
        } => {
            let name = TokenName::try_from(name)?;
            let cache_namespace = cache_namespace
                .map(|ns| {
                    TokenName::try_from(ns).context(
                        "--cache-namespace is not valid (a namespace is written like a token name)",
                    )
                })
                .transpose()?;
            let buckets = buckets
                .into_iter()
                .map(BucketScope::try_from)
                .collect::<Result<Vec<_>, _>>()?;
            let notify_hosts = notify_hosts
                .into_iter()
                .map(HostScope::try_from)
                .collect::<Result<Vec<_>, _>>()?;
            let issued = TokensFile::add(
                &path,
                name.clone(),
                admin,
                buckets,
                notify_hosts,
                cache_namespace,
                replace,
            )?;
            println!("token: {}", issued.token);
            println!("webhook_key: {}", issued.webhook_key);
            eprintln!(
                "Give the token to {name}: {} keeps only its SHA-256, so it cannot be shown \
                 again. The webhook key verifies the webhooks of {name}'s builds (install it at \
                 the receiver); it stays in {} for the node to sign with.",
                path.display(),
                path.display()
            );
        }
        TokenCommand::List => {
            for e in TokensFile::list(&path)? {
                let join = |items: Vec<String>| {
                    if items.is_empty() {
                        "-".to_string()
                    } else {
                        items.join(",")
                    }
                };
                println!(
                    "{}\t{}\tbuckets={}\tnotify_hosts={}\tcache_namespace={}",
                    e.name,
                    if e.admin { "admin" } else { "-" },
                    join(e.buckets.into_iter().map(String::from).collect()),
                    join(e.notify_hosts.into_iter().map(String::from).collect()),
                    e.cache_namespace.as_ref().unwrap_or(&e.name),
                );
            }
        }
        TokenCommand::Remove { name } => {
            TokensFile::remove(&path, &name)?;
            eprintln!("removed the token {name} from {}", path.display());
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODE_AGENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_current_span(false)
        .init();
    let config = Config::load(&args).context("cannot load the configuration")?;
    let launcher = node_agent::vmm::launcher(&config).context("cannot set up the VMM")?;
    let node = Node::start(config, launcher)
        .await
        .context("cannot start the node agent")?;
    node_agent::serve(node).await
}
