//! Conformance against the real Docker daemon: images built with `docker build` are saved,
//! converted, loop-mounted and compared attribute by attribute with `docker export` of a
//! container of the same image; the same image converted from the daemon's overlay2 layer
//! directories gives the same bytes. Also: two conversions of one archive give the same bytes.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Everything issue 3 lists that a Dockerfile on busybox can produce, over three layers on
/// top of an imported layer carrying a `security.capability` xattr (Docker only keeps that
/// xattr; other xattrs are covered by the crafted-layer tests).
const LAYERS: &str = r#"
RUN set -e; \
    mkdir -p /data/dir/nested /data/empty /gone/sub /keepdir; \
    echo hello > /data/file; \
    echo remove-me > /data/removed; \
    ln -s /etc/passwd /data/abs-link; \
    ln -s ../does/not/exist /data/dangling; \
    echo shared > /data/hl-a; ln /data/hl-a /data/hl-b; \
    mkfifo /data/fifo; \
    mknod /data/chr c 1 3; mknod /data/blk b 7 0; \
    echo owned > /data/owned; chown 1234:5678 /data/owned; chmod 4755 /data/owned; \
    chmod 2775 /data/dir; chmod 1777 /data/empty; \
    echo a > /gone/sub/f; \
    echo lower > /keepdir/lower; \
    echo file > /f2d2f; \
    touch -d '2001-02-03 04:05:06' /data/file; \
    dd if=/dev/zero of=/data/sparse bs=1 count=1 seek=20971520 2>/dev/null; \
    touch "/data/$(head -c 255 /dev/zero | tr '\0' n)"; \
    touch "$(printf '/data/\377\376name')"
RUN set -e; \
    rm /data/removed; \
    rm -rf /gone; mkdir -p /gone; echo new > /gone/new; \
    rm /f2d2f; mkdir /f2d2f; echo inner > /f2d2f/inner; \
    chmod 600 /data/file; chown 7:8 /data/dir; \
    ln /data/file /data/file-link-l2; \
    echo upper > /keepdir/upper
RUN set -e; \
    rm -rf /f2d2f; echo file-again > /f2d2f; \
    rm /keepdir/lower
"#;

/// What `docker export` adds to every container and is not part of the image: its init layer
/// (`/.dockerenv`, `/etc/{hostname,hosts,resolv.conf}`, the `/etc/mtab` symlink, and `/etc`
/// recreated above the image so overlayfs shows its mtime) and what is mounted in `/dev`. The
/// mount points `/dev`, `/proc`, `/sys` exist in both (the converter adds them as Docker does),
/// with the container's creation time in the export. The ext4 has `lost+found`, which
/// `mkfs.ext4` always creates.
fn drop_known_differences(export: &mut Snapshot, ext4: &mut Snapshot) {
    let container_only = |p: &Vec<u8>| {
        matches!(
            p.as_slice(),
            b".dockerenv" | b"etc/hostname" | b"etc/hosts" | b"etc/resolv.conf" | b"etc/mtab"
        ) || p.starts_with(b"dev/")
    };
    export.entries.retain(|p, _| !container_only(p));
    ext4.entries.retain(|p, _| p.as_slice() != b"lost+found");
    for snapshot in [&mut *export, &mut *ext4] {
        for dir in [&b"etc"[..], b"dev", b"proc", b"sys"] {
            if let Some(attrs) = snapshot.entries.get_mut(dir) {
                attrs.mtime = 0;
            }
        }
    }
}

