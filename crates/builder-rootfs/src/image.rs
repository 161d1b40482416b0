//! Image metadata: finds the config and the ordered layer list in a `docker save` archive
//! (Docker 20.10: `manifest.json`) or an OCI image layout archive (`index.json` → manifest),
//! and extracts the runtime part of the image config.

use builder_contract::ImageConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::archive::{ArchiveIndex, Span, Window};
use crate::error::ConvertError;

/// The largest metadata document (manifest, index, config) read into memory.
const MAX_METADATA_BYTES: u64 = 16 << 20;
/// How many nested OCI indexes are followed.
const MAX_INDEX_DEPTH: usize = 4;

/// The parts of an image that the conversion needs.
pub(crate) struct Image {
    /// `sha256:<hex of the config document>`.
    pub id: String,
    pub config: ImageConfig,
    /// Archive member names of the layers, lowest first.
    pub layers: Vec<String>,
    /// The config's `rootfs.diff_ids`: the sha256 of each uncompressed layer, lowest first
    /// (empty when the config lists none; then there is nothing to check the layers against).
    pub diff_ids: Vec<String>,
}

impl Image {
    pub fn read(archive: &ArchiveIndex) -> Result<Self, ConvertError> {
        if archive.span("manifest.json").is_ok() {
            Self::read_docker(archive)
        } else if archive.span("index.json").is_ok() {
            Self::read_oci(archive)
        } else {
            Err(ConvertError::MissingMember {
                member: "manifest.json".into(),
                reason: "the archive has neither a docker save manifest.json nor an OCI index.json"
                    .into(),
            })
        }
    }

    fn read_docker(archive: &ArchiveIndex) -> Result<Self, ConvertError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            layers: Vec<String>,
        }
        let manifest: Vec<Entry> = parse(archive, "manifest.json")?;
        let entry = match <[Entry; 1]>::try_from(manifest) {
            Ok([entry]) => entry,
            Err(all) => {
                return Err(ConvertError::InvalidMetadata {
                    member: "manifest.json".into(),
                    reason: format!("it describes {} images, expected exactly one", all.len()),
                })
            }
        };
        let (id, config, diff_ids) = read_config(archive, &entry.config, None)?;
        check_layer_count(&entry.config, &diff_ids, entry.layers.len())?;
        Ok(Image {
            id,
            config,
            layers: entry.layers,
            diff_ids,
        })
    }

    fn read_oci(archive: &ArchiveIndex) -> Result<Self, ConvertError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Descriptor {
            media_type: Option<String>,
            digest: String,
            platform: Option<Platform>,
        }
        #[derive(Deserialize)]
        struct Platform {
            architecture: String,
            os: String,
        }
        #[derive(Deserialize)]
        struct Index {
            manifests: Vec<Descriptor>,
        }
        #[derive(Deserialize)]
        struct Manifest {
            config: Descriptor,
            layers: Vec<Descriptor>,
        }
        let mut member = "index.json".to_owned();
        for _ in 0..MAX_INDEX_DEPTH {
            let index: Index = parse(archive, &member)?;
            let chosen = if index.manifests.len() == 1 {
                index.manifests.into_iter().next()
            } else {
                index.manifests.into_iter().find(|d| {
                    d.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
            };
            let descriptor = chosen.ok_or_else(|| ConvertError::InvalidMetadata {
                member: member.clone(),
                reason: "no single manifest, and none for linux/amd64".into(),
            })?;
            let blob = blob_member(&member, &descriptor.digest)?;
            let is_index = descriptor.media_type.as_deref().is_some_and(|t| {
                t == "application/vnd.oci.image.index.v1+json"
                    || t == "application/vnd.docker.distribution.manifest.list.v2+json"
            });
            if is_index {
                member = blob;
                continue;
            }
            let manifest: Manifest = parse(archive, &blob)?;
            let config_member = blob_member(&blob, &manifest.config.digest)?;
            let (id, config, diff_ids) =
                read_config(archive, &config_member, Some(&manifest.config.digest))?;
            let layers: Vec<String> = manifest
                .layers
                .iter()
                .map(|layer| blob_member(&blob, &layer.digest))
                .collect::<Result<_, _>>()?;
            check_layer_count(&config_member, &diff_ids, layers.len())?;
            return Ok(Image {
                id,
                config,
                layers,
                diff_ids,
            });
        }
        Err(ConvertError::InvalidMetadata {
            member,
            reason: format!("more than {MAX_INDEX_DEPTH} nested image indexes"),
        })
    }
}

/// `blobs/<algorithm>/<hex>` for a digest, checked so it cannot name anything else.
fn blob_member(referrer: &str, digest: &str) -> Result<String, ConvertError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(format!("blobs/sha256/{hex}"))
        }
        _ => Err(ConvertError::InvalidMetadata {
            member: referrer.to_owned(),
            reason: format!("{digest:?} is not a sha256 digest"),
        }),
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    archive: &ArchiveIndex,
    member: &str,
) -> Result<T, ConvertError> {
    let bytes = archive.read_small(member, MAX_METADATA_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| ConvertError::InvalidMetadata {
        member: member.to_owned(),
        reason: e.to_string(),
    })
}

/// A config that lists diff_ids must list one per layer.
fn check_layer_count(member: &str, diff_ids: &[String], layers: usize) -> Result<(), ConvertError> {
    if diff_ids.is_empty() || diff_ids.len() == layers {
        return Ok(());
    }
    Err(ConvertError::InvalidMetadata {
        member: member.to_owned(),
        reason: format!(
            "it lists {} diff_ids for the {layers} layers of the manifest",
            diff_ids.len()
        ),
    })
}

/// Checks that the uncompressed layers (name, file, span) hash to the config's `diff_ids`
/// (none listed: nothing to check).
pub(crate) fn check_diff_ids(
    layers: &[(&str, &std::fs::File, Span)],
    diff_ids: &[String],
) -> Result<(), ConvertError> {
    use std::io::Read;
    for (&(name, file, span), expected) in layers.iter().zip(diff_ids) {
        let corrupt = |source| ConvertError::CorruptLayer {
            layer: name.to_owned(),
            source,
        };
        let mut sha = Sha256::new();
        let mut window = Window::new(file, span);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = window.read(&mut buf).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
        }
        let actual = format!("sha256:{}", hex::encode(sha.finalize()));
        if &actual != expected {
            return Err(ConvertError::LayerDigestMismatch {
                layer: name.to_owned(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// Reads the image config; returns the image id (digest of the document), its runtime part
/// and its `rootfs.diff_ids`.
fn read_config(
    archive: &ArchiveIndex,
    member: &str,
    expected_digest: Option<&str>,
) -> Result<(String, ImageConfig, Vec<String>), ConvertError> {
    #[derive(Deserialize)]
    struct Document {
        #[serde(default)]
        config: Option<ImageConfig>,
        #[serde(default)]
        rootfs: Option<RootFs>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    let bytes = archive.read_small(member, MAX_METADATA_BYTES)?;
    let id = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if let Some(expected) = expected_digest {
        if expected != id {
            return Err(ConvertError::InvalidMetadata {
                member: member.to_owned(),
                reason: format!("its digest is {id}, the manifest says {expected}"),
            });
        }
    }
    let document: Document =
        serde_json::from_slice(&bytes).map_err(|e| ConvertError::InvalidMetadata {
            member: member.to_owned(),
            reason: e.to_string(),
        })?;
    Ok((
        id,
        document.config.unwrap_or_default(),
        document.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    ))
}
