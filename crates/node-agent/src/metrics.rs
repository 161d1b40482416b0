//! Prometheus metrics: in-process histograms and counters (phase durations, admission latency,
//! VMM exit codes, what the retention pass deleted, the registry mirror's requests and restarts), rendered in the text exposition format together with the gauges read at
//! scrape time (builds by state from the database, queue depth, capacity and usage) and a
//! curated set of each running Firecracker VM's own counters ([`VM_COUNTERS`], every non-zero
//! `*_fails`), labelled by build id.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use builder_contract::Phase;
use builder_vmm::firecracker::metrics::MetricsTotals;

use crate::model::BuildState;

/// Seconds.
const PHASE_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Seconds.
const CACHE_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0];
/// Seconds.
const ADMISSION_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    phases: BTreeMap<&'static str, Histogram>,
    admission: Histogram,
    vmm_exits: BTreeMap<String, u64>,
    running: usize,
    pruned: crate::node::Pruned,
    cache_fork: Histogram,
    cache_commit: Histogram,
}

#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    reclaimed: u64,
    /// `node_agent_vmm_info`'s labels: the VMM and its acceleration.
    vmm: Option<(&'static str, &'static str)>,
    /// The registry mirror's counters, shared with its supervisors ([`crate::mirror`]).
    pub mirror: Arc<MirrorMetrics>,
}

/// The registry mirror's counters: requests by upstream and result, registry restarts.
#[derive(Debug, Default)]
pub struct MirrorMetrics {
    counts: Mutex<MirrorCounts>,
}

#[derive(Debug, Default)]
struct MirrorCounts {
    requests: BTreeMap<(String, &'static str), u64>,
    restarts: BTreeMap<String, u64>,
}

impl MirrorMetrics {
    fn counts(&self) -> std::sync::MutexGuard<'_, MirrorCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exports `upstream`'s restart counter from zero.
    pub fn track(&self, upstream: &str) {
        self.counts()
            .restarts
            .entry(upstream.to_string())
            .or_default();
    }

    pub fn observe_request(&self, upstream: &str, result: &'static str) {
        *self
            .counts()
            .requests
            .entry((upstream.to_string(), result))
            .or_default() += 1;
    }

    pub fn observe_restart(&self, upstream: &str) {
        *self
            .counts()
            .restarts
            .entry(upstream.to_string())
            .or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        let counts = self.counts();
        if counts.restarts.is_empty() {
            return;
        }
        out.push_str("# HELP node_agent_mirror_requests_total Requests of builder VMs to the registry mirror by upstream and result (local: /v2/ answered by the node, tag_cache: a tag answered by its cached digest, proxied: passed to the registry, unavailable: the registry was not serving).\n# TYPE node_agent_mirror_requests_total counter\n");
        for ((upstream, result), n) in &counts.requests {
            let _ = writeln!(
                out,
                "node_agent_mirror_requests_total{{upstream=\"{upstream}\",result=\"{result}\"}} {n}"
            );
        }
        out.push_str("# HELP node_agent_mirror_restarts_total Times an upstream's mirror registry exited or could not start and was started again.\n# TYPE node_agent_mirror_restarts_total counter\n");
        for (upstream, n) in &counts.restarts {
            let _ = writeln!(
                out,
                "node_agent_mirror_restarts_total{{upstream=\"{upstream}\"}} {n}"
            );
        }
    }
}

/// What the scrape reads from elsewhere.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub by_state: Vec<(BuildState, i64)>,
    pub capacity_vcpus: u32,
    pub capacity_mem_mib: u64,
    pub used_vcpus: u32,
    pub used_mem_mib: u64,
    /// Firecracker's counters of each running VM, by build id.
    pub vms: Vec<(String, MetricsTotals)>,
    /// The build cache pool's counters and fork method; `None` when the cache is off.
    pub cache: Option<(builder_cache::CacheStats, builder_cache::ForkMethod)>,
}

