//! `node-agent submit DIR`: a local directory becomes one commit on the branch `main` of a git
//! bundle, which the CLI uploads to the daemon ([`crate::sources`]) so the build VM clones it
//! like any repository.
//!
//! - A directory in a git work tree builds what is committed: the `HEAD` commit itself at the
//!   top of the work tree, or, for a subdirectory, a commit of `HEAD`'s tree of that
//!   subdirectory (dated like `HEAD`, so the same `HEAD` gives the same commit). Uncommitted
//!   changes or untracked files under the directory are refused, since the build would not
//!   see them, unless `--snapshot` is given.
//! - Any other directory, or one given with `--snapshot`, is committed as it is on disk
//!   (`.gitignore` files inside it are honoured).
//!
//! Everything happens in a temporary repository: the user's repository gets no ref, object or
//! index change (its objects are borrowed through `objects/info/alternates`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::sources::{git, SourceError, BRANCH};

const IDENTITY: [(&str, &str); 4] = [
    ("GIT_AUTHOR_NAME", "node-agent"),
    ("GIT_AUTHOR_EMAIL", "node-agent@localhost"),
    ("GIT_COMMITTER_NAME", "node-agent"),
    ("GIT_COMMITTER_EMAIL", "node-agent@localhost"),
];
/// How many of the uncommitted paths an error lists.
const SHOWN_CHANGES: usize = 5;

