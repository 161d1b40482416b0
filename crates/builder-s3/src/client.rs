//! The S3 client of whoever holds a key: requests signed in their headers and sent under the
//! shared retry policy ([`REQUEST_RETRY`], `builder-retry`: retried while the server is
//! unreachable or answers 5xx/408/429, announced on stderr), presigned requests for someone
//! without the key, and the object operations a build needs: PUT, the multipart upload's
//! create/complete/abort, HEAD, DELETE and ListMultipartUploads. [`S3Client::complete_verified`]
//! completes an upload and checks the object it made (size, metadata, multipart ETag), which a
//! Complete whose answer was lost and that finds the upload gone on its retry still passes
//! when the object is that upload's.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine;
use builder_contract::upload::{CompletedPart, SignedRequest};
use builder_contract::S3Credentials;
use builder_retry::{retry, RetryPolicy, Verdict};
use bytes::Bytes;
use md5::Md5;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use url::Url;

use crate::sigv4::{amz_date, scope, uri_encode, Canonical, UNSIGNED_PAYLOAD};

/// How every request is retried: 4 attempts, waits of at most 0.5, 1 and 2 s.
pub const REQUEST_RETRY: RetryPolicy = RetryPolicy {
    attempts: 4,
    first_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(8),
};
/// The longest a presigned URL may live (SigV4's limit).
pub const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("the S3 endpoint `{endpoint}` is not a valid URL")]
    Endpoint {
        endpoint: String,
        #[source]
        source: url::ParseError,
    },
    #[error("cannot reach the S3 endpoint for {operation} of {key}")]
    Transport {
        operation: &'static str,
        key: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("S3 refused {operation} of {key} with HTTP {status}: {body}")]
    Refused {
        operation: &'static str,
        key: String,
        status: StatusCode,
        body: String,
        /// The response's `Retry-After`, if any.
        retry_after: Option<String>,
    },
    #[error("S3 {operation} of {key} failed {attempts} times")]
    Exhausted {
        operation: &'static str,
        key: String,
        attempts: u32,
        #[source]
        last: Box<S3Error>,
    },
    #[error("S3 answered {operation} of {key} without {what}")]
    BadResponse {
        operation: &'static str,
        key: String,
        what: &'static str,
    },
    #[error("the header `{name}` of {operation} of {key} cannot be sent over HTTP")]
    BadHeader {
        operation: &'static str,
        key: String,
        name: String,
    },
    #[error("cannot read {path} for upload")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the uploaded object {key} has {field} `{actual}`, expected `{expected}`")]
    Mismatch {
        key: String,
        field: &'static str,
        expected: String,
        actual: String,
    },
    #[error("the node agent refused the upload's {step} at {url} with HTTP {status}: {body}")]
    GrantRefused {
        step: &'static str,
        url: String,
        status: StatusCode,
        body: String,
        retry_after: Option<String>,
    },
    #[error("cannot reach the node agent for the upload's {step} at {url}")]
    GrantTransport {
        step: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the node agent's answer to the upload's {step} is not valid: {reason}")]
    GrantAnswer { step: &'static str, reason: String },
}

impl S3Error {
    /// Whether to try again: unreachable, or an answer the shared policy retries.
    fn verdict(&self) -> Verdict {
        match self {
            S3Error::Transport { .. } | S3Error::GrantTransport { .. } => Verdict::Retry,
            S3Error::Refused {
                status,
                retry_after,
                ..
            }
            | S3Error::GrantRefused {
                status,
                retry_after,
                ..
            } => Verdict::for_http_status(status.as_u16(), retry_after.as_deref()),
            _ => Verdict::Final,
        }
    }

    /// Whether S3 answered that the multipart upload no longer exists (at once, or on a retry).
    pub fn is_no_such_upload(&self) -> bool {
        match self {
            S3Error::Refused { status, body, .. } => {
                *status == StatusCode::NOT_FOUND && body.contains("NoSuchUpload")
            }
            S3Error::Exhausted { last, .. } => last.is_no_such_upload(),
            _ => false,
        }
    }
}

/// The error and its causes on one line, as the retry lines show them.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What an uploaded object is: its content type and `x-amz-meta-*` metadata.
#[derive(Debug, Clone, Copy)]
pub struct ObjectAttributes<'a> {
    pub content_type: &'a str,
    pub metadata: &'a [(String, String)],
}

