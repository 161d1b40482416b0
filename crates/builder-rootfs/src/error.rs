//! Everything that can make a conversion fail, split into what the image is to blame for
//! (`is_user_caused`) and what the host is to blame for, with ENOSPC recognised anywhere in the
//! chain (`is_disk_full`).

use std::error::Error as _;
use std::io;
use std::path::PathBuf;

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The image archive cannot be opened or read at all.
    #[error("cannot read the image archive {path}")]
    ReadArchive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The outer archive (`docker save` / OCI layout tar) is not a well-formed tar file.
    #[error("the image archive {path} is corrupt: {reason}")]
    CorruptArchive { path: PathBuf, reason: String },
    /// A member the image metadata refers to is not in the archive, or points outside it.
    #[error("the image archive has no usable member {member:?}: {reason}")]
    MissingMember { member: String, reason: String },
    /// `manifest.json`, `index.json`, an OCI manifest or the image config is malformed.
    #[error("invalid image metadata in {member:?}: {reason}")]
    InvalidMetadata { member: String, reason: String },
    /// A layer is not a readable tar stream (truncated, bad checksum, bad compression).
    #[error("layer {layer:?} is corrupt")]
    CorruptLayer {
        layer: String,
        #[source]
        source: io::Error,
    },
    /// A layer's content does not hash to the `diff_id` the image config lists for it.
    #[error("layer {layer:?} does not match the image config: its sha256 is {actual}, the config's diff_id is {expected}")]
    LayerDigestMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
    /// An entry of a layer is rejected: the message names the layer, the entry and why.
    #[error("layer {layer:?}, entry {entry:?}: {problem}")]
    InvalidEntry {
        layer: String,
        entry: String,
        problem: EntryProblem,
    },
    /// A layer directory of the Docker daemon's overlay2 store uses an overlayfs feature a
    /// layer tar cannot express (redirected directories, metadata-only copy-up, user xattrs
    /// of rootless overlayfs, ...): convert the image from `docker save` instead.
    #[error(
        "the layer directory {layer} cannot be read directly: {entry:?} {reason}; convert the \
         image from docker save instead"
    )]
    UnsupportedLayerDir {
        layer: PathBuf,
        entry: String,
        reason: String,
    },
    /// The image is larger than the converter accepts.
    #[error("the image exceeds the limit on {what} ({limit})")]
    LimitExceeded { what: &'static str, limit: u64 },
    /// A host file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The init to inject would not run in every image: it needs a dynamic loader.
    #[error(
        "the init {path} is not a statically linked x86-64 ELF executable ({reason}); build it \
         with RUSTFLAGS=\"-C target-feature=+crt-static\" --target x86_64-unknown-linux-gnu"
    )]
    InitNotStatic { path: PathBuf, reason: String },
    /// The planned file system turned out too small for what it must hold (a sizing bug).
    #[error("the ext4 file system of {blocks} blocks planned for the image is too small for its content")]
    Ext4TooSmall { blocks: u64 },
    /// The ext4 writer refused the merged tree (which the converter validates first: a bug).
    #[error("the ext4 writer refused the merged tree")]
    Ext4Writer(#[source] builder_ext4::Ext4Error),
}

