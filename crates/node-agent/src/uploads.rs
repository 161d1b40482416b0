//! The node's side of the scoped upload ([`builder_contract::upload`]): the node keeps the S3
//! key, and a builder VM gets only what its one upload needs.
//!
//! For a build running here, [`Uploads`] creates the multipart upload of exactly the build's
//! `s3_bucket`/`s3_key` (the guest never names a bucket or key) with the object's metadata,
//! presigns the PUT of `<s3_key>.json` and each part's UploadPart, bound to the Content-MD5
//! (and SHA-256) the guest declared and expiring with the build's deadline, completes the
//! upload with its own key and checks the object: size, `rootfs-sha256`, and the multipart
//! ETag computed from the MD5s it signed, and the config object's size and MD5. When the build
//! ends ([`Uploads::end`]) it aborts an upload that was not completed, deletes what a build
//! that did not succeed left, and writes `<s3_key>.status.json` (success and failure alike).
//! [`Uploads::check_report`] holds the guest's report to what was verified;
//! [`Uploads::recover`] aborts the uploads a crashed previous run left open. What is open is
//! kept in memory: only the node running a build serves its guest.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use builder_contract::upload::{
    check_sha256, ObjectDigest, PartPlan, PartRequest, SignedRequest, UploadComplete, UploadStart,
    UploadStarted, UploadVerified,
};
use builder_contract::{
    BuildFailure, BuildReport, BuildStatus, ErrorClass, Phase, RootfsArtifact, RootfsReuse,
    S3Credentials, S3Location,
};
use builder_s3::{md5_hex, multipart_etag, Expected, ObjectAttributes, S3Client, S3Error};

use crate::db::BuildRow;

/// The content type of the rootfs object.
const ROOTFS_TYPE: &str = "application/octet-stream";
/// The content type of `<s3_key>.json`.
const CONFIG_TYPE: &str = "application/json";

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("this node has no S3 credentials (`s3_credentials_file`) to grant uploads with")]
    NoCredentials,
    #[error("the S3 credentials are not usable")]
    Client(#[source] Box<S3Error>),
    #[error("build {build_id} has no valid S3 location to upload to: {reason}")]
    NoLocation { build_id: String, reason: String },
    #[error("the upload request of build {build_id} has an invalid `{field}`: {reason}")]
    Invalid {
        build_id: String,
        field: &'static str,
        reason: String,
    },
    #[error("build {build_id} has not started its upload")]
    NotStarted { build_id: String },
    #[error("the upload of build {build_id} is refused: {reason}")]
    Conflict { build_id: String, reason: String },
    #[error("the upload of build {build_id} did not verify")]
    Unverified {
        build_id: String,
        #[source]
        source: Box<S3Error>,
    },
    #[error("S3 failed the upload of build {build_id}")]
    Store {
        build_id: String,
        #[source]
        source: Box<S3Error>,
    },
}

impl UploadError {
    /// The request field at fault, if one is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            UploadError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Whether the guest's request is at fault (else the node or the store is).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            UploadError::Invalid { .. }
                | UploadError::NotStarted { .. }
                | UploadError::Conflict { .. }
                | UploadError::Unverified { .. }
        )
    }
}

/// An upload a build running here has started.
pub struct OpenUpload {
    location: S3Location,
    upload_id: String,
    plan: PartPlan,
    start: UploadStart,
    metadata: Vec<(String, String)>,
    deadline: SystemTime,
    /// The digest each part was granted for, by number.
    parts: BTreeMap<u32, ObjectDigest>,
    verified: Option<UploadVerified>,
}

/// The node's S3 key and the uploads open under it.
pub struct Uploads {
    client: Option<S3Client>,
    open: Mutex<HashMap<String, OpenUpload>>,
}

impl Uploads {
    pub fn new(credentials: Option<S3Credentials>) -> Result<Self, UploadError> {
        let client = credentials
            .map(S3Client::new)
            .transpose()
            .map_err(|e| UploadError::Client(Box::new(e)))?;
        Ok(Uploads {
            client,
            open: Mutex::default(),
        })
    }

