//! API tokens with scopes, one webhook key per requester, the webhook address policy and HTTPS,
//! against the daemon in-process on loopback (real HTTP, SQLite, child processes as VMs) and
//! the real `node-agent` binary for `token add|list|remove` and the HTTPS client: every scope
//! refusal is a 403 naming its field; a requester neither sees, lists, cancels nor reads the
//! logs of another's build; each requester's webhook verifies with its own key only; loopback
//! and other private targets are refused at submission (literal addresses) and at delivery (a
//! name resolving to one) unless `notify_allow` lists them, and the receiver's answer is not
//! echoed; the API over TLS works with the CA given and fails, saying so, without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use builder_contract::signature::{verify, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use common::{Api, Options, ScriptLauncher};
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Runs the real `node-agent` binary; its exit code, stdout and stderr.
async fn cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .args(args)
        .env_remove("NODE_AGENT_CONFIG")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `node-agent token add NAME ARGS...` on the daemon's work dir: the token and webhook key.
async fn token_add(work_dir: &Path, name: &str, args: &[&str]) -> (String, String) {
    let work_dir = work_dir.to_str().unwrap();
    let mut all = vec!["token", "add", name, "--work-dir", work_dir];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = cli(&all).await;
    assert_eq!(code, 0, "{stderr}");
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_string()
    };
    (field("token: "), field("webhook_key: "))
}

/// `node-agent token remove NAME`: its exit code, stdout and stderr.
async fn token_remove(work_dir: &Path, name: &str) -> (i32, String, String) {
    cli(&[
        "token",
        "remove",
        name,
        "--work-dir",
        work_dir.to_str().unwrap(),
    ])
    .await
}

fn api_as(d: &common::Daemon, token: &str) -> Api {
    Api {
        http: reqwest::Client::new(),
        base: d.base.clone(),
        token: token.to_string(),
    }
}

