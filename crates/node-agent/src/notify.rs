//! The requester's webhook: exactly one per build, the build's final report, signed with its
//! requester's webhook key (the admin's builds with the node's notify secret; see
//! [`crate::tokens`]), same headers and scheme as the guest's report, retried under the shared
//! [`RetryPolicy`] (`builder-retry`: exponential backoff with full jitter, the guest webhook's
//! waits, `webhook_attempts` attempts; 5xx/408/429 and unreachable receivers are retried,
//! honouring `Retry-After`, other answers are final). Delivery state is kept in the build row
//! so a restart resumes it with the attempts left.
//!
//! This module also owns where a webhook may go ([`NotifyAllow`]): private, loopback,
//! link-local, CGNAT, ULA, multicast, unspecified and IPv4-mapped addresses are refused unless
//! the operator allows them (`notify_allow`). A URL whose host is such an address literally is
//! refused at submission ([`NotifyAllow::check_url`]); at delivery the host name is resolved
//! here, every address checked, and the connection pinned to the checked ones (no proxy, no
//! redirects), so a name that resolves elsewhere by then (DNS rebinding) gains nothing. What
//! the receiver answered stays in the node's log: the build row (API, dashboard) only says
//! delivered, pending or failed and a cause that does not echo the receiver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_retry::{retry, RetryPolicy, Verdict};
use url::{Host, Url};

use crate::db::{BuildRow, Db, Update};

/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// An IP network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| "a CIDR needs a `/PREFIX`".to_string())?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("the prefix must be 0 to {max}"))?;
        Ok(Cidr { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
            let shift = width - u32::from(prefix);
            if shift >= 128 {
                0
            } else {
                bits >> shift
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32, self.prefix)
                    == masked(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(net.into(), 128, self.prefix) == masked(ip.into(), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// The ranges a webhook may not reach unless allowed, with what they are.
const RESTRICTED_V4: &[(Ipv4Addr, u8, &str)] = &[
    (
        Ipv4Addr::new(0, 0, 0, 0),
        8,
        "unspecified (\"this network\")",
    ),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private"),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "CGNAT"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol assignments"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved or broadcast"),
];

const RESTRICTED_V6: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "unspecified"),
    (Ipv6Addr::LOCALHOST, 128, "loopback"),
    (
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
        96,
        "IPv4-mapped",
    ),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96, "IPv4-compatible"),
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96, "NAT64"),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "ULA"),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "site-local"),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast"),
];

/// What kind of restricted address `ip` is, or `None` for one a webhook may reach.
pub fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(_) => RESTRICTED_V4.iter().find_map(|(net, prefix, kind)| {
            let cidr = Cidr {
                addr: IpAddr::V4(*net),
                prefix: *prefix,
            };
            cidr.contains(ip).then_some(*kind)
        }),
        IpAddr::V6(_) => RESTRICTED_V6.iter().find_map(|(net, prefix, kind)| {
            let cidr = Cidr {
                addr: IpAddr::V6(*net),
                prefix: *prefix,
            };
            cidr.contains(ip).then_some(*kind)
        }),
    }
}

/// The operator's exceptions to the address policy (`notify_allow`): networks, and host names
/// whose addresses are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyAllow {
    networks: Vec<Cidr>,
    hosts: Vec<String>,
}

/// A webhook target the address policy refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{host} is a {kind} address; this node sends webhooks to such addresses only when its \
     `notify_allow` lists them"
)]
pub struct RestrictedTarget {
    pub host: String,
    pub kind: &'static str,
}