    /// Whether builds can upload their rootfs: the node has an S3 key to grant with.
    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    fn client(&self) -> Result<&S3Client, UploadError> {
        self.client.as_ref().ok_or(UploadError::NoCredentials)
    }

    /// [`UploadStart`] of the guest of `row`: creates the multipart upload (once: the same
    /// request again gets the same upload) and presigns the config's PUT.
    pub async fn start(
        &self,
        row: &BuildRow,
        start: UploadStart,
    ) -> Result<UploadStarted, UploadError> {
        let client = self.client()?;
        let build_id = &row.id;
        let invalid = |(field, reason): (&'static str, String)| UploadError::Invalid {
            build_id: build_id.clone(),
            field,
            reason,
        };
        let plan = PartPlan::check(start.size, start.part_size).map_err(invalid)?;
        check_sha256(&start.sha256).map_err(|reason| invalid(("sha256", reason)))?;
        start
            .config
            .check()
            .map_err(|(field, reason)| invalid((config_field(field), reason)))?;
        check_header_text(&start.image_digest).map_err(|r| invalid(("image_digest", r)))?;
        check_header_text(&start.commit_sha).map_err(|r| invalid(("commit_sha", r)))?;
        let location = location(row)?;
        let deadline = deadline(row);
        let again = {
            let open = self.open.lock().expect("uploads lock");
            match open.get(build_id) {
                Some(o) if same_start(&o.start, &start) => Some(o.upload_id.clone()),
                Some(_) => {
                    return Err(UploadError::Conflict {
                        build_id: build_id.clone(),
                        reason: "its upload was started already, for another file".into(),
                    })
                }
                None => None,
            }
        };
        let metadata = vec![
            ("build-id".to_string(), build_id.clone()),
            ("commit-sha".to_string(), start.commit_sha.clone()),
            ("status".to_string(), BuildStatus::Succeeded.to_string()),
            ("rootfs-sha256".to_string(), start.sha256.clone()),
            ("image-digest".to_string(), start.image_digest.clone()),
        ];
        let upload_id = match again {
            Some(id) => id,
            None => {
                let attributes = ObjectAttributes {
                    content_type: ROOTFS_TYPE,
                    metadata: &metadata,
                };
                let id = client
                    .create_multipart(&location.bucket, &location.key, attributes)
                    .await
                    .map_err(|source| UploadError::Store {
                        build_id: build_id.clone(),
                        source: Box::new(source),
                    })?;
                let raced = {
                    let mut open = self.open.lock().expect("uploads lock");
                    let raced = open.contains_key(build_id);
                    if !raced {
                        open.insert(
                            build_id.clone(),
                            OpenUpload {
                                location: location.clone(),
                                upload_id: id.clone(),
                                plan,
                                start: start.clone(),
                                metadata: metadata.clone(),
                                deadline,
                                parts: BTreeMap::new(),
                                verified: None,
                            },
                        );
                    }
                    raced
                };
                if raced {
                    let _ = client.abort(&location.bucket, &location.key, &id).await;
                    return Err(UploadError::Conflict {
                        build_id: build_id.clone(),
                        reason: "its upload was being started by another request".into(),
                    });
                }
                tracing::info!(
                    build_id,
                    location = %location,
                    size = start.size,
                    parts = plan.parts,
                    "upload started for the build's guest"
                );
                id
            }
        };
        let mut headers = ObjectAttributes {
            content_type: CONFIG_TYPE,
            metadata: &metadata,
        }
        .headers();
        headers.push(("content-md5".into(), start.config.md5.clone()));
        let config = client.presign(
            "PUT",
            &location.bucket,
            &location.config_key(),
            &[],
            headers,
            Some(&start.config.sha256),
            expiry(deadline),
            SystemTime::now(),
        );
        Ok(UploadStarted {
            upload_id,
            parts: plan.parts,
            config,
        })
    }

