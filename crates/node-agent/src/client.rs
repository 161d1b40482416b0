//! The CLI's side of the API: `submit` (uploading a local directory first), `status`, `list`,
//! `cancel`, `logs`, talking to a node agent over HTTP or HTTPS (trusting `--ca-file` besides
//! the public roots) with the bearer token. `submit --wait` prints a line per state and phase
//! (indicatif) and streams the build's console log.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use builder_contract::LogSource;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{BuildList, BuildView, CacheList, CacheView, ErrorBody, Submitted};
use crate::model::{BuildRequest, BuildState};
use crate::sources::Uploaded;

/// How the CLI reaches the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Base URL of the node agent.
    #[arg(
        long,
        env = "NODE_AGENT_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub server: url::Url,
    /// File holding the API token (the daemon's `api_token_file`).
    #[arg(
        long,
        env = "NODE_AGENT_API_TOKEN_FILE",
        default_value = "/var/lib/node-agent/api-token",
        global = true
    )]
    pub token_file: PathBuf,
    /// PEM certificate(s) of the CA that signed the node agent's HTTPS certificate (a
    /// self-signed certificate is its own CA), trusted besides the public roots.
    #[arg(long, env = "NODE_AGENT_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

pub struct Client {
    http: reqwest::Client,
    base: url::Url,
    token: String,
}

/// Which builds `list` asks for (`GET /v1/builds`); `None` leaves a filter out.
#[derive(Debug, Default)]
pub struct ListQuery<'a> {
    pub state: Option<&'a str>,
    pub requester: Option<&'a str>,
    /// Text the repository URL contains (any case).
    pub repo: Option<&'a str>,
    pub limit: u32,
    pub cursor: Option<&'a str>,
}

