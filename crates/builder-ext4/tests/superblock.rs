//! The superblock reader against the kernel: a new empty disk reads clean, the same disk
//! loop-mounted read-write (and synced) reads as needing recovery, and clean again once
//! unmounted; a file without ext4 is named as such.

use std::fs;
use std::path::Path;
use std::process::Command;

use builder_ext4::{fresh, superblock};

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?}");
}

/// Unmounts the mount point when dropped, so a failing test leaves no mount behind.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_disk_reads_clean_only_while_not_mounted() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: loop-mounting needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.ext4");
    fresh::write_empty_disk(&image, 256 << 20, "cache").unwrap();
    let state = superblock::read(&image).unwrap();
    assert!(state.clean(), "{state:?}");

    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    run(&[
        "mount",
        "-t",
        "ext4",
        "-o",
        "loop",
        image.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    let mounted = Mounted(&mnt);
    fs::write(mnt.join("file"), b"written while mounted").unwrap();
    run(&["sync"]);
    let state = superblock::read(&image).unwrap();
    assert!(!state.clean(), "{state:?}");
    assert!(
        state.needs_recovery && state.valid && !state.errors,
        "{state:?}"
    );
    drop(mounted);

    let state = superblock::read(&image).unwrap();
    assert!(state.clean(), "{state:?}");
}

#[test]
fn a_file_without_ext4_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros");
    fs::write(&zeros, vec![0u8; 4096]).unwrap();
    let err = superblock::read(&zeros).unwrap_err();
    assert!(
        matches!(&err, superblock::SuperblockError::NotExt4 { path, magic: 0 } if *path == zeros),
        "{err:?}"
    );
    let short = dir.path().join("short");
    fs::write(&short, b"tiny").unwrap();
    let err = superblock::read(&short).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read the ext4 superblock of "),
        "{err}"
    );
}
