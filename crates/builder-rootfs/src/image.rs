//! Image metadata: finds the config and the ordered layer list in a `docker save` archive
//! (Docker 20.10: `manifest.json`) or an OCI image layout archive (`index.json` → manifest),
//! and extracts the runtime part of the image config.

use builder_contract::ImageConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::archive::ArchiveIndex;
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
        let (id, config) = read_config(archive, &entry.config, None)?;
        Ok(Image {
            id,
            config,
            layers: entry.layers,
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
            let (id, config) = read_config(archive, &config_member, Some(&manifest.config.digest))?;
            let layers = manifest
                .layers
                .iter()
                .map(|layer| blob_member(&blob, &layer.digest))
                .collect::<Result<_, _>>()?;
            return Ok(Image { id, config, layers });
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

/// Reads the image config; returns the image id (digest of the document) and its runtime part.
fn read_config(
    archive: &ArchiveIndex,
    member: &str,
    expected_digest: Option<&str>,
) -> Result<(String, ImageConfig), ConvertError> {
    #[derive(Deserialize)]
    struct Document {
        #[serde(default)]
        config: Option<ImageConfig>,
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
    Ok((id, document.config.unwrap_or_default()))
}
