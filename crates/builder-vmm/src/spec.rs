//! What one VM is made of: [`VmSpec`], validated before anything is created.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use builder_contract::{BuildParams, Secrets};

use crate::net::NetworkSpec;

/// Prefix of every name a VM leaves on the host: netns, veth alias, iptables comment, jailer
/// id, cgroup, chroot, work dir, and the VMM's command line. [`crate::reclaim`] relies on it.
pub const TAG_PREFIX: &str = "bvm-";

/// Kernel arguments every builder VM gets before the driver's own and the build parameters:
/// serial console, `reboot=k` so a guest reboot makes the VMM exit, `panic=-1` so a panic does
/// too, the read-only root on the first disk.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd root=/dev/vda ro";

/// Longest VM id: the jailer id (`bvm-` + id) must stay under 64 bytes.
pub const MAX_ID_LEN: usize = 48;

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "the VM id `{id}` is not valid: use 1 to {MAX_ID_LEN} lower-case letters, digits and \
         `-`, starting with a letter or digit"
    )]
    Id { id: String },
    #[error("{field} must be between {min} and {max}, not {value}")]
    Range {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("the {what} {path} does not exist or cannot be read")]
    Missing {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{value}` is not a CPU list; expected e.g. `0-3,6`")]
    CpuSet { value: String },
    #[error("the {what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error(
        "the cache disk {path} needs the config drive before it to be `vdd`: give the VM \
         secrets (a config drive) too"
    )]
    CacheWithoutConfig { path: PathBuf },
}

/// Host CPUs a VM is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet(Vec<u32>);

impl CpuSet {
    pub fn new(mut cpus: Vec<u32>) -> Self {
        cpus.sort_unstable();
        cpus.dedup();
        CpuSet(cpus)
    }

    pub fn cpus(&self) -> &[u32] {
        &self.0
    }
}

impl FromStr for CpuSet {
    type Err = SpecError;

    /// Parses the kernel's list format (`0-3,6`).
    fn from_str(value: &str) -> Result<Self, SpecError> {
        let invalid = || SpecError::CpuSet {
            value: value.to_string(),
        };
        let mut cpus = vec![];
        for part in value.split(',') {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let lo: u32 = lo.trim().parse().map_err(|_| invalid())?;
            let hi: u32 = hi.trim().parse().map_err(|_| invalid())?;
            if lo > hi || hi >= 4096 {
                return Err(invalid());
            }
            cpus.extend(lo..=hi);
        }
        Ok(CpuSet::new(cpus))
    }
}

impl fmt::Display for CpuSet {
    /// The comma-separated form that `taskset -c` and `cpuset.cpus` both accept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&list.join(","))
    }
}

/// One VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique among this host's live VMs; every host-side name is `bvm-<id>`.
    pub id: String,
    /// ELF `vmlinux` with a PVH note.
    pub kernel: PathBuf,
    /// The shared root filesystem image, attached read-only as `vda`.
    pub rootfs: PathBuf,
    /// Size of the per-build ext4 scratch disk (`vdb`), created sparse in the work dir.
    pub scratch_mib: u64,
    /// Written as `secrets.json` onto the read-only config drive (`vdc`), never the cmdline.
    pub secrets: Option<Secrets>,
    /// A build cache disk (a fork the caller owns: used in place, never copied), attached
    /// read-write as `vdd`, after the config drive, so it needs [`VmSpec::secrets`]. While the
    /// VM runs it belongs to the VM's uid (mode 0600); [`crate::Vm::cleanup`] gives it back to
    /// root and leaves it where it is, for the caller to commit or discard.
    pub cache_disk: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Kernel arguments before the network, driver and build parameters; usually
    /// [`DEFAULT_BOOT_ARGS`].
    pub boot_args: String,
    /// Appended to the kernel command line by [`BuildParams::kernel_cmdline`].
    pub params: Option<BuildParams>,
    /// `None`: the VM has no network interface.
    pub network: Option<NetworkSpec>,
    /// Wall-clock limit from start; [`crate::Vm::wait`] kills the VM past it.
    pub timeout: Duration,
    /// Host CPUs the VMM is pinned to (cgroup cpuset for Firecracker, `taskset` for QEMU).
    pub cpus: Option<CpuSet>,
}

impl VmSpec {
    /// The name every host-side resource of this VM carries.
    pub fn tag(&self) -> String {
        format!("{TAG_PREFIX}{}", self.id)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= MAX_ID_LEN
            && !self.id.starts_with('-')
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(SpecError::Id {
                id: self.id.clone(),
            });
        }
        range("vcpus", self.vcpus.into(), 1, 32)?;
        range("mem_mib", self.mem_mib.into(), 128, 1 << 20)?;
        range("scratch_mib", self.scratch_mib, 16, 16 << 20)?;
        readable("kernel", &self.kernel)?;
        readable("root filesystem", &self.rootfs)?;
        if let Some(cache) = &self.cache_disk {
            regular_file("cache disk", cache)?;
            if self.secrets.is_none() {
                return Err(SpecError::CacheWithoutConfig {
                    path: cache.clone(),
                });
            }
        }
        Ok(())
    }
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(SpecError::Range {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

fn readable(what: &'static str, path: &Path) -> Result<(), SpecError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| SpecError::Missing {
            what,
            path: path.to_path_buf(),
            source,
        })
}

fn regular_file(what: &'static str, path: &Path) -> Result<(), SpecError> {
    let meta = std::fs::metadata(path).map_err(|source| SpecError::Missing {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(SpecError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_sets() {
        let set: CpuSet = "3,0-1,1".parse().unwrap();
        assert_eq!(set.cpus(), [0, 1, 3]);
        assert_eq!(set.to_string(), "0,1,3");
        for bad in ["", "a", "3-1", "0-5000"] {
            assert!(bad.parse::<CpuSet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut spec = VmSpec {
            id: "build-1".into(),
            kernel: "/nonexistent/vmlinux".into(),
            rootfs: "/nonexistent/rootfs".into(),
            scratch_mib: 64,
            secrets: None,
            cache_disk: None,
            vcpus: 1,
            mem_mib: 256,
            boot_args: DEFAULT_BOOT_ARGS.into(),
            params: None,
            network: None,
            timeout: Duration::from_secs(5),
            cpus: None,
        };
        assert_eq!(spec.tag(), "bvm-build-1");
        let err = spec.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel /nonexistent/vmlinux does not exist or cannot be read"
        );
        spec.vcpus = 0;
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            "vcpus must be between 1 and 32, not 0"
        );
        spec.id = "Build_1".into();
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`Build_1`"));
    }

    #[test]
    fn a_cache_disk_is_a_regular_file_after_a_config_drive() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, rootfs, cache) = (
            dir.path().join("vmlinux"),
            dir.path().join("rootfs.ext4"),
            dir.path().join("cache.ext4"),
        );
        for file in [&kernel, &rootfs, &cache] {
            std::fs::write(file, b"").unwrap();
        }
        let mut spec = VmSpec {
            id: "build-1".into(),
            kernel,
            rootfs,
            scratch_mib: 64,
            secrets: Some(Secrets::default()),
            cache_disk: Some(dir.path().join("gone.ext4")),
            vcpus: 1,
            mem_mib: 256,
            boot_args: DEFAULT_BOOT_ARGS.into(),
            params: None,
            network: None,
            timeout: Duration::from_secs(5),
            cpus: None,
        };
        let gone = dir.path().join("gone.ext4").display().to_string();
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            format!("the cache disk {gone} does not exist or cannot be read")
        );
        spec.cache_disk = Some(dir.path().to_path_buf());
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            format!(
                "the cache disk {} is not a regular file",
                dir.path().display()
            )
        );
        spec.cache_disk = Some(cache.clone());
        spec.validate().unwrap();
        spec.secrets = None;
        let err = spec.validate().unwrap_err();
        assert!(
            matches!(&err, SpecError::CacheWithoutConfig { path } if *path == cache),
            "{err}"
        );
    }
}