    /// [`PartRequest`] of the guest of build `build_id`: a presigned UploadPart of that part
    /// number and digest. A part is granted for one digest only.
    pub fn part(&self, build_id: &str, request: PartRequest) -> Result<SignedRequest, UploadError> {
        let client = self.client()?;
        let invalid = |field, reason| UploadError::Invalid {
            build_id: build_id.to_string(),
            field,
            reason,
        };
        request
            .digest
            .check()
            .map_err(|(field, reason)| invalid(part_field(field), reason))?;
        let mut open = self.open.lock().expect("uploads lock");
        let upload = open
            .get_mut(build_id)
            .ok_or_else(|| UploadError::NotStarted {
                build_id: build_id.to_string(),
            })?;
        let number = request.number;
        let Some(len) = upload.plan.part_len(number) else {
            return Err(invalid(
                "number",
                format!(
                    "the upload has parts 1 to {}, not {number}",
                    upload.plan.parts
                ),
            ));
        };
        if request.digest.size != len {
            return Err(invalid(
                "digest.size",
                format!("part {number} has {len} bytes, not {}", request.digest.size),
            ));
        }
        if upload.verified.is_some() {
            return Err(UploadError::Conflict {
                build_id: build_id.to_string(),
                reason: "its upload is complete".into(),
            });
        }
        match upload.parts.get(&number) {
            Some(granted) if *granted != request.digest => {
                return Err(UploadError::Conflict {
                    build_id: build_id.to_string(),
                    reason: format!("part {number} was granted for other bytes"),
                })
            }
            Some(_) => {}
            None => {
                upload.parts.insert(number, request.digest.clone());
            }
        }
        Ok(client.presign(
            "PUT",
            &upload.location.bucket,
            &upload.location.key,
            &[
                ("partNumber", &number.to_string()),
                ("uploadId", &upload.upload_id),
            ],
            vec![("content-md5".into(), request.digest.md5.clone())],
            Some(&request.digest.sha256),
            expiry(upload.deadline),
            SystemTime::now(),
        ))
    }

