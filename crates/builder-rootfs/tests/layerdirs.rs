//! Converting from overlay2 layer directories (`convert_layer_dirs`): a bench-like image from
//! the real Docker daemon gives the same bytes as its `docker save` archive; layer directories
//! crafted by hand check overlayfs whiteouts and opaque directories, what is kept of each entry
//! (as Docker's layer tar keeps it), that a symlink is never followed, and that overlayfs
//! features a tar cannot express are refused.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use builder_rootfs::{convert_layer_dirs, ConvertError, ConvertOptions, ImageConfig};
use common::*;

/// The shape of `scripts/bench-rootfs.sh`'s image, scaled down: five layers of COPY and RUN
/// over the base, deletions of directories and files, an overwritten large file, a chmod.
#[test]
fn bench_like_image_gives_the_same_bytes_as_docker_save() {
    let scratch = tempfile::tempdir().unwrap();
    let context = scratch.path().join("context");
    let write = |path: &str, bytes: &[u8]| {
        let path = context.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    for part in ["a", "b"] {
        for i in 0..600u32 {
            let data = vec![(i % 251) as u8; 100 + (i as usize * 37) % 4000];
            write(&format!("{part}/d{:03}/f{i:06}", i / 100), &data);
        }
    }
    for i in 0..4u8 {
        write(
            &format!("big/f{i}"),
            &vec![i + 1; (1 << 20) + 4096 * usize::from(i)],
        );
    }
    write("over/big/f3", &vec![9; 3 << 20]);
    for i in (0..600u32).step_by(10) {
        write(&format!("over/a/d{:03}/f{i:06}", i / 100), b"overwritten");
    }
    write(
        "Dockerfile",
        format!(
            "FROM {}\nCOPY a/ /data/a/\nCOPY b/ /data/b/\nCOPY big/ /data/big/\n\
             RUN rm -rf /data/a/d00* /data/big/f0 && mkdir -p /data/new && echo new > /data/new/file\n\
             COPY over/ /data/\nRUN chmod -R go-w /data/b/d001 && rm -f /data/b/d002/*\n",
            base_image()
        )
        .as_bytes(),
    );
    let tag = format!("rootfs-test/layerdirs-bench:{}", std::process::id());
    build(&context, &tag);
    let saved = scratch.path().join("image.tar");
    save(&tag, &saved);
    let from_dirs_output = scratch.path().join("from-dirs.ext4");
    let from_dirs = convert_layer_dirs_in(scratch.path(), &tag, &from_dirs_output);
    remove_image(&tag);

    let output = scratch.path().join("saved.ext4");
    let report = convert_in(scratch.path(), &saved, &output);
    e2fsck(&from_dirs_output);
    assert_eq!(from_dirs.image_id, report.image_id);
    assert_eq!(from_dirs.config, report.config);
    assert_eq!(from_dirs.entries, report.entries);
    assert_eq!(
        from_dirs.sha256, report.sha256,
        "the layer directories and the docker save archive give different file systems"
    );
    let mount = Mount::new(&from_dirs_output);
    // d000 was deleted, then the overwrite layer brought back every tenth file.
    assert!(!mount.path().join("data/a/d000/f000001").exists());
    assert_eq!(
        std::fs::read(mount.path().join("data/a/d000/f000010")).unwrap(),
        b"overwritten"
    );
    assert!(!mount.path().join("data/big/f0").exists());
    assert_eq!(
        std::fs::read(mount.path().join("data/big/f3")).unwrap(),
        vec![9; 3 << 20]
    );
    assert_eq!(
        std::fs::read_dir(mount.path().join("data/b/d002"))
            .unwrap()
            .count(),
        0
    );
}

const IMAGE_ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// A valid `security.capability` value (v2, cap_net_bind_service permitted + effective).
const CAPABILITY: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn mknod(path: &Path, kind: libc::mode_t, mode: u32, major: u32, minor: u32) {
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: cpath is NUL-terminated.
    let rc = unsafe { libc::mknod(cpath.as_ptr(), kind | mode, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn set_mtime(path: &Path, seconds: i64, nanoseconds: i64) {
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let time = libc::timespec {
        tv_sec: seconds,
        tv_nsec: nanoseconds,
    };
    // SAFETY: cpath is NUL-terminated, times holds two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            [time, time].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0);
}

fn options(scratch: &Path) -> ConvertOptions {
    let work = scratch.join("work");
    std::fs::create_dir_all(&work).unwrap();
    ConvertOptions {
        work_dir: work,
        ..ConvertOptions::default()
    }
}

#[test]
fn crafted_layer_dirs_follow_docker_layer_semantics() {
    let scratch = tempfile::tempdir().unwrap();
    let (lower, upper) = (scratch.path().join("lower"), scratch.path().join("upper"));
    let canary = scratch.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("secret"), b"outside").unwrap();

    for dir in ["etc", "dev", "run", "gone/sub", "keep", "opq"] {
        std::fs::create_dir_all(lower.join(dir)).unwrap();
    }
    let app = lower.join("etc/app");
    std::fs::write(&app, b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(&app, Some(1000), Some(2000)).unwrap();
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o4750)).unwrap();
    xattr::set(&app, "security.capability", &CAPABILITY).unwrap();
    xattr::set(&app, "user.note", b"dropped, as Docker drops it").unwrap();
    set_mtime(&app, 1_500_000_000, 900_000_000);
    std::fs::write(lower.join("etc/hl-a"), b"shared").unwrap();
    std::fs::hard_link(lower.join("etc/hl-a"), lower.join("etc/hl-b")).unwrap();
    symlink("/", lower.join("root-link")).unwrap();
    symlink(&canary, lower.join("canary-link")).unwrap();
    symlink("../../../..", lower.join("etc/up")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(lower.join("run/sock")).unwrap();
    mknod(&lower.join("dev/null"), libc::S_IFCHR, 0o666, 1, 3);
    mknod(&lower.join("dev/sda"), libc::S_IFBLK, 0o660, 8, 0);
    mknod(&lower.join("run/fifo"), libc::S_IFIFO, 0o600, 0, 0);
    std::fs::write(lower.join("gone/sub/x"), b"x").unwrap();
    std::fs::write(lower.join("keep/a"), b"a").unwrap();
    std::fs::write(lower.join("keep/b"), b"b").unwrap();
    std::fs::write(lower.join("opq/old"), b"old").unwrap();

    for dir in ["keep", "opq", "etc"] {
        std::fs::create_dir_all(upper.join(dir)).unwrap();
    }
    mknod(&upper.join("gone"), libc::S_IFCHR, 0, 0, 0);
    mknod(&upper.join("keep/a"), libc::S_IFCHR, 0, 0, 0);
    xattr::set(upper.join("opq"), "trusted.overlay.opaque", b"y").unwrap();
    std::fs::write(upper.join("opq/new"), b"new").unwrap();
    // A second link outside the layer: a plain file inside it.
    std::fs::write(upper.join("etc/linked-out"), b"linked").unwrap();
    std::fs::hard_link(
        upper.join("etc/linked-out"),
        scratch.path().join("other-link"),
    )
    .unwrap();
    // Entries in the upper layer replacing what the lower one has through a symlink name.
    std::fs::write(upper.join("root-link"), b"now a file").unwrap();

    let output = scratch.path().join("out.ext4");
    let report = convert_layer_dirs(
        IMAGE_ID,
        ImageConfig::default(),
        &[lower.clone(), upper.clone()],
        &output,
        &options(scratch.path()),
    )
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(report.image_id, IMAGE_ID);
    e2fsck(&output);
    let mount = Mount::new(&output);
    let snapshot = Snapshot::from_dir(mount.path());
    let paths: Vec<String> = snapshot
        .entries
        .keys()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "canary-link",
            "dev",
            "dev/null",
            "dev/sda",
            "etc",
            "etc/app",
            "etc/hl-a",
            "etc/hl-b",
            "etc/linked-out",
            "etc/up",
            "keep",
            "keep/b",
            "lost+found",
            "opq",
            "opq/new",
            "proc",
            "root-link",
            "run",
            "run/fifo",
            "sys",
        ]
    );
    let get = |p: &str| &snapshot.entries[p.as_bytes()];
    let app = get("etc/app");
    assert_eq!((app.mode, app.uid, app.gid), (0o4750, 1000, 2000));
    assert_eq!(
        app.mtime, 1_500_000_000,
        "mtimes are whole seconds, truncated"
    );
    assert_eq!(
        app.xattrs.keys().collect::<Vec<_>>(),
        [&b"security.capability".to_vec()],
        "only security.capability is kept"
    );
    assert_eq!(app.xattrs[&b"security.capability"[..]], CAPABILITY);
    assert_eq!(
        get("canary-link").kind,
        Kind::Symlink(canary.as_os_str().as_bytes().to_vec())
    );
    assert_eq!(get("etc/up").kind, Kind::Symlink(b"../../../..".to_vec()));
    assert!(matches!(get("root-link").kind, Kind::File { size: 10, .. }));
    assert_eq!(get("dev/null").kind, Kind::Char(1, 3));
    assert_eq!(get("dev/sda").kind, Kind::Block(8, 0));
    assert_eq!(get("run/fifo").kind, Kind::Fifo);
    assert_eq!(
        snapshot.hardlinks,
        [vec![b"etc/hl-a".to_vec(), b"etc/hl-b".to_vec()]]
    );
    assert_eq!(std::fs::read(canary.join("secret")).unwrap(), b"outside");
}

#[test]
fn overlay_features_a_tar_cannot_express_are_refused() {
    for (what, target, name, value) in [
        (
            "redirected directory",
            "dir",
            "trusted.overlay.redirect",
            &b"/elsewhere"[..],
        ),
        ("metacopy file", "dir/file", "trusted.overlay.metacopy", b""),
        (
            "rootless opaque directory",
            "dir",
            "user.overlay.opaque",
            b"y",
        ),
        (
            "opaque value other than y",
            "dir",
            "trusted.overlay.opaque",
            b"x",
        ),
    ] {
        let scratch = tempfile::tempdir().unwrap();
        let layer = scratch.path().join("layer");
        std::fs::create_dir_all(layer.join("dir")).unwrap();
        std::fs::write(layer.join("dir/file"), b"data").unwrap();
        xattr::set(layer.join(target), name, value).unwrap();
        let output = scratch.path().join("out.ext4");
        std::fs::write(&output, b"stale").unwrap();
        let options = options(scratch.path());
        let err = convert_layer_dirs(
            IMAGE_ID,
            ImageConfig::default(),
            std::slice::from_ref(&layer),
            &output,
            &options,
        )
        .expect_err(what);
        let text = chain(&err);
        assert!(
            matches!(&err, ConvertError::UnsupportedLayerDir { entry, .. } if entry == target),
            "{what}: {text}"
        );
        assert!(
            text.contains(name) || text.contains("opaque"),
            "{what}: {text}"
        );
        assert!(!err.is_user_caused(), "{what}");
        assert!(!output.exists(), "{what}: the output is left behind");
        assert_eq!(
            std::fs::read_dir(&options.work_dir).unwrap().count(),
            0,
            "{what}"
        );
    }
}

#[test]
fn layer_dir_entries_get_the_same_validation_as_tar_entries() {
    let scratch = tempfile::tempdir().unwrap();
    let (lower, upper) = (scratch.path().join("lower"), scratch.path().join("upper"));
    std::fs::create_dir_all(&lower).unwrap();
    symlink("/tmp", lower.join("link")).unwrap();
    // A directory under the name of a lower symlink replaces it, as in Docker: what the upper
    // layer has below it lands in the new directory, never through the symlink.
    std::fs::create_dir_all(upper.join("link")).unwrap();
    std::fs::write(upper.join("link/file"), b"x").unwrap();
    let output = scratch.path().join("out.ext4");
    convert_layer_dirs(
        IMAGE_ID,
        ImageConfig::default(),
        &[lower.clone(), upper.clone()],
        &output,
        &options(scratch.path()),
    )
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    {
        let mount = Mount::new(&output);
        let link = std::fs::symlink_metadata(mount.path().join("link")).unwrap();
        assert!(link.is_dir());
        assert_eq!(std::fs::read(mount.path().join("link/file")).unwrap(), b"x");
    }

    let long = scratch.path().join("long");
    let mut deep = long.clone();
    for _ in 0..300 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    let err = convert_layer_dirs(
        IMAGE_ID,
        ImageConfig::default(),
        &[long],
        &output,
        &options(scratch.path()),
    )
    .expect_err("a 300-deep path");
    assert!(err.is_user_caused(), "{}", chain(&err));
    assert!(chain(&err).contains("deeper than"), "{}", chain(&err));
    assert!(!output.exists());

    let bad_id = convert_layer_dirs(
        "latest",
        ImageConfig::default(),
        &[lower],
        &output,
        &options(scratch.path()),
    )
    .expect_err("an image id that is no digest");
    assert!(
        chain(&bad_id).contains("not a sha256"),
        "{}",
        chain(&bad_id)
    );
}
