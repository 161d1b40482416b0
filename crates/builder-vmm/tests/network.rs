//! The per-VM network for real: namespace, veth, TAP, NAT and egress rules appear on the host,
//! the namespace reaches the host over the veth, and teardown or reclaim leaves nothing.
//!
//! The egress matrix runs in a namespace standing in for the host (its own tables, routes and
//! addresses, so a Docker-style DNAT, a `DOCKER-USER` chain and a fake metadata route touch
//! nothing of the real host or of other tests) with a guest namespace behind the VM's `tap0`
//! (a veth under that name, which the namespace's rules match as they match the TAP), an
//! "Internet" namespace in 198.18.0.0/15 and a "LAN" namespace in 10/8 that also holds a fake
//! metadata service at 169.254.169.254. Every connection goes only to these namespaces.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder_vmm::cleanup::CleanupStack;
use builder_vmm::net::{NetworkPlan, HOST_TABLES, NETNS_TABLE, TAP};
use builder_vmm::{reclaim, AddressPool, EgressPolicy, Host, NetworkSpec, SystemHost, VmAddresses};

/// The node agent's listener port in these tests.
const LISTENER: u16 = 18080;

fn plan(name: &str, slot: u32, tap_owner: Option<u32>, egress: EgressPolicy) -> NetworkPlan {
    let spec = NetworkSpec {
        slot,
        egress,
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
    };
    let tag = format!("bvm-{}", common::id(name));
    NetworkPlan::new(&tag, AddressPool::default(), spec, tap_owner).unwrap()
}

fn listener_only() -> EgressPolicy {
    EgressPolicy {
        host_port: Some(LISTENER),
        ..Default::default()
    }
}

/// Accepts one connection on all addresses and greets it.
fn serve_once(port: u16) -> std::thread::JoinHandle<()> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut conn, b"hello\n").unwrap();
    })
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs `args` and fails the test when it fails.
fn must(args: &[&str]) -> String {
    let (ok, text) = run(args);
    assert!(ok, "{args:?}: {text}");
    text
}

/// `ip [-n NETNS] ARGS...`.
fn ip(netns: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut argv = vec!["ip"];
    if let Some(netns) = netns {
        argv.extend(["-n", netns]);
    }
    argv.extend(args);
    run(&argv)
}

/// The IPv4 addresses (`ADDRESS/PREFIX`) of a link.
fn addresses(netns: Option<&str>, link: &str) -> Vec<String> {
    let (ok, text) = ip(netns, &["-j", "-4", "addr", "show", "dev", link]);
    assert!(ok, "{text}");
    let links: serde_json::Value = serde_json::from_str(&text).unwrap();
    links[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// Runs `work` on a thread that has entered the named namespace `netns` (threads it starts,
/// and the commands they run, are in it too).
fn in_netns<T: Send>(netns: &str, work: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace fd we hold open; it changes only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {netns}");
                work()
            })
            .join()
            .unwrap()
    })
}

/// Named namespaces made for a test, deleted when dropped (their links with them).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) -> String {
        let netns = format!("bvm-{}", common::id(name));
        must(&["ip", "netns", "add", &netns]);
        must(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        self.0.push(netns.clone());
        netns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for netns in self.0.iter().rev() {
            let _ = run(&["ip", "netns", "delete", netns]);
        }
    }
}

