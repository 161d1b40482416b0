//! Hostile archives, crafted byte by byte: each must fail with an error naming the offending
//! entry or member, leave a canary outside the work area untouched, leave the work area empty
//! and leave no output behind.

mod common;

use std::path::{Path, PathBuf};

use builder_rootfs::{convert, ConvertError, ConvertOptions};
use common::chain;
use common::craft::{
    self, dir, docker_archive, file, hardlink, layer, symlink, write_outer, Entry, CONFIG,
};

const CANARY: &[u8] = b"canary: must never change\n";

/// A scratch area laid out as `canary` (a file), `canary-dir/` (a directory the hostile
/// entries aim at), `work/` (the converter's work area) and `out.ext4`.
struct Arena {
    dir: tempfile::TempDir,
}

impl Arena {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("canary"), CANARY).unwrap();
        std::fs::create_dir(dir.path().join("canary-dir")).unwrap();
        std::fs::create_dir(dir.path().join("work")).unwrap();
        Arena { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Converts `archive`, expecting failure; checks nothing escaped.
    fn convert_fails(&self, archive: &Path, options: Option<ConvertOptions>) -> ConvertError {
        let options = options.unwrap_or_default();
        let options = ConvertOptions {
            work_dir: self.path("work"),
            ..options
        };
        let output = self.path("out.ext4");
        let err = match convert(archive, &output, &options) {
            Ok(report) => panic!("the hostile archive was converted: {report:?}"),
            Err(err) => err,
        };
        assert_eq!(
            std::fs::read(self.path("canary")).unwrap(),
            CANARY,
            "the canary changed"
        );
        assert_eq!(
            std::fs::read_dir(self.path("canary-dir")).unwrap().count(),
            0,
            "something was written into canary-dir"
        );
        assert_eq!(
            std::fs::read_dir(self.path("work")).unwrap().count(),
            0,
            "the work area was not cleaned up"
        );
        assert!(
            !output.exists(),
            "a failed conversion left its output behind"
        );
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names.retain(|n| n != "image.tar");
        assert_eq!(
            names,
            ["canary", "canary-dir", "work"],
            "something appeared beside the work area"
        );
        err
    }

    /// A docker-save archive of `layers`, converted; returns the error text.
    fn layers_fail(&self, layers: &[Vec<u8>]) -> (ConvertError, String) {
        let archive = self.path("image.tar");
        docker_archive(&archive, layers, CONFIG);
        let err = self.convert_fails(&archive, None);
        let text = chain(&err);
        (err, text)
    }
}

fn assert_entry_error(err: &ConvertError, text: &str, entry: &str, needle: &str) {
    assert!(
        matches!(err, ConvertError::InvalidEntry { .. }),
        "expected an invalid entry, got: {text}"
    );
    assert!(err.is_user_caused());
    assert!(
        text.contains(&format!("entry {entry:?}")),
        "the error does not name {entry:?}: {text}"
    );
    assert!(
        text.contains(needle),
        "the error does not say {needle:?}: {text}"
    );
}

#[test]
fn parent_components_are_rejected() {
    let arena = Arena::new();
    let (err, text) = arena.layers_fail(&[layer(&[file(b"../../../../../canary", b"pwned")])]);
    assert_entry_error(&err, &text, "../../../../../canary", "`..`");
    let (err, text) =
        arena.layers_fail(&[layer(&[dir(b"a"), file(b"a/../../canary-dir/x", b"pwned")])]);
    assert_entry_error(&err, &text, "a/../../canary-dir/x", "`..`");
}

#[test]
fn absolute_paths_are_rejected() {
    let arena = Arena::new();
    let target = arena.path("canary-dir/x");
    let target = target.to_str().unwrap().as_bytes().to_vec();
    let (err, text) = arena.layers_fail(&[layer(&[file(&target, b"pwned")])]);
    assert_entry_error(
        &err,
        &text,
        std::str::from_utf8(&target).unwrap(),
        "absolute",
    );
}

