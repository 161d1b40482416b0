//! The dashboard: a small server-rendered web UI at `/` for operators who want to look rather
//! than query. It owns its pages ([`pages`]: the builds list with filters and paging, a build's
//! parameters, timeline, result and live console log, the node's capacity over time), their
//! login ([`auth`]: the API token exchanged for an HMAC-derived session cookie, or a one-time
//! login link), the capacity sampler and its bounded ring ([`capacity`]) and its two assets,
//! compiled in: no CDN, no external fonts, no inline script or style, which its
//! `Content-Security-Policy` enforces. Every value shown is escaped ([`html::Esc`]): build
//! fields and logs come from whoever submitted the build. It reads builds through
//! [`crate::db::Db`]'s public queries and [`crate::api::BuildView`].

mod auth;
mod capacity;
mod html;
mod pages;
mod timeline;

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::db::DbError;
use crate::node::Node;

const CSS: &str = include_str!("dashboard.css");
const JS: &str = include_str!("dashboard.js");
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// What the dashboard's handlers share.
struct Dashboard {
    node: Arc<Node>,
    links: auth::LoginLinks,
    capacity: capacity::History,
}

#[derive(Debug, thiserror::Error)]
enum DashboardError {
    #[error("no build has the id {id}")]
    NotFound { id: String },
    #[error("invalid query: {0}")]
    Query(String),
    #[error("the database failed")]
    Db(#[from] DbError),
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let status = match self {
            DashboardError::NotFound { .. } => StatusCode::NOT_FOUND,
            DashboardError::Query(_) => StatusCode::BAD_REQUEST,
            DashboardError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = crate::error_chain(&self);
        if status.is_server_error() {
            tracing::error!(error = message, "dashboard request failed");
        }
        (status, Html(html::error_page(&message))).into_response()
    }
}

/// The dashboard's routes, to merge into the API's router; starts the capacity sampler, which
/// ends when the router is dropped. Must be called within the Tokio runtime.
pub fn router<S: Clone + Send + Sync + 'static>(node: Arc<Node>) -> Router<S> {
    let dashboard = Arc::new(Dashboard {
        node,
        links: auth::LoginLinks::default(),
        capacity: capacity::History::default(),
    });
    tokio::spawn(capacity::sample_forever(Arc::downgrade(&dashboard)));
    let pages = Router::new()
        .route("/", get(pages::builds))
        .route("/ui/builds/{id}", get(pages::build))
        .route("/ui/builds/{id}/log", get(pages::log_chunk))
        .route("/ui/node", get(pages::node))
        .route_layer(middleware::from_fn_with_state(
            dashboard.clone(),
            auth::require_session,
        ));
    Router::new()
        .merge(pages)
        .route("/ui/login", get(auth::login_page).post(auth::login))
        .route("/ui/login/{link}", get(auth::login_link))
        .route("/ui/login-links", post(auth::mint_link))
        .route("/ui/logout", post(auth::logout))
        .route(
            "/ui/assets/dashboard.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS) }),
        )
        .route(
            "/ui/assets/dashboard.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    JS,
                )
            }),
        )
        .layer(middleware::map_response(security_headers))
        .with_state(dashboard)
}

/// Every dashboard answer: the CSP, no framing, no sniffing, no referrer (a login link's id
/// stays out of other sites' logs), no caching.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
