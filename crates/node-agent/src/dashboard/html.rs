//! The dashboard's HTML: escaping (every value from a build, a request or a log goes through
//! [`Esc`]), the page frame with its navigation, the login page, and the formats of times,
//! durations and sizes the pages share.

use std::fmt::{self, Write};

use crate::model::BuildState;

/// A value written into HTML text or a quoted attribute, escaped.
pub(super) struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// The navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    Builds,
    Node,
}

/// A whole page: the frame (title, stylesheet, script, navigation with the node's id and a
/// logout button) around `body`, which the caller has escaped.
pub(super) fn page(title: &str, node_id: &str, nav: Nav, body: &str) -> String {
    let mut out = head(title);
    let current = |n| if n == nav { " class=\"current\"" } else { "" };
    let _ = write!(
        out,
        "<header><span class=\"brand\">node-agent <b>{node}</b></span><nav>\
         <a href=\"/\"{b}>Builds</a><a href=\"/ui/node\"{n}>Node</a></nav>\
         <form method=\"post\" action=\"/ui/logout\"><button>Log out</button></form></header>\
         <main>{body}</main></body></html>",
        node = Esc(node_id),
        b = current(Nav::Builds),
        n = current(Nav::Node),
    );
    out
}

/// The login form; `next` is where a successful login goes, `problem` why the last one failed.
pub(super) fn login_page(next: &str, problem: Option<&str>) -> String {
    let mut out = head("Log in");
    let _ = write!(
        out,
        "<main class=\"login\"><h1>node-agent dashboard</h1>{problem}\
         <form method=\"post\" action=\"/ui/login\">\
         <label for=\"token\">API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         required autofocus><input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <button>Log in</button></form>\
         <p class=\"hint\">An admin token: the node's <code>api_token_file</code>, or one made \
         with <code>node-agent token add --admin</code>. A one-time link: \
         <code>POST /ui/login-links</code> with the bearer token.</p></main></body></html>",
        problem = problem
            .map(|p| format!("<p class=\"problem\">{}</p>", Esc(p)))
            .unwrap_or_default(),
        next = Esc(next),
    );
    out
}

/// A page that says what went wrong, for errors outside a session's pages.
pub(super) fn error_page(message: &str) -> String {
    let mut out = head("Error");
    let _ = write!(
        out,
        "<main><h1>Error</h1><p class=\"problem\">{}</p><p><a href=\"/\">Builds</a></p></main>\
         </body></html>",
        Esc(message)
    );
    out
}

fn head(title: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · node-agent</title>\
         <link rel=\"stylesheet\" href=\"/ui/assets/dashboard.css\">\
         <script src=\"/ui/assets/dashboard.js\" defer></script></head><body>",
        Esc(title)
    )
}

/// A state as a coloured badge.
pub(super) fn badge(state: BuildState) -> String {
    format!("<span class=\"badge s-{0}\">{0}</span>", state.as_str())
}

/// `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub(super) fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {:02} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {:02} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// How long ago `at_ms` was, coarsely: `5 s ago`, `3 min ago`, `2 h ago`, `4 d ago`.
pub(super) fn age(at_ms: i64, now_ms: i64) -> String {
    let s = (now_ms - at_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// `2026-12-02 05:31:07Z`.
pub(super) fn utc(at_ms: i64) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| at_ms.to_string())
}

/// `05:31` (UTC), for chart axes.
pub(super) fn clock(at_ms: i64) -> String {
    let format = time::macros::format_description!("[hour]:[minute]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

/// `512 MiB`, `16.0 GiB`.
pub(super) fn mib(value: u64) -> String {
    if value >= 1024 {
        format!("{:.1} GiB", value as f64 / 1024.0)
    } else {
        format!("{value} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_markup_character() {
        assert_eq!(
            Esc("<a href=\"x\" title='y'>&amp;</a>").to_string(),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert_eq!(Esc("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn durations_and_ages_read_naturally() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_340), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(duration(7_380_000), "2 h 03 min");
        assert_eq!(age(0, 61_000), "1 min ago");
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(mib(16384), "16.0 GiB");
    }
}
