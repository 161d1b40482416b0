//! The part-upload engine: one file to one key by multipart upload, several parts in flight,
//! each request authorized by an [`Authorizer`]: [`DirectUpload`] (credentials here, a host
//! run) or [`crate::NodeGrant`] (a node agent's grant, in the builder VM, which holds no key).
//!
//! Each part is read with `pread` and hashed (MD5 for its `Content-MD5`, SHA-256) on a
//! blocking thread; at most `parts_in_flight` parts are read and sent at once, so memory stays
//! at that many part buffers. A part's request is authorized once and sent under the shared
//! retry policy. The object appears only when the upload completes (and the authorizer has
//! checked it); on any failure the parts still in flight are dropped and the authorizer aborts
//! the upload, so nothing half-uploaded is left looking complete.

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use builder_contract::upload::{CompletedPart, ObjectDigest, PartPlan, SignedRequest};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::Method;
use sha2::{Digest, Sha256};

use crate::client::{
    content_md5, execute, http_client, multipart_etag, send_retried, Expected, ObjectAttributes,
    S3Client, S3Error,
};

/// Part size of multipart uploads by default (S3 allows 5 MiB to 5 GiB, at most 10 000 parts).
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
/// Parts sent at once by default (see `scripts/bench-upload.sh` for how it was chosen).
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 4;

/// Who authorizes the requests of one upload. The engine calls [`Authorizer::start`] once,
/// [`Authorizer::part`] once per part (the request it answers serves every retry of that
/// part), then [`Authorizer::complete`], or [`Authorizer::abort`] after a failure.
pub trait Authorizer: Sync {
    /// Begins the upload of a file cut by `plan`; the request that PUTs the companion object
    /// of digest `companion` (the image config beside a rootfs), when there is one.
    fn start(
        &self,
        plan: &PartPlan,
        companion: Option<&ObjectDigest>,
    ) -> impl Future<Output = Result<Option<SignedRequest>, S3Error>> + Send;

    /// The request that sends part `number` of digest `digest`.
    fn part(
        &self,
        number: u32,
        digest: &ObjectDigest,
    ) -> impl Future<Output = Result<SignedRequest, S3Error>> + Send;

    /// Completes the upload from `parts` (in order) and checks the object.
    fn complete(&self, parts: &[CompletedPart])
        -> impl Future<Output = Result<(), S3Error>> + Send;

    /// Drops what was uploaded, best effort.
    fn abort(&self) -> impl Future<Output = ()> + Send;
}

/// The digest of a body.
pub fn digest(body: &[u8]) -> ObjectDigest {
    ObjectDigest {
        size: body.len() as u64,
        md5: content_md5(body),
        sha256: hex::encode(Sha256::digest(body)),
    }
}

/// Sends files by multipart upload.
pub struct Uploader {
    http: reqwest::Client,
    parts_in_flight: usize,
}

impl Default for Uploader {
    fn default() -> Self {
        Uploader {
            http: http_client(),
            parts_in_flight: DEFAULT_PARTS_IN_FLIGHT,
        }
    }
}

impl Uploader {
    /// Sends up to `parts` parts at once (at least one).
    pub fn with_parts_in_flight(mut self, parts: usize) -> Self {
        self.parts_in_flight = parts.max(1);
        self
    }

    /// Uploads the file at `path` in parts of about `part_size` bytes ([`PartPlan::new`]),
    /// `companion` first when given; `progress(sent, total)` follows each part that lands.
    /// Aborts on failure.
    pub async fn upload(
        &self,
        authorizer: &impl Authorizer,
        path: &Path,
        companion: Option<Bytes>,
        part_size: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), S3Error> {
        let read_error = |source| S3Error::Read {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let total = file.metadata().map_err(read_error)?.len();
        let plan = PartPlan::new(total, part_size);
        let file = Arc::new(file);
        let companion = companion.map(|body| (digest(&body), body));
        let result = async {
            let put = authorizer
                .start(&plan, companion.as_ref().map(|(digest, _)| digest))
                .await?;
            if let (Some(request), Some((_, body))) = (put, &companion) {
                self.send("PUT", None, request, body.clone()).await?;
            }
            let mut parts = Vec::with_capacity(plan.parts as usize);
            let mut sent = 0u64;
            // `buffer_unordered` starts a part only when fewer than `parts_in_flight` run, so
            // at most that many part buffers exist; an error drops (cancels) the others.
            let mut uploads = futures_util::stream::iter(1..=plan.parts)
                .map(|number| self.upload_part(authorizer, path, &file, &plan, number))
                .buffer_unordered(self.parts_in_flight);
            while let Some((part, len)) = uploads.try_next().await? {
                sent += len;
                progress(sent, total);
                parts.push(part);
            }
            parts.sort_unstable_by_key(|part| part.number);
            authorizer.complete(&parts).await
        }
        .await;
        if result.is_err() {
            authorizer.abort().await;
        }
        result
    }

    /// Reads part `number`, hashes it on a blocking thread, has it authorized and sends it.
    async fn upload_part(
        &self,
        authorizer: &impl Authorizer,
        path: &Path,
        file: &Arc<std::fs::File>,
        plan: &PartPlan,
        number: u32,
    ) -> Result<(CompletedPart, u64), S3Error> {
        let file = Arc::clone(file);
        let offset = plan.offset(number);
        let len = plan.part_len(number).expect("the plan has this part");
        let (body, digest) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            let digest = digest(&buf);
            Ok((Bytes::from(buf), digest))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|source| S3Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let request = authorizer.part(number, &digest).await?;
        let response = self.send("UploadPart", Some(number), request, body).await?;
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or(S3Error::BadResponse {
                operation: "UploadPart",
                key: format!("part {number}"),
                what: "an ETag",
            })?;
        Ok((CompletedPart { number, etag }, len))
    }

    /// PUTs `body` with an authorized request, retried as every S3 request is.
    async fn send(
        &self,
        operation: &'static str,
        part: Option<u32>,
        request: SignedRequest,
        body: Bytes,
    ) -> Result<reqwest::Response, S3Error> {
        let key = request.url.path().to_string();
        send_retried(operation, &key, part, |_| {
            execute(
                &self.http,
                operation,
                &key,
                Method::PUT,
                request.clone(),
                body.clone(),
            )
        })
        .await
    }
}

/// The authorizer of whoever holds the key: signs each request itself.
pub struct DirectUpload<'a> {
    client: &'a S3Client,
    bucket: &'a str,
    key: &'a str,
    attributes: ObjectAttributes<'a>,
    /// The companion object's key and attributes.
    companion: Option<(&'a str, ObjectAttributes<'a>)>,
    state: Mutex<DirectState>,
}

