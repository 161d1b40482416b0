//! Trees through the writer and back: every file system passes `e2fsck -fn` and, mounted
//! read-only through the kernel, shows exactly the tree: names, kinds, modes, owners, times,
//! sizes, contents, symlink targets, device numbers, link counts, hardlinks, xattrs. Random
//! trees (proptest) cover the combinations; two fixed ones cover directories large enough for
//! a one- and a two-level hashed index, looked up name by name through the kernel's index.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use builder_ext4::{Kind, Meta, Node, Size, Tree, ROOT};
use proptest::prelude::*;

use common::{can_mount, e2fsck, expected, fit, options, read_back_masked, write_checked, Mount};

/// Name pieces: ASCII, multi-byte UTF-8, bytes that are no UTF-8 at all.
const PIECES: &[&str] = &["a", "Zz", "-", "_", ".x", "ü", "日本", "🦀", "+lost", " "];

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Short names of pieces.
        prop::collection::vec(prop::sample::select(PIECES), 1..6)
            .prop_map(|p| p.concat().into_bytes()),
        // Long ones, up to the 255-byte limit.
        (1usize..=255, any::<u8>()).prop_map(|(len, c)| {
            let c = b'a' + c % 26;
            vec![c; len]
        }),
        // Raw bytes (no `/`, no NUL).
        prop::collection::vec(1u8..=255, 1..40).prop_map(|v| v
            .into_iter()
            .map(|b| if b == b'/' { b'%' } else { b })
            .collect()),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        0u32..=0o7777,
        prop_oneof![Just(0u32), 1u32..70_000, Just(u32::MAX - 1)],
        prop_oneof![Just(0u32), 1u32..70_000],
        prop_oneof![Just(0i64), 1i64..=0x3_7FFF_FFFF, -(1i64 << 31)..0],
        prop::collection::vec(xattr(), 0..4),
    )
        .prop_map(|(mode, uid, gid, mtime, xattrs)| {
            // One value per name; the writer sorts them as the kernel does.
            let xattrs: BTreeMap<_, _> = xattrs.into_iter().collect();
            Meta {
                mode,
                uid,
                gid,
                mtime,
                xattrs: xattrs.into_iter().collect(),
            }
        })
}

fn xattr() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::sample::select(&["user.", "trusted.", "security."][..]),
        prop::collection::vec(b'a'..=b'z', 1..=20),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            // Too large for the inode: goes to an xattr block.
            prop::collection::vec(any::<u8>(), 200..900),
        ],
    )
        .prop_map(|(prefix, name, value)| ([prefix.as_bytes(), &name].concat(), value))
}

/// What one entry of a random tree is, before its directory is chosen.
#[derive(Debug, Clone)]
enum Entry {
    Dir,
    /// Length and a seed for the content.
    File(usize, u64),
    Symlink(Vec<u8>),
    /// A second name of the n-th file made so far (modulo their count).
    Hardlink(usize),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
    /// A directory of this many entries with long names: more than one block, so indexed.
    Wide(usize),
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        3 => Just(Entry::Dir),
        4 => (0usize..6000, any::<u64>()).prop_map(|(n, s)| Entry::File(n, s)),
        1 => ((1usize << 20)..(3 << 20), any::<u64>()).prop_map(|(n, s)| Entry::File(n, s)),
        2 => prop_oneof![
            prop::collection::vec(1u8..=255, 1..=59),
            prop::collection::vec(1u8..=255, 60..=4095),
        ].prop_map(Entry::Symlink),
        2 => any::<usize>().prop_map(Entry::Hardlink),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Entry::Char(a, b)),
        1 => (0u32..256, 0u32..256).prop_map(|(a, b)| Entry::Block(a, b)),
        1 => Just(Entry::Fifo),
        1 => Just(Entry::Socket),
        1 => (100usize..2500).prop_map(Entry::Wide),
    ]
}

/// Deterministic bytes from a seed (xorshift), so large contents cost no shrinking.
fn content(len: usize, mut state: u64) -> Vec<u8> {
    state |= 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn fifo() -> Node<Vec<u8>> {
    Node {
        kind: Kind::Fifo,
        meta: Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        },
    }
}

