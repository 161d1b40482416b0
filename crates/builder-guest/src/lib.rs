//! What the two inits inside microVMs share: `builder-agent` as pid 1 of the builder VM and
//! `builder-init` as pid 1 of an application VM. Both mount the kernel filesystems themselves
//! (there is no initramfs and no systemd) and end the VM by rebooting, which with `reboot=k`
//! on the kernel command line makes Firecracker and QEMU (`-no-reboot`) exit.

use std::ffi::CString;
use std::time::Duration;

/// Mounts `source` on `target` (created first). A target that is already mounted is fine.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
    let c =
        |s: &str| CString::new(s).map_err(|_| format!("a mount argument for {target} has a NUL"));
    let (source_c, target_c, fstype_c, data_c) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!(
                "cannot mount {source} ({fstype}) on {target}: {err}"
            ));
        }
    }
    Ok(())
}

/// Flushes every filesystem and reboots. For pid 1 `reboot(2)` does not return; should it, the
/// process waits forever rather than exit (pid 1 exiting panics the kernel).
pub fn reboot() -> ! {
    // SAFETY: plain syscalls.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
