//! The native ext4 writer on what everyday images rarely exercise: several block groups with
//! a file running across a superblock backup, a directory of thousands of entries, extended
//! attributes too large for the inode, symlinks on both sides of the in-inode limit (59 / 60 bytes), device
//! numbers that need the new encoding, a sparse file with more extents than an inode holds
//! (a two-level extent tree), a file with a hundred names. Every output passes `e2fsck -fn`
//! (in `convert_in`) and is read back through the kernel.

mod common;

use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};

use common::craft::{self, dir, docker_archive, file, hardlink, layer, symlink, Entry, CONFIG};
use common::{convert_in, Mount};

/// Deterministic incompressible bytes.
fn noise(n: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n);
    out
}

#[test]
fn edge_cases_pass_e2fsck_and_read_back() {
    let scratch = tempfile::tempdir().unwrap();
    // 200 MiB: past group 0 (128 MiB), so its data runs across group 1's superblock backup.
    let big = noise(200 << 20, 7);
    let names: Vec<Vec<u8>> = (0..5000)
        .map(|i| format!("wide/entry-{i:05}").into_bytes())
        .collect();
    let link_names: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("links/name-{i:03}").into_bytes())
        .collect();
    // The tar crate splits PAX records at newlines, so the value has none.
    let large_value: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let fast_target = vec![b'f'; 59];
    let slow_target = vec![b's'; 60];
    let long_target = [&b"/"[..], &[b'l'; 98][..]].concat();
    let xattrs: [(&str, &[u8]); 3] = [
        ("user.large", &large_value),
        ("security.capability", &cap),
        ("trusted.small", b"x"),
    ];

    let mut entries: Vec<Entry<'_>> = vec![
        file(b"big", &big),
        Entry {
            xattrs: &xattrs,
            ..file(b"xattrs", b"content")
        },
        symlink(b"fast", &fast_target),
        symlink(b"slow", &slow_target),
        symlink(b"long", &long_target),
        Entry {
            kind: b'3',
            device: (300, 70000),
            ..dir(b"dev/wide-char")
        },
        Entry {
            kind: b'4',
            device: (8, 1),
            ..dir(b"dev/sda1")
        },
        dir(b"links"),
        file(b"links/first", b"shared"),
    ];
    entries.extend(names.iter().map(|n| file(n, b"")));
    entries.extend(link_names.iter().map(|n| hardlink(n, b"links/first")));
    let archive = scratch.path().join("image.tar");
    docker_archive(&archive, &[layer(&entries)], CONFIG);
    let output = scratch.path().join("out.ext4");
    convert_in(scratch.path(), &archive, &output);
    let mount = Mount::new(&output);
    let root = mount.path();

    assert!(
        std::fs::read(root.join("big")).unwrap() == big,
        "big file content differs"
    );
    let listed = std::fs::read_dir(root.join("wide")).unwrap().count();
    assert_eq!(listed, names.len());
    assert!(root.join("wide/entry-04999").exists() && root.join("wide/entry-00000").exists());
    assert_eq!(
        xattr::get(root.join("xattrs"), "user.large").unwrap(),
        Some(large_value.clone())
    );
    assert_eq!(
        xattr::get(root.join("xattrs"), "security.capability").unwrap(),
        Some(cap.to_vec())
    );
    assert_eq!(
        xattr::get(root.join("xattrs"), "trusted.small").unwrap(),
        Some(b"x".to_vec())
    );
    for (name, target) in [
        ("fast", &fast_target),
        ("slow", &slow_target),
        ("long", &long_target),
    ] {
        let read = std::fs::read_link(root.join(name)).unwrap();
        assert_eq!(read.as_os_str().as_encoded_bytes(), &target[..], "{name}");
    }
    let wide = std::fs::symlink_metadata(root.join("dev/wide-char")).unwrap();
    assert!(wide.file_type().is_char_device());
    assert_eq!(
        (libc::major(wide.rdev()), libc::minor(wide.rdev())),
        (300, 70000)
    );
    let sda1 = std::fs::symlink_metadata(root.join("dev/sda1")).unwrap();
    assert!(sda1.file_type().is_block_device());
    assert_eq!((libc::major(sda1.rdev()), libc::minor(sda1.rdev())), (8, 1));
    let first = std::fs::metadata(root.join("links/first")).unwrap();
    assert_eq!(first.nlink(), 101);
    assert_eq!(
        std::fs::metadata(root.join("links/name-042"))
            .unwrap()
            .ino(),
        first.ino()
    );
}

/// 1500 islands of data 64 KiB apart in an archive that is sparse on disk: the holes stay
/// holes, and 1500 extents need index blocks above the leaves.
#[test]
fn a_fragmented_sparse_file_gets_a_deep_extent_tree() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("image.tar");
    let islands = 1500u64;
    let stride = 68u64 << 10;
    let size = islands * stride;
    let island = |i: u64| noise(4096, i + 1);
    let data: Vec<Vec<u8>> = (0..islands).map(island).collect();
    let pieces: Vec<(u64, &[u8])> = data
        .iter()
        .enumerate()
        .map(|(i, bytes)| (i as u64 * stride, &bytes[..]))
        .collect();
    craft::sparse_file_archive(&archive, b"sparse", size, &pieces);

    let output = scratch.path().join("out.ext4");
    convert_in(scratch.path(), &archive, &output);
    let mount = Mount::new(&output);
    let path = mount.path().join("sparse");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 <= islands * 3 * 4096 + (1 << 20),
        "holes were filled: {} blocks",
        meta.blocks()
    );
    let f = std::fs::File::open(&path).unwrap();
    for i in [0, 1, 700, islands - 1] {
        let mut buf = vec![0u8; 4096 + 8];
        f.read_exact_at(&mut buf, i * stride).unwrap();
        assert_eq!(&buf[..4096], &island(i)[..], "island {i}");
        assert!(buf[4096..].iter().all(|&b| b == 0), "after island {i}");
    }
    let depth = extent_depth(&output, "/sparse");
    assert!(depth >= 2, "extent tree depth {depth}");
}

/// The extent tree depth of `path` in `image`, from `debugfs`'s extent dump, whose rows start
/// with `level/depth`.
fn extent_depth(image: &std::path::Path, path: &str) -> u32 {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("ex {path}")])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| {
            let mut tokens = line.split_whitespace();
            (tokens.next() == Some("0/")).then(|| tokens.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no extent rows in debugfs output: {text}"))
}

/// A 16 TiB file (a sparse archive on tmpfs, which allows it) is more than ext4 with 4 KiB
/// blocks holds: refused as the image's fault before anything is written.
#[test]
fn a_file_larger_than_ext4_holds_is_refused() {
    let scratch = tempfile::tempdir_in("/dev/shm").unwrap();
    let archive = scratch.path().join("image.tar");
    craft::sparse_file_archive(&archive, b"huge", 1 << 44, &[(0, b"start")]);
    let output = scratch.path().join("out.ext4");
    let options = builder_rootfs::ConvertOptions {
        work_dir: scratch.path().to_owned(),
        ..Default::default()
    };
    let err = builder_rootfs::convert(&archive, &output, &options).unwrap_err();
    assert!(err.is_user_caused(), "{err}");
    assert!(err.to_string().contains("bytes in one file"), "{err}");
    assert!(!output.exists());
}
