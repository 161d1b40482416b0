//! The VM-facing listener's limits, against the in-process daemon and real sockets: thousands of
//! connections to one VM's listener leave another VM's listener and the operator API answering
//! promptly, the connections over the cap are closed at once and the rest when they send no
//! request in time; a connection that stops mid-body is closed after the idle timeout; source
//! pack files come back whole, with their length, streamed from disk.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, Options, ScriptLauncher};
use node_agent::api::vm_router;
use node_agent::sources::{Sources, Uploaded};
use node_agent::vm::{VmListenerLimits, VmRoutes};

const CAP: usize = 16;
const FLOOD: usize = 3000;
const HEADER_TIMEOUT: Duration = Duration::from_secs(4);
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// What "promptly" means on a busy 2-core test host.
const PROMPT: Duration = Duration::from_secs(2);

async fn daemon(dir: &std::path::Path) -> Daemon {
    common::start(dir, ScriptLauncher::new("sleep 60"), Options::default()).await
}

/// The VM routes of `daemon`'s node, as the node serves them to each VM, with test limits.
fn routes(daemon: &Daemon) -> VmRoutes {
    let config = &daemon.node.config;
    let sources = Sources::new(config.sources_dir(), config.vm_base_url()).unwrap();
    let limits = VmListenerLimits {
        max_connections: CAP,
        header_timeout: HEADER_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
    };
    VmRoutes::new(vm_router(daemon.node.clone(), Arc::new(sources)), limits)
}

/// A source URL no source has: the VM routes answer 404.
fn unknown_source(addr: SocketAddr) -> String {
    format!(
        "http://{addr}/v1/sources/{}/repo.git/info/refs",
        "0".repeat(32)
    )
}

/// The status of a GET and how long it took.
async fn timed_get(http: &reqwest::Client, url: &str) -> (Option<u16>, Duration) {
    let start = Instant::now();
    let status = http
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16());
    (status, start.elapsed())
}

