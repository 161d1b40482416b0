//! Layer semantics and input formats on crafted archives, for what Docker cannot be made to
//! produce (arbitrary xattrs, whiteout ordering inside a layer, repeated layers stored as
//! symlink members, files over 4 GiB without writing 4 GiB) and the OCI layout form.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use common::craft::{
    self, dir, docker_archive, file, hardlink, layer, symlink, write_outer, Entry, CONFIG,
};
use common::{convert_in, e2fsck, Mount};

fn converted(scratch: &Path, archive: &Path) -> (builder_rootfs::ConvertReport, Mount) {
    let output = scratch.join("out.ext4");
    let report = convert_in(scratch, archive, &output);
    e2fsck(&output);
    (report, Mount::new(&output))
}

fn layers() -> Vec<Vec<u8>> {
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    vec![
        layer(&[
            Entry {
                mode: 0o750,
                uid: 3,
                gid: 4,
                mtime: 1_500_000_000,
                ..dir(b"./")
            },
            dir(b"etc"),
            Entry {
                xattrs: &[
                    ("user.note", b"hello"),
                    ("security.capability", &cap),
                    ("trusted.t", b"x"),
                ],
                mode: 0o4750,
                uid: 1000,
                gid: 2000,
                mtime: 1_234_567_890,
                ..file(b"etc/app", b"#!/bin/sh\n")
            },
            Entry {
                xattrs: &[("user.dir", b"d")],
                mode: 0o1777,
                ..dir(b"tmp")
            },
            Entry {
                xattrs: &[("trusted.link", b"l")],
                ..symlink(b"etc/link", b"/nowhere")
            },
            Entry {
                kind: b'3',
                device: (4, 64),
                mode: 0o620,
                gid: 5,
                ..file(b"dev/ttyS0", b"")
            },
            Entry {
                kind: b'4',
                device: (8, 1),
                ..file(b"dev/sda1", b"")
            },
            Entry {
                kind: b'6',
                ..file(b"run/fifo", b"")
            },
            file(b"shared/a", b"one"),
            hardlink(b"shared/b", b"shared/a"),
            hardlink(b"shared/c", b"shared/a"),
            dir(b"opaque"),
            file(b"opaque/lower", b"lower"),
            file(b"gone", b"gone"),
            file(b"implicit/parents/file", b"p"),
            file(b"aufs/keep", b"k"),
        ]),
        layer(&[
            // Hardlink to a file of the lower layer.
            hardlink(b"etc/app-link", b"etc/app"),
            // Replacing one name of a hardlinked trio leaves the other two linked.
            file(b"shared/c", b"replaced"),
            // Opaque: the entry this layer adds survives, the lower one does not, whatever
            // the order.
            file(b"opaque/upper", b"upper"),
            file(b"opaque/.wh..wh..opq", b""),
            // A whiteout only hides lower layers: a same-layer entry stays.
            file(b"new", b"new"),
            file(b".wh.new", b""),
            file(b".wh.gone", b""),
            // AUFS hardlink metadata is ignored.
            file(b"aufs/.wh..wh.plnk", b""),
            // Metadata-only change of a lower directory keeps its children.
            Entry {
                mode: 0o700,
                uid: 7,
                ..dir(b"implicit")
            },
        ]),
    ]
}

