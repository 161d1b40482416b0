//! The scoped upload end to end, against the real SeaweedFS S3 of `scripts/services.sh`: the
//! node holds the S3 key and a VM (a script; its guest's posts made here as builder-agent makes
//! them, signed with the build's key) holds none. The guest uploads through the node's grants
//! with builder-agent's own engine; it cannot get a URL for another key (it never names one,
//! and a granted URL moved to another key is refused); a report that does not match the
//! verified upload fails the build naming the field; a build that fails leaves no multipart
//! upload open, none of its own objects (an earlier build's at the same key stays) and a
//! `<s3_key>.status.json` the node wrote.

mod common;

use std::time::Duration;

use builder_contract::upload::{upload_url, SignedRequest, UploadStep};
use builder_contract::{BuildReport, BuildStatus, RootfsArtifact, S3Credentials};
use builder_s3::{digest, GrantedObject, NodeGrant, S3Client, Uploader};
use common::{Guest, Options, ScriptLauncher};
use serde_json::json;
use sha2::Digest;

const PART: u64 = 5 << 20;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `eval \"$(scripts/services.sh env)\"` first")
    })
}

fn credentials() -> S3Credentials {
    S3Credentials {
        endpoint: env("BUILDER_TEST_S3_ENDPOINT"),
        region: env("BUILDER_TEST_S3_REGION"),
        access_key_id: env("BUILDER_TEST_S3_ACCESS_KEY"),
        secret_access_key: env("BUILDER_TEST_S3_SECRET_KEY"),
        session_token: None,
    }
}

/// A daemon whose `s3_credentials_file` is the test store's.
async fn daemon(dir: &std::path::Path, launcher: std::sync::Arc<ScriptLauncher>) -> common::Daemon {
    common::start(
        dir,
        launcher,
        Options {
            s3_section: Some(serde_json::to_string(&credentials()).unwrap()),
            ..Default::default()
        },
    )
    .await
}

/// `len` bytes that differ per `seed`, as a file.
fn rootfs(dir: &std::path::Path, len: usize, seed: u32) -> (std::path::PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8)
        .collect();
    let path = dir.join(format!("rootfs-{seed}.ext4"));
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn object(sha256: &str) -> GrantedObject {
    GrantedObject {
        sha256: sha256.to_string(),
        image_digest: format!("sha256:{}", "ab".repeat(32)),
        commit_sha: "c0ffee".repeat(6) + "c0ff",
    }
}

fn report(id: &str, status: BuildStatus, rootfs: Option<RootfsArtifact>) -> BuildReport {
    common::end_report(id, status, rootfs, None)
}

