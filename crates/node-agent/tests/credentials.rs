//! Build inputs and credentials through the daemon on loopback (real SQLite and PostgreSQL,
//! child processes as VMs): target, build args, build secrets, a git token and registry logins
//! reach the VM's launch spec; their values are found nowhere else (database files or rows, the
//! node's own log lines, API answers, the requester's webhook) and their per-build file is gone
//! once the build ends, also after a restart; build args too long for the kernel command line
//! go to the config drive; bad inputs are 400s naming the field; and on a shared PostgreSQL
//! queue a build with credentials runs only on the node that accepted it.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Mutex, Once};
use std::time::Duration;

use builder_contract::BuildReport;
use common::{Options, ScriptLauncher};
use node_agent::vm::{cmdline_budget_base, BASE_BOOT_ARGS};
use serde_json::json;

const SECS: fn(u64) -> Duration = Duration::from_secs;

const SECRET_VALUE: &str = "npm-SECRET-5f0c1d";
const GIT_TOKEN: &str = "ghp-GITTOKEN-8a7b6c";
const REGISTRY_PASSWORD: &str = "reg-PASSWORD-3e2d1f";
const VALUES: [&str; 3] = [SECRET_VALUE, GIT_TOKEN, REGISTRY_PASSWORD];

/// Every line the node logs in this test binary (JSON, debug and up), as `node-agent serve`
/// writes them to stdout.
static NODE_LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Sends the node's log lines to [`NODE_LOG`] (once per test binary).
fn capture_node_log() {
    static INIT: Once = Once::new();
    struct Capture;
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            NODE_LOG.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(|| Capture)
            .init()
    });
}

fn assert_no_value(what: &str, text: &str) {
    for value in VALUES {
        assert!(
            !text.contains(value),
            "{what} holds a credential value: {text}"
        );
    }
}

fn request_with_credentials(notify_url: Option<&str>) -> serde_json::Value {
    let mut body = json!({
        "target": "prod",
        "build_args": {"GREETING": "hello world", "VERSION": "1.2"},
        "secrets": {"npm": SECRET_VALUE},
        "git_token": GIT_TOKEN,
        "git_username": "bot",
        "registry_auths": {"registry.example:5000": {"username": "puller", "password": REGISTRY_PASSWORD}},
    });
    if let Some(url) = notify_url {
        body["notify_url"] = json!(url);
    }
    body
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The text of every row of every table of the database, or the bytes of the SQLite files.
async fn database_text(database_url: Option<&str>, work_dir: &Path) -> String {
    let Some(url) = database_url else {
        let mut text = String::new();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let path = work_dir.join(format!("node-agent.db{suffix}"));
            if let Ok(bytes) = std::fs::read(&path) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        assert!(
            !text.is_empty(),
            "no SQLite database in {}",
            work_dir.display()
        );
        return text;
    };
    use sqlx::{Connection, Row};
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&mut c)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert!(tables.iter().any(|t| t == "builds"), "{tables:?}");
    let mut text = String::new();
    for table in tables {
        let row = sqlx::query(&format!(
            "SELECT COALESCE(string_agg(t::text, E'\\n'), '') FROM \"{table}\" t"
        ))
        .fetch_one(&mut c)
        .await
        .unwrap();
        text.push_str(&row.get::<String, _>(0));
    }
    text
}