impl ObjectAttributes<'_> {
    /// Whether `object` carries all of this metadata (names compared without case, as HTTP
    /// headers are).
    pub fn matches(&self, object: &ObjectHead) -> bool {
        self.metadata.iter().all(|(name, value)| {
            object
                .metadata
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value)
        })
    }

    /// The headers that give an object these attributes.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut headers: Vec<(String, String)> = self
            .metadata
            .iter()
            .map(|(k, v)| (format!("x-amz-meta-{k}"), v.clone()))
            .collect();
        headers.push(("content-type".into(), self.content_type.into()));
        headers
    }
}

/// What a HEAD of an object says.
#[derive(Debug, Clone)]
pub struct ObjectHead {
    pub size: u64,
    /// Without its quotes.
    pub etag: String,
    /// `x-amz-meta-*` headers, without the prefix.
    pub metadata: Vec<(String, String)>,
}

/// What an object must be after its upload.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub size: u64,
    pub attributes: ObjectAttributes<'a>,
    /// The multipart ETag ([`multipart_etag`]), when known.
    pub etag: Option<&'a str>,
}

/// A multipart upload S3 still holds (ListMultipartUploads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
}

/// The HTTP client of every S3 and grant request: connects in 10 s, each request in 300 s.
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .build()
        .expect("a client with timeouts always builds")
}

pub struct S3Client {
    http: reqwest::Client,
    endpoint: Url,
    credentials: S3Credentials,
}