#[test]
fn crafted_layers_apply_like_docker() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("image.tar");
    docker_archive(&archive, &layers(), CONFIG);
    let (report, mount) = converted(scratch.path(), &archive);
    let root = mount.path();
    assert_eq!(report.config.cmd.as_deref(), Some(&["/app".to_owned()][..]));

    // The layer's `./` entry (0750, 3:4) does not show: a container's root directory is
    // Docker's own (the container layer's), and a layer directory never carries it either.
    let top = std::fs::symlink_metadata(root).unwrap();
    assert_eq!(
        (top.mode() & 0o7777, top.uid(), top.gid(), top.mtime()),
        (0o755, 0, 0, 1)
    );
    let app = std::fs::symlink_metadata(root.join("etc/app")).unwrap();
    assert_eq!(
        (app.mode() & 0o7777, app.uid(), app.gid(), app.mtime()),
        (0o4750, 1000, 2000, 1_234_567_890)
    );
    assert_eq!(
        xattr::get(root.join("etc/app"), "user.note")
            .unwrap()
            .as_deref(),
        Some(&b"hello"[..])
    );
    assert!(xattr::get(root.join("etc/app"), "security.capability")
        .unwrap()
        .is_some());
    assert_eq!(
        xattr::get(root.join("etc/app"), "trusted.t")
            .unwrap()
            .as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(
        xattr::get(root.join("tmp"), "user.dir").unwrap().as_deref(),
        Some(&b"d"[..])
    );
    assert_eq!(
        xattr::get(root.join("etc/link"), "trusted.link")
            .unwrap()
            .as_deref(),
        Some(&b"l"[..])
    );
    assert_eq!(
        std::fs::symlink_metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("/nowhere")
    );

    let tty = std::fs::symlink_metadata(root.join("dev/ttyS0")).unwrap();
    assert!(tty.file_type().is_char_device());
    assert_eq!(
        (tty.rdev(), tty.mode() & 0o7777, tty.gid()),
        (libc::makedev(4, 64), 0o620, 5)
    );
    let sda = std::fs::symlink_metadata(root.join("dev/sda1")).unwrap();
    assert!(sda.file_type().is_block_device() && sda.rdev() == libc::makedev(8, 1));
    assert!(std::fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    let ino = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("etc/app"), ino("etc/app-link"));
    assert_eq!(
        std::fs::symlink_metadata(root.join("etc/app"))
            .unwrap()
            .nlink(),
        2
    );
    assert_eq!(ino("shared/a"), ino("shared/b"));
    assert_ne!(ino("shared/a"), ino("shared/c"));
    assert_eq!(std::fs::read(root.join("shared/c")).unwrap(), b"replaced");
    assert_eq!(std::fs::read(root.join("shared/b")).unwrap(), b"one");

    assert!(!root.join("opaque/lower").exists());
    assert_eq!(std::fs::read(root.join("opaque/upper")).unwrap(), b"upper");
    assert_eq!(std::fs::read(root.join("new")).unwrap(), b"new");
    assert!(!root.join("gone").exists());
    assert!(!root.join("aufs/.wh..wh.plnk").exists() && root.join("aufs/keep").exists());
    let implicit = std::fs::symlink_metadata(root.join("implicit")).unwrap();
    assert_eq!((implicit.mode() & 0o7777, implicit.uid()), (0o700, 7));
    assert_eq!(
        std::fs::read(root.join("implicit/parents/file")).unwrap(),
        b"p"
    );
    let parents = std::fs::symlink_metadata(root.join("implicit/parents")).unwrap();
    assert_eq!((parents.mode() & 0o7777, parents.uid()), (0o755, 0));
}

/// The same layers and config as an OCI image layout with gzip-compressed layers must give
/// the very same file system as the docker save form.
#[test]
fn oci_layout_with_gzip_layers_gives_the_same_bytes() {
    let scratch = tempfile::tempdir().unwrap();
    let docker = scratch.path().join("docker.tar");
    docker_archive(&docker, &layers(), CONFIG);
    let docker_out = scratch.path().join("docker.ext4");
    let expected = convert_in(scratch.path(), &docker, &docker_out);

    let blob = |data: &[u8]| {
        (
            format!("blobs/sha256/{}", craft::sha256_hex(data)),
            data.to_vec(),
        )
    };
    let mut members = Vec::new();
    let mut layer_descriptors = Vec::new();
    for tar in layers() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        layer_descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", craft::sha256_hex(&gz)),
            "size": gz.len(),
        }));
        members.push(blob(&gz));
    }
    members.push(blob(CONFIG));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", craft::sha256_hex(CONFIG)),
            "size": CONFIG.len(),
        },
        "layers": layer_descriptors,
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", craft::sha256_hex(&manifest)),
            "size": manifest.len(),
        }],
    });
    members.push(blob(&manifest));
    members.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
    members.push((
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    ));
    let oci = scratch.path().join("oci.tar");
    write_outer(&oci, &members, &[]);
    let oci_out = scratch.path().join("oci.ext4");
    let report = convert_in(scratch.path(), &oci, &oci_out);
    e2fsck(&oci_out);
    assert_eq!(report.image_id, expected.image_id);
    assert_eq!(
        report.sha256, expected.sha256,
        "the OCI and docker save forms differ"
    );
}

/// `docker save` stores a layer that repeats as a symlink member to the first copy.
#[test]
fn repeated_layers_stored_as_symlink_members_are_followed() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("image.tar");
    let first = layer(&[file(b"f", b"first")]);
    let second = layer(&[file(b"f", b"second")]);
    let manifest = serde_json::json!([{ "Config": "c.json", "Layers": ["a/layer.tar", "b/layer.tar", "c/layer.tar"] }]);
    write_outer(
        &archive,
        &[
            (
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap(),
            ),
            ("c.json".into(), CONFIG.to_vec()),
            ("a/layer.tar".into(), first),
            ("b/layer.tar".into(), second),
        ],
        &[("c/layer.tar", "../a/layer.tar")],
    );
    let (_, mount) = converted(scratch.path(), &archive);
    assert_eq!(std::fs::read(mount.path().join("f")).unwrap(), b"first");
}

/// A 5 GiB file, mostly zeros, stored in an archive that is itself sparse on disk: the
/// converted file system holds it with the right size and content, as a sparse file.
#[test]
fn files_over_4_gib_convert_sparse() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("image.tar");
    let size: u64 = 5 << 30;
    let tail = b"end of a large file";
    craft::sparse_file_archive(
        &archive,
        b"big",
        size,
        &[(size - tail.len() as u64, &tail[..])],
    );

    let (_, mount) = converted(scratch.path(), &archive);
    let big = mount.path().join("big");
    let meta = std::fs::metadata(&big).unwrap();
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "the large file is not sparse: {} blocks",
        meta.blocks()
    );
    let f = std::fs::File::open(&big).unwrap();
    let mut buf = vec![0u8; tail.len()];
    f.read_exact_at(&mut buf, size - tail.len() as u64).unwrap();
    assert_eq!(buf, tail);
    let mut zeros = vec![1u8; 4096];
    f.read_exact_at(&mut zeros, 3 << 30).unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
}