#[derive(Default)]
struct DirectState {
    upload_id: Option<String>,
    size: u64,
    /// Each part's Content-MD5, by number.
    md5s: std::collections::BTreeMap<u32, String>,
}

impl<'a> DirectUpload<'a> {
    /// An upload to `bucket/key` of an object with `attributes`.
    pub fn new(
        client: &'a S3Client,
        bucket: &'a str,
        key: &'a str,
        attributes: ObjectAttributes<'a>,
    ) -> Self {
        DirectUpload {
            client,
            bucket,
            key,
            attributes,
            companion: None,
            state: Mutex::default(),
        }
    }

    /// With a companion object at `key` (in the same bucket) with `attributes`.
    pub fn with_companion(mut self, key: &'a str, attributes: ObjectAttributes<'a>) -> Self {
        self.companion = Some((key, attributes));
        self
    }

    fn upload_id(&self) -> Option<String> {
        self.state
            .lock()
            .expect("upload state lock")
            .upload_id
            .clone()
    }
}

impl Authorizer for DirectUpload<'_> {
    async fn start(
        &self,
        plan: &PartPlan,
        companion: Option<&ObjectDigest>,
    ) -> Result<Option<SignedRequest>, S3Error> {
        let put = match (self.companion, companion) {
            (Some((key, attributes)), Some(digest)) => {
                let mut headers = attributes.headers();
                headers.push(("content-md5".into(), digest.md5.clone()));
                Some(self.client.sign(
                    "PUT",
                    self.bucket,
                    key,
                    &[],
                    headers,
                    &digest.sha256,
                    SystemTime::now(),
                ))
            }
            _ => None,
        };
        let upload_id = self
            .client
            .create_multipart(self.bucket, self.key, self.attributes)
            .await?;
        let mut state = self.state.lock().expect("upload state lock");
        state.upload_id = Some(upload_id);
        state.size = plan.size;
        Ok(put)
    }

    async fn part(&self, number: u32, digest: &ObjectDigest) -> Result<SignedRequest, S3Error> {
        let upload_id = self.upload_id().unwrap_or_default();
        self.state
            .lock()
            .expect("upload state lock")
            .md5s
            .insert(number, digest.md5.clone());
        Ok(self.client.sign(
            "PUT",
            self.bucket,
            self.key,
            &[
                ("partNumber", &number.to_string()),
                ("uploadId", &upload_id),
            ],
            vec![("content-md5".into(), digest.md5.clone())],
            &digest.sha256,
            SystemTime::now(),
        ))
    }

    async fn complete(&self, parts: &[CompletedPart]) -> Result<(), S3Error> {
        let (upload_id, size, etag) = {
            let state = self.state.lock().expect("upload state lock");
            (
                state.upload_id.clone().unwrap_or_default(),
                state.size,
                multipart_etag(state.md5s.values().map(String::as_str)),
            )
        };
        self.client
            .complete_verified(
                self.bucket,
                self.key,
                &upload_id,
                parts,
                Expected {
                    size,
                    attributes: self.attributes,
                    etag: etag.as_deref(),
                },
            )
            .await
            .map(drop)
    }

    async fn abort(&self) {
        // If the abort fails too, the upload id expires by the bucket's lifecycle rules.
        if let Some(upload_id) = self.upload_id() {
            let _ = self.client.abort(self.bucket, self.key, &upload_id).await;
        }
    }
}
