//! The pool on the host's own file system (ext4 here: forks are sparse copies), against real
//! loop-mounted ext4 cache disks: miss then hit, discard, the clean-unmount gate, commits in
//! turn and at once, LRU eviction, a restart after a crash.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use builder_cache::{CacheError, CachePool, ForkMethod, PoolNote};
use common::*;

#[test]
fn a_miss_makes_an_empty_disk_and_its_commit_is_the_next_fork() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool = CachePool::open(config(tmp.path())).unwrap();
    assert_eq!(pool.fork_method(), ForkMethod::SparseCopy);
    assert_eq!(pool.notes(), []);
    let app = key("https://git.example/app.git");

    let fork = pool.fork(&app, "build-1").unwrap();
    assert!(!fork.hit);
    assert_eq!(fork.path, tmp.path().join("forks/build-1.ext4"));
    let stat = std::fs::metadata(&fork.path).unwrap();
    assert_eq!(stat.permissions().mode() & 0o777, 0o600);
    assert_eq!(stat.len(), 256 << 20);
    fsck_clean(&fork.path);
    write_into(&fork.path, "layer", b"docker layer bytes");
    let committed = pool.commit(fork).unwrap();
    assert_eq!(committed.entry.id, *app.id());
    assert_eq!(committed.entry.commits, 1);
    assert_eq!(committed.entry.name, app.name());
    assert!(committed.evicted.is_empty());
    assert!(!tmp.path().join("forks/build-1.ext4").exists());

    let fork = pool.fork(&app, "build-2").unwrap();
    assert!(fork.hit);
    assert_eq!(fork.method, ForkMethod::SparseCopy);
    assert_eq!(
        read_from(&fork.path, "layer").as_deref(),
        Some(&b"docker layer bytes"[..])
    );
    // A sparse copy stays sparse.
    let (fork_stat, disk_stat) = (
        std::fs::metadata(&fork.path).unwrap(),
        std::fs::metadata(committed_disk(tmp.path(), &app)).unwrap(),
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fork_stat.blocks(), disk_stat.blocks());
    assert!(
        fork_stat.blocks() * 512 < 32 << 20,
        "{}",
        fork_stat.blocks()
    );
    pool.discard(fork).unwrap();

    let stats = pool.stats();
    assert_eq!(
        (
            stats.hits,
            stats.misses,
            stats.commits,
            stats.discards,
            stats.keys
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(stats.bytes, disk_stat.blocks() * 512);
    let listed = pool.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].commits, 1);
    assert!(listed[0].last_used_unix_ms > committed.entry.last_used_unix_ms);

    assert_eq!(pool.remove(app.id()).unwrap().unwrap().id, *app.id());
    assert_eq!(pool.remove(app.id()).unwrap(), None);
    assert_eq!(pool.list().unwrap(), []);
    assert_eq!((pool.stats().keys, pool.stats().bytes), (0, 0));
    assert!(!pool.fork(&app, "build-3").unwrap().hit);
}

#[test]
fn a_failed_build_leaves_the_committed_disk_byte_identical() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool = CachePool::open(config(tmp.path())).unwrap();
    let app = key("app");
    let fork = pool.fork(&app, "first").unwrap();
    write_into(&fork.path, "kept", b"from the first build");
    pool.commit(fork).unwrap();
    let disk = committed_disk(tmp.path(), &app);
    let before = sha256(&disk);

    let fork = pool.fork(&app, "failed").unwrap();
    write_into(&fork.path, "kept", b"overwritten by a failed build");
    write_into(&fork.path, "new", b"and more");
    pool.discard(fork).unwrap();

    assert_eq!(sha256(&disk), before);
    assert!(!tmp.path().join("forks/failed.ext4").exists());
    assert_eq!(pool.stats().discards, 1);
    assert_eq!(pool.list().unwrap()[0].commits, 1);
}

