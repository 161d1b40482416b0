//! The Docker daemon, through its Engine API: pull, find an image's layer directories or stream
//! it out, load, remove, prune. Building is BuildKit's, through buildx (`buildkit`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::ImageInspect;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ImportImageOptionsBuilder, PruneImagesOptions,
    RemoveImageOptionsBuilder,
};
use bollard::Docker;
use builder_contract::{ImageConfig, Phase};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::error::{chain, BuildError};
use crate::log::BuildLog;

/// Seconds the client waits for one API call (a build's stream may run longer between lines).
const API_TIMEOUT_SECS: u64 = 3600;

pub struct DockerDaemon {
    docker: Docker,
}

impl DockerDaemon {
    /// Connects to `host` (`unix:///path` or `tcp://`/`http://`) and negotiates the API version.
    pub async fn connect(host: &str) -> Result<Self, BuildError> {
        let fail = |e: bollard::errors::Error| {
            BuildError::internal(
                Phase::Build,
                format!(
                    "cannot connect to the Docker daemon at {host}: {}",
                    chain(&e)
                ),
            )
        };
        let docker = if let Some(path) = host.strip_prefix("unix://") {
            Docker::connect_with_unix(path, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_http(host, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        .map_err(fail)?;
        let docker = docker.negotiate_version().await.map_err(fail)?;
        Ok(DockerDaemon { docker })
    }

    /// Pulls `image` (`docker pull`); the error says why it could not be fetched.
    pub async fn pull(&self, image: &str) -> Result<(), String> {
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = self.docker.create_image(Some(options), None, None);
        while let Some(item) = stream.next().await {
            item.map_err(|e| chain(&e))?;
        }
        Ok(())
    }

    /// Streams the image in `docker save` format into `out`; returns its size in bytes.
    pub async fn save(&self, tag: &str, out: &Path) -> Result<u64, BuildError> {
        const PHASE: Phase = Phase::Export;
        let io_error = |e: std::io::Error| {
            if crate::error::is_disk_full(&e) {
                BuildError::disk_full(PHASE, "writing the image archive")
            } else {
                BuildError::internal(PHASE, format!("cannot write {}: {e}", out.display()))
            }
        };
        let file = tokio::fs::File::create(out).await.map_err(io_error)?;
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut stream = self.docker.export_image(tag);
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                BuildError::internal(
                    PHASE,
                    format!("the daemon failed to export the image: {}", chain(&e)),
                )
            })?;
            size += chunk.len() as u64;
            writer.write_all(&chunk).await.map_err(io_error)?;
        }
        writer.flush().await.map_err(io_error)?;
        Ok(size)
    }

    /// Where the files of `image` are: its id, its config and, when the daemon keeps it in
    /// overlay2 without user-namespace remapping, the layers' `diff` directories.
    pub async fn inspect_storage(&self, image: &str) -> Result<ImageStorage, BuildError> {
        let fail = |what: &str, e: bollard::errors::Error| {
            BuildError::internal(Phase::Convert, format!("cannot {what}: {}", chain(&e)))
        };
        let inspect = self
            .docker
            .inspect_image(image)
            .await
            .map_err(|e| fail(&format!("inspect the image {image}"), e))?;
        let id = inspect
            .id
            .clone()
            .ok_or_else(|| BuildError::internal(Phase::Convert, "the image has no id"))?;
        let config = inspect.config.clone().map(image_config).unwrap_or_default();
        let remapped = self
            .docker
            .info()
            .await
            .map_err(|e| fail("ask the daemon for its settings", e))?
            .security_options
            .unwrap_or_default()
            .iter()
            .any(|option| option.contains("name=userns"));
        let layer_dirs = if remapped {
            Err("the daemon remaps user namespaces (its layers hold shifted ids)".to_owned())
        } else {
            overlay2_layer_dirs(&inspect)
        };
        Ok(ImageStorage {
            id,
            config,
            layer_dirs,
        })
    }

