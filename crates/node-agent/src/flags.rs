//! `node-agent submit`'s flags for what to build and with which credentials: `--build-arg`,
//! `--target`, `--platform`, `--secret`, `--git-token-file`/`--git-username` and
//! `--registry-auth-file`. They are read here into the [`BuildRequest`] (files and environment
//! variables included), and every error names its flag. Credential values read here go into the
//! request only; no error message shows one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use builder_contract::secrets::{check_registry_host, check_secret_id};
use builder_contract::{BuildArgs, ParamError};

use crate::credentials::{RegistryLogin, SecretValue};
use crate::model::BuildRequest;

/// The flags, flattened into `submit`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InputFlags {
    /// A Dockerfile `ARG` value (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_args: Vec<String>,
    /// The Dockerfile stage to build (default: the last one).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// The platform to build for; only linux/amd64 is supported.
    #[arg(long)]
    pub platform: Option<String>,
    /// A secret for `RUN --mount=type=secret,id=ID`, from a file or an environment variable
    /// (repeatable).
    #[arg(long = "secret", value_name = "id=ID,src=FILE|id=ID,env=VAR")]
    pub secrets: Vec<String>,
    /// A file holding a token to clone the repository with (HTTP(S) URLs).
    #[arg(long, value_name = "FILE")]
    pub git_token_file: Option<PathBuf>,
    /// The user name sent with the git token (default `x-access-token`).
    #[arg(long, requires = "git_token_file")]
    pub git_username: Option<String>,
    /// Registry logins for `FROM` images: JSON `{"HOST[:PORT]": {"username", "password"}}`, or a
    /// Docker `config.json` (`{"auths": {"HOST": {"auth": "<base64 user:password>"}}}`).
    #[arg(long, value_name = "FILE")]
    pub registry_auth_file: Option<PathBuf>,
}

/// A flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("--build-arg `{value}` is not NAME=VALUE")]
    BuildArgForm { value: String },
    #[error("--build-arg {name} is given more than once")]
    BuildArgTwice { name: String },
    #[error("--build-arg is not valid")]
    BuildArg(#[source] ParamError),
    #[error("--secret `{value}` is not valid: {reason}")]
    Secret { value: String, reason: String },
    #[error("--secret id={id} is given more than once")]
    SecretTwice { id: String },
    #[error("--secret id={id}: cannot read the file {path}")]
    SecretFile {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--secret id={id}: the environment variable {var} is not set (or not UTF-8)")]
    SecretEnv { id: String, var: String },
    #[error("{flag}: cannot read {path}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag}: {path} is not UTF-8 text")]
    NotText { flag: &'static str, path: PathBuf },
    #[error("--git-token-file: {path} holds no token")]
    EmptyToken { path: PathBuf },
    #[error(
        "--registry-auth-file: {path} is not JSON of the form {{\"HOST\": {{\"username\": ..., \
         \"password\": ...}}}} or a Docker config.json with `auths` ({what} at line {line}, \
         column {column})"
    )]
    RegistryJson {
        path: PathBuf,
        what: &'static str,
        line: usize,
        column: usize,
    },
    #[error("--registry-auth-file: {path}: the entry `{host}` is not valid: {reason}")]
    RegistryEntry {
        path: PathBuf,
        host: String,
        reason: String,
    },
}

impl InputFlags {
    /// Sets the request's build inputs and credentials from the flags, reading the files and
    /// environment variables they name.
    pub fn apply(&self, request: &mut BuildRequest) -> Result<(), FlagError> {
        request.build_args = parse_build_args(&self.build_args)?;
        request.target = self.target.clone();
        request.platform = self.platform.clone();
        request.secrets = read_secrets(&self.secrets, |var| std::env::var(var).ok())?;
        request.git_token = self
            .git_token_file
            .as_deref()
            .map(read_git_token)
            .transpose()?;
        request.git_username = self.git_username.clone();
        request.registry_auths = match &self.registry_auth_file {
            Some(path) => read_registry_auths(path)?,
            None => BTreeMap::new(),
        };
        Ok(())
    }
}

