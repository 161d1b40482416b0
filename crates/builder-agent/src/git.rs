//! Clone and checkout: fetch exactly the requested revision, shallow, with submodules.
//!
//! The repository is hostile input. Git runs with no system or global config, no terminal
//! prompts, object checking on, and the `file` protocol forbidden (a submodule must not read the
//! VM's own files). A token travels in the environment as an `http.extraHeader` config entry,
//! never on a command line, and the log scrubs it.

use std::path::Path;

use builder_contract::{Phase, Revision};
use tokio::process::Command;
use url::Url;

use crate::error::BuildError;
use crate::log::BuildLog;
use crate::process::run_logged;

/// How to run git for one build.
pub struct Git {
    /// `(name, value)` config entries passed through `GIT_CONFIG_*` environment variables.
    config: Vec<(String, String)>,
}

impl Git {
    /// `credentials`: `(user, token)` for HTTP(S) remotes.
    pub fn new(credentials: Option<(&str, &str)>) -> Self {
        let mut config = vec![
            ("protocol.file.allow".into(), "never".into()),
            ("protocol.ext.allow".into(), "never".into()),
            ("transfer.fsckObjects".into(), "true".into()),
            ("core.hooksPath".into(), "/dev/null".into()),
            ("advice.detachedHead".into(), "false".into()),
            ("init.defaultBranch".into(), "main".into()),
            ("http.lowSpeedLimit".into(), "1000".into()),
            ("http.lowSpeedTime".into(), "60".into()),
        ];
        if let Some((user, token)) = credentials {
            let basic = crate::basic_auth::encode(user, token);
            config.push((
                "http.extraHeader".into(),
                format!("Authorization: Basic {basic}"),
            ));
        }
        Git { config }
    }

    /// Strings derived from the credentials that the log must also hide.
    pub fn derived_secrets(credentials: Option<(&str, &str)>) -> Vec<String> {
        credentials
            .map(|(user, token)| vec![crate::basic_auth::encode(user, token)])
            .unwrap_or_default()
    }

