//! The per-VM network for real: namespace, veth, TAP, NAT and egress rules appear on the host,
//! the namespace reaches the host over the veth, and teardown or reclaim leaves nothing.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;

use builder_vmm::cleanup::CleanupStack;
use builder_vmm::net::{NetworkPlan, NETNS_TABLE, TAP};
use builder_vmm::{reclaim, AddressPool, EgressPolicy, Host, NetworkSpec, SystemHost};

fn plan(name: &str, slot: u32, tap_owner: Option<u32>) -> NetworkPlan {
    let spec = NetworkSpec {
        slot,
        egress: EgressPolicy {
            host_port: Some(18080),
            allow: None,
        },
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
    };
    let tag = format!("bvm-{}", common::id(name));
    NetworkPlan::new(&tag, AddressPool::default(), spec, tap_owner).unwrap()
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

#[test]
fn setup_works_and_teardown_leaves_nothing() {
    let host: Arc<dyn Host> = Arc::new(SystemHost);
    let plan = plan("net", 4001, Some(12345));
    let ns = plan.tag.clone();
    let mut stack = CleanupStack::new();
    let applied = plan.apply(&host, &mut stack);
    let guard = common::Guard(stack);
    applied.unwrap();

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
    let allowed = serve_once(18080);
    let other = serve_once(18081);
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
        "chain",
        "ip",
        NETNS_TABLE,
        "forward",
    ]);
    assert!(ok, "{rules}");
    assert!(rules.contains("policy drop;"), "{rules}");
    assert!(
        rules.contains("iifname \"tap0\" ip daddr 169.254.0.0/16 drop"),
        "{rules}"
    );
    assert!(
        rules.contains("iifname \"tap0\" ip daddr 10.200.0.0/16 drop"),
        "{rules}"
    );
    let (_, forward) = run(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "sysctl",
        "-n",
        "net.ipv4.ip_forward",
    ]);
    assert_eq!(forward.trim(), "1");
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

    guard.finish().unwrap();
    assert_eq!(common::leftovers(&ns, &[]), Vec::<String>::new());
}

#[test]
fn reclaim_removes_a_crashed_network() {
    let host: Arc<dyn Host> = Arc::new(SystemHost);
    let plan = plan("crash", 4002, None);
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
    assert_eq!(report.iptables_rules, 5, "{report:?}");
    assert_eq!(common::leftovers(&plan.tag, &[]), Vec::<String>::new());
}