impl NotifyAllow {
    /// `notify_allow`'s entries: CIDRs (`10.1.0.0/16`, `fd00::/8`; a bare address is one
    /// host) or host names. A bad entry is given back with why.
    pub fn parse(entries: &[String]) -> Result<Self, (String, String)> {
        let mut allow = NotifyAllow::default();
        for entry in entries {
            let text = entry.trim();
            let bad = |reason: String| (entry.clone(), reason);
            if text.contains('/') {
                allow.networks.push(Cidr::parse(text).map_err(bad)?);
            } else if let Ok(ip) = text.parse::<IpAddr>() {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                allow.networks.push(Cidr { addr: ip, prefix });
            } else {
                match Host::parse(text) {
                    Ok(Host::Domain(name)) if !name.is_empty() => allow.hosts.push(name),
                    _ => return Err(bad("not a CIDR, an IP address or a host name".into())),
                }
            }
        }
        Ok(allow)
    }

    fn allows_host(&self, name: &str) -> bool {
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// Whether a webhook may connect to `ip`: not restricted, or in an allowed network.
    pub fn allows_addr(&self, ip: IpAddr) -> Result<(), &'static str> {
        match restricted(ip) {
            Some(kind) if !self.networks.iter().any(|n| n.contains(ip)) => Err(kind),
            _ => Ok(()),
        }
    }

    /// The check at submission: a URL whose host is literally a restricted address (and not
    /// allowed) is refused; host names are checked when the webhook is sent.
    pub fn check_url(&self, url: &Url) -> Result<(), RestrictedTarget> {
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(Host::Domain(_)) | None => return Ok(()),
        };
        self.allows_addr(ip).map_err(|kind| RestrictedTarget {
            host: ip.to_string(),
            kind,
        })
    }
}

/// Why the node's resolver gave a webhook's host no address (an error of its own, found again
/// in the request's error chain).
#[derive(Debug, thiserror::Error)]
enum ResolveRefusal {
    #[error("cannot resolve the host {host}")]
    Lookup {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} resolves to no address a webhook may reach ({addrs})")]
    Restricted { host: String, addrs: String },
}