    fn command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new("git");
        cmd.current_dir(dir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_COUNT", self.config.len().to_string());
        for (i, (key, value)) in self.config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), key)
                .env(format!("GIT_CONFIG_VALUE_{i}"), value);
        }
        cmd
    }

    async fn run(
        &self,
        log: &BuildLog,
        phase: Phase,
        dir: &Path,
        args: &[&str],
    ) -> Result<crate::process::Finished, BuildError> {
        log.line(&format!("$ git {}", args.join(" ")));
        run_logged(log, self.command(dir).args(args))
            .await
            .map_err(|e| BuildError::internal(phase, format!("cannot run git: {e}")))
    }

    /// Fetches `revision` of `url` into `dir` (created empty). Returns nothing: the fetched commit
    /// is `FETCH_HEAD`, checked out by [`Git::checkout`].
    pub async fn fetch(
        &self,
        log: &BuildLog,
        url: &Url,
        revision: &Revision,
        dir: &Path,
    ) -> Result<(), BuildError> {
        const PHASE: Phase = Phase::Clone;
        std::fs::create_dir_all(dir).map_err(|e| {
            BuildError::internal(PHASE, format!("cannot create {}: {e}", dir.display()))
        })?;
        for args in [
            &["init", "-q", "."][..],
            &["remote", "add", "origin", url.as_str()],
        ] {
            let done = self.run(log, PHASE, dir, args).await?;
            if !done.status.success() {
                return Err(BuildError::internal(
                    PHASE,
                    format!("git {} failed: {}", args[0], done.tail_text()),
                ));
            }
        }
        let wanted = revision.as_str();
        let shallow = self
            .run(
                log,
                PHASE,
                dir,
                &["fetch", "--depth=1", "--no-tags", "origin", wanted],
            )
            .await?;
        if shallow.status.success() {
            return Ok(());
        }
        let reason = shallow.tail_text();
        if reason.contains("No space left on device") {
            return Err(BuildError::disk_full(PHASE, "git fetch"));
        }
        if is_unreachable(&reason) {
            return Err(BuildError::user(
                PHASE,
                format!("cannot reach the repository {url}: {}", last_line(&reason)),
            ));
        }
        // Servers that refuse a commit id in a shallow fetch (no allowReachableSHA1InWant) still
        // serve it in a full fetch of every branch and tag.
        if let Revision::Commit(sha) = revision {
            log.line("the server refused a shallow fetch of the commit; fetching all branches");
            let full = self
                .run(
                    log,
                    PHASE,
                    dir,
                    &[
                        "fetch",
                        "--no-tags",
                        "origin",
                        "+refs/heads/*:refs/remotes/origin/*",
                        "+refs/tags/*:refs/tags/*",
                    ],
                )
                .await?;
            if !full.status.success() {
                return Err(BuildError::user(
                    PHASE,
                    format!("cannot fetch {url}: {}", last_line(&full.tail_text())),
                ));
            }
            let object = format!("{sha}^{{commit}}");
            let found = self
                .run(log, PHASE, dir, &["cat-file", "-e", &object])
                .await?;
            if !found.status.success() {
                return Err(BuildError::user(
                    PHASE,
                    format!("the commit {sha} does not exist in {url}"),
                ));
            }
            let pinned = self
                .run(log, PHASE, dir, &["update-ref", "FETCH_HEAD", sha])
                .await?;
            if !pinned.status.success() {
                return Err(BuildError::internal(PHASE, pinned.tail_text()));
            }
            return Ok(());
        }
        Err(BuildError::user(
            PHASE,
            format!(
                "the ref `{wanted}` does not exist in {url}: {}",
                last_line(&reason)
            ),
        ))
    }

    /// Checks out `FETCH_HEAD` with its submodules; returns the commit it checked out.
    pub async fn checkout(&self, log: &BuildLog, dir: &Path) -> Result<Checkout, BuildError> {
        const PHASE: Phase = Phase::Checkout;
        let checkout = self
            .run(
                log,
                PHASE,
                dir,
                &["checkout", "-q", "--detach", "FETCH_HEAD"],
            )
            .await?;
        if !checkout.status.success() {
            let reason = checkout.tail_text();
            if reason.contains("No space left on device") {
                return Err(BuildError::disk_full(PHASE, "git checkout"));
            }
            return Err(BuildError::user(
                PHASE,
                format!("checkout failed: {}", last_line(&reason)),
            ));
        }
        if dir.join(".gitmodules").exists() {
            let submodules = self
                .run(
                    log,
                    PHASE,
                    dir,
                    &["submodule", "update", "--init", "--recursive", "--depth=1"],
                )
                .await?;
            if !submodules.status.success() {
                return Err(BuildError::user(
                    PHASE,
                    format!(
                        "submodule update failed: {}",
                        last_line(&submodules.tail_text())
                    ),
                ));
            }
        }
        let head = self
            .run(log, PHASE, dir, &["show", "-s", "--format=%H %ct", "HEAD"])
            .await?;
        let line = head.tail.last().cloned().unwrap_or_default();
        match line.split_once(' ') {
            Some((commit, time)) if head.status.success() && commit.len() >= 40 => Ok(Checkout {
                commit: commit.to_owned(),
                committed_at: time.parse().unwrap_or(0),
            }),
            _ => Err(BuildError::internal(
                PHASE,
                "cannot read the checked-out commit id",
            )),
        }
    }
}

/// The commit a checkout left in the work tree.
pub struct Checkout {
    /// Full commit id.
    pub commit: String,
    /// Committer time (Unix seconds): the mtime of every file in the build context.
    pub committed_at: u64,
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(text)
        .trim()
}

/// Git's messages for a repository that cannot be reached or does not exist.
fn is_unreachable(reason: &str) -> bool {
    [
        "Could not resolve host",
        "Connection refused",
        "unable to connect",
        "Could not read from remote repository",
        "does not appear to be a git repository",
        "Repository not found",
        "repository not found",
        "Authentication failed",
        "access denied",
        "Connection timed out",
        "not found",
    ]
    .iter()
    .any(|needle| reason.contains(needle))
        && !reason.contains("couldn't find remote ref")
        && !reason.contains("not our ref")
}