#[test]
fn paths_through_symlinks_are_rejected_within_and_across_layers() {
    let arena = Arena::new();
    let outside = arena.path("canary-dir");
    let outside = outside.to_str().unwrap().as_bytes();
    // Same layer: a symlink to the outside, then a file through it.
    let (err, text) = arena.layers_fail(&[layer(&[
        symlink(b"escape", outside),
        file(b"escape/x", b"pwned"),
    ])]);
    assert_entry_error(&err, &text, "escape/x", "symlink \"escape\"");
    // Planted by an earlier layer, used by a later one, relative and nested.
    let (err, text) = arena.layers_fail(&[
        layer(&[dir(b"d"), symlink(b"d/up", b"../../../../..")]),
        layer(&[dir(b"d/up/tmp"), file(b"d/up/tmp/x", b"pwned")]),
    ]);
    assert_entry_error(&err, &text, "d/up/tmp", "symlink \"d/up\"");
    // A whiteout through a symlink must not delete anything outside either.
    let (err, text) = arena.layers_fail(&[
        layer(&[symlink(b"s", outside)]),
        layer(&[file(b"s/.wh.x", b"")]),
    ]);
    assert_entry_error(&err, &text, "s/.wh.x", "symlink \"s\"");
}

#[test]
fn paths_through_files_are_rejected() {
    let arena = Arena::new();
    let (err, text) = arena.layers_fail(&[layer(&[file(b"f", b"x"), file(b"f/g", b"y")])]);
    assert_entry_error(&err, &text, "f/g", "not a directory");
}

#[test]
fn bad_hardlinks_are_rejected() {
    let arena = Arena::new();
    let (err, text) = arena.layers_fail(&[layer(&[hardlink(b"h", b"../../canary")])]);
    assert_entry_error(
        &err,
        &text,
        "h",
        "hardlink target \"../../canary\" contains a `..`",
    );
    let canary = arena.path("canary");
    let canary = canary.to_str().unwrap().as_bytes();
    let (err, text) = arena.layers_fail(&[layer(&[hardlink(b"h", canary)])]);
    assert_entry_error(&err, &text, "h", "is absolute");
    let (err, text) = arena.layers_fail(&[layer(&[hardlink(b"h", b"nowhere")])]);
    assert_entry_error(&err, &text, "h", "does not exist");
    let (err, text) = arena.layers_fail(&[layer(&[dir(b"d"), hardlink(b"h", b"d")])]);
    assert_entry_error(&err, &text, "h", "is a directory");
    let (err, text) = arena.layers_fail(&[layer(&[symlink(b"s", canary), hardlink(b"h", b"s/x")])]);
    assert_entry_error(&err, &text, "h", "goes through the symlink");
    // A hardlink replacing itself: the old file is gone before the link is made (as Docker).
    let (err, text) = arena.layers_fail(&[layer(&[file(b"f", b"x"), hardlink(b"f", b"f")])]);
    assert_entry_error(&err, &text, "f", "does not exist");
}

#[test]
fn lying_sizes_and_truncation_are_rejected() {
    let arena = Arena::new();
    // The header claims 8 GiB (the most 11 octal digits hold); the layer ends right after it.
    let mut lying = Vec::new();
    craft::append(
        &mut lying,
        &Entry {
            claimed_size: Some(0o77777777777),
            ..file(b"huge", b"")
        },
    );
    let (err, text) = arena.layers_fail(&[lying]);
    assert_entry_error(&err, &text, "huge", "runs past the end of the layer");

    // A PAX header claiming 512 MiB, which the tar reader would hold in memory.
    let mut pax_bomb = Vec::new();
    craft::append(
        &mut pax_bomb,
        &Entry {
            kind: b'x',
            claimed_size: Some(512 << 20),
            ..file(b"PaxHeaders/bomb", b"")
        },
    );
    let (err, text) = arena.layers_fail(&[pax_bomb]);
    assert_entry_error(&err, &text, "PaxHeaders/bomb", "extended header");

    // A layer cut in the middle of a header.
    let mut cut = layer(&[file(b"a", b"1"), file(b"b", b"2")]);
    cut.truncate(1024 + 200);
    let (err, text) = arena.layers_fail(&[cut]);
    assert!(matches!(err, ConvertError::CorruptLayer { .. }), "{text}");
    assert!(
        text.contains("0000000000000000000000000000000000000000000000000000000000000000/layer.tar"),
        "{text}"
    );

    // A header with a wrong checksum.
    let mut bad = layer(&[file(b"a", b"1")]);
    bad[148] = b'7';
    let (err, text) = arena.layers_fail(&[bad]);
    assert!(matches!(err, ConvertError::CorruptLayer { .. }), "{text}");
    assert!(text.contains("checksum"), "{text}");
}

