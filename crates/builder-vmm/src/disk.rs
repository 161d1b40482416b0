//! The per-build disks: a sparse ext4 scratch disk (Docker's data and the build output, `vdb`)
//! and a small read-only config drive carrying `secrets.json` (`vdc`), which the guest mounts at
//! `/run/builder-config`. Both are made with `mkfs.ext4`; neither needs root or loop devices.
//!
//! `mkfs.ext4` runs once per kind of disk, not once per VM ([`DiskTemplates`]): every scratch
//! disk of one size is the same empty ext4, and every config drive is the same ext4 but for the
//! bytes of `secrets.json`. A template is kept in memory as the blocks that are not zero (a few
//! hundred KiB of metadata); a new disk is a sparse file with those blocks written back, and on
//! a config drive the secrets written into the data blocks of its `secrets.json`, a file of
//! [`SECRETS_SLOT`] bytes: the JSON padded with spaces, which JSON parsers skip.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use builder_contract::Secrets;

/// File name of the secrets on the config drive.
pub const SECRETS_FILE: &str = "secrets.json";
/// Filesystem label of the scratch disk.
pub const SCRATCH_LABEL: &str = "scratch";
/// Filesystem label of the config drive.
pub const CONFIG_LABEL: &str = "config";
/// Size of the config drive; ext4 needs a few hundred KiB of metadata.
const CONFIG_DRIVE_MIB: u64 = 4;
/// Size of `secrets.json` on a config drive made from the template; larger secrets get a drive
/// of their own from `mkfs.ext4`.
pub const SECRETS_SLOT: usize = 16 << 10;
/// The unit [`DiskTemplates`] compares against zero: the ext4 block size `mkfs.ext4` picks
/// for disks of more than 512 MiB, and a multiple of the 1 KiB blocks of smaller ones.
const TEMPLATE_BLOCK: usize = 4096;

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
    drop(create_sparse(path, size_mib << 20)?);
    let mut command = Command::new("mkfs.ext4");
    // The file is new and sparse: its journal reads as zeros without writing them.
    command.args([
        "-q",
        "-F",
        "-L",
        label,
        "-E",
        "root_owner=0:0,lazy_journal_init=1",
    ]);
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

/// Creates `path` (mode 0600, not there yet) as a sparse file of `len` bytes.
fn create_sparse(path: &Path, len: u64) -> Result<File, DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    file.set_len(len).map_err(io_error(path))?;
    Ok(file)
}

/// Creates the scratch disk: a sparse file of `size_mib` MiB holding an empty ext4.
pub fn create_scratch_disk(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    mkfs(path, size_mib, SCRATCH_LABEL, None)
}

/// A disk image as its length and the runs of [`TEMPLATE_BLOCK`]s that are not all zero.
struct SparseImage {
    len: u64,
    runs: Vec<(u64, Vec<u8>)>,
}

impl SparseImage {
    /// Reads the data of `path`, skipping its holes (`SEEK_DATA`/`SEEK_HOLE`) and zero blocks.
    fn read(path: &Path) -> Result<Self, DiskError> {
        let mut file = File::open(path).map_err(io_error(path))?;
        let len = file.metadata().map_err(io_error(path))?.len();
        let mut runs: Vec<(u64, Vec<u8>)> = vec![];
        let mut block = vec![0; TEMPLATE_BLOCK];
        let mut offset = 0;
        while offset < len {
            let Some(start) = seek(&file, offset, libc::SEEK_DATA).map_err(io_error(path))? else {
                break;
            };
            let end = seek(&file, start, libc::SEEK_HOLE)
                .map_err(io_error(path))?
                .unwrap_or(len);
            // Holes and data extents are block-aligned on ext4, the file's own filesystem.
            let mut at = start - start % TEMPLATE_BLOCK as u64;
            file.seek(SeekFrom::Start(at)).map_err(io_error(path))?;
            while at < end {
                let n = (TEMPLATE_BLOCK as u64).min(len - at) as usize;
                file.read_exact(&mut block[..n]).map_err(io_error(path))?;
                if block[..n].iter().any(|&b| b != 0) {
                    match runs.last_mut() {
                        Some((run_at, data)) if *run_at + data.len() as u64 == at => {
                            data.extend_from_slice(&block[..n])
                        }
                        _ => runs.push((at, block[..n].to_vec())),
                    }
                }
                at += n as u64;
            }
            offset = end;
        }
        Ok(SparseImage { len, runs })
    }

    /// Bytes of data (not holes) in the image.
    fn data_len(&self) -> usize {
        self.runs.iter().map(|(_, data)| data.len()).sum()
    }

    /// Writes the image to `path`, which must not exist yet, as a sparse file (mode 0600).
    fn write_new(&self, path: &Path) -> Result<File, DiskError> {
        let file = create_sparse(path, self.len)?;
        for (at, data) in &self.runs {
            file.write_all_at(data, *at).map_err(io_error(path))?;
        }
        Ok(file)
    }
}

/// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`; `None` when there is no data at or after
/// `offset` (`ENXIO`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd has no memory effects.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(at as u64))
}

/// Creates the config drive at `path` with `mkfs.ext4`: an ext4 image whose root holds only
/// [`SECRETS_FILE`] (mode 0600). The staging directory is removed again.
pub fn create_config_drive(path: &Path, secrets: &Secrets) -> Result<(), DiskError> {
    mkfs_config_drive(path, &encode(path, secrets)?)
}

fn encode(path: &Path, secrets: &Secrets) -> Result<Vec<u8>, DiskError> {
    serde_json::to_vec_pretty(secrets).map_err(|source| DiskError::Encode {
        path: path.to_path_buf(),
        source,
    })
}

/// A config drive whose [`SECRETS_FILE`] holds `content`.
fn mkfs_config_drive(path: &Path, content: &[u8]) -> Result<(), DiskError> {
    let staging = path.with_extension("staging");
    fs::create_dir(&staging).map_err(io_error(&staging))?;
    let result = (|| {
        let file_path = staging.join(SECRETS_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file_path)
            .map_err(io_error(&file_path))?;
        file.write_all(content).map_err(io_error(&file_path))?;
        mkfs(path, CONFIG_DRIVE_MIB, CONFIG_LABEL, Some(&staging))
    })();
    let removed = fs::remove_dir_all(&staging).map_err(io_error(&staging));
    result.and(removed)
}

/// The config drive template: the image and where the data of its `secrets.json` starts.
struct ConfigTemplate {
    image: SparseImage,
    slot: u64,
}

impl ConfigTemplate {
    /// Makes a config drive at `scratch` (removed again) whose `secrets.json` is
    /// [`SECRETS_SLOT`] bytes of a marker, and finds the marker in it. `None` when the file's
    /// data is not in one piece (never seen; the drives then come from `mkfs.ext4`).
    fn make(scratch: &Path) -> Result<Option<Self>, DiskError> {
        let marker: Vec<u8> = b"builder-vmm secrets slot "
            .iter()
            .copied()
            .cycle()
            .take(SECRETS_SLOT)
            .collect();
        mkfs_config_drive(scratch, &marker)?;
        let image = SparseImage::read(scratch);
        fs::remove_file(scratch).map_err(io_error(scratch))?;
        let image = image?;
        let slot = image.runs.iter().find_map(|(at, data)| {
            data.windows(SECRETS_SLOT)
                .position(|w| w == marker.as_slice())
                .map(|i| at + i as u64)
        });
        Ok(slot.map(|slot| ConfigTemplate { image, slot }))
    }
}

/// The disk templates of one [`crate::Vmm`], made on first use.
#[derive(Default)]
pub struct DiskTemplates {
    scratch: Mutex<HashMap<u64, Arc<SparseImage>>>,
    config: Mutex<Option<Arc<Option<ConfigTemplate>>>>,
}

impl std::fmt::Debug for DiskTemplates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<u64> = self
            .scratch
            .lock()
            .expect("template lock")
            .keys()
            .copied()
            .collect();
        let config = self.config.lock().expect("template lock").is_some();
        f.debug_struct("DiskTemplates")
            .field("scratch_mib", &sizes)
            .field("config", &config)
            .finish()
    }
}

impl DiskTemplates {
    /// Creates a scratch disk like [`create_scratch_disk`]: the first of a size with
    /// `mkfs.ext4` (and remembered), the others from memory. Every copy carries the same
    /// filesystem UUID and directory hash seed, which is harmless: a VM sees one.
    pub fn scratch_disk(&self, path: &Path, size_mib: u64) -> Result<(), DiskError> {
        let cached = self
            .scratch
            .lock()
            .expect("template lock")
            .get(&size_mib)
            .cloned();
        if let Some(image) = cached {
            return image.write_new(path).map(drop);
        }
        create_scratch_disk(path, size_mib)?;
        let image = Arc::new(SparseImage::read(path)?);
        tracing::debug!(
            size_mib,
            bytes = image.data_len(),
            "scratch disk template made"
        );
        self.scratch
            .lock()
            .expect("template lock")
            .insert(size_mib, image);
        Ok(())
    }