/// One exported series family fed by Firecracker counters: (name, help, extra label name,
/// [(label value, Firecracker `group.field`s summed into it)]).
type VmCounter = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static [&'static str])],
);

/// The Firecracker counters exported per running VM (`build_id` label), all Prometheus
/// counters. Sources absent from a file (an older Firecracker) give no series.
pub const VM_COUNTERS: [VmCounter; 7] = [
    (
        "node_agent_vm_block_bytes_total",
        "Bytes the guest read from and wrote to its disks (Firecracker block.read_bytes, block.write_bytes).",
        "op",
        &[("read", &["block.read_bytes"]), ("write", &["block.write_bytes"])],
    ),
    (
        "node_agent_vm_block_requests_total",
        "Disk requests of the guest (Firecracker block.read_count, block.write_count, block.flush_count).",
        "op",
        &[
            ("read", &["block.read_count"]),
            ("write", &["block.write_count"]),
            ("flush", &["block.flush_count"]),
        ],
    ),
    (
        "node_agent_vm_net_bytes_total",
        "Bytes the guest received and sent (Firecracker net.rx_bytes_count, net.tx_bytes_count).",
        "direction",
        &[("rx", &["net.rx_bytes_count"]), ("tx", &["net.tx_bytes_count"])],
    ),
    (
        "node_agent_vm_net_packets_total",
        "Packets the guest received and sent (Firecracker net.rx_packets_count, net.tx_packets_count).",
        "direction",
        &[("rx", &["net.rx_packets_count"]), ("tx", &["net.tx_packets_count"])],
    ),
    (
        "node_agent_vm_vcpu_exits_total",
        "vCPU exits to the VMM for port and MMIO accesses (Firecracker vcpu.exit_*).",
        "kind",
        &[
            ("io_in", &["vcpu.exit_io_in"]),
            ("io_out", &["vcpu.exit_io_out"]),
            ("mmio_read", &["vcpu.exit_mmio_read"]),
            ("mmio_write", &["vcpu.exit_mmio_write"]),
        ],
    ),
    (
        "node_agent_vm_api_requests_total",
        "Requests to the VM's Firecracker API (Firecracker {get,put,patch}_api_requests.*_count).",
        "method",
        &[
            ("GET", &["get_api_requests.*_count"]),
            ("PUT", &["put_api_requests.*_count"]),
            ("PATCH", &["patch_api_requests.*_count"]),
        ],
    ),
    (
        "node_agent_vm_seccomp_faults_total",
        "System calls Firecracker's seccomp filter refused (Firecracker seccomp.num_faults).",
        "",
        &[("", &["seccomp.num_faults"])],
    ),
];

/// Sums the counters `pattern` names: `group.field`, or `group.*_suffix` for every field of
/// the group with that suffix. `None` when the file has none of them.
fn vm_counter(totals: &MetricsTotals, pattern: &str) -> Option<u64> {
    match pattern.split_once(".*") {
        None => totals.get(pattern),
        Some((group, suffix)) => {
            let prefix = format!("{group}.");
            totals
                .counters
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && k.ends_with(suffix))
                .map(|(_, n)| *n)
                .reduce(|a, b| a + b)
        }
    }
}

/// Firecracker's failure counters: every `*_fails` field plus `vcpu.failures`.
fn is_failure_counter(name: &str) -> bool {
    name.ends_with("_fails") || name == "vcpu.failures"
}