impl Client {
    pub fn new(c: &Connection) -> Result<Self> {
        let token = std::fs::read_to_string(&c.token_file).with_context(|| {
            format!("cannot read the API token file {}", c.token_file.display())
        })?;
        let mut http = reqwest::Client::builder();
        if let Some(path) = &c.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("the CA file {} is not PEM certificates", path.display())
            })?;
            if certs.is_empty() {
                bail!("the CA file {} holds no PEM certificate", path.display());
            }
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Client {
            http: http.build().context("cannot set up the HTTP client")?,
            base: c.server.clone(),
            token: token.trim().to_string(),
        })
    }

    fn url(&self, path: &str) -> Result<url::Url> {
        self.base
            .join(path)
            .with_context(|| format!("cannot make a URL from {} and {path}", self.base))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = match request.bearer_auth(&self.token).send().await {
            Ok(response) => response,
            Err(e) if self.base.scheme() == "https" && is_certificate_error(&e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the node agent at {} presented a TLS certificate this client does not \
                     trust: give the CA that signed it (or the self-signed certificate) with \
                     --ca-file or NODE_AGENT_CA_FILE",
                    self.base
                )))
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot reach the node agent at {}", self.base)))
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => bail!("the node agent answered {status}: {}", e.error),
            Err(_) => bail!("the node agent answered {status}: {text}"),
        }
    }

    pub async fn submit(&self, request: &BuildRequest) -> Result<Submitted> {
        let r = self
            .send(self.http.post(self.url("/v1/builds")?).json(request))
            .await?;
        r.json()
            .await
            .context("the node agent's answer to a submit is not valid")
    }

    /// Uploads a git bundle (see [`crate::local_source`]) as a source builds can clone.
    pub async fn upload_source(&self, bundle: Vec<u8>) -> Result<Uploaded> {
        let r = self
            .send(
                self.http
                    .post(self.url("/v1/sources")?)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-git-bundle")
                    .body(bundle),
            )
            .await?;
        r.json()
            .await
            .context("the node agent's answer to a source upload is not valid")
    }

    pub async fn status(&self, id: &str) -> Result<BuildView> {
        let r = self
            .send(self.http.get(self.url(&format!("/v1/builds/{id}"))?))
            .await?;
        r.json()
            .await
            .context("the node agent's build status is not valid")
    }

    pub async fn list(&self, query: &ListQuery<'_>) -> Result<BuildList> {
        let mut url = self.url("/v1/builds")?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &query.limit.to_string());
            for (key, value) in [
                ("state", query.state),
                ("requester", query.requester),
                ("repo", query.repo),
                ("cursor", query.cursor),
            ] {
                if let Some(value) = value {
                    q.append_pair(key, value);
                }
            }
        }
        let r = self.send(self.http.get(url)).await?;
        r.json()
            .await
            .context("the node agent's build list is not valid")
    }

    pub async fn cancel(&self, id: &str) -> Result<Submitted> {
        let r = self
            .send(
                self.http
                    .post(self.url(&format!("/v1/builds/{id}/cancel"))?),
            )
            .await?;
        r.json()
            .await
            .context("the node agent's answer to a cancel is not valid")
    }

    /// The build caches the token sees: its namespace's; an admin's all, or `namespace`'s.
    pub async fn caches(&self, namespace: Option<&str>) -> Result<CacheList> {
        let mut url = self.url("/v1/caches")?;
        if let Some(namespace) = namespace {
            url.query_pairs_mut().append_pair("namespace", namespace);
        }
        let r = self.send(self.http.get(url)).await?;
        r.json()
            .await
            .context("the node agent's cache list is not valid")
    }

    /// Deletes a build cache's committed disk; answers what it was.
    pub async fn delete_cache(&self, id: &str) -> Result<CacheView> {
        let r = self
            .send(self.http.delete(self.url(&format!("/v1/caches/{id}"))?))
            .await?;
        r.json()
            .await
            .context("the node agent's answer to a cache delete is not valid")
    }

    /// Streams log `source` to `out` line by line until the build ends (or now, without
    /// `follow`; only the console is followed).
    pub async fn logs(
        &self,
        id: &str,
        source: LogSource,
        follow: bool,
        mut out: impl FnMut(&str),
    ) -> Result<()> {
        let url = self.url(&format!(
            "/v1/builds/{id}/logs?source={source}&follow={follow}"
        ))?;
        let mut stream = self.send(self.http.get(url)).await?.bytes_stream();
        let mut pending = String::new();
        while let Some(chunk) = stream.next().await {
            pending.push_str(&String::from_utf8_lossy(
                &chunk.context("the log stream broke")?,
            ));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                out(line.trim_end());
            }
        }
        if !pending.is_empty() {
            out(&pending);
        }
        Ok(())
    }

    /// Follows a build to its end, a progress line per state/phase and the log streamed.
    pub async fn wait(&self, id: &str) -> Result<BuildView> {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let log_bar = bar.clone();
        let logs = self.logs(id, LogSource::Console, true, move |line| {
            say(&log_bar, format!("  | {line}"))
        });
        tokio::pin!(logs);
        let mut logs_done = false;
        let mut last = String::new();
        loop {
            let view = self.status(id).await?;
            let now = format!(
                "{}{}",
                view.state,
                view.phase
                    .as_deref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
            if now != last {
                if !last.is_empty() {
                    say(&bar, format!("✓ {last}"));
                }
                bar.set_message(now.clone());
                last = now;
            }
            if view.state.is_terminal() {
                if !logs_done {
                    // The log ends on its own once the build is terminal.
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut logs).await;
                }
                bar.finish_with_message(last);
                return Ok(view);
            }
            tokio::select! {
                r = &mut logs, if !logs_done => {
                    logs_done = true;
                    if let Err(e) = r {
                        say(&bar, format!("(log stream ended: {e:#})"));
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// Whether a failed request failed on the server's certificate (rustls' verdict somewhere in
/// its cause chain).
fn is_certificate_error(error: &reqwest::Error) -> bool {
    crate::find_cause::<rustls::Error>(error).is_some_and(|e| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
        )
    })
}

/// A line above the progress bar, or on stdout when there is no terminal to draw it on.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// One line per build for `list`.
pub fn summary(b: &BuildView) -> String {
    format!(
        "{}  {:<10} {:<8} {}@{}{}",
        b.id,
        b.state.as_str(),
        b.phase.as_deref().unwrap_or("-"),
        b.repo_url,
        b.revision,
        b.error
            .as_ref()
            .and_then(|e| e.message.as_deref())
            .map(|m| format!("  ({})", m.lines().next().unwrap_or("")))
            .unwrap_or_default()
    )
}

/// The build cache line of `status`: outcome, key and id.
pub fn cache_summary(b: &BuildView) -> Option<String> {
    let c = b.cache.as_ref()?;
    Some(format!(
        "cache: {} key {} id {}",
        c.outcome,
        c.key.as_deref().unwrap_or("-"),
        c.id.as_deref().unwrap_or("-")
    ))
}

/// One line per cache for `cache list`.
pub fn cache_line(c: &CacheView) -> String {
    format!(
        "{}  {:>12} bytes  {} commits  {}/{}",
        c.id, c.bytes, c.commits, c.namespace, c.name
    )
}

/// Exit status of `submit --wait` and `status`: 0 succeeded, 1 failed for the user's reasons,
/// 2 otherwise.
pub fn exit_code(b: &BuildView) -> i32 {
    match b.state {
        BuildState::Succeeded => 0,
        BuildState::Failed | BuildState::TimedOut | BuildState::Cancelled
            if b.error.as_ref().and_then(|e| e.class.as_deref()) == Some("user") =>
        {
            1
        }
        _ if !b.state.is_terminal() => 0,
        _ => 2,
    }
}