fn assert_same(export: &Snapshot, ext4: &Snapshot) {
    let mut problems = Vec::new();
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for (path, attrs) in &export.entries {
        match ext4.entries.get(path) {
            None => problems.push(format!("missing in ext4: {}", show(path))),
            Some(other) if other != attrs => problems.push(format!(
                "differs: {}\n  export: {attrs:?}\n  ext4:   {other:?}",
                show(path)
            )),
            Some(_) => {}
        }
    }
    for path in ext4
        .entries
        .keys()
        .filter(|p| !export.entries.contains_key(*p))
    {
        problems.push(format!("only in ext4: {}", show(path)));
    }
    if export.hardlinks != ext4.hardlinks {
        problems.push(format!(
            "hardlink groups differ:\n  export: {:?}\n  ext4:   {:?}",
            export.hardlinks, ext4.hardlinks
        ));
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Imports a one-file layer whose file has `security.capability` set, made with the host's
/// setcap and GNU tar (busybox has neither).
fn import_capability_image(scratch: &Path, tag: &str) {
    let root = scratch.join("cap-root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("capbin"), b"#!/bin/sh\necho cap\n").unwrap();
    run(Command::new("chmod").arg("0755").arg(root.join("capbin")));
    run(Command::new("setcap")
        .arg("cap_net_bind_service+ep")
        .arg(root.join("capbin")));
    let tar = scratch.join("cap.tar");
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=security.capability", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("capbin"));
    run(docker().arg("import").arg(&tar).arg(tag));
}

#[test]
fn converted_image_equals_docker_export() {
    let scratch = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let cap_tag = format!("rootfs-test/capbase:{id}");
    let tag = format!("rootfs-test/conformance:{id}");
    import_capability_image(scratch.path(), &cap_tag);
    let context = scratch.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {base} AS tools\nFROM {cap_tag}\nCOPY --from=tools / /\n{LAYERS}\nENTRYPOINT [\"/bin/sh\", \"-c\"]\nCMD [\"echo hi\"]\nENV GREETING=hello\nWORKDIR /data\nUSER 1234:5678\nEXPOSE 8080/tcp\n",
            base = base_image()
        ),
    )
    .unwrap();
    build(&context, &tag);
    let saved = scratch.path().join("image.tar");
    let exported = scratch.path().join("export.tar");
    save(&tag, &saved);
    export(&tag, &exported);
    // What the pipeline does: read the image from the daemon's overlay2 layer directories.
    let from_dirs_output = scratch.path().join("from-dirs.ext4");
    let from_dirs = convert_layer_dirs_in(scratch.path(), &tag, &from_dirs_output);
    remove_image(&tag);
    remove_image(&cap_tag);

    let output = scratch.path().join("rootfs.ext4");
    let report = convert_in(scratch.path(), &saved, &output);
    e2fsck(&output);
    assert_eq!(from_dirs.image_id, report.image_id);
    assert_eq!(from_dirs.config, report.config);
    assert_eq!(
        from_dirs.sha256, report.sha256,
        "the layer directories and the docker save archive give different file systems"
    );

    let config = &report.config;
    assert_eq!(
        config.entrypoint.as_deref(),
        Some(&["/bin/sh".to_owned(), "-c".to_owned()][..])
    );
    assert_eq!(config.cmd.as_deref(), Some(&["echo hi".to_owned()][..]));
    assert!(config
        .env
        .as_ref()
        .unwrap()
        .contains(&"GREETING=hello".to_owned()));
    assert_eq!(config.working_dir.as_deref(), Some("/data"));
    assert_eq!(config.user.as_deref(), Some("1234:5678"));
    assert_eq!(
        config
            .exposed_ports
            .as_ref()
            .map(|p| p.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["8080/tcp".to_owned()])
    );
    assert!(report.image_id.starts_with("sha256:") && report.image_id.len() == 71);

    let mut expected = Snapshot::from_tar(&exported);
    let mount = Mount::new(&output);
    let mut actual = Snapshot::from_dir(mount.path());
    drop_known_differences(&mut expected, &mut actual);

    // The cases the image was built to contain must really be there, or the comparison
    // would prove nothing.
    let long_name = [b"data/".to_vec(), vec![b'n'; 255]].concat();
    for path in [
        &b"capbin"[..],
        b"data/abs-link",
        b"data/dangling",
        b"data/fifo",
        b"data/chr",
        b"data/blk",
        b"data/sparse",
        b"data/\xff\xfename",
        &long_name,
        b"gone/new",
        b"f2d2f",
        b"keepdir/upper",
    ] {
        assert!(
            expected.entries.contains_key(path),
            "the export lacks {}",
            String::from_utf8_lossy(path)
        );
    }
    for gone in [
        &b"data/removed"[..],
        b"gone/sub",
        b"keepdir/lower",
        b"f2d2f/inner",
    ] {
        assert!(
            !expected.entries.contains_key(gone),
            "the export still has {}",
            String::from_utf8_lossy(gone)
        );
    }
    assert!(expected.entries[&b"capbin"[..]]
        .xattrs
        .contains_key(&b"security.capability"[..]));
    assert_eq!(expected.entries[&b"data/owned"[..]].mode, 0o4755);
    assert!(expected
        .hardlinks
        .contains(&vec![b"data/file".to_vec(), b"data/file-link-l2".to_vec()]));
    assert!(expected
        .hardlinks
        .contains(&vec![b"data/hl-a".to_vec(), b"data/hl-b".to_vec()]));

    assert_same(&expected, &actual);
    assert_eq!(report.entries, actual.entries.len() as u64);
    drop(mount);

    // Right-sized and sparse: 20 % free over what is used, and mostly holes on disk.
    let meta = std::fs::metadata(&output).unwrap();
    assert_eq!(meta.len(), report.size_bytes);
    assert!(
        report.size_bytes < 200 << 20,
        "a ~25 MB image became a {} byte file system",
        report.size_bytes
    );
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "the ext4 file is not sparse"
    );
}

#[test]
fn same_archive_gives_identical_bytes() {
    let scratch = tempfile::tempdir().unwrap();
    let tag = format!("rootfs-test/determinism:{}", std::process::id());
    let context = scratch.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {}\nRUN mkdir -p /a/b /c && for i in $(seq 1 300); do echo $i > /a/b/f$i; ln -s f$i /a/b/l$i; done && echo x > /c/x && ln /c/x /c/y\n",
            base_image()
        ),
    )
    .unwrap();
    build(&context, &tag);
    let saved = scratch.path().join("image.tar");
    save(&tag, &saved);
    remove_image(&tag);

    let first = scratch.path().join("first.ext4");
    let second = scratch.path().join("second.ext4");
    let a = convert_in(scratch.path(), &saved, &first);
    // Let the clock move so any time leaking into the output would show.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = convert_in(scratch.path(), &saved, &second);
    e2fsck(&first);
    assert_eq!(a.sha256, b.sha256);
    assert_eq!(a.image_id, b.image_id);
    let (x, y) = (
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap(),
    );
    assert!(x == y, "the two conversions differ");
}
