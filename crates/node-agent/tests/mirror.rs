//! The node's pull-through registry mirror against real registries: an "upstream"
//! docker-registry with htpasswd auth holding a copy of the test registry's image, its requests
//! counted from its own log; the node's supervised mirror registry in front of it; pulls as
//! dockerd makes them through the VM-facing router on a loopback listener, `Host` naming the
//! upstream. A second pull reaches the upstream not once; the upstream's password appears in no
//! answer; only pulls of mirrored hosts are served; a killed registry is started again, and one
//! a crashed run left behind is killed at start.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::api::{router, vm_router};
use node_agent::config::{Config, ServeArgs};
use node_agent::metrics::MirrorMetrics;
use node_agent::mirror::Mirror;
use node_agent::node::Node;
use node_agent::sources::Sources;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

const USER: &str = "mirror-upstream";
const PASSWORD: &str = "upstream-password-3f9c1e";
/// The image the upstream holds.
const NAME: &str = "team/busybox";
const TAG: &str = "stable";
/// The manifest types dockerd 26 asks for.
const MANIFEST_ACCEPT: [&str; 4] = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: eval \"$(scripts/services.sh env)\" (after scripts/services.sh start)")
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The upstream registry: htpasswd auth, log level info (a `response completed` line per
/// request it answers), killed when dropped.
struct Upstream {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Upstream {
    async fn start(dir: &Path) -> Upstream {
        std::fs::create_dir_all(dir).unwrap();
        let htpasswd = dir.join("htpasswd");
        let made = Command::new("htpasswd")
            .args(["-B", "-b", "-c"])
            .arg(&htpasswd)
            .args([USER, PASSWORD])
            .output()
            .unwrap();
        assert!(made.status.success(), "htpasswd: {made:?}");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: mirror-test-upstream\n\
                 auth:\n  htpasswd:\n    realm: mirror-test\n    path: {}\n",
                dir.join("data").display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let upstream = Upstream { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = reqwest::Client::new()
                .get(format!("http://{addr}/v2/"))
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await;
            if answer.is_ok_and(|a| a.status() == StatusCode::OK) {
                return upstream;
            }
            assert!(
                Instant::now() < deadline,
                "the upstream registry did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Requests the upstream has answered so far.
    async fn requests(&self) -> usize {
        // The registry writes each line whole; a pause lets the last ones land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("response completed"))
            .count()
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The blobs (config, then layers) a manifest names.
fn blobs_of(manifest: &[u8]) -> Vec<String> {
    let manifest: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    for layer in manifest["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_string());
    }
    blobs
}

/// Copies the test registry's private image into the upstream as `NAME:TAG`, by the registry
/// API (monolithic blob uploads).
async fn copy_test_image(http: &reqwest::Client, to: SocketAddr) {
    let image = env("BUILDER_TEST_PRIVATE_IMAGE");
    let (from, reference) = image.split_once('/').unwrap();
    let (from_name, from_tag) = reference.rsplit_once(':').unwrap();
    let (user, password) = (
        env("BUILDER_TEST_REGISTRY_USER"),
        env("BUILDER_TEST_REGISTRY_PASSWORD"),
    );
    let manifest = http
        .get(format!("http://{from}/v2/{from_name}/manifests/{from_tag}"))
        .basic_auth(&user, Some(&password))
        .header(ACCEPT, MANIFEST_ACCEPT[0])
        .header(ACCEPT, MANIFEST_ACCEPT[3])
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let media_type = manifest.headers()[CONTENT_TYPE].clone();
    let manifest = manifest.bytes().await.unwrap();
    for digest in blobs_of(&manifest) {
        let blob = http
            .get(format!("http://{from}/v2/{from_name}/blobs/{digest}"))
            .basic_auth(&user, Some(&password))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let started = http
            .post(format!("http://{to}/v2/{NAME}/blobs/uploads/"))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), StatusCode::ACCEPTED);
        let location = started.headers()["location"].to_str().unwrap();
        let mut url = url::Url::parse(&format!("http://{to}/"))
            .unwrap()
            .join(location)
            .unwrap();
        url.query_pairs_mut().append_pair("digest", &digest);
        let put = http
            .put(url)
            .basic_auth(USER, Some(PASSWORD))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(blob)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::CREATED, "blob {digest}");
    }
    let put = http
        .put(format!("http://{to}/v2/{NAME}/manifests/{TAG}"))
        .basic_auth(USER, Some(PASSWORD))
        .header(CONTENT_TYPE, media_type)
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED, "the manifest");
}

/// Everything the VM router answered, headers and bodies, for the credentials check.
#[derive(Default)]
struct Seen(String);

impl Seen {
    fn add(&mut self, answer: &reqwest::Response) {
        for (name, value) in answer.headers() {
            self.0.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
    }

    fn add_body(&mut self, body: &[u8]) {
        self.0.push_str(&String::from_utf8_lossy(body));
    }
}

/// A pull of `NAME:TAG` as dockerd makes it, through the VM router at `vm`, `Host` naming
/// `upstream`: `/v2/`, the manifest by tag (HEAD, then GET), the config and layers by digest,
/// each digest checked.
async fn pull(http: &reqwest::Client, vm: SocketAddr, upstream: &str, seen: &mut Seen) {
    let get = |path: &str| {
        http.get(format!("http://{vm}{path}"))
            .header(HOST, upstream)
    };
    let base = get("/v2/").send().await.unwrap();
    seen.add(&base);
    assert_eq!(base.status(), StatusCode::OK);
    let accept = |request: reqwest::RequestBuilder| {
        MANIFEST_ACCEPT
            .iter()
            .fold(request, |r, a| r.header(ACCEPT, *a))
    };
    let tag_path = format!("/v2/{NAME}/manifests/{TAG}");
    let head = accept(
        http.head(format!("http://{vm}{tag_path}"))
            .header(HOST, upstream),
    )
    .send()
    .await
    .unwrap();
    seen.add(&head);
    assert_eq!(head.status(), StatusCode::OK);
    let digest = head.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let head_length: u64 = head.headers()[CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    for path in [tag_path.clone(), format!("/v2/{NAME}/manifests/{digest}")] {
        let manifest = accept(get(&path)).send().await.unwrap();
        seen.add(&manifest);
        assert_eq!(manifest.status(), StatusCode::OK, "{path}");
        assert_eq!(manifest.headers()["docker-content-digest"], digest.as_str());
        let content_type = manifest.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            MANIFEST_ACCEPT.contains(&content_type.as_str()),
            "{content_type}"
        );
        let body = manifest.bytes().await.unwrap();
        seen.add_body(&body);
        assert_eq!(sha256(&body), digest, "the manifest of {path}");
        assert_eq!(body.len() as u64, head_length);
        for blob in blobs_of(&body) {
            let answer = get(&format!("/v2/{NAME}/blobs/{blob}"))
                .send()
                .await
                .unwrap();
            seen.add(&answer);
            assert_eq!(answer.status(), StatusCode::OK, "blob {blob}");
            let length: usize = answer.headers()[CONTENT_LENGTH]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let bytes = answer.bytes().await.unwrap();
            assert_eq!(bytes.len(), length);
            assert_eq!(sha256(&bytes), blob, "blob {blob}");
        }
    }
}

/// Serves `app` on a loopback port.
async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The node's config: the upstream mirrored with its login.
fn config(work_dir: &Path, upstream: SocketAddr) -> Config {
    std::fs::create_dir_all(work_dir).unwrap();
    let password_file = work_dir.join("upstream-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let file = work_dir.join("node.toml");
    std::fs::write(
        &file,
        format!(
            "[[mirror]]\nupstream = \"{upstream}\"\nremote_url = \"http://{upstream}\"\n\
             username = \"{USER}\"\npassword_file = \"{}\"\n",
            password_file.display()
        ),
    )
    .unwrap();
    Config::load(&ServeArgs {
        config: Some(file),
        work_dir: Some(work_dir.to_path_buf()),
        vm_dns: Some(vec![common::TEST_VM_DNS]),
        // No build cache: its XFS reflink image (on by default) would stay mounted in the
        // test's temp dir.
        cache: Some(false),
        ..Default::default()
    })
    .unwrap()
}

/// Waits until the mirror's readiness check passes, and returns its detail.
async fn mirror_ready(node: &Node) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let check = node.mirror.check().await.expect("a mirror is configured");
        if check.ok {
            return check.detail;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror is not ready: {}",
            check.detail
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pull_never_reaches_the_upstream_and_only_pulls_of_mirrored_hosts_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let upstream = Upstream::start(&dir.path().join("upstream")).await;
    copy_test_image(&http, upstream.addr).await;
    let host = upstream.addr.to_string();

    let config = config(&dir.path().join("node"), upstream.addr);
    assert_eq!(config.mirror.tag_ttl, Duration::from_secs(300));
    let node = Node::start(config.clone(), common::ScriptLauncher::new("sleep 60"))
        .await
        .unwrap();
    assert_eq!(node.mirror.registries(), std::slice::from_ref(&host));
    assert_eq!(node.mirror.redirects(), [host.parse().unwrap()]);
    let detail = mirror_ready(&node).await;
    assert!(
        detail.starts_with(&format!("{host}: answers on 127.0.0.1:")),
        "{detail}"
    );

    // The registry's config: 0600, the login in the remote URL, warn (info logs the URL).
    let registry_dir = config.mirror.dir.join(host.replace(':', "_"));
    let registry_config = registry_dir.join("config.yml");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&registry_config).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&registry_config).unwrap();
    assert!(
        text.contains(&format!("http://{USER}:{PASSWORD}@{host}")),
        "{text}"
    );
    assert!(text.contains("\"warn\""), "{text}");

    let sources = Arc::new(Sources::new(config.sources_dir(), config.vm_base_url()).unwrap());
    let vm = serve(vm_router(node.clone(), sources.clone())).await;
    let api = serve(router(node.clone(), sources)).await;
    let mut seen = Seen::default();

    let before = upstream.requests().await;
    pull(&http, vm, &host, &mut seen).await;
    let first = upstream.requests().await - before;
    assert!(first > 0, "the first pull reached the upstream");
    pull(&http, vm, &host, &mut seen).await;
    assert_eq!(
        upstream.requests().await - before,
        first,
        "the second pull made requests to the upstream"
    );

    // An unknown tag goes upstream, and its error answer carries no credentials.
    let missing = http
        .get(format!("http://{vm}/v2/{NAME}/manifests/no-such-tag"))
        .header(HOST, &host)
        .send()
        .await
        .unwrap();
    seen.add(&missing);
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    seen.add_body(&missing.bytes().await.unwrap());
    assert!(!seen.0.contains(PASSWORD), "the password was in an answer");
    assert!(!seen.0.contains(USER), "the user name was in an answer");

    // Not mirrored: 404, registry style. Not a pull: 405, also for a mirrored host.
    let unknown = http
        .get(format!("http://{vm}/v2/{NAME}/manifests/{TAG}"))
        .header(HOST, "203.0.113.9:5000")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{body}");
    for method in [
        reqwest::Method::PUT,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
    ] {
        let push = http
            .request(
                method.clone(),
                format!("http://{vm}/v2/{NAME}/manifests/{TAG}"),
            )
            .header(HOST, &host)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(push.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        let body: serde_json::Value = push.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED", "{body}");
    }
    // The operator's listener has no mirror.
    let operator = http
        .get(format!("http://{api}/v2/"))
        .header(HOST, &host)
        .send()
        .await
        .unwrap();
    assert_eq!(operator.status(), StatusCode::NOT_FOUND);

    // Killed: started again (a new process), serving the cached image.
    let old = node.mirror.status()[0].pid.expect("the registry runs");
    assert!(std::fs::read_to_string(registry_dir.join("registry.pid")).unwrap() == old.to_string());
    // SAFETY: kill(2) of the registry child this test's node started; touches no memory.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.mirror.status()[0].pid.is_none_or(|p| p == old)
        || node.mirror.status()[0].serving.is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the killed registry was not started again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mirror_ready(&node).await;
    let before = upstream.requests().await;
    pull(&http, vm, &host, &mut seen).await;
    assert_eq!(
        upstream.requests().await,
        before,
        "the restarted registry asked the upstream"
    );

    let metrics = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        format!("node_agent_mirror_restarts_total{{upstream=\"{host}\"}} 1"),
        format!("node_agent_mirror_requests_total{{upstream=\"{host}\",result=\"local\"}} 3"),
        format!("node_agent_mirror_requests_total{{upstream=\"{host}\",result=\"tag_cache\"}} 5"),
    ] {
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    let readyz: serde_json::Value = http
        .get(format!("http://{api}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let check = readyz["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mirror")
        .expect("a mirror check");
    assert_eq!(check["ok"], true, "{readyz}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_a_crashed_run_left_is_killed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(&dir.path().join("upstream")).await;
    let config = config(&dir.path().join("node"), upstream.addr);
    let registry_dir = config
        .mirror
        .dir
        .join(upstream.addr.to_string().replace(':', "_"));

    // A first run's mirror; its registry goes with it.
    let first = Mirror::start(&config.mirror, Arc::new(MirrorMetrics::default())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(pid) = first.status()[0]
            .pid
            .filter(|_| first.status()[0].serving.is_some())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the mirror did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the registry outlived its mirror"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A run that crashed: its registry still runs, its pid file still names it.
    let registry_config = registry_dir.join("config.yml");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&registry_config).unwrap()).unwrap();
    let leftover_addr = written["http"]["addr"].as_str().unwrap().to_string();
    let leftover_log = dir.path().join("leftover.log");
    let mut leftover = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&registry_config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&leftover_log).unwrap())
        .spawn()
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("http://{leftover_addr}/v2/"))
        .send()
        .await
        .is_ok_and(|a| a.status().is_success())
    {
        assert!(
            Instant::now() < deadline && leftover.try_wait().unwrap().is_none(),
            "the leftover registry does not serve: {:?}",
            std::fs::read_to_string(&leftover_log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(registry_dir.join("registry.pid"), leftover.id().to_string()).unwrap();
    let second = Mirror::start(&config.mirror, Arc::new(MirrorMetrics::default())).unwrap();
    // Killed: reaped once its last thread is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = leftover.try_wait().unwrap();
    while status.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = leftover.try_wait().unwrap();
    }
    assert!(
        status.is_some_and(
            |s| std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGKILL)
        ),
        "the leftover registry was not killed: {status:?}"
    );
    drop(second);
}
