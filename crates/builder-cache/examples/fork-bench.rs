//! Times the pool's fork and commit, as the node runs them, on pools whose directories sit on
//! different file systems (scripts/bench-cache-fork.sh sets them up).
//!
//! `fork-bench seed IMAGE DISK_MIB`: writes an empty cache disk (the pool's own kind) to fill.
//! `fork-bench run ROUNDS IMAGE LABEL=DIR[@XFS_IMAGE_BYTES]...`: commits IMAGE as a key's disk in
//! each pool (`@BYTES`: the pool mounts an XFS reflink image of that size on DIR), then, for
//! ROUNDS rounds, interleaving the pools, drops the page cache, forks the key and commits the
//! fork; prints each time, the medians, and each pool's fork median over the first pool's.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use builder_cache::{CacheKey, CachePool, PoolConfig, CACHE_DISK_LABEL};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let done = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["seed", image, disk_mib] => seed(image, disk_mib),
        ["run", rounds, image, ref pools @ ..] if !pools.is_empty() => run(rounds, image, pools),
        _ => Err("usage: fork-bench seed IMAGE DISK_MIB | \
                  fork-bench run ROUNDS IMAGE LABEL=DIR[@XFS_IMAGE_BYTES]..."
            .into()),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fork-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn seed(image: &str, disk_mib: &str) -> BenchResult<()> {
    let bytes = disk_mib.parse::<u64>()? << 20;
    builder_ext4::fresh::write_empty_disk(image.as_ref(), bytes, CACHE_DISK_LABEL)?;
    Ok(())
}

struct BenchPool {
    label: String,
    pool: CachePool,
    forks: Vec<Duration>,
    commits: Vec<Duration>,
}

fn run(rounds: &str, image: &str, pools: &[&str]) -> BenchResult<()> {
    let rounds: usize = rounds.parse()?;
    let key = CacheKey::new("bench", "fork-bench")?;
    let mut benched = Vec::new();
    for spec in pools {
        let (label, dir) = spec.split_once('=').ok_or("a pool is LABEL=DIR")?;
        let (dir, reflink_image_bytes) = match dir.split_once('@') {
            Some((dir, bytes)) => (dir, Some(bytes.parse()?)),
            None => (dir, None),
        };
        let pool = CachePool::open(PoolConfig {
            dir: PathBuf::from(dir),
            max_bytes: u64::MAX,
            disk_mib: 64,
            reflink_image_bytes,
        })?;
        for note in pool.notes() {
            println!("# {label}: {note}");
        }
        // The seed becomes the key's committed disk: a fork (a miss) overwritten with it.
        let fork = pool.fork(&key, "seed")?;
        let copied = Command::new("cp")
            .args(["--sparse=always", "--reflink=never", image])
            .arg(&fork.path)
            .status()?;
        if !copied.success() {
            return Err(format!("cp {image} {} failed", fork.path.display()).into());
        }
        let committed = pool.commit(fork)?;
        println!(
            "# {label}: {dir} forks by {:?}, committed disk {} MiB allocated",
            pool.fork_method(),
            committed.entry.bytes >> 20
        );
        benched.push(BenchPool {
            label: label.to_owned(),
            pool,
            forks: Vec::new(),
            commits: Vec::new(),
        });
    }
    for round in 1..=rounds {
        for bench in &mut benched {
            drop_page_cache()?;
            let fork = bench.pool.fork(&key, &format!("round-{round}"))?;
            let fork_took = fork.took;
            let committed = bench.pool.commit(fork)?;
            println!(
                "round={round} pool={} fork_ms={:.2} commit_ms={:.2}",
                bench.label,
                ms(fork_took),
                ms(committed.took)
            );
            bench.forks.push(fork_took);
            bench.commits.push(committed.took);
        }
    }
    let (baseline_label, baseline) = (
        benched[0].label.clone(),
        median(&mut benched[0].forks.clone()),
    );
    for bench in &mut benched {
        let (fork, commit) = (median(&mut bench.forks), median(&mut bench.commits));
        println!("median_fork_ms_{}={:.2}", bench.label, ms(fork));
        println!("median_commit_ms_{}={:.2}", bench.label, ms(commit));
        if bench.label != baseline_label {
            println!(
                "{}_over_{baseline_label}={:.5}",
                bench.label,
                fork.as_secs_f64() / baseline.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Writes dirty pages back and drops the clean ones, so each fork reads the committed disk
/// from the device as a node does for a key not built lately.
fn drop_page_cache() -> BenchResult<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("cannot drop the page cache (run as root): {e}").into())
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(took: Duration) -> f64 {
    took.as_secs_f64() * 1000.0
}
