//! Tells the node agent each phase as it starts: a [`ProgressEvent`] signed with the build's key,
//! posted to the route beside the report's ([`progress_url`]). The node records a build's phase
//! (and `running -> uploading`) only from these, never from the console.
//!
//! Best effort and off the build's path: [`PhaseEvents::started`] only queues the event; one
//! background task posts the queue in order, each event with a few short attempts
//! ([`POLICY`], [`ATTEMPT_TIMEOUT`]), and one that cannot be delivered is logged and skipped.
//! [`PhaseEvents::finish`] waits a bounded time for the queue to drain before the report goes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use builder_contract::progress::progress_url;
use builder_contract::{Phase, ProgressEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use url::Url;

use crate::log::BuildLog;
use crate::notify::{post_signed, RetryPolicy, SignedPost};

/// Attempts per event: a phase is worth less than the report, so few and quick.
pub const POLICY: RetryPolicy = RetryPolicy {
    attempts: 3,
    first_delay: Duration::from_millis(250),
    max_delay: Duration::from_secs(1),
};
/// The limit of one attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// The queue of a build's progress events and the task that posts them.
pub struct PhaseEvents {
    build_id: String,
    queue: mpsc::UnboundedSender<ProgressEvent>,
    task: JoinHandle<()>,
}

impl PhaseEvents {
    /// Starts the poster of build `build_id`'s events; `None` when `notify_url` is not the node
    /// agent's report route of this build (a webhook of the requester's own gets no progress).
    pub fn start(
        log: Arc<BuildLog>,
        notify_url: &Url,
        build_id: &str,
        secret: &str,
    ) -> Option<Self> {
        let url = progress_url(notify_url, build_id)?;
        let secret = secret.as_bytes().to_vec();
        let (queue, mut events) = mpsc::unbounded_channel::<ProgressEvent>();
        let task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let body = serde_json::to_vec(&event).expect("an event always serializes");
                let label = format!("progress ({})", event.phase);
                let sent = post_signed(
                    &log,
                    &SignedPost {
                        url: &url,
                        secret: &secret,
                        body: &body,
                        policy: POLICY,
                        timeout: ATTEMPT_TIMEOUT,
                        what: "progress event",
                        label: &label,
                    },
                )
                .await;
                if let Err(e) = sent {
                    log.line(&format!("warning: {label}: not delivered: {e}"));
                }
            }
        });
        Some(PhaseEvents {
            build_id: build_id.to_string(),
            queue,
            task,
        })
    }

    /// Queues the event that `phase` starts now; returns at once.
    pub fn started(&self, phase: Phase) {
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        // The task ends only when the queue closes, in `finish`, which takes `self`.
        let _ = self.queue.send(ProgressEvent {
            build_id: self.build_id.clone(),
            phase,
            at_unix_ms,
        });
    }

    /// Closes the queue and waits at most `within` for the events still in it; what is left
    /// then is dropped (the report, which follows, tells the outcome anyway).
    pub async fn finish(self, log: &BuildLog, within: Duration) {
        let PhaseEvents { queue, task, .. } = self;
        drop(queue);
        let abort = task.abort_handle();
        if tokio::time::timeout(within, task).await.is_err() {
            abort.abort();
            log.line(&format!(
                "warning: progress: events still unsent after {} s were dropped",
                within.as_secs_f64()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::http::{HeaderMap, StatusCode};
    use builder_contract::logs::report_path;
    use builder_contract::signature::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};

    use super::*;

    type Seen = Arc<Mutex<Vec<(String, ProgressEvent)>>>;

    /// A node stand-in: the progress route answers `status` after verifying the signature.
    async fn node(status: StatusCode) -> (std::net::SocketAddr, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let app = axum::Router::new().route(
            "/v1/internal/builds/{id}/progress",
            axum::routing::post(
                move |axum::extract::Path(id): axum::extract::Path<String>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| {
                    let s = s.clone();
                    async move {
                        let h = |n| headers.get(n).and_then(|v| v.to_str().ok());
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap()
                            .as_secs();
                        verify(
                            b"key",
                            h(TIMESTAMP_HEADER),
                            h(SIGNATURE_HEADER),
                            &body,
                            now,
                            300,
                        )
                        .unwrap();
                        s.lock()
                            .unwrap()
                            .push((id, serde_json::from_slice(&body).unwrap()));
                        status
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, seen)
    }

    #[tokio::test]
    async fn events_are_posted_signed_in_order_and_only_to_the_node() {
        let (addr, seen) = node(StatusCode::NO_CONTENT).await;
        let log = Arc::new(BuildLog::create(None, false).unwrap());
        let report = Url::parse(&format!("http://{addr}{}", report_path("b1"))).unwrap();
        let events = PhaseEvents::start(log.clone(), &report, "b1", "key").unwrap();
        for phase in [Phase::Clone, Phase::Checkout, Phase::Build, Phase::Upload] {
            events.started(phase);
        }
        events.finish(&log, Duration::from_secs(10)).await;
        let seen = seen.lock().unwrap().clone();
        let phases: Vec<Phase> = seen.iter().map(|(_, e)| e.phase).collect();
        assert_eq!(
            phases,
            [Phase::Clone, Phase::Checkout, Phase::Build, Phase::Upload]
        );
        assert!(seen.iter().all(|(id, e)| id == "b1" && e.build_id == "b1"));
        // A webhook of the requester's own gets no progress.
        let hook = Url::parse(&format!("http://{addr}/hook")).unwrap();
        assert!(PhaseEvents::start(log, &hook, "b1", "key").is_none());
    }

    #[tokio::test]
    async fn an_unreachable_node_costs_the_build_at_most_the_bound() {
        let log = Arc::new(BuildLog::create(None, false).unwrap());
        // A port nothing listens on: every attempt is refused at once, then retried.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let report = Url::parse(&format!("http://{addr}{}", report_path("b1"))).unwrap();
        let events = PhaseEvents::start(log.clone(), &report, "b1", "key").unwrap();
        let queued = std::time::Instant::now();
        for phase in [Phase::Clone, Phase::Checkout, Phase::Build] {
            events.started(phase);
        }
        assert!(
            queued.elapsed() < Duration::from_millis(100),
            "queuing is instant"
        );
        let finishing = std::time::Instant::now();
        events.finish(&log, Duration::from_millis(500)).await;
        assert!(finishing.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_refused_event_is_not_retried_and_the_next_still_goes() {
        let (addr, seen) = node(StatusCode::CONFLICT).await;
        let log = Arc::new(BuildLog::create(None, false).unwrap());
        let report = Url::parse(&format!("http://{addr}{}", report_path("b1"))).unwrap();
        let events = PhaseEvents::start(log.clone(), &report, "b1", "key").unwrap();
        events.started(Phase::Clone);
        events.started(Phase::Checkout);
        events.finish(&log, Duration::from_secs(10)).await;
        let phases: Vec<Phase> = seen.lock().unwrap().iter().map(|(_, e)| e.phase).collect();
        assert_eq!(phases, [Phase::Clone, Phase::Checkout]);
    }
}
