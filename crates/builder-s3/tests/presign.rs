//! Presigned requests against the real SeaweedFS S3 of `scripts/services.sh`: what a builder VM
//! can do with the UploadPart URL its node presigns for one part of one upload of one key, and
//! what it cannot: use it for another key or bucket (403), after it expired (403), or for
//! bytes other than the Content-MD5 it was signed for (400 BadDigest). Also what SeaweedFS
//! does not check: the SHA-256 signed as `X-Amz-Content-Sha256` (it accepts other bytes whose
//! MD5 matches their own header, when that header is the signed one: see the last test).

use std::time::{Duration, SystemTime};

use builder_contract::upload::{CompletedPart, SignedRequest};
use builder_contract::S3Credentials;
use builder_s3::{digest, Expected, ObjectAttributes, S3Client};
use bytes::Bytes;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `eval \"$(scripts/services.sh env)\"` first")
    })
}

fn client() -> S3Client {
    S3Client::new(S3Credentials {
        endpoint: env("BUILDER_TEST_S3_ENDPOINT"),
        region: env("BUILDER_TEST_S3_REGION"),
        access_key_id: env("BUILDER_TEST_S3_ACCESS_KEY"),
        secret_access_key: env("BUILDER_TEST_S3_SECRET_KEY"),
        session_token: None,
    })
    .unwrap()
}

fn unique(prefix: &str) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("presign/{prefix}-{now}-{}", std::process::id())
}

/// 5 MiB of bytes that differ per `seed`.
fn part_body(seed: u8) -> Bytes {
    Bytes::from(
        (0..5u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect::<Vec<u8>>(),
    )
}

/// PUTs `body` with `request`: the status and the answer's text.
async fn put(request: &SignedRequest, body: Bytes) -> (u16, String) {
    let mut builder = reqwest::Client::new().put(request.url.clone()).body(body);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let response = builder.send().await.unwrap();
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

/// The presigned UploadPart of part `number` of `body` (its MD5 and SHA-256), as a node grants it.
fn part_url(
    s3: &S3Client,
    key: &str,
    upload_id: &str,
    number: u32,
    body: &[u8],
    expires: Duration,
    at: SystemTime,
) -> SignedRequest {
    let d = digest(body);
    s3.presign(
        "PUT",
        &env("BUILDER_TEST_S3_BUCKET"),
        key,
        &[("partNumber", &number.to_string()), ("uploadId", upload_id)],
        vec![("content-md5".into(), d.md5)],
        Some(&d.sha256),
        expires,
        at,
    )
}

#[tokio::test]
async fn a_presigned_part_url_serves_its_part_only() {
    let s3 = client();
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = unique("scoped");
    let attributes = ObjectAttributes {
        content_type: "application/octet-stream",
        metadata: &[],
    };
    let upload_id = s3
        .create_multipart(&bucket, &key, attributes)
        .await
        .unwrap();
    let body = part_body(1);
    let now = SystemTime::now();
    let granted = part_url(
        &s3,
        &key,
        &upload_id,
        1,
        &body,
        Duration::from_secs(300),
        now,
    );

    // Another key, another bucket, another part number: the signature does not cover them.
    let mut other_key = granted.clone();
    other_key
        .url
        .set_path(&granted.url.path().replace(&key, &format!("{key}-other")));
    let (status, text) = put(&other_key, body.clone()).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("SignatureDoesNotMatch"), "{text}");
    let mut other_bucket = granted.clone();
    other_bucket
        .url
        .set_path(&granted.url.path().replacen(&bucket, "another-bucket", 1));
    assert_eq!(put(&other_bucket, body.clone()).await.0, 403);
    let other_part = SignedRequest {
        url: granted
            .url
            .as_str()
            .replace("partNumber=1", "partNumber=2")
            .parse()
            .unwrap(),
        headers: granted.headers.clone(),
    };
    assert_eq!(put(&other_part, body.clone()).await.0, 403);

    // Another Content-MD5 than the signed one: refused by the signature; the signed one with
    // other bytes: refused by the MD5 check.
    let mut other_md5 = granted.clone();
    other_md5
        .headers
        .insert("content-md5".into(), digest(&part_body(2)).md5);
    assert_eq!(put(&other_md5, part_body(2)).await.0, 403);
    let (status, text) = put(&granted, part_body(3)).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("BadDigest"), "{text}");

    // Expired: signed a minute ago for one second.
    let expired = part_url(
        &s3,
        &key,
        &upload_id,
        1,
        &body,
        Duration::from_secs(1),
        now - Duration::from_secs(60),
    );
    let (status, text) = put(&expired, body.clone()).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("expired"), "{text}");

    // The grant itself works, and the object is exactly that part.
    let (status, text) = put(&granted, body.clone()).await;
    assert_eq!(status, 200, "{text}");
    let etag = builder_s3::md5_hex(&digest(&body).md5).unwrap();
    let object = s3
        .complete_verified(
            &bucket,
            &key,
            &upload_id,
            &[CompletedPart {
                number: 1,
                etag: format!("\"{etag}\""),
            }],
            Expected {
                size: body.len() as u64,
                attributes,
                etag: builder_s3::multipart_etag([digest(&body).md5.as_str()]).as_deref(),
            },
        )
        .await
        .unwrap();
    assert_eq!(object.size, body.len() as u64);
    assert!(s3
        .list_multipart_uploads(&bucket, &key)
        .await
        .unwrap()
        .is_empty());
    s3.delete(&bucket, &key).await.unwrap();
}

/// The finding the design rests on: SeaweedFS verifies Content-MD5 but not the SHA-256 signed
/// into a presigned URL. Bytes other than the signed SHA-256's, sent under their own
/// Content-MD5 in a URL signed for that MD5, land. So the node binds each part to its MD5 (and
/// checks the multipart ETag made of them); the SHA-256 is signed for stores that check it.
#[tokio::test]
async fn seaweedfs_checks_the_md5_and_not_the_signed_sha256() {
    let s3 = client();
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = unique("sha-unchecked");
    let attributes = ObjectAttributes {
        content_type: "application/octet-stream",
        metadata: &[],
    };
    let upload_id = s3
        .create_multipart(&bucket, &key, attributes)
        .await
        .unwrap();
    let (declared, sent) = (part_body(4), part_body(5));
    let sent_digest = digest(&sent);
    let request = s3.presign(
        "PUT",
        &bucket,
        &key,
        &[("partNumber", "1"), ("uploadId", &upload_id)],
        vec![("content-md5".into(), sent_digest.md5)],
        Some(&digest(&declared).sha256),
        Duration::from_secs(300),
        SystemTime::now(),
    );
    let (status, text) = put(&request, sent).await;
    assert_eq!(status, 200, "SeaweedFS now checks the SHA-256: {text}");
    s3.abort(&bucket, &key, &upload_id).await.unwrap();
}
