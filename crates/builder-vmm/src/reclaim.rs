//! Finding and removing what VMs of a crashed daemon left behind, by naming convention alone:
//! VMM processes whose command line carries a `bvm-` tag, netns `bvm-*`, host veths `bvh-*`
//! whose alias is a tag, host iptables rules commented with a tag in every table the VMs use
//! (and the `raw` chains named after host veths that hold such rules), cgroups
//! `<mount>/builder-vm/bvm-*`, the VMMs' jails (the jailer's chroots, QEMU's jails) and work
//! dirs `bvm-*` (a jail's binds, such as a cache disk's, are unmounted first). The node agent runs it at start, before it starts any VM. Veths go before
//! namespaces: deleting a namespace removes its veth pair only later, asynchronously.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup;
use crate::cleanup::{remove_dir_all_if_exists, remove_jail_dir};
use crate::host::{Host, HostCommand};
use crate::net::{HOST_TABLES, HOST_VETH_PREFIX};
use crate::process::Process;

/// What to look for.
#[derive(Debug, Clone, Copy)]
pub struct ReclaimScope<'a> {
    /// Tag prefix; [`crate::spec::TAG_PREFIX`] for everything this layer makes.
    pub prefix: &'a str,
    pub work_root: &'a Path,
    /// Where the driver's jails are: `<chroot_base>/firecracker` (the jailer's chroots) or
    /// `<chroot_base>/qemu`; `None` to leave jails alone.
    pub jail_dir: Option<&'a Path>,
}

/// How much was found and removed, and what could not be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReclaimReport {
    pub processes: usize,
    pub netns: usize,
    pub veths: usize,
    pub iptables_rules: usize,
    /// Chains of our own (the `raw` chain of each VM), removed with their rules.
    pub iptables_chains: usize,
    pub cgroups: usize,
    pub chroots: usize,
    pub work_dirs: usize,
    pub errors: Vec<String>,
}

impl ReclaimReport {
    /// Resources removed, all kinds together.
    pub fn total(&self) -> usize {
        self.processes
            + self.netns
            + self.veths
            + self.iptables_rules
            + self.iptables_chains
            + self.cgroups
            + self.chroots
            + self.work_dirs
    }
}

/// Removes every leftover in `scope`, processes first so nothing is busy.
pub fn reclaim(host: &dyn Host, scope: &ReclaimScope<'_>) -> ReclaimReport {
    let mut report = ReclaimReport::default();
    let prefix = scope.prefix;
    let run = |report: &mut ReclaimReport, command: HostCommand| match host.run(&command) {
        Ok(out) => Some(out),
        Err(e) => {
            report.errors.push(e.to_string());
            None
        }
    };

    for pid in vmm_processes(prefix) {
        match Process::open(pid).and_then(|p| p.kill_and_reap()) {
            Ok(_) => report.processes += 1,
            Err(e) => report
                .errors
                .push(format!("cannot kill VMM process {pid}: {e}")),
        }
    }

    let links = run(&mut report, HostCommand::new("ip", ["-j", "link", "show"]));
    let links: Vec<serde_json::Value> = links
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    for link in links {
        let name = link["ifname"].as_str().unwrap_or_default();
        let alias = link["ifalias"].as_str().unwrap_or_default();
        if name.starts_with(HOST_VETH_PREFIX)
            && alias.starts_with(prefix)
            && run(
                &mut report,
                HostCommand::new("ip", ["link", "delete", name]),
            )
            .is_some()
        {
            report.veths += 1;
        }
    }

    let netns = run(&mut report, HostCommand::new("ip", ["netns", "list"])).unwrap_or_default();
    for name in netns.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with(prefix)
            && run(
                &mut report,
                HostCommand::new("ip", ["netns", "delete", name]),
            )
            .is_some()
        {
            report.netns += 1;
        }
    }

    // Rules in the built-in chains one by one (the jumps to our chains among them), then our
    // chains whole.
    let marker = format!("--comment {prefix}");
    for table in HOST_TABLES {
        let rules = run(
            &mut report,
            HostCommand::new("iptables", ["-w", "-t", table, "-S"]),
        );
        let mut chains = BTreeSet::new();
        for rule in rules.unwrap_or_default().lines() {
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            if !rule.contains(&marker) {
                continue;
            }
            let chain = spec.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(HOST_VETH_PREFIX) {
                chains.insert(chain.to_string());
                continue;
            }
            let args = ["-w", "-t", table, "-D"]
                .into_iter()
                .chain(spec.split_whitespace());
            if run(&mut report, HostCommand::new("iptables", args)).is_some() {
                report.iptables_rules += 1;
            }
        }
        for chain in chains {
            let flushed = run(
                &mut report,
                HostCommand::new("iptables", ["-w", "-t", table, "-F", &chain]),
            );
            if flushed.is_some()
                && run(
                    &mut report,
                    HostCommand::new("iptables", ["-w", "-t", table, "-X", &chain]),
                )
                .is_some()
            {
                report.iptables_chains += 1;
            }
        }
    }

    for dir in cgroup::find(prefix) {
        match cgroup::kill_and_remove(&dir) {
            Ok(()) => report.cgroups += 1,
            Err(e) => report.errors.push(e.to_string()),
        }
    }

    let remove_dirs = |report: &mut ReclaimReport,
                       parent: &Path,
                       remove: fn(&Path) -> std::io::Result<()>|
     -> usize {
        let mut removed = 0;
        for dir in tagged_entries(parent, prefix) {
            match remove(&dir) {
                Ok(()) => removed += 1,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        removed
    };
    if let Some(jail_dir) = scope.jail_dir {
        // A jail may still hold the bind of a cache disk used in place.
        report.chroots = remove_dirs(&mut report, jail_dir, remove_jail_dir);
    }
    report.work_dirs = remove_dirs(&mut report, scope.work_root, remove_dir_all_if_exists);
    if report.total() > 0 || !report.errors.is_empty() {
        tracing::warn!(?report, "reclaimed leftovers of earlier VMs");
    }
    report
}

fn tagged_entries(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// Pids of Firecracker and QEMU processes whose arguments include a tag with `prefix`.
pub fn vmm_processes(prefix: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
            let Some(program) = args.next() else {
                return false;
            };
            let program = program.rsplit('/').next().unwrap_or_default().to_string();
            (program.contains("firecracker") || program.starts_with("qemu-system"))
                && args.any(|a| a.starts_with(prefix))
        })
        .collect()
}
