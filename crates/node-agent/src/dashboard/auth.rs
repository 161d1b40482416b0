//! Who may see the dashboard: whoever holds an admin token (`api_token_file`'s, or one of the
//! tokens file made with `--admin`; see [`crate::tokens`]). The login form (or a one-time login
//! link minted with the bearer token) exchanges it for a session cookie (HttpOnly,
//! SameSite=Strict, `Secure` when the API serves HTTPS) whose value is the token's name, an
//! expiry and an HMAC-SHA256 of both keyed with the token's SHA-256 (which only the node has),
//! so the cookie never carries the token, needs no server-side store, and every session of a
//! token ends when the token changes or is removed. Tokens are checked by the API's own check
//! ([`crate::api::token_caller`]), session tags through `hmac`'s `verify_slice`, both in
//! constant time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::html;
use super::Dashboard;
use crate::tokens::Caller;

const COOKIE: &str = "node_agent_session";
/// How long a session lasts.
const SESSION_S: i64 = 12 * 3600;
/// How long a login link can be used (once).
const LINK_MS: i64 = 60_000;
/// At most this many unused login links are kept; minting more drops the oldest.
const MAX_LINKS: usize = 64;

fn mac(key: &[u8], message: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(message.as_bytes());
    mac
}

fn session_label(name: &str, expires_s: i64) -> String {
    format!("node-agent dashboard session of {name} until {expires_s}")
}

/// A cookie value: `NAME.EXPIRES.HEX(HMAC(key, label(NAME, EXPIRES)))`, `key` the token's
/// session key ([`Caller::session_key`]).
fn new_session(name: &str, key: &[u8]) -> String {
    let expires_s = crate::now_ms() / 1000 + SESSION_S;
    let tag = mac(key, &session_label(name, expires_s))
        .finalize()
        .into_bytes();
    format!("{name}.{expires_s}.{}", hex::encode(tag))
}

/// The admin a cookie value is a valid session of, if any (`key_of` gives an admin's session
/// key by name).
fn session_of<T>(value: &str, key_of: impl FnOnce(&str) -> Option<(T, [u8; 32])>) -> Option<T> {
    let mut parts = value.rsplitn(3, '.');
    let (Some(tag), Some(expires), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let (Ok(expires_s), Ok(tag)) = (expires.parse::<i64>(), hex::decode(tag)) else {
        return None;
    };
    if expires_s <= crate::now_ms() / 1000 {
        return None;
    }
    let (who, key) = key_of(name)?;
    mac(&key, &session_label(name, expires_s))
        .verify_slice(&tag)
        .is_ok()
        .then_some(who)
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// A path on this site to go to after logging in: anything else (another host, `//host`)
/// becomes `/`, so a login link cannot redirect elsewhere.
fn local_path(next: Option<&str>) -> &str {
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.starts_with("/\\") => p,
        _ => "/",
    }
}

/// A 303 to `next` that sets a new session cookie of `admin`.
fn logged_in(dash: &Dashboard, admin: &Caller, next: &str) -> Response {
    let secure = if dash.node.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_S}{secure}",
        new_session(&admin.name, admin.session_key())
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, next.to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

fn login_refused(next: &str, problem: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(html::login_page(next, Some(problem))),
    )
        .into_response()
}

/// Lets a request with a valid session through; anyone else gets the login page (401), which
/// brings them back here once logged in.
pub(super) async fn require_session(
    State(dash): State<Arc<Dashboard>>,
    request: Request,
    next: Next,
) -> Response {
    let admin = session_cookie(request.headers()).and_then(|value| {
        session_of(value, |name| {
            let admin = dash.node.tokens.admin_named(name)?;
            let key = *admin.session_key();
            Some((admin, key))
        })
    });
    if admin.is_some() {
        return next.run(request).await;
    }
    let here = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    (
        StatusCode::UNAUTHORIZED,
        Html(html::login_page(local_path(Some(&here)), None)),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct NextQuery {
    next: Option<String>,
}

/// `GET /ui/login`.
pub(super) async fn login_page(Query(query): Query<NextQuery>) -> Html<String> {
    Html(html::login_page(local_path(query.next.as_deref()), None))
}

/// `POST /ui/login`: a form with `token` and `next`.
pub(super) async fn login(State(dash): State<Arc<Dashboard>>, body: Bytes) -> Response {
    let mut token = String::new();
    let mut next = None;
    for (key, value) in url::form_urlencoded::parse(&body) {
        match &*key {
            "token" => token = value.trim().to_string(),
            "next" => next = Some(value.into_owned()),
            _ => {}
        }
    }
    let next = local_path(next.as_deref());
    let Some(caller) = crate::api::token_caller(&dash.node, &token) else {
        tracing::warn!(target: "audit", "dashboard login refused: wrong token");
        return login_refused(next, "That is not this node's API token.");
    };
    if !caller.admin {
        tracing::warn!(target: "audit", token = caller.name, "dashboard login refused: not an admin token");
        return login_refused(
            next,
            "That token is not an admin token; the dashboard is for admins.",
        );
    }
    logged_in(&dash, &caller, next)
}

/// `POST /ui/logout`: the browser forgets its session (which stays valid until it expires).
pub(super) async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/ui/login".to_string()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
        ],
    )
        .into_response()
}