#[test]
fn a_disk_not_cleanly_unmounted_is_refused() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool = CachePool::open(config(tmp.path())).unwrap();
    let app = key("app");
    commit_untouched(&pool, &app, "first");
    let disk = committed_disk(tmp.path(), &app);
    let before = sha256(&disk);

    // Still mounted (a VM that is still running, or was killed with its disk in use).
    let fork = pool.fork(&app, "mounted").unwrap();
    let path = fork.path.clone();
    let mounted = Mounted::ext4(&path, "rw");
    std::fs::write(mounted.dir.join("half"), b"half written").unwrap();
    run("sync", &[]);
    let err = pool.commit(fork).unwrap_err();
    assert!(
        matches!(&err, CacheError::NotClean { path: p } if *p == path),
        "{err:?}"
    );
    assert!(!path.exists(), "a refused fork is removed");
    drop(mounted);

    // The image as a VM that died with it mounted leaves it: never unmounted.
    let crashed = tmp.path().join("crashed.ext4");
    let fork = pool.fork(&app, "crashed").unwrap();
    let mounted = Mounted::ext4(&fork.path, "rw");
    std::fs::write(mounted.dir.join("half"), b"half written").unwrap();
    run("sync", &[]);
    std::fs::copy(&fork.path, &crashed).unwrap();
    drop(mounted);
    std::fs::copy(&crashed, &fork.path).unwrap();
    let path = fork.path.clone();
    let err = pool.commit(fork).unwrap_err();
    assert!(
        matches!(&err, CacheError::NotClean { path: p } if *p == path),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "the cache disk {} was not cleanly unmounted, so it was not committed",
            path.display()
        )
    );

    assert_eq!(sha256(&disk), before);
    let stats = pool.stats();
    assert_eq!((stats.refused, stats.commits), (2, 1));
    assert_eq!(
        std::fs::read_dir(tmp.path().join("forks")).unwrap().count(),
        0
    );
}

#[test]
fn forks_committed_in_turn_leave_the_last_one() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool = CachePool::open(config(tmp.path())).unwrap();
    let app = key("app");
    let (a, b) = (pool.fork(&app, "a").unwrap(), pool.fork(&app, "b").unwrap());
    write_into(&a.path, "who", b"a");
    write_into(&b.path, "who", b"b");
    write_into(&b.path, "only-b", b"b");
    pool.commit(a).unwrap();
    let committed = pool.commit(b).unwrap();
    assert_eq!(committed.entry.commits, 2);

    let disk = committed_disk(tmp.path(), &app);
    fsck_clean(&disk);
    assert_eq!(read_from(&disk, "who").as_deref(), Some(&b"b"[..]));
    assert_eq!(read_from(&disk, "only-b").as_deref(), Some(&b"b"[..]));
    assert_eq!(pool.stats().keys, 1);
}

