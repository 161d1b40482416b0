//! The authorizer of a guest that holds no S3 key: the node agent that runs it grants each
//! request of its upload ([`builder_contract::upload`]). Each step is a JSON POST signed with
//! the build's key like the guest's report, with a fresh nonce, retried under the shared
//! policy while the node is unreachable or answers 5xx/408/429. The node aborts an unfinished
//! upload when the build ends, so [`Authorizer::abort`] has nothing to do here.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::upload::{
    upload_url, CompletedPart, ObjectDigest, PartPlan, PartRequest, SignedRequest, UploadComplete,
    UploadStart, UploadStarted, UploadStep, UploadVerified,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use url::Url;

use crate::client::{http_client, send_retried, S3Error};
use crate::engine::Authorizer;

/// What the rootfs is, as the node records it in the object's metadata.
#[derive(Debug, Clone)]
pub struct GrantedObject {
    /// The rootfs's SHA-256.
    pub sha256: String,
    pub image_digest: String,
    pub commit_sha: String,
}

/// Grants from the node agent behind a build's report route.
pub struct NodeGrant {
    http: reqwest::Client,
    notify_url: Url,
    build_id: String,
    key: Vec<u8>,
    object: GrantedObject,
    /// The size the node agreed to, and what it answered at the end.
    started: Mutex<Option<(u64, Option<UploadVerified>)>>,
}

impl NodeGrant {
    /// Grants for build `build_id` from the node whose report route is `notify_url`, signed
    /// with `key`; `None` when `notify_url` is not a node agent's report route of this build.
    pub fn new(
        notify_url: &Url,
        build_id: &str,
        key: &[u8],
        object: GrantedObject,
    ) -> Option<Self> {
        upload_url(notify_url, build_id, UploadStep::Start)?;
        Some(NodeGrant {
            http: http_client(),
            notify_url: notify_url.clone(),
            build_id: build_id.to_string(),
            key: key.to_vec(),
            object,
            started: Mutex::default(),
        })
    }

    /// What the node answered when it completed and checked the upload.
    pub fn verified(&self) -> Option<UploadVerified> {
        self.started
            .lock()
            .expect("grant state lock")
            .as_ref()
            .and_then(|(_, verified)| verified.clone())
    }

    /// POSTs `body` (made afresh per attempt: a new nonce) to `step`'s route; its answer.
    async fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        step: UploadStep,
        part: Option<u32>,
        body: impl Fn(String) -> B,
    ) -> Result<T, S3Error> {
        let url = upload_url(&self.notify_url, &self.build_id, step)
            .expect("checked when the grant was made");
        let name = step.as_str();
        send_retried(name, url.path(), part, |_| {
            let body = serde_json::to_vec(&body(nonce())).expect("a grant request serializes");
            let url = url.clone();
            async move {
                let transport = |source| S3Error::GrantTransport {
                    step: name,
                    url: url.to_string(),
                    source,
                };
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let response = self
                    .http
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(TIMESTAMP_HEADER, timestamp.to_string())
                    .header(SIGNATURE_HEADER, sign(&self.key, timestamp, &body))
                    .body(body)
                    .send()
                    .await
                    .map_err(transport)?;
                let status = response.status();
                if !status.is_success() {
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body = response.text().await.unwrap_or_default();
                    return Err(S3Error::GrantRefused {
                        step: name,
                        url: url.to_string(),
                        status,
                        body: body.chars().take(500).collect(),
                        retry_after,
                    });
                }
                let bytes = response.bytes().await.map_err(transport)?;
                serde_json::from_slice(&bytes).map_err(|e| S3Error::GrantAnswer {
                    step: name,
                    reason: e.to_string(),
                })
            }
        })
        .await
    }
}

/// 128 random bits in hex: what makes each signed request new.
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the kernel gives random bytes");
    hex::encode(bytes)
}

impl Authorizer for NodeGrant {
    async fn start(
        &self,
        plan: &PartPlan,
        companion: Option<&ObjectDigest>,
    ) -> Result<Option<SignedRequest>, S3Error> {
        let config = companion.cloned().ok_or(S3Error::GrantAnswer {
            step: "start",
            reason: "a granted upload needs the image config beside the rootfs".into(),
        })?;
        let started: UploadStarted = self
            .post(UploadStep::Start, None, |nonce| UploadStart {
                nonce,
                size: plan.size,
                sha256: self.object.sha256.clone(),
                part_size: plan.part_size,
                image_digest: self.object.image_digest.clone(),
                commit_sha: self.object.commit_sha.clone(),
                config: config.clone(),
            })
            .await?;
        if started.parts != plan.parts {
            return Err(S3Error::GrantAnswer {
                step: "start",
                reason: format!(
                    "the node expects {} parts, not {}",
                    started.parts, plan.parts
                ),
            });
        }
        *self.started.lock().expect("grant state lock") = Some((plan.size, None));
        Ok(Some(started.config))
    }

    async fn part(&self, number: u32, digest: &ObjectDigest) -> Result<SignedRequest, S3Error> {
        self.post(UploadStep::Part, Some(number), |nonce| PartRequest {
            nonce,
            number,
            digest: digest.clone(),
        })
        .await
    }

    async fn complete(&self, parts: &[CompletedPart]) -> Result<(), S3Error> {
        let verified: UploadVerified = self
            .post(UploadStep::Complete, None, |nonce| UploadComplete {
                nonce,
                parts: parts.to_vec(),
            })
            .await?;
        let mut started = self.started.lock().expect("grant state lock");
        let size = started.as_ref().map(|(size, _)| *size).unwrap_or_default();
        if verified.size != size || verified.sha256 != self.object.sha256 {
            return Err(S3Error::GrantAnswer {
                step: "complete",
                reason: format!(
                    "the node verified {} bytes of sha256 {}, not the {size} bytes of sha256 {} \
                     sent",
                    verified.size, verified.sha256, self.object.sha256
                ),
            });
        }
        *started = Some((size, Some(verified)));
        Ok(())
    }

    async fn abort(&self) {}
}