    /// [`UploadComplete`] of the guest of build `build_id`: completes the upload with the
    /// node's key and checks the object and its config; what was verified. Asked again, the
    /// same answer.
    pub async fn complete(
        &self,
        build_id: &str,
        request: UploadComplete,
    ) -> Result<UploadVerified, UploadError> {
        let client = self.client()?;
        let (location, upload_id, plan, start, metadata, md5s) = {
            let open = self.open.lock().expect("uploads lock");
            let upload = open.get(build_id).ok_or_else(|| UploadError::NotStarted {
                build_id: build_id.to_string(),
            })?;
            if let Some(verified) = &upload.verified {
                return Ok(verified.clone());
            }
            let numbers: Vec<u32> = request.parts.iter().map(|p| p.number).collect();
            let all: Vec<u32> = (1..=upload.plan.parts).collect();
            if numbers != all || upload.parts.keys().copied().collect::<Vec<_>>() != all {
                return Err(UploadError::Invalid {
                    build_id: build_id.to_string(),
                    field: "parts",
                    reason: format!(
                        "the upload is complete with parts 1 to {} each granted and sent once, \
                         in order (granted: {}, sent: {})",
                        upload.plan.parts,
                        upload.parts.len(),
                        numbers.len()
                    ),
                });
            }
            (
                upload.location.clone(),
                upload.upload_id.clone(),
                upload.plan,
                upload.start.clone(),
                upload.metadata.clone(),
                upload
                    .parts
                    .values()
                    .map(|d| d.md5.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let etag = multipart_etag(md5s.iter().map(String::as_str))
            .expect("granted parts have checked MD5s");
        let store = |source| UploadError::Store {
            build_id: build_id.to_string(),
            source: Box::new(source),
        };
        let checked = client
            .complete_verified(
                &location.bucket,
                &location.key,
                &upload_id,
                &request.parts,
                Expected {
                    size: plan.size,
                    attributes: ObjectAttributes {
                        content_type: ROOTFS_TYPE,
                        metadata: &metadata,
                    },
                    etag: Some(&etag),
                },
            )
            .await;
        let config_key = location.config_key();
        let checked = match checked {
            Ok(_) => check_config(client, &location, &start.config).await,
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            if !matches!(e, S3Error::Mismatch { .. }) {
                return Err(store(e));
            }
            // What landed is not what was granted: it must not look like a build's output.
            for key in [&location.key, &config_key] {
                delete_own(client, &location.bucket, key, build_id).await;
            }
            return Err(UploadError::Unverified {
                build_id: build_id.to_string(),
                source: Box::new(e),
            });
        }
        let verified = UploadVerified {
            location: location.to_string(),
            size: plan.size,
            sha256: start.sha256.clone(),
            etag,
        };
        tracing::info!(
            build_id,
            location = %location,
            size = plan.size,
            etag = verified.etag,
            "upload completed and verified"
        );
        if let Some(upload) = self.open.lock().expect("uploads lock").get_mut(build_id) {
            upload.verified = Some(verified.clone());
        }
        Ok(verified)
    }

    /// Holds a succeeded report to the request and the verified upload: its rootfs must be at
    /// the build's location, with the verified size and SHA-256; a rootfs `reused` instead
    /// must be the one `offer`ed, and the object there must still carry its SHA-256 and image
    /// digest (with its config beside it). A report that is not fails the build (class
    /// `internal`, phase `upload`), the message naming the field.
    pub async fn check_report(
        &self,
        row: &BuildRow,
        report: &mut BuildReport,
        offer: Option<&RootfsReuse>,
    ) {
        if report.status != BuildStatus::Succeeded {
            return;
        }
        let Ok(location) = location(row) else {
            return;
        };
        let reused = report.rootfs.as_ref().is_some_and(|r| r.reused);
        let checked = if reused {
            self.check_reuse(report, &location, offer).await
        } else {
            let verified = self
                .open
                .lock()
                .expect("uploads lock")
                .get(&row.id)
                .and_then(|o| o.verified.clone());
            report_matches(report, &location, verified.as_ref())
        };
        if let Err((field, reason)) = checked {
            tracing::warn!(
                build_id = row.id,
                field,
                reason,
                "the guest's report is refused"
            );
            report.status = BuildStatus::Failed;
            report.rootfs = None;
            report.error = Some(BuildFailure {
                class: ErrorClass::Internal,
                phase: Phase::Upload,
                message: format!("the report's `{field}` does not hold: {reason}"),
            });
        }
    }

    /// Whether a report's reused rootfs is the one offered and still at the location.
    async fn check_reuse(
        &self,
        report: &BuildReport,
        location: &S3Location,
        offer: Option<&RootfsReuse>,
    ) -> Result<(), (&'static str, String)> {
        let rootfs = report
            .rootfs
            .as_ref()
            .ok_or(("rootfs", "a succeeded build reports no rootfs".to_string()))?;
        let offer = offer.ok_or((
            "rootfs.reused",
            "the node offered no rootfs to reuse".to_string(),
        ))?;
        check_locations(rootfs, location)?;
        let digest = report.image_digest.as_deref().unwrap_or_default();
        for (field, said, offered) in [
            ("image_digest", digest, offer.image_digest.as_str()),
            (
                "rootfs.sha256",
                rootfs.sha256.as_str(),
                offer.sha256.as_str(),
            ),
        ] {
            if said != offered {
                return Err((field, format!("it says {said}, the reuse offer {offered}")));
            }
        }
        if rootfs.size_bytes != offer.size_bytes {
            return Err((
                "rootfs.size_bytes",
                format!(
                    "it says {}, the reuse offer {}",
                    rootfs.size_bytes, offer.size_bytes
                ),
            ));
        }
        let client = self.client.as_ref().ok_or((
            "rootfs.reused",
            "this node has no S3 credentials to check the object with".to_string(),
        ))?;
        let head = client
            .head(&location.bucket, &location.key)
            .await
            .map_err(|e| {
                (
                    "rootfs.reused",
                    format!("the object: {}", crate::error_chain(&e)),
                )
            })?;
        for (name, expected) in [
            ("rootfs-sha256", offer.sha256.as_str()),
            ("image-digest", offer.image_digest.as_str()),
        ] {
            let value = head
                .metadata
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            if value != Some(expected) {
                return Err((
                    "rootfs.reused",
                    format!(
                        "the object's `{name}` is {}, not {expected}",
                        value.unwrap_or("missing")
                    ),
                ));
            }
        }
        client
            .head(&location.bucket, &location.config_key())
            .await
            .map_err(|e| {
                (
                    "rootfs.config_location",
                    format!("the config object: {}", crate::error_chain(&e)),
                )
            })?;
        Ok(())
    }

    /// Takes what build `build_id` has open here, at its end.
    pub fn take(&self, build_id: &str) -> Option<OpenUpload> {
        self.open.lock().expect("uploads lock").remove(build_id)
    }

    /// The end of a build: aborts an upload that did not complete, deletes the objects this
    /// build's upload made (its build id in their metadata) when the build did not succeed, and writes `report` (the final one, when the build's
    /// end was recorded) as `<s3_key>.status.json`. Failures are logged.
    pub async fn end(
        &self,
        row: &BuildRow,
        open: Option<OpenUpload>,
        report: Option<&BuildReport>,
    ) {
        let Some(client) = &self.client else { return };
        let succeeded = report.is_some_and(|r| r.status == BuildStatus::Succeeded);
        if let Some(upload) = open {
            let location = &upload.location;
            if upload.verified.is_none() {
                match client
                    .abort(&location.bucket, &location.key, &upload.upload_id)
                    .await
                {
                    Ok(()) => tracing::info!(build_id = row.id, "unfinished upload aborted"),
                    Err(e) => tracing::warn!(
                        build_id = row.id,
                        error = crate::error_chain(&e),
                        "cannot abort the build's unfinished upload; the bucket's lifecycle \
                         rules must"
                    ),
                }
            }
            if !succeeded {
                // Only what this build wrote: an object carrying its build id (an earlier
                // build's rootfs at the same key stays).
                for key in [location.config_key(), location.key.clone()] {
                    delete_own(client, &location.bucket, &key, &row.id).await;
                }
            }
        }
        let (Some(report), Ok(location)) = (report, location(row)) else {
            return;
        };
        if let Err(e) = client.put_status(&location, report).await {
            tracing::warn!(
                build_id = row.id,
                error = crate::error_chain(&e),
                "cannot write the build's status beside its rootfs"
            );
        }
    }

    /// At start: aborts the multipart uploads of `row`'s key that a previous run of this node
    /// left open when it stopped while the build ran (ListMultipartUploads under the key).
    pub async fn recover(&self, row: &BuildRow) {
        let (Some(client), Ok(location)) = (&self.client, location(row)) else {
            return;
        };
        let uploads = match client
            .list_multipart_uploads(&location.bucket, &location.key)
            .await
        {
            Ok(uploads) => uploads,
            Err(e) => {
                tracing::warn!(
                    build_id = row.id,
                    error = crate::error_chain(&e),
                    "cannot list the uploads a previous run left open"
                );
                return;
            }
        };
        for upload in uploads.iter().filter(|u| u.key == location.key) {
            match client
                .abort(&location.bucket, &upload.key, &upload.upload_id)
                .await
            {
                Ok(()) => tracing::info!(
                    build_id = row.id,
                    upload_id = upload.upload_id,
                    "upload left open by a previous run aborted"
                ),
                Err(e) => tracing::warn!(
                    build_id = row.id,
                    error = crate::error_chain(&e),
                    "cannot abort an upload a previous run left open"
                ),
            }
        }
    }
}

/// Deletes `bucket/key` if build `build_id` wrote it (its id in the object's metadata), so an
/// earlier build's object at the same key stays. Failures are logged.
async fn delete_own(client: &S3Client, bucket: &str, key: &str, build_id: &str) {
    let ours = client.head(bucket, key).await.is_ok_and(|head| {
        head.metadata
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("build-id") && v == build_id)
    });
    if !ours {
        return;
    }
    if let Err(e) = client.delete(bucket, key).await {
        tracing::warn!(
            build_id,
            key,
            error = crate::error_chain(&e),
            "cannot delete what the build uploaded"
        );
    }
}

/// The build's location, from its request.
fn location(row: &BuildRow) -> Result<S3Location, UploadError> {
    let no = |reason: String| UploadError::NoLocation {
        build_id: row.id.clone(),
        reason,
    };
    match (&row.request.s3_bucket, &row.request.s3_key) {
        (Some(bucket), Some(key)) => S3Location::new(bucket, key).map_err(|e| no(e.to_string())),
        _ => Err(no("the request names no s3_bucket and s3_key".into())),
    }
}

/// When the build's time is up: from its VM's start (or its own), plus its time limit.
fn deadline(row: &BuildRow) -> SystemTime {
    let started_ms = row
        .vm_started_at_ms
        .or(row.started_at_ms)
        .unwrap_or_else(crate::now_ms)
        .max(0) as u64;
    SystemTime::UNIX_EPOCH + Duration::from_millis(started_ms) + Duration::from_secs(row.timeout_s)
}

/// How long a URL presigned now may live: until the deadline (at least a second).
fn expiry(deadline: SystemTime) -> Duration {
    deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

/// Whether two starts ask for the same upload (a retried request: only the nonce differs).
fn same_start(a: &UploadStart, b: &UploadStart) -> bool {
    UploadStart {
        nonce: String::new(),
        ..a.clone()
    } == UploadStart {
        nonce: String::new(),
        ..b.clone()
    }
}

/// A metadata value as a header carries it: printable ASCII, at most 256 bytes.
fn check_header_text(text: &str) -> Result<(), String> {
    if !text.is_empty() && text.len() <= 256 && text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not 1 to 256 printable ASCII characters"
        ))
    }
}