/// Used, free and total bytes, and used and total inodes, of a mounted file system.
fn usage(root: &Path) -> (u64, u64, u64, u64) {
    let path = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `statvfs` is a plain C struct of integers, for which all zero bytes are valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path that outlives the call, and a struct of the type it fills.
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    let (total, free) = (st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize);
    (total - free, free, st.f_files - st.f_ffree, st.f_files)
}

/// Content + metadata + 20 % (or the floor) free, inodes sized to the entries, sparse file.
#[test]
fn file_system_is_right_sized_and_sparse() {
    let scratch = tempfile::tempdir().unwrap();
    // 2000 small files and 96 MiB of incompressible data, so 20 % is above nothing trivial.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n.div_ceil(8))
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .take(n)
            .collect()
    };
    let names: Vec<Vec<u8>> = (0..2000)
        .map(|i| format!("small/d{}/f{i}", i / 100).into_bytes())
        .collect();
    let small: Vec<Vec<u8>> = (0..2000).map(|i| noise(100 + i * 3)).collect();
    let big = noise(96 << 20);
    let mut entries: Vec<Entry<'_>> = names.iter().zip(&small).map(|(n, d)| file(n, d)).collect();
    entries.push(file(b"big", &big));
    let archive = scratch.path().join("image.tar");
    docker_archive(&archive, &[layer(&entries)], CONFIG);

    let output = scratch.path().join("out.ext4");
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    for (percent, floor) in [(20u32, 0u64), (20, 256 << 20)] {
        let options = builder_rootfs::ConvertOptions {
            work_dir: work.clone(),
            free_space_percent: percent,
            min_free_bytes: floor,
            ..Default::default()
        };
        let report = builder_rootfs::convert(&archive, &output, &options).unwrap();
        e2fsck(&output);
        let mount = Mount::new(&output);
        let (used, free, inodes_used, inodes) = usage(mount.path());
        drop(mount);
        let wanted = (used * u64::from(percent) / 100).max(floor);
        assert!(
            free >= wanted,
            "{free} bytes free, wanted {wanted} ({used} used)"
        );
        assert!(
            free <= wanted + wanted / 10 + (4 << 20),
            "{free} bytes free is far more than the {wanted} wanted ({used} used)"
        );
        let inodes_wanted = inodes_used + (inodes_used / 5).max(1024);
        assert!(
            inodes_used >= report.entries && (inodes_wanted..=inodes_wanted + 64).contains(&inodes),
            "{inodes_used} of {inodes} inodes used"
        );
        let meta = std::fs::metadata(&output).unwrap();
        assert_eq!(meta.len(), report.size_bytes);
        assert!(
            meta.blocks() * 512 <= used + (1 << 20),
            "{} bytes allocated for {used} used: not sparse",
            meta.blocks() * 512
        );
    }
}

/// A capability set whose bytes include a newline (0x0A: CAP_DAC_OVERRIDE + CAP_FOWNER), as
/// `setcap cap_dac_override,cap_fowner+ep` writes it: PAX records are read by length.
#[test]
fn xattr_values_holding_newline_bytes_survive() {
    let scratch = tempfile::tempdir().unwrap();
    let cap = [
        1u8, 0, 0, 2, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let xattrs: [(&str, &[u8]); 2] = [("security.capability", &cap), ("user.lines", b"a\nb\n")];
    let archive = scratch.path().join("image.tar");
    docker_archive(
        &archive,
        &[layer(&[Entry {
            xattrs: &xattrs,
            ..file(b"tool", b"#!/bin/sh\n")
        }])],
        CONFIG,
    );
    let (_, mount) = converted(scratch.path(), &archive);
    let tool = mount.path().join("tool");
    assert_eq!(
        xattr::get(&tool, "security.capability").unwrap().as_deref(),
        Some(&cap[..])
    );
    assert_eq!(
        xattr::get(&tool, "user.lines").unwrap().as_deref(),
        Some(&b"a\nb\n"[..])
    );
}

/// An image without layers (FROM scratch with only config) still gives a bootable skeleton.
#[test]
fn image_without_layers_gives_the_mount_points() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("image.tar");
    docker_archive(&archive, &[], CONFIG);
    let (report, mount) = converted(scratch.path(), &archive);
    assert_eq!(report.entries, 3);
    for dir in ["dev", "proc", "sys"] {
        let meta = std::fs::symlink_metadata(mount.path().join(dir)).unwrap();
        assert!(
            meta.is_dir() && meta.mode() & 0o7777 == 0o755 && meta.uid() == 0,
            "{dir}"
        );
    }
}
