//! The build log: every line a build prints, timestamped, scrubbed of secrets, written to the
//! log file (`/var/log/build.log` in the VM) and echoed to stderr (the VM's serial console).
//!
//! Output of child processes and the Docker build stream arrives in arbitrary chunks; it is
//! split into lines before scrubbing so a secret cannot slip through split across two writes.
//!
//! Two kinds of lines, and this module is the one place that tells them apart: the agent's own
//! ([`BuildLog::line`]) and output it does not control ([`BuildLog::output`]: git's, BuildKit's,
//! a `RUN` step's), which always carries [`UNTRUSTED_PREFIX`] after the timestamp, so nothing a
//! build prints can look like an agent line (`==> upload`). The continuation lines of a
//! multi-line agent message (an error carrying a tool's output) carry the prefix too, and control
//! characters are written escaped, so a line cannot rewrite the terminal it is shown on. The node
//! agent reads no state from these lines either way (it learns progress from signed events).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// What replaces a secret in the log.
pub const REDACTED: &str = "[REDACTED]";
/// What starts every line of output the agent does not control, after the timestamp.
pub const UNTRUSTED_PREFIX: &str = "  | ";

pub struct BuildLog {
    started: Instant,
    redactions: Vec<String>,
    inner: Mutex<Inner>,
}

struct Inner {
    file: Option<File>,
    echo: bool,
}

impl BuildLog {
    /// A log writing to `path` (created, truncated) and, when `echo`, to stderr.
    pub fn create(path: Option<&Path>, echo: bool) -> std::io::Result<Self> {
        let file = match path {
            Some(path) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Some(
                    OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(true)
                        .open(path)?,
                )
            }
            None => None,
        };
        Ok(BuildLog {
            started: Instant::now(),
            redactions: vec![],
            inner: Mutex::new(Inner { file, echo }),
        })
    }

    /// Values that must never appear in the log (longest first, so overlaps redact fully).
    pub fn redact(&mut self, values: impl IntoIterator<Item = String>) {
        self.redactions
            .extend(values.into_iter().filter(|v| !v.is_empty()));
        self.redactions.sort_by_key(|v| std::cmp::Reverse(v.len()));
        self.redactions.dedup();
    }

    /// `text` with every secret replaced.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.redactions {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        text
    }

    /// Writes one of the agent's own messages; its lines after the first (the output of others
    /// an error carries) are marked as untrusted.
    pub fn line(&self, text: &str) {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        self.write(std::iter::once(("", first)).chain(lines.map(|l| (UNTRUSTED_PREFIX, l))));
    }

    /// Writes output the agent does not control (a tool's, the build's): every line after
    /// [`UNTRUSTED_PREFIX`].
    pub fn output(&self, text: &str) {
        self.write(text.lines().map(|l| (UNTRUSTED_PREFIX, l)));
    }

    /// Writes `(prefix, line)` pairs, timestamped, scrubbed and with control characters escaped.
    fn write<'a>(&self, lines: impl Iterator<Item = (&'a str, &'a str)>) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut out = String::new();
        for (prefix, line) in lines {
            out.push_str(&format!("[{elapsed:8.3}s] {prefix}"));
            for c in self.scrub(line.trim_end()).chars() {
                if c.is_control() && c != '\t' {
                    out.extend(c.escape_default());
                } else {
                    out.push(c);
                }
            }
            out.push('\n');
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = inner.file.as_mut() {
            // A log that cannot be written must not stop the build; stderr still has it.
            let _ = file.write_all(out.as_bytes());
        }
        if inner.echo {
            let _ = std::io::stderr().write_all(out.as_bytes());
        }
    }

    /// Flushes the log file to disk (before the VM powers off).
    pub fn sync(&self) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = inner.file.as_ref() {
            let _ = file.sync_all();
        }
    }
}

/// Turns chunks into whole lines for [`BuildLog::line`], keeping the unfinished tail.
#[derive(Default)]
pub struct LineSplitter {
    pending: String,
}

impl LineSplitter {
    /// Adds a chunk and returns the complete lines it finished (`\r` also ends a line, so
    /// progress bars do not pile up into one huge line).
    pub fn push(&mut self, chunk: &str) -> Vec<String> {
        self.pending.push_str(chunk);
        let mut lines = vec![];
        while let Some(end) = self.pending.find(['\n', '\r']) {
            let line: String = self.pending.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if !line.is_empty() {
                lines.push(line.to_string());
            }
        }
        lines
    }

    /// What is left once the stream ended.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_secrets_and_splits_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let mut log = BuildLog::create(Some(&path), false).unwrap();
        log.redact([
            "s3cr3t".to_string(),
            "s3cr3t-longer".to_string(),
            String::new(),
        ]);
        let mut split = LineSplitter::default();
        let mut lines = split.push("one s3c");
        lines.extend(split.push("r3t two\nthree s3cr3t-longer\rfour"));
        assert_eq!(lines, ["one s3cr3t two", "three s3cr3t-longer"]);
        for l in &lines {
            log.line(l);
        }
        log.line(&split.finish().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("one [REDACTED] two"), "{text}");
        assert!(text.contains("three [REDACTED]\n"), "{text}");
        assert!(text.contains("] four\n"), "{text}");
    }

    #[test]
    fn output_cannot_pass_for_the_agents_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let log = BuildLog::create(Some(&path), false).unwrap();
        log.line("==> build");
        log.output("==> upload\n\u{1b}[2K==> upload");
        log.line("build b1 failed: step failed:\n==> upload");
        let text = std::fs::read_to_string(&path).unwrap();
        let agent: Vec<&str> = text
            .lines()
            .map(|l| l.split_once("s] ").unwrap().1)
            .filter(|l| !l.starts_with(UNTRUSTED_PREFIX))
            .collect();
        assert_eq!(
            agent,
            ["==> build", "build b1 failed: step failed:"],
            "{text}"
        );
        assert_eq!(text.matches("s]   | ==> upload\n").count(), 2, "{text}");
        assert!(text.contains("s]   | \\u{1b}[2K==> upload\n"), "{text}");
    }
}
