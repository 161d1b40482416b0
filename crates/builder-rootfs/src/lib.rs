//! Container image archive → ext4 root filesystem.
//!
//! [`convert`] takes a `docker save` archive (Docker 20.10 format) or an OCI image layout
//! archive and writes an ext4 image equal, entry for entry, to what `docker export` of a
//! container of the image gives:
//!
//! 1. `archive`: index the outer tar (member → byte range), nothing extracted;
//! 2. `image`: find the config and the ordered layers (`manifest.json` or `index.json`);
//! 3. `tree`: apply every layer, validated as hostile input, to an in-memory tree whose file
//!    contents are byte ranges of the archive (gzip layers are first inflated into the work
//!    area, since a compressed stream cannot be addressed);
//! 4. `materialize`: write the tree into a staging directory under `work_dir`;
//! 5. `ext4`: `mkfs.ext4 -d` into a right-sized sparse file, with identifiers derived from the
//!    image id and timestamps pinned, so the same image always gives the same bytes.
//!
//! Nothing is read or written outside the archive, `work_dir` and the output file.

mod archive;
mod error;
mod ext4;
mod image;
mod materialize;
mod tree;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use error::{ConvertError, EntryProblem};
pub use image::ImageConfig;

use archive::{ArchiveIndex, Span, Window};
use error::io_err;
use image::Image;
use tree::{LayerInput, Limits, Tree};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Scratch space (staging directory, inflated gzip layers). Must exist; the converter
    /// works in a fresh directory inside it and removes that directory when done.
    pub work_dir: PathBuf,
    /// Free space left in the file system, as a percentage of what the image uses.
    pub free_space_percent: u32,
    /// Free space left at least, in bytes.
    pub min_free_bytes: u64,
    /// Most tar entries accepted, over all layers.
    pub max_entries: u64,
    /// Most bytes a compressed layer may inflate to.
    pub max_layer_bytes: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            work_dir: std::env::temp_dir(),
            free_space_percent: 20,
            min_free_bytes: 64 << 20,
            max_entries: 10_000_000,
            max_layer_bytes: 256 << 30,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// `sha256:<digest of the image config>`.
    pub image_id: String,
    /// The runtime part of the image config.
    pub config: ImageConfig,
    /// Apparent size of the ext4 file.
    pub size_bytes: u64,
    /// Hex sha256 of the ext4 file.
    pub sha256: String,
    /// Directory entries in the file system (hardlinks counted per name, the root excluded).
    pub entries: u64,
}

/// Converts `image_archive` into an ext4 file at `output` (replaced if it exists). On error,
/// `output` is removed.
pub fn convert(
    image_archive: &Path,
    output: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let result = convert_inner(image_archive, output, options);
    if result.is_err() {
        let _ = std::fs::remove_file(output);
    }
    result
}

fn convert_inner(
    image_archive: &Path,
    output: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let index = ArchiveIndex::open(image_archive)?;
    let image = Image::read(&index)?;
    let work = tempfile::Builder::new()
        .prefix("builder-rootfs-")
        .tempdir_in(&options.work_dir)
        .map_err(io_err("create a work directory in", &options.work_dir))?;

    // Source 0 is the archive; inflated layers follow.
    let mut inflated: Vec<File> = Vec::new();
    let mut layers = Vec::with_capacity(image.layers.len());
    for name in &image.layers {
        let span = index.span(name)?;
        match detect_compression(index.file(), span).map_err(|source| {
            ConvertError::CorruptLayer {
                layer: name.clone(),
                source,
            }
        })? {
            Compression::None => layers.push((name.as_str(), 0, span)),
            Compression::Gzip => {
                let path = work.path().join(format!("layer-{}.tar", inflated.len()));
                let file = inflate(index.file(), span, &path, name, options.max_layer_bytes)?;
                let len = file.metadata().map_err(io_err("stat", &path))?.len();
                inflated.push(file);
                layers.push((name.as_str(), inflated.len(), Span { offset: 0, len }));
            }
            Compression::Zstd => {
                return Err(ConvertError::CorruptLayer {
                    layer: name.clone(),
                    source: io::Error::other("zstd-compressed layers are not supported"),
                })
            }
        }
    }
    let mut sources: Vec<&File> = vec![index.file()];
    sources.extend(inflated.iter());

    let mut tree = Tree::new(Limits {
        max_entries: options.max_entries,
    });
    for &(name, source, span) in &layers {
        tree.apply_layer(&LayerInput {
            name,
            file: sources[source],
            source,
            span,
        })?;
    }
    tree.add_mount_points();
    tracing::debug!(
        layers = layers.len(),
        nodes = tree.nodes.len(),
        "layers applied"
    );

    let staging = work.path().join("rootfs");
    std::fs::create_dir(&staging).map_err(io_err("create", &staging))?;
    let usage = materialize::materialize(&tree, &sources, &staging)?;
    let root = tree.nodes[tree::ROOT].meta.clone();
    drop(tree);
    drop(inflated);

    let sizing = ext4::size_for(&usage, options.free_space_percent, options.min_free_bytes);
    ext4::make_filesystem(&staging, output, work.path(), &sizing, &image.id)?;
    ext4::finish_inodes(output, &root)?;
    let (size_bytes, sha256) = ext4::digest_file(output)?;
    work.close()
        .map_err(io_err("remove the work directory in", &options.work_dir))?;
    Ok(ConvertReport {
        image_id: image.id,
        config: image.config,
        size_bytes,
        sha256,
        entries: usage.entries,
    })
}

enum Compression {
    None,
    Gzip,
    Zstd,
}

fn detect_compression(file: &File, span: Span) -> io::Result<Compression> {
    let mut magic = [0u8; 4];
    let n = Window::new(file, span).read(&mut magic)?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// Inflates a gzip layer into `path`, refusing to write more than `max` bytes.
fn inflate(
    file: &File,
    span: Span,
    path: &Path,
    layer: &str,
    max: u64,
) -> Result<File, ConvertError> {
    let mut out = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    let decoder = flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(
        1 << 20,
        Window::new(file, span),
    ));
    let mut limited = decoder.take(max + 1);
    let written = io::copy(&mut limited, &mut out).map_err(|source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            ConvertError::Io {
                op: "write",
                path: path.to_owned(),
                source,
            }
        } else {
            ConvertError::CorruptLayer {
                layer: layer.to_owned(),
                source,
            }
        }
    })?;
    if written > max {
        return Err(ConvertError::LimitExceeded {
            what: "inflated layer bytes",
            limit: max,
        });
    }
    Ok(out)
}
