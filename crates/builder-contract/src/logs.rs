//! The logs the node agent keeps for each build, and how the guest hands over its own: the
//! source names (one list for the guest, the node's API and its CLI), the routes the guest
//! posts its report and its logs to, and how much of each log the guest sends.
//!
//! The guest posts each of its logs ([`LogSource::GUEST`]) before its report, signed like the
//! report ([`crate::signature`], the build's own key), to [`guest_log_url`]: beside the report
//! route it was given as `notify_url`. A `notify_url` that is not the node agent's report
//! route (a build run on a host, reporting to a webhook of its own) gets no logs.

use std::fmt;

use url::Url;

/// The most of one guest log the guest sends: its last this many bytes.
pub const MAX_GUEST_LOG_BYTES: u64 = 4 << 20;

/// One log of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogSource {
    /// The VM's serial console (the node agent writes it while the VM runs).
    Console,
    /// The VMM's own log: Firecracker's log and the jailer's output, or QEMU's.
    Vmm,
    /// The guest agent's build log (`/var/log/build.log` in the VM).
    Build,
    /// The guest's Docker daemon (`/var/log/dockerd.log` in the VM).
    Dockerd,
}

impl LogSource {
    pub const ALL: [LogSource; 4] = [
        LogSource::Console,
        LogSource::Vmm,
        LogSource::Build,
        LogSource::Dockerd,
    ];
    /// The logs the guest sends; the node keeps the others itself.
    pub const GUEST: [LogSource; 2] = [LogSource::Build, LogSource::Dockerd];

    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Console => "console",
            LogSource::Vmm => "vmm",
            LogSource::Build => "build",
            LogSource::Dockerd => "dockerd",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the guest sends this log.
    pub fn is_guest(self) -> bool {
        Self::GUEST.contains(&self)
    }

    /// The valid names, for error messages: `console, vmm, build, dockerd`.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for LogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The path the guest posts its report of build `build_id` to (`{id}` gives the route
/// pattern).
pub fn report_path(build_id: &str) -> String {
    format!("/v1/internal/builds/{build_id}/complete")
}

/// The path the guest posts log `source` of build `build_id` to (`{id}` and `{source}` give
/// the route pattern).
pub fn log_path(build_id: &str, source: &str) -> String {
    format!("/v1/internal/builds/{build_id}/logs/{source}")
}

/// Where the guest posts its log `source`: beside the report, when `notify_url` is the node
/// agent's report route of this build and `source` is one the guest sends; else nowhere.
pub fn guest_log_url(notify_url: &Url, build_id: &str, source: LogSource) -> Option<Url> {
    if !source.is_guest() {
        return None;
    }
    beside_report_route(notify_url, build_id, &log_path(build_id, source.as_str()))
}

/// `path` on the node agent behind `notify_url`, when `notify_url` is its report route of
/// build `build_id`; else `None`. The one rule of where the guest's other posts (its logs,
/// its progress) go.
pub(crate) fn beside_report_route(notify_url: &Url, build_id: &str, path: &str) -> Option<Url> {
    if notify_url.path() != report_path(build_id) {
        return None;
    }
    let mut url = notify_url.clone();
    url.set_path(path);
    url.set_query(None);
    Some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_ones_do_not() {
        for source in LogSource::ALL {
            assert_eq!(LogSource::parse(source.as_str()), Some(source));
        }
        assert_eq!(LogSource::parse("Console"), None);
        assert_eq!(LogSource::parse("kernel"), None);
        assert_eq!(LogSource::names(), "console, vmm, build, dockerd");
    }

    #[test]
    fn guest_logs_go_beside_the_node_agents_report_route_only() {
        let report = Url::parse("http://10.200.0.1:7071/v1/internal/builds/b1/complete").unwrap();
        assert_eq!(
            guest_log_url(&report, "b1", LogSource::Dockerd)
                .unwrap()
                .as_str(),
            "http://10.200.0.1:7071/v1/internal/builds/b1/logs/dockerd"
        );
        // Another build's route, a webhook elsewhere, a log the node keeps itself: nowhere.
        assert_eq!(guest_log_url(&report, "b2", LogSource::Build), None);
        let hook = Url::parse("https://ci.example/hooks/build").unwrap();
        assert_eq!(guest_log_url(&hook, "b1", LogSource::Build), None);
        assert_eq!(guest_log_url(&report, "b1", LogSource::Console), None);
        assert_eq!(guest_log_url(&report, "b1", LogSource::Vmm), None);
    }
}
