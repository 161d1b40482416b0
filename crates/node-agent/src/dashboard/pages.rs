//! The dashboard's pages: the builds list (filters by state, requester and text in the
//! repository URL; pages of [`PAGE`] newest first), a build's page (parameters without
//! credential values, the timeline, the result and its logs by source, the one shown followed
//! live through [`log_chunk`]) and the node's capacity page.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use builder_contract::{BuildReport, LogSource};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::capacity::{self, Series};
use super::html::{self, Esc, Nav};
use super::timeline;
use super::{Dashboard, DashboardError};
use crate::api::BuildView;
use crate::db::{BuildFilter, BuildRow, Db};
use crate::model::BuildState;

/// Builds on one page of the list.
const PAGE: u32 = 50;
/// The most of a log a page or one [`log_chunk`] carries.
const LOG_CHUNK: u64 = 256 * 1024;
/// How long [`log_chunk`] waits for new output of a running build before answering empty.
const LOG_WAIT: Duration = Duration::from_secs(5);
const LOG_POLL: Duration = Duration::from_millis(200);

/// The list's filters and position, as the filter form sends them.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    requester: Option<String>,
    repo: Option<String>,
    cursor: Option<String>,
}

/// The list's filters; the database applies them.
struct Filter(BuildFilter);

impl Filter {
    fn new(query: &ListQuery) -> Result<Self, DashboardError> {
        fn given(v: &Option<String>) -> Option<&str> {
            v.as_deref().map(str::trim).filter(|v| !v.is_empty())
        }
        let state = given(&query.state)
            .map(|s| {
                BuildState::parse(s)
                    .ok_or_else(|| DashboardError::Query(format!("{s:?} is not a build state")))
            })
            .transpose()?;
        Ok(Filter(BuildFilter {
            state,
            requester: given(&query.requester).map(str::to_string),
            repo_contains: given(&query.repo).map(str::to_string),
        }))
    }

    /// The query string of this filter at `cursor`.
    fn query(&self, cursor: Option<&str>) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(s) = self.0.state {
            q.append_pair("state", s.as_str());
        }
        if let Some(r) = &self.0.requester {
            q.append_pair("requester", r);
        }
        if let Some(r) = &self.0.repo_contains {
            q.append_pair("repo", r);
        }
        if let Some(c) = cursor {
            q.append_pair("cursor", c);
        }
        q.finish()
    }
}

/// A page of builds that pass `filter`, newest first from `cursor`, and the cursor of the next
/// page.
async fn filtered_page(
    db: &Db,
    filter: &Filter,
    cursor: Option<String>,
) -> Result<(Vec<BuildRow>, Option<String>), DashboardError> {
    let rows = db.list(&filter.0, PAGE, cursor.as_deref()).await?;
    let next = (rows.len() == PAGE as usize).then(|| rows[rows.len() - 1].id.clone());
    Ok((rows, next))
}

fn build_href(id: &str) -> String {
    format!(
        "/ui/builds/{}",
        percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
    )
}

/// The time a build has run: until it ended, or until now.
fn run_time(row_started: Option<i64>, row_finished: Option<i64>, now: i64) -> Option<i64> {
    row_started.map(|s| row_finished.unwrap_or(now) - s)
}