fn render_vms(out: &mut String, vms: &[(String, MetricsTotals)]) {
    for (name, help, label, series) in VM_COUNTERS {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
        for (build_id, totals) in vms {
            for (value, sources) in series {
                let sum = sources
                    .iter()
                    .filter_map(|s| vm_counter(totals, s))
                    .reduce(|a, b| a + b);
                let Some(sum) = sum else { continue };
                if label.is_empty() {
                    let _ = writeln!(out, "{name}{{build_id=\"{build_id}\"}} {sum}");
                } else {
                    let _ = writeln!(
                        out,
                        "{name}{{build_id=\"{build_id}\",{label}=\"{value}\"}} {sum}"
                    );
                }
            }
        }
    }
    out.push_str("# HELP node_agent_vm_vmm_failures_total Non-zero Firecracker failure counters (every *_fails and vcpu.failures), by metric.\n# TYPE node_agent_vm_vmm_failures_total counter\n");
    for (build_id, totals) in vms {
        for (metric, n) in &totals.counters {
            if is_failure_counter(metric) && *n > 0 {
                let _ = writeln!(
                    out,
                    "node_agent_vm_vmm_failures_total{{build_id=\"{build_id}\",metric=\"{metric}\"}} {n}"
                );
            }
        }
    }
    out.push_str("# HELP node_agent_vm_metrics_flushed_timestamp_seconds When Firecracker last wrote the VM's metrics (every 60 s).\n# TYPE node_agent_vm_metrics_flushed_timestamp_seconds gauge\n");
    for (build_id, totals) in vms {
        if let Some(ms) = totals.last_flush_ms {
            let _ = writeln!(
                out,
                "node_agent_vm_metrics_flushed_timestamp_seconds{{build_id=\"{build_id}\"}} {}",
                ms as f64 / 1000.0
            );
        }
    }
}