/// One request to sign and send, possibly several times.
struct Request<'a> {
    operation: &'static str,
    method: Method,
    bucket: &'a str,
    key: &'a str,
    query: &'a [(&'a str, &'a str)],
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl S3Client {
    pub fn new(credentials: S3Credentials) -> Result<Self, S3Error> {
        let endpoint = Url::parse(&credentials.endpoint).map_err(|source| S3Error::Endpoint {
            endpoint: credentials.endpoint.clone(),
            source,
        })?;
        Ok(S3Client {
            http: http_client(),
            endpoint,
            credentials,
        })
    }

    /// The URL of `bucket/key` (path-style; the bucket's own with an empty key) and its encoded
    /// path.
    fn object_url(&self, bucket: &str, key: &str) -> (Url, String) {
        let base = self.endpoint.path().trim_end_matches('/');
        let path = match key {
            "" => format!("{base}/{}", uri_encode(bucket, false)),
            key => format!(
                "{base}/{}/{}",
                uri_encode(bucket, false),
                uri_encode(key, true)
            ),
        };
        let mut url = self.endpoint.clone();
        url.set_path(&path);
        (url, path)
    }

    fn host(&self) -> String {
        let host = self.endpoint.host_str().unwrap_or_default();
        match self.endpoint.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// `method` of `bucket/key?query` with `headers`, signed in its headers at `now` for a body
    /// whose SHA-256 is `payload_hash`: what to send at once.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        &self,
        method: &str,
        bucket: &str,
        key: &str,
        query: &[(&str, &str)],
        mut headers: Vec<(String, String)>,
        payload_hash: &str,
        now: SystemTime,
    ) -> SignedRequest {
        let (mut url, path) = self.object_url(bucket, key);
        let date_time = amz_date(now);
        headers.push(("host".into(), self.host()));
        headers.push(("x-amz-content-sha256".into(), payload_hash.into()));
        headers.push(("x-amz-date".into(), date_time.clone()));
        if let Some(token) = &self.credentials.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        let signed = Canonical {
            method,
            path: &path,
            query: owned(query),
            headers: headers.clone(),
            payload_hash,
        }
        .sign(&self.credentials, &date_time);
        url.set_query((!signed.query.is_empty()).then_some(signed.query.as_str()));
        let mut headers: BTreeMap<String, String> = headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .filter(|(k, _)| k != "host")
            .collect();
        headers.insert(
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={}, Signature={}",
                self.credentials.access_key_id,
                signed.scope,
                signed.signed_headers,
                signed.signature
            ),
        );
        SignedRequest { url, headers }
    }

    /// `method` of `bucket/key?query`, presigned at `now` for `expires`: a URL whose sender
    /// must send exactly `headers` (they are signed; `host` is implied) and, when
    /// `payload_sha256` is given, a body of that SHA-256 (signed as `X-Amz-Content-Sha256`,
    /// which not every server checks). It is good for nothing else: another method, bucket,
    /// key, query or header value breaks the signature.
    #[allow(clippy::too_many_arguments)]
    pub fn presign(
        &self,
        method: &str,
        bucket: &str,
        key: &str,
        query: &[(&str, &str)],
        headers: Vec<(String, String)>,
        payload_sha256: Option<&str>,
        expires: Duration,
        now: SystemTime,
    ) -> SignedRequest {
        let (mut url, path) = self.object_url(bucket, key);
        let date_time = amz_date(now);
        let mut signed_headers: Vec<String> = headers
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .chain(["host".to_string()])
            .collect();
        signed_headers.sort();
        let expires = expires.clamp(Duration::from_secs(1), MAX_PRESIGN_EXPIRY);
        let mut query = owned(query);
        query.extend([
            ("X-Amz-Algorithm".into(), "AWS4-HMAC-SHA256".into()),
            (
                "X-Amz-Credential".into(),
                format!(
                    "{}/{}",
                    self.credentials.access_key_id,
                    scope(&self.credentials, &date_time[..8])
                ),
            ),
            ("X-Amz-Date".into(), date_time.clone()),
            ("X-Amz-Expires".into(), expires.as_secs().to_string()),
            ("X-Amz-SignedHeaders".into(), signed_headers.join(";")),
        ]);
        if let Some(sha256) = payload_sha256 {
            query.push(("X-Amz-Content-Sha256".into(), sha256.into()));
        }
        if let Some(token) = &self.credentials.session_token {
            query.push(("X-Amz-Security-Token".into(), token.clone()));
        }
        let mut all_headers = headers.clone();
        all_headers.push(("host".into(), self.host()));
        let signed = Canonical {
            method,
            path: &path,
            query,
            headers: all_headers,
            payload_hash: payload_sha256.unwrap_or(UNSIGNED_PAYLOAD),
        }
        .sign(&self.credentials, &date_time);
        url.set_query(Some(&format!(
            "{}&X-Amz-Signature={}",
            signed.query, signed.signature
        )));
        SignedRequest {
            url,
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
        }
    }

    /// Signs and sends `request` under [`REQUEST_RETRY`] (signed afresh for each attempt);
    /// the first successful response.
    async fn send(&self, request: Request<'_>) -> Result<reqwest::Response, S3Error> {
        let payload_hash = hex::encode(Sha256::digest(&request.body));
        send_retried(request.operation, request.key, None, |_| {
            let signed = self.sign(
                request.method.as_str(),
                request.bucket,
                request.key,
                request.query,
                request.headers.clone(),
                &payload_hash,
                SystemTime::now(),
            );
            execute(
                &self.http,
                request.operation,
                request.key,
                request.method.clone(),
                signed,
                request.body.clone(),
            )
        })
        .await
    }

    /// A single PUT of a small object with metadata.
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Bytes,
        attributes: ObjectAttributes<'_>,
    ) -> Result<(), S3Error> {
        let mut headers = attributes.headers();
        headers.push(("content-md5".into(), content_md5(&body)));
        self.send(Request {
            operation: "PUT",
            method: Method::PUT,
            bucket,
            key,
            query: &[],
            headers,
            body,
        })
        .await
        .map(drop)
    }

    /// Starts a multipart upload of `key` with `attributes`; its upload id.
    pub async fn create_multipart(
        &self,
        bucket: &str,
        key: &str,
        attributes: ObjectAttributes<'_>,
    ) -> Result<String, S3Error> {
        let response = self
            .send(Request {
                operation: "CreateMultipartUpload",
                method: Method::POST,
                bucket,
                key,
                query: &[("uploads", "")],
                headers: attributes.headers(),
                body: Bytes::new(),
            })
            .await?;
        let text = response.text().await.unwrap_or_default();
        xml_values(&text, "UploadId")
            .into_iter()
            .next()
            .ok_or_else(|| S3Error::BadResponse {
                operation: "CreateMultipartUpload",
                key: key.to_string(),
                what: "an UploadId",
            })
    }

    /// Completes upload `upload_id` of `key` from `parts` and checks the object it made against
    /// `expected`; what HEAD says of it. A Complete whose answer was lost completed the upload;
    /// sent again, it finds the upload gone: the object is then this upload's if it carries
    /// this upload's metadata (and passes the checks).
    pub async fn complete_verified(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        expected: Expected<'_>,
    ) -> Result<ObjectHead, S3Error> {
        let object = match self.complete(bucket, key, upload_id, parts).await {
            Ok(()) => self.head(bucket, key).await?,
            Err(e) if e.is_no_such_upload() => match self.head(bucket, key).await {
                Ok(object) if expected.attributes.matches(&object) => object,
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let mismatch = |field, expected: String, actual: String| S3Error::Mismatch {
            key: key.to_string(),
            field,
            expected,
            actual,
        };
        if object.size != expected.size {
            return Err(mismatch(
                "size",
                expected.size.to_string(),
                object.size.to_string(),
            ));
        }
        if let Some(etag) = expected.etag.filter(|etag| *etag != object.etag) {
            return Err(mismatch("ETag", etag.to_string(), object.etag));
        }
        for (name, value) in expected.attributes.metadata {
            let actual = object
                .metadata
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            if actual != *value {
                return Err(S3Error::Mismatch {
                    key: key.to_string(),
                    field: "metadata",
                    expected: format!("{name}: {value}"),
                    actual: format!("{name}: {actual}"),
                });
            }
        }
        Ok(object)
    }

    async fn complete(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> Result<(), S3Error> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for part in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                part.number, part.etag
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let response = self
            .send(Request {
                operation: "CompleteMultipartUpload",
                method: Method::POST,
                bucket,
                key,
                query: &[("uploadId", upload_id)],
                headers: vec![("content-type".into(), "application/xml".into())],
                body: Bytes::from(xml),
            })
            .await?;
        // S3 may answer 200 with an <Error> body when completion fails late.
        let text = response.text().await.unwrap_or_default();
        if text.contains("<Error>") {
            return Err(S3Error::Refused {
                operation: "CompleteMultipartUpload",
                key: key.to_string(),
                status: StatusCode::OK,
                body: text.chars().take(500).collect(),
                retry_after: None,
            });
        }
        Ok(())
    }

    /// Drops upload `upload_id` of `key` and its parts.
    pub async fn abort(&self, bucket: &str, key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.send(Request {
            operation: "AbortMultipartUpload",
            method: Method::DELETE,
            bucket,
            key,
            query: &[("uploadId", upload_id)],
            headers: vec![],
            body: Bytes::new(),
        })
        .await
        .map(drop)
    }

    /// Deletes `key` (S3 answers success when there is none).
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        self.send(Request {
            operation: "DELETE",
            method: Method::DELETE,
            bucket,
            key,
            query: &[],
            headers: vec![],
            body: Bytes::new(),
        })
        .await
        .map(drop)
    }

    pub async fn head(&self, bucket: &str, key: &str) -> Result<ObjectHead, S3Error> {
        let response = self
            .send(Request {
                operation: "HEAD",
                method: Method::HEAD,
                bucket,
                key,
                query: &[],
                headers: vec![],
                body: Bytes::new(),
            })
            .await?;
        let headers = response.headers();
        let size = headers
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or(S3Error::BadResponse {
                operation: "HEAD",
                key: key.to_string(),
                what: "a Content-Length",
            })?;
        let etag = headers
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim_matches('"')
            .to_string();
        let metadata = headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name.as_str().strip_prefix("x-amz-meta-")?;
                Some((name.to_string(), value.to_str().ok()?.to_string()))
            })
            .collect();
        Ok(ObjectHead {
            size,
            etag,
            metadata,
        })
    }

    /// The multipart uploads S3 holds for keys starting with `prefix` (the first 1000).
    pub async fn list_multipart_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<OpenUpload>, S3Error> {
        let response = self
            .send(Request {
                operation: "ListMultipartUploads",
                method: Method::GET,
                bucket,
                key: "",
                query: &[("uploads", ""), ("prefix", prefix)],
                headers: vec![],
                body: Bytes::new(),
            })
            .await?;
        let text = response.text().await.unwrap_or_default();
        Ok(text
            .split("<Upload>")
            .skip(1)
            .filter_map(|upload| {
                Some(OpenUpload {
                    key: xml_values(upload, "Key").into_iter().next()?,
                    upload_id: xml_values(upload, "UploadId").into_iter().next()?,
                })
            })
            .collect())
    }
}

