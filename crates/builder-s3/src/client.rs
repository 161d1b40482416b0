//! A small S3 client: AWS Signature V4 over `reqwest`, path-style addressing, and a multipart
//! upload that reads a file from disk with several parts in flight at once.
//!
//! Every part carries `Content-MD5` (the server rejects a part whose bytes differ) and its
//! SHA-256 as the signed payload hash, so a corrupted part never lands. At most
//! `parts_in_flight` parts are read and sent at once, so memory stays at that many part buffers;
//! each is read with `pread` and hashed on a blocking thread. The object only appears when the
//! upload completes; on any failure the parts still in flight are dropped and the upload is
//! aborted, so nothing half-uploaded is left looking complete. Every request is retried under the
//! shared [`RetryPolicy`] (`builder-retry`) while the server is unreachable or answers
//! 5xx/408/429; the retries are announced on stderr (the VM's console).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use builder_contract::S3Credentials;
use builder_retry::{retry, RetryPolicy, Verdict};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use hmac::{Hmac, Mac};
use md5::Md5;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use url::Url;

/// Part size of multipart uploads (S3 allows 5 MiB to 5 GiB, at most 10 000 parts).
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
/// Parts sent at once by default (see `scripts/bench-upload.sh` for how it was chosen).
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 4;
const MAX_PARTS: u64 = 10_000;
/// How every request is retried: 4 attempts, waits of at most 0.5, 1 and 2 s.
const REQUEST_RETRY: RetryPolicy = RetryPolicy {
    attempts: 4,
    first_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(8),
};

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
    #[error("cannot read {path} for upload")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the uploaded object {key} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        key: String,
        expected: u64,
        actual: u64,
    },
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
    fn matches(&self, object: &ObjectHead) -> bool {
        self.metadata.iter().all(|(name, value)| {
            object
                .metadata
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value)
        })
    }

    fn headers(&self) -> Vec<(String, String)> {
        let mut headers: Vec<(String, String)> = self
            .metadata
            .iter()
            .map(|(k, v)| (format!("x-amz-meta-{k}"), v.clone()))
            .collect();
        headers.push(("content-type".into(), self.content_type.into()));
        headers
    }
}

pub struct S3Client {
    http: reqwest::Client,
    endpoint: Url,
    credentials: S3Credentials,
    parts_in_flight: usize,
}

/// One request to send, possibly several times.
struct Request<'a> {
    operation: &'static str,
    method: Method,
    bucket: &'a str,
    key: &'a str,
    query: &'a [(&'a str, &'a str)],
    headers: Vec<(String, String)>,
    body: Payload,
    /// The part number of an UploadPart, for the retry lines.
    part: Option<u32>,
}

/// A request body and its SHA-256 (the signed payload hash), hashed once for every attempt.
struct Payload {
    bytes: Bytes,
    sha256: String,
}

impl Payload {
    fn new(bytes: Bytes) -> Self {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Payload { bytes, sha256 }
    }

    fn empty() -> Self {
        Payload::new(Bytes::new())
    }
}

/// A part that landed.
struct SentPart {
    number: u32,
    len: u64,
    etag: String,
}

/// Percent-encodes like SigV4 wants: everything but unreserved characters (and `/` in paths).
fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// `YYYYMMDD'T'HHMMSS'Z'` for a time.
fn amz_date(now: SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    t.format(time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))
    .expect("a fixed format always formats")
}