    /// Loads a `docker save` archive into the daemon (`docker load`); returns what it said.
    pub async fn load(&self, archive: &Path) -> Result<String, String> {
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
        let body = bollard::body_try_stream(ReaderStream::with_capacity(file, 1 << 20));
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut stream = self.docker.import_image(options, body, None);
        let mut said = String::new();
        while let Some(item) = stream.next().await {
            let info =
                item.map_err(|e| format!("cannot load {}: {}", archive.display(), chain(&e)))?;
            said.push_str(info.stream.as_deref().unwrap_or_default().trim());
        }
        Ok(said)
    }

    /// Removes the image and its intermediate layers (best effort: a leftover image is logged).
    pub async fn remove(&self, log: &BuildLog, tag: &str) {
        let options = RemoveImageOptionsBuilder::default().force(true).build();
        if let Err(e) = self.docker.remove_image(tag, Some(options), None).await {
            log.line(&format!(
                "warning: cannot remove the image {tag}: {}",
                chain(&e)
            ));
        }
    }

    /// Removes the dangling images (`docker image prune -f`): untagged ones no build needs, as
    /// earlier builds may leave on a cache disk. Tagged base images stay, and BuildKit's cache
    /// keeps the layers it needs. Returns how many were removed and the bytes freed.
    pub async fn prune_dangling_images(&self) -> Result<(usize, u64), String> {
        let options = PruneImagesOptions {
            filters: Some(HashMap::from([(
                "dangling".to_string(),
                vec!["true".to_string()],
            )])),
        };
        let pruned = self
            .docker
            .prune_images(Some(options))
            .await
            .map_err(|e| format!("cannot prune the dangling images: {}", chain(&e)))?;
        Ok((
            pruned.images_deleted.map_or(0, |deleted| deleted.len()),
            pruned
                .space_reclaimed
                .map_or(0, |bytes| bytes.max(0) as u64),
        ))
    }
}

/// Where an image's files are, as the daemon describes it.
pub struct ImageStorage {
    /// `sha256:` digest of the image config (`docker image inspect`'s `Id`).
    pub id: String,
    /// The runtime part of the image config.
    pub config: ImageConfig,
    /// The layers' overlay2 `diff` directories, lowest first, or why there are none to read.
    pub layer_dirs: Result<Vec<PathBuf>, String>,
}

/// The layer directories `GraphDriver` names: `LowerDir` (colon-separated, topmost first)
/// below `UpperDir` (the top layer), one per layer of `RootFS`.
fn overlay2_layer_dirs(inspect: &ImageInspect) -> Result<Vec<PathBuf>, String> {
    let driver = inspect
        .graph_driver
        .as_ref()
        .ok_or("the daemon does not say where the layers are")?;
    if driver.name != "overlay2" {
        return Err(format!(
            "the storage driver is {:?}, not overlay2",
            driver.name
        ));
    }
    let upper = driver
        .data
        .get("UpperDir")
        .ok_or("the overlay2 data has no UpperDir")?;
    let mut dirs: Vec<PathBuf> = driver
        .data
        .get("LowerDir")
        .map(|lower| lower.split(':').rev().map(PathBuf::from).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from(upper));
    let layers = inspect
        .root_fs
        .as_ref()
        .and_then(|root| root.layers.as_ref())
        .map_or(0, Vec::len);
    if dirs.len() != layers {
        return Err(format!(
            "the overlay2 data names {} layer directories for {layers} layers",
            dirs.len()
        ));
    }
    Ok(dirs)
}

/// The runtime part of an image config, as the converter writes it into the rootfs (the same
/// fields the image's config document has: `docker image inspect` shows that document's
/// `config`).
fn image_config(config: bollard::models::ImageConfig) -> ImageConfig {
    ImageConfig {
        entrypoint: config.entrypoint,
        cmd: config.cmd,
        env: config.env,
        working_dir: config.working_dir,
        user: config.user,
        // Docker omits an empty port set; an explicit null reads as empty here.
        exposed_ports: config.exposed_ports.filter(|p| !p.is_empty()).map(|ports| {
            ports
                .into_iter()
                .map(|port| (port, serde_json::json!({})))
                .collect()
        }),
    }
}
