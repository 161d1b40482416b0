//! The image build: BuildKit, driven through `docker buildx build` with the docker driver (the
//! daemon's own BuildKit, so the image lands in the daemon's store where the converter reads it).
//!
//! Why the CLI and not the Engine API's BuildKit session: buildx is the reference client of that
//! session protocol (secrets, registry logins from `DOCKER_CONFIG`, the context upload), its
//! plain progress output streams every step's output with the step's name, and its
//! `--metadata-file` gives the image id. This module owns what the build is told (the context
//! tar on stdin, Dockerfile, target, platform, build args, labels, secrets passed by
//! environment, a per-build `DOCKER_CONFIG` holding the registry logins) and how its output is
//! read: the failing step's name and message (a `RUN`'s exit code included) become the error,
//! classed as the customer's when BuildKit failed to solve their Dockerfile and as ours when
//! buildx or the daemon failed around it.
//!
//! A `# syntax=` directive names a Dockerfile frontend image to pull. When that image cannot be
//! fetched (a builder VM without Internet access), the directive is turned into a plain comment
//! and the frontend built into the daemon builds instead; the log says so.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use builder_contract::{BuildArgs, ErrorClass, Phase, RegistryCredentials};
use tokio::process::Command;

use crate::docker::DockerDaemon;
use crate::error::BuildError;
use crate::log::BuildLog;
use crate::process::run_observed;

/// The Docker CLI with the buildx plugin (Debian's `docker-cli` + `docker-buildx`).
pub const DEFAULT_DOCKER_CLI: &str = "/usr/bin/docker";

/// How long a `# syntax=` frontend image may take to pull before the builtin one is used.
const FRONTEND_PULL_TIMEOUT: Duration = Duration::from_secs(30);

/// Docker Hub's key in a Docker config's `auths`.
const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// One build, as BuildKit is to be told it.
pub struct ImageBuild<'a> {
    /// The context as a tar file (sent on buildx's stdin).
    pub context: &'a Path,
    /// The Dockerfile's path inside the context.
    pub dockerfile: &'a str,
    pub tag: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub target: Option<&'a str>,
    pub platform: &'a str,
    pub build_args: &'a BuildArgs,
    /// `RUN --mount=type=secret,id=ID` values by id.
    pub secrets: &'a BTreeMap<String, String>,
    /// Logins for `FROM` images, by registry host.
    pub registry_auths: &'a BTreeMap<String, RegistryCredentials>,
}

/// `docker buildx build` against one daemon.
pub struct Buildx {
    cli: PathBuf,
    docker_host: String,
    /// The build's own `DOCKER_CONFIG`: buildx's state, the registry logins, the metadata file.
    config_dir: PathBuf,
}

impl Buildx {
    /// A builder using `cli` against `docker_host`, keeping its state in `config_dir` (created
    /// here, mode 0700; the caller removes it).
    pub fn new(cli: &Path, docker_host: &str, config_dir: &Path) -> Result<Self, BuildError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(config_dir)
            .map_err(|e| {
                BuildError::internal(
                    Phase::Build,
                    format!("cannot create {}: {e}", config_dir.display()),
                )
            })?;
        Ok(Buildx {
            cli: cli.to_path_buf(),
            docker_host: docker_host.to_string(),
            config_dir: config_dir.to_path_buf(),
        })
    }

    /// Builds the image, streaming BuildKit's progress into the log; returns the image id.
    pub async fn build(
        &self,
        log: &BuildLog,
        build: &ImageBuild<'_>,
    ) -> Result<String, BuildError> {
        const PHASE: Phase = Phase::Build;
        let internal = |what: String| BuildError::internal(PHASE, what);
        let config_file = self.config_dir.join("config.json");
        write_private(&config_file, &docker_config(build.registry_auths))
            .map_err(|e| internal(format!("cannot write {}: {e}", config_file.display())))?;
        let metadata_file = self.config_dir.join("metadata.json");
        let context = std::fs::File::open(build.context)
            .map_err(|e| internal(format!("cannot open the build context: {e}")))?;

        let mut command = Command::new(&self.cli);
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", &self.config_dir)
            .env("DOCKER_HOST", &self.docker_host)
            .env("DOCKER_CONFIG", &self.config_dir)
            .env("DOCKER_CLI_HINTS", "false")
            .env("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")
            .args(["buildx", "build", "--progress=plain", "--file"])
            .arg(build.dockerfile)
            .arg("--tag")
            .arg(build.tag)
            .arg("--platform")
            .arg(build.platform)
            .arg("--metadata-file")
            .arg(&metadata_file);
        if let Some(target) = build.target {
            command.arg("--target").arg(target);
        }
        for (name, value) in build.labels {
            command.arg("--label").arg(format!("{name}={value}"));
        }
        for (name, value) in build.build_args.iter() {
            command.arg("--build-arg").arg(format!("{name}={value}"));
        }
        // Secret values travel in buildx's environment, never in its arguments or a file.
        for (index, (id, value)) in build.secrets.iter().enumerate() {
            let var = format!("BUILDER_SECRET_{index}");
            command
                .arg("--secret")
                .arg(format!("id={id},env={var}"))
                .env(var, value);
        }
        command.arg("-");

        let mut progress = PlainProgress::default();
        let finished = run_observed(log, &mut command, Stdio::from(context), &mut |line| {
            progress.observe(line)
        })
        .await;
        let _ = std::fs::remove_file(&config_file);
        let finished = finished.map_err(|e| {
            internal(format!(
                "cannot run {} buildx build: {e}",
                self.cli.display()
            ))
        })?;
        if !finished.status.success() {
            return Err(progress.into_error(&finished.tail_text()));
        }
        image_id(&metadata_file)
    }
}