async fn credentials_reach_the_vm_and_nothing_else(database_url: Option<String>) {
    capture_node_log();
    let dir = tempfile::tempdir().unwrap();
    let hook = common::receiver().await;
    let launcher = ScriptLauncher::new("echo '==> build'; sleep 1; exit 1");
    let d = common::start(
        dir.path(),
        launcher.clone(),
        Options {
            database_url: database_url.clone(),
            ..Default::default()
        },
    )
    .await;
    let api = d.client();
    let id = api
        .submit(request_with_credentials(Some(hook.url.as_str())))
        .await;
    api.wait_state(&id, "running", SECS(10)).await;

    // While it runs the values wait in a private file of this node.
    let credentials_dir = dir.path().join("credentials");
    let file = credentials_dir.join(format!("{id}.json"));
    assert_eq!(mode(&credentials_dir), 0o700);
    assert_eq!(mode(&file), 0o600);
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains(SECRET_VALUE));

    // The VM gets the parameters on its command line and the values on its config drive.
    let spec = launcher.spec(&id).unwrap();
    let cmdline = spec.params.kernel_cmdline(BASE_BOOT_ARGS).unwrap();
    assert!(cmdline.contains("target=prod"), "{cmdline}");
    assert!(
        cmdline.contains("build_args=GREETING%3Dhello%2Bworld%26VERSION%3D1.2"),
        "{cmdline}"
    );
    assert_no_value("the kernel command line", &cmdline);
    let secrets = &spec.secrets;
    assert_eq!(secrets.build_secrets["npm"], SECRET_VALUE);
    assert_eq!(secrets.git_token.as_deref(), Some(GIT_TOKEN));
    assert_eq!(secrets.git_username.as_deref(), Some("bot"));
    let login = &secrets.registry_auths["registry.example:5000"];
    assert_eq!(
        (login.username.as_str(), login.password.as_str()),
        ("puller", REGISTRY_PASSWORD)
    );
    assert_eq!(secrets.build_args, None);
    assert_eq!(secrets.webhook_secret.as_ref().unwrap().len(), 64);

    // A second build whose console prints a value: the stored tail and message are scrubbed.
    *launcher.script.lock().unwrap() = format!("echo 'oops {SECRET_VALUE}'; exit 1");
    let leaky = api.submit(request_with_credentials(None)).await;

    let b = api.wait_terminal(&id, SECS(15)).await;
    assert_eq!(b["state"], "failed", "{b}");
    let l = api.wait_terminal(&leaky, SECS(15)).await;
    assert!(
        l["error"]["message"].as_str().unwrap().contains("oops ***"),
        "{l}"
    );
    assert!(!file.exists(), "the credentials file outlived its build");
    assert_eq!(std::fs::read_dir(&credentials_dir).unwrap().count(), 0);

    // The API shows what was built and the credentials' names.
    assert_eq!(b["inputs"]["target"], "prod");
    assert_eq!(b["inputs"]["platform"], "linux/amd64");
    assert_eq!(b["inputs"]["build_args"]["GREETING"], "hello world");
    assert_eq!(b["inputs"]["secret_ids"], json!(["npm"]));
    assert_eq!(
        b["credentials"]["registry_hosts"],
        json!(["registry.example:5000"])
    );
    assert_eq!(b["credentials"]["git_token"], true);
    assert_eq!(b["pinned_node"], "test-node");
    let mut answers = vec![b.to_string(), l.to_string()];
    answers.push(api.get("/v1/builds").await.1.to_string());
    answers.push(api.get("/v1/builds?state=failed").await.1.to_string());
    let logs = reqwest::Client::new()
        .get(format!("{}/v1/builds/{id}/logs", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(logs.contains("==> build"), "{logs}");
    answers.push(logs);
    for answer in &answers {
        assert_no_value("an API answer", answer);
    }

    // The requester's webhook (a report the node wrote) echoes the inputs, not the values.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = hook.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 1);
    assert_no_value("the webhook", &String::from_utf8_lossy(&hits[0].1));
    let report: BuildReport = serde_json::from_slice(&hits[0].1).unwrap();
    let inputs = report.inputs.unwrap();
    assert_eq!(inputs.target.as_deref(), Some("prod"));
    assert_eq!(inputs.secret_ids, ["npm"]);
    assert_eq!(inputs.build_args["VERSION"], "1.2");

    d.stop().await;
    let db = database_text(database_url.as_deref(), dir.path()).await;
    assert!(db.contains(&id) && db.contains("registry.example:5000"));
    assert_no_value("the database", &db);
    let log = String::from_utf8_lossy(&NODE_LOG.lock().unwrap()).into_owned();
    assert!(log.contains(&id), "the node's log was not captured");
    assert_no_value("the node's log", &log);
}

#[tokio::test]
async fn credentials_reach_the_vm_and_are_kept_nowhere_else() {
    credentials_reach_the_vm_and_nothing_else(None).await;
}

#[tokio::test]
async fn pg_credentials_reach_the_vm_and_are_kept_nowhere_else() {
    let pg = common::postgres().await;
    credentials_reach_the_vm_and_nothing_else(Some(pg.url.clone())).await;
}

#[tokio::test]
async fn build_args_too_long_for_the_kernel_command_line_go_to_the_config_drive() {
    capture_node_log();
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("exit 1");
    let d = common::start(dir.path(), launcher.clone(), Options::default()).await;
    let api = d.client();
    let big = "v".repeat(2500);
    let id = api
        .submit(json!({"build_args": {"BIG": big, "SMALL": "1"}, "target": "prod"}))
        .await;
    api.wait_terminal(&id, SECS(10)).await;
    let spec = launcher.spec(&id).unwrap();
    assert!(spec.params.build_args.is_empty());
    let overflow = spec.secrets.build_args.unwrap();
    assert_eq!(overflow.as_map()["BIG"], big);
    assert_eq!(overflow.as_map()["SMALL"], "1");
    let cmdline = spec
        .params
        .kernel_cmdline(&cmdline_budget_base(BASE_BOOT_ARGS))
        .unwrap();
    assert!(
        cmdline.contains("target=prod") && !cmdline.contains("build_args"),
        "{cmdline}"
    );
    assert!(spec.secrets.build_secrets.is_empty());
    // No credentials: not pinned, no file.
    let b = api.build(&id).await;
    assert_eq!(b.get("pinned_node"), None, "{b}");
    assert_eq!(b["inputs"]["build_args"]["BIG"], big.as_str());
    d.stop().await;
}

#[tokio::test]
async fn bad_build_inputs_and_credentials_are_refused_naming_the_field() {
    capture_node_log();
    let dir = tempfile::tempdir().unwrap();
    let d = common::start(
        dir.path(),
        ScriptLauncher::new("exit 1"),
        Options::default(),
    )
    .await;
    let api = d.client();
    let base = || json!({"repo_url": "https://g.example/r", "ref": "main", "vcpus": 1});
    for (extra, field, words) in [
        (
            json!({"platform": "linux/arm64"}),
            "platform",
            "linux/amd64 only",
        ),
        (json!({"target": "1st stage"}), "target", "not a stage name"),
        (
            json!({"build_args": {"1A": "x"}}),
            "build_args",
            "not a build arg name",
        ),
        (
            json!({"secrets": {"../npm": SECRET_VALUE}}),
            "secrets",
            "not a secret id",
        ),
        (
            json!({"git_token": format!("{GIT_TOKEN}\nX-Evil: 1")}),
            "git_token",
            "whitespace or control",
        ),
        (json!({"git_username": "bot"}), "git_username", "git_token"),
        (
            json!({"registry_auths": {"https://r.example": {"username": "u", "password": REGISTRY_PASSWORD}}}),
            "registry_auths",
            "not a registry host",
        ),
    ] {
        let mut body = base();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = api.post("/v1/builds", &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["field"], field, "{v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{v}");
        assert_no_value("a 400 answer", &v.to_string());
    }
    // A value of the wrong shape is not quoted back either.
    for extra in [
        json!({"registry_auths": {"r.example": REGISTRY_PASSWORD}}),
        json!({"secrets": {"npm": [SECRET_VALUE]}}),
        json!({"git_token": {"t": GIT_TOKEN}}),
    ] {
        let mut body = base();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = api.post("/v1/builds", &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains("invalid type"), "{v}");
        assert_no_value("a 400 answer", &v.to_string());
    }
    let (_, list) = api.get("/v1/builds").await;
    assert_eq!(list["builds"], json!([]), "nothing was stored");
    assert_eq!(
        std::fs::read_dir(dir.path().join("credentials"))
            .unwrap()
            .count(),
        0
    );
    d.stop().await;
}

#[tokio::test]
async fn restart_sweeps_credentials_of_ended_and_unknown_builds_and_keeps_queued_ones() {
    use node_agent::credentials::{CredentialStore, Credentials, SecretValue};
    use node_agent::db::{Db, NewBuild, Update};
    use node_agent::model::{BuildRequest, BuildState};
    capture_node_log();
    let dir = tempfile::tempdir().unwrap();
    // What a node killed with -9 leaves: a queued, a running and a cancelled build with
    // credentials files, and a file whose build the database never got.
    let db_url = format!("sqlite://{}/node-agent.db?mode=rwc", dir.path().display());
    let db = Db::open(&db_url).await.unwrap();
    let store = CredentialStore::new(dir.path().join("credentials")).unwrap();
    let mut request: BuildRequest = serde_json::from_value(json!({"repo_url": "https://g.example/r", "ref": "main", "vcpus": 1, "mem_mib": 512, "s3_bucket": "rootfs", "s3_key": "app.rootfs", "secrets": {"npm": SECRET_VALUE}})).unwrap();
    let credentials = request.take_credentials();
    let mut ids = vec![];
    for state in [
        BuildState::Queued,
        BuildState::Running,
        BuildState::Cancelled,
    ] {
        let id = node_agent::new_build_id();
        store.write(&id, &credentials).unwrap();
        db.insert(&NewBuild {
            id: id.clone(),
            request: request.clone(),
            credentials: credentials.names(),
            pinned_node: Some("test-node".into()),
            requester: "t".into(),
            revision: "main".into(),
            timeout_s: 600,
            created_at_ms: node_agent::now_ms(),
        })
        .await
        .unwrap();
        let steps: &[(BuildState, BuildState)] = match state {
            BuildState::Running => &[
                (BuildState::Queued, BuildState::Starting),
                (BuildState::Starting, BuildState::Running),
            ],
            BuildState::Cancelled => &[(BuildState::Queued, BuildState::Cancelled)],
            _ => &[],
        };
        for (from, to) in steps {
            db.transition(
                &id,
                &[*from],
                *to,
                "test-node",
                "test",
                Update::default().set("node_id", "test-node"),
            )
            .await
            .unwrap()
            .unwrap();
        }
        ids.push(id);
    }
    let unknown = node_agent::new_build_id();
    store.write(&unknown, &Credentials::default()).unwrap();
    store
        .write(
            &node_agent::new_build_id(),
            &Credentials {
                git_token: Some(SecretValue("x".into())),
                ..Default::default()
            },
        )
        .unwrap();
    drop(db);
    let (queued, running, cancelled) = (&ids[0], &ids[1], &ids[2]);
    let file = |id: &str| dir.path().join("credentials").join(format!("{id}.json"));

    let launcher = ScriptLauncher::new("sleep 1; exit 1");
    let d = common::start(dir.path(), launcher.clone(), Options::default()).await;
    assert!(!file(cancelled).exists() && !file(&unknown).exists());
    assert!(!file(running).exists(), "the failed build's file is left");
    let api = d.client();
    assert_eq!(api.build(running).await["state"], "failed");
    api.wait_state(queued, "running", SECS(10)).await;
    assert!(file(queued).exists());
    let spec = launcher.spec(queued).unwrap();
    assert_eq!(spec.secrets.build_secrets["npm"], SECRET_VALUE);
    api.wait_terminal(queued, SECS(10)).await;
    assert_eq!(
        std::fs::read_dir(dir.path().join("credentials"))
            .unwrap()
            .count(),
        0
    );
    d.stop().await;
}

#[tokio::test]
async fn a_build_with_credentials_fails_when_its_file_is_gone() {
    capture_node_log();
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("sleep 30");
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
    let blocker = api.submit(json!({})).await;
    api.wait_state(&blocker, "running", SECS(10)).await;
    let id = api.submit(request_with_credentials(None)).await;
    std::fs::remove_file(dir.path().join("credentials").join(format!("{id}.json"))).unwrap();
    *launcher.script.lock().unwrap() = "exit 1".into();
    api.post(&format!("/v1/builds/{blocker}/cancel"), &json!({}))
        .await;
    let b = api.wait_terminal(&id, SECS(10)).await;
    assert_eq!(b["state"], "failed");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("credentials are not on node test-node"),
        "{b}"
    );
    assert!(
        launcher.spec(&id).is_none(),
        "it ran without its credentials"
    );
    d.stop().await;
}

