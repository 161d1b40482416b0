//! Build progress the guest reports while it runs: one [`ProgressEvent`] at the start of each
//! phase, posted to [`progress_url`] (beside the report route it was given as `notify_url`)
//! and signed with the build's own key like the report and the logs ([`crate::signature`]).
//!
//! This is the only way the node agent learns a running build's phase: the console is a log a
//! build can print anything into, so nothing read from it changes a build's state. Phases only
//! move forward in pipeline order ([`advances`]); an event that does not is ignored.

use serde::{Deserialize, Serialize};
use url::Url;

use crate::logs::beside_report_route;
use crate::report::Phase;

/// The body of one progress post: build `build_id` started `phase` at `at_unix_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressEvent {
    pub build_id: String,
    pub phase: Phase,
    /// When the guest started the phase (its clock, Unix milliseconds).
    pub at_unix_ms: u64,
}

/// The path the guest posts the progress of build `build_id` to (`{id}` gives the route
/// pattern).
pub fn progress_path(build_id: &str) -> String {
    format!("/v1/internal/builds/{build_id}/progress")
}

/// Where the guest posts its progress: beside the report, when `notify_url` is the node agent's
/// report route of this build ([`crate::logs::report_path`]); else nowhere (a webhook of the
/// requester's own gets the report only).
pub fn progress_url(notify_url: &Url, build_id: &str) -> Option<Url> {
    beside_report_route(notify_url, build_id, &progress_path(build_id))
}

/// Whether a build whose last recorded phase is `last` may move to `next`: only strictly
/// forward in pipeline order, so a repeated, late or reordered event changes nothing.
pub fn advances(last: Option<Phase>, next: Phase) -> bool {
    last.is_none_or(|last| next > last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::report_path;

    #[test]
    fn progress_goes_beside_the_node_agents_report_route_only() {
        let report =
            Url::parse(&format!("http://10.200.0.1:7071{}?x=1", report_path("b1"))).unwrap();
        assert_eq!(
            progress_url(&report, "b1").unwrap().as_str(),
            "http://10.200.0.1:7071/v1/internal/builds/b1/progress"
        );
        assert_eq!(progress_url(&report, "b2"), None);
        let hook = Url::parse("https://ci.example/hooks/build").unwrap();
        assert_eq!(progress_url(&hook, "b1"), None);
    }

    #[test]
    fn phases_only_move_forward() {
        assert!(advances(None, Phase::Clone));
        assert!(advances(Some(Phase::Clone), Phase::Checkout));
        assert!(advances(Some(Phase::Build), Phase::Upload));
        assert!(!advances(Some(Phase::Upload), Phase::Upload));
        assert!(!advances(Some(Phase::Upload), Phase::Build));
        assert!(!advances(Some(Phase::Notify), Phase::Params));
    }

    #[test]
    fn events_are_strict_json() {
        let event = ProgressEvent {
            build_id: "b1".into(),
            phase: Phase::Upload,
            at_unix_ms: 5,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(json, r#"{"build_id":"b1","phase":"upload","at_unix_ms":5}"#);
        assert_eq!(serde_json::from_str::<ProgressEvent>(&json).unwrap(), event);
        assert!(serde_json::from_str::<ProgressEvent>(
            r#"{"build_id":"b1","phase":"upload","at_unix_ms":5,"state":"succeeded"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ProgressEvent>(
            r#"{"build_id":"b1","phase":"deploy","at_unix_ms":5}"#
        )
        .is_err());
    }
}
