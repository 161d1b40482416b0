//! The VMM layer: runs one builder microVM per build and leaves nothing behind.
//!
//! One interface ([`Vmm::start`] → [`Vm`] → [`Vm::wait`] / [`Vm::kill`] → [`Vm::cleanup`]) and
//! two drivers with the same kernel, disks and guest: Firecracker through its jailer
//! ([`firecracker`]) and QEMU `-M microvm` ([`qemu`]) in a jail as strict ([`jail`]). Each VM
//! gets a work dir, a sparse scratch disk and a read-only config drive ([`disk`]), its own
//! network namespace with NAT and egress rules ([`net`]), cgroup CPU/memory limits
//! ([`cgroup`]), and a LIFO [`cleanup`] stack that undoes all of it. [`reclaim`] removes what a
//! crashed daemon left, by the `bvm-` naming convention.
//!
//! Guest disks: `vda` the shared rootfs (read-only), `vdb` the scratch disk, `vdc` the config
//! drive holding `secrets.json`, `vdd` the caller's build cache disk when there is one (used in
//! place, left to the caller after cleanup).

pub mod cgroup;
pub mod cleanup;
pub mod disk;
pub mod exit;
pub mod firecracker;
pub mod host;
pub mod jail;
pub mod net;
pub mod netlink;
pub mod process;
pub mod qemu;
pub mod reclaim;
pub mod spec;
pub mod vm;

pub use cleanup::{CleanupError, CleanupErrors, CleanupStack};
pub use exit::{ExitCause, VmExit};
pub use firecracker::FirecrackerConfig;
pub use host::{Host, HostCommand, HostError, SystemHost};
pub use jail::IdRange;
pub use net::{AddressPool, EgressPolicy, EgressRule, NetworkSpec, VmAddresses};
pub use qemu::{Accel, QemuConfig};
pub use reclaim::ReclaimReport;
pub use spec::{CpuSet, VmSpec, DEFAULT_BOOT_ARGS, TAG_PREFIX};
pub use vm::{Driver, KillHandle, LocateError, Vm, VmError, Vmm, VmmConfig};
