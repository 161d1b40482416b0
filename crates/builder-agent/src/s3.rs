//! A small S3 client: AWS Signature V4 over `reqwest`, path-style addressing, and a multipart
//! upload that streams a file from disk part by part.
//!
//! Every part carries `Content-MD5` (the server rejects a part whose bytes differ) and its
//! SHA-256 as the signed payload hash, so a corrupted part never lands. The object only appears
//! when the upload completes; on any failure the upload is aborted, so nothing half-uploaded is
//! left looking complete.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use builder_contract::S3Credentials;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use md5::Md5;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use url::Url;

/// Part size of multipart uploads (S3 allows 5 MiB to 5 GiB, at most 10 000 parts).
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
const MAX_PARTS: u64 = 10_000;
/// Attempts per part before the upload is given up.
const PART_ATTEMPTS: u32 = 3;

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
        })
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

    /// Sends one signed request and returns the response if it is a success.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        operation: &'static str,
        method: Method,
        bucket: &str,
        key: &str,
        query: &[(&str, &str)],
        mut headers: Vec<(String, String)>,
        body: Bytes,
    ) -> Result<reqwest::Response, S3Error> {
        let (url, path, canonical_query) = self.object_url(bucket, key, query);
        let now = SystemTime::now();
        let date_time = amz_date(now);
        let date = &date_time[..8];
        let payload_hash = hex::encode(Sha256::digest(&body));
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
            .request(method, url)
            .headers(header_map)
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
        let body = response.text().await.unwrap_or_default();
        Err(S3Error::Refused {
            operation,
            key: key.to_string(),
            status,
            body: body.chars().take(500).collect(),
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
        self.send("PUT", Method::PUT, bucket, key, &[], headers, body)
            .await
            .map(drop)
    }

    /// Uploads the file at `path` as `key` in parts of `part_size` bytes; aborts on failure.
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
        let mut file = tokio::fs::File::open(path).await.map_err(read_error)?;
        let total = file.metadata().await.map_err(read_error)?.len();
        let part_size = part_size.max(5 << 20).max(total.div_ceil(MAX_PARTS));
        let headers = attributes.headers();
        let response = self
            .send(
                "CreateMultipartUpload",
                Method::POST,
                bucket,
                key,
                &[("uploads", "")],
                headers,
                Bytes::new(),
            )
            .await?;
        let text = response.text().await.unwrap_or_default();
        let upload_id = xml_value(&text, "UploadId").ok_or_else(|| S3Error::BadResponse {
            operation: "CreateMultipartUpload",
            key: key.to_string(),
            what: "an UploadId",
        })?;
        let result = async {
            let mut etags = Vec::new();
            let mut sent = 0u64;
            let mut number = 1u32;
            loop {
                let mut buf = Vec::with_capacity(part_size.min(total.max(1)) as usize);
                (&mut file)
                    .take(part_size)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(read_error)?;
                if buf.is_empty() && number > 1 {
                    break;
                }
                let len = buf.len() as u64;
                let etag = self
                    .upload_part(bucket, key, &upload_id, number, Bytes::from(buf))
                    .await?;
                etags.push((number, etag));
                sent += len;
                progress(sent, total);
                number += 1;
                if len < part_size {
                    break;
                }
            }
            self.complete(bucket, key, &upload_id, &etags).await?;
            let size = self.head_size(bucket, key).await?;
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
                .send(
                    "AbortMultipartUpload",
                    Method::DELETE,
                    bucket,
                    key,
                    &[("uploadId", &upload_id)],
                    vec![],
                    Bytes::new(),
                )
                .await;
        }
        result
    }

    async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Bytes,
    ) -> Result<String, S3Error> {
        let number_text = number.to_string();
        let md5 = content_md5(&body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .send(
                    "UploadPart",
                    Method::PUT,
                    bucket,
                    key,
                    &[("partNumber", &number_text), ("uploadId", upload_id)],
                    vec![("content-md5".into(), md5.clone())],
                    body.clone(),
                )
                .await;
            match result {
                Ok(response) => {
                    return response
                        .headers()
                        .get(reqwest::header::ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .ok_or(S3Error::BadResponse {
                            operation: "UploadPart",
                            key: key.to_string(),
                            what: "an ETag",
                        })
                }
                Err(e) if attempt < PART_ATTEMPTS && is_retryable(&e) => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
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
            .send(
                "CompleteMultipartUpload",
                Method::POST,
                bucket,
                key,
                &[("uploadId", upload_id)],
                vec![("content-type".into(), "application/xml".into())],
                Bytes::from(xml),
            )
            .await?;
        // S3 may answer 200 with an <Error> body when completion fails late.
        let text = response.text().await.unwrap_or_default();
        if text.contains("<Error>") {
            return Err(S3Error::Refused {
                operation: "CompleteMultipartUpload",
                key: key.to_string(),
                status: StatusCode::OK,
                body: text.chars().take(500).collect(),
            });
        }
        Ok(())
    }

    async fn head_size(&self, bucket: &str, key: &str) -> Result<u64, S3Error> {
        let response = self
            .send("HEAD", Method::HEAD, bucket, key, &[], vec![], Bytes::new())
            .await?;
        response
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or(S3Error::BadResponse {
                operation: "HEAD",
                key: key.to_string(),
                what: "a Content-Length",
            })
    }
}

fn is_retryable(e: &S3Error) -> bool {
    match e {
        S3Error::Transport { .. } => true,
        S3Error::Refused { status, .. } => status.is_server_error(),
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