#[tokio::test]
async fn pg_a_build_with_credentials_runs_only_on_the_node_that_accepted_it() {
    capture_node_log();
    let pg = common::postgres().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (la, lb) = (
        ScriptLauncher::new("sleep 30"),
        ScriptLauncher::new("sleep 0.05"),
    );
    let start = |dir: std::path::PathBuf, launcher, node_id: &str, vcpus| {
        let options = Options {
            database_url: Some(pg.url.clone()),
            node_id: node_id.into(),
            capacity_vcpus: vcpus,
            ..Default::default()
        };
        async move { common::start(&dir, launcher, options).await }
    };
    let a = start(dir_a.path().to_path_buf(), la.clone(), "node-a", 1).await;
    let b = start(dir_b.path().to_path_buf(), lb.clone(), "node-b", 2).await;
    let (api_a, api_b) = (a.client(), b.client());
    // Node A is full with a build only it may run (it has credentials).
    let blocker = api_a.submit(request_with_credentials(None)).await;
    let running = api_a.wait_state(&blocker, "running", SECS(10)).await;
    assert_eq!(running["node_id"], "node-a");
    // A second one waits for A although B is idle; B still takes builds without credentials.
    let pinned = api_a.submit(request_with_credentials(None)).await;
    let free = api_a.submit(json!({})).await;
    let f = api_b.wait_terminal(&free, SECS(10)).await;
    assert_eq!(f["node_id"], "node-b", "{f}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = api_b.build(&pinned).await;
    assert_eq!(p["state"], "queued", "{p}");
    assert_eq!(p["pinned_node"], "node-a");
    assert!(lb.spec(&pinned).is_none());
    // A queued one cancelled through B ends there; A's sweep removes A's file of it.
    let doomed = api_a.submit(request_with_credentials(None)).await;
    let doomed_file = dir_a
        .path()
        .join("credentials")
        .join(format!("{doomed}.json"));
    assert!(doomed_file.exists());
    let (status, v) = api_b
        .post(&format!("/v1/builds/{doomed}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (202, Some("cancelled")),
        "{v}"
    );
    // B had no file to remove; A's sweep (this one, or its own every 10 s) removes A's.
    a.node
        .credentials
        .sweep(&a.node.db, SECS(60))
        .await
        .unwrap();
    assert!(!doomed_file.exists());
    // Once A has room it runs it, with the values from its own file.
    *la.script.lock().unwrap() = "sleep 0.05".into();
    api_b
        .post(&format!("/v1/builds/{blocker}/cancel"), &json!({}))
        .await;
    let p = api_b.wait_terminal(&pinned, SECS(15)).await;
    assert_eq!(p["node_id"], "node-a", "{p}");
    assert_eq!(
        la.spec(&pinned).unwrap().secrets.build_secrets["npm"],
        SECRET_VALUE
    );
    assert!(lb.spec(&pinned).is_none() && lb.spec(&blocker).is_none());
    assert_eq!(
        std::fs::read_dir(dir_b.path().join("credentials"))
            .unwrap()
            .count(),
        0
    );
    a.stop().await;
    b.stop().await;
}

/// The node's audit lines (`target` `audit`) about one build, as JSON.
fn audit_lines(id: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&NODE_LOG.lock().unwrap())
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "audit" && l["fields"]["build_id"] == id)
        .collect()
}