/// Polls `check` for up to 10 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_guest_without_a_key_uploads_through_grants_for_its_own_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("sleep 30");
    let d = daemon(dir.path(), launcher.clone()).await;
    let api = d.client();
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = format!("grant/{}.ext4", node_agent::random_hex(8));
    let id = api
        .submit(json!({"s3_bucket": bucket, "s3_key": key}))
        .await;
    api.wait_state(&id, "running", Duration::from_secs(10))
        .await;
    let spec = launcher.spec(&id).unwrap();
    // No S3 key in the VM's secrets.
    assert!(spec.secrets.s3.is_none(), "the VM got an S3 key");
    let guest = Guest::of(&spec);

    // The guest cannot name a bucket or key: the start has no such field.
    let start_url = upload_url(&guest.notify_url, &id, UploadStep::Start).unwrap();
    let named = json!({"nonce": "n", "size": 1, "sha256": "0".repeat(64), "part_size": PART,
        "image_digest": "x", "commit_sha": "y", "s3_key": "someone/else",
        "config": {"size": 1, "md5": "1B2M2Y8AsgTpgAmY7PhCfg==", "sha256": "0".repeat(64)}});
    let status = guest
        .post_signed(&start_url, &guest.key, &serde_json::to_vec(&named).unwrap())
        .await;
    assert_eq!(status, 400);

    // Builder-agent's engine, with the node's grant: 3 parts.
    let (path, bytes) = rootfs(dir.path(), (2 * PART + 4321) as usize, 1);
    let sha256 = sha256_hex(&bytes);
    let config = br#"{"Cmd":["/bin/sh"]}"#.to_vec();
    let grant = NodeGrant::new(
        &guest.notify_url,
        &id,
        guest.key.as_bytes(),
        object(&sha256),
    )
    .unwrap();
    Uploader::default()
        .upload(&grant, &path, Some(config.clone().into()), PART, |_, _| {})
        .await
        .unwrap();
    let verified = grant.verified().unwrap();
    assert_eq!(verified.location, format!("s3://{bucket}/{key}"));
    assert_eq!(
        (verified.size, verified.sha256.as_str()),
        (bytes.len() as u64, sha256.as_str())
    );
    assert!(verified.etag.ends_with("-3"), "{}", verified.etag);

    let s3 = S3Client::new(credentials()).unwrap();
    let head = s3.head(&bucket, &key).await.unwrap();
    assert_eq!(head.size, bytes.len() as u64);
    assert_eq!(head.etag, verified.etag);
    for (name, value) in [
        ("build-id", id.as_str()),
        ("rootfs-sha256", sha256.as_str()),
        ("status", "succeeded"),
    ] {
        assert!(
            head.metadata
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value),
            "{name}: {value} not in {:?}",
            head.metadata
        );
    }
    let config_head = s3.head(&bucket, &format!("{key}.json")).await.unwrap();
    assert_eq!(config_head.size, config.len() as u64);

    // A part URL granted for this key, moved to another key: refused by S3. (Granted for a
    // finished upload: refused by the node, 409.)
    let part_url = upload_url(&guest.notify_url, &id, UploadStep::Part).unwrap();
    let body = json!({"nonce": "again", "number": 1,
        "digest": digest(&bytes[..PART as usize])});
    let r = reqwest::Client::new();
    let signed = |body: &serde_json::Value| {
        let body = serde_json::to_vec(body).unwrap();
        let ts = (node_agent::now_ms() / 1000) as u64;
        r.post(part_url.clone())
            .header(
                builder_contract::signature::TIMESTAMP_HEADER,
                ts.to_string(),
            )
            .header(
                builder_contract::signature::SIGNATURE_HEADER,
                builder_contract::signature::sign(guest.key.as_bytes(), ts, &body),
            )
            .body(body)
    };
    assert_eq!(signed(&body).send().await.unwrap().status(), 409);

    // The report matches what was verified: succeeded; the node writes the status.
    let artifact = RootfsArtifact {
        location: format!("s3://{bucket}/{key}"),
        config_location: format!("s3://{bucket}/{key}.json"),
        size_bytes: bytes.len() as u64,
        sha256: sha256.clone(),
        reused: false,
    };
    assert_eq!(
        guest
            .post_report(&report(&id, BuildStatus::Succeeded, Some(artifact.clone())))
            .await,
        204
    );
    let b = api.wait_terminal(&id, Duration::from_secs(15)).await;
    assert_eq!(b["state"], "succeeded", "{b}");
    eventually("the node writes the status", async || {
        s3.head(&bucket, &format!("{key}.status.json"))
            .await
            .is_ok_and(|h| {
                h.metadata
                    .iter()
                    .any(|(n, v)| n == "status" && v == "succeeded")
            })
    })
    .await;

    // A second build: a part URL moved to another key is refused; a report whose sha256 is
    // not the verified upload's fails the build naming the field, and its rootfs goes.
    let key2 = format!("{key}-2");
    let id2 = api
        .submit(json!({"s3_bucket": bucket, "s3_key": key2}))
        .await;
    api.wait_state(&id2, "running", Duration::from_secs(10))
        .await;
    let guest2 = Guest::of(&launcher.spec(&id2).unwrap());
    let (path2, bytes2) = rootfs(dir.path(), (PART + 7) as usize, 2);
    let sha2 = sha256_hex(&bytes2);
    let grant2 = NodeGrant::new(
        &guest2.notify_url,
        &id2,
        guest2.key.as_bytes(),
        object(&sha2),
    )
    .unwrap();
    use builder_s3::Authorizer;
    grant2
        .start(
            &builder_contract::upload::PartPlan::new(bytes2.len() as u64, PART),
            Some(&digest(&config)),
        )
        .await
        .unwrap();
    let granted: SignedRequest = grant2
        .part(1, &digest(&bytes2[..PART as usize]))
        .await
        .unwrap();
    let mut moved = granted.clone();
    moved.url.set_path(&granted.url.path().replace(&key2, &key));
    let mut put = r
        .put(moved.url.clone())
        .body(bytes2[..PART as usize].to_vec());
    for (n, v) in &moved.headers {
        put = put.header(n, v);
    }
    assert_eq!(
        put.send().await.unwrap().status(),
        403,
        "a grant wrote another key"
    );
    Uploader::default()
        .upload(
            &grant2,
            &path2,
            Some(config.clone().into()),
            PART,
            |_, _| {},
        )
        .await
        .unwrap();
    let lying = RootfsArtifact {
        location: format!("s3://{bucket}/{key2}"),
        config_location: format!("s3://{bucket}/{key2}.json"),
        size_bytes: bytes2.len() as u64,
        sha256: "f".repeat(64),
        reused: false,
    };
    assert_eq!(
        guest2
            .post_report(&report(&id2, BuildStatus::Succeeded, Some(lying)))
            .await,
        204
    );
    let b = api.wait_terminal(&id2, Duration::from_secs(15)).await;
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(b["error"]["class"], "internal", "{b}");
    let message = b["error"]["message"].as_str().unwrap();
    assert!(message.contains("`rootfs.sha256`"), "{message}");
    eventually("the failed build's rootfs is deleted", async || {
        s3.head(&bucket, &key2).await.is_err()
    })
    .await;
    // The first build's object is untouched.
    assert_eq!(
        s3.head(&bucket, &key).await.unwrap().size,
        bytes.len() as u64
    );
    d.stop().await;
}