/// `GET /`: the builds list.
pub(super) async fn builds(
    State(dash): State<Arc<Dashboard>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Html<String>, DashboardError> {
    let Query(query) = query.map_err(|e| DashboardError::Query(e.body_text()))?;
    let filter = Filter::new(&query)?;
    let node = &dash.node;
    let (rows, next) = filtered_page(&node.db, &filter, query.cursor.clone()).await?;
    let counts = node.db.count_by_state().await?;
    let now = crate::now_ms();
    let mut body = String::from("<h1>Builds</h1><p class=\"counts\">");
    for state in BuildState::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        if n > 0 {
            let _ = write!(
                body,
                "<a href=\"/?state={s}\" class=\"badge s-{s}\">{s} {n}</a> ",
                s = state.as_str()
            );
        }
    }
    body.push_str(
        "</p><form class=\"filters\" method=\"get\" action=\"/\">\
         <label>state <select name=\"state\"><option value=\"\">any</option>",
    );
    for state in BuildState::ALL {
        let _ = write!(
            body,
            "<option{}>{}</option>",
            if filter.0.state == Some(state) {
                " selected"
            } else {
                ""
            },
            state.as_str()
        );
    }
    let _ = write!(
        body,
        "</select></label><label>requester <input name=\"requester\" value=\"{}\"></label>\
         <label>repository contains <input name=\"repo\" value=\"{}\"></label>\
         <button>Filter</button> <a href=\"/\">clear</a></form>",
        Esc(filter.0.requester.as_deref().unwrap_or("")),
        Esc(filter.0.repo_contains.as_deref().unwrap_or("")),
    );
    let active = rows.iter().any(|r| !r.state.is_terminal());
    let _ = write!(
        body,
        "<table class=\"builds\"{}><thead><tr><th>id</th><th>state</th><th>phase</th>\
         <th>requester</th><th>repository</th><th>revision</th><th>duration</th><th>age</th>\
         </tr></thead><tbody>",
        if active { " data-refresh=\"10\"" } else { "" }
    );
    for row in &rows {
        let _ = write!(
            body,
            "<tr id=\"b-{id}\" data-state=\"{state}\"><td><a href=\"{href}\"><code>{id}</code></a>\
             </td><td>{badge}</td><td>{phase}</td><td>{requester}</td>\
             <td class=\"repo\">{repo}</td><td><code>{revision}</code></td><td>{duration}</td>\
             <td title=\"{created}\">{age}</td></tr>",
            id = Esc(&row.id),
            state = row.state.as_str(),
            href = Esc(&build_href(&row.id)),
            badge = html::badge(row.state),
            phase = Esc(row.phase.as_deref().unwrap_or("")),
            requester = Esc(&row.requester),
            repo = Esc(&row.repo_url),
            revision = Esc(&row.revision),
            duration = run_time(row.started_at_ms, row.finished_at_ms, now)
                .map(html::duration)
                .unwrap_or_default(),
            created = html::utc(row.created_at_ms),
            age = html::age(row.created_at_ms, now),
        );
    }
    body.push_str("</tbody></table>");
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">No builds match.</p>");
    }
    body.push_str("<p class=\"paging\">");
    if query.cursor.is_some() {
        let _ = write!(
            body,
            "<a href=\"/?{}\">← newest</a> ",
            Esc(&filter.query(None))
        );
    }
    if let Some(next) = next {
        let _ = write!(
            body,
            "<a href=\"/?{}\" rel=\"next\">older →</a>",
            Esc(&filter.query(Some(&next)))
        );
    }
    body.push_str("</p>");
    Ok(Html(html::page(
        "Builds",
        &node.config.node_id,
        Nav::Builds,
        &body,
    )))
}

/// A definition-list entry, escaped; left out when `value` is empty.
fn item(out: &mut String, name: &str, value: &str) {
    if !value.is_empty() {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", Esc(name), Esc(value));
    }
}

/// The log source a query names (`?log=` on a build's page, `?source=` on its log route);
/// the console when it names none.
fn log_source(name: Option<&str>) -> Result<LogSource, DashboardError> {
    name.map_or(Ok(LogSource::Console), |name| {
        LogSource::parse(name).ok_or_else(|| {
            DashboardError::Query(format!(
                "{name:?} is not a log source; valid ones are {}",
                LogSource::names()
            ))
        })
    })
}