impl Metrics {
    pub fn new(reclaimed: u64) -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                phases: BTreeMap::new(),
                admission: Histogram::new(&ADMISSION_BUCKETS),
                vmm_exits: BTreeMap::new(),
                running: 0,
                pruned: crate::node::Pruned::default(),
                cache_fork: Histogram::new(&CACHE_BUCKETS),
                cache_commit: Histogram::new(&CACHE_BUCKETS),
            }),
            reclaimed,
            vmm: None,
            mirror: Arc::default(),
        }
    }

    /// Exports `node_agent_vmm_info{vmm, accel} 1` for the VMM builds run with (`vmm` `qemu`
    /// or `firecracker`, `accel` `kvm` or `tcg`, the latter emulated).
    pub fn with_vmm(mut self, vmm: Option<(&'static str, &'static str)>) -> Self {
        self.vmm = vmm;
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn observe_phase(&self, phase: Phase, duration_ms: u64) {
        self.inner()
            .phases
            .entry(phase.as_str())
            .or_insert_with(|| Histogram::new(&PHASE_BUCKETS))
            .observe(duration_ms as f64 / 1000.0);
    }

    pub fn observe_admission(&self, ms: i64) {
        self.inner().admission.observe(ms.max(0) as f64 / 1000.0);
    }

    pub fn observe_vmm_exit(&self, code: Option<i32>) {
        let label = code.map_or_else(|| "signal".to_string(), |c| c.to_string());
        *self.inner().vmm_exits.entry(label).or_default() += 1;
    }

    pub fn observe_pruned(&self, p: &crate::node::Pruned) {
        let total = &mut self.inner().pruned;
        total.builds += p.builds;
        total.events += p.events;
        total.signatures += p.signatures;
        total.log_files += p.log_files;
    }

    pub fn observe_cache_fork(&self, took: std::time::Duration) {
        self.inner().cache_fork.observe(took.as_secs_f64());
    }

    pub fn observe_cache_commit(&self, took: std::time::Duration) {
        self.inner().cache_commit.observe(took.as_secs_f64());
    }

    pub fn set_running(&self, running: usize) {
        self.inner().running = running;
    }

    pub fn render(&self, s: &Snapshot) -> String {
        let inner = self.inner();
        let mut out = String::new();
        out.push_str("# HELP node_agent_builds Builds in the database by state.\n# TYPE node_agent_builds gauge\n");
        for state in BuildState::ALL {
            let n = s
                .by_state
                .iter()
                .find(|(st, _)| *st == state)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "node_agent_builds{{state=\"{state}\"}} {n}");
        }
        let queued = s
            .by_state
            .iter()
            .find(|(st, _)| *st == BuildState::Queued)
            .map_or(0, |(_, n)| *n);
        let _ = write!(
            out,
            "# HELP node_agent_queue_depth Builds waiting for a node.\n# TYPE node_agent_queue_depth gauge\nnode_agent_queue_depth {queued}\n\
             # HELP node_agent_running_vms Builder VMs running on this node.\n# TYPE node_agent_running_vms gauge\nnode_agent_running_vms {}\n\
             # HELP node_agent_capacity_vcpus vCPUs this node lends to builds.\n# TYPE node_agent_capacity_vcpus gauge\nnode_agent_capacity_vcpus {}\n\
             # HELP node_agent_capacity_mem_mib Memory this node lends to builds.\n# TYPE node_agent_capacity_mem_mib gauge\nnode_agent_capacity_mem_mib {}\n\
             # HELP node_agent_used_vcpus vCPUs in use by builds.\n# TYPE node_agent_used_vcpus gauge\nnode_agent_used_vcpus {}\n\
             # HELP node_agent_used_mem_mib Memory in use by builds.\n# TYPE node_agent_used_mem_mib gauge\nnode_agent_used_mem_mib {}\n\
             # HELP node_agent_reclaimed_total Leftovers of a previous run removed at start.\n# TYPE node_agent_reclaimed_total counter\nnode_agent_reclaimed_total {}\n",
            inner.running, s.capacity_vcpus, s.capacity_mem_mib, s.used_vcpus, s.used_mem_mib, self.reclaimed
        );
        if let Some((vmm, accel)) = self.vmm {
            let _ = write!(
                out,
                "# HELP node_agent_vmm_info The VMM builder VMs run with and its acceleration (tcg: emulated).\n\
                 # TYPE node_agent_vmm_info gauge\nnode_agent_vmm_info{{vmm=\"{vmm}\",accel=\"{accel}\"}} 1\n"
            );
        }
        out.push_str("# HELP node_agent_vmm_exits_total VMM process exits by exit code.\n# TYPE node_agent_vmm_exits_total counter\n");
        for (code, n) in &inner.vmm_exits {
            let _ = writeln!(out, "node_agent_vmm_exits_total{{code=\"{code}\"}} {n}");
        }
        out.push_str("# HELP node_agent_phase_duration_seconds Build phase durations reported by builder VMs.\n# TYPE node_agent_phase_duration_seconds histogram\n");
        for (phase, h) in &inner.phases {
            h.render(
                &mut out,
                "node_agent_phase_duration_seconds",
                &format!("phase=\"{phase}\""),
            );
        }
        out.push_str("# HELP node_agent_admission_seconds From submission to the VMM process started.\n# TYPE node_agent_admission_seconds histogram\n");
        inner
            .admission
            .render(&mut out, "node_agent_admission_seconds", "");
        let p = inner.pruned;
        out.push_str("# HELP node_agent_pruned_total Rows and files the retention pass deleted: ended builds, their events, their log files, seen report signatures.\n# TYPE node_agent_pruned_total counter\n");
        for (what, n) in [
            ("builds", p.builds),
            ("events", p.events),
            ("log_files", p.log_files),
            ("signatures", p.signatures),
        ] {
            let _ = writeln!(out, "node_agent_pruned_total{{what=\"{what}\"}} {n}");
        }
        if let Some((stats, method)) = &s.cache {
            render_cache(&mut out, stats, *method, &inner);
        }
        render_vms(&mut out, &s.vms);
        self.mirror.render(&mut out);
        out
    }
}

