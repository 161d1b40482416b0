//! The per-build disks: a sparse ext4 scratch disk (Docker's data and the build output, `vdb`)
//! and a small read-only config drive carrying `secrets.json` (`vdc`), which the guest mounts at
//! `/run/builder-config`. Both are made with `mkfs.ext4`; neither needs root or loop devices.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use builder_contract::Secrets;

/// File name of the secrets on the config drive.
pub const SECRETS_FILE: &str = "secrets.json";
/// Filesystem label of the scratch disk.
pub const SCRATCH_LABEL: &str = "scratch";
/// Filesystem label of the config drive.
pub const CONFIG_LABEL: &str = "config";
/// Size of the config drive; ext4 needs a few hundred KiB of metadata.
const CONFIG_DRIVE_MIB: u64 = 4;

/// Why a disk image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run mkfs.ext4 for {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 failed for {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("cannot encode the secrets for {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` as a sparse file of `size_mib` and formats it ext4 (optionally from `root`).
fn mkfs(path: &Path, size_mib: u64, label: &str, root: Option<&Path>) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    file.set_len(size_mib << 20).map_err(io_error(path))?;
    drop(file);
    let mut command = Command::new("mkfs.ext4");
    command.args(["-q", "-F", "-L", label, "-E", "root_owner=0:0"]);
    if let Some(root) = root {
        command.arg("-d").arg(root);
    }
    let output = command
        .arg(path)
        .output()
        .map_err(|source| DiskError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(DiskError::Mkfs {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Creates the scratch disk: a sparse file of `size_mib` MiB holding an empty ext4.
pub fn create_scratch_disk(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    mkfs(path, size_mib, SCRATCH_LABEL, None)
}

/// Creates the config drive at `path`: an ext4 image whose root holds only
/// [`SECRETS_FILE`] (mode 0600). The staging directory is removed again.
pub fn create_config_drive(path: &Path, secrets: &Secrets) -> Result<(), DiskError> {
    let staging = path.with_extension("staging");
    fs::create_dir(&staging).map_err(io_error(&staging))?;
    let result = (|| {
        let file_path = staging.join(SECRETS_FILE);
        let json = serde_json::to_vec_pretty(secrets).map_err(|source| DiskError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file_path)
            .map_err(io_error(&file_path))?;
        file.write_all(&json).map_err(io_error(&file_path))?;
        mkfs(path, CONFIG_DRIVE_MIB, CONFIG_LABEL, Some(&staging))
    })();
    let removed = fs::remove_dir_all(&staging).map_err(io_error(&staging));
    result.and(removed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use builder_contract::S3Credentials;

    use super::*;

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn scratch_disk_is_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.ext4");
        create_scratch_disk(&path, 256).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            meta.blocks() * 512 < 32 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&path)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Filesystem volume name:   scratch"));
        let err = create_scratch_disk(&path, 256).unwrap_err();
        assert!(err.to_string().starts_with("cannot create "), "{err}");
    }

    #[test]
    fn config_drive_holds_only_the_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ext4");
        let secrets = Secrets {
            s3: Some(S3Credentials {
                endpoint: "http://10.0.0.1:8333".into(),
                region: "us-east-1".into(),
                access_key_id: "AK".into(),
                secret_access_key: "SK".into(),
                session_token: None,
            }),
            webhook_secret: Some("hook".into()),
            git_token: None,
            git_username: None,
        };
        create_config_drive(&path, &secrets).unwrap();
        let listing = debugfs(&path, "ls -l /");
        assert!(listing.contains(SECRETS_FILE), "{listing}");
        assert!(listing.contains("100600"), "{listing}");
        let text = debugfs(&path, &format!("cat /{SECRETS_FILE}"));
        let read: Secrets = serde_json::from_str(&text).unwrap();
        assert_eq!(read, secrets);
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the staging dir is removed");
    }
}
