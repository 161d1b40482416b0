//! The logs this node keeps for each build ([`LogSource`]), as files under
//! `<work_dir>/logs` ([`crate::config::Config::log_file`]): what a log becomes when it is kept
//! (scrubbed of the build's credential values, its tail within `max_log_bytes`, a first line
//! saying how much was cut) and their removal when their build is pruned.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use builder_contract::LogSource;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::credentials::scrub;
use crate::db::{Db, DbError};

/// Room kept under the cap for the line that marks a cut.
const MARKER_ROOM: usize = 128;

/// `text` scrubbed, then its tail within `max` bytes from a line start, under a line saying
/// how many bytes were cut (`already_cut` of them before `text` began).
fn kept_text(text: &str, already_cut: u64, values: &[&str], max: u64) -> String {
    let text = scrub(text, values);
    let room = (max as usize).saturating_sub(MARKER_ROOM);
    let mut start = 0;
    if text.len() > room {
        start = text.len() - room;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        if let Some(i) = text[start..].find('\n') {
            start += i + 1;
        }
    }
    let cut = already_cut + start as u64;
    if cut == 0 {
        return text;
    }
    format!(
        "[node-agent: the first {cut} bytes of this log were cut to keep it within {max} bytes]\n{}",
        &text[start..]
    )
}

/// Writes `text` to `path` through a temporary file renamed over it, which also replaces a
/// link (the console's, into a VM's work dir) by the file.
async fn write_replacing(path: &Path, text: &str) -> std::io::Result<()> {
    let temp = path.with_extension("log.tmp");
    tokio::fs::write(&temp, text).await?;
    tokio::fs::rename(&temp, path).await
}

/// Keeps `bytes`, a log the guest sent, as the file `path`: scrubbed and capped.
pub async fn keep(path: &Path, bytes: &[u8], values: &[&str], max: u64) -> std::io::Result<()> {
    let text = String::from_utf8_lossy(bytes);
    write_replacing(path, &kept_text(&text, 0, values, max)).await
}

/// Makes a log the node wrote itself (the console, the VMM's logs) what [`keep`] would have
/// kept, once the VM is gone: only its last `max` bytes are read. A log that does not exist
/// is left so.
pub async fn seal(path: &Path, values: &[&str], max: u64) -> std::io::Result<()> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata().await?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start)).await?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await?;
    drop(file);
    let text = String::from_utf8_lossy(&bytes);
    // A line cut by the read goes whole: a secret in it might be cut too, past scrubbing.
    let (text, skipped) = match (start > 0, text.find('\n')) {
        (true, Some(i)) => (&text[i + 1..], i as u64 + 1),
        _ => (&text[..], 0),
    };
    write_replacing(path, &kept_text(text, start + skipped, values, max)).await
}

/// Removes every log of build `id` kept here; says how many files went.
pub async fn remove(logs_dir: &Path, id: &str) -> u64 {
    let mut removed = 0;
    for source in LogSource::ALL {
        let path = file_of(logs_dir, id, source);
        if tokio::fs::remove_file(&path).await.is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Where log `source` of build `id` is kept in `logs_dir`: `<id>.log` for the console (as
/// before there were others), `<id>.<source>.log` for the rest.
pub fn file_of(logs_dir: &Path, id: &str, source: LogSource) -> PathBuf {
    match source {
        LogSource::Console => logs_dir.join(format!("{id}.log")),
        other => logs_dir.join(format!("{id}.{other}.log")),
    }
}

/// Removes the log files last written before `before` whose build the database no longer
/// has (pruned by another node sharing the queue, or left by a crash); says how many went.
pub async fn sweep(logs_dir: &Path, db: &Db, before: SystemTime) -> Result<u64, DbError> {
    let Ok(mut entries) = tokio::fs::read_dir(logs_dir).await else {
        return Ok(0);
    };
    let mut removed = 0;
    while let Ok(Some(entry)) = entries.next_entry().await {
        // The link's own time for a console still linked into a VM's work dir.
        let old = tokio::fs::symlink_metadata(entry.path())
            .await
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < before);
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.split('.').next()) else {
            continue;
        };
        if old && db.get(id).await?.is_none() && tokio::fs::remove_file(entry.path()).await.is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_log_is_scrubbed_and_its_tail_fits_the_cap_from_a_line_start() {
        assert_eq!(
            kept_text("a hunter2 b\n", 0, &["hunter2"], 4096),
            "a *** b\n"
        );
        let long: String = (0..1000).map(|i| format!("line {i} hunter2\n")).collect();
        let kept = kept_text(&long, 0, &["hunter2"], 4096);
        assert!(kept.len() <= 4096, "{}", kept.len());
        let (marker, body) = kept.split_once('\n').unwrap();
        assert!(
            marker.starts_with("[node-agent: the first ") && marker.ends_with("within 4096 bytes]"),
            "{marker}"
        );
        assert!(body.starts_with("line "), "{body}");
        assert!(body.ends_with("line 999 ***\n"));
        assert!(!kept.contains("hunter2"));
        let cut: u64 = marker.split(' ').nth(3).unwrap().parse().unwrap();
        assert_eq!(cut as usize + body.len(), scrub(&long, &["hunter2"]).len());
    }

    #[tokio::test]
    async fn sealing_keeps_the_tail_of_a_file_and_replaces_a_link_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("console.log");
        let text: String = (0..2000).map(|i| format!("boot {i} tok3n\n")).collect();
        std::fs::write(&target, &text).unwrap();
        let link = dir.path().join("b1.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        seal(&link, &["tok3n"], 8192).await.unwrap();
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        let kept = std::fs::read_to_string(&link).unwrap();
        assert!(kept.len() <= 8192);
        assert!(kept.ends_with("boot 1999 ***\n"), "{kept}");
        assert!(!kept.contains("tok3n"));
        let (marker, body) = kept.split_once('\n').unwrap();
        let cut: u64 = marker.split(' ').nth(3).unwrap().parse().unwrap();
        // Counted in the original's bytes before the read, in scrubbed ones after.
        assert!(cut as usize + body.len() <= text.len(), "{marker}");
        // A log never written stays unwritten.
        seal(&dir.path().join("none.log"), &[], 8192).await.unwrap();
        assert!(!dir.path().join("none.log").exists());
    }
}