impl S3Client {
    /// Writes `report` beside the rootfs as `<s3_key>.status.json` (metadata `build-id`,
    /// `status`), so the place a rootfs was expected at says what became of the build, also
    /// when it failed. Written by whoever holds the key: a host run itself, else the node agent.
    pub async fn put_status(
        &self,
        location: &builder_contract::S3Location,
        report: &builder_contract::BuildReport,
    ) -> Result<(), S3Error> {
        let body = serde_json::to_vec_pretty(report).expect("a report always serializes");
        let metadata = [
            ("build-id".to_string(), report.build_id.clone()),
            ("status".to_string(), report.status.to_string()),
        ];
        self.put_object(
            &location.bucket,
            &location.status_key(),
            body.into(),
            ObjectAttributes {
                content_type: "application/json",
                metadata: &metadata,
            },
        )
        .await
    }
}

fn owned(query: &[(&str, &str)]) -> Vec<(String, String)> {
    query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs `attempt` under [`REQUEST_RETRY`]; a request that failed more than once ends as
/// [`S3Error::Exhausted`]. Each retry is announced on stderr, naming the part when there is one.
pub(crate) async fn send_retried<T, F>(
    operation: &'static str,
    key: &str,
    part: Option<u32>,
    attempt: impl FnMut(u32) -> F,
) -> Result<T, S3Error>
where
    F: std::future::Future<Output = Result<T, S3Error>>,
{
    let announce = |retrying: &builder_retry::Retrying<'_, S3Error>| {
        let error = chain(retrying.error);
        let part = part.map(|n| format!("part {n}: ")).unwrap_or_default();
        eprintln!("s3: {part}{}", retrying.describe(&error));
    };
    retry(&REQUEST_RETRY, attempt, S3Error::verdict, announce)
        .await
        .map_err(|gave_up| match gave_up.attempts {
            1 => gave_up.error,
            attempts => S3Error::Exhausted {
                operation,
                key: key.to_string(),
                attempts,
                last: Box::new(gave_up.error),
            },
        })
}

