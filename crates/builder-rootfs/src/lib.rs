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
//! 4. `ext4`: write the tree straight into a right-sized, sparse ext4 file in one sequential
//!    pass (every content byte read once from its source, written once, hashed on the way),
//!    with identifiers derived from the image id, so the same image always gives the same bytes.
//!
//! Nothing is read or written outside the archive, `work_dir` and the output file.

mod archive;
mod error;
mod image;
mod layerdir;
mod source;
mod tree;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use builder_contract::ImageConfig;
pub use error::{ConvertError, EntryProblem};

use archive::{ArchiveIndex, Span, Window};
use error::io_err;
use image::Image;
use source::Sources;
use tree::{Content, LayerInput, Limits, Tree};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Scratch space (inflated gzip layers, the image config to inject). Must exist; the converter
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
    /// The static init to make the rootfs bootable: installed as [`INIT_PATH`], with the image
    /// config beside it as [`CONFIG_PATH`]; the VM then boots with `init=/.builder-vm/init`.
    pub init: Option<PathBuf>,
}

pub use builder_contract::image::{CONFIG_PATH, INIT_PATH};

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            work_dir: std::env::temp_dir(),
            free_space_percent: 20,
            min_free_bytes: 64 << 20,
            max_entries: 10_000_000,
            max_layer_bytes: 256 << 30,
            init: None,
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
    removed_on_error(output, convert_inner(image_archive, output, options))
}

/// Passes `result` on, removing `output` first when it is an error, so that no partial file
/// looks like a result.
fn removed_on_error(
    output: &Path,
    result: Result<ConvertReport, ConvertError>,
) -> Result<ConvertReport, ConvertError> {
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

    let mut sources = Sources::default();
    let archive = sources.add(
        index
            .file()
            .try_clone()
            .map_err(io_err("open", image_archive))?,
    );
    let mut layers = Vec::with_capacity(image.layers.len());
    for name in &image.layers {
        let span = index.span(name)?;
        match detect_compression(index.file(), span).map_err(|source| {
            ConvertError::CorruptLayer {
                layer: name.clone(),
                source,
            }
        })? {
            Compression::None => layers.push((name.as_str(), archive, span)),
            Compression::Gzip => {
                let path = work.path().join(format!("layer-{}.tar", layers.len()));
                let file = inflate(index.file(), span, &path, name, options.max_layer_bytes)?;
                let len = file.metadata().map_err(io_err("stat", &path))?.len();
                layers.push((name.as_str(), sources.add(file), Span { offset: 0, len }));
            }
            Compression::Zstd => {
                return Err(ConvertError::CorruptLayer {
                    layer: name.clone(),
                    source: io::Error::other("zstd-compressed layers are not supported"),
                })
            }
        }
    }

    let mut tree = Tree::new(Limits {
        max_entries: options.max_entries,
    });
    // The layers are hashed against the config's diff_ids on a second thread while the tree
    // is built from them (both read the same, by then cached, bytes).
    let hashed: Vec<(&str, &File, Span)> = layers
        .iter()
        .map(|&(name, source, span)| (name, sources.file(source), span))
        .collect();
    std::thread::scope(|scope| {
        let verified = scope.spawn(|| image::check_diff_ids(&hashed, &image.diff_ids));
        for &(name, source, span) in &layers {
            tree.apply_layer(&LayerInput {
                name,
                file: sources.file(source),
                source,
                span,
            })?;
        }
        verified.join().expect("the diff_id check does not panic")
    })?;
    tracing::debug!(
        layers = layers.len(),
        nodes = tree.fs.nodes.len(),
        "layers applied"
    );
    write_rootfs(
        tree,
        sources,
        &image.id,
        image.config,
        output,
        options,
        work,
    )
}

/// Converts an image straight from the Docker daemon's overlay2 layer store into an ext4 file
/// at `output` (replaced if it exists), giving the same file system as [`convert`] of its
/// `docker save` archive. `layer_dirs` are the layers' `diff` directories
/// (`<data-root>/overlay2/<id>/diff`, from `docker image inspect`'s `GraphDriver`), lowest
/// first; `image_id` is the image's `sha256:` config digest (`docker image inspect`'s `Id`)
/// and `config` the runtime part of that config. Each directory is read as the layer tar
/// Docker makes of it; one using an overlayfs feature a tar cannot express is refused with
/// [`ConvertError::UnsupportedLayerDir`] (then convert from `docker save`). On error, `output`
/// is removed.
pub fn convert_layer_dirs(
    image_id: &str,
    config: ImageConfig,
    layer_dirs: &[PathBuf],
    output: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    removed_on_error(
        output,
        convert_layer_dirs_inner(image_id, config, layer_dirs, output, options),
    )
}