/// Why a single layer entry is rejected.
#[derive(Debug, thiserror::Error)]
pub enum EntryProblem {
    #[error("the path is absolute")]
    AbsolutePath,
    #[error("the path contains a `..` component")]
    ParentComponent,
    #[error("the path is empty")]
    EmptyPath,
    #[error("the path goes through the symlink {symlink:?}")]
    ThroughSymlink { symlink: String },
    #[error("the path goes through {component:?}, which is not a directory")]
    ThroughNonDirectory { component: String },
    #[error("a name component is longer than 255 bytes")]
    NameTooLong,
    #[error("the path is deeper than {max} directories")]
    TooDeep { max: usize },
    #[error("only a directory may replace the root directory")]
    ReplacesRoot,
    #[error("the hardlink target {target:?} is absolute")]
    HardlinkAbsolute { target: String },
    #[error("the hardlink target {target:?} contains a `..` component")]
    HardlinkParent { target: String },
    #[error("the hardlink target {target:?} does not exist")]
    HardlinkMissing { target: String },
    #[error("the hardlink target {target:?} is a directory")]
    HardlinkToDirectory { target: String },
    #[error("the hardlink target {target:?} goes through the symlink {symlink:?}")]
    HardlinkThroughSymlink { target: String, symlink: String },
    #[error("the symlink target is empty or longer than 4095 bytes")]
    BadSymlinkTarget,
    #[error("the whiteout names an invalid file")]
    BadWhiteout,
    #[error(
        "the extended attributes take {bytes} bytes, more than the {max} an ext4 inode can hold"
    )]
    XattrsTooLarge { bytes: usize, max: usize },
    #[error(
        "the extended attribute name {name:?} cannot be stored in ext4 (names start with user., \
         trusted. or security., or are a POSIX ACL, and are at most 255 bytes)"
    )]
    BadXattrName { name: String },
    #[error("the data ({size} bytes at offset {offset}) runs past the end of the layer ({layer_size} bytes): truncated or lying header")]
    Truncated {
        offset: u64,
        size: u64,
        layer_size: u64,
    },
    #[error("the mtime {mtime} is outside the range ext4 can store")]
    BadMtime { mtime: u64 },
    #[error("the entry type {0:?} is not supported")]
    UnsupportedType(char),
    #[error("sparse tar entries are not supported")]
    SparseUnsupported,
    #[error("the extended header (PAX or GNU long name) of {size} bytes is larger than the {max} accepted")]
    ExtensionTooLarge { size: u64, max: u64 },
}

impl ConvertError {
    /// Whether a write failed because a disk is full (ENOSPC anywhere in the chain).
    pub fn is_disk_full(&self) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = self.source();
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                if io.raw_os_error() == Some(libc::ENOSPC) {
                    return true;
                }
            }
            next = err.source();
        }
        false
    }

    /// Whether the image itself is to blame (malformed, hostile or oversized content), as
    /// opposed to the host (I/O, missing tools, disk full, a corrupt archive written by Docker).
    pub fn is_user_caused(&self) -> bool {
        match self {
            ConvertError::InvalidEntry { .. } | ConvertError::LimitExceeded { .. } => true,
            ConvertError::ReadArchive { .. }
            | ConvertError::CorruptArchive { .. }
            | ConvertError::MissingMember { .. }
            | ConvertError::InvalidMetadata { .. }
            | ConvertError::UnsupportedLayerDir { .. }
            | ConvertError::CorruptLayer { .. }
            | ConvertError::LayerDigestMismatch { .. }
            | ConvertError::Io { .. }
            | ConvertError::InitNotStatic { .. }
            | ConvertError::Ext4TooSmall { .. }
            | ConvertError::Ext4Writer(_) => false,
        }
    }
}

impl From<builder_ext4::Ext4Error> for ConvertError {
    /// The writer's errors as the converter's: its limits are the image's to blame, the rest
    /// (I/O, a tree the converter should not have produced, a sizing bug) the host's.
    fn from(e: builder_ext4::Ext4Error) -> Self {
        use builder_ext4::Ext4Error as E;
        match e {
            E::Output { op, path, source } | E::Content { op, path, source } => {
                ConvertError::Io { op, path, source }
            }
            E::LimitExceeded { what, limit } => ConvertError::LimitExceeded { what, limit },
            E::TooSmall { blocks } => ConvertError::Ext4TooSmall { blocks },
            other => ConvertError::Ext4Writer(other),
        }
    }
}

/// Shorthand for building [`ConvertError::Io`] in `map_err`.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ConvertError {
    let path = path.into();
    move |source| ConvertError::Io { op, path, source }
}
