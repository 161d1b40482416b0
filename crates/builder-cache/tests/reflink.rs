//! The pool on a directory whose file system cannot reflink (the host's ext4) given an XFS
//! reflink image: made and loop-mounted on the first open, found mounted on the next, mounted
//! again after an unmount with its keys intact; forks share the committed disk's extents.
//! Closing the pool unmounts it. And the fallback to sparse copies when no XFS can be made.

mod common;

use std::path::PathBuf;
use std::process::Command;

use builder_cache::{CachePool, ForkMethod, PoolConfig, PoolNote};
use common::*;

fn xfs_config(dir: PathBuf, image_bytes: u64) -> PoolConfig {
    PoolConfig {
        reflink_image_bytes: Some(image_bytes),
        ..config(&dir)
    }
}

#[test]
fn an_xfs_image_is_mounted_on_the_pool_and_forks_are_reflinks() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let image = tmp.path().join("pool.xfs");
    let _mounted = Mounted::at(&dir);
    let app = key("app");
    {
        let pool = CachePool::open(xfs_config(dir.clone(), 512 << 20)).unwrap();
        assert_eq!(pool.fork_method(), ForkMethod::Reflink);
        assert_eq!(
            pool.notes(),
            [PoolNote::ReflinkImageMounted {
                image: image.clone(),
                made: true
            }]
        );
        let image_stat = std::fs::metadata(&image).unwrap();
        assert_eq!(image_stat.len(), 512 << 20);
        let fork = pool.fork(&app, "first").unwrap();
        write_into(&fork.path, "layer", &vec![7u8; 8 << 20]);
        pool.commit(fork).unwrap();

        let fork = pool.fork(&app, "second").unwrap();
        assert!(fork.hit);
        assert_eq!(fork.method, ForkMethod::Reflink);
        let extents = Command::new("filefrag")
            .arg("-v")
            .arg(&fork.path)
            .output()
            .unwrap();
        let extents = String::from_utf8_lossy(&extents.stdout);
        assert!(extents.contains("shared"), "not a reflink: {extents}");
        assert_eq!(read_from(&fork.path, "layer"), Some(vec![7u8; 8 << 20]));
        pool.discard(fork).unwrap();
    }
    // Still mounted: used as it is.
    {
        let pool = CachePool::open(xfs_config(dir.clone(), 512 << 20)).unwrap();
        assert_eq!(pool.fork_method(), ForkMethod::Reflink);
        assert_eq!(pool.notes(), []);
        assert_eq!(pool.stats().keys, 1);
    }
    // After a reboot (unmounted): the image is mounted again, its keys intact.
    run("umount", &[dir.as_os_str()]);
    let pool = CachePool::open(xfs_config(dir.clone(), 512 << 20)).unwrap();
    assert_eq!(pool.fork_method(), ForkMethod::Reflink);
    assert_eq!(
        pool.notes(),
        [PoolNote::ReflinkImageMounted { image, made: false }]
    );
    let fork = pool.fork(&app, "after-reboot").unwrap();
    assert!(fork.hit);
    fsck_clean(&fork.path);
    pool.commit(fork).unwrap();
    assert_eq!(pool.list().unwrap()[0].commits, 2);

    // A stopping node closes its pool: no mount is left, no fork is made any more, and the
    // next open mounts the image again with its keys.
    assert!(pool.close().unwrap());
    assert!(!mount_points().contains(&dir.canonicalize().unwrap()));
    let err = pool.fork(&app, "too-late").unwrap_err();
    assert!(err.to_string().contains("is closed"), "{err}");
    drop(pool);
    let pool = CachePool::open(xfs_config(dir.clone(), 512 << 20)).unwrap();
    assert_eq!(pool.stats().keys, 1);
    assert!(pool.close().unwrap());
}

fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

#[test]
fn without_an_xfs_image_forks_are_sparse_copies() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let _mounted = Mounted::at(&dir);
    // mkfs.xfs refuses a file system this small.
    let pool = CachePool::open(xfs_config(dir.clone(), 16 << 20)).unwrap();
    assert_eq!(pool.fork_method(), ForkMethod::SparseCopy);
    let [PoolNote::ReflinkImageUnavailable { image, reason }] = pool.notes() else {
        panic!("{:?}", pool.notes());
    };
    assert_eq!(*image, tmp.path().join("pool.xfs"));
    assert!(reason.contains("mkfs.xfs"), "{reason}");
    assert!(!image.exists(), "the failed image is removed");
    assert!(pool.notes()[0]
        .to_string()
        .starts_with("cannot use the XFS reflink image "));

    let app = key("app");
    commit_untouched(&pool, &app, "first");
    let fork = pool.fork(&app, "second").unwrap();
    assert!(fork.hit);
    assert_eq!(fork.method, ForkMethod::SparseCopy);
    fsck_clean(&fork.path);
}

#[test]
fn two_pools_opened_at_once_mount_the_image_once() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let _mounted = Mounted::at(&dir);
    let opens: Vec<_> = (0..2)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || CachePool::open(xfs_config(dir, 512 << 20)).unwrap())
        })
        .collect();
    let pools: Vec<CachePool> = opens.into_iter().map(|t| t.join().unwrap()).collect();
    let mut notes: Vec<_> = pools.iter().map(|p| p.notes().to_vec()).collect();
    notes.sort_by_key(Vec::len);
    assert_eq!(
        notes,
        [
            vec![],
            vec![PoolNote::ReflinkImageMounted {
                image: tmp.path().join("pool.xfs"),
                made: true
            }]
        ]
    );
    assert!(pools.iter().all(|p| p.fork_method() == ForkMethod::Reflink));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_str().unwrap();
    let mounts = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(dir))
        .count();
    assert_eq!(mounts, 1, "{mountinfo}");
}