impl S3Client {
    pub fn new(credentials: S3Credentials) -> Result<Self, S3Error> {
        let endpoint = Url::parse(&credentials.endpoint).map_err(|source| S3Error::Endpoint {
            endpoint: credentials.endpoint.clone(),
            source,
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .build()
            .expect("a client with timeouts always builds");
        Ok(S3Client {
            http,
            endpoint,
            credentials,
            parts_in_flight: DEFAULT_PARTS_IN_FLIGHT,
        })
    }

    /// Sends up to `parts` parts of a multipart upload at once (at least one).
    pub fn with_parts_in_flight(mut self, parts: usize) -> Self {
        self.parts_in_flight = parts.max(1);
        self
    }

    fn object_url(&self, bucket: &str, key: &str, query: &[(&str, &str)]) -> (Url, String, String) {
        let base = self.endpoint.path().trim_end_matches('/');
        let path = format!(
            "{base}/{}/{}",
            uri_encode(bucket, false),
            uri_encode(key, true)
        );
        let mut pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        pairs.sort();
        let canonical_query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let mut url = self.endpoint.clone();
        url.set_path(&path);
        url.set_query((!canonical_query.is_empty()).then_some(canonical_query.as_str()));
        (url, path, canonical_query)
    }

    /// Sends `request` under [`REQUEST_RETRY`] and returns the first successful response.
    async fn send(&self, request: Request<'_>) -> Result<reqwest::Response, S3Error> {
        let verdict = |e: &S3Error| match e {
            S3Error::Transport { .. } => Verdict::Retry,
            S3Error::Refused {
                status,
                retry_after,
                ..
            } => Verdict::for_http_status(status.as_u16(), retry_after.as_deref()),
            _ => Verdict::Final,
        };
        let announce = |retrying: &builder_retry::Retrying<'_, S3Error>| {
            let error = crate::error::chain(retrying.error);
            let part = request
                .part
                .map(|n| format!("part {n}: "))
                .unwrap_or_default();
            eprintln!("s3: {part}{}", retrying.describe(&error));
        };
        retry(
            &REQUEST_RETRY,
            |_| self.send_once(&request),
            verdict,
            announce,
        )
        .await
        .map_err(|gave_up| match gave_up.attempts {
            1 => gave_up.error,
            attempts => S3Error::Exhausted {
                operation: request.operation,
                key: request.key.to_string(),
                attempts,
                last: Box::new(gave_up.error),
            },
        })
    }

    /// Sends one signed request and returns the response if it is a success.
    async fn send_once(&self, request: &Request<'_>) -> Result<reqwest::Response, S3Error> {
        let Request {
            operation,
            ref method,
            bucket,
            key,
            query,
            ref headers,
            ref body,
            part: _,
        } = *request;
        let mut headers = headers.clone();
        let (url, path, canonical_query) = self.object_url(bucket, key, query);
        let now = SystemTime::now();
        let date_time = amz_date(now);
        let date = &date_time[..8];
        let payload_hash = body.sha256.clone();
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        headers.push(("host".into(), host));
        headers.push(("x-amz-content-sha256".into(), payload_hash.clone()));
        headers.push(("x-amz-date".into(), date_time.clone()));
        if let Some(token) = &self.credentials.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        for (name, value) in headers.iter_mut() {
            *name = name.to_ascii_lowercase();
            *value = value.trim().to_string();
        }
        headers.sort();
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed_headers = headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_request = format!(
            "{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}"
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.credentials.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let mut key_bytes = hmac(
            format!("AWS4{}", self.credentials.secret_access_key).as_bytes(),
            date,
        );
        for part in [self.credentials.region.as_str(), "s3", "aws4_request"] {
            key_bytes = hmac(&key_bytes, part);
        }
        let signature = hex::encode(hmac(&key_bytes, &string_to_sign));
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.credentials.access_key_id
        );
        let mut header_map = HeaderMap::new();
        for (name, value) in headers.iter().filter(|(k, _)| k != "host") {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("header names are ASCII");
            let value = HeaderValue::from_str(value).map_err(|_| S3Error::BadResponse {
                operation,
                key: key.to_string(),
                what: "a header value that HTTP can carry",
            })?;
            header_map.insert(name, value);
        }
        header_map.insert(
            reqwest::header::AUTHORIZATION,
            HeaderValue::from_str(&authorization).expect("the authorization header is ASCII"),
        );
        let response = self
            .http
            .request(method.clone(), url)
            .headers(header_map)
            .body(body.bytes.clone())
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
            body: Payload::new(body),
            part: None,
        })
        .await
        .map(drop)
    }

    /// Uploads the file at `path` as `key` in parts of `part_size` bytes, `parts_in_flight` at
    /// once; `progress(sent, total)` follows each part that lands. Aborts on failure.
    pub async fn upload_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        attributes: ObjectAttributes<'_>,
        part_size: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), S3Error> {
        let read_error = |source| S3Error::Read {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let total = file.metadata().map_err(read_error)?.len();
        let part_size = part_size.max(5 << 20).max(total.div_ceil(MAX_PARTS));
        // An empty file is one empty part.
        let parts = total.div_ceil(part_size).max(1) as u32;
        let file = Arc::new(file);
        let response = self
            .send(Request {
                operation: "CreateMultipartUpload",
                method: Method::POST,
                bucket,
                key,
                query: &[("uploads", "")],
                headers: attributes.headers(),
                body: Payload::empty(),
                part: None,
            })
            .await?;
        let text = response.text().await.unwrap_or_default();
        let upload_id = xml_value(&text, "UploadId").ok_or_else(|| S3Error::BadResponse {
            operation: "CreateMultipartUpload",
            key: key.to_string(),
            what: "an UploadId",
        })?;
        let result = async {
            let mut etags = Vec::with_capacity(parts as usize);
            let mut sent = 0u64;
            // `buffer_unordered` starts a part only when fewer than `parts_in_flight` run, so
            // at most that many part buffers exist; an error drops (cancels) the others.
            let mut uploads = futures_util::stream::iter(1..=parts)
                .map(|number| {
                    let offset = u64::from(number - 1) * part_size;
                    let len = part_size.min(total - offset);
                    self.upload_part(bucket, key, &upload_id, path, &file, number, offset, len)
                })
                .buffer_unordered(self.parts_in_flight);
            while let Some(part) = uploads.try_next().await? {
                sent += part.len;
                progress(sent, total);
                etags.push((part.number, part.etag));
            }
            etags.sort_unstable_by_key(|(number, _)| *number);
            let object = match self.complete(bucket, key, &upload_id, &etags).await {
                Ok(()) => self.head(bucket, key).await?,
                // A Complete whose answer was lost completed the upload; sent again, it finds
                // the upload gone. The object is this one if it carries this upload's metadata.
                Err(e) if is_no_such_upload(&e) => match self.head(bucket, key).await {
                    Ok(object) if attributes.matches(&object) => object,
                    _ => return Err(e),
                },
                Err(e) => return Err(e),
            };
            let size = object.size;
            if size != total {
                return Err(S3Error::SizeMismatch {
                    key: key.to_string(),
                    expected: total,
                    actual: size,
                });
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            // Leave no parts behind; if the abort fails too, the upload id expires by lifecycle.
            let _ = self
                .send(Request {
                    operation: "AbortMultipartUpload",
                    method: Method::DELETE,
                    bucket,
                    key,
                    query: &[("uploadId", &upload_id)],
                    headers: vec![],
                    body: Payload::empty(),
                    part: None,
                })
                .await;
        }
        result
    }

    /// Reads part `number` (`len` bytes at `offset` of `file`), hashes it on a blocking thread
    /// and sends it.
    #[allow(clippy::too_many_arguments)]
    async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        path: &Path,
        file: &Arc<std::fs::File>,
        number: u32,
        offset: u64,
        len: u64,
    ) -> Result<SentPart, S3Error> {
        let file = Arc::clone(file);
        let (body, md5) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            let md5 = content_md5(&buf);
            Ok((Payload::new(Bytes::from(buf)), md5))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|source| S3Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let number_text = number.to_string();
        let response = self
            .send(Request {
                operation: "UploadPart",
                method: Method::PUT,
                bucket,
                key,
                query: &[("partNumber", &number_text), ("uploadId", upload_id)],
                headers: vec![("content-md5".into(), md5)],
                body,
                part: Some(number),
            })
            .await?;
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or(S3Error::BadResponse {
                operation: "UploadPart",
                key: key.to_string(),
                what: "an ETag",
            })?;
        Ok(SentPart { number, len, etag })
    }

    async fn complete(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        etags: &[(u32, String)],
    ) -> Result<(), S3Error> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (number, etag) in etags {
            xml.push_str(&format!(
                "<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag></Part>"
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
                body: Payload::new(Bytes::from(xml)),
                part: None,
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

    async fn head(&self, bucket: &str, key: &str) -> Result<ObjectHead, S3Error> {
        let response = self
            .send(Request {
                operation: "HEAD",
                method: Method::HEAD,
                bucket,
                key,
                query: &[],
                headers: vec![],
                body: Payload::empty(),
                part: None,
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
        let metadata = headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name.as_str().strip_prefix("x-amz-meta-")?;
                Some((name.to_string(), value.to_str().ok()?.to_string()))
            })
            .collect();
        Ok(ObjectHead { size, metadata })
    }
}

/// What a HEAD of an object says.
struct ObjectHead {
    size: u64,
    /// `x-amz-meta-*` headers, without the prefix.
    metadata: Vec<(String, String)>,
}

/// Whether S3 answered that the multipart upload no longer exists (at once, or on a retry).
fn is_no_such_upload(error: &S3Error) -> bool {
    match error {
        S3Error::Refused { status, body, .. } => {
            *status == StatusCode::NOT_FOUND && body.contains("NoSuchUpload")
        }
        S3Error::Exhausted { last, .. } => is_no_such_upload(last),
        _ => false,
    }
}

fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

/// The text of the first `<tag>` element of an XML response.
fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_sigv4() {
        assert_eq!(uri_encode("a b/c~d.e_f-g+h", true), "a%20b/c~d.e_f-g%2Bh");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(
            amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)),
            "20150830T123600Z"
        );
        assert_eq!(
            xml_value("<a><UploadId>xyz</UploadId></a>", "UploadId").as_deref(),
            Some("xyz")
        );
    }
}
