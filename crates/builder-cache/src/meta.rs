//! A key's `meta.json`: who it belongs to, when it was made and last used, how often it was
//! committed. Written to a temporary file, synced and renamed over the old one, so a reader
//! sees the old or the new, never a torn file.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{io_err, CacheError};

/// File name of a key's metadata in its directory.
pub(crate) const META_FILE: &str = "meta.json";
const META_TMP_FILE: &str = "meta.json.tmp";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeyMeta {
    pub namespace: String,
    pub name: String,
    pub created_unix_ms: u64,
    pub last_used_unix_ms: u64,
    pub commits: u64,
}

impl KeyMeta {
    /// The metadata in `key_dir`; `None` when it has none.
    pub(crate) fn read(key_dir: &Path) -> Result<Option<KeyMeta>, CacheError> {
        let path = key_dir.join(META_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| CacheError::Meta { path, source })
    }

    /// Replaces the metadata in `key_dir` (tmp file, fsync, rename; the directory is synced by
    /// the caller).
    pub(crate) fn write(&self, key_dir: &Path) -> Result<(), CacheError> {
        let tmp = key_dir.join(META_TMP_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|source| CacheError::Meta {
            path: tmp.clone(),
            source,
        })?;
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(&json).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        let path = key_dir.join(META_FILE);
        std::fs::rename(&tmp, &path).map_err(io_err("rename the metadata into", &path))
    }
}
