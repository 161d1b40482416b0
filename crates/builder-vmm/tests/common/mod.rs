//! Shared by the integration tests: kernels, a unique tag prefix per test process, and the
//! leftover check that every test ends with.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use builder_vmm::cleanup::{CleanupErrors, CleanupStack};
use builder_vmm::{cgroup, reclaim, VmSpec, Vmm, DEFAULT_BOOT_ARGS, TAG_PREFIX};

/// `bvm-t<pid>-`: every resource of this test process, and nothing of a parallel one.
pub fn prefix() -> String {
    format!("{TAG_PREFIX}t{}-", std::process::id())
}

/// A VM id under [`prefix`].
pub fn id(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

/// The guest kernel: `BUILDER_VMM_TEST_KERNEL`, else the project's `build/vms/vmlinux`.
pub fn kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("BUILDER_VMM_TEST_KERNEL") {
        return path.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/vms/vmlinux");
    assert!(
        path.exists(),
        "no guest kernel: run scripts/build-kernel.sh (build/vms/vmlinux) or set \
         BUILDER_VMM_TEST_KERNEL to an ELF vmlinux with a PVH note"
    );
    path
}

/// What the guest of [`tiny_elf`] does.
#[derive(Clone, Copy)]
pub enum TinyGuest {
    /// Halts forever: the VM runs until killed.
    Halt,
    /// Resets the machine through the i8042 controller (what `reboot=k` does): the VMM exits 0.
    Reset,
}

/// Writes the smallest ELF Firecracker will load: one PT_LOAD at 1 MiB holding a few
/// instructions (Linux itself cannot run under this host's nested KVM; these can).
pub fn tiny_elf(path: &Path, guest: TinyGuest) {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 64 + 56;
    let code: &[u8] = match guest {
        // hlt; jmp .-1
        TinyGuest::Halt => &[0xf4, 0xeb, 0xfd],
        // mov al, 0xfe; out 0x64, al; hlt; jmp .-1
        TinyGuest::Reset => &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd],
    };
    let size = CODE_OFFSET + code.len() as u64;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    elf.resize(16, 0);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend((LOAD + CODE_OFFSET).to_le_bytes()); // e_entry
    elf.extend(64u64.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend(half.to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    for word in [0, LOAD, LOAD, size, size, 0x1000u64] {
        elf.extend(word.to_le_bytes()); // offset vaddr paddr filesz memsz align
    }
    elf.extend(code);
    std::fs::write(path, elf).unwrap();
}

/// A small read-only "rootfs" (any file will do: the guests here never mount it).
pub fn rootfs(dir: &Path) -> PathBuf {
    let path = dir.join("rootfs.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

pub fn spec(id: String, kernel: PathBuf, rootfs: PathBuf) -> VmSpec {
    VmSpec {
        id,
        kernel,
        rootfs,
        scratch_mib: 32,
        secrets: None,
        cache_disk: None,
        vcpus: 1,
        mem_mib: 256,
        boot_args: DEFAULT_BOOT_ARGS.to_string(),
        params: None,
        network: None,
        timeout: Duration::from_secs(60),
        cpus: None,
    }
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything on the host that still carries `prefix` (empty when the tests left nothing).
pub fn leftovers(prefix: &str, dirs: &[&Path]) -> Vec<String> {
    let mut found = vec![];
    for line in sh("ip", &["netns", "list"]).lines() {
        if line.starts_with(prefix) {
            found.push(format!("netns {line}"));
        }
    }
    for line in sh("ip", &["-o", "link", "show"]).lines() {
        if line.contains(prefix) {
            found.push(format!("link {line}"));
        }
    }
    for table in builder_vmm::net::HOST_TABLES {
        for line in sh("iptables", &["-w", "-t", table, "-S"]).lines() {
            if line.contains(prefix) {
                found.push(format!("iptables {line}"));
            }
        }
    }
    for dir in cgroup::find(prefix) {
        found.push(format!("cgroup {}", dir.display()));
    }
    for pid in reclaim::vmm_processes(prefix) {
        found.push(format!("process {pid}"));
    }
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                found.push(format!("file {}", entry.path().display()));
            }
        }
    }
    found
}

/// Runs a cleanup stack even when the test panics half-way.
pub struct Guard(pub CleanupStack);

impl Guard {
    pub fn finish(mut self) -> Result<(), CleanupErrors> {
        self.0.run()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.run();
    }
}

/// Reclaims everything tagged `.1` when the test fails half-way, so a failure leaves nothing.
pub struct ReclaimOnPanic(pub Vmm, pub String);

impl Drop for ReclaimOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let report = self.0.reclaim_matching(&self.1);
            eprintln!("reclaimed after the failure: {report:?}");
        }
    }
}