/// Whether the server has closed `conn` (end of stream or reset), without waiting.
fn closed(mut conn: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// How many of `conns` the server still holds open.
fn still_open(conns: &[TcpStream]) -> usize {
    conns.iter().filter(|c| !closed(c)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_vm_listener_starves_neither_another_nor_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    let routes = routes(&d);
    let flooded = routes.serve("127.0.0.1:0".parse().unwrap()).unwrap();
    let other = routes.serve("127.0.0.2:0".parse().unwrap()).unwrap();
    let target = flooded.addr();

    // The flood: FLOOD connections from 8 threads, all kept open, sending nothing.
    let done = Arc::new(AtomicBool::new(false));
    let flood = {
        let done = done.clone();
        std::thread::spawn(move || {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    std::thread::spawn(move || {
                        (0..FLOOD / 8)
                            .filter_map(|_| {
                                TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let conns: Vec<TcpStream> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            done.store(true, Ordering::SeqCst);
            conns
        })
    };

    // Meanwhile the other VM's listener and the operator API answer, promptly.
    let http = reqwest::Client::new();
    let api = d.client();
    let (mut answers, mut slowest) = (0, Duration::ZERO);
    let mut samples = 0;
    while !done.load(Ordering::SeqCst) || samples < 5 {
        let (status, took) = timed_get(&http, &unknown_source(other.addr())).await;
        assert_eq!(status, Some(404), "the other VM's listener after {took:?}");
        slowest = slowest.max(took);
        let (status, took) = timed_get(&http, &format!("{}/healthz", d.base)).await;
        assert_eq!(status, Some(200), "the operator API after {took:?}");
        slowest = slowest.max(took);
        let start = Instant::now();
        let (status, builds) = api.get("/v1/builds").await;
        assert_eq!(status, 200, "{builds}");
        slowest = slowest.max(start.elapsed());
        answers += 3;
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < PROMPT,
        "the slowest of {answers} answers took {slowest:?}"
    );

    let conns = flood.join().unwrap();
    assert!(
        conns.len() > FLOOD * 9 / 10,
        "only {} connected",
        conns.len()
    );
    for conn in &conns {
        conn.set_nonblocking(true).unwrap();
    }
    // Over the cap, connections are closed at once: never more than CAP stay open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = still_open(&conns);
    assert!(
        (1..=CAP).contains(&open),
        "{open} of {} connections open, cap {CAP}",
        conns.len()
    );
    // Connections that send nothing are closed after the idle (or header) timeout.
    await_all_closed(&conns).await;
    drop(conns);

    // A new request to a listener full of (fresh, idle) connections is closed, not queued.
    // (Not checked against the flood's own: they idle out while the samples above run, so
    // on a slow host the listener may have room again by then.)
    let full: Vec<TcpStream> = (0..CAP)
        .map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap())
        .collect();
    for conn in &full {
        conn.set_nonblocking(true).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(still_open(&full), CAP, "the listener did not hold its cap");
    let (status, took) = timed_get(&http, &unknown_source(target)).await;
    assert_eq!(status, None, "a request over the cap was answered");
    assert!(took < PROMPT, "a request over the cap waited {took:?}");

    // Once they idle out, the flooded listener serves again.
    await_all_closed(&full).await;
    drop(full);
    let (status, _) = timed_get(&http, &unknown_source(target)).await;
    assert_eq!(status, Some(404));
    d.stop().await;
}

/// Waits until the server closed every one of `conns` (they send nothing: the idle or header
/// timeout closes them).
async fn await_all_closed(conns: &[TcpStream]) {
    let deadline = Instant::now() + HEADER_TIMEOUT + Duration::from_secs(3);
    while still_open(conns) > 0 {
        assert!(
            Instant::now() < deadline,
            "idle connections were never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_connection_that_stalls_is_closed_after_the_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    let listener = routes(&d).serve("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.addr();

    // A request head trickled a byte at a time (never idle, never complete): closed after the
    // header timeout. A whole head and part of its body, then nothing: closed after the idle
    // timeout.
    let report = builder_contract::logs::report_path("0123456789abcdef");
    let body = format!(
        "POST {report} HTTP/1.1\r\nHost: vm\r\nContent-Length: 1000\r\n\r\n{}",
        "x".repeat(10)
    );
    let trickle = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let start = Instant::now();
        let head = b"GET /v1/sources/x HTTP/1.1\r\nX-Slow: ";
        for i in 0.. {
            let byte = head.get(i).copied().unwrap_or(b'a');
            if conn.write_all(&[byte]).is_err() || start.elapsed() > Duration::from_secs(20) {
                break;
            }
            match conn.read(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                _ => break,
            }
        }
        ("a trickled head", start.elapsed(), HEADER_TIMEOUT)
    });
    let stall = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(body.as_bytes()).unwrap();
        let start = Instant::now();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = conn.read_to_end(&mut Vec::new());
        ("part of a body", start.elapsed(), IDLE_TIMEOUT)
    });
    let waits =
        tokio::task::spawn_blocking(move || [trickle.join().unwrap(), stall.join().unwrap()])
            .await
            .unwrap();
    for (name, waited, timeout) in waits {
        assert!(
            waited >= timeout - Duration::from_millis(200) && waited < timeout + PROMPT,
            "{name}: closed after {waited:?}, the timeout is {timeout:?}"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn a_source_pack_is_served_whole_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    // A source with 600 KiB of random (incompressible) bytes: its pack is about as large.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut noise = vec![0u8; 600 << 10];
    getrandom::getrandom(&mut noise).unwrap();
    std::fs::write(tree.join("noise.bin"), &noise).unwrap();
    let bundle = node_agent::local_source::bundle_dir(&tree, true).unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/sources", d.base))
        .bearer_auth(&d.token)
        .body(bundle.bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let up: Uploaded = r.json().await.unwrap();

    let listener = routes(&d).serve("127.0.0.1:0".parse().unwrap()).unwrap();
    let base = format!(
        "http://{}{}",
        listener.addr(),
        up.repo_url.path().trim_end_matches('/')
    );
    let http = reqwest::Client::new();
    let packs = http
        .get(format!("{base}/objects/info/packs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pack = packs
        .lines()
        .find_map(|l| l.strip_prefix("P "))
        .unwrap_or_else(|| panic!("no pack in {packs:?}"))
        .to_string();
    let r = http
        .get(format!("{base}/objects/pack/{pack}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let length = r.content_length();
    let served = r.bytes().await.unwrap();
    let token = up
        .repo_url
        .path_segments()
        .unwrap()
        .nth(2)
        .unwrap()
        .to_string();
    let on_disk = std::fs::read(
        d.node
            .config
            .sources_dir()
            .join(token)
            .join("repo.git/objects/pack")
            .join(&pack),
    )
    .unwrap();
    assert!(on_disk.len() > 500 << 10, "{}", on_disk.len());
    assert_eq!(length, Some(on_disk.len() as u64));
    assert!(
        served[..] == on_disk[..],
        "the pack served differs from the file"
    );
    d.stop().await;
}