/// Sends a signed request once; the response if it is a success.
pub(crate) async fn execute(
    http: &reqwest::Client,
    operation: &'static str,
    key: &str,
    method: Method,
    request: SignedRequest,
    body: Bytes,
) -> Result<reqwest::Response, S3Error> {
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        let bad = || S3Error::BadHeader {
            operation,
            key: key.to_string(),
            name: name.clone(),
        };
        headers.insert(
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?,
            HeaderValue::from_str(value).map_err(|_| bad())?,
        );
    }
    let response = http
        .request(method, request.url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|source| S3Error::Transport {
            operation,
            key: key.to_string(),
            source,
        })?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.text().await.unwrap_or_default();
    Err(S3Error::Refused {
        operation,
        key: key.to_string(),
        status,
        body: body.chars().take(500).collect(),
        retry_after,
    })
}

/// The `Content-MD5` of a body: base64 of its MD5.
pub fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

/// The hex MD5 of a Content-MD5 (what S3 gives a single-part object as its ETag); `None` when
/// it is not base64 of 16 bytes.
pub fn md5_hex(content_md5: &str) -> Option<String> {
    md5_bytes(content_md5).map(hex::encode)
}

fn md5_bytes(content_md5: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(content_md5)
        .ok()
        .filter(|b| b.len() == 16)
}

/// The ETag S3 gives a multipart object: the hex MD5 of the parts' MD5s, `-` their count.
/// `None` when a Content-MD5 is not base64 of 16 bytes.
pub fn multipart_etag<'a>(content_md5s: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut all = Md5::new();
    let mut count = 0;
    for md5 in content_md5s {
        let bytes = md5_bytes(md5)?;
        all.update(&bytes);
        count += 1;
    }
    Some(format!("{}-{count}", hex::encode(all.finalize())))
}

/// The texts of every `<tag>` element of an XML response.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|rest| rest.split(close.as_str()).next().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_xml_and_computes_multipart_etags() {
        assert_eq!(
            xml_values("<a><UploadId>xyz</UploadId></a>", "UploadId"),
            ["xyz"]
        );
        let md5s = [content_md5(b"one"), content_md5(b"two")];
        let mut all = Vec::new();
        for part in [&b"one"[..], b"two"] {
            all.extend_from_slice(&Md5::digest(part));
        }
        assert_eq!(
            multipart_etag(md5s.iter().map(String::as_str)).unwrap(),
            format!("{}-2", hex::encode(Md5::digest(&all)))
        );
        assert_eq!(multipart_etag(["bm90IDE2IGJ5dGVz"]), None);
        assert_eq!(
            md5_hex("1B2M2Y8AsgTpgAmY7PhCfg==").as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
    }
}