#[test]
fn forks_and_commits_from_many_threads_at_once() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pool = Arc::new(CachePool::open(config(tmp.path())).unwrap());
    let keys = [key("one"), key("two")];
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (pool, key) = (Arc::clone(&pool), keys[t % 2].clone());
            std::thread::spawn(move || {
                for round in 0..3 {
                    let fork = pool.fork(&key, &format!("t{t}-r{round}")).unwrap();
                    if round == 1 {
                        pool.discard(fork).unwrap();
                    } else {
                        pool.commit(fork).unwrap();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!((stats.commits, stats.discards, stats.keys), (12, 6, 2));
    assert_eq!(stats.hits + stats.misses, 18);
    let listed = pool.list().unwrap();
    assert_eq!(listed.iter().map(|e| e.commits).sum::<u64>(), 12);
    for key in &keys {
        fsck_clean(&committed_disk(tmp.path(), key));
    }
    assert_eq!(
        std::fs::read_dir(tmp.path().join("forks")).unwrap().count(),
        0
    );
}

#[test]
fn eviction_removes_the_least_recently_used_keys() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c, d) = (key("a"), key("b"), key("c"), key("d"));
    let one_disk = {
        let pool = CachePool::open(config(tmp.path())).unwrap();
        for (i, k) in [&a, &b, &c].into_iter().enumerate() {
            commit_untouched(&pool, k, &format!("f{i}"));
        }
        pool.stats().bytes / 3
    };
    // Room for three and a half disks.
    let pool = CachePool::open(builder_cache::PoolConfig {
        max_bytes: one_disk * 7 / 2,
        ..config(tmp.path())
    })
    .unwrap();
    // Using `a` makes `b` the least recently used.
    let fork = pool.fork(&a, "touch").unwrap();
    pool.discard(fork).unwrap();
    let fork = pool.fork(&d, "new").unwrap();
    let committed = pool.commit(fork).unwrap();
    let evicted: Vec<_> = committed.evicted.iter().map(|e| e.id.clone()).collect();
    assert_eq!(evicted, [b.id().clone()]);
    let listed: Vec<_> = pool.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(listed, [d.id().clone(), a.id().clone(), c.id().clone()]);
    assert!(!tmp.path().join("keys").join(b.id().as_str()).exists());
    let stats = pool.stats();
    assert_eq!((stats.evictions, stats.keys), (1, 3));
    assert!(stats.bytes <= one_disk * 7 / 2);

    // The key just committed stays even when it alone is over the limit.
    let pool = CachePool::open(builder_cache::PoolConfig {
        max_bytes: 1,
        ..config(tmp.path())
    })
    .unwrap();
    let committed = pool.commit(pool.fork(&c, "last").unwrap()).unwrap();
    assert_eq!(committed.evicted.len(), 2);
    let listed: Vec<_> = pool.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(listed, [c.id().clone()]);
}

#[test]
fn reopening_removes_what_a_crash_left() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = key("app");
    {
        let pool = CachePool::open(config(tmp.path())).unwrap();
        commit_untouched(&pool, &app, "first");
        // Two builds were running when the node died.
        std::mem::forget(pool.fork(&app, "running-1").unwrap());
        std::mem::forget(pool.fork(&key("other"), "running-2").unwrap());
    }
    // A commit of a new key that died between its metadata and its rename.
    let half = tmp.path().join("keys").join(key("half").id().as_str());
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("meta.json"), b"{}").unwrap();

    let pool = CachePool::open(config(tmp.path())).unwrap();
    assert_eq!(
        pool.notes(),
        [PoolNote::LeftoversRemoved {
            forks: 2,
            half_made_keys: 1
        }]
    );
    assert_eq!(
        pool.notes()[0].to_string(),
        "removed 2 forks and 1 half-made keys a previous run left"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path().join("forks")).unwrap().count(),
        0
    );
    assert!(!half.exists());
    let listed = pool.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, *app.id());
    assert_eq!(pool.stats().keys, 1);
    assert!(pool.fork(&app, "after").unwrap().hit);
}

#[test]
fn fork_ids_and_foreign_forks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = CachePool::open(config(tmp.path())).unwrap();
    let app = key("app");
    for bad in ["", "UPPER", "../x", "a_b", &"x".repeat(65)] {
        let err = pool.fork(&app, bad).unwrap_err();
        assert!(
            matches!(&err, CacheError::ForkId { fork_id } if fork_id == bad),
            "{err:?}"
        );
    }
    let mut fork = pool.fork(&app, &"x".repeat(64)).unwrap();
    let own = fork.path.clone();
    let elsewhere = tmp.path().join("elsewhere.ext4");
    std::fs::write(&elsewhere, b"not ours").unwrap();
    fork.path = elsewhere.clone();
    let err = pool.commit(fork).unwrap_err();
    assert!(
        matches!(&err, CacheError::ForeignFork { path } if *path == elsewhere),
        "{err:?}"
    );
    assert!(elsewhere.exists(), "a foreign file is left alone");
    let err = pool.fork(&app, &"x".repeat(64)).unwrap_err();
    assert!(
        err.to_string().starts_with("cannot make a new cache disk ") && own.exists(),
        "{err}"
    );
}