/// `--build-arg NAME=VALUE` flags as the request's `build_args`.
pub fn parse_build_args(flags: &[String]) -> Result<BTreeMap<String, String>, FlagError> {
    let mut args = BTreeMap::new();
    for flag in flags {
        let Some((name, value)) = flag.split_once('=') else {
            return Err(FlagError::BuildArgForm {
                value: flag.clone(),
            });
        };
        if args.insert(name.to_string(), value.to_string()).is_some() {
            return Err(FlagError::BuildArgTwice {
                name: name.to_string(),
            });
        }
    }
    BuildArgs::new(args.clone()).map_err(FlagError::BuildArg)?;
    Ok(args)
}

/// `--secret id=ID,src=FILE` / `id=ID,env=VAR` flags (Docker's `source=` and `type=file|env`
/// are accepted too) as the request's `secrets`; `env` looks up a variable.
pub fn read_secrets(
    flags: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, SecretValue>, FlagError> {
    let mut secrets = BTreeMap::new();
    for flag in flags {
        let bad = |reason: &str| FlagError::Secret {
            value: flag.clone(),
            reason: reason.to_string(),
        };
        let (mut id, mut src, mut var, mut kind) = (None, None, None, None);
        for part in flag.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("give KEY=VALUE pairs separated by `,`"))?;
            let slot = match key {
                "id" => &mut id,
                "src" | "source" => &mut src,
                "env" => &mut var,
                "type" => &mut kind,
                _ => return Err(bad(&format!("unknown key `{key}`: use id, src or env"))),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(bad(&format!("`{key}` is given more than once")));
            }
        }
        let id = id.ok_or_else(|| bad("`id` is missing"))?;
        check_secret_id(&id).map_err(|reason| bad(&reason))?;
        let value = match (kind.as_deref(), src, var) {
            (None | Some("file"), Some(path), None) => {
                let path = PathBuf::from(path);
                let bytes = std::fs::read(&path).map_err(|source| FlagError::SecretFile {
                    id: id.clone(),
                    path: path.clone(),
                    source,
                })?;
                String::from_utf8(bytes).map_err(|_| FlagError::NotText {
                    flag: "--secret",
                    path,
                })?
            }
            (None | Some("env"), None, Some(var)) => {
                env(&var).ok_or_else(|| FlagError::SecretEnv {
                    id: id.clone(),
                    var,
                })?
            }
            (Some(kind), _, _) if kind != "file" && kind != "env" => {
                return Err(bad(&format!("`type={kind}`: use file or env")))
            }
            _ => return Err(bad("give exactly one of `src=FILE` and `env=VAR`")),
        };
        if secrets.insert(id.clone(), SecretValue(value)).is_some() {
            return Err(FlagError::SecretTwice { id });
        }
    }
    Ok(secrets)
}

fn read_text(flag: &'static str, path: &Path) -> Result<String, FlagError> {
    let bytes = std::fs::read(path).map_err(|source| FlagError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| FlagError::NotText {
        flag,
        path: path.to_path_buf(),
    })
}

