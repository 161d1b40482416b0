//! `builder-init`: pid 1 of every application microVM booted from a converted rootfs.
//!
//! The converter puts this binary at `/.builder-vm/init` and the image config at
//! `/.builder-vm/config.json`; the VM boots with `init=/.builder-vm/init`. It must run in any
//! image (scratch, distroless, Alpine), so it is linked statically and reads `/etc/passwd` and
//! `/etc/group` itself instead of going through NSS.
//!
//! It mounts `/proc /sys /dev /dev/pts /dev/shm /run /tmp`, sets the hostname, configures `lo`
//! and `eth0` from the kernel's `ip=` parameter, starts the entrypoint as the image's user with
//! its environment and working directory, forwards signals to it, reaps every zombie, and when
//! the entrypoint exits prints `builder-init: exit=<code>` on the console and reboots (with
//! `reboot=k` the VMM exits).

mod config;
mod net;
mod process;
mod user;

use std::time::Duration;

use builder_contract::image::CONFIG_PATH;

fn console(message: &str) {
    eprintln!("builder-init: {message}");
}

/// Mounts a filesystem; a failure is reported and init goes on (the app may not need it).
fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    if let Err(e) = builder_guest::mount(source, target, fstype, flags, data) {
        console(&format!("warning: {e}"));
    }
}

fn mount_filesystems() {
    let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", hardened, "");
    mount("sysfs", "/sys", "sysfs", hardened, "");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=620,ptmxmode=666",
    );
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
}

fn run() -> Result<i32, String> {
    mount_filesystems();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let ip = net::IpConfig::from_cmdline(&cmdline);
    let hostname = ip
        .as_ref()
        .and_then(|ip| ip.hostname.clone())
        .unwrap_or_else(|| "app".to_string());
    if let Err(e) = net::set_hostname(&hostname) {
        console(&format!("warning: {e}"));
    }
    if let Err(e) = net::configure(ip.as_ref()) {
        console(&format!("warning: {e}"));
    }
    let config = config::load(CONFIG_PATH)?;
    let launch = config::launch(&config, &hostname)?;
    process::supervise(&launch)
}

fn main() {
    let code = run().unwrap_or_else(|e| {
        console(&format!("error: {e}"));
        127
    });
    console(&format!("exit={code}"));
    if std::process::id() != 1 {
        std::process::exit(code);
    }
    process::terminate_all(Duration::from_secs(2));
    builder_guest::reboot()
}