/// The audit log says who submitted what (credential names, never values), every state
/// change, and once the guest reported it, the commit that was built.
#[tokio::test]
async fn the_audit_log_records_the_submission_every_state_change_and_the_commit() {
    use builder_contract::signature::{sign, SIGNATURE_HEADER, TIMESTAMP_HEADER};
    capture_node_log();
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("echo '==> clone'; sleep 20");
    let d = common::start(dir.path(), launcher.clone(), Options::default()).await;
    let api = d.client();
    let mut body = request_with_credentials(None);
    body["requester"] = json!("alice@ci");
    body["dockerfile"] = json!("docker/Dockerfile.prod");
    let id = api.submit(body).await;
    api.wait_state(&id, "running", SECS(10)).await;

    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let report = BuildReport {
        build_id: id.clone(),
        status: builder_contract::BuildStatus::Succeeded,
        repo_url: "https://git.example/app.git".into(),
        revision: "main".into(),
        commit_sha: Some(commit.into()),
        image_digest: None,
        inputs: None,
        // A succeeded report stands only with an upload the node verified.
        rootfs: Some(
            common::Guest::of(&launcher.spec(&id).unwrap())
                .upload_rootfs(b"rootfs")
                .await,
        ),
        error: None,
        phases: vec![],
        started_at_unix_ms: 1,
        duration_ms: 2,
    };
    let key = launcher.spec(&id).unwrap().secrets.webhook_secret.unwrap();
    let body = serde_json::to_vec(&report).unwrap();
    let ts = (node_agent::now_ms() / 1000) as u64;
    let status = reqwest::Client::new()
        .post(format!("{}/v1/internal/builds/{id}/complete", d.base))
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, sign(key.as_bytes(), ts, &body))
        .body(body)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    assert_eq!(api.wait_terminal(&id, SECS(20)).await["state"], "succeeded");
    d.stop().await;

    let lines = audit_lines(&id);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    for line in &text {
        assert_no_value("an audit line", line);
    }
    let submitted = &lines[0]["fields"];
    assert_eq!(submitted["message"], "submitted", "{text:#?}");
    for (field, value) in [
        ("requester", json!("alice@ci")),
        ("repo_url", json!("https://git.example/app.git")),
        ("revision", json!("main")),
        ("dockerfile", json!("docker/Dockerfile.prod")),
        ("target", json!("prod")),
        ("secret_ids", json!("npm")),
        ("registry_hosts", json!("registry.example:5000")),
        ("git_token", json!(true)),
        ("pinned_node", json!("test-node")),
        ("s3_bucket", json!("rootfs")),
        ("s3_key", json!("app.rootfs")),
    ] {
        assert_eq!(submitted[field], value, "{field}: {text:#?}");
    }
    let changes: Vec<(&str, &str)> = lines[1..]
        .iter()
        .map(|l| {
            assert_eq!(l["fields"]["message"], "build state changed", "{l}");
            assert_eq!(l["fields"]["requester"], "alice@ci", "{l}");
            (
                l["fields"]["from"].as_str().unwrap(),
                l["fields"]["to"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("queued", "starting"),
            ("starting", "running"),
            ("running", "succeeded")
        ],
        "{text:#?}"
    );
    // The commit is known from the guest's report on, not before.
    assert_eq!(lines[1]["fields"].get("commit_sha"), None, "{}", lines[1]);
    assert_eq!(lines[3]["fields"]["commit_sha"], commit, "{}", lines[3]);
}
