//! An image in the Docker daemon → a bootable ext4 rootfs, the one way the pipeline and
//! `builder-agent convert-image` do it.
//!
//! The fast path reads the layers straight from the daemon's overlay2 store
//! (`builder_rootfs::convert_layer_dirs`): in the builder VM the agent is root beside dockerd,
//! and every byte is read once, with no tar stream. When the store cannot be read that way
//! (another storage driver, user-namespace remapping, directories not readable here, e.g. a
//! remote daemon) or a layer uses an overlayfs feature a layer tar cannot express, the image
//! is streamed out with `docker save` into the work directory and converted from that archive.
//! Either way the log says which path was taken and why.

use std::path::{Path, PathBuf};

use builder_contract::{ErrorClass, Phase};
use builder_rootfs::{ConvertError, ConvertOptions, ConvertReport};

use crate::docker::DockerDaemon;
use crate::error::{chain, is_disk_full, BuildError};
use crate::log::BuildLog;

/// How the image came out of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRoute {
    /// Read from the daemon's overlay2 layer directories.
    LayerDirs,
    /// Streamed with `docker save`, for this reason.
    DockerSave(String),
}

impl ImageRoute {
    /// `layer-dirs` or `docker-save`.
    pub fn name(&self) -> &'static str {
        match self {
            ImageRoute::LayerDirs => "layer-dirs",
            ImageRoute::DockerSave(_) => "docker-save",
        }
    }
}

/// Converts `image` (a name or id the daemon knows) into the ext4 file `output`.
/// `options.work_dir` must exist; a `docker save` archive, when needed, goes there and is
/// removed afterwards.
pub async fn convert_image(
    docker: &DockerDaemon,
    log: &BuildLog,
    image: &str,
    output: &Path,
    options: &ConvertOptions,
) -> Result<(ConvertReport, ImageRoute), BuildError> {
    let storage = docker.inspect_storage(image).await?;
    let reason = match storage
        .layer_dirs
        .and_then(|dirs| readable(&dirs).map(|()| dirs))
    {
        Ok(dirs) => {
            log.line(&format!(
                "convert: reading {} layer directories of the daemon's overlay2 store",
                dirs.len()
            ));
            let (id, config) = (storage.id.clone(), storage.config.clone());
            let result = blocking(output, options, move |output, options| {
                builder_rootfs::convert_layer_dirs(&id, config, &dirs, output, options)
            })
            .await?;
            match result {
                Ok(report) => return Ok((report, ImageRoute::LayerDirs)),
                Err(e @ ConvertError::UnsupportedLayerDir { .. }) => chain(&e),
                Err(e) => return Err(convert_error(&e)),
            }
        }
        Err(reason) => reason,
    };
    log.line(&format!("convert: using docker save: {reason}"));
    let archive = options.work_dir.join("image.tar");
    let size = docker.save(image, &archive).await;
    let result = match size {
        Ok(size) => {
            log.line(&format!("image archive: {size} bytes"));
            let archive = archive.clone();
            blocking(output, options, move |output, options| {
                builder_rootfs::convert(&archive, output, options)
            })
            .await
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&archive);
    let report = result?.map_err(|e| convert_error(&e))?;
    if report.image_id != storage.id {
        return Err(BuildError::internal(
            Phase::Convert,
            format!(
                "docker save gave the image {}, but {image} is {}",
                report.image_id, storage.id
            ),
        ));
    }
    Ok((report, ImageRoute::DockerSave(reason)))
}

/// Whether every layer directory can be opened here.
fn readable(dirs: &[PathBuf]) -> Result<(), String> {
    for dir in dirs {
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Runs a conversion on the blocking pool.
async fn blocking(
    output: &Path,
    options: &ConvertOptions,
    convert: impl FnOnce(&Path, &ConvertOptions) -> Result<ConvertReport, ConvertError> + Send + 'static,
) -> Result<Result<ConvertReport, ConvertError>, BuildError> {
    let (output, options) = (output.to_path_buf(), options.clone());
    tokio::task::spawn_blocking(move || convert(&output, &options))
        .await
        .map_err(|e| BuildError::internal(Phase::Convert, format!("the converter crashed: {e}")))
}

/// Whose fault a conversion error is.
fn convert_error(e: &ConvertError) -> BuildError {
    if e.is_disk_full() {
        BuildError::disk_full(Phase::Convert, "writing the root filesystem")
    } else if e.is_user_caused() {
        BuildError::from_chain(Phase::Convert, ErrorClass::User, e)
    } else {
        BuildError::from_chain(Phase::Convert, ErrorClass::Internal, e)
    }
}

/// Creates `dir` (the converter's work directory), classing a full disk as such.
pub fn create_work_dir(dir: &Path) -> Result<(), BuildError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        if is_disk_full(&e) {
            BuildError::disk_full(Phase::Convert, "preparing the converter")
        } else {
            BuildError::internal(
                Phase::Convert,
                format!("cannot create {}: {e}", dir.display()),
            )
        }
    })
}
