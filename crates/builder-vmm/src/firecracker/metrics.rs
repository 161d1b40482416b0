//! Reading Firecracker's metrics file: one JSON object per line, written every 60 s and on a
//! `FlushMetrics` action (docs/metrics.md upstream). Most values are *increments since the
//! previous line* (Firecracker's `SharedIncMetric` stores the last flushed value and writes the
//! delta), so a counter's total is the sum of its values over every line; the few that are
//! point-in-time values (`SharedStoreMetric`: the API server's start-up times, `latencies_us`)
//! and the nested min/max/sum aggregates (`*_agg`) are not counters and are left out.
//!
//! Only what is there is read: `group.field` pairs whose value is an unsigned integer, so
//! fields a newer Firecracker adds are summed and fields an older one lacks are simply absent.
//! A line still being written (no newline yet) or one that is not a JSON object is skipped.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Groups whose integer fields are point-in-time values, not increments.
const STORE_GROUPS: [&str; 2] = ["api_server", "latencies_us"];

/// Why a metrics file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the Firecracker metrics file {path}")]
pub struct MetricsFileError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Every counter of a metrics file, summed over its lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsTotals {
    /// `group.field` (e.g. `block.read_bytes`, `put_api_requests.actions_fails`) → total.
    pub counters: BTreeMap<String, u64>,
    /// Complete lines parsed.
    pub lines: u64,
    /// `utc_timestamp_ms` of the last line: how fresh the totals are.
    pub last_flush_ms: Option<u64>,
}

impl MetricsTotals {
    /// Sums the complete lines of `text` (the file's content).
    pub fn parse(text: &str) -> Self {
        let mut totals = MetricsTotals::default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => return totals,
        };
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(Value::Object(groups)) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            totals.lines += 1;
            for (group, value) in &groups {
                match value {
                    Value::Number(n) if group == "utc_timestamp_ms" => {
                        totals.last_flush_ms = n.as_u64();
                    }
                    Value::Object(fields) if !STORE_GROUPS.contains(&group.as_str()) => {
                        for (field, value) in fields {
                            if let Some(n) = value.as_u64() {
                                *totals
                                    .counters
                                    .entry(format!("{group}.{field}"))
                                    .or_default() += n;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        totals
    }

    /// Reads and sums the file at `path`.
    pub fn read(path: &Path) -> Result<Self, MetricsFileError> {
        std::fs::read_to_string(path)
            .map(|text| Self::parse(&text))
            .map_err(|source| MetricsFileError {
                path: path.to_path_buf(),
                source,
            })
    }

    /// The total of `group.field`, when Firecracker writes it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.counters.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two flushes of one VM, cut down from a real v1.17 file.
    const TWO_LINES: &str = concat!(
        r#"{"utc_timestamp_ms":1000,"api_server":{"process_startup_time_us":7,"process_startup_time_cpu_us":3},"#,
        r#""block":{"read_bytes":4096,"write_bytes":0,"read_agg":{"min_us":1,"max_us":9,"sum_us":10},"activate_fails":0},"#,
        r#""latencies_us":{"pause_vm":5},"put_api_requests":{"actions_count":3,"actions_fails":1}}"#,
        "\n",
        r#"{"utc_timestamp_ms":2000,"api_server":{"process_startup_time_us":7,"process_startup_time_cpu_us":3},"#,
        r#""block":{"read_bytes":512,"write_bytes":8192,"read_agg":{"min_us":1,"max_us":9,"sum_us":10},"activate_fails":0},"#,
        r#""latencies_us":{"pause_vm":5},"put_api_requests":{"actions_count":1,"actions_fails":0},"new_group":{"x":2}}"#,
        "\n",
    );

    #[test]
    fn sums_increments_and_skips_store_values_and_aggregates() {
        let t = MetricsTotals::parse(TWO_LINES);
        assert_eq!(t.lines, 2);
        assert_eq!(t.last_flush_ms, Some(2000));
        assert_eq!(t.get("block.read_bytes"), Some(4608));
        assert_eq!(t.get("block.write_bytes"), Some(8192));
        assert_eq!(t.get("put_api_requests.actions_count"), Some(4));
        assert_eq!(t.get("put_api_requests.actions_fails"), Some(1));
        assert_eq!(
            t.get("new_group.x"),
            Some(2),
            "unknown groups are summed too"
        );
        assert_eq!(t.get("api_server.process_startup_time_us"), None);
        assert_eq!(t.get("latencies_us.pause_vm"), None);
        assert!(!t.counters.keys().any(|k| k.contains("_agg")), "{t:?}");
    }

    #[test]
    fn a_line_being_written_and_garbage_are_skipped() {
        let partial = format!("{TWO_LINES}{{\"utc_timestamp_ms\":3000,\"block\":{{\"read");
        assert_eq!(
            MetricsTotals::parse(&partial),
            MetricsTotals::parse(TWO_LINES)
        );
        let t = MetricsTotals::parse("not json\n[1,2]\n{\"block\":{\"read_bytes\":1}}\n");
        assert_eq!((t.lines, t.get("block.read_bytes")), (1, Some(1)));
        assert_eq!(MetricsTotals::parse(""), MetricsTotals::default());
    }
}