/// Builds a tree from entries, each placed in one of the directories made before it.
fn build(root: Meta, entries: Vec<(usize, Vec<u8>, Entry, Meta)>) -> Tree<Vec<u8>> {
    let mut tree = Tree::new(root);
    let mut dirs = vec![ROOT];
    let mut files = Vec::new();
    for (dir_pick, name, entry, mut meta) in entries {
        let dir = dirs[dir_pick % dirs.len()];
        if !matches!(entry, Entry::Dir | Entry::Wide(_) | Entry::File(..)) {
            // Read back only where `user.` is allowed: files and directories.
            meta.xattrs.clear();
        }
        if tree.children(dir).unwrap().contains_key(&name) {
            continue;
        }
        let kind = match &entry {
            Entry::Dir | Entry::Wide(_) => Kind::Dir(BTreeMap::new()),
            Entry::File(len, seed) => Kind::File(content(*len, *seed)),
            Entry::Symlink(target) => Kind::Symlink(target.clone()),
            Entry::Hardlink(n) => {
                if let Some(&file) = files.get(n % files.len().max(1)) {
                    tree.link(dir, &name, file);
                }
                continue;
            }
            &Entry::Char(major, minor) => Kind::CharDevice { major, minor },
            &Entry::Block(major, minor) => Kind::BlockDevice { major, minor },
            Entry::Fifo => Kind::Fifo,
            Entry::Socket => Kind::Socket,
        };
        let id = tree.add(dir, &name, Node { kind, meta });
        match entry {
            Entry::Dir => dirs.push(id),
            Entry::File(..) => files.push(id),
            Entry::Wide(n) => {
                for i in 0..n {
                    let name = format!("{i:06}-a-long-name-so-that-few-fit-one-block-ü");
                    tree.add(id, name.as_bytes(), fifo());
                }
            }
            _ => {}
        }
    }
    tree
}

fn tree() -> impl Strategy<Value = Tree<Vec<u8>>> {
    (
        meta(),
        prop::collection::vec((any::<usize>(), name(), entry(), meta()), 0..40),
    )
        .prop_map(|(root, entries)| build(root, entries))
}

/// Writes `tree`, checks it with e2fsck, mounts it read-only and compares.
fn round_trip(tree: &Tree<Vec<u8>>, size: Size, journal: bool) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.ext4");
    let options = options(size, journal);
    write_checked(tree, &options, &image);
    let mount = Mount::new(&image, "loop,ro");
    let read = read_back_masked(mount.path());
    let want = expected(tree, options.time);
    if read.0 != want.0 {
        for (path, w) in &want.0 {
            match read.0.get(path) {
                Some(r) if r == w => {}
                r => panic!("{}: read {r:?}, want {w:?}", path.display()),
            }
        }
        let extra: Vec<_> = read.0.keys().filter(|p| !want.0.contains_key(*p)).collect();
        panic!("names the tree does not have: {extra:?}");
    }
    assert_eq!(read.1, want.1, "names sharing an inode");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_trees_pass_e2fsck_and_read_back_equal(
        tree in tree(),
        free in 0u32..50,
        journal in any::<bool>(),
    ) {
        if can_mount() {
            round_trip(&tree, fit(free), journal);
        }
    }
}

/// A directory of `n` fifos named `prefix-NNNNNN`: written, checked, and every name (and
/// a missing one) looked up through the mounted file system, which uses the index for it.
fn wide_directory(n: usize, prefix: &str) {
    if !can_mount() {
        return;
    }
    let mut tree = Tree::new(Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Vec::new(),
    });
    let wide = tree.add(
        ROOT,
        b"wide",
        Node {
            kind: Kind::Dir(BTreeMap::new()),
            meta: tree.nodes[ROOT].meta.clone(),
        },
    );
    for i in 0..n {
        tree.add(wide, format!("{prefix}-{i:06}").as_bytes(), fifo());
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("wide.ext4");
    write_checked(&tree, &options(fit(10), true), &image);
    let htree = std::process::Command::new("debugfs")
        .args(["-R", "htree /wide"])
        .arg(&image)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&htree.stdout);
    let levels = u8::from(prefix.len() > 200);
    assert!(
        dump.contains(&format!("Indirect levels: {levels}")),
        "{}",
        &dump[..dump.len().min(400)]
    );
    let mount = Mount::new(&image, "loop,ro");
    let wide = mount.path().join("wide");
    for i in 0..n {
        let name = format!("{prefix}-{i:06}");
        assert!(
            std::fs::symlink_metadata(wide.join(OsStr::from_bytes(name.as_bytes()))).is_ok(),
            "{name} is not found"
        );
    }
    assert!(std::fs::symlink_metadata(wide.join(format!("{prefix}-{n:06}"))).is_err());
    assert_eq!(std::fs::read_dir(&wide).unwrap().count(), n);
    drop(mount);
    e2fsck(&image);
}

#[test]
fn a_directory_of_20000_entries_has_an_index_the_kernel_finds_every_name_through() {
    wide_directory(20_000, "entry");
}

#[test]
fn a_directory_of_long_names_in_more_leaves_than_one_index_block_gets_two_levels() {
    // 240-byte names: 16 entries a block, 800 leaves, more than the root's 507.
    wide_directory(12_000, &"n".repeat(233));
}
