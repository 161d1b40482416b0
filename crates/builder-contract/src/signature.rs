//! Webhook signatures: HMAC-SHA256 over `"{timestamp}.{body}"`, with the timestamp checked
//! against a tolerance so a captured request cannot be replayed later.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying the Unix time (seconds) the request was signed at.
pub const TIMESTAMP_HEADER: &str = "x-builder-timestamp";
/// Header carrying `v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-builder-signature";
/// How far a signed timestamp may be from the receiver's clock.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the {TIMESTAMP_HEADER} header is missing or not a number")]
    BadTimestamp,
    #[error("the {SIGNATURE_HEADER} header is missing or not of the form v1=<hex>")]
    BadFormat,
    #[error("the signature was made {age_secs} s away from now, beyond the {tolerance_secs} s tolerance (replay?)")]
    Stale { age_secs: u64, tolerance_secs: u64 },
    #[error("the signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The value of the signature header for `body` signed at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// A signature that [`verify`] accepted, decoded: what a receiver records to refuse a replay.
/// The header's text is not fit for that: `v1=AB..` and `v1=ab..`, or surrounding spaces, are
/// one signature in several spellings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSignature(Vec<u8>);

impl VerifiedSignature {
    /// The one spelling of this signature: `v1=<lower-case hex>`, as [`sign`] writes it.
    pub fn canonical(&self) -> String {
        format!("v1={}", hex::encode(&self.0))
    }
}

/// Checks the two headers of a received webhook against its body, at time `now` (Unix seconds).
pub fn verify(
    secret: &[u8],
    timestamp_header: Option<&str>,
    signature_header: Option<&str>,
    body: &[u8],
    now: u64,
    tolerance_secs: u64,
) -> Result<VerifiedSignature, SignatureError> {
    let timestamp: u64 = timestamp_header
        .and_then(|t| t.trim().parse().ok())
        .ok_or(SignatureError::BadTimestamp)?;
    let signature = signature_header
        .and_then(|s| s.trim().strip_prefix("v1="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::BadFormat)?;
    let age_secs = now.abs_diff(timestamp);
    if age_secs > tolerance_secs {
        return Err(SignatureError::Stale {
            age_secs,
            tolerance_secs,
        });
    }
    mac(secret, timestamp, body)
        .verify_slice(&signature)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok(VerifiedSignature(signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_verifies_and_rejects_tampering_and_replay() {
        let sig = sign(b"k", 1000, b"{}");
        let verified = verify(b"k", Some("1000"), Some(&sig), b"{}", 1100, 300).unwrap();
        assert_eq!(verified.canonical(), sig);
        // Other spellings of the same signature verify too, and come out as the same one.
        let upper = format!(" v1={} ", sig["v1=".len()..].to_uppercase());
        let again = verify(b"k", Some("1000"), Some(&upper), b"{}", 1100, 300).unwrap();
        assert_eq!(again, verified);
        assert_eq!(
            verify(b"k", Some("1000"), Some(&sig), b"{ }", 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", Some("1000"), Some(&sig), b"{}", 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"k", Some("1001"), Some(&sig), b"{}", 1001, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify(b"k", Some("1000"), Some(&sig), b"{}", 2000, 300),
            Err(SignatureError::Stale { age_secs: 1000, .. })
        ));
        assert_eq!(
            verify(b"k", None, Some(&sig), b"{}", 1000, 300),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            verify(b"k", Some("1000"), Some("zz"), b"{}", 1000, 300),
            Err(SignatureError::BadFormat)
        );
    }
}
