//! The dashboard against the real HTTP server of an in-process daemon (SQLite, shell scripts as
//! VMs) with builds that succeeded, failed, run and wait, looked at in real headless Chromium
//! (Debian's `chromium`): its DOM (every build with its state, filters, the timeline, the log,
//! markup from a repository URL and a log shown as text, the live log) and its screenshots,
//! checked by pixels. Also the login (the login page without a session, a wrong token refused,
//! the session cookie's attributes, one-time login links), the logs by source and the live log
//! route.
//!
//! `NODE_AGENT_DASHBOARD_SCREENSHOTS=DIR` keeps the screenshots in DIR (how
//! `docs/images/dashboard-*.png` are made).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use builder_contract::{BuildReport, BuildStatus, LogSource, Phase, PhaseTiming, RootfsArtifact};
use common::{Daemon, Options, ScriptLauncher};
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;
/// The window of every page but the build's, which is taller to show its log.
const WINDOW: (u32, u32) = (1280, 900);
const TALL_WINDOW: (u32, u32) = (1280, 1700);
/// The badge colours of the stylesheet (`--succeeded`, `--failed`).
const GREEN: [u8; 3] = [0x1a, 0x7f, 0x37];
const RED: [u8; 3] = [0xcf, 0x22, 0x2e];
/// `--running`, also the vCPU chart's line.
const BLUE: [u8; 3] = [0x09, 0x69, 0xda];
/// A repository URL and a log line with markup, which must show as text.
const HOSTILE_REPO: &str = "https://git.example/<b>bold-repo</b>.git";
const HOSTILE_LOG: &str = "<script>document.title='pwned'</script><b>bold-log</b>";

/// Headless Chromium, one fresh profile per run.
struct Chromium {
    binary: PathBuf,
    profiles: tempfile::TempDir,
    runs: usize,
}

impl Chromium {
    fn find() -> Self {
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect(
                "Debian's chromium is installed (scripts/lib/services.sh bt_ensure_deps installs it)",
            );
        Chromium {
            binary,
            profiles: tempfile::tempdir().unwrap(),
            runs: 0,
        }
    }

    async fn run(&mut self, window: (u32, u32), extra: &[String], url: &str) -> String {
        self.runs += 1;
        let profile = self.profiles.path().join(self.runs.to_string());
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
            ])
            .arg(format!("--window-size={},{}", window.0, window.1))
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .kill_on_drop(true);
        let out = tokio::time::timeout(SECS(30), command.output())
            .await
            .unwrap_or_else(|_| panic!("chromium {extra:?} {url} did not finish within 30 s"))
            .unwrap();
        assert!(
            out.status.success(),
            "chromium {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn dom(&mut self, url: &str) -> String {
        self.run(WINDOW, &["--dump-dom".to_string()], url).await
    }

    async fn screenshot(&mut self, window: (u32, u32), url: &str, path: &Path) -> Image {
        self.run(window, &[format!("--screenshot={}", path.display())], url)
            .await;
        Image::read(path)
    }
}

/// A decoded screenshot.
struct Image {
    width: u32,
    height: u32,
    pixels: Vec<[u8; 3]>,
}

impl Image {
    fn read(path: &Path) -> Self {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let samples = info.color_type.samples();
        assert!(samples >= 3, "{:?}", info.color_type);
        let pixels = buf[..info.buffer_size()]
            .chunks(samples)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        Image {
            width: info.width,
            height: info.height,
            pixels,
        }
    }

    fn count(&self, colour: [u8; 3]) -> usize {
        self.pixels.iter().filter(|p| **p == colour).count()
    }

    /// The window's size, and not blank: many colours, much not white.
    fn assert_page(&self, name: &str, window: (u32, u32)) {
        assert_eq!((self.width, self.height), window, "{name}");
        let colours: std::collections::HashSet<_> = self.pixels.iter().collect();
        assert!(colours.len() > 50, "{name}: {} colours", colours.len());
        let ink = self.pixels.len() - self.count([0xff, 0xff, 0xff]);
        assert!(
            ink * 20 > self.pixels.len(),
            "{name}: only {ink} pixels are not white"
        );
    }
}

