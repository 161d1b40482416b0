//! A build's timeline: the time it spent in each state (from its events) and, once its guest
//! reported, in each pipeline phase (the report's durations, laid end to end from when the
//! guest started), drawn server-side as SVG bars on one time axis, with a table of the same.

use std::fmt::Write;

use builder_contract::PhaseTiming;

use super::html::{self, Esc};
use crate::db::EventRow;
use crate::model::BuildState;

/// One bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Span {
    pub lane: Lane,
    pub name: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    State,
    Phase,
}

impl Lane {
    fn label(self) -> &'static str {
        match self {
            Lane::State => "state",
            Lane::Phase => "phase",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Lane::State => "s",
            Lane::Phase => "p",
        }
    }
}

/// The spans of a build: each state from its event to the next (the current one until
/// `now_ms`), and the guest's phases end to end from `phases_from_ms`.
pub(super) fn spans(
    events: &[EventRow],
    phases: &[PhaseTiming],
    phases_from_ms: Option<i64>,
    now_ms: i64,
) -> Vec<Span> {
    let mut out = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let end = match events.get(i + 1) {
            Some(next) => next.at_ms,
            None if BuildState::parse(&event.to_state).is_some_and(|s| !s.is_terminal()) => now_ms,
            None => continue,
        };
        out.push(Span {
            lane: Lane::State,
            name: event.to_state.clone(),
            start_ms: event.at_ms,
            end_ms: end.max(event.at_ms),
        });
    }
    if let Some(mut at) = phases_from_ms {
        for p in phases {
            let end = at + p.duration_ms as i64;
            out.push(Span {
                lane: Lane::Phase,
                name: p.phase.as_str().to_string(),
                start_ms: at,
                end_ms: end,
            });
            at = end;
        }
    }
    out
}

const WIDTH: f64 = 960.0;
const LEFT: f64 = 64.0;
const LANE_HEIGHT: f64 = 30.0;
const BAR_HEIGHT: f64 = 22.0;
/// About the width of one character of the bar labels, to decide whether a label fits.
const CHAR_WIDTH: f64 = 6.5;

/// The SVG of `spans` and a table of them; a note when there are none.
pub(super) fn render(spans: &[Span]) -> String {
    let (Some(t0), Some(t1)) = (
        spans.iter().map(|s| s.start_ms).min(),
        spans.iter().map(|s| s.end_ms).max(),
    ) else {
        return "<p class=\"muted\">No timeline yet.</p>".to_string();
    };
    let total = (t1 - t0).max(1) as f64;
    let scale = (WIDTH - LEFT - 8.0) / total;
    let lanes: Vec<Lane> = [Lane::State, Lane::Phase]
        .into_iter()
        .filter(|l| spans.iter().any(|s| s.lane == *l))
        .collect();
    let height = lanes.len() as f64 * LANE_HEIGHT + 24.0;
    let mut svg = format!(
        "<svg class=\"timeline\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" \
         height=\"{height}\" role=\"img\" aria-label=\"build timeline\">"
    );
    for (row, lane) in lanes.iter().enumerate() {
        let y = row as f64 * LANE_HEIGHT;
        let _ = write!(
            svg,
            "<text class=\"lane\" x=\"0\" y=\"{:.1}\">{}</text>",
            y + BAR_HEIGHT / 2.0 + 4.0,
            lane.label()
        );
        for span in spans.iter().filter(|s| s.lane == *lane) {
            let x = LEFT + (span.start_ms - t0) as f64 * scale;
            let w = ((span.end_ms - span.start_ms) as f64 * scale).max(2.0);
            let text = format!(
                "{} {}",
                span.name,
                html::duration(span.end_ms - span.start_ms)
            );
            let _ = write!(
                svg,
                "<rect class=\"bar {c}-{name}\" data-name=\"{name}\" x=\"{x:.1}\" y=\"{y:.1}\" \
                 width=\"{w:.1}\" height=\"{BAR_HEIGHT}\" rx=\"3\"><title>{text}</title></rect>",
                c = lane.class(),
                name = Esc(&span.name),
                text = Esc(&text),
            );
            if w > text.len() as f64 * CHAR_WIDTH + 8.0 {
                let _ = write!(
                    svg,
                    "<text class=\"bar-label\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    x + 4.0,
                    y + BAR_HEIGHT / 2.0 + 4.0,
                    Esc(&text)
                );
            }
        }
    }
    let axis_y = lanes.len() as f64 * LANE_HEIGHT + 14.0;
    let step = tick_step(t1 - t0);
    let mut tick = 0;
    while tick <= t1 - t0 {
        let x = LEFT + tick as f64 * scale;
        let _ = write!(
            svg,
            "<line class=\"tick\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"0\" y2=\"{:.1}\"></line>\
             <text class=\"axis\" x=\"{x:.1}\" y=\"{axis_y:.1}\">+{}</text>",
            axis_y - 10.0,
            html::duration(tick)
        );
        tick += step;
    }
    svg.push_str("</svg>");
    svg.push_str(
        "<table class=\"spans\"><thead><tr><th>lane</th><th>name</th><th>from</th>\
         <th>duration</th></tr></thead><tbody>",
    );
    for span in spans {
        let _ = write!(
            svg,
            "<tr><td>{}</td><td>{}</td><td>+{}</td><td>{}</td></tr>",
            span.lane.label(),
            Esc(&span.name),
            html::duration(span.start_ms - t0),
            html::duration(span.end_ms - span.start_ms)
        );
    }
    svg.push_str("</tbody></table>");
    svg
}

