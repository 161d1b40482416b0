//! node-agent: the build service of one host. It takes build requests over HTTP, keeps them in
//! a durable queue (SQLite, or PostgreSQL shared by several hosts), starts one builder VM per
//! build within the host's capacity, supervises it until its signed report arrives or it dies,
//! times out or is cancelled, and sends the requester exactly one final webhook.

pub mod api;
pub mod cache;
pub mod client;
pub mod config;
pub mod credentials;
pub mod dashboard;
pub mod db;
pub mod flags;
pub mod local_source;
pub mod logs;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod node;
pub mod notify;
pub mod sources;
pub mod tls;
pub mod tokens;
pub mod uploads;
pub mod vm;
pub mod vmm;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `bytes` random bytes from the OS, hex-encoded.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("the OS random source works");
    hex::encode(buf)
}

/// A new build id: creation time then randomness, so ids sort in submission order.
pub fn new_build_id() -> String {
    format!("{:012x}{}", now_ms(), random_hex(6))
}

/// An error and its causes, joined with `: `.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The first error of type `T` in `error`'s cause chain, looking inside `io::Error`s too (whose
/// `source` skips the error they wrap).
pub fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        next = wrapped.or_else(|| e.source());
    }
    None
}

/// Runs the API and the scheduler on `listener` (HTTPS when the node has `tls_cert_file` and
/// `tls_key_file`, see [`tls`]) until `shutdown` resolves, then drains (stops admitting, lets
/// running builds finish within the grace period, cancels the rest) while the API keeps
/// answering, so late reports still arrive.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    node: std::sync::Arc<node::Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Before anything starts: a node with unusable TLS files does not serve at all.
    let tls = match &node.config.tls {
        Some(files) => Some(tls::server_config(files).map_err(std::io::Error::other)?),
        None => None,
    };
    let sources = std::sync::Arc::new(
        sources::Sources::new(node.config.sources_dir(), node.config.vm_base_url())
            .map_err(std::io::Error::other)?,
    );
    sweep_sources(&sources, &node).await;
    if node.config.per_vm_listener() {
        node.set_vm_routes(Some(vm::VmRoutes::new(
            api::vm_router(node.clone(), sources.clone()),
            vm::VmListenerLimits::of(&node.config),
        )));
    }
    let scheduler = tokio::spawn(node.clone().run());
    let pruner = tokio::spawn(node.clone().prune_forever());
    let sweeper = tokio::spawn(sources.clone().sweep_forever(node.db.clone()));
    let credentials_sweeper = {
        let node = node.clone();
        tokio::spawn(async move { node.credentials.sweep_forever(node.db.clone()).await })
    };
    let app = api::router(node.clone(), sources.clone());
    let drained = {
        let node = node.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining");
            node.drain().await;
            tracing::info!("drained");
        }
    };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(drained)
                .await?
        }
        Some(config) => {
            axum::serve(tls::TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(drained)
                .await?
        }
    }
    scheduler.abort();
    pruner.abort();
    sweeper.abort();
    // The routes hold the node: dropped, nothing holds it in a cycle.
    node.set_vm_routes(None);
    credentials_sweeper.abort();
    sweep_sources(&sources, &node).await;
    Ok(())
}

/// Removes the uploaded sources no build needs any more (at start: what a previous run left).
async fn sweep_sources(sources: &sources::Sources, node: &node::Node) {
    match sources.sweep(&node.db).await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "uploaded sources removed"),
        Err(e) => tracing::warn!(error = error_chain(&e), "cannot sweep uploaded sources"),
    }
}

/// `node-agent serve`: binds the configured address and runs until SIGTERM or SIGINT.
pub async fn serve(node: std::sync::Arc<node::Node>) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let listen = node.config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let scheme = if node.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    match &node.config.callback_url {
        None => tracing::info!(
            %listen,
            scheme,
            vm_listen_port = node.config.vm_listen_port,
            node_id = node.config.node_id,
            "node agent listening; builder VMs are served on the host end of their veth"
        ),
        Some(callback_url) => tracing::info!(
            %listen,
            scheme,
            %callback_url,
            node_id = node.config.node_id,
            "node agent listening; builder VMs reach it at the callback URL"
        ),
    }
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    serve_on(listener, node, shutdown)
        .await
        .context("the HTTP server failed")
}