fn config_field(field: &str) -> &'static str {
    match field {
        "md5" => "config.md5",
        _ => "config.sha256",
    }
}

fn part_field(field: &str) -> &'static str {
    match field {
        "md5" => "digest.md5",
        _ => "digest.sha256",
    }
}

/// Checks `<s3_key>.json`: the size and MD5 (its single-part ETag) the guest declared.
async fn check_config(
    client: &S3Client,
    location: &S3Location,
    digest: &ObjectDigest,
) -> Result<(), S3Error> {
    let key = location.config_key();
    let head = client.head(&location.bucket, &key).await?;
    // A single-part object's ETag is its MD5.
    let md5 = md5_hex(&digest.md5).unwrap_or_default();
    let mismatch = |field, expected: String, actual: String| S3Error::Mismatch {
        key: key.clone(),
        field,
        expected,
        actual,
    };
    if head.size != digest.size {
        return Err(mismatch(
            "size",
            digest.size.to_string(),
            head.size.to_string(),
        ));
    }
    if head.etag != md5 {
        return Err(mismatch("ETag", md5, head.etag));
    }
    Ok(())
}

/// Whether a report's rootfs and config locations are the request's.
fn check_locations(
    rootfs: &RootfsArtifact,
    location: &S3Location,
) -> Result<(), (&'static str, String)> {
    let expected = location.to_string();
    if rootfs.location != expected {
        return Err((
            "rootfs.location",
            format!("it says {}, the request {expected}", rootfs.location),
        ));
    }
    let config = format!("s3://{}/{}", location.bucket, location.config_key());
    if rootfs.config_location != config {
        return Err((
            "rootfs.config_location",
            format!("it says {}, the request {config}", rootfs.config_location),
        ));
    }
    Ok(())
}

/// Whether a succeeded report's rootfs is what was requested and verified; else the field
/// that is not, and why.
fn report_matches(
    report: &BuildReport,
    location: &S3Location,
    verified: Option<&UploadVerified>,
) -> Result<(), (&'static str, String)> {
    let rootfs = report
        .rootfs
        .as_ref()
        .ok_or(("rootfs", "a succeeded build reports no rootfs".to_string()))?;
    check_locations(rootfs, location)?;
    let verified = verified.ok_or((
        "rootfs.location",
        "no upload to it was completed and verified by this node".to_string(),
    ))?;
    if rootfs.sha256 != verified.sha256 {
        return Err((
            "rootfs.sha256",
            format!("it says {}, the upload {}", rootfs.sha256, verified.sha256),
        ));
    }
    if rootfs.size_bytes != verified.size {
        return Err((
            "rootfs.size_bytes",
            format!(
                "it says {}, the upload {}",
                rootfs.size_bytes, verified.size
            ),
        ));
    }
    Ok(())
}
