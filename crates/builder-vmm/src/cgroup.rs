//! Cgroup limits of a VMM process, for both drivers: the `file=value` limits (v1 or v2 names)
//! computed from a VM's vCPUs and memory, handed to Firecracker's jailer as `--cgroup` and
//! written by [`create`] for QEMU, which then joins them ([`Joined`]); finding those cgroups
//! (`<mount>/<parent>/bvm-<id>` in every mounted hierarchy) to remove them, which the jailer
//! never does. A cgroup is emptied first: whatever process is still in it is killed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::process::Process;
use crate::spec::CpuSet;

/// The parent cgroup every VMM process of this layer lives under, in each hierarchy.
pub const PARENT_CGROUP: &str = "builder-vm";
/// Memory allowed to the Firecracker process beyond the guest's RAM.
pub const FIRECRACKER_OVERHEAD_MIB: u64 = 128;
/// CFS period for the CPU quota.
const CPU_PERIOD_US: u64 = 100_000;

/// Why a VMM's cgroup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no mounted cgroup hierarchy offers the `{controller}` controller that {file} needs")]
    NoHierarchy { controller: String, file: String },
    #[error("cannot create the cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{value}` to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path} to join the cgroup")]
    Join {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

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

    /// `file=value` pairs: CPU set, a memory limit of the guest's RAM plus `overhead_mib` for
    /// the VMM itself, and a CPU quota of `vcpus` CPUs.
    pub fn limits(
        self,
        cpus: Option<&CpuSet>,
        vcpus: u8,
        mem_mib: u32,
        overhead_mib: u64,
    ) -> Vec<String> {
        let memory = (u64::from(mem_mib) + overhead_mib) << 20;
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

/// One mounted hierarchy: where, and which controllers it carries (v1) or offers (v2).
#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    controllers: Vec<String>,
}

fn hierarchies() -> Vec<Hierarchy> {
    let Ok(text) = std::fs::read_to_string("/proc/mounts") else {
        return vec![];
    };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (dir, fstype, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            let controllers = match *fstype {
                "cgroup" => options.split(',').map(String::from).collect(),
                "cgroup2" => std::fs::read_to_string(Path::new(dir).join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect(),
                _ => return None,
            };
            Some(Hierarchy {
                mount: PathBuf::from(dir),
                controllers,
            })
        })
        .collect()
}

/// Mount points of every cgroup hierarchy (v1 controllers and the v2 unified one).
pub fn mounts() -> Vec<PathBuf> {
    hierarchies().into_iter().map(|h| h.mount).collect()
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

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Makes `<mount>/<PARENT_CGROUP>/<tag>` in each hierarchy `limits` (from
/// [`CgroupVersion::limits`]) need and writes them, as the jailer does for Firecracker: under
/// v2 the parent first delegates the controllers to its children, under v1 a new parent
/// cpuset first gets the root's CPUs and memory nodes. Returns the cgroups made, for
/// [`Joined::open`]; they are removed by [`remove`].
pub fn create(tag: &str, limits: &[String]) -> Result<Vec<PathBuf>, CgroupError> {
    let all = hierarchies();
    let mut made: Vec<(Hierarchy, PathBuf)> = vec![];
    for limit in limits {
        let (file, value) = limit.split_once('=').unwrap_or((limit, ""));
        let controller = file.split('.').next().unwrap_or(file).to_string();
        let dir = match made
            .iter()
            .find(|(h, _)| h.controllers.contains(&controller))
        {
            Some((_, dir)) => dir.clone(),
            None => {
                let hierarchy = all
                    .iter()
                    .find(|h| h.controllers.contains(&controller))
                    .ok_or_else(|| CgroupError::NoHierarchy {
                        controller: controller.clone(),
                        file: file.to_string(),
                    })?;
                let parent = hierarchy.mount.join(PARENT_CGROUP);
                mkdir(&parent)?;
                prepare_parent(hierarchy, &parent)?;
                let dir = parent.join(tag);
                mkdir(&dir)?;
                made.push((hierarchy.clone(), dir.clone()));
                dir
            }
        };
        write(&dir.join(file), value)?;
    }
    Ok(made.into_iter().map(|(_, dir)| dir).collect())
}

/// What a parent cgroup needs before a child can hold a limited process.
fn prepare_parent(hierarchy: &Hierarchy, parent: &Path) -> Result<(), CgroupError> {
    let is_v2 = hierarchy.mount.join("cgroup.controllers").exists();
    if is_v2 {
        // Each level down to the parent must delegate the controllers to the next.
        let wanted: Vec<String> = ["cpu", "memory", "cpuset"]
            .into_iter()
            .filter(|c| hierarchy.controllers.iter().any(|h| h == c))
            .map(|c| format!("+{c}"))
            .collect();
        for dir in [hierarchy.mount.as_path(), parent] {
            write(&dir.join("cgroup.subtree_control"), &wanted.join(" "))?;
        }
    } else if hierarchy.controllers.iter().any(|c| c == "cpuset") {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let current = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
            if current.trim().is_empty() {
                let root = std::fs::read_to_string(hierarchy.mount.join(file)).unwrap_or_default();
                write(&parent.join(file), root.trim())?;
            }
        }
    }
    Ok(())
}

/// Open `cgroup.procs` files of cgroups a child process joins between fork and exec by
/// writing `0` (the writer itself) to each: one `write(2)` per cgroup, async-signal-safe.
#[derive(Debug)]
pub struct Joined(Vec<OwnedFd>);

impl Joined {
    /// Opens `cgroup.procs` of each of `dirs`.
    pub fn open(dirs: &[PathBuf]) -> Result<Self, CgroupError> {
        dirs.iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Join { path, source })
            })
            .collect::<Result<_, _>>()
            .map(Joined)
    }

    /// Moves the calling process into every cgroup. Only `write(2)`: safe between fork and
    /// exec.
    pub fn enter(&self) -> io::Result<()> {
        for fd in &self.0 {
            // SAFETY: a write of one static byte to an fd this value owns.
            if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
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
        let v2 = CgroupVersion::V2.limits(Some(&cpus), 2, 512, 128);
        assert_eq!(
            v2,
            [
                "cpuset.cpus=1",
                "memory.max=671088640",
                "cpu.max=200000 100000"
            ]
        );
        let v1 = CgroupVersion::V1.limits(None, 1, 256, 128);
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
