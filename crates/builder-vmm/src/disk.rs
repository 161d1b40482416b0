//! The per-build disks: a sparse ext4 scratch disk (Docker's data and the build output, `vdb`)
//! and a small read-only config drive carrying `secrets.json` (`vdc`), which the guest mounts at
//! `/run/builder-config`. Both are written by `builder-ext4` straight into a new file (mode
//! 0600): no `mkfs.ext4`, no root, no loop device, no template. A scratch disk is a fixed-size
//! file system with a journal whose inode tables, journal and free space are holes, so a
//! 4 GiB disk is a few hundred KiB of metadata; the config drive is fitted to `secrets.json`
//! (mode 0600, owned by root), without a journal, as it is mounted read-only. Each disk gets a
//! UUID and directory hash seed of its own.

use std::path::{Path, PathBuf};

use builder_contract::Secrets;
use builder_ext4::{fresh, Kind, Meta, Node, Size, Tree, ROOT};

/// File name of the secrets on the config drive.
pub const SECRETS_FILE: &str = "secrets.json";
/// Filesystem label of the scratch disk.
pub const SCRATCH_LABEL: &str = "scratch";
/// Filesystem label of the config drive.
pub const CONFIG_LABEL: &str = "config";

/// Why a disk image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot write the disk image {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: builder_ext4::Ext4Error,
    },
    #[error("cannot encode the secrets for {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Creates the scratch disk at `path` (not there yet): a sparse file of `size_mib` MiB holding
/// an empty ext4 with a journal, labelled [`SCRATCH_LABEL`].
pub fn create_scratch_disk(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    fresh::write_empty_disk(path, size_mib << 20, SCRATCH_LABEL)
        .map(drop)
        .map_err(|source| DiskError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Creates the config drive at `path` (not there yet): an ext4 image whose root holds only
/// [`SECRETS_FILE`] (mode 0600, owned by root), labelled [`CONFIG_LABEL`].
pub fn create_config_drive(path: &Path, secrets: &Secrets) -> Result<(), DiskError> {
    let json = serde_json::to_vec_pretty(secrets).map_err(|source| DiskError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tree = Tree::new(fresh::root_meta_now());
    tree.add(
        ROOT,
        SECRETS_FILE.as_bytes(),
        Node {
            kind: Kind::File(json),
            meta: Meta {
                mode: 0o600,
                ..fresh::root_meta_now()
            },
        },
    );
    let size = Size::Fit {
        free_space_percent: 0,
        min_free_bytes: 0,
    };
    fresh::write_new(path, &tree, size, CONFIG_LABEL, false)
        .map(drop)
        .map_err(|source| DiskError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

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

    #[test]
    fn scratch_disks_are_sparse_empty_ext4_with_a_journal_each_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        let began = std::time::Instant::now();
        create_scratch_disk(&a, 4096).unwrap();
        let took = began.elapsed();
        create_scratch_disk(&b, 600).unwrap();
        for (image, len) in [(&a, 4096u64 << 20), (&b, 600 << 20)] {
            let meta = fs::metadata(image).unwrap();
            assert_eq!(meta.len(), len);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert!(
                meta.blocks() * 512 < 4 << 20,
                "not sparse: {} KiB allocated",
                meta.blocks() / 2
            );
            fsck(image);
            assert_eq!(
                dumpe2fs_field(image, "Filesystem volume name:"),
                SCRATCH_LABEL
            );
            let features = dumpe2fs_field(image, "Filesystem features:");
            assert!(features.contains("has_journal"), "{features}");
        }
        // Like mkfs.ext4: one inode per 16 KiB, a 64 MiB journal for 4 GiB.
        assert_eq!(dumpe2fs_field(&a, "Inode count:"), "262144");
        assert_eq!(dumpe2fs_field(&a, "Total journal size:"), "64M");
        assert_ne!(
            dumpe2fs_field(&a, "Filesystem UUID:"),
            dumpe2fs_field(&b, "Filesystem UUID:")
        );
        let listing = debugfs(&a, "ls -l /");
        assert!(listing.contains("lost+found"), "{listing}");
        eprintln!("a 4 GiB scratch disk took {took:?}");

        let err = create_scratch_disk(&a, 4096).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot write the disk image "),
            "{err}"
        );
        let err = create_scratch_disk(&dir.path().join("tiny.ext4"), 0).unwrap_err();
        assert!(
            format!("{:?}", std::error::Error::source(&err)).contains("TooSmall"),
            "{err:?}"
        );
    }

    /// The guest mounts the scratch disk read-write as Docker's data root: so does the host
    /// here (loop, as root), writes a tree of files, and e2fsck finds it clean afterwards.
    #[test]
    fn a_scratch_disk_mounts_read_write_and_stays_clean() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting the scratch disk needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("scratch.ext4");
        create_scratch_disk(&image, 1024).unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mount = |args: &[&str]| {
            let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(status.success(), "{args:?}");
        };
        let (image_arg, mnt_arg) = (image.to_str().unwrap(), mnt.to_str().unwrap());
        mount(&["mount", "-t", "ext4", "-o", "loop", image_arg, mnt_arg]);
        let written = (|| -> std::io::Result<()> {
            for d in 0..20 {
                let sub = mnt.join(format!("overlay2/layer-{d}/diff"));
                fs::create_dir_all(&sub)?;
                for f in 0..200 {
                    fs::write(sub.join(format!("file-{f}")), vec![d as u8; 3000])?;
                }
            }
            fs::write(mnt.join("big"), vec![7u8; 32 << 20])
        })();
        mount(&["umount", mnt_arg]);
        written.unwrap();
        fsck(&image);
        mount(&["mount", "-t", "ext4", "-o", "loop,ro", image_arg, mnt_arg]);
        let read = fs::read(mnt.join("overlay2/layer-19/diff/file-199"));
        mount(&["umount", mnt_arg]);
        assert_eq!(read.unwrap(), vec![19u8; 3000]);
    }

    #[test]
    fn config_drives_hold_only_their_own_secrets_readable_by_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        create_config_drive(&a, &secrets("first")).unwrap();
        // Large secrets need nothing special.
        let big = secrets(&"k".repeat(64 << 10));
        create_config_drive(&b, &big).unwrap();
        for (image, want) in [(&a, secrets("first")), (&b, big)] {
            fsck(image);
            let listing = debugfs(image, "ls -l /");
            let line = listing
                .lines()
                .find(|l| l.contains(SECRETS_FILE))
                .unwrap_or_else(|| panic!("{listing}"));
            // Inode, mode, (links), uid, gid: a regular file 0600 of root.
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                (fields[1], fields[3], fields[4]),
                ("100600", "0", "0"),
                "{line}"
            );
            let text = debugfs(image, &format!("cat /{SECRETS_FILE}"));
            assert_eq!(serde_json::from_str::<Secrets>(&text).unwrap(), want);
            assert_eq!(
                dumpe2fs_field(image, "Filesystem volume name:"),
                CONFIG_LABEL
            );
            let meta = fs::metadata(image).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert!(meta.len() < 1 << 20, "{} bytes", meta.len());
        }
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["a.ext4", "b.ext4"], "nothing else is left");
    }
}