/// The token in `--git-token-file`, without surrounding whitespace (a trailing newline).
pub fn read_git_token(path: &Path) -> Result<SecretValue, FlagError> {
    let text = read_text("--git-token-file", path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(FlagError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(SecretValue(token.to_string()))
}

/// The logins in `--registry-auth-file`: `{"HOST": {"username", "password"}}`, or Docker's
/// `config.json` whose `auths` entries carry `auth` (base64 of `user:password`) or `username`
/// and `password`; Docker's URL keys (`https://index.docker.io/v1/`) become hosts (`docker.io`).
pub fn read_registry_auths(path: &Path) -> Result<BTreeMap<String, RegistryLogin>, FlagError> {
    let text = read_text("--registry-auth-file", path)?;
    // serde's messages quote the value they choke on, which may be a password: only say where.
    let json_error = |what, e: serde_json::Error| FlagError::RegistryJson {
        path: path.to_path_buf(),
        what,
        line: e.line(),
        column: e.column(),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| json_error("invalid JSON", e))?;
    let entry_error = |host: &str, reason: String| FlagError::RegistryEntry {
        path: path.to_path_buf(),
        host: host.to_string(),
        reason,
    };
    let mut logins = BTreeMap::new();
    match value.get("auths") {
        Some(_) => {
            #[derive(serde::Deserialize)]
            struct DockerConfig {
                auths: BTreeMap<String, DockerAuth>,
            }
            #[derive(serde::Deserialize)]
            struct DockerAuth {
                auth: Option<String>,
                username: Option<String>,
                password: Option<String>,
            }
            let config: DockerConfig = serde_json::from_str(&text)
                .map_err(|e| json_error("an `auths` entry of another shape", e))?;
            for (key, entry) in config.auths {
                let host = docker_host(&key);
                let (username, password) = match (entry.auth, entry.username, entry.password) {
                    (Some(auth), _, _) => {
                        let decoded = decode_base64(auth.trim())
                            .and_then(|b| String::from_utf8(b).ok())
                            .ok_or_else(|| {
                                entry_error(&key, "`auth` is not base64 of UTF-8 text".into())
                            })?;
                        let (user, password) = decoded.split_once(':').ok_or_else(|| {
                            entry_error(&key, "`auth` is not base64 of `user:password`".into())
                        })?;
                        (user.to_string(), password.to_string())
                    }
                    (None, Some(user), Some(password)) => (user, password),
                    _ => {
                        return Err(entry_error(
                            &key,
                            "it has no `auth` (logins kept by a credential helper, \
                             `credsStore`, cannot be read: give them in this file)"
                                .into(),
                        ))
                    }
                };
                let login = RegistryLogin {
                    username,
                    password: SecretValue(password),
                };
                logins.insert(host, login);
            }
        }
        None => {
            logins = serde_json::from_str(&text)
                .map_err(|e| json_error("an entry of another shape", e))?;
        }
    }
    for (host, login) in &logins {
        check_registry_host(host).map_err(|reason| entry_error(host, reason))?;
        if login.username.is_empty() || login.password.0.is_empty() {
            return Err(entry_error(
                host,
                "the user name or the password is empty".into(),
            ));
        }
    }
    Ok(logins)
}

/// A Docker `config.json` key as the registry host `FROM` names.
fn docker_host(key: &str) -> String {
    let host = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        host => host.to_string(),
    }
}

/// Standard or URL-safe base64, padding optional.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.trim_end_matches('=').bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn build_args_are_name_equals_value() {
        let args = parse_build_args(&strings(&["A=1", "B=x=y", "EMPTY="])).unwrap();
        assert_eq!(args["A"], "1");
        assert_eq!(args["B"], "x=y");
        assert_eq!(args["EMPTY"], "");
        for (flags, needle) in [
            (&["NOEQUALS"][..], "`NOEQUALS` is not NAME=VALUE"),
            (&["A=1", "A=2"][..], "--build-arg A is given more than once"),
            (&["1A=x"][..], "--build-arg is not valid"),
        ] {
            let err = parse_build_args(&strings(flags)).unwrap_err();
            let chain = crate::error_chain(&err);
            assert!(chain.contains(needle), "{flags:?}: {chain}");
        }
        let chain = crate::error_chain(&parse_build_args(&strings(&["1A=x"])).unwrap_err());
        assert!(chain.contains("not a build arg name"), "{chain}");
    }

    #[test]
    fn secrets_come_from_files_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("npmrc");
        std::fs::write(&file, "FILE-VALUE\n").unwrap();
        let env = |var: &str| (var == "TOKEN").then(|| "ENV-VALUE".to_string());
        let flags = [
            format!("id=npm,src={}", file.display()),
            "id=tok,env=TOKEN".to_string(),
            format!("type=file,id=other,source={}", file.display()),
        ];
        let secrets = read_secrets(&flags, env).unwrap();
        assert_eq!(secrets["npm"].0, "FILE-VALUE\n");
        assert_eq!(secrets["tok"].0, "ENV-VALUE");
        assert_eq!(secrets["other"].0, "FILE-VALUE\n");
        let missing = dir.path().join("missing");
        for (flag, needle) in [
            (
                format!("id=x,src={}", missing.display()),
                format!("--secret id=x: cannot read the file {}", missing.display()),
            ),
            ("id=../x,env=TOKEN".into(), "is not a secret id".into()),
            ("src=/etc/hostname".into(), "`id` is missing".into()),
            ("id=x,env=NOPE".into(), "variable NOPE is not set".into()),
            ("id=x".into(), "exactly one of".into()),
            ("id=x,env=TOKEN,src=/f".into(), "exactly one of".into()),
            ("id=x,mode=0400".into(), "unknown key `mode`".into()),
            ("id=x,type=ssh,env=TOKEN".into(), "`type=ssh`".into()),
            ("idx".into(), "KEY=VALUE".into()),
        ] {
            let err = read_secrets(std::slice::from_ref(&flag), env).unwrap_err();
            let chain = crate::error_chain(&err);
            assert!(chain.contains(&needle), "{flag}: {chain}");
            assert!(chain.starts_with("--secret"), "{chain}");
        }
        let twice = read_secrets(&strings(&["id=t,env=TOKEN", "id=t,env=TOKEN"]), env);
        assert!(matches!(twice, Err(FlagError::SecretTwice { .. })));
    }

    #[test]
    fn git_token_file_is_trimmed_and_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "ghp_abc\n").unwrap();
        assert_eq!(read_git_token(&file).unwrap().0, "ghp_abc");
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            read_git_token(&file),
            Err(FlagError::EmptyToken { .. })
        ));
        let err = read_git_token(&dir.path().join("none")).unwrap_err();
        assert!(
            err.to_string().starts_with("--git-token-file: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn registry_auth_files_in_both_forms() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(
            &file,
            r#"{"registry.example:5000": {"username": "u", "password": "p"}}"#,
        )
        .unwrap();
        let logins = read_registry_auths(&file).unwrap();
        assert_eq!(logins["registry.example:5000"].username, "u");
        assert_eq!(logins["registry.example:5000"].password.0, "p");
        // base64("alice:s3cr:et") and a Docker Hub URL key.
        std::fs::write(
            &file,
            r#"{"auths": {"https://index.docker.io/v1/": {"auth": "YWxpY2U6czNjcjpldA=="},
                          "ghcr.io": {"auth": "Ym9iOnRvaw", "email": "b@example"}},
                "credsStore": "desktop"}"#,
        )
        .unwrap();
        let logins = read_registry_auths(&file).unwrap();
        assert_eq!(logins["docker.io"].username, "alice");
        assert_eq!(logins["docker.io"].password.0, "s3cr:et");
        assert_eq!(logins["ghcr.io"].username, "bob");
        assert_eq!(logins["ghcr.io"].password.0, "tok");
        for (json, needle) in [
            (r#"{"auths": {"r.example": {}}}"#, "credential helper"),
            (r#"{"auths": {"r.example": {"auth": "!!"}}}"#, "not base64"),
            (
                r#"{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}"#,
                "user:password",
            ),
            (
                r#"{"h:99999": {"username": "u", "password": "p"}}"#,
                "not a registry host",
            ),
            (r#"{"h": {"username": "u", "password": ""}}"#, "empty"),
            (r#"{"h": "HUNTER2"}"#, "line 1"),
            ("{", "invalid JSON"),
        ] {
            std::fs::write(&file, json).unwrap();
            let err = read_registry_auths(&file).unwrap_err().to_string();
            assert!(err.starts_with("--registry-auth-file: "), "{err}");
            assert!(err.contains(needle), "{json}: {err}");
            assert!(!err.contains("HUNTER2"), "{err}");
        }
        let err = read_registry_auths(&dir.path().join("none")).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    #[test]
    fn the_flags_fill_the_request() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flags: InputFlags,
        }
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").unwrap();
        let cli = Cli::try_parse_from([
            "submit",
            "--build-arg",
            "A=1",
            "--build-arg",
            "B=2",
            "--target",
            "prod",
            "--platform",
            "linux/amd64",
            "--git-token-file",
            token.to_str().unwrap(),
            "--git-username",
            "bot",
        ])
        .unwrap();
        let mut request: BuildRequest =
            serde_json::from_str(r#"{"repo_url": "https://g.example/r", "ref": "main"}"#).unwrap();
        cli.flags.apply(&mut request).unwrap();
        assert_eq!(request.build_args.len(), 2);
        assert_eq!(request.target.as_deref(), Some("prod"));
        assert_eq!(request.platform.as_deref(), Some("linux/amd64"));
        assert_eq!(request.git_token.as_ref().unwrap().0, "tok");
        assert_eq!(request.git_username.as_deref(), Some("bot"));
        // --git-username needs --git-token-file.
        assert!(Cli::try_parse_from(["submit", "--git-username", "bot"]).is_err());
    }
}