fn render_cache(
    out: &mut String,
    stats: &builder_cache::CacheStats,
    method: builder_cache::ForkMethod,
    inner: &Inner,
) {
    for (name, help, n) in [
        (
            "hits",
            "Builds whose cache disk was a fork of their key's committed disk.",
            stats.hits,
        ),
        (
            "misses",
            "Builds whose cache disk was a new empty one.",
            stats.misses,
        ),
        (
            "commits",
            "Cache forks committed as their key's disk (the build succeeded).",
            stats.commits,
        ),
        (
            "discards",
            "Cache forks thrown away (the build did not succeed, or no_cache).",
            stats.discards,
        ),
        (
            "refused",
            "Cache forks not committed because their ext4 was not cleanly unmounted.",
            stats.refused,
        ),
        (
            "evictions",
            "Cache keys evicted, least recently used first, to stay under cache_max_mib.",
            stats.evictions,
        ),
    ] {
        let _ = write!(
            out,
            "# HELP node_agent_cache_{name}_total {help}\n\
             # TYPE node_agent_cache_{name}_total counter\n\
             node_agent_cache_{name}_total {n}\n"
        );
    }
    let method = method.as_str();
    let _ = write!(
        out,
        "# HELP node_agent_cache_bytes Allocated bytes of all committed cache disks.\n\
         # TYPE node_agent_cache_bytes gauge\nnode_agent_cache_bytes {}\n\
         # HELP node_agent_cache_keys Cache keys with a committed disk.\n\
         # TYPE node_agent_cache_keys gauge\nnode_agent_cache_keys {}\n\
         # HELP node_agent_cache_info How the cache pool forks disks (reflink: O(metadata), \
         sparse_copy: O(data)).\n\
         # TYPE node_agent_cache_info gauge\nnode_agent_cache_info{{fork_method=\"{method}\"}} 1\n",
        stats.bytes, stats.keys
    );
    out.push_str(
        "# HELP node_agent_cache_fork_seconds How long forking a build's cache disk took.\n\
         # TYPE node_agent_cache_fork_seconds histogram\n",
    );
    inner
        .cache_fork
        .render(out, "node_agent_cache_fork_seconds", "");
    out.push_str(
        "# HELP node_agent_cache_commit_seconds How long committing a build's cache disk took.\n\
         # TYPE node_agent_cache_commit_seconds histogram\n",
    );
    inner
        .cache_commit
        .render(out, "node_agent_cache_commit_seconds", "");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first two lines of a real Firecracker v1.17 metrics file (a VM configured over the
    /// API, started, then flushed).
    const CAPTURED: &str = include_str!("../tests/data/firecracker-metrics.jsonl");

    fn snapshot(vms: Vec<(String, MetricsTotals)>) -> Snapshot {
        Snapshot {
            by_state: Vec::new(),
            capacity_vcpus: 2,
            capacity_mem_mib: 4096,
            used_vcpus: 1,
            used_mem_mib: 2048,
            vms,
            cache: None,
        }
    }

    fn series<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn the_cache_series_are_exported_only_with_a_cache_pool() {
        let metrics = Metrics::new(0);
        metrics.observe_cache_fork(std::time::Duration::from_millis(30));
        let stats = builder_cache::CacheStats {
            hits: 3,
            refused: 1,
            bytes: 4096,
            keys: 2,
            ..Default::default()
        };
        let text = metrics.render(&Snapshot {
            cache: Some((stats, builder_cache::ForkMethod::Reflink)),
            ..snapshot(Vec::new())
        });
        for line in [
            "node_agent_cache_hits_total 3",
            "node_agent_cache_refused_total 1",
            "node_agent_cache_bytes 4096",
            "node_agent_cache_keys 2",
            "node_agent_cache_info{fork_method=\"reflink\"} 1",
            "node_agent_cache_fork_seconds_bucket{le=\"0.05\"} 1",
            "node_agent_cache_commit_seconds_count 0",
            "# TYPE node_agent_cache_keys gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(
            text.lines().all(|l| !l.starts_with(' ')),
            "an indented line:\n{text}"
        );
        let none = Metrics::new(0).render(&snapshot(Vec::new()));
        assert!(!none.contains("node_agent_cache_"), "{none}");
    }

    #[test]
    fn the_vmm_info_gauge_names_the_vmm_and_its_acceleration() {
        let text = Metrics::new(0)
            .with_vmm(Some(("qemu", "tcg")))
            .render(&snapshot(Vec::new()));
        assert_eq!(
            series(&text, "node_agent_vmm_info"),
            ["node_agent_vmm_info{vmm=\"qemu\",accel=\"tcg\"} 1"]
        );
        assert!(
            text.contains("# TYPE node_agent_vmm_info gauge\n"),
            "{text}"
        );
        let none = Metrics::new(0).render(&snapshot(Vec::new()));
        assert!(series(&none, "node_agent_vmm_info").is_empty(), "{none}");
    }

    #[test]
    fn exports_the_curated_counters_of_a_captured_metrics_file() {
        let mut totals = MetricsTotals::parse(CAPTURED);
        assert_eq!(totals.lines, 2);
        // The capture's guest never ran far (no KVM here): give it traffic and a failure.
        totals.counters.insert("block.read_bytes".into(), 4096);
        totals.counters.insert("net.tx_bytes_count".into(), 1500);
        totals.counters.insert("net.tap_write_fails".into(), 2);
        let text = Metrics::new(0).render(&snapshot(vec![("b1".into(), totals)]));

        assert_eq!(
            series(&text, "node_agent_vm_block_bytes_total{"),
            [
                r#"node_agent_vm_block_bytes_total{build_id="b1",op="read"} 4096"#,
                r#"node_agent_vm_block_bytes_total{build_id="b1",op="write"} 0"#,
            ]
        );
        assert!(
            text.contains("node_agent_vm_net_bytes_total{build_id=\"b1\",direction=\"tx\"} 1500\n")
        );
        assert!(text
            .contains("node_agent_vm_vcpu_exits_total{build_id=\"b1\",kind=\"mmio_write\"} 0\n"));
        assert!(text.contains("node_agent_vm_seccomp_faults_total{build_id=\"b1\"} 0\n"));
        // PUT /metrics, /boot-source, /machine-config and /actions (InstanceStart and the
        // flushes): 6 in the first line, 1 in the second, summed.
        let puts = series(
            &text,
            "node_agent_vm_api_requests_total{build_id=\"b1\",method=\"PUT\"}",
        );
        assert_eq!(puts.len(), 1);
        let n: u64 = puts[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(n, 7, "{puts:?}");
        // One GET /, before the start.
        assert!(
            text.contains("node_agent_vm_api_requests_total{build_id=\"b1\",method=\"GET\"} 1\n")
        );
        // Only non-zero failure counters, whatever group they are in.
        assert_eq!(
            series(&text, "node_agent_vm_vmm_failures_total{"),
            [r#"node_agent_vm_vmm_failures_total{build_id="b1",metric="net.tap_write_fails"} 2"#]
        );
        assert_eq!(
            series(&text, "node_agent_vm_metrics_flushed_timestamp_seconds{"),
            [format!(
                "node_agent_vm_metrics_flushed_timestamp_seconds{{build_id=\"b1\"}} {}",
                MetricsTotals::parse(CAPTURED).last_flush_ms.unwrap() as f64 / 1000.0
            )]
        );
        // Every sample line belongs to a family with a TYPE line.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split(['{', ' ']).next().unwrap();
            let family = family.trim_end_matches("_bucket").trim_end_matches("_sum");
            let family = family.trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }

    #[test]
    fn no_vms_no_vm_series_and_absent_fields_no_series() {
        let text = Metrics::new(0).render(&snapshot(Vec::new()));
        assert!(text.contains("# TYPE node_agent_vm_block_bytes_total counter\n"));
        assert!(!text.contains("build_id="), "{text}");
        let only_block = MetricsTotals::parse("{\"block\":{\"read_bytes\":7}}\n");
        let text = Metrics::new(0).render(&snapshot(vec![("b2".into(), only_block)]));
        assert_eq!(
            text.lines()
                .filter(|l| l.contains("build_id="))
                .collect::<Vec<_>>(),
            [r#"node_agent_vm_block_bytes_total{build_id="b2",op="read"} 7"#]
        );
    }
}