#[tokio::test]
async fn a_failed_build_leaves_no_open_upload_and_a_status_the_node_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("sleep 30");
    let d = daemon(dir.path(), launcher.clone()).await;
    let api = d.client();
    let bucket = env("BUILDER_TEST_S3_BUCKET");
    let key = format!("grant-failed/{}.ext4", node_agent::random_hex(8));
    // An earlier build's rootfs at the same key: the failed build must not take it away.
    let s3 = S3Client::new(credentials()).unwrap();
    let earlier = [("build-id".to_string(), "earlier".to_string())];
    s3.put_object(
        &bucket,
        &key,
        b"earlier rootfs".to_vec().into(),
        builder_s3::ObjectAttributes {
            content_type: "application/octet-stream",
            metadata: &earlier,
        },
    )
    .await
    .unwrap();
    let id = api
        .submit(json!({"s3_bucket": bucket, "s3_key": key}))
        .await;
    api.wait_state(&id, "running", Duration::from_secs(10))
        .await;
    let guest = Guest::of(&launcher.spec(&id).unwrap());
    let (_, bytes) = rootfs(dir.path(), (2 * PART) as usize, 3);
    let config = b"{}".to_vec();
    let grant = NodeGrant::new(
        &guest.notify_url,
        &id,
        guest.key.as_bytes(),
        object(&sha256_hex(&bytes)),
    )
    .unwrap();
    use builder_s3::Authorizer;
    let config_put = grant
        .start(
            &builder_contract::upload::PartPlan::new(bytes.len() as u64, PART),
            Some(&digest(&config)),
        )
        .await
        .unwrap()
        .unwrap();
    let http = reqwest::Client::new();
    let send = |request: SignedRequest, body: Vec<u8>| {
        let mut put = http.put(request.url).body(body);
        for (n, v) in &request.headers {
            put = put.header(n, v);
        }
        put.send()
    };
    assert_eq!(send(config_put, config).await.unwrap().status(), 200);
    let part = grant
        .part(1, &digest(&bytes[..PART as usize]))
        .await
        .unwrap();
    assert_eq!(
        send(part, bytes[..PART as usize].to_vec())
            .await
            .unwrap()
            .status(),
        200
    );
    let open = s3.list_multipart_uploads(&bucket, &key).await.unwrap();
    assert_eq!(open.len(), 1, "the listing sees the open upload: {open:?}");

    // The build fails before its upload completes.
    assert_eq!(
        guest
            .post_report(&report(&id, BuildStatus::Failed, None))
            .await,
        204
    );
    let b = api.wait_terminal(&id, Duration::from_secs(15)).await;
    assert_eq!(b["state"], "failed", "{b}");
    eventually(
        "the node aborts the upload and writes the status",
        async || {
            s3.list_multipart_uploads(&bucket, &key)
                .await
                .unwrap()
                .is_empty()
                && s3
                    .head(&bucket, &format!("{key}.status.json"))
                    .await
                    .is_ok_and(|h| {
                        h.metadata
                            .iter()
                            .any(|(n, v)| n == "status" && v == "failed")
                    })
        },
    )
    .await;
    // The config it sent is gone; the earlier build's rootfs stays.
    assert!(s3.head(&bucket, &format!("{key}.json")).await.is_err());
    let head = s3.head(&bucket, &key).await.unwrap();
    assert!(
        head.metadata
            .iter()
            .any(|(n, v)| n == "build-id" && v == "earlier"),
        "{head:?}"
    );
    d.stop().await;
}