fn basic_auth(login: &RegistryCredentials) -> String {
    crate::basic_auth::encode(&login.username, &login.password)
}

/// What a log must not show of the registry logins besides their passwords.
pub fn registry_login_secrets(auths: &BTreeMap<String, RegistryCredentials>) -> Vec<String> {
    auths.values().map(basic_auth).collect()
}

/// A Docker config whose only content is the registry logins.
fn docker_config(auths: &BTreeMap<String, RegistryCredentials>) -> Vec<u8> {
    let auths: serde_json::Map<String, serde_json::Value> = auths
        .iter()
        .map(|(host, login)| {
            let key = match host.as_str() {
                "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB_AUTH_KEY,
                other => other,
            };
            (
                key.to_string(),
                serde_json::json!({ "auth": basic_auth(login) }),
            )
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "auths": auths }))
        .expect("a Docker config always serializes")
}

/// Writes `bytes` to a new file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The image id (`sha256:` of its config) from buildx's `--metadata-file`.
fn image_id(metadata_file: &Path) -> Result<String, BuildError> {
    let fail = |what: String| BuildError::internal(Phase::Build, what);
    let text = std::fs::read(metadata_file).map_err(|e| {
        fail(format!(
            "buildx wrote no build metadata to {}: {e}",
            metadata_file.display()
        ))
    })?;
    let metadata: HashMap<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| fail(format!("the build metadata is not JSON: {e}")))?;
    metadata
        .get("containerimage.config.digest")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            fail("the build metadata names no image (containerimage.config.digest)".into())
        })
}

/// What buildx's `--progress=plain` output said about the build: each step's name (the first
/// line of step `#N` names it) and the errors.
#[derive(Debug, Default)]
struct PlainProgress {
    steps: HashMap<u32, String>,
    /// The step that failed and BuildKit's message for it.
    failed_step: Option<(String, String)>,
    /// `ERROR: failed to solve: ...`: BuildKit could not build the Dockerfile.
    solve_error: Option<String>,
    /// Any other `ERROR: ...` line: buildx or the daemon failed.
    other_error: Option<String>,
    /// `Dockerfile:LINE` from the error excerpt.
    dockerfile_line: Option<String>,
}

impl PlainProgress {
    fn observe(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix('#') {
            let Some((number, text)) = rest.split_once(' ') else {
                return;
            };
            let Ok(number) = number.parse::<u32>() else {
                return;
            };
            match self.steps.get(&number) {
                None => {
                    self.steps.insert(number, text.to_string());
                }
                Some(name) => {
                    if let Some(message) = text.strip_prefix("ERROR: ") {
                        self.failed_step
                            .get_or_insert_with(|| (name.clone(), message.to_string()));
                    }
                }
            }
        } else if let Some(message) = line.strip_prefix("ERROR: failed to solve: ") {
            self.solve_error = Some(message.to_string());
        } else if let Some(message) = line.strip_prefix("ERROR: ") {
            self.other_error.get_or_insert_with(|| message.to_string());
        } else if self.dockerfile_line.is_none() && is_dockerfile_line_ref(line) {
            self.dockerfile_line = Some(line.to_string());
        }
    }

    /// The build's error, once buildx has exited unsuccessfully.
    fn into_error(self, tail: &str) -> BuildError {
        const PHASE: Phase = Phase::Build;
        let Some(solve) = self.solve_error else {
            let why = self.other_error.unwrap_or_else(|| tail.to_string());
            return BuildError::internal(PHASE, format!("docker buildx build failed: {why}"));
        };
        if solve.contains("no space left on device") {
            return BuildError::disk_full(PHASE, "docker buildx build");
        }
        let at = self
            .dockerfile_line
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let message = match self.failed_step {
            Some((step, message)) => format!("step `{step}`{at} failed: {message}"),
            None => format!("the Dockerfile could not be built{at}: {solve}"),
        };
        BuildError {
            phase: PHASE,
            class: ErrorClass::User,
            message,
        }
    }
}