/// A one-time login link that goes on to `next`, so one Chromium run carries the session.
async fn login_url(d: &Daemon, next: &str) -> String {
    let (status, v) = d.client().post("/ui/login-links", &json!({})).await;
    assert_eq!(status, 201, "{v}");
    let path = v["path"].as_str().unwrap();
    let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    format!("{}{path}?next={next}", d.base)
}

fn report(id: &str, started_at_unix_ms: u64) -> BuildReport {
    let phase = |phase, duration_ms| PhaseTiming { phase, duration_ms };
    BuildReport {
        build_id: id.to_string(),
        status: BuildStatus::Succeeded,
        repo_url: HOSTILE_REPO.into(),
        revision: "main".into(),
        commit_sha: Some("0123456789abcdef0123456789abcdef01234567".into()),
        image_digest: Some("sha256:abc".into()),
        inputs: None,
        rootfs: Some(RootfsArtifact {
            location: "s3://rootfs/app.rootfs".into(),
            config_location: "s3://rootfs/app.rootfs.json".into(),
            size_bytes: 1234,
            sha256: "ff".repeat(32),
            reused: false,
        }),
        error: None,
        phases: vec![
            phase(Phase::Clone, 200),
            phase(Phase::Build, 700),
            phase(Phase::Convert, 200),
            phase(Phase::Upload, 100),
        ],
        started_at_unix_ms,
        duration_ms: 1200,
    }
}