/// A request of the shape `Api::submit` sends, with `extra` on top.
fn request(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({"repo_url": "https://git.example/app.git", "ref": "main", "vcpus": 1,
        "mem_mib": 512, "s3_bucket": "rootfs", "s3_key": "alice/app.rootfs"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Waits for the build's webhook to be `delivered` or `failed`; the build.
async fn webhook_settled(api: &Api, id: &str) -> serde_json::Value {
    for _ in 0..200 {
        let b = api.build(id).await;
        if b["webhook"]["state"] == "delivered" || b["webhook"]["state"] == "failed" {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the webhook of {id} never settled: {}", api.build(id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_refuse_outside_their_scope_and_see_only_their_builds() {
    let dir = tempfile::tempdir().unwrap();
    let hook = common::receiver().await;
    let hook_host = url::Url::parse(&hook.url).unwrap();
    let hook_authority = format!("127.0.0.1:{}", hook_host.port().unwrap());
    let d = common::start(
        dir.path(),
        ScriptLauncher::new("echo '==> build'; sleep 2; exit 1"),
        Options::default(),
    )
    .await;
    let admin = d.client();
    let (alice_token, alice_key) = token_add(
        dir.path(),
        "alice",
        &[
            "--bucket",
            "rootfs/alice/",
            "--bucket",
            "shared",
            "--notify-host",
            &hook_authority,
        ],
    )
    .await;
    let (bob_token, bob_key) = token_add(dir.path(), "bob", &["--bucket", "rootfs/bob/"]).await;
    assert!(alice_token.starts_with("nat_") && alice_key.len() == 64);

    // At rest: hashes, the webhook keys, mode 0600; never a token.
    let file = dir.path().join("api-tokens.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains(&alice_token) && !text.contains(&bob_token),
        "{text}"
    );
    assert!(text.contains(&alice_key), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The same name twice is refused, naming --replace.
    let (code, _, stderr) = cli(&[
        "token",
        "add",
        "alice",
        "--work-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 2);
    assert!(stderr.contains("already has a token named alice") && stderr.contains("--replace"));
    // `token list`: names, rights and scopes, no secret.
    let (code, listed, stderr) =
        cli(&["token", "list", "--work-dir", dir.path().to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        listed.contains(&format!(
            "alice\t-\tbuckets=rootfs/alice/,shared\tnotify_hosts={hook_authority}"
        )),
        "{listed}"
    );
    assert!(
        listed.contains("bob\t-\tbuckets=rootfs/bob/\tnotify_hosts=-"),
        "{listed}"
    );
    for secret in [&alice_token, &alice_key, &bob_token, &bob_key] {
        assert!(!listed.contains(secret.as_str()), "{listed}");
    }

    let alice = api_as(&d, &alice_token);
    let bob = api_as(&d, &bob_token);
    // Each scope refusal: 403 naming its field.
    for (extra, field) in [
        (json!({"s3_bucket": "other-bucket"}), "s3_bucket"),
        (json!({"s3_key": "bob/app.rootfs"}), "s3_key"),
        (json!({"s3_key": "alicex/app.rootfs"}), "s3_key"),
        (
            json!({"notify_url": "https://hooks.example/h"}),
            "notify_url",
        ),
        (
            json!({"notify_url": format!("http://127.0.0.1:{}/hook", hook_host.port().unwrap() + 1)}),
            "notify_url",
        ),
        (json!({"requester": "bob"}), "requester"),
    ] {
        let (status, v) = alice.post("/v1/builds", &request(extra.clone())).await;
        assert_eq!(status, 403, "{extra}: {v}");
        assert_eq!(v["field"], field, "{extra}: {v}");
        assert!(v["error"].as_str().unwrap().contains("alice"), "{v}");
    }
    // Bob has no webhook host at all.
    let (status, v) = bob
        .post(
            "/v1/builds",
            &request(json!({"s3_key": "bob/x", "notify_url": hook.url})),
        )
        .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (403, Some("notify_url")),
        "{v}"
    );

    // Within scope: accepted, the requester is the token's name.
    let (status, v) = alice
        .post(
            "/v1/builds",
            &request(json!({"notify_url": hook.url, "requester": "alice"})),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let a = v["id"].as_str().unwrap().to_string();
    let (status, v) = alice
        .post(
            "/v1/builds",
            &request(json!({"s3_bucket": "shared", "s3_key": "anything"})),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let (status, v) = bob
        .post("/v1/builds", &request(json!({"s3_key": "bob/app.rootfs"})))
        .await;
    assert_eq!(status, 202, "{v}");
    let b = v["id"].as_str().unwrap().to_string();
    assert_eq!(alice.build(&a).await["requester"], "alice");
    assert_eq!(bob.build(&b).await["requester"], "bob");

    // Bob cannot see, cancel or read the logs of Alice's build: 404, as for no build at all.
    for path in [
        format!("/v1/builds/{a}"),
        format!("/v1/builds/{a}/logs?follow=false"),
    ] {
        let (status, v) = bob.get(&path).await;
        assert_eq!(status, 404, "{path}: {v}");
    }
    let (status, _) = bob
        .post(&format!("/v1/builds/{a}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 404);
    assert_ne!(admin.build(&a).await["state"], "cancelled");
    // Lists: each requester its own, asking for another finds none; the admin all.
    let ids = |v: serde_json::Value| -> Vec<String> {
        v["builds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, v) = bob.get("/v1/builds").await;
    assert_eq!(ids(v), std::slice::from_ref(&b));
    let (_, v) = bob.get("/v1/builds?requester=alice").await;
    assert!(ids(v).is_empty());
    let (_, v) = alice.get("/v1/builds").await;
    assert_eq!(ids(v).len(), 2);
    let (_, v) = admin.get("/v1/builds").await;
    assert_eq!(ids(v).len(), 3);
    // Only admins mint dashboard login links; Bob may cancel his own build, the admin any.
    let (status, v) = bob.post("/ui/login-links", &json!({})).await;
    assert_eq!(status, 403, "{v}");
    let (status, _) = bob
        .post(&format!("/v1/builds/{b}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202);
    let logs = admin
        .get(&format!("/v1/builds/{a}/logs?follow=false"))
        .await;
    assert_ne!(logs.0, 404);

    // Alice's webhook is signed with her key: it verifies with it, not with Bob's or the
    // node's notify secret.
    alice.wait_terminal(&a, SECS(20)).await;
    let built = webhook_settled(&alice, &a).await;
    assert_eq!(built["webhook"]["state"], "delivered", "{built}");
    let hits = hook.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 1);
    let (headers, body) = &hits[0];
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let now = (node_agent::now_ms() / 1000) as u64;
    let check = |key: &str| {
        verify(
            key.as_bytes(),
            header(TIMESTAMP_HEADER),
            header(SIGNATURE_HEADER),
            body,
            now,
            300,
        )
    };
    assert!(check(&alice_key).is_ok());
    assert!(check(&bob_key).is_err());
    let node_secret = std::fs::read_to_string(dir.path().join("notify-secret")).unwrap();
    assert!(check(node_secret.trim()).is_err());

    // The dashboard takes admin tokens only: an `--admin` token of the file logs in (and sees
    // every build), a scoped one is refused.
    let (ops_token, _) = token_add(
        dir.path(),
        "ops",
        &["--admin", "--bucket", "*", "--notify-host", "*"],
    )
    .await;
    let (_, v) = api_as(&d, &ops_token).get("/v1/builds").await;
    assert_eq!(ids(v).len(), 3);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |token: String| {
        let no_redirects = no_redirects.clone();
        let url = format!("{}/ui/login", d.base);
        async move {
            let form: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("token", &token)
                .append_pair("next", "/")
                .finish();
            no_redirects
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .unwrap()
        }
    };
    let r = login(bob_token.clone()).await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.unwrap().contains("not an admin token"));
    let r = login(ops_token.clone()).await;
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("node_agent_session=ops."), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = no_redirects
        .get(format!("{}/", d.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);

    // --replace: a new token and key for the name, the old token stops working at once.
    let (bob_token2, bob_key2) =
        token_add(dir.path(), "bob", &["--bucket", "rootfs/bob/", "--replace"]).await;
    assert_ne!(bob_key2, bob_key);
    let (status, _) = bob.get("/v1/builds").await;
    assert_eq!(status, 401);
    let (status, _) = api_as(&d, &bob_token2).get("/v1/builds").await;
    assert_eq!(status, 200);

    // Removed: the token stops working at once (no restart).
    let (code, _, stderr) = token_remove(dir.path(), "alice").await;
    assert_eq!(code, 0, "{stderr}");
    let (status, _) = alice.get("/v1/builds").await;
    assert_eq!(status, 401);
    let (code, _, stderr) = token_remove(dir.path(), "alice").await;
    assert_eq!(code, 2);
    assert!(stderr.contains("no token named alice"), "{stderr}");
    let (status, _) = api_as(&d, &bob_token2).get("/v1/builds").await;
    assert_eq!(status, 200);
    // An admin's session ends with its token.
    let (code, _, stderr) = token_remove(dir.path(), "ops").await;
    assert_eq!(code, 0, "{stderr}");
    let page = no_redirects
        .get(format!("{}/", d.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 401);
    d.stop().await;
}

/// A receiver on loopback answering every request `status` with `body`; its URL's port and
/// the number of requests it got.
async fn answering(
    status: u16,
    body: &'static str,
) -> (u16, std::sync::Arc<std::sync::Mutex<usize>>) {
    use std::sync::{Arc, Mutex};
    let hits = Arc::new(Mutex::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            *counter.lock().unwrap() += 1;
            async move { (axum::http::StatusCode::from_u16(status).unwrap(), body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_webhook_targets_are_refused_unless_allowlisted() {
    let dir = tempfile::tempdir().unwrap();
    let (port, hits) = answering(204, "").await;
    // No allowlist: the node's real default.
    let d = common::start(
        dir.path(),
        ScriptLauncher::new("exit 1"),
        Options {
            notify_allow: vec![],
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    for target in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.1.2.3/hook".to_string(),
        "http://100.64.0.1/hook".to_string(),
        "http://[fd00::1]/hook".to_string(),
        "http://0.0.0.0/hook".to_string(),
        "http://224.0.0.1/hook".to_string(),
    ] {
        let (status, v) = api
            .post("/v1/builds", &request(json!({"notify_url": target})))
            .await;
        assert_eq!(status, 403, "{target}: {v}");
        assert_eq!(v["field"], "notify_url", "{target}: {v}");
        assert!(v["error"].as_str().unwrap().contains("notify_allow"), "{v}");
    }
    // A name is checked at delivery, after resolving it: `localhost` is loopback, refused,
    // and nothing reaches the receiver.
    let id = api
        .submit(json!({"notify_url": format!("http://localhost:{port}/hook")}))
        .await;
    api.wait_terminal(&id, SECS(15)).await;
    let b = webhook_settled(&api, &id).await;
    assert_eq!(b["webhook"]["state"], "failed", "{b}");
    assert_eq!(
        b["webhook"]["attempts"], 1,
        "refused once, not retried: {b}"
    );
    let error = b["webhook"]["error"].as_str().unwrap();
    assert!(
        error.contains("localhost") && error.contains("notify_allow"),
        "{error}"
    );
    assert_eq!(*hits.lock().unwrap(), 0);
    d.stop().await;

    // Allowlisted: loopback by CIDR takes the literal address and the name.
    let dir = tempfile::tempdir().unwrap();
    let d = common::start(
        dir.path(),
        ScriptLauncher::new("exit 1"),
        Options {
            notify_allow: vec!["127.0.0.1/32".into()],
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    for target in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
    ] {
        let id = api.submit(json!({"notify_url": target})).await;
        api.wait_terminal(&id, SECS(15)).await;
        let b = webhook_settled(&api, &id).await;
        assert_eq!(b["webhook"]["state"], "delivered", "{target}: {b}");
    }
    assert_eq!(*hits.lock().unwrap(), 2);
    // What a receiver answers is not echoed to the requester: not its status, not its body.
    let (refusing, refused_hits) = answering(418, "receiver-secret-body").await;
    let id = api
        .submit(json!({"notify_url": format!("http://127.0.0.1:{refusing}/hook")}))
        .await;
    api.wait_terminal(&id, SECS(15)).await;
    let b = webhook_settled(&api, &id).await;
    assert_eq!(b["webhook"]["state"], "failed", "{b}");
    assert_eq!(*refused_hits.lock().unwrap(), 1);
    // The texts a requester sees: the webhook's state and error, the events' details.
    let mut shown = b["webhook"].to_string();
    for event in b["events"].as_array().unwrap() {
        shown.push_str(&event["detail"].to_string());
    }
    for echo in ["418", "teapot", "receiver-secret-body"] {
        assert!(!shown.contains(echo), "{echo} in {shown}");
    }
    assert_eq!(
        b["webhook"]["error"], "the receiver did not accept the webhook",
        "{b}"
    );
    d.stop().await;
}

/// A self-signed certificate for 127.0.0.1 and localhost, made with the openssl CLI.
fn self_signed(dir: &Path) -> node_agent::config::TlsFiles {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=node-agent test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // A server certificate, not a CA (webpki refuses a CA as the end entity).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node_agent::config::TlsFiles { cert, key }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_and_the_cli_trusts_the_ca_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let tls = self_signed(dir.path());
    let ca: PathBuf = tls.cert.clone();
    let d = common::start(
        &dir.path().join("node"),
        ScriptLauncher::new("exit 1"),
        Options {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await;
    assert!(d.base.starts_with("https://127.0.0.1:"), "{}", d.base);
    let pem = std::fs::read(&ca).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let r = trusting
        .get(format!("{}/v1/builds", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP to the HTTPS port gets no API answer.
    let plain = d.base.replacen("https://", "http://", 1);
    let r = reqwest::Client::new()
        .get(format!("{plain}/v1/builds"))
        .bearer_auth(&d.token)
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    // The dashboard's session cookie is `Secure` over HTTPS.
    let r = trusting
        .post(format!("{}/ui/login-links", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let link: serde_json::Value = r.json().await.unwrap();
    let no_redirects = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .get(format!("{}{}", d.base, link["path"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");

    // The CLI: with --ca-file (or NODE_AGENT_CA_FILE) it works, without it it says why not.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &d.token).unwrap();
    let base = [
        "--server",
        &d.base,
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let mut with_ca = vec!["list"];
    with_ca.extend_from_slice(&base);
    with_ca.extend_from_slice(&["--ca-file", ca.to_str().unwrap()]);
    let (code, _, stderr) = cli(&with_ca).await;
    assert_eq!(code, 0, "{stderr}");
    let mut without = vec!["list"];
    without.extend_from_slice(&base);
    let (code, _, stderr) = cli(&without).await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("does not trust") && stderr.contains("--ca-file"),
        "{stderr}"
    );
    d.stop().await;
}
