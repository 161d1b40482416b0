//! Prometheus metrics: in-process histograms and counters (phase durations, admission latency,
//! VMM exit codes), rendered in the text exposition format together with the gauges read at
//! scrape time (builds by state from the database, queue depth, capacity and usage).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use builder_contract::Phase;

use crate::model::BuildState;

/// Seconds.
const PHASE_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
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
}

#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    reclaimed: u64,
}

/// What the scrape reads from elsewhere.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub by_state: Vec<(BuildState, i64)>,
    pub capacity_vcpus: u32,
    pub capacity_mem_mib: u64,
    pub used_vcpus: u32,
    pub used_mem_mib: u64,
}

impl Metrics {
    pub fn new(reclaimed: u64) -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                phases: BTreeMap::new(),
                admission: Histogram::new(&ADMISSION_BUCKETS),
                vmm_exits: BTreeMap::new(),
                running: 0,
            }),
            reclaimed,
        }
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
        out
    }
}