/// Login links not used yet: random id → expiry (ms) and the admin who minted it.
#[derive(Default)]
pub(super) struct LoginLinks(Mutex<HashMap<String, (i64, String)>>);

impl LoginLinks {
    fn mint(&self, admin: &str) -> String {
        let now = crate::now_ms();
        let mut links = self.0.lock().expect("login links lock");
        links.retain(|_, (expires, _)| *expires > now);
        while links.len() >= MAX_LINKS {
            let oldest = links
                .iter()
                .min_by_key(|(_, (expires, _))| *expires)
                .map(|(id, _)| id.clone())
                .expect("a full map has entries");
            links.remove(&oldest);
        }
        let id = crate::random_hex(16);
        links.insert(id.clone(), (now + LINK_MS, admin.to_string()));
        id
    }

    /// The admin who minted `id` if it is an unexpired link; either way it cannot be used
    /// again.
    fn redeem(&self, id: &str) -> Option<String> {
        let link = self.0.lock().expect("login links lock").remove(id);
        link.filter(|(expires, _)| *expires > crate::now_ms())
            .map(|(_, admin)| admin)
    }
}

/// The answer of `POST /ui/login-links`.
#[derive(Debug, Serialize)]
struct LoginLink {
    /// Open `{server}{path}` (optionally with `?next=/ui/builds/ID`) in a browser, once.
    path: String,
    expires_in_s: i64,
}

/// `POST /ui/login-links` with the bearer token: a one-time login link, for a browser that
/// should not be handed the token (and for the tests' headless Chromium).
pub(super) async fn mint_link(State(dash): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    let Some(caller) = crate::api::bearer_caller(&dash.node, &headers) else {
        return crate::api::ApiError::Unauthorized.into_response();
    };
    if !caller.admin {
        return crate::api::ApiError::AdminOnly { token: caller.name }.into_response();
    }
    let link = LoginLink {
        path: format!("/ui/login/{}", dash.links.mint(&caller.name)),
        expires_in_s: LINK_MS / 1000,
    };
    (StatusCode::CREATED, Json(link)).into_response()
}

/// `GET /ui/login/{id}?next=PATH`: a one-time link sets the session cookie and goes on.
pub(super) async fn login_link(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    Query(query): Query<NextQuery>,
) -> Response {
    let next = local_path(query.next.as_deref());
    // The minter must still be an admin when the link is used.
    let Some(admin) = dash
        .links
        .redeem(&id)
        .and_then(|name| dash.node.tokens.admin_named(&name))
    else {
        return login_refused(next, "This login link is unknown, used or expired.");
    };
    logged_in(&dash, &admin, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_tied_to_the_token_and_expire() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        // An admin named `ops.team` whose token hashes to `a`.
        let valid = |key: [u8; 32], value: &str| {
            session_of(value, |name| (name == "ops.team").then_some(((), key))).is_some()
        };
        let value = new_session("ops.team", &a);
        assert!(valid(a, &value));
        assert!(!valid(b, &value), "another token");
        let mut parts = value.rsplitn(3, '.');
        let (tag, expires) = (parts.next().unwrap(), parts.next().unwrap());
        let later = format!("ops.team.{}.{tag}", expires.parse::<i64>().unwrap() + 1);
        assert!(!valid(a, &later), "a changed expiry");
        assert!(
            !valid(a, &format!("ops.other.{expires}.{tag}")),
            "another name"
        );
        let past = 1_000_i64;
        let tag = hex::encode(
            mac(&a, &session_label("ops.team", past))
                .finalize()
                .into_bytes(),
        );
        assert!(!valid(a, &format!("ops.team.{past}.{tag}")));
        assert!(!valid(a, "garbage"));
    }

    #[test]
    fn logins_only_go_to_local_paths() {
        assert_eq!(local_path(Some("/ui/builds/1?x=y")), "/ui/builds/1?x=y");
        for p in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "",
        ] {
            assert_eq!(local_path(Some(p)), "/", "{p}");
        }
    }

    #[test]
    fn links_work_once() {
        let links = LoginLinks::default();
        let id = links.mint("api");
        assert_eq!(links.redeem(&id).as_deref(), Some("api"));
        assert_eq!(links.redeem(&id), None);
        for _ in 0..MAX_LINKS + 5 {
            links.mint("api");
        }
        assert_eq!(links.0.lock().unwrap().len(), MAX_LINKS);
    }
}