#[test]
fn absurd_counts_and_sizes_hit_limits() {
    let arena = Arena::new();
    let names: Vec<Vec<u8>> = (0..100).map(|i| format!("f{i}").into_bytes()).collect();
    let entries: Vec<Entry<'_>> = names.iter().map(|n| file(n, b"")).collect();
    let archive = arena.path("image.tar");
    docker_archive(&archive, &[layer(&entries)], CONFIG);
    let err = arena.convert_fails(
        &archive,
        Some(ConvertOptions {
            max_entries: 50,
            ..ConvertOptions::default()
        }),
    );
    assert!(
        matches!(
            err,
            ConvertError::LimitExceeded {
                what: "tar entries",
                limit: 50
            }
        ),
        "{err}"
    );
    assert!(err.is_user_caused());

    // A gzip bomb: 8 MiB of zeros compress to ~8 KiB; the limit is 1 MiB.
    let bomb = {
        use std::io::Write;
        let data = vec![0u8; 8 << 20];
        let tar = layer(&[file(b"zeros", &data)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    };
    docker_archive(&archive, &[bomb], CONFIG);
    let err = arena.convert_fails(
        &archive,
        Some(ConvertOptions {
            max_layer_bytes: 1 << 20,
            ..ConvertOptions::default()
        }),
    );
    assert!(
        matches!(
            err,
            ConvertError::LimitExceeded {
                what: "inflated layer bytes",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn names_ext4_cannot_store_are_rejected() {
    let arena = Arena::new();
    let long = [b"d/".as_slice(), &[b'x'; 256]].concat();
    let (err, text) = arena.layers_fail(&[layer(&[file(&long, b"")])]);
    assert_entry_error(
        &err,
        &text,
        &String::from_utf8(long.clone()).unwrap(),
        "longer than 255",
    );
    let deep = b"a/".repeat(300);
    let (err, text) = arena.layers_fail(&[layer(&[dir(&deep)])]);
    assert_entry_error(
        &err,
        &text,
        &String::from_utf8(deep.clone()).unwrap(),
        "deeper than",
    );
    let (err, text) = arena.layers_fail(&[layer(&[file(b".wh...", b"")])]);
    assert_entry_error(&err, &text, ".wh...", "whiteout");
    let (err, text) = arena.layers_fail(&[layer(&[file(b"./", b"")])]);
    assert_entry_error(&err, &text, "./", "root directory");
    let big_xattr = vec![b'v'; 5000];
    let (err, text) = arena.layers_fail(&[layer(&[Entry {
        xattrs: &[("user.big", &big_xattr)],
        ..file(b"x", b"")
    }])]);
    assert_entry_error(&err, &text, "x", "extended attributes take");
}

#[test]
fn manifests_pointing_outside_the_archive_are_rejected() {
    let arena = Arena::new();
    let archive = arena.path("image.tar");
    let layer_tar = layer(&[file(b"a", b"1")]);
    for (config, layers) in [
        ("../canary", vec!["0/layer.tar"]),
        ("/etc/passwd", vec!["0/layer.tar"]),
        ("c.json", vec!["../../canary"]),
        ("c.json", vec!["0/../../canary"]),
        ("c.json", vec!["/etc/passwd"]),
    ] {
        let manifest = serde_json::json!([{ "Config": config, "Layers": layers }]);
        write_outer(
            &archive,
            &[
                (
                    "manifest.json".into(),
                    serde_json::to_vec(&manifest).unwrap(),
                ),
                ("c.json".into(), CONFIG.to_vec()),
                ("0/layer.tar".into(), layer_tar.clone()),
            ],
            &[],
        );
        let err = arena.convert_fails(&archive, None);
        let text = chain(&err);
        assert!(matches!(err, ConvertError::MissingMember { .. }), "{text}");
        let named = if config == "c.json" {
            layers[0]
        } else {
            config
        };
        assert!(
            text.contains(&format!("{named:?}")),
            "the error does not name {named:?}: {text}"
        );
    }
    // A symlink member (as docker save writes for repeated layers) that leaves the archive.
    let manifest = serde_json::json!([{ "Config": "c.json", "Layers": ["1/layer.tar"] }]);
    write_outer(
        &archive,
        &[
            (
                "manifest.json".into(),
                serde_json::to_vec(&manifest).unwrap(),
            ),
            ("c.json".into(), CONFIG.to_vec()),
        ],
        &[("1/layer.tar", "../../canary")],
    );
    let err = arena.convert_fails(&archive, None);
    let text = chain(&err);
    assert!(
        text.contains("\"1/layer.tar\"") && text.contains("outside the archive"),
        "{text}"
    );
}

#[test]
fn corrupt_outer_archives_are_rejected() {
    let arena = Arena::new();
    let archive = arena.path("image.tar");
    std::fs::write(&archive, b"this is not a tar file at all, just some bytes that are long enough to fill a header block? no").unwrap();
    let err = arena.convert_fails(&archive, None);
    assert!(!err.is_user_caused());
    let text = chain(&err);
    assert!(text.contains("image.tar"), "{text}");
    // A member whose data runs past the end of the file.
    let mut out = Vec::new();
    craft::append(
        &mut out,
        &Entry {
            claimed_size: Some(1 << 30),
            ..file(b"manifest.json", b"[]")
        },
    );
    std::fs::write(&archive, out).unwrap();
    let text = chain(&arena.convert_fails(&archive, None));
    assert!(
        text.contains("\"manifest.json\" runs past the end"),
        "{text}"
    );
}

/// A layer whose bytes are not what the config's `diff_ids` say (a tampered or swapped
/// layer), and a config listing more diff_ids than there are layers, are refused naming the
/// layer / the config; the right digest converts.
#[test]
fn layers_that_do_not_match_the_configs_diff_ids_are_rejected() {
    let arena = Arena::new();
    let archive = arena.path("image.tar");
    let one = layer(&[file(b"etc/motd", b"original\n")]);
    let config_with = |diff_ids: &[String]| {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/app"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    };
    let right = format!("sha256:{}", craft::sha256_hex(&one));
    let wrong = format!("sha256:{}", craft::sha256_hex(b"another layer"));

    docker_archive(
        &archive,
        std::slice::from_ref(&one),
        &config_with(std::slice::from_ref(&wrong)),
    );
    let err = arena.convert_fails(&archive, None);
    let text = chain(&err);
    assert!(
        matches!(err, ConvertError::LayerDigestMismatch { .. }) && !err.is_user_caused(),
        "{text}"
    );
    assert!(
        text.contains("0000000000000000000000000000000000000000000000000000000000000000/layer.tar")
            && text.contains(&wrong)
            && text.contains(&right),
        "{text}"
    );

    docker_archive(
        &archive,
        std::slice::from_ref(&one),
        &config_with(&[right.clone(), right.clone()]),
    );
    let text = chain(&arena.convert_fails(&archive, None));
    assert!(text.contains("2 diff_ids for the 1 layers"), "{text}");

    docker_archive(&archive, &[one], &config_with(&[right]));
    let output = arena.path("out.ext4");
    let options = ConvertOptions {
        work_dir: arena.path("work"),
        ..Default::default()
    };
    convert(&archive, &output, &options).expect("the matching layer converts");
}