/// Log `source` of a build as far as `offset` + [`LOG_CHUNK`], from this node's file of it;
/// without one (the build ran on another node, or the file is gone) the console is the tail
/// stored when the build ended. Returns the text and the offset to read on from; a chunk ends
/// at a character boundary.
async fn read_log(
    dash: &Dashboard,
    row: &BuildRow,
    source: LogSource,
    offset: u64,
) -> (String, u64) {
    let path = dash.node.config.log_file(&row.id, source);
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        let tail = match source {
            LogSource::Console => row.log_tail.clone().unwrap_or_default(),
            _ => String::new(),
        };
        let len = tail.len() as u64;
        return if offset == 0 {
            (tail, len)
        } else {
            (String::new(), offset.max(len))
        };
    };
    let mut buf = Vec::new();
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
        let _ = (&mut file).take(LOG_CHUNK).read_to_end(&mut buf).await;
    }
    // Keep a character cut at the end for the next chunk.
    let keep = match std::str::from_utf8(&buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    buf.truncate(keep);
    (
        String::from_utf8_lossy(&buf).into_owned(),
        offset + buf.len() as u64,
    )
}

/// Where a page starts showing a log: its last [`LOG_CHUNK`] bytes.
async fn log_start(dash: &Dashboard, id: &str, source: LogSource) -> u64 {
    tokio::fs::metadata(dash.node.config.log_file(id, source))
        .await
        .map_or(0, |m| m.len().saturating_sub(LOG_CHUNK))
}

/// The logs of a build this node has: the console always (while it runs, and its stored tail
/// after), the others once their file exists.
async fn log_sources(dash: &Dashboard, id: &str) -> Vec<LogSource> {
    let mut sources = vec![LogSource::Console];
    for source in LogSource::ALL {
        if source != LogSource::Console
            && tokio::fs::try_exists(dash.node.config.log_file(id, source))
                .await
                .unwrap_or(false)
        {
            sources.push(source);
        }
    }
    sources
}

#[derive(Debug, Deserialize)]
pub(super) struct BuildQuery {
    log: Option<String>,
}

async fn load(dash: &Dashboard, id: &str) -> Result<BuildRow, DashboardError> {
    dash.node
        .db
        .get(id)
        .await?
        .ok_or_else(|| DashboardError::NotFound { id: id.to_string() })
}