async fn post_report(d: &Daemon, launcher: &ScriptLauncher, id: &str, report: &BuildReport) {
    let spec = launcher.spec(id).unwrap();
    let mut report = report.clone();
    if report.status == BuildStatus::Succeeded {
        // A succeeded report stands only with an upload the node verified.
        let uploaded = common::Guest::of(&spec).upload_rootfs(&[7; 1234]).await;
        report.rootfs = Some(uploaded);
    }
    let key = spec.secrets.webhook_secret.unwrap();
    let body = serde_json::to_vec(&report).unwrap();
    let ts = (node_agent::now_ms() / 1000) as u64;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/internal/builds/{id}/complete", d.base))
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, sign(key.as_bytes(), ts, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

/// Whether the DOM lists the build `id` in `state`.
fn lists(dom: &str, id: &str, state: &str) -> bool {
    dom.contains(&format!("id=\"b-{id}\" data-state=\"{state}\""))
}

#[tokio::test]
async fn dashboard_pages_in_headless_chromium() {
    let started = Instant::now();
    let mut chromium = Chromium::find();
    let dir = tempfile::tempdir().unwrap();
    let shots = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new(&format!(
        "echo '==> clone'; echo \"{HOSTILE_LOG}\"; sleep 0.3; echo '==> build'; sleep 1.5"
    ));
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            capacity_vcpus: 1,
            ..Default::default()
        },
    )
    .await;
    let api = d.client();

    // Four builds: succeeded (with the guest's phases), failed, running, queued.
    let ok = api
        .submit(json!({"requester": "alice", "repo_url": HOSTILE_REPO}))
        .await;
    let b = api.wait_state(&ok, "running", SECS(10)).await;
    let vm_started = b["timings"]["vm_started_at_ms"].as_i64().unwrap() as u64;
    post_report(&d, &launcher, &ok, &report(&ok, vm_started)).await;
    assert_eq!(api.wait_terminal(&ok, SECS(15)).await["state"], "succeeded");
    *launcher.script.lock().unwrap() =
        "echo '==> clone'; echo 'fatal: repository not found'; exit 3".into();
    let failed = api
        .submit(json!({"requester": "bob", "repo_url": "https://git.example/other.git"}))
        .await;
    assert_eq!(
        api.wait_terminal(&failed, SECS(15)).await["state"],
        "failed"
    );
    *launcher.script.lock().unwrap() =
        "echo '==> clone'; echo 'still-running-line'; sleep 60".into();
    let running = api.submit(json!({"requester": "carol"})).await;
    api.wait_state(&running, "running", SECS(10)).await;
    let queued = api.submit(json!({"requester": "dave"})).await;
    assert_eq!(api.build(&queued).await["state"], "queued");
    let builds = [
        (&ok, "succeeded"),
        (&failed, "failed"),
        (&running, "running"),
        (&queued, "queued"),
    ];

    // Without a session: the login page; a wrong token is refused; the right one gives a
    // session cookie that is not the token.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(format!("{}/", d.base)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("action=\"/ui/login\"") && !body.contains(&ok),
        "{body}"
    );
    let login = |token: &str| {
        http.post(format!("{}/ui/login", d.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}&next=%2Fui%2Fnode"))
            .send()
    };
    let r = login("not-the-token").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("not this node&#39;s API token"));
    let r = login(&d.token).await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/node");
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains(&d.token), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let get = |path: String, cookie: String| {
        http.get(format!("{}{path}", d.base))
            .header("cookie", cookie)
            .send()
    };
    let r = get("/".into(), cookie.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let flipped = if cookie.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{flipped}", &cookie[..cookie.len() - 1]);
    assert_eq!(get("/".into(), forged).await.unwrap().status(), 401);
    // Login links: only with the bearer token, and only once.
    let r = http
        .post(format!("{}/ui/login-links", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let link = login_url(&d, "/").await;
    assert_eq!(http.get(&link).send().await.unwrap().status(), 303);
    assert_eq!(http.get(&link).send().await.unwrap().status(), 401);

    // The live log route: what the console has, then (held until it comes) what it gets next.
    let r = get(format!("/ui/builds/{running}/log"), cookie.clone())
        .await
        .unwrap();
    assert_eq!(r.headers()["x-build-state"], "running");
    let offset = r.headers()["x-log-offset"].to_str().unwrap().to_string();
    assert!(r.text().await.unwrap().contains("still-running-line"));
    let console = d.node.config.log_path(&running);
    let appender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(console)
            .unwrap();
        writeln!(f, "appended-while-watching").unwrap();
    });
    let asked = Instant::now();
    let r = get(
        format!("/ui/builds/{running}/log?offset={offset}"),
        cookie.clone(),
    )
    .await
    .unwrap();
    let text = r.text().await.unwrap();
    assert_eq!(text, "appended-while-watching\n");
    assert!(asked.elapsed() < SECS(4), "{:?}", asked.elapsed());
    appender.await.unwrap();

    // The build's page shows the logs this node has by source (here a build log the guest
    // would have sent), each escaped.
    std::fs::write(
        d.node.config.log_file(&ok, LogSource::Build),
        "#5 [2/3] RUN make <all>\n",
    )
    .unwrap();
    let page = get(format!("/ui/builds/{ok}?log=build"), cookie.clone())
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    let tab = |source: &str| format!("/ui/builds/{ok}?log={source}\"");
    assert!(
        page.contains(&format!("{} class=\"current\">build</a>", tab("build"))),
        "{page}"
    );
    assert!(
        page.contains(&tab("console")) && !page.contains(&tab("dockerd")),
        "{page}"
    );
    assert!(page.contains("RUN make &lt;all&gt;"), "{page}");
    let r = get(format!("/ui/builds/{ok}?log=bogus"), cookie.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Chromium: without a session, the login page.
    let dom = chromium.dom(&format!("{}/", d.base)).await;
    assert!(dom.contains("API token") && !dom.contains(&ok), "{dom}");

    // The list: every build with its state; markup in a repository URL is text.
    let dom = chromium.dom(&login_url(&d, "/").await).await;
    for (id, state) in builds {
        assert!(lists(&dom, id, state), "{id} {state} not listed:\n{dom}");
    }
    assert!(dom.contains("&lt;b&gt;bold-repo&lt;/b&gt;"), "{dom}");
    assert!(!dom.contains("<b>bold-repo</b>"), "{dom}");
    // Filters narrow it.
    for (query, only) in [
        ("/?state=failed", &failed),
        ("/?requester=alice", &ok),
        ("/?repo=other.git", &failed),
        ("/?state=queued&requester=dave", &queued),
    ] {
        let dom = chromium.dom(&login_url(&d, query).await).await;
        for (id, state) in builds {
            assert_eq!(lists(&dom, id, state), id == only, "{query}: {id}\n{dom}");
        }
    }

    // The succeeded build: timeline bars of its states and the guest's phases, the log with
    // its markup as text, no script but the dashboard's own.
    let dom = chromium
        .dom(&login_url(&d, &format!("/ui/builds/{ok}")).await)
        .await;
    for bar in [
        "s-queued",
        "s-starting",
        "s-running",
        "p-clone",
        "p-build",
        "p-upload",
    ] {
        assert!(
            dom.contains(&format!("<rect class=\"bar {bar}\"")),
            "{bar}:\n{dom}"
        );
    }
    assert!(dom.contains("build 700 ms"), "{dom}");
    assert!(
        dom.contains(
            "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b&gt;bold-log&lt;/b&gt;"
        ),
        "{dom}"
    );
    assert!(
        !dom.contains("<b>bold-log</b>") && !dom.contains("<title>pwned"),
        "{dom}"
    );
    assert_eq!(
        dom.matches("<script").count(),
        dom.matches("<script src=\"/ui/assets/dashboard.js\"")
            .count(),
        "{dom}"
    );
    assert!(dom.contains("s3://rootfs/app.rootfs"), "{dom}");
    // The failed build shows its error.
    let dom = chromium
        .dom(&login_url(&d, &format!("/ui/builds/{failed}")).await)
        .await;
    assert!(
        dom.contains("repository not found") && dom.contains("badge s-failed"),
        "{dom}"
    );
    // Screenshots, checked by pixels: the page's size, not blank, the badges' colours.
    let list = chromium
        .screenshot(
            WINDOW,
            &login_url(&d, "/").await,
            &shots.path().join("dashboard-builds.png"),
        )
        .await;
    list.assert_page("builds", WINDOW);
    assert!(list.count(GREEN) > 200, "green: {}", list.count(GREEN));
    assert!(list.count(RED) > 200, "red: {}", list.count(RED));
    let build = chromium
        .screenshot(
            TALL_WINDOW,
            &login_url(&d, &format!("/ui/builds/{ok}")).await,
            &shots.path().join("dashboard-build.png"),
        )
        .await;
    build.assert_page("build", TALL_WINDOW);
    assert!(build.count(GREEN) > 200, "green: {}", build.count(GREEN));
    // The timeline's bar of the running state.
    assert!(build.count(BLUE) > 5000, "blue: {}", build.count(BLUE));
    let node = chromium
        .screenshot(
            WINDOW,
            &login_url(&d, "/ui/node").await,
            &shots.path().join("dashboard-node.png"),
        )
        .await;
    node.assert_page("node", WINDOW);
    let chart_line = node.count(BLUE);
    assert!(
        chart_line > 100,
        "the vCPU chart's line: {chart_line} pixels"
    );
    if let Ok(keep) = std::env::var("NODE_AGENT_DASHBOARD_SCREENSHOTS") {
        for name in [
            "dashboard-builds.png",
            "dashboard-build.png",
            "dashboard-node.png",
        ] {
            std::fs::copy(shots.path().join(name), Path::new(&keep).join(name)).unwrap();
        }
    }

    // The running build's page follows its console: lines written while Chromium has it open
    // arrive through the page's script (as highlighted chunks the server never renders), and
    // when the build ends the page says so. Chromium's virtual time waits for the log request
    // the page holds open, so the run ends when the build does.
    let (status, v) = api
        .post(&format!("/v1/builds/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{v}");
    let console = d.node.config.log_path(&running);
    let writer = {
        let api = d.client();
        let running = running.clone();
        tokio::spawn(async move {
            for i in 0..12 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&console)
                    .unwrap();
                writeln!(f, "tick-{i}").unwrap();
            }
            let (status, v) = api
                .post(&format!("/v1/builds/{running}/cancel"), &json!({}))
                .await;
            assert_eq!(status, 202, "{v}");
        })
    };
    let dom = chromium
        .run(
            WINDOW,
            &["--dump-dom".into(), "--virtual-time-budget=2000".into()],
            &login_url(&d, &format!("/ui/builds/{running}")).await,
        )
        .await;
    writer.await.unwrap();
    assert!(dom.contains("still-running-line"), "{dom}");
    assert!(
        dom.contains("<span class=\"new\">tick-11\n</span>"),
        "the last line did not arrive live:\n{dom}"
    );
    assert!(
        dom.contains("The build ended (cancelled)"),
        "the page did not see the end:\n{dom}"
    );

    d.stop().await;
    eprintln!(
        "dashboard test: {} Chromium runs, {:.1} s",
        chromium.runs,
        started.elapsed().as_secs_f64()
    );
}