/// A round tick interval that gives at most about eight ticks over `total_ms`.
fn tick_step(total_ms: i64) -> i64 {
    const STEPS: [i64; 16] = [
        100, 250, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000,
        600_000, 900_000, 1_800_000, 3_600_000,
    ];
    STEPS
        .into_iter()
        .find(|s| total_ms / s <= 8)
        .unwrap_or(((total_ms / 8) / 3_600_000 + 1) * 3_600_000)
}

#[cfg(test)]
mod tests {
    use builder_contract::Phase;

    use super::*;

    fn event(at_ms: i64, to: &str) -> EventRow {
        EventRow {
            seq: 0,
            at_ms,
            from_state: None,
            to_state: to.into(),
            node_id: None,
            detail: None,
        }
    }

    #[test]
    fn states_span_to_the_next_event_and_phases_follow_each_other() {
        let events = [
            event(1_000, "queued"),
            event(1_500, "starting"),
            event(2_000, "running"),
            event(9_000, "succeeded"),
        ];
        let phases = [
            PhaseTiming {
                phase: Phase::Clone,
                duration_ms: 1_000,
            },
            PhaseTiming {
                phase: Phase::Build,
                duration_ms: 4_000,
            },
        ];
        let spans = spans(&events, &phases, Some(2_500), 99_000);
        let got: Vec<_> = spans
            .iter()
            .map(|s| (s.name.as_str(), s.start_ms, s.end_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("queued", 1_000, 1_500),
                ("starting", 1_500, 2_000),
                ("running", 2_000, 9_000),
                ("clone", 2_500, 3_500),
                ("build", 3_500, 7_500),
            ]
        );
        let svg = render(&spans);
        assert_eq!(svg.matches("<rect class=\"bar").count(), 5);
        assert!(svg.contains("running 7.0 s"), "{svg}");
    }

    #[test]
    fn a_running_build_spans_until_now() {
        let spans = spans(&[event(1_000, "running")], &[], None, 4_000);
        assert_eq!(spans[0].end_ms, 4_000);
        assert!(render(&[]).contains("No timeline"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(800), 100);
        assert_eq!(tick_step(9_000), 2_000);
        assert_eq!(tick_step(7_200_000), 900_000);
    }
}
