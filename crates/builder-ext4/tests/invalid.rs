//! What ext4 cannot store is refused before anything is written, with an error that names the
//! entry (its path in the tree) or the option, and says what is wrong with it.

use std::collections::BTreeMap;

use builder_ext4::{Create, InMemory, Kind, Meta, Node, Options, Size, Tree, ROOT};

fn meta() -> Meta {
    Meta {
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Vec::new(),
    }
}

fn file(content: &[u8]) -> Node<Vec<u8>> {
    Node {
        kind: Kind::File(content.to_vec()),
        meta: meta(),
    }
}

fn options() -> Options {
    Options {
        size: Size::Fit {
            free_space_percent: 0,
            min_free_bytes: 0,
        },
        label: String::new(),
        uuid: [1; 16],
        hash_seed: [2; 16],
        time: 0,
        journal: false,
        sha256: false,
        sync: false,
        create: Create::Replace,
    }
}

/// Writes `tree` with `options`, expecting a refusal; returns its message and checks that no
/// output was created.
fn refused(tree: &Tree<Vec<u8>>, options: &Options) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.ext4");
    let err = builder_ext4::write(tree, &InMemory, options, &path).expect_err("refused");
    assert!(!path.exists(), "{err}: an output was left");
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

fn dir_node() -> Node<Vec<u8>> {
    Node {
        kind: Kind::Dir(BTreeMap::new()),
        meta: meta(),
    }
}

/// Adds one bad entry to a tree.
type Build = Box<dyn Fn(&mut Tree<Vec<u8>>)>;

#[test]
fn entries_ext4_cannot_store_are_refused_naming_their_path() {
    let cases: Vec<(&str, Build, &str)> = vec![
        (
            "/etc/a/b",
            Box::new(|t| {
                t.add(ROOT, b"etc", dir_node());
                let etc = t.children(ROOT).unwrap()[&b"etc"[..]];
                t.add(etc, b"a/b", file(b""));
            }),
            "holds a `/`",
        ),
        (
            "/..",
            Box::new(|t| {
                t.add(ROOT, b"..", file(b""));
            }),
            "`..`",
        ),
        (
            "/xxx",
            Box::new(|t| {
                t.add(ROOT, &[b'x'; 256], file(b""));
            }),
            "longer than 255 bytes",
        ),
        (
            "/twice",
            Box::new(|t| {
                let d = t.add(ROOT, b"once", dir_node());
                t.link(ROOT, b"twice", d);
            }),
            "directories cannot be hardlinked",
        ),
        (
            "/link",
            Box::new(|t| {
                t.add(
                    ROOT,
                    b"link",
                    Node {
                        kind: Kind::Symlink(vec![b't'; 4096]),
                        meta: meta(),
                    },
                );
            }),
            "symlink target",
        ),
        (
            "/x",
            Box::new(|t| {
                let mut node = file(b"");
                node.meta.xattrs = vec![(b"os2.name".to_vec(), b"v".to_vec())];
                t.add(ROOT, b"x", node);
            }),
            "\"os2.name\" cannot be stored",
        ),
        (
            "/big-xattrs",
            Box::new(|t| {
                let mut node = file(b"");
                node.meta.xattrs = vec![
                    (b"user.a".to_vec(), vec![0; 3000]),
                    (b"user.b".to_vec(), vec![0; 3000]),
                ];
                t.add(ROOT, b"big-xattrs", node);
            }),
            "more than the 4060",
        ),
        (
            "/mode",
            Box::new(|t| {
                let mut node = file(b"");
                node.meta.mode = 0o100644;
                t.add(ROOT, b"mode", node);
            }),
            "beyond the permission bits",
        ),
        (
            "/old",
            Box::new(|t| {
                let mut node = file(b"");
                node.meta.mtime = -(1 << 40);
                t.add(ROOT, b"old", node);
            }),
            "mtime",
        ),
        (
            "/ghost",
            Box::new(|t| t.link(ROOT, b"ghost", 99)),
            "node 99 does not exist",
        ),
    ];
    for (path, build, problem) in cases {
        let mut tree = Tree::new(Meta {
            mode: 0o755,
            ..meta()
        });
        build(&mut tree);
        let text = refused(&tree, &options());
        let path = if path == "/xxx" {
            format!("/{}", "x".repeat(256))
        } else {
            path.to_owned()
        };
        assert!(
            text.contains(&format!("the entry {path} cannot be stored in ext4")),
            "{text}"
        );
        assert!(text.contains(problem), "{text}");
    }
}

#[test]
fn options_and_sizes_it_cannot_make_are_refused() {
    let mut tree = Tree::new(meta());
    tree.add(ROOT, b"data", file(&[7; 100_000]));
    let long_label = Options {
        label: "a label of more than sixteen bytes".into(),
        ..options()
    };
    assert!(
        refused(&tree, &long_label).starts_with("invalid ext4 option label"),
        "{}",
        refused(&tree, &long_label)
    );
    // Eight blocks cannot hold the metadata, let alone the data.
    let tiny = Options {
        size: Size::Fixed { bytes: 8 << 12 },
        ..options()
    };
    let text = refused(&tree, &tiny);
    assert!(text.contains("is too small for its content"), "{text}");
    let huge = Options {
        size: Size::Fixed { bytes: 1 << 50 },
        ..options()
    };
    let text = refused(&tree, &huge);
    assert!(text.contains("blocks in one file system"), "{text}");
}