/// Why a directory could not be turned into a bundle.
#[derive(Debug, thiserror::Error)]
pub enum LocalSourceError {
    #[error("{path} is not a directory")]
    NotADirectory {
        path: PathBuf,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error(
        "{path} has uncommitted changes, which the build would not see: {changes}; commit \
         them, or pass --snapshot to build the directory as it is on disk"
    )]
    Dirty { path: PathBuf, changes: String },
    #[error("the git repository of {path} has no commit yet; commit, or pass --snapshot")]
    NoCommit { path: PathBuf },
    #[error("cannot make a temporary repository")]
    Temp(#[source] std::io::Error),
    #[error("cannot read the bundle {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Git(#[from] SourceError),
}

/// A directory as a git bundle.
#[derive(Debug)]
pub struct Bundle {
    /// The bundle file's content; its one branch is `main`.
    pub bytes: Vec<u8>,
    pub commit_sha: String,
    /// What was bundled, for the user (`HEAD abc123 of /src/app`).
    pub what: String,
}

/// Where `dir` sits in a git work tree: `Some(prefix)` (`""` at the top, `sub/dir/` below).
fn work_tree_prefix(dir: &Path) -> Result<Option<String>, SourceError> {
    match git(
        dir,
        &["rev-parse", "--is-inside-work-tree"],
        &[] as &[(&str, &str)],
    ) {
        Ok(inside) if inside == "true" => {}
        Ok(_) => return Ok(None),
        Err(SourceError::Git { stderr, .. }) if stderr.contains("not a git repository") => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    git(dir, &["rev-parse", "--show-prefix"], &[] as &[(&str, &str)]).map(Some)
}

/// Bundles `dir`: its committed state, or with `snapshot` (or outside git) its files on disk.
pub fn bundle_dir(dir: &Path, snapshot: bool) -> Result<Bundle, LocalSourceError> {
    let not_a_dir = |source| LocalSourceError::NotADirectory {
        path: dir.to_path_buf(),
        source,
    };
    let dir = dir.canonicalize().map_err(|e| not_a_dir(Some(e)))?;
    if !dir.is_dir() {
        return Err(not_a_dir(None));
    }
    let tmp = tempfile::tempdir().map_err(LocalSourceError::Temp)?;
    let repo = tmp.path().join("repo.git");
    let no_env: &[(&str, &str)] = &[];
    git(
        tmp.path(),
        &["init", "-q", "--bare", "--initial-branch=main", "repo.git"],
        no_env,
    )?;
    let (commit_sha, what) = match work_tree_prefix(&dir)? {
        Some(prefix) if !snapshot => committed(&dir, &prefix, &repo)?,
        _ => on_disk(&dir, &repo, tmp.path())?,
    };
    git(&repo, &["update-ref", BRANCH, &commit_sha], no_env)?;
    let file = tmp.path().join("source.bundle");
    let file_arg = file.to_string_lossy().into_owned();
    git(
        &repo,
        &["bundle", "create", "-q", &file_arg, BRANCH],
        no_env,
    )?;
    let bytes = std::fs::read(&file).map_err(|source| LocalSourceError::Read {
        path: file.clone(),
        source,
    })?;
    Ok(Bundle {
        bytes,
        commit_sha,
        what,
    })
}

/// The committed state of `dir` (in a work tree at `prefix`), refusing uncommitted changes.
fn committed(dir: &Path, prefix: &str, repo: &Path) -> Result<(String, String), LocalSourceError> {
    let no_env: &[(&str, &str)] = &[];
    let status = git(
        dir,
        &["status", "--porcelain", "--untracked-files=all", "--", "."],
        no_env,
    )?;
    if !status.is_empty() {
        let lines: Vec<&str> = status.lines().collect();
        let mut changes = lines
            .iter()
            .take(SHOWN_CHANGES)
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(", ");
        if lines.len() > SHOWN_CHANGES {
            changes.push_str(&format!(" and {} more", lines.len() - SHOWN_CHANGES));
        }
        return Err(LocalSourceError::Dirty {
            path: dir.to_path_buf(),
            changes,
        });
    }
    let head = git(
        dir,
        &["rev-parse", "--verify", "-q", "HEAD^{commit}"],
        no_env,
    )
    .map_err(|_| LocalSourceError::NoCommit {
        path: dir.to_path_buf(),
    })?;
    let objects = git(
        dir,
        &[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            "objects",
        ],
        no_env,
    )?;
    let alternates = repo.join("objects/info/alternates");
    std::fs::write(&alternates, format!("{objects}\n")).map_err(|source| SourceError::Io {
        action: "write",
        path: alternates.clone(),
        source,
    })?;
    let short = &head[..head.len().min(12)];
    let subdir = prefix.trim_end_matches('/');
    if subdir.is_empty() {
        return Ok((head.clone(), format!("HEAD {short} of {}", dir.display())));
    }
    let tree = git(dir, &["rev-parse", &format!("HEAD:{subdir}")], no_env)?;
    let date = git(dir, &["log", "-1", "--format=@%ct +0000", "HEAD"], no_env)?;
    let mut env: Vec<(&str, OsString)> = IDENTITY.iter().map(|(k, v)| (*k, v.into())).collect();
    env.push(("GIT_AUTHOR_DATE", date.clone().into()));
    env.push(("GIT_COMMITTER_DATE", date.into()));
    let message = format!("{subdir} at {head}");
    let commit = git(repo, &["commit-tree", &tree, "-m", &message], &env)?;
    Ok((
        commit,
        format!("{subdir}/ of HEAD {short} in {}", dir.display()),
    ))
}

/// `dir` as it is on disk, committed in `repo` through a temporary index.
fn on_disk(dir: &Path, repo: &Path, tmp: &Path) -> Result<(String, String), LocalSourceError> {
    let mut env: Vec<(&str, OsString)> = IDENTITY.iter().map(|(k, v)| (*k, v.into())).collect();
    env.push(("GIT_DIR", repo.into()));
    env.push(("GIT_WORK_TREE", dir.into()));
    env.push(("GIT_INDEX_FILE", tmp.join("index").into()));
    git(dir, &["add", "--all", "."], &env)?;
    let tree = git(dir, &["write-tree"], &env)?;
    let message = format!("snapshot of {}", dir.display());
    let commit = git(dir, &["commit-tree", &tree, "-m", &message], &env)?;
    Ok((commit, format!("a snapshot of {}", dir.display())))
}
