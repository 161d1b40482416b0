//! The scoped upload: how a guest that holds no S3 key has its rootfs uploaded, and the one
//! part plan both sides compute.
//!
//! The node agent keeps the S3 key. The guest posts each step to a route beside its report
//! route ([`upload_url`], derived from the `notify_url` it was given, like its logs), signed
//! with the build's key like its report ([`crate::signature`]):
//!
//! 1. [`UploadStart`]: the rootfs's size, SHA-256 and part size, the image config's digest.
//!    The node creates the multipart upload for exactly the build's `s3_bucket`/`s3_key` (the
//!    guest never names them) with the object's metadata, and answers [`UploadStarted`]: the
//!    upload id and a presigned PUT of `<s3_key>.json` bound to the config's Content-MD5.
//! 2. [`PartRequest`] per part (its number, size, MD5, SHA-256): a [`SignedRequest`], a
//!    presigned UploadPart of that part number bound to that Content-MD5 and SHA-256, expiring
//!    with the build's deadline.
//! 3. [`UploadComplete`] with the parts' ETags: the node completes the upload with its own key,
//!    checks the object (size, `rootfs-sha256` metadata, the multipart ETag computed from the
//!    MD5s it signed) and answers [`UploadVerified`].
//!
//! Every request carries a fresh `nonce`, so a retried request is never a replay of the one
//! before it (the node refuses a signature it has seen). [`PartPlan`] is the part arithmetic
//! both sides share: the guest cuts its file with it, the node checks each part against it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::logs::beside_report_route;

/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's most parts in one upload.
pub const MAX_PARTS: u64 = 10_000;

/// A step of the scoped upload, each a route of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStep {
    Start,
    Part,
    Complete,
}

impl UploadStep {
    pub const ALL: [UploadStep; 3] = [UploadStep::Start, UploadStep::Part, UploadStep::Complete];

    pub fn as_str(self) -> &'static str {
        match self {
            UploadStep::Start => "start",
            UploadStep::Part => "part",
            UploadStep::Complete => "complete",
        }
    }
}

impl fmt::Display for UploadStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The path the guest posts `step` of build `build_id`'s upload to (`{id}` gives the route
/// pattern).
pub fn upload_path(build_id: &str, step: UploadStep) -> String {
    format!("/v1/internal/builds/{build_id}/upload/{step}")
}

/// Where the guest posts `step`: beside the report, when `notify_url` is the node agent's
/// report route of this build; else nowhere (a host run uploads with credentials of its own).
pub fn upload_url(notify_url: &Url, build_id: &str, step: UploadStep) -> Option<Url> {
    beside_report_route(notify_url, build_id, &upload_path(build_id, step))
}

/// How a file of `size` bytes is cut into parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    pub size: u64,
    pub part_size: u64,
    pub parts: u32,
}

impl PartPlan {
    /// The plan for `size` bytes in parts of `requested` bytes, raised to S3's smallest part and
    /// to what fits in [`MAX_PARTS`] parts. An empty file is one empty part.
    pub fn new(size: u64, requested: u64) -> Self {
        let part_size = requested
            .clamp(MIN_PART_SIZE, MAX_PART_SIZE)
            .max(size.div_ceil(MAX_PARTS));
        let parts = size.div_ceil(part_size).max(1);
        PartPlan {
            size,
            part_size,
            parts: u32::try_from(parts).expect("at most MAX_PARTS parts"),
        }
    }

    /// The plan a guest proposes, checked: `part_size` must be what [`PartPlan::new`] makes of
    /// itself for `size` (S3's limits hold). The error names the field.
    pub fn check(size: u64, part_size: u64) -> Result<Self, (&'static str, String)> {
        if size > MAX_PART_SIZE * MAX_PARTS {
            return Err((
                "size",
                format!("{size} bytes is more than S3 takes in one upload"),
            ));
        }
        let plan = PartPlan::new(size, part_size);
        if plan.part_size != part_size {
            return Err((
                "part_size",
                format!(
                    "{part_size} bytes is not a part size for {size} bytes (S3 needs 5 MiB to 5 \
                     GiB and at most {MAX_PARTS} parts; {} would do)",
                    plan.part_size
                ),
            ));
        }
        Ok(plan)
    }

    /// Where part `number` (from 1) starts in the file.
    pub fn offset(&self, number: u32) -> u64 {
        u64::from(number.saturating_sub(1)) * self.part_size
    }

    /// The length of part `number`; `None` when the plan has no such part.
    pub fn part_len(&self, number: u32) -> Option<u64> {
        (1..=self.parts)
            .contains(&number)
            .then(|| self.part_size.min(self.size - self.offset(number)))
    }
}

/// What a body is: its length, Content-MD5 (base64 of the MD5, as the header carries it) and
/// SHA-256 (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDigest {
    pub size: u64,
    pub md5: String,
    pub sha256: String,
}