/// `Dockerfile:12`, `sub/Dockerfile.prod:3`: where buildx says the failing instruction is.
fn is_dockerfile_line_ref(line: &str) -> bool {
    line.rsplit_once(':').is_some_and(|(path, number)| {
        !path.is_empty()
            && !path.contains(' ')
            && !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The frontend image a `# syntax=` parser directive names, and its line (0-based).
fn syntax_directive(dockerfile: &str) -> Option<(usize, String)> {
    for (index, line) in dockerfile.lines().enumerate() {
        let directive = line.trim().strip_prefix('#')?;
        let (key, value) = directive.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None;
        }
        if key.eq_ignore_ascii_case("syntax") {
            return Some((index, value.trim().to_string()));
        }
    }
    None
}

/// When the Dockerfile at `path` (in the checkout) names a frontend with `# syntax=` that the
/// daemon cannot fetch, turns the directive into a plain comment so the builtin frontend
/// builds it, and logs that. A Dockerfile that is not a readable regular file is left for the
/// context to refuse.
pub async fn use_builtin_frontend_if_unreachable(
    docker: &DockerDaemon,
    log: &BuildLog,
    path: &Path,
) -> Result<(), BuildError> {
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Some((index, frontend)) = syntax_directive(&text) else {
        return Ok(());
    };
    let pulled = tokio::time::timeout(FRONTEND_PULL_TIMEOUT, docker.pull(&frontend))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer in {} s",
                FRONTEND_PULL_TIMEOUT.as_secs()
            ))
        });
    let why = match pulled {
        Ok(()) => {
            log.line(&format!("Dockerfile frontend: {frontend} (pulled)"));
            return Ok(());
        }
        Err(why) => why,
    };
    log.line(&format!(
        "Dockerfile frontend: `# syntax={frontend}` cannot be fetched ({why}); building with \
         the frontend built into the daemon instead"
    ));
    let rewritten: String = text
        .split_inclusive('\n')
        .enumerate()
        .map(|(i, line)| {
            if i == index {
                let ending = &line[line.trim_end_matches(['\r', '\n']).len()..];
                format!("#{ending}")
            } else {
                line.to_string()
            }
        })
        .collect();
    std::fs::write(path, rewritten).map_err(|e| {
        BuildError::internal(
            Phase::Build,
            format!("cannot rewrite the Dockerfile's syntax directive: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(output: &str) -> PlainProgress {
        let mut p = PlainProgress::default();
        output.lines().for_each(|l| p.observe(l));
        p
    }

    #[test]
    fn a_failing_run_names_its_step_line_and_exit_code() {
        let p = progress(
            "#0 building with \"default\" instance using docker driver\n\
             #11 [final 1/1] RUN exit 3\n\
             #11 ERROR: process \"/bin/sh -c exit 3\" did not complete successfully: exit code: 3\n\
             ------\n > [final 1/1] RUN exit 3:\n------\nsub/Dockerfile:18\n\
             --------------------\n  18 | >>> RUN exit 3\n--------------------\n\
             ERROR: failed to solve: process \"/bin/sh -c exit 3\" did not complete successfully: exit code: 3\n",
        );
        let e = p.into_error("");
        assert_eq!(e.class, ErrorClass::User);
        assert_eq!(
            e.message,
            "step `[final 1/1] RUN exit 3` (sub/Dockerfile:18) failed: process \"/bin/sh -c exit \
             3\" did not complete successfully: exit code: 3"
        );
    }

    #[test]
    fn parse_errors_are_the_users_and_a_missing_daemon_is_ours() {
        let e = progress(
            "#1 [internal] load remote build context\n\
             ERROR: failed to solve: dockerfile parse error on line 2: unknown instruction: FOO\n",
        )
        .into_error("");
        assert_eq!(e.class, ErrorClass::User);
        assert!(
            e.message.contains("unknown instruction: FOO"),
            "{}",
            e.message
        );
        let e =
            progress("ERROR: Cannot connect to the Docker daemon at unix:///x.\n").into_error("");
        assert_eq!(e.class, ErrorClass::Internal);
        assert!(e.message.contains("Cannot connect"), "{}", e.message);
        let e =
            progress("ERROR: failed to solve: write /x: no space left on device\n").into_error("");
        assert!(
            e.message.contains("no space left on the build disk"),
            "{}",
            e.message
        );
    }

    #[test]
    fn finds_the_syntax_directive_only_among_the_leading_directives() {
        assert_eq!(
            syntax_directive("# syntax=docker/dockerfile:1.7\nFROM x\n"),
            Some((0, "docker/dockerfile:1.7".into()))
        );
        assert_eq!(
            syntax_directive("# escape=`\n#  SYNTAX = a/b:1\nFROM x\n"),
            Some((1, "a/b:1".into()))
        );
        assert_eq!(syntax_directive("FROM x\n# syntax=a/b\n"), None);
        assert_eq!(syntax_directive("# a comment\n# syntax=a/b\n"), None);
    }

    #[test]
    fn registry_logins_become_a_docker_config() {
        let auths = BTreeMap::from([
            (
                "docker.io".to_string(),
                RegistryCredentials {
                    username: "u".into(),
                    password: "p".into(),
                },
            ),
            (
                "127.0.0.1:5000".to_string(),
                RegistryCredentials {
                    username: "a".into(),
                    password: "b:c".into(),
                },
            ),
        ]);
        let config: serde_json::Value = serde_json::from_slice(&docker_config(&auths)).unwrap();
        assert_eq!(config["auths"][DOCKER_HUB_AUTH_KEY]["auth"], "dTpw");
        assert_eq!(config["auths"]["127.0.0.1:5000"]["auth"], "YTpiOmM=");
    }
}
