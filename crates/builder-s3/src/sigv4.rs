//! AWS Signature Version 4 for S3, the two ways this project signs: in headers (an
//! `Authorization` header, for requests sent at once by whoever holds the key) and in the query
//! (a presigned URL, for a request someone without the key sends later, until it expires).
//! Path-style addressing; the canonical forms are AWS's.

use std::time::SystemTime;

use builder_contract::S3Credentials;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The payload hash of a presigned request whose body is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Percent-encodes like SigV4 wants: everything but unreserved characters (and `/` in paths).
pub(crate) fn uri_encode(text: &str, keep_slash: bool) -> String {
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
pub(crate) fn amz_date(now: SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    t.format(time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))
    .expect("a fixed format always formats")
}

/// One request to sign: its canonical parts before the signature.
pub(crate) struct Canonical<'a> {
    pub method: &'a str,
    /// The URL path, already encoded.
    pub path: &'a str,
    /// Query pairs, not yet encoded.
    pub query: Vec<(String, String)>,
    /// Headers to sign (`host` included), any case.
    pub headers: Vec<(String, String)>,
    /// Hex SHA-256 of the body, or [`UNSIGNED_PAYLOAD`].
    pub payload_hash: &'a str,
}

/// What signing gave: the canonical query string (to put in the URL), the signed header list
/// and the signature.
pub(crate) struct Signed {
    pub query: String,
    pub signed_headers: String,
    pub scope: String,
    pub signature: String,
}

impl Canonical<'_> {
    /// Signs with `credentials` at `date_time` ([`amz_date`]).
    pub fn sign(mut self, credentials: &S3Credentials, date_time: &str) -> Signed {
        let date = &date_time[..8];
        for (name, value) in self.headers.iter_mut() {
            *name = name.to_ascii_lowercase();
            *value = value.trim().to_string();
        }
        self.headers.sort();
        let canonical_headers: String = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}:{v}\n"))
            .collect();
        let signed_headers = self
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let mut pairs: Vec<(String, String)> = self
            .query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        pairs.sort();
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let canonical_request = format!(
            "{}\n{}\n{query}\n{canonical_headers}\n{signed_headers}\n{}",
            self.method, self.path, self.payload_hash
        );
        let scope = scope(credentials, date);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let mut key = hmac(
            format!("AWS4{}", credentials.secret_access_key).as_bytes(),
            date,
        );
        for part in [credentials.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part);
        }
        Signed {
            query,
            signed_headers,
            scope,
            signature: hex::encode(hmac(&key, &string_to_sign)),
        }
    }
}

/// `DATE/REGION/s3/aws4_request`.
pub(crate) fn scope(credentials: &S3Credentials, date: &str) -> String {
    format!("{date}/{}/s3/aws4_request", credentials.region)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn encodes_like_sigv4() {
        assert_eq!(uri_encode("a b/c~d.e_f-g+h", true), "a%20b/c~d.e_f-g%2Bh");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(
            amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)),
            "20150830T123600Z"
        );
    }

    /// AWS's documented example of a presigned GET (S3 developer guide, "Authenticating
    /// Requests: Using Query Parameters").
    #[test]
    fn presigns_the_aws_example() {
        let credentials = S3Credentials {
            endpoint: "https://examplebucket.s3.amazonaws.com".into(),
            region: "us-east-1".into(),
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let signed = Canonical {
            method: "GET",
            path: "/test.txt",
            query: vec![
                ("X-Amz-Algorithm".into(), "AWS4-HMAC-SHA256".into()),
                (
                    "X-Amz-Credential".into(),
                    "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request".into(),
                ),
                ("X-Amz-Date".into(), "20130524T000000Z".into()),
                ("X-Amz-Expires".into(), "86400".into()),
                ("X-Amz-SignedHeaders".into(), "host".into()),
            ],
            headers: vec![("Host".into(), "examplebucket.s3.amazonaws.com".into())],
            payload_hash: UNSIGNED_PAYLOAD,
        }
        .sign(&credentials, "20130524T000000Z");
        assert_eq!(
            signed.signature,
            "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }
}