impl ObjectDigest {
    /// Checks the digests' shapes; the error names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_sha256(&self.sha256).map_err(|reason| ("sha256", reason))?;
        let base64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
        let md5 = self.md5.as_bytes();
        if md5.len() != 24 || !md5[..22].iter().all(|&b| base64(b)) || &md5[22..] != b"==" {
            return Err((
                "md5",
                format!("`{}` is not the base64 of an MD5 (24 characters)", self.md5),
            ));
        }
        Ok(())
    }
}

/// Checks a SHA-256 in lower-case hex.
pub fn check_sha256(text: &str) -> Result<(), String> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!("`{text}` is not a SHA-256 in lower-case hex"))
    }
}

/// Step 1: the guest asks for its upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadStart {
    pub nonce: String,
    /// The rootfs's length in bytes.
    pub size: u64,
    /// The rootfs's SHA-256 (the report's and the object's `rootfs-sha256`).
    pub sha256: String,
    /// As [`PartPlan::new`] made it.
    pub part_size: u64,
    /// The built image's id (the object's `image-digest`).
    pub image_digest: String,
    /// The built commit (the object's `commit-sha`).
    pub commit_sha: String,
    /// The image config JSON that goes to `<s3_key>.json`.
    pub config: ObjectDigest,
}

/// A request the guest sends as it is, with its body: a URL (presigned, or plain when
/// `headers` carry an `authorization`) and the headers it must carry, all of them signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRequest {
    pub url: Url,
    pub headers: BTreeMap<String, String>,
}

/// The node's answer to [`UploadStart`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadStarted {
    pub upload_id: String,
    /// The parts the node expects, per [`PartPlan`].
    pub parts: u32,
    /// The PUT of the image config to `<s3_key>.json`.
    pub config: SignedRequest,
}

/// Step 2: the guest asks to send one part; the answer is a [`SignedRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRequest {
    pub nonce: String,
    /// From 1.
    pub number: u32,
    pub digest: ObjectDigest,
}

/// One part that landed, as S3 answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletedPart {
    pub number: u32,
    pub etag: String,
}

/// Step 3: every part landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadComplete {
    pub nonce: String,
    pub parts: Vec<CompletedPart>,
}

/// The node's answer to [`UploadComplete`]: the object it completed and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadVerified {
    /// `s3://bucket/key`.
    pub location: String,
    pub size: u64,
    pub sha256: String,
    /// The object's ETag (the multipart one: MD5 of the parts' MD5s, `-N`).
    pub etag: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cut_files_as_s3_allows_and_check_what_a_guest_proposes() {
        let mib = 1 << 20;
        let plan = PartPlan::new(40 * mib + 3, 16 * mib);
        assert_eq!((plan.part_size, plan.parts), (16 * mib, 3));
        assert_eq!(plan.part_len(3), Some(8 * mib + 3));
        assert_eq!(plan.offset(3), 32 * mib);
        assert_eq!((plan.part_len(0), plan.part_len(4)), (None, None));
        // Raised to 5 MiB, and to what fits in 10 000 parts; an empty file is one empty part.
        assert_eq!(PartPlan::new(10, 1).part_size, MIN_PART_SIZE);
        let big = PartPlan::new(100_000 * mib, 5 * mib);
        assert_eq!((big.part_size, big.parts), (10 * mib, 10_000));
        let empty = PartPlan::new(0, 16 * mib);
        assert_eq!((empty.parts, empty.part_len(1)), (1, Some(0)));

        assert_eq!(PartPlan::check(40 * mib + 3, 16 * mib), Ok(plan));
        assert_eq!(PartPlan::check(40 * mib, mib).unwrap_err().0, "part_size");
        assert_eq!(
            PartPlan::check(100_000 * mib, 5 * mib).unwrap_err().0,
            "part_size"
        );
        assert_eq!(PartPlan::check(u64::MAX, 5 * mib).unwrap_err().0, "size");
    }

    #[test]
    fn digests_are_checked_by_shape() {
        let good = ObjectDigest {
            size: 1,
            md5: "1B2M2Y8AsgTpgAmY7PhCfg==".into(),
            sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
        };
        assert_eq!(good.check(), Ok(()));
        let bad_md5 = ObjectDigest {
            md5: "1B2M2Y8AsgTpgAmY7PhCfg".into(),
            ..good.clone()
        };
        assert_eq!(bad_md5.check().unwrap_err().0, "md5");
        let bad_sha = ObjectDigest {
            sha256: good.sha256.to_uppercase(),
            ..good
        };
        assert_eq!(bad_sha.check().unwrap_err().0, "sha256");
    }

    #[test]
    fn upload_routes_go_beside_the_node_agents_report_route_only() {
        let report = Url::parse("http://10.200.0.1:7071/v1/internal/builds/b1/complete").unwrap();
        assert_eq!(
            upload_url(&report, "b1", UploadStep::Part)
                .unwrap()
                .as_str(),
            "http://10.200.0.1:7071/v1/internal/builds/b1/upload/part"
        );
        assert_eq!(upload_url(&report, "b2", UploadStep::Start), None);
        let hook = Url::parse("https://ci.example/hooks/build").unwrap();
        assert_eq!(upload_url(&hook, "b1", UploadStep::Complete), None);
    }
}
