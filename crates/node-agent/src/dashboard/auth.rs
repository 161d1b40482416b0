//! Who may see the dashboard: whoever holds the API token. The login form (or a one-time login
//! link minted with the bearer token) exchanges it for a session cookie (HttpOnly,
//! SameSite=Strict) whose value is an expiry and an HMAC-SHA256 of it keyed with the token, so
//! the cookie never carries the token, needs no server-side store, and every session ends when
//! the token changes. Tokens are checked by the API's own check ([`crate::api::is_api_token`]),
//! session tags through `hmac`'s `verify_slice`, both in constant time.

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

const COOKIE: &str = "node_agent_session";
/// How long a session lasts.
const SESSION_S: i64 = 12 * 3600;
/// How long a login link can be used (once).
const LINK_MS: i64 = 60_000;
/// At most this many unused login links are kept; minting more drops the oldest.
const MAX_LINKS: usize = 64;

fn mac(key: &str, message: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(message.as_bytes());
    mac
}

fn session_label(expires_s: i64) -> String {
    format!("node-agent dashboard session until {expires_s}")
}

/// A cookie value: `EXPIRES.HEX(HMAC(token, label(EXPIRES)))`.
fn new_session(token: &str) -> String {
    let expires_s = crate::now_ms() / 1000 + SESSION_S;
    let tag = mac(token, &session_label(expires_s))
        .finalize()
        .into_bytes();
    format!("{expires_s}.{}", hex::encode(tag))
}

fn session_is_valid(token: &str, value: &str) -> bool {
    let Some((expires, tag)) = value.split_once('.') else {
        return false;
    };
    let (Ok(expires_s), Ok(tag)) = (expires.parse::<i64>(), hex::decode(tag)) else {
        return false;
    };
    expires_s > crate::now_ms() / 1000
        && mac(token, &session_label(expires_s))
            .verify_slice(&tag)
            .is_ok()
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

/// A 303 to `next` that sets a new session cookie.
fn logged_in(token: &str, next: &str) -> Response {
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_S}",
        new_session(token)
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
    if session_cookie(request.headers())
        .is_some_and(|value| session_is_valid(&dash.node.api_token, value))
    {
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
    if !crate::api::is_api_token(&dash.node, &token) {
        tracing::warn!(target: "audit", "dashboard login refused: wrong token");
        return login_refused(next, "That is not this node's API token.");
    }
    logged_in(&dash.node.api_token, next)
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

/// Login links not used yet: random id → expiry (ms).
#[derive(Default)]
pub(super) struct LoginLinks(Mutex<HashMap<String, i64>>);

impl LoginLinks {
    fn mint(&self) -> String {
        let now = crate::now_ms();
        let mut links = self.0.lock().expect("login links lock");
        links.retain(|_, expires| *expires > now);
        while links.len() >= MAX_LINKS {
            let oldest = links
                .iter()
                .min_by_key(|(_, expires)| **expires)
                .map(|(id, _)| id.clone())
                .expect("a full map has entries");
            links.remove(&oldest);
        }
        let id = crate::random_hex(16);
        links.insert(id.clone(), now + LINK_MS);
        id
    }

    /// Whether `id` is an unexpired link; either way it cannot be used again.
    fn redeem(&self, id: &str) -> bool {
        let expires = self.0.lock().expect("login links lock").remove(id);
        expires.is_some_and(|e| e > crate::now_ms())
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
    if !crate::api::bearer_is_api_token(&dash.node, &headers) {
        return crate::api::ApiError::Unauthorized.into_response();
    }
    let link = LoginLink {
        path: format!("/ui/login/{}", dash.links.mint()),
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
    if !dash.links.redeem(&id) {
        return login_refused(next, "This login link is unknown, used or expired.");
    }
    logged_in(&dash.node.api_token, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_tied_to_the_token_and_expire() {
        let value = new_session("token-a");
        assert!(!value.contains("token-a"));
        assert!(session_is_valid("token-a", &value));
        assert!(!session_is_valid("token-b", &value));
        let (expires, tag) = value.split_once('.').unwrap();
        let later = format!("{}.{tag}", expires.parse::<i64>().unwrap() + 1);
        assert!(!session_is_valid("token-a", &later), "a changed expiry");
        let past = 1_000_i64;
        let tag = hex::encode(mac("token-a", &session_label(past)).finalize().into_bytes());
        assert!(!session_is_valid("token-a", &format!("{past}.{tag}")));
        assert!(!session_is_valid("token-a", "garbage"));
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
        let id = links.mint();
        assert!(links.redeem(&id));
        assert!(!links.redeem(&id));
        for _ in 0..MAX_LINKS + 5 {
            links.mint();
        }
        assert_eq!(links.0.lock().unwrap().len(), MAX_LINKS);
    }
}