/// `GET /ui/builds/{id}?log=SOURCE`.
pub(super) async fn build(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    query: Result<Query<BuildQuery>, QueryRejection>,
) -> Result<Html<String>, DashboardError> {
    let Query(query) = query.map_err(|e| DashboardError::Query(e.body_text()))?;
    let source = log_source(query.log.as_deref())?;
    let row = load(&dash, &id).await?;
    let events = dash.node.db.events(&id).await?;
    let now = crate::now_ms();
    let report = row
        .report
        .as_deref()
        .and_then(|r| serde_json::from_str::<BuildReport>(r).ok());
    // The guest's clock started its phases; trusted when it lies within the build's life.
    let phases_from = report.as_ref().map(|r| {
        let guest = r.started_at_unix_ms as i64;
        let end = row.finished_at_ms.unwrap_or(now);
        if (row.created_at_ms..=end).contains(&guest) {
            guest
        } else {
            row.vm_started_at_ms
                .or(row.started_at_ms)
                .unwrap_or(row.created_at_ms)
        }
    });
    let spans = timeline::spans(
        &events,
        report.as_ref().map_or(&[][..], |r| r.phases.as_slice()),
        phases_from,
        now,
    );
    let output = match (&row.request.s3_bucket, &row.request.s3_key) {
        (Some(bucket), Some(key)) => format!("s3://{bucket}/{key}"),
        _ => String::new(),
    };
    let sources = log_sources(&dash, &id).await;
    let start = log_start(&dash, &id, source).await;
    let (log, offset) = read_log(&dash, &row, source, start).await;
    let view = BuildView::new(row, Some(events.clone()));

    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Build <code>{id}</code> {badge}</h1>",
        id = Esc(&view.id),
        badge = html::badge(view.state),
    );
    let mut params = String::new();
    item(&mut params, "phase", view.phase.as_deref().unwrap_or(""));
    item(&mut params, "requester", &view.requester);
    item(&mut params, "repository", &view.repo_url);
    item(&mut params, "revision", &view.revision);
    item(
        &mut params,
        "commit",
        view.commit_sha.as_deref().unwrap_or(""),
    );
    item(&mut params, "dockerfile", &view.inputs.dockerfile);
    item(
        &mut params,
        "target",
        view.inputs.target.as_deref().unwrap_or(""),
    );
    item(&mut params, "platform", &view.inputs.platform);
    let build_args: Vec<String> = view
        .inputs
        .build_args
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    item(&mut params, "build args", &build_args.join(" "));
    item(
        &mut params,
        "build secrets (ids)",
        &view.credentials.secret_ids.join(", "),
    );
    item(
        &mut params,
        "registry logins (hosts)",
        &view.credentials.registry_hosts.join(", "),
    );
    item(
        &mut params,
        "git token",
        if view.credentials.git_token {
            "given"
        } else {
            ""
        },
    );
    item(&mut params, "output", &output);
    item(
        &mut params,
        "resources",
        &format!(
            "{} vCPU, {}, timeout {}",
            view.vcpus,
            html::mib(view.mem_mib),
            html::duration(view.timeout_s as i64 * 1000)
        ),
    );
    item(&mut params, "node", view.node_id.as_deref().unwrap_or(""));
    item(&mut params, "host CPUs", view.cpus.as_deref().unwrap_or(""));
    item(
        &mut params,
        "created",
        &html::utc(view.timings.created_at_ms),
    );
    if let Some(t) = view.timings.started_at_ms {
        item(&mut params, "started", &html::utc(t));
    }
    if let Some(t) = view.timings.finished_at_ms {
        item(&mut params, "finished", &html::utc(t));
    }
    if let Some(d) = run_time(view.timings.started_at_ms, view.timings.finished_at_ms, now) {
        item(&mut params, "duration", &html::duration(d));
    }
    let _ = write!(
        body,
        "<h2>Parameters</h2><dl class=\"params\">{params}</dl>"
    );

    body.push_str("<h2>Timeline</h2>");
    body.push_str(&timeline::render(&spans));

    let mut result = String::new();
    if let Some(error) = &view.error {
        let _ = write!(
            result,
            "<p class=\"problem\">{} error in {}</p><pre class=\"error\">{}</pre>",
            Esc(error.class.as_deref().unwrap_or("unknown")),
            Esc(error.phase.as_deref().unwrap_or("an unknown phase")),
            Esc(error.message.as_deref().unwrap_or("")),
        );
    }
    let mut artifacts = String::new();
    if let Some(rootfs) = &view.rootfs {
        item(&mut artifacts, "rootfs", &rootfs.location);
        if let Some(size) = rootfs.size_bytes {
            item(&mut artifacts, "size", &format!("{size} bytes"));
        }
        item(
            &mut artifacts,
            "sha256",
            rootfs.sha256.as_deref().unwrap_or(""),
        );
    }
    item(
        &mut artifacts,
        "image",
        view.image_digest.as_deref().unwrap_or(""),
    );
    if let Some(code) = view.vmm_exit_code {
        item(&mut artifacts, "VMM exit code", &code.to_string());
    }
    if view.webhook.state != "none" {
        item(
            &mut artifacts,
            "webhook",
            &format!(
                "{} after {} attempt(s){}",
                view.webhook.state,
                view.webhook.attempts,
                view.webhook
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        );
    }
    if !artifacts.is_empty() {
        let _ = write!(result, "<dl class=\"params\">{artifacts}</dl>");
    }
    if !result.is_empty() {
        let _ = write!(body, "<h2>Result</h2>{result}");
    }

    body.push_str(
        "<h2>Events</h2><table class=\"events\"><thead><tr><th>at</th><th>from</th><th>to</th>\
         <th>node</th><th>detail</th></tr></thead><tbody>",
    );
    for e in &events {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html::utc(e.at_ms),
            Esc(e.from_state.as_deref().unwrap_or("")),
            Esc(&e.to_state),
            Esc(e.node_id.as_deref().unwrap_or("")),
            Esc(e.detail.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table>");

    let _ = write!(
        body,
        "<h2>Logs</h2><nav class=\"log-sources\">{tabs}</nav>\
         <p class=\"log-tools\">{cut}{live}</p>\
         <pre id=\"log\" class=\"log\" data-src=\"{href}/log?source={source}\" \
         data-offset=\"{offset}\" data-state=\"{state}\">{log}</pre>\
         <p id=\"log-ended\" class=\"notice\" hidden></p>",
        tabs = sources
            .iter()
            .map(|s| format!(
                "<a href=\"{}?log={s}\"{}>{s}</a>",
                Esc(&build_href(&view.id)),
                if *s == source {
                    " class=\"current\""
                } else {
                    ""
                }
            ))
            .collect::<String>(),
        cut = if start > 0 {
            format!(
                "the first part is left out (the whole log: <code>GET /v1/builds/ID/logs\
                 ?source={source}</code>). "
            )
        } else {
            String::new()
        },
        live = if view.state.is_terminal() {
            ""
        } else {
            "<span class=\"live\">live</span> <label><input type=\"checkbox\" id=\"log-stick\" \
             checked> follow the end</label>"
        },
        href = Esc(&build_href(&view.id)),
        state = view.state.as_str(),
        log = Esc(&log),
    );
    Ok(Html(html::page(
        &format!("Build {}", view.id),
        &dash.node.config.node_id,
        Nav::Builds,
        &body,
    )))
}

#[derive(Debug, Deserialize)]
pub(super) struct LogQuery {
    source: Option<String>,
    offset: Option<u64>,
}

/// `GET /ui/builds/{id}/log?source=SOURCE&offset=N`: a log (default the console) from byte
/// `N` on, waiting up to [`LOG_WAIT`] for output while the build runs. Headers: `X-Log-Offset` (where to go on) and
/// `X-Build-State`.
pub(super) async fn log_chunk(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, DashboardError> {
    let Query(query) = query.map_err(|e| DashboardError::Query(e.body_text()))?;
    let source = log_source(query.source.as_deref())?;
    let offset = query.offset.unwrap_or(0);
    let deadline = tokio::time::Instant::now() + LOG_WAIT;
    let (row, text, next) = loop {
        let row = load(&dash, &id).await?;
        let (text, next) = read_log(&dash, &row, source, offset).await;
        if !text.is_empty() || row.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            break (row, text, next);
        }
        tokio::time::sleep(LOG_POLL).await;
    };
    let value = |v: &str| HeaderValue::from_str(v).expect("a number or a state is a header");
    Ok((
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (
                HeaderName::from_static("x-log-offset"),
                value(&next.to_string()),
            ),
            (
                HeaderName::from_static("x-build-state"),
                value(row.state.as_str()),
            ),
        ],
        text,
    )
        .into_response())
}

/// A count on a chart axis: whole numbers plain, the halfway mark of a small one with a decimal.
fn count(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// `GET /ui/node`: capacity now and over the sampled history.
pub(super) async fn node(
    State(dash): State<Arc<Dashboard>>,
) -> Result<Html<String>, DashboardError> {
    let node = &dash.node;
    let now = capacity::sample(node).await?;
    let mut samples = dash.capacity.snapshot();
    samples.push(now);
    let config = &node.config;
    let mut body = String::from("<h1>Node</h1><dl class=\"params\">");
    item(&mut body, "node id", &config.node_id);
    item(
        &mut body,
        "vCPUs",
        &format!("{} of {} in use", now.used_vcpus, config.capacity_vcpus),
    );
    item(
        &mut body,
        "memory",
        &format!(
            "{} of {} in use",
            html::mib(now.used_mem_mib),
            html::mib(config.capacity_mem_mib)
        ),
    );
    item(&mut body, "running VMs", &now.running.to_string());
    item(&mut body, "queued builds", &now.queued.to_string());
    item(
        &mut body,
        "admitting",
        if node.is_draining() {
            "no: draining"
        } else {
            "yes"
        },
    );
    let _ = write!(
        body,
        "</dl><h2>Capacity over time</h2><p class=\"muted\">One sample every {} s, the last \
         24 h, kept in memory since the node agent started.</p>",
        capacity::SAMPLE_EVERY.as_secs()
    );
    body.push_str(&capacity::chart(
        "vCPUs",
        &samples,
        &[Series {
            class: "vcpus",
            label: "used",
            value: |s| f64::from(s.used_vcpus),
        }],
        f64::from(config.capacity_vcpus),
        count,
    ));
    body.push_str(&capacity::chart(
        "memory",
        &samples,
        &[Series {
            class: "mem",
            label: "used",
            value: |s| s.used_mem_mib as f64,
        }],
        config.capacity_mem_mib as f64,
        |v| html::mib(v as u64),
    ));
    body.push_str(&capacity::chart(
        "builds",
        &samples,
        &[
            Series {
                class: "running",
                label: "running",
                value: |s| s.running as f64,
            },
            Series {
                class: "queued",
                label: "queued",
                value: |s| s.queued as f64,
            },
        ],
        1.0,
        count,
    ));
    Ok(Html(html::page("Node", &config.node_id, Nav::Node, &body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::NewBuild;

    /// A SQLite database with `n` queued builds, every third by `alice` from `other.git`.
    async fn database(dir: &std::path::Path, n: usize) -> (Db, Vec<String>) {
        let db = Db::open(&format!("sqlite://{}/builds.sqlite", dir.display()))
            .await
            .unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let (requester, repo) = if i % 3 == 0 {
                ("alice", "https://git.example/other.git")
            } else {
                ("bob", "https://git.example/app.git")
            };
            let id = format!("{i:024x}");
            let request =
                serde_json::from_value(serde_json::json!({"repo_url": repo, "ref": "main"}))
                    .unwrap();
            db.insert(&NewBuild {
                id: id.clone(),
                request,
                credentials: Default::default(),
                pinned_node: None,
                requester: requester.into(),
                revision: "main".into(),
                timeout_s: 60,
                created_at_ms: i as i64,
            })
            .await
            .unwrap();
            ids.push(id);
        }
        (db, ids)
    }

    fn filter(requester: Option<&str>, repo: Option<&str>) -> Filter {
        Filter::new(&ListQuery {
            requester: requester.map(str::to_string),
            repo: repo.map(str::to_string),
            ..Default::default()
        })
        .unwrap()
    }

    /// Every page of `filter`, by following the cursors.
    async fn pages(db: &Db, filter: &Filter) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let (rows, next) = filtered_page(db, filter, cursor).await.unwrap();
            out.push(rows.into_iter().map(|r| r.id).collect());
            match next {
                Some(next) => cursor = Some(next),
                None => return out,
            }
        }
    }

    #[tokio::test]
    async fn pages_and_filters_cover_every_match_once_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ids) = database(dir.path(), 130).await;
        let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

        let all = pages(&db, &filter(None, None)).await;
        assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), [50, 50, 30]);
        assert_eq!(all.concat(), newest_first);

        let alice = pages(&db, &filter(Some("alice"), None)).await;
        let by_alice: Vec<String> = newest_first
            .iter()
            .filter(|id| u64::from_str_radix(id, 16).unwrap() % 3 == 0)
            .cloned()
            .collect();
        assert_eq!(alice.iter().map(Vec::len).collect::<Vec<_>>(), [44]);
        assert_eq!(alice.concat(), by_alice);
        assert_eq!(
            pages(&db, &filter(None, Some("other.git"))).await.concat(),
            by_alice
        );
        assert_eq!(
            pages(&db, &filter(Some("bob"), Some("other.git"))).await,
            [Vec::<String>::new()]
        );
        assert!(Filter::new(&ListQuery {
            state: Some("bogus".into()),
            ..Default::default()
        })
        .is_err());
    }
}