fn convert_layer_dirs_inner(
    image_id: &str,
    config: ImageConfig,
    layer_dirs: &[PathBuf],
    output: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let is_digest = image_id.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !is_digest {
        return Err(ConvertError::InvalidMetadata {
            member: "image id".into(),
            reason: format!("{image_id:?} is not a sha256: digest"),
        });
    }
    let work = tempfile::Builder::new()
        .prefix("builder-rootfs-")
        .tempdir_in(&options.work_dir)
        .map_err(io_err("create a work directory in", &options.work_dir))?;
    let mut sources = Sources::default();
    let mut tree = Tree::new(Limits {
        max_entries: options.max_entries,
    });
    for path in layer_dirs {
        let dir = layerdir::open_layer_dir(path)?;
        let layer = sources.add_layer_dir(dir.try_clone().map_err(io_err("open", path))?);
        layerdir::apply(&mut tree, &mut sources, layer, &dir, path)?;
    }
    tracing::debug!(
        layers = layer_dirs.len(),
        nodes = tree.fs.nodes.len(),
        "layer directories applied"
    );
    write_rootfs(tree, sources, image_id, config, output, options, work)
}

/// The part every input shares: adds the mount points and (with `options.init`) the init and
/// the image config to `tree`, writes the ext4 file and removes the work area.
fn write_rootfs(
    mut tree: Tree,
    mut sources: Sources,
    image_id: &str,
    config: ImageConfig,
    output: &Path,
    options: &ConvertOptions,
    work: tempfile::TempDir,
) -> Result<ConvertReport, ConvertError> {
    tree.add_mount_points();
    if let Some(init) = &options.init {
        check_static_elf(init)?;
        let config_path = work.path().join("config.json");
        let config_json = serde_json::to_vec_pretty(&config).expect("a config always serializes");
        std::fs::write(&config_path, &config_json).map_err(io_err("write", &config_path))?;
        let mut files: Vec<(&[u8], u32, Content)> = Vec::new();
        for (name, mode, path) in [
            (&b"init"[..], 0o755, init.as_path()),
            (&b"config.json"[..], 0o644, config_path.as_path()),
        ] {
            let file = File::open(path).map_err(io_err("open", path))?;
            let len = file.metadata().map_err(io_err("stat", path))?.len();
            let source = sources.add(file);
            files.push((
                name,
                mode,
                Content {
                    source,
                    span: Span { offset: 0, len },
                },
            ));
        }
        tree.inject(b".builder-vm", &files);
    }

    let written = builder_ext4::write(
        &tree.fs,
        &sources,
        &builder_ext4::Options {
            size: builder_ext4::Size::Fit {
                free_space_percent: options.free_space_percent,
                min_free_bytes: options.min_free_bytes,
            },
            label: String::new(),
            uuid: derived_id(image_id, "filesystem uuid"),
            hash_seed: derived_id(image_id, "directory hash seed"),
            time: tree::DEFAULT_MTIME,
            journal: true,
            sha256: true,
            sync: true,
            create: builder_ext4::Create::Replace,
        },
        output,
    )?;
    drop(sources);
    work.close()
        .map_err(io_err("remove the work directory in", &options.work_dir))?;
    Ok(ConvertReport {
        image_id: image_id.to_owned(),
        config,
        size_bytes: written.size_bytes,
        sha256: written.sha256.expect("asked for"),
        entries: written.entries,
    })
}

/// 16 bytes derived from the image id and a purpose (UUID, hash seed): same image, same bytes.
fn derived_id(image_id: &str, purpose: &str) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"builder-rootfs ")
        .chain_update(purpose)
        .chain_update(b" ")
        .chain_update(image_id)
        .finalize();
    digest[..16].try_into().expect("16 bytes")
}

/// Refuses an init that has a program interpreter (`PT_INTERP`): in a scratch or Alpine image
/// there is no glibc loader to run it.
fn check_static_elf(path: &Path) -> Result<(), ConvertError> {
    const PT_INTERP: u32 = 3;
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    let fail = |reason: &str| ConvertError::InitNotStatic {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // e_ident: magic, ELFCLASS64, little endian; e_machine: x86-64.
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) || u16_at(18) != Some(62) {
        return Err(fail("not a 64-bit little-endian x86-64 ELF file"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err(fail("truncated ELF header"));
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)
            .unwrap_or(usize::MAX)
            .saturating_add(i * usize::from(phentsize));
        match u32_at(at) {
            Some(PT_INTERP) => return Err(fail("it has a program interpreter")),
            Some(_) => {}
            None => return Err(fail("truncated program headers")),
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_init_that_needs_a_dynamic_loader_is_refused() {
        let err = check_static_elf(Path::new("/bin/sh")).unwrap_err();
        assert!(err.to_string().contains("program interpreter"), "{err}");
        assert!(!err.is_user_caused());
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), "#!/bin/sh\n").unwrap();
        let err = check_static_elf(text.path()).unwrap_err();
        assert!(err.to_string().contains("not a 64-bit"), "{err}");
    }
}
