//! The node's capacity over time: a sampler that records vCPUs and memory in use, running VMs
//! and queued builds every [`SAMPLE_EVERY`] into a bounded in-memory ring (the last 24 hours;
//! nothing is stored, a restart starts it anew), and the SVG charts the node page draws of it.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::html::{self, Esc};
use super::Dashboard;
use crate::db::DbError;
use crate::model::BuildState;
use crate::node::Node;

pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// 24 hours of samples.
const KEEP: usize = 24 * 3600 / SAMPLE_EVERY.as_secs() as usize;
/// Charts draw at most this many points; older samples are merged (their maximum).
const MAX_POINTS: usize = 480;
/// The shortest time a chart spans, so a young node's few samples do not fill it.
const MIN_SPAN_MS: i64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sample {
    pub at_ms: i64,
    pub used_vcpus: u32,
    pub used_mem_mib: u64,
    pub running: usize,
    /// Queued builds in the whole queue (shared with other nodes on PostgreSQL).
    pub queued: i64,
}

/// The ring of samples.
#[derive(Default)]
pub(super) struct History(Mutex<VecDeque<Sample>>);

impl History {
    fn push(&self, sample: Sample) {
        let mut samples = self.0.lock().expect("capacity history lock");
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub(super) fn snapshot(&self) -> Vec<Sample> {
        self.0
            .lock()
            .expect("capacity history lock")
            .iter()
            .copied()
            .collect()
    }
}

/// The node's usage now.
pub(super) async fn sample(node: &Node) -> Result<Sample, DbError> {
    let (used_vcpus, used_mem_mib, running) = node.usage();
    let queued = node
        .db
        .count_by_state()
        .await?
        .into_iter()
        .find(|(state, _)| *state == BuildState::Queued)
        .map_or(0, |(_, n)| n);
    Ok(Sample {
        at_ms: crate::now_ms(),
        used_vcpus,
        used_mem_mib,
        running,
        queued,
    })
}

/// Samples until the dashboard is dropped (its server stopped).
pub(super) async fn sample_forever(dashboard: Weak<Dashboard>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(dashboard) = dashboard.upgrade() else {
            return;
        };
        match sample(&dashboard.node).await {
            Ok(s) => dashboard.capacity.push(s),
            Err(e) => tracing::warn!(
                error = crate::error_chain(&e),
                "cannot sample the node's capacity for the dashboard"
            ),
        }
    }
}

/// At most `max` samples: consecutive ones merged by their maximum (the last one's time).
fn downsample(samples: &[Sample], max: usize) -> Vec<Sample> {
    let per = samples.len().div_ceil(max).max(1);
    samples
        .chunks(per)
        .map(|chunk| Sample {
            at_ms: chunk[chunk.len() - 1].at_ms,
            used_vcpus: chunk.iter().map(|s| s.used_vcpus).max().unwrap_or(0),
            used_mem_mib: chunk.iter().map(|s| s.used_mem_mib).max().unwrap_or(0),
            running: chunk.iter().map(|s| s.running).max().unwrap_or(0),
            queued: chunk.iter().map(|s| s.queued).max().unwrap_or(0),
        })
        .collect()
}

/// One line of a chart.
pub(super) struct Series {
    pub class: &'static str,
    pub label: &'static str,
    pub value: fn(&Sample) -> f64,
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 150.0;
const LEFT: f64 = 56.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 20.0;

/// An SVG chart of `series` over `samples` (oldest first), from 0 to `max` (at least the
/// highest value), the first series filled; `unit` formats the y axis labels.
pub(super) fn chart(
    title: &str,
    samples: &[Sample],
    series: &[Series],
    max: f64,
    unit: fn(f64) -> String,
) -> String {
    let samples = downsample(samples, MAX_POINTS);
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return String::new();
    };
    let t1 = last.at_ms;
    let t0 = first.at_ms.min(t1 - MIN_SPAN_MS);
    let max = series
        .iter()
        .flat_map(|s| samples.iter().map(s.value))
        .fold(max, f64::max)
        .max(1.0);
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: i64| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * plot_w;
    let y = |v: f64| TOP + plot_h - v / max * plot_h;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" \
         height=\"{HEIGHT}\" role=\"img\" aria-label=\"{title}\">\
         <text class=\"chart-title\" x=\"0\" y=\"14\">{title}</text>",
        title = Esc(title)
    );
    let mut legend_x = LEFT + 200.0;
    for s in series {
        let _ = write!(
            svg,
            "<rect class=\"swatch {c}\" x=\"{legend_x}\" y=\"5\" width=\"10\" height=\"10\"></rect>\
             <text class=\"legend\" x=\"{:.0}\" y=\"14\">{}</text>",
            legend_x + 14.0,
            s.label,
            c = s.class,
        );
        legend_x += 24.0 + s.label.len() as f64 * 7.0;
    }
    for v in [0.0, max / 2.0, max] {
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"></line>\
             <text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - 8.0,
            LEFT - 6.0,
            y(v) + 4.0,
            unit(v),
            y = y(v),
        );
    }
    for (t, anchor) in [(t0, "start"), ((t0 + t1) / 2, "middle"), (t1, "end")] {
        let _ = write!(
            svg,
            "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
            x(t),
            HEIGHT - 4.0,
            html::clock(t)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let points: Vec<String> = samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.at_ms), y((s.value)(p))))
            .collect();
        if i == 0 {
            let _ = write!(
                svg,
                "<polygon class=\"area {}\" points=\"{:.1},{base:.1} {} {:.1},{base:.1}\"></polygon>",
                s.class,
                x(first.at_ms),
                points.join(" "),
                x(last.at_ms),
                base = y(0.0),
            );
        }
        let _ = write!(
            svg,
            "<polyline class=\"line {}\" points=\"{}\"></polyline>",
            s.class,
            points.join(" ")
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: i64, used_vcpus: u32) -> Sample {
        Sample {
            at_ms,
            used_vcpus,
            used_mem_mib: 0,
            running: 0,
            queued: 0,
        }
    }

    #[test]
    fn the_ring_keeps_the_last_day() {
        let history = History::default();
        for i in 0..KEEP as i64 + 10 {
            history.push(at(i, 0));
        }
        let samples = history.snapshot();
        assert_eq!(samples.len(), KEEP);
        assert_eq!(samples[0].at_ms, 10);
    }

    #[test]
    fn downsampling_keeps_peaks() {
        let samples: Vec<_> = (0..1000).map(|i| at(i, u32::from(i == 501))).collect();
        let merged = downsample(&samples, 100);
        assert_eq!(merged.len(), 100);
        assert_eq!(merged.iter().map(|s| s.used_vcpus).sum::<u32>(), 1);
        assert_eq!(merged.last().unwrap().at_ms, 999);
    }

    #[test]
    fn a_chart_draws_each_series() {
        let series = [
            Series {
                class: "vcpus",
                label: "vCPUs used",
                value: |s| f64::from(s.used_vcpus),
            },
            Series {
                class: "running",
                label: "running",
                value: |s| s.running as f64,
            },
        ];
        let svg = chart("vCPUs", &[at(0, 1), at(10_000, 2)], &series, 4.0, |v| {
            format!("{v:.0}")
        });
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<polygon").count(), 1);
        assert!(svg.contains(">4</text>"), "{svg}");
    }
}