/// Greets every connection on `0.0.0.0:port` in namespace `netns` until dropped, noting
/// where each came from.
struct Greeter {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Greeter {
    fn start(netns: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = in_netns(netns, || std::net::TcpListener::bind(("0.0.0.0", port)))
            .unwrap_or_else(|e| panic!("bind {port} in {netns}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stopped = stop.clone();
        let peers = Arc::new(Mutex::new(vec![]));
        let seen = peers.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        seen.lock().unwrap().push(peer);
                        let _ = std::io::Write::write_all(&mut conn, b"hello\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Greeter {
            stop,
            peers,
            thread: Some(thread),
        }
    }

    /// The addresses connections came from so far.
    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection attempt: from namespace `from` to `to`, greeted or not.
#[derive(Debug, Clone)]
struct Probe {
    name: &'static str,
    from: String,
    to: SocketAddr,
    reachable: bool,
}

fn probe(name: &'static str, from: &str, to: &str, reachable: bool) -> Probe {
    Probe {
        name,
        from: from.to_string(),
        to: to.parse().unwrap(),
        reachable,
    }
}

/// Whether a connection from `from` to `to` is greeted within two seconds.
fn greeted(from: &str, to: SocketAddr) -> bool {
    in_netns(from, || {
        let Ok(mut conn) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return false;
        };
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut reply = String::new();
        let _ = std::io::Read::read_to_string(&mut conn, &mut reply);
        reply == "hello\n"
    })
}

/// Runs the probes at once; fails naming every one whose outcome was not the expected one.
fn check(probes: &[Probe]) {
    let outcomes: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| scope.spawn(|| greeted(&p.from, p.to)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wrong: Vec<String> = probes
        .iter()
        .zip(outcomes)
        .filter(|(p, reached)| p.reachable != *reached)
        .map(|(p, reached)| {
            let verb = if reached { "reached" } else { "did not reach" };
            format!("{}: {} {verb} {}", p.name, p.from, p.to)
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A veth from the current namespace (`link`, with `host_cidrs`) to `eth0` of `netns` (with
/// `cidrs`, default route via `gateway`).
fn wire(link: &str, host_cidrs: &[&str], netns: &str, cidrs: &[&str], gateway: &str) {
    must(&[
        "ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    for cidr in host_cidrs {
        must(&["ip", "addr", "add", cidr, "dev", link]);
    }
    must(&["ip", "link", "set", link, "up"]);
    for cidr in cidrs {
        must(&["ip", "-n", netns, "addr", "add", cidr, "dev", "eth0"]);
    }
    must(&["ip", "-n", netns, "link", "set", "eth0", "up"]);
    must(&["ip", "-n", netns, "route", "add", "default", "via", gateway]);
}

/// Replaces the VM's TAP with a veth named `tap0` whose other end is `eth0` of the namespace
/// `guest`, addressed as the guest would be, with its default route via the gateway.
fn plug_guest(vm: &str, guest: &str, a: &VmAddresses) {
    must(&["ip", "-n", vm, "link", "delete", TAP]);
    must(&[
        "ip", "-n", vm, "link", "add", TAP, "type", "veth", "peer", "name", "eth0", "netns", guest,
    ]);
    let gateway = format!("{}/30", a.gateway);
    must(&["ip", "-n", vm, "addr", "add", &gateway, "dev", TAP]);
    must(&["ip", "-n", vm, "link", "set", TAP, "up"]);
    let guest_cidr = format!("{}/30", a.guest);
    must(&["ip", "-n", guest, "addr", "add", &guest_cidr, "dev", "eth0"]);
    must(&["ip", "-n", guest, "link", "set", "eth0", "up"]);
    let via = a.gateway.to_string();
    must(&["ip", "-n", guest, "route", "add", "default", "via", &via]);
}

/// Applies `plan` on this (test) host; the guard undoes it.
fn apply(plan: &NetworkPlan) -> common::Guard {
    let system: Arc<dyn Host> = Arc::new(SystemHost);
    let mut stack = CleanupStack::new();
    let applied = plan.apply(&system, &mut stack);
    let guard = common::Guard(stack);
    applied.unwrap();
    guard
}

/// Undoes what `guard` holds and checks that VM `vm` left nothing on the host.
fn tear_down(guard: common::Guard, vm: &str) {
    guard.finish().unwrap();
    assert_eq!(common::leftovers(vm, &[]), Vec::<String>::new());
}

/// `iptables ARGS...` in the current namespace.
fn iptables(args: &[&str]) -> String {
    must(&[&["iptables", "-w"][..], args].concat())
}

#[test]
fn setup_works_and_teardown_leaves_nothing() {
    let plan = plan("net", 4001, Some(12345), listener_only());
    let ns = plan.tag.clone();
    let guard = apply(&plan);

    let (_, netns) = run(&["ip", "netns", "list"]);
    assert!(netns.lines().any(|l| l.starts_with(&ns)), "{netns}");
    let (_, link) = run(&["ip", "-d", "link", "show", &plan.host_veth]);
    assert!(link.contains(&format!("alias {ns}")), "{link}");
    let (ok, tap) = run(&["ip", "-n", &ns, "-d", "link", "show", TAP]);
    assert!(ok && tap.contains("tun type tap"), "{tap}");
    assert!(tap.contains("persist on user 12345"), "{tap}");
    // The links, addresses and routes `ip` used to make (netlink makes them now).
    let a = &plan.addresses;
    assert_eq!(
        addresses(None, &plan.host_veth),
        [format!("{}/30", a.host_veth)]
    );
    assert_eq!(addresses(Some(&ns), "veth0"), [format!("{}/30", a.ns_veth)]);
    assert_eq!(addresses(Some(&ns), TAP), [format!("{}/30", a.gateway)]);
    assert_eq!(addresses(Some(&ns), "lo"), ["127.0.0.1/8"]);
    for (netns, link) in [
        (None, plan.host_veth.as_str()),
        (Some(ns.as_str()), "veth0"),
    ] {
        let (_, text) = ip(netns, &["link", "show", link]);
        assert!(text.contains(",UP,") && text.contains("state UP"), "{text}");
    }
    let (_, text) = ip(Some(&ns), &["link", "show", "lo"]);
    assert!(text.contains(",UP,"), "{text}");
    // From the namespace, the host answers only on the allowed port: ICMP and another port
    // with a listener are dropped.
    let host_ip = plan.addresses.host_veth.to_string();
    let allowed = serve_once(LISTENER);
    let other = serve_once(LISTENER + 1);
    let (ok, reply) = run(&[
        "ip", "netns", "exec", &ns, "busybox", "nc", "-w", "3", &host_ip, "18080",
    ]);
    assert!(ok && reply.contains("hello"), "{reply}");
    let (ok, reply) = run(&[
        "ip", "netns", "exec", &ns, "busybox", "nc", "-w", "2", &host_ip, "18081",
    ]);
    assert!(!ok && !reply.contains("hello"), "{reply}");
    let (ok, ping) = run(&[
        "ip", "netns", "exec", &ns, "busybox", "ping", "-c1", "-W1", &host_ip,
    ]);
    assert!(!ok, "{ping}");
    allowed.join().unwrap();
    drop(other);
    let (_, routes) = run(&["ip", "-n", &ns, "route"]);
    assert!(
        routes.contains(&format!("default via {host_ip} dev veth0 \n")),
        "{routes}"
    );
    let (ok, rules) = run(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "nft",
        "list",
        "table",
        "inet",
        NETNS_TABLE,
    ]);
    assert!(ok, "{rules}");
    assert!(rules.contains("policy drop;"), "{rules}");
    for range in [
        "169.254.0.0/16",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "fc00::/7",
        "fe80::/10",
    ] {
        assert!(rules.contains(range), "{range} is blocked:\n{rules}");
    }
    assert!(!rules.contains("198.18."), "{rules}");
    let sysctl = |key: &str| {
        let (_, value) = run(&["ip", "netns", "exec", &ns, "sysctl", "-n", key]);
        value.trim().to_string()
    };
    assert_eq!(sysctl("net.ipv4.ip_forward"), "1");
    // IPv6 is never forwarded (a fresh namespace's default, relied on).
    assert_eq!(sysctl("net.ipv6.conf.all.forwarding"), "0");
    let (_, nat) = run(&["iptables", "-t", "nat", "-S", "POSTROUTING"]);
    assert!(
        nat.contains(&format!("--comment {ns} -j MASQUERADE")),
        "{nat}"
    );
    let (_, input) = run(&["iptables", "-S", "INPUT"]);
    let accept = input.find("--dport 18080").expect("host port rule");
    let drop = input
        .find(&format!("-i {} -m comment", plan.host_veth))
        .expect("drop rule");
    assert!(
        accept < drop,
        "the allowed port comes before the drop:\n{input}"
    );
    // The jump to the raw chain in PREROUTING; the FORWARD accept after every rule that is not
    // a VM's (other tests' VMs may come and go meanwhile).
    let (_, raw) = run(&["iptables", "-t", "raw", "-S", "PREROUTING"]);
    let jump = format!(
        "-i {hv} -m comment --comment {ns} -j {hv}",
        hv = plan.host_veth
    );
    assert!(raw.contains(&jump), "{raw}");
    let (_, forward) = run(&["iptables", "-S", "FORWARD"]);
    let ours = forward.find(&format!("-A FORWARD -i {} ", plan.host_veth));
    let last_foreign = forward
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.contains("--comment bvm-"))
        .filter_map(|l| forward.find(l))
        .max();
    assert!(ours.is_some() && ours > last_foreign, "{forward}");

    tear_down(guard, &ns);
    let (_, raw) = run(&["iptables", "-t", "raw", "-S"]);
    assert!(!raw.contains(&plan.host_veth), "{raw}");
}

#[test]
fn reclaim_removes_a_crashed_network() {
    let host: Arc<dyn Host> = Arc::new(SystemHost);
    let plan = plan("crash", 4002, None, listener_only());
    let mut stack = CleanupStack::new();
    plan.apply(&host, &mut stack).unwrap();
    // The daemon "crashes": its cleanup stack is lost.
    std::mem::forget(stack);
    assert!(!common::leftovers(&plan.tag, &[]).is_empty());

    let work_root = tempfile::tempdir().unwrap();
    let report = reclaim::reclaim(
        host.as_ref(),
        &reclaim::ReclaimScope {
            prefix: &plan.tag,
            work_root: work_root.path(),
            jail_dir: None,
        },
    );
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(report.netns, 1);
    // FORWARD ×2, INPUT ×2, POSTROUTING, the jump in raw PREROUTING; and the raw chain.
    assert_eq!(report.iptables_rules, 6, "{report:?}");
    assert_eq!(report.iptables_chains, 1, "{report:?}");
    assert_eq!(common::leftovers(&plan.tag, &[]), Vec::<String>::new());
    for table in HOST_TABLES {
        let (_, rules) = run(&["iptables", "-t", table, "-S"]);
        assert!(!rules.contains(&plan.host_veth), "{table}: {rules}");
    }
}

/// From a guest behind the VM's `tap0`: the public Internet and the listener are reachable;
/// the host's other addresses and ports, a Docker-style DNAT of a host port, a private LAN
/// host, a fake metadata service and a destination the operator drops in `DOCKER-USER` are
/// not; the resolver and an operator's exception are. Each of the two layers (the namespace's
/// nftables, the host's raw chain) blocks the private ranges on its own.
#[test]
fn the_guest_reaches_the_internet_and_nothing_private() {
    let mut spaces = Namespaces(vec![]);
    let host = spaces.add("host");
    let inet = spaces.add("inet");
    let lan = spaces.add("lan");
    let guest = spaces.add("guest");
    let egress = EgressPolicy {
        host_port: Some(LISTENER),
        allow: None,
        allow_private: vec!["10.252.1.0/24:18087".parse().unwrap()],
        redirect_to_host: Vec::new(),
    };
    let mut plan = plan("matrix", 4003, None, egress);
    plan.spec.dns = vec![Ipv4Addr::new(10, 252, 0, 2)];
    let vm = plan.tag.clone();
    let a = plan.addresses;
    let hv = plan.host_veth.clone();

    in_netns(&host, || {
        // The "host": a link to the Internet (198.18.0.1), one to the LAN (10.252.0.1 and
        // .1.1, and the route to the fake metadata address there), another address of its own
        // (on `lo`: this kernel has no dummy links), FORWARD dropping by default as Docker
        // makes it, with the operator's forwarding between its links and a DOCKER-USER chain
        // that drops one Internet host.
        wire(
            "inet0",
            &["198.18.0.1/24"],
            &inet,
            &["198.18.0.2/24", "198.18.0.3/24"],
            "198.18.0.1",
        );
        wire(
            "lan0",
            &["10.252.0.1/24", "10.252.1.1/24"],
            &lan,
            &["10.252.0.2/24", "10.252.1.2/24", "169.254.169.254/32"],
            "10.252.0.1",
        );
        must(&[
            "ip",
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            "10.252.0.2",
        ]);
        must(&["ip", "addr", "add", "198.18.9.1/32", "dev", "lo"]);
        iptables(&["-P", "FORWARD", "DROP"]);
        iptables(&["-N", "DOCKER-USER"]);
        iptables(&["-A", "DOCKER-USER", "-d", "198.18.0.3/32", "-j", "DROP"]);
        iptables(&["-A", "FORWARD", "-j", "DOCKER-USER"]);
        for (from, to) in [("inet0", "lan0"), ("lan0", "inet0")] {
            iptables(&["-A", "FORWARD", "-i", from, "-o", to, "-j", "ACCEPT"]);
        }
        // A Docker-style published port: the host's port 18085 goes to the LAN host.
        iptables(&[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "18085",
            "-j",
            "DNAT",
            "--to-destination",
            "10.252.0.2:18086",
        ]);

        let guard = apply(&plan);
        // DOCKER-USER still runs before the VM's accept.
        let forward = iptables(&["-S", "FORWARD"]);
        let docker_user = forward.find("-j DOCKER-USER").unwrap();
        let accept = forward.find(&format!("-A FORWARD -i {hv} ")).unwrap();
        assert!(docker_user < accept, "{forward}");

        // The guest: a veth named tap0 in the VM's namespace instead of the TAP.
        plug_guest(&vm, &guest, &a);

        let _servers = [
            Greeter::start(&host, LISTENER),
            Greeter::start(&host, LISTENER + 1),
            Greeter::start(&inet, 18082),
            Greeter::start(&lan, 53),
            Greeter::start(&lan, 80),
            Greeter::start(&lan, 18086),
            Greeter::start(&lan, 18087),
        ];
        let listener = format!("{}:{LISTENER}", a.host_veth);
        let other_port = format!("{}:{}", a.host_veth, LISTENER + 1);
        let published = format!("{}:18085", a.host_veth);
        // Positive controls: every target answers others.
        check(&[
            probe("metadata from the host", &host, "169.254.169.254:80", true),
            probe("LAN from the host", &host, "10.252.0.2:18087", true),
            probe(
                "dropped host from the host",
                &host,
                "198.18.0.3:18082",
                true,
            ),
            probe(
                "published port from the Internet",
                &inet,
                "198.18.0.1:18085",
                true,
            ),
        ]);
        let guest_probes = |g: &str| {
            vec![
                probe("listener", g, &listener, true),
                probe("Internet", g, "198.18.0.2:18082", true),
                probe("resolver", g, "10.252.0.2:53", true),
                probe("excepted LAN service", g, "10.252.1.2:18087", true),
                probe("excepted network, other port", g, "10.252.1.2:18086", false),
                probe("host, other port", g, &other_port, false),
                probe("host's Internet address", g, "198.18.0.1:18080", false),
                probe("host's other address", g, "198.18.9.1:18080", false),
                probe("published port, veth address", g, &published, false),
                probe(
                    "published port, Internet address",
                    g,
                    "198.18.0.1:18085",
                    false,
                ),
                probe("LAN", g, "10.252.0.2:18087", false),
                probe("metadata", g, "169.254.169.254:80", false),
                probe("DOCKER-USER drop", g, "198.18.0.3:18082", false),
            ]
        };
        check(&guest_probes(&guest));
        // The host layer alone: the VM's namespace's own connections pass no nftables rule.
        check(&[
            probe("listener from the namespace", &vm, &listener, true),
            probe("Internet from the namespace", &vm, "198.18.0.2:18082", true),
            probe("LAN from the namespace", &vm, "10.252.0.2:18087", false),
            probe(
                "metadata from the namespace",
                &vm,
                "169.254.169.254:80",
                false,
            ),
            probe(
                "other address from the namespace",
                &vm,
                "198.18.9.1:18080",
                false,
            ),
            probe("published from the namespace", &vm, &published, false),
        ]);
        // The namespace layer alone: without the raw chain the namespace itself reaches the
        // LAN, the guest still does not.
        let jump = format!("PREROUTING -i {hv} -m comment --comment {vm} -j {hv}");
        iptables(
            &[
                &["-t", "raw", "-D"][..],
                &jump.split(' ').collect::<Vec<_>>(),
            ]
            .concat(),
        );
        check(&[
            probe(
                "LAN from the namespace, no raw chain",
                &vm,
                "10.252.0.2:18087",
                true,
            ),
            probe(
                "LAN from the guest, no raw chain",
                &guest,
                "10.252.0.2:18087",
                false,
            ),
            probe(
                "metadata, no raw chain",
                &guest,
                "169.254.169.254:80",
                false,
            ),
            probe("Internet, no raw chain", &guest, "198.18.0.2:18082", true),
        ]);
        iptables(
            &[
                &["-t", "raw", "-I"][..],
                &jump.split(' ').collect::<Vec<_>>(),
            ]
            .concat(),
        );

        tear_down(guard, &vm);
        let raw = iptables(&["-t", "raw", "-S"]);
        assert!(!raw.contains(&hv), "{raw}");
    });
}

/// A build's allowlist narrows the public Internet; listing a private network does not open
/// it, the operator's exception does.
#[test]
fn an_allowlist_cannot_open_what_the_operator_blocks() {
    let mut spaces = Namespaces(vec![]);
    let host = spaces.add("host2");
    let inet = spaces.add("inet2");
    let lan = spaces.add("lan2");
    let guest = spaces.add("guest2");
    let egress = EgressPolicy {
        host_port: None,
        allow: Some(vec![
            "198.18.0.2/32:18082".parse().unwrap(),
            "10.252.0.0/16".parse().unwrap(),
        ]),
        allow_private: vec!["10.252.1.2".parse().unwrap()],
        redirect_to_host: Vec::new(),
    };
    let plan = plan("allow", 4004, None, egress);
    let vm = plan.tag.clone();
    let a = plan.addresses;
    in_netns(&host, || {
        wire(
            "inet0",
            &["198.18.0.1/24"],
            &inet,
            &["198.18.0.2/24"],
            "198.18.0.1",
        );
        wire(
            "lan0",
            &["10.252.0.1/24", "10.252.1.1/24"],
            &lan,
            &["10.252.0.2/24", "10.252.1.2/24"],
            "10.252.0.1",
        );
        let guard = apply(&plan);
        plug_guest(&vm, &guest, &a);
        let _servers = [
            Greeter::start(&inet, 18082),
            Greeter::start(&inet, 18083),
            Greeter::start(&lan, 18087),
        ];
        check(&[
            probe("listed", &guest, "198.18.0.2:18082", true),
            probe("not listed", &guest, "198.18.0.2:18083", false),
            probe("listed but private", &guest, "10.252.0.2:18087", false),
            probe("listed and excepted", &guest, "10.252.1.2:18087", true),
        ]);
        tear_down(guard, &vm);
    });
}

/// Registry redirects: the guest's TCP connections to a listed public and a listed private
/// `ip:port` reach the listener on the host veth (which sees the VM's address, as for every
/// connection of this VM), never the original destination; another port of the same public
/// address goes out as usual, and one of the private address stays blocked.
#[test]
fn redirected_registries_reach_the_listener_and_nothing_else_changes() {
    let mut spaces = Namespaces(vec![]);
    let host = spaces.add("host3");
    let inet = spaces.add("inet3");
    let lan = spaces.add("lan3");
    let guest = spaces.add("guest3");
    let egress = EgressPolicy {
        host_port: Some(LISTENER),
        redirect_to_host: vec![
            "198.18.0.2:18090".parse().unwrap(),
            "10.252.0.2:5000".parse().unwrap(),
        ],
        ..Default::default()
    };
    let plan = plan("redirect", 4005, None, egress);
    let vm = plan.tag.clone();
    let a = plan.addresses;
    in_netns(&host, || {
        wire(
            "inet0",
            &["198.18.0.1/24"],
            &inet,
            &["198.18.0.2/24"],
            "198.18.0.1",
        );
        wire(
            "lan0",
            &["10.252.0.1/24"],
            &lan,
            &["10.252.0.2/24"],
            "10.252.0.1",
        );
        let guard = apply(&plan);
        plug_guest(&vm, &guest, &a);
        let listener = Greeter::start(&host, LISTENER);
        let originals = [Greeter::start(&inet, 18090), Greeter::start(&lan, 5000)];
        let _others = [Greeter::start(&inet, 18082), Greeter::start(&lan, 18087)];
        check(&[
            probe("redirected public", &guest, "198.18.0.2:18090", true),
            probe("redirected private", &guest, "10.252.0.2:5000", true),
            probe("public, other port", &guest, "198.18.0.2:18082", true),
            probe("private, other port", &guest, "10.252.0.2:18087", false),
        ]);
        let vm_address = std::net::IpAddr::from(a.ns_veth);
        let peers = listener.peers();
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert!(peers.iter().all(|p| p.ip() == vm_address), "{peers:?}");
        for original in &originals {
            assert_eq!(
                original.peers(),
                [],
                "the original destination is never reached"
            );
        }
        tear_down(guard, &vm);
    });
}
