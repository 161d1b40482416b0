//! From the image config to what exactly to exec: argv, environment, directory, credentials.

use std::ffi::CString;

use builder_contract::ImageConfig;

use crate::user::{resolve_user, Credentials};

/// The default `PATH` when the image sets none (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything needed to start the application.
#[derive(Debug)]
pub struct Launch {
    pub program: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: String,
    pub credentials: Credentials,
}

/// Reads the image config the converter installed.
pub fn load(path: &str) -> Result<ImageConfig, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    serde_json::from_slice(&text).map_err(|e| format!("{path} is not a valid image config: {e}"))
}

fn cstring(text: &str, what: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| format!("{what} `{text}` contains a NUL byte"))
}

/// Resolves the image config against the root filesystem.
pub fn launch(config: &ImageConfig, hostname: &str) -> Result<Launch, String> {
    let argv = config.argv();
    if argv.is_empty() {
        return Err("the image defines neither Entrypoint nor Cmd: nothing to run".into());
    }
    let credentials = resolve_user(
        config.user.as_deref().unwrap_or_default(),
        "/etc/passwd",
        "/etc/group",
    )?;
    let mut env = config.env().to_vec();
    let mut add_default = |name: &str, value: &str| {
        if config.env_value(name).is_none() {
            env.push(format!("{name}={value}"));
        }
    };
    add_default("PATH", DEFAULT_PATH);
    add_default("HOME", &credentials.home);
    add_default("HOSTNAME", hostname);
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let program = find_program(&argv[0], &path)?;
    Ok(Launch {
        program: cstring(&program, "the program")?,
        argv: argv
            .iter()
            .map(|a| cstring(a, "the argument"))
            .collect::<Result<_, _>>()?,
        env: env
            .iter()
            .map(|e| cstring(e, "the environment entry"))
            .collect::<Result<_, _>>()?,
        cwd: config
            .working_dir
            .clone()
            .filter(|dir| !dir.is_empty())
            .unwrap_or_else(|| "/".into()),
        credentials,
    })
}

/// `name` itself when it has a `/`, else the first executable match in `path`.
fn find_program(name: &str, path: &str) -> Result<String, String> {
    if name.contains('/') {
        return Ok(name.to_string());
    }
    path.split(':')
        .map(|dir| format!("{}/{name}", if dir.is_empty() { "." } else { dir }))
        .find(|candidate| {
            let c = CString::new(candidate.as_str()).unwrap_or_default();
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
        })
        .ok_or_else(|| format!("`{name}` is not found in PATH={path}"))
}
