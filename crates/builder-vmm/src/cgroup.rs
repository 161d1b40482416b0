//! Cgroup limits of a jailed Firecracker: the `--cgroup` values for the jailer (v1 or v2 names),
//! and finding the cgroups the jailer made (`<mount>/<parent>/bvm-<id>` in every mounted
//! hierarchy) to remove them, which the jailer never does. A cgroup is emptied first: whatever
//! process is still in it is killed.

use std::io;
use std::path::{Path, PathBuf};

use crate::process::Process;
use crate::spec::CpuSet;

/// The parent cgroup our jailed VMs live under.
pub const PARENT_CGROUP: &str = "firecracker";
/// Memory allowed to the Firecracker process beyond the guest's RAM.
pub const VMM_OVERHEAD_MIB: u64 = 128;
/// CFS period for the CPU quota.
const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// V2 when `/sys/fs/cgroup` is the unified hierarchy, otherwise V1.
    pub fn detect() -> Self {
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        }
    }

    /// The value of the jailer's `--cgroup-version`.
    pub fn as_arg(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "1",
            CgroupVersion::V2 => "2",
        }
    }

    /// `file=value` pairs for the jailer's `--cgroup`: CPU set, memory limit and a CPU quota of
    /// `vcpus` CPUs.
    pub fn limits(self, cpus: Option<&CpuSet>, vcpus: u8, mem_mib: u32) -> Vec<String> {
        let memory = (u64::from(mem_mib) + VMM_OVERHEAD_MIB) << 20;
        let quota = u64::from(vcpus) * CPU_PERIOD_US;
        let mut limits = vec![];
        if let Some(cpus) = cpus {
            limits.push(format!("cpuset.cpus={cpus}"));
            if self == CgroupVersion::V1 {
                // A v1 cpuset with empty mems refuses tasks (ENOSPC); v2 inherits them.
                limits.push(format!("cpuset.mems={}", root_cpuset_mems()));
            }
        }
        match self {
            CgroupVersion::V1 => {
                limits.push(format!("memory.limit_in_bytes={memory}"));
                limits.push(format!("cpu.cfs_period_us={CPU_PERIOD_US}"));
                limits.push(format!("cpu.cfs_quota_us={quota}"));
            }
            CgroupVersion::V2 => {
                limits.push(format!("memory.max={memory}"));
                limits.push(format!("cpu.max={quota} {CPU_PERIOD_US}"));
            }
        }
        limits
    }
}

fn root_cpuset_mems() -> String {
    std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.mems")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "0".to_string())
}

/// Mount points of every cgroup hierarchy (v1 controllers and the v2 unified one).
pub fn mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/mounts") else {
        return vec![];
    };
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// The existing cgroup directories of every hierarchy under [`PARENT_CGROUP`] whose name
/// starts with `prefix`.
pub fn find(prefix: &str) -> Vec<PathBuf> {
    let mut found = vec![];
    for mount in mounts() {
        let Ok(entries) = std::fs::read_dir(mount.join(PARENT_CGROUP)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(prefix) && entry.path().is_dir() {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Kills whatever is still in the cgroup `dir`, then removes it.
pub fn kill_and_remove(dir: &Path) -> io::Result<()> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if let Ok(process) = Process::open(pid) {
            process.kill_and_reap()?;
        }
    }
    // A reaped task can keep its cgroup busy for a moment.
    let mut attempts = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot remove cgroup {}: {e}", dir.display()),
                ))
            }
        }
    }
}

/// Removes the cgroups named exactly `tag`, killing what is left in them.
pub fn remove(tag: &str) -> io::Result<usize> {
    let mut removed = 0;
    for dir in find(tag) {
        if dir.file_name().is_some_and(|n| n == tag) {
            kill_and_remove(&dir)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_names_per_version() {
        let cpus: CpuSet = "1".parse().unwrap();
        let v2 = CgroupVersion::V2.limits(Some(&cpus), 2, 512);
        assert_eq!(
            v2,
            [
                "cpuset.cpus=1",
                "memory.max=671088640",
                "cpu.max=200000 100000"
            ]
        );
        let v1 = CgroupVersion::V1.limits(None, 1, 256);
        assert_eq!(
            v1,
            [
                "memory.limit_in_bytes=402653184",
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=100000"
            ]
        );
    }
}
