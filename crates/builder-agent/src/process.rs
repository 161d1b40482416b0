//! Child processes whose output belongs in the build log.

use std::cell::RefCell;
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::log::{BuildLog, LineSplitter};

/// How many trailing output lines are kept for the error message.
const TAIL_LINES: usize = 20;

pub struct Finished {
    pub status: ExitStatus,
    /// The last lines the process printed (scrubbed), for the error message.
    pub tail: Vec<String>,
}

impl Finished {
    pub fn tail_text(&self) -> String {
        self.tail.join("\n")
    }
}

/// Runs `command` with stdout and stderr streamed into the log, line by line.
pub async fn run_logged(log: &BuildLog, command: &mut Command) -> std::io::Result<Finished> {
    run_observed(log, command, Stdio::null(), &mut |_| {}).await
}

/// Like [`run_logged`], with `stdin` as the child's input and every output line (scrubbed) also
/// handed to `observe`, in the order the lines arrived.
pub async fn run_observed(
    log: &BuildLog,
    command: &mut Command,
    stdin: Stdio,
    observe: &mut dyn FnMut(&str),
) -> std::io::Result<Finished> {
    command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    // Both pumps run in this task, never at the same instant: a RefCell is enough.
    let observer = RefCell::new(observe);
    let (out_tail, err_tail) =
        tokio::join!(pump(log, stdout, &observer), pump(log, stderr, &observer));
    let status = child.wait().await?;
    let mut tail = out_tail?;
    tail.extend(err_tail?);
    let skip = tail.len().saturating_sub(TAIL_LINES);
    Ok(Finished {
        status,
        tail: tail.split_off(skip),
    })
}

async fn pump(
    log: &BuildLog,
    mut reader: impl AsyncRead + Unpin,
    observer: &RefCell<&mut dyn FnMut(&str)>,
) -> std::io::Result<Vec<String>> {
    let mut split = LineSplitter::default();
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 8192];
    let emit = |line: String, tail: &mut Vec<String>| {
        log.output(&line);
        let scrubbed = log.scrub(&line);
        (observer.borrow_mut())(&scrubbed);
        tail.push(scrubbed);
        if tail.len() > TAIL_LINES * 2 {
            tail.drain(..TAIL_LINES);
        }
    };
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        for line in split.push(&String::from_utf8_lossy(&buf[..n])) {
            emit(line, &mut tail);
        }
    }
    if let Some(rest) = split.finish() {
        emit(rest, &mut tail);
    }
    Ok(tail)
}
