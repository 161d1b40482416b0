//! The build context: the checkout, minus what `.dockerignore` excludes, as a tar file.
//!
//! The tar is written to disk (memory stays flat whatever the repository's size) with
//! deterministic headers: owner 0:0 and the commit's time as every mtime (git keeps no file
//! times; this is the `SOURCE_DATE_EPOCH` convention), so rebuilding the same commit sends the
//! same bytes and hits the same layer cache, and files `COPY`'d into the image show when their
//! commit was made. The Dockerfile and `.dockerignore` are always sent,
//! as the Docker CLI does. `.git` is sent only when `.dockerignore` does not exclude it.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use builder_contract::RepoPath;

use crate::dockerignore::{DockerIgnore, PatternError};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("the Dockerfile `{path}` does not exist in the repository")]
    DockerfileMissing { path: String },
    #[error("the Dockerfile `{path}` is not a regular file")]
    DockerfileNotAFile { path: String },
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("cannot add {path} to the build context")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What went into the context.
#[derive(Debug, Default)]
pub struct ContextSummary {
    pub files: u64,
    pub ignored: u64,
}

/// Writes the context of `root` into `out`, every entry with the mtime `mtime`, and checks the
/// Dockerfile is there.
pub fn write_context(
    root: &Path,
    dockerfile: &RepoPath,
    out: &Path,
    mtime: u64,
) -> Result<ContextSummary, ContextError> {
    let dockerfile_path = root.join(dockerfile.as_str());
    match std::fs::symlink_metadata(&dockerfile_path) {
        Err(_) => {
            return Err(ContextError::DockerfileMissing {
                path: dockerfile.to_string(),
            })
        }
        Ok(meta) if !meta.is_file() => {
            return Err(ContextError::DockerfileNotAFile {
                path: dockerfile.to_string(),
            })
        }
        Ok(_) => {}
    }
    let ignore = match std::fs::read_to_string(root.join(".dockerignore")) {
        Ok(text) => DockerIgnore::parse(&text)?,
        Err(_) => DockerIgnore::default(),
    };
    let io = |path: &str| {
        let path = path.to_string();
        move |source| ContextError::Io { path, source }
    };
    let file = File::create(out).map_err(io(&out.display().to_string()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut append = |path: &Path, rel: &str, meta: &std::fs::Metadata| {
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Deterministic);
        header.set_mtime(mtime);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path)?;
            tar.append_link(&mut header, rel, target)
        } else if meta.is_file() {
            tar.append_data(&mut header, rel, File::open(path)?)
        } else {
            tar.append_data(&mut header, rel, std::io::empty())
        }
    };
    let always = [dockerfile.as_str(), ".dockerignore"];
    let mut summary = ContextSummary::default();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let full = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let mut names: Vec<_> = std::fs::read_dir(&full)
            .map_err(io(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(&dir))?;
        names.sort();
        for name in names.iter().rev() {
            let name = name.to_string_lossy();
            let rel = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).map_err(io(&rel))?;
            let ignored = ignore.is_ignored(&rel) && !always.contains(&rel.as_str());
            if meta.is_dir() {
                if !ignored {
                    append(&path, &rel, &meta).map_err(io(&rel))?;
                }
                if !ignored || ignore.has_exclusions() {
                    stack.push(rel);
                }
            } else if ignored {
                summary.ignored += 1;
            } else {
                append(&path, &rel, &meta).map_err(io(&rel))?;
                summary.files += 1;
            }
        }
    }
    tar.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(io(&out.display().to_string()))?;
    Ok(summary)
}