/// The webhook client's resolver: the system's, less every address the policy refuses, so the
/// connection goes only to an address checked here (host names listed in `notify_allow` keep
/// all theirs). IP-literal hosts never reach a resolver; [`Webhooks::attempt_once`] checks
/// those.
struct PolicyResolver {
    allow: NotifyAllow,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // The port is the URL's; the connector sets it on every address.
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|source| ResolveRefusal::Lookup {
                    host: host.clone(),
                    source,
                })?
                .collect();
            if allow.allows_host(&host) {
                return Ok(Box::new(resolved.into_iter()) as reqwest::dns::Addrs);
            }
            let (permitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
                .into_iter()
                .partition(|a| allow.allows_addr(a.ip()).is_ok());
            if permitted.is_empty() {
                let addrs = refused
                    .iter()
                    .map(|a| {
                        let kind = allow.allows_addr(a.ip()).err().unwrap_or("allowed");
                        format!("{}: {kind}", a.ip())
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ResolveRefusal::Restricted { host, addrs }.into());
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("the webhook URL {url} is not valid")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("the webhook to {url} is not sent")]
    Refused {
        url: String,
        #[source]
        source: ResolveRefusal,
    },
    #[error("the webhook to {url} is not sent")]
    Literal {
        url: String,
        #[source]
        source: RestrictedTarget,
    },
    #[error("the request to {url} failed")]
    Send {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        retry_after: Option<String>,
    },
}

impl AttemptError {
    fn verdict(&self) -> Verdict {
        match self {
            AttemptError::Url { .. }
            | AttemptError::Literal { .. }
            | AttemptError::Refused {
                source: ResolveRefusal::Restricted { .. },
                ..
            } => Verdict::Final,
            AttemptError::Refused {
                source: ResolveRefusal::Lookup { .. },
                ..
            }
            | AttemptError::Send { .. } => Verdict::Retry,
            AttemptError::Status {
                status,
                retry_after,
                ..
            } => Verdict::for_http_status(status.as_u16(), retry_after.as_deref()),
        }
    }

    /// What the build row (the requester's view: API, dashboard) says of this failure: the
    /// policy's refusal as it is, the receiver's answer or the network's error not at all (they
    /// would make the node a probe of what a URL reaches). The node's log has the whole error.
    fn for_requester(&self) -> String {
        match self {
            AttemptError::Url { .. } => "the webhook URL is not valid".into(),
            AttemptError::Literal { source, .. } => source.to_string(),
            AttemptError::Refused { source, .. } => match source {
                ResolveRefusal::Lookup { host, .. } => format!("cannot resolve the host {host}"),
                ResolveRefusal::Restricted { host, .. } => format!(
                    "{host} resolves only to addresses webhooks may not reach (private, \
                     loopback, link-local or the like) and the node's `notify_allow` does not \
                     list them"
                ),
            },
            AttemptError::Send { .. } | AttemptError::Status { .. } => {
                "the receiver did not accept the webhook".into()
            }
        }
    }

    /// A failed send, or the resolver's refusal it carries.
    fn of_send(url: &str, error: reqwest::Error) -> Self {
        let refusal = crate::find_cause::<ResolveRefusal>(&error).map(|refusal| match refusal {
            ResolveRefusal::Lookup { host, source } => ResolveRefusal::Lookup {
                host: host.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            ResolveRefusal::Restricted { host, addrs } => ResolveRefusal::Restricted {
                host: host.clone(),
                addrs: addrs.clone(),
            },
        });
        match refusal {
            Some(source) => AttemptError::Refused {
                url: url.to_string(),
                source,
            },
            None => AttemptError::Send {
                url: url.to_string(),
                source: error,
            },
        }
    }
}

/// Sends requester webhooks under the address policy: one client whose resolver checks every
/// address of a host name ([`PolicyResolver`]) and connects only to those it permits, IP
/// literals checked before the request, with no proxy, no redirects followed (a redirect is the
/// receiver's answer, a failure: a webhook URL cannot send the node's signed report on to an
/// address nobody checked) and a 30 s limit per attempt.
#[derive(Clone)]
pub struct Webhooks {
    allow: NotifyAllow,
    http: reqwest::Client,
}

impl Webhooks {
    pub fn new(allow: NotifyAllow) -> Self {
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(std::sync::Arc::new(PolicyResolver {
                allow: allow.clone(),
            }))
            .build()
            .expect("a plain HTTP client builds");
        Webhooks { allow, http }
    }

    async fn attempt_once(
        &self,
        url: &str,
        body: &[u8],
        secret: &[u8],
    ) -> Result<(), AttemptError> {
        let parsed = Url::parse(url).map_err(|source| AttemptError::Url {
            url: url.to_string(),
            source,
        })?;
        self.allow
            .check_url(&parsed)
            .map_err(|source| AttemptError::Literal {
                url: url.to_string(),
                source,
            })?;
        let timestamp = (crate::now_ms() / 1000) as u64;
        let response = self
            .http
            .post(parsed)
            .header("content-type", "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(secret, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| AttemptError::of_send(url, e))?;
        if !response.status().is_success() {
            return Err(AttemptError::Status {
                url: url.to_string(),
                status: response.status(),
                retry_after: response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            });
        }
        Ok(())
    }
}

/// Delivers a finished build's report to its `notify_url`, signed with `secret` (its
/// requester's key), recording every attempt; `attempts` counts those a previous run of the
/// node made too.
pub async fn deliver(webhooks: &Webhooks, db: &Db, row: &BuildRow, secret: &[u8], attempts: u32) {
    let (Some(url), Some(body)) = (&row.notify_url, &row.report) else {
        return;
    };
    let made_before = u32::try_from(row.webhook_attempts).unwrap_or(0);
    let policy = RetryPolicy {
        attempts: attempts.saturating_sub(made_before),
        ..RetryPolicy::default()
    };
    let record = |state: &'static str, attempt: u32, error: Option<String>| async move {
        let update = Update::default()
            .set("webhook_state", state)
            .set("webhook_attempts", i64::from(made_before + attempt))
            .set("webhook_error", error);
        if let Err(e) = db.update(&row.id, update).await {
            tracing::error!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot record a webhook attempt"
            );
        }
    };
    let send = |attempt| async move {
        let result = webhooks.attempt_once(url, body.as_bytes(), secret).await;
        match &result {
            Ok(()) => record("delivered", attempt, None).await,
            Err(e) => record("pending", attempt, Some(e.for_requester())).await,
        }
        result.map(|()| attempt)
    };
    let result = retry(&policy, send, AttemptError::verdict, |retrying| {
        tracing::warn!(
            build_id = row.id,
            attempts = made_before + retrying.attempt,
            error = crate::error_chain(retrying.error),
            retry_in_ms = retrying.delay.as_millis() as u64,
            "requester webhook failed"
        );
    })
    .await;
    match result {
        Ok(attempt) => tracing::info!(
            build_id = row.id,
            attempts = made_before + attempt,
            "requester webhook delivered"
        ),
        Err(gave_up) => {
            record(
                "failed",
                gave_up.attempts,
                Some(gave_up.error.for_requester()),
            )
            .await;
            tracing::error!(
                build_id = row.id,
                attempts = made_before + gave_up.attempts,
                error = crate::error_chain(&gave_up.error),
                "requester webhook abandoned"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::StatusCode;

    use super::*;
    use crate::db::NewBuild;
    use crate::model::BuildRequest;

    /// The webhooks of a node whose `notify_allow` lists loopback, where the receivers are.
    fn loopback_allowed() -> Webhooks {
        Webhooks::new(NotifyAllow::parse(&["127.0.0.0/8".into()]).unwrap())
    }

    /// A receiver on loopback answering `statuses` in turn (the last one from then on); returns
    /// its URL and the number of requests it got.
    async fn scripted_receiver(statuses: &[u16]) -> (String, Arc<Mutex<usize>>) {
        let statuses = statuses.to_vec();
        let hits = Arc::new(Mutex::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let mut hits = counter.lock().unwrap();
                let status = statuses[(*hits).min(statuses.len() - 1)];
                *hits += 1;
                async move { StatusCode::from_u16(status).unwrap() }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, hits)
    }

    /// A finished build with a report for `url`, `made` deliveries already attempted.
    async fn finished_build(db: &Db, url: &str, made: i64) -> BuildRow {
        let request: BuildRequest = serde_json::from_value(serde_json::json!(
            {"repo_url": "https://g.example/r", "ref": "main", "notify_url": url}
        ))
        .unwrap();
        let row = db
            .insert(&NewBuild {
                id: crate::new_build_id(),
                request,
                credentials: Default::default(),
                pinned_node: None,
                requester: "t".into(),
                revision: "main".into(),
                timeout_s: 60,
                created_at_ms: crate::now_ms(),
            })
            .await
            .unwrap();
        let update = Update::default()
            .set("report", "{\"status\":\"failed\"}")
            .set("webhook_attempts", made);
        db.update(&row.id, update).await.unwrap();
        db.get(&row.id).await.unwrap().unwrap()
    }

    /// Delivers with `attempts` allowed; returns the row's webhook state, attempts and the
    /// receiver's hits.
    async fn deliver_to(statuses: &[u16], made: i64, attempts: u32) -> (String, i64, usize) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let (hook, hits) = scripted_receiver(statuses).await;
        let row = finished_build(&db, &hook, made).await;
        deliver(&loopback_allowed(), &db, &row, b"key", attempts).await;
        let row = db.get(&row.id).await.unwrap().unwrap();
        let hits = *hits.lock().unwrap();
        (row.webhook_state, row.webhook_attempts, hits)
    }

    #[tokio::test]
    async fn transient_answers_are_retried_until_delivered() {
        let (state, attempts, hits) = deliver_to(&[503, 429, 204], 0, 8).await;
        assert_eq!((state.as_str(), attempts, hits), ("delivered", 3, 3));
    }

    #[tokio::test]
    async fn a_refusal_is_final_at_once() {
        let (state, attempts, hits) = deliver_to(&[400, 204], 0, 8).await;
        assert_eq!((state.as_str(), attempts, hits), ("failed", 1, 1));
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (elsewhere, elsewhere_hits) = scripted_receiver(&[204]).await;
        let hits = Arc::new(Mutex::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                *counter.lock().unwrap() += 1;
                let to = elsewhere.clone();
                async move { (StatusCode::TEMPORARY_REDIRECT, [("location", to)]) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let row = finished_build(&db, &hook, 0).await;
        deliver(&loopback_allowed(), &db, &row, b"key", 8).await;
        let row = db.get(&row.id).await.unwrap().unwrap();
        assert_eq!(row.webhook_state, "failed");
        assert_eq!(*hits.lock().unwrap(), 1);
        assert_eq!(
            *elsewhere_hits.lock().unwrap(),
            0,
            "the redirect was followed"
        );
    }

    #[test]
    fn restricted_addresses_are_refused_unless_allowed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("10.9.8.7", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified (\"this network\")"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved or broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:8.8.8.8", "IPv4-mapped"),
            ("fd12::1", "ULA"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
        ] {
            assert_eq!(restricted(ip(addr)), Some(kind), "{addr}");
        }
        for public in [
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "198.18.0.1",
            "2001:4860::8888",
        ] {
            assert_eq!(restricted(ip(public)), None, "{public}");
        }
        let allow =
            NotifyAllow::parse(&["10.1.0.0/16".into(), "::1".into(), "hooks.internal".into()])
                .unwrap();
        assert!(allow.allows_addr(ip("10.1.2.3")).is_ok());
        assert_eq!(allow.allows_addr(ip("10.2.0.1")), Err("private"));
        assert!(allow.allows_addr(ip("::1")).is_ok());
        assert!(allow.allows_host("HOOKS.internal"));
        let check = |u: &str| allow.check_url(&Url::parse(u).unwrap());
        assert!(check("http://10.1.0.5/h").is_ok());
        assert!(check("http://hooks.internal/h").is_ok());
        assert!(
            check("http://localhost/h").is_ok(),
            "names are checked at delivery"
        );
        let refused = check("http://[::ffff:10.1.0.5]/h").unwrap_err();
        assert_eq!(refused.kind, "IPv4-mapped");
        assert!(
            check("http://0x7f.1/h").is_err(),
            "127.0.0.1 spelled otherwise"
        );
        for bad in ["10.0.0.0/33", "10.0.0.0/x", "not a host!", ""] {
            assert!(NotifyAllow::parse(&[bad.into()]).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_delivery_unless_allowed() {
        let (hook, hits) = scripted_receiver(&[204]).await;
        let by_name = hook.replace("127.0.0.1", "localhost");
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let row = finished_build(&db, &by_name, 0).await;
        deliver(&Webhooks::new(NotifyAllow::default()), &db, &row, b"key", 8).await;
        let got = db.get(&row.id).await.unwrap().unwrap();
        assert_eq!(
            (got.webhook_state.as_str(), got.webhook_attempts),
            ("failed", 1)
        );
        assert_eq!(*hits.lock().unwrap(), 0);
        // Allowed by name: its addresses are not checked.
        let row = finished_build(&db, &by_name, 0).await;
        let allow = NotifyAllow::parse(&["localhost".into()]).unwrap();
        deliver(&Webhooks::new(allow), &db, &row, b"key", 8).await;
        let got = db.get(&row.id).await.unwrap().unwrap();
        assert_eq!(got.webhook_state, "delivered");
        assert_eq!(*hits.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_restart_resumes_with_the_attempts_left() {
        // 3 of 4 attempts were made before the restart: one more, then it is given up.
        let (state, attempts, hits) = deliver_to(&[503], 3, 4).await;
        assert_eq!((state.as_str(), attempts, hits), ("failed", 4, 1));
    }
}