    /// Creates a config drive like [`create_config_drive`], from the template (made on first
    /// use, beside `path`) when the secrets fit [`SECRETS_SLOT`].
    pub fn config_drive(&self, path: &Path, secrets: &Secrets) -> Result<(), DiskError> {
        let mut json = encode(path, secrets)?;
        if json.len() > SECRETS_SLOT {
            return mkfs_config_drive(path, &json);
        }
        let cached = self.config.lock().expect("template lock").clone();
        let template = match cached {
            Some(template) => template,
            None => {
                let made = Arc::new(ConfigTemplate::make(&path.with_extension("template"))?);
                if made.is_none() {
                    tracing::warn!(
                        "the config drive template has no secrets slot; using mkfs.ext4"
                    );
                }
                self.config
                    .lock()
                    .expect("template lock")
                    .get_or_insert(made)
                    .clone()
            }
        };
        let Some(template) = template.as_ref() else {
            return mkfs_config_drive(path, &json);
        };
        json.resize(SECRETS_SLOT, b' ');
        let file = template.image.write_new(path)?;
        file.write_all_at(&json, template.slot)
            .map_err(io_error(path))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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

    fn dumpe2fs_field(image: &Path, field: &str) -> String {
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_default();
        line[field.len()..].trim().to_string()
    }

    #[test]
    fn scratch_templates_copy_the_first_mkfs_of_a_size() {
        let dir = tempfile::tempdir().unwrap();
        let templates = DiskTemplates::default();
        let first = dir.path().join("first.ext4");
        let copy = dir.path().join("copy.ext4");
        let other = dir.path().join("other.ext4");
        templates.scratch_disk(&first, 1024).unwrap();
        templates.scratch_disk(&copy, 1024).unwrap();
        templates.scratch_disk(&other, 600).unwrap();

        // Byte for byte the image mkfs.ext4 made, so the same UUID (a second mkfs would have
        // picked another), sparse, and a filesystem e2fsck finds nothing wrong with.
        let uuid = dumpe2fs_field(&first, "Filesystem UUID:");
        assert_eq!(uuid.len(), 36, "{uuid}");
        assert_eq!(dumpe2fs_field(&copy, "Filesystem UUID:"), uuid);
        assert_ne!(dumpe2fs_field(&other, "Filesystem UUID:"), uuid);
        assert_eq!(
            dumpe2fs_field(&copy, "Filesystem volume name:"),
            SCRATCH_LABEL
        );
        let (a, b) = (fs::read(&first).unwrap(), fs::read(&copy).unwrap());
        assert_eq!(a.len(), 1024 << 20);
        assert!(a == b, "the copy differs from the mkfs image");
        let meta = fs::metadata(&copy).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 < 4 << 20,
            "not sparse: {} KiB allocated",
            meta.blocks() / 2
        );
        for image in [&copy, &other] {
            fsck(image);
        }
        let err = templates.scratch_disk(&copy, 1024).unwrap_err();
        assert!(err.to_string().starts_with("cannot create "), "{err}");
        let debug = format!("{templates:?}");
        assert!(
            debug.contains("1024") && debug.contains("600") && debug.len() < 80,
            "{debug}"
        );
    }

    fn secrets(webhook_secret: &str) -> Secrets {
        Secrets {
            s3: Some(S3Credentials {
                endpoint: "http://10.0.0.1:8333".into(),
                region: "us-east-1".into(),
                access_key_id: "AK".into(),
                secret_access_key: "SK".into(),
                session_token: None,
            }),
            webhook_secret: Some(webhook_secret.into()),
            ..Secrets::default()
        }
    }

    fn fsck(image: &Path) {
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn config_drives_from_the_template_hold_their_own_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let templates = DiskTemplates::default();
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        templates.config_drive(&a, &secrets("first")).unwrap();
        templates.config_drive(&b, &secrets("second")).unwrap();
        for (image, key) in [(&a, "first"), (&b, "second")] {
            fsck(image);
            let listing = debugfs(image, "ls -l /");
            assert!(listing.contains(SECRETS_FILE), "{listing}");
            assert!(listing.contains("100600"), "{listing}");
            assert!(listing.contains(&SECRETS_SLOT.to_string()), "{listing}");
            let text = debugfs(image, &format!("cat /{SECRETS_FILE}"));
            assert_eq!(text.len(), SECRETS_SLOT);
            let read: Secrets = serde_json::from_str(&text).unwrap();
            assert_eq!(read, secrets(key));
            assert_eq!(
                dumpe2fs_field(image, "Filesystem volume name:"),
                CONFIG_LABEL
            );
        }
        let uuid = dumpe2fs_field(&a, "Filesystem UUID:");
        assert_eq!(dumpe2fs_field(&b, "Filesystem UUID:"), uuid, "b is a copy");

        // Secrets too large for the slot get a drive of their own.
        let large = dir.path().join("large.ext4");
        let big = secrets(&"k".repeat(SECRETS_SLOT));
        templates.config_drive(&large, &big).unwrap();
        fsck(&large);
        assert_ne!(dumpe2fs_field(&large, "Filesystem UUID:"), uuid);
        let text = debugfs(&large, &format!("cat /{SECRETS_FILE}"));
        assert_eq!(serde_json::from_str::<Secrets>(&text).unwrap(), big);

        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["a.ext4", "b.ext4", "large.ext4"],
            "no template or staging left"
        );
    }

    #[test]
    fn config_drive_holds_only_the_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ext4");
        let secrets = secrets("hook");
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
