//! The network of one VM: a network namespace `bvm-<id>`, a veth pair from the host into it, a
//! TAP inside it for the guest, NAT on both hops, and egress rules. Everything is derived from
//! the VM's tag and its slot in an [`AddressPool`], so the host side can be found again by name
//! (see [`crate::reclaim`]).
//!
//! Addresses: slot `n` owns the `/29` at `pool + 8n`: `.1`/`.2` are the host and namespace ends
//! of the veth (a `/30`), `.5` is the TAP (the guest's gateway) and `.6` the guest (another
//! `/30`). The guest learns its address from the kernel `ip=` parameter.
//!
//! Egress: the guest reaches the public Internet and nothing else. [`BLOCKED_V4`] and
//! [`BLOCKED_V6`] (private, shared, loopback, link-local and every metadata address, multicast,
//! reserved), the pool (other VMs) and the host itself are dropped, except the one host port
//! of the node agent's VM-facing listener, the VM's resolvers on port 53 and what the operator
//! excepts ([`EgressPolicy::allow_private`]); a build may narrow the rest to an allowlist. Two
//! layers enforce it, each alone sufficient for the private ranges:
//! - the namespace's nftables table (`inet`: IPv4 and IPv6), gone with the namespace;
//! - on the host, a chain of the `raw` table, named after the host veth and jumped to from
//!   `PREROUTING` for packets from that veth, which runs before any DNAT (Docker's published
//!   ports, Kubernetes NodePorts): it drops every packet whose original destination is an
//!   address of the host (`addrtype LOCAL`), but the listener, and every private destination
//!   not excepted. It only drops or returns, so sitting first it opens nothing.
//!
//! Registry redirects ([`EgressPolicy::redirect_to_host`]): the namespace's table DNATs the
//! guest's TCP connections to each listed `ip:port` to the listener (`host_veth:host_port`) in
//! `prerouting`, before `forward` filters, so `forward` and the host's raw chain only ever see
//! the listener as the destination: the original one, public or private, is never reached nor
//! checked. Another port of the same address, or UDP, is filtered as any destination is.
//!
//! The host's `FORWARD` accept for the veth is appended, so Docker's `DOCKER-USER` and the
//! operator's own rules run first and can still drop a VM's traffic. Every host rule carries
//! the VM's tag as a comment.
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cleanup::CleanupStack;
use crate::host::{Host, HostCommand, HostError, HostOp, Sysctl, NETNS_RUN_DIR};
use crate::netlink::NetOp;

/// Prefix of every host-side veth name (`bvh-<hex of its address>`: unique on the host even
/// when several node agents with their own address ranges share it).
pub const HOST_VETH_PREFIX: &str = "bvh-";
/// The host's iptables tables that hold VM rules (each tagged with its VM's tag).
pub const HOST_TABLES: [&str; 3] = ["raw", "filter", "nat"];
/// Name of the veth end inside the namespace.
pub const NS_VETH: &str = "veth0";
/// Name of the guest's TAP inside the namespace.
pub const TAP: &str = "tap0";
/// The guest's interface name, as given to the kernel `ip=` parameter.
pub const GUEST_IFACE: &str = "eth0";
/// The nftables table (family `inet`) holding the namespace's firewall.
pub const NETNS_TABLE: &str = "builder";

/// IPv4 destinations no VM reaches unless the operator excepts them: "this network", RFC 1918,
/// shared address space (100.64/10: carrier NAT, some clouds' metadata at 100.100.100.200),
/// loopback, link-local (169.254.169.254 and every other metadata address there), IETF protocol
/// assignments, multicast and reserved (with broadcast). 198.18.0.0/15 (benchmarking) and the
/// documentation ranges are left reachable: tests stand in for the Internet with them.
pub const BLOCKED_V4: [(Ipv4Addr, u8); 10] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// IPv6 destinations no VM reaches: unspecified, loopback, IPv4-mapped, unique local
/// (fc00::/7, with AWS's metadata at fd00:ec2::254), link-local and multicast.
pub const BLOCKED_V6: [(Ipv6Addr, u8); 6] = [
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
];

/// The port of the VMs' resolvers, reachable even when they are private.
const DNS_PORT: u16 = 53;

/// Why the network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the address pool {network}/{prefix} is not valid: {reason}")]
    InvalidPool {
        network: Ipv4Addr,
        prefix: u8,
        reason: &'static str,
    },
    #[error("slot {slot} is outside the address pool, which has {slots} slots")]
    SlotOutOfRange { slot: u32, slots: u32 },
    #[error("`{value}` is not an egress rule; expected CIDR or CIDR:PORT, e.g. 10.0.0.0/8:443")]
    InvalidRule { value: String },
    #[error(
        "the egress policy redirects {redirects:?} to the host's listener but names no \
         host_port for it"
    )]
    RedirectWithoutListener {
        redirects: Vec<std::net::SocketAddrV4>,
    },
    #[error("setting up the VM network failed at `{step}`")]
    Step {
        step: String,
        #[source]
        source: HostError,
    },
}

/// The IPv4 range VM networks are carved from, one `/29` per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPool {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Default for AddressPool {
    /// `10.200.0.0/16`: 8192 slots.
    fn default() -> Self {
        AddressPool {
            network: Ipv4Addr::new(10, 200, 0, 0),
            prefix: 16,
        }
    }
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The four addresses of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmAddresses {
    /// Host end of the veth: the address the guest uses to reach the host's allowed port.
    pub host_veth: Ipv4Addr,
    /// Namespace end of the veth.
    pub ns_veth: Ipv4Addr,
    /// The TAP's address, the guest's default gateway.
    pub gateway: Ipv4Addr,
    pub guest: Ipv4Addr,
}

impl AddressPool {
    /// Checks the pool is an aligned network with room for at least one slot.
    pub fn validate(&self) -> Result<(), NetError> {
        let invalid = |reason| NetError::InvalidPool {
            network: self.network,
            prefix: self.prefix,
            reason,
        };
        if self.prefix > 29 || self.prefix == 0 {
            return Err(invalid("the prefix length must be between 1 and 29"));
        }
        if u32::from(self.network) & !mask(self.prefix) != 0 {
            return Err(invalid("the network address has host bits set"));
        }
        Ok(())
    }

    /// How many VMs the pool can address at once.
    pub fn slots(&self) -> u32 {
        1 << (29 - u32::from(self.prefix.min(29)))
    }

    /// The addresses of `slot`.
    pub fn addresses(&self, slot: u32) -> Result<VmAddresses, NetError> {
        self.validate()?;
        if slot >= self.slots() {
            return Err(NetError::SlotOutOfRange {
                slot,
                slots: self.slots(),
            });
        }
        let base = u32::from(self.network) + slot * 8;
        Ok(VmAddresses {
            host_veth: Ipv4Addr::from(base + 1),
            ns_veth: Ipv4Addr::from(base + 2),
            gateway: Ipv4Addr::from(base + 5),
            guest: Ipv4Addr::from(base + 6),
        })
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl VmAddresses {
    /// The kernel `ip=` parameter that configures the guest's `eth0` statically:
    /// `ip=<guest>::<gateway>:255.255.255.252::eth0:off[:<dns0>[:<dns1>]]`.
    pub fn kernel_ip_param(&self, dns: &[Ipv4Addr]) -> String {
        let mut param = format!(
            "ip={}::{}:{}::{GUEST_IFACE}:off",
            self.guest,
            self.gateway,
            Ipv4Addr::from(mask(30))
        );
        for server in dns.iter().take(2) {
            param.push_str(&format!(":{server}"));
        }
        param
    }

    /// The guest's MAC address: `06:00` followed by its IPv4 address, as Firecracker's examples
    /// do, so a MAC seen in a log names its VM.
    pub fn guest_mac(&self) -> String {
        let [a, b, c, d] = self.guest.octets();
        format!("06:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
    }
}

/// One allowed destination: a CIDR, optionally a single TCP/UDP port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EgressRule {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub port: Option<u16>,
}

impl FromStr for EgressRule {
    type Err = NetError;

    /// Parses `CIDR` or `CIDR:PORT` (`1.2.3.4` alone means `/32`).
    fn from_str(value: &str) -> Result<Self, NetError> {
        let invalid = || NetError::InvalidRule {
            value: value.to_string(),
        };
        let (cidr, port) = match value.split_once(':') {
            Some((cidr, port)) => (cidr, Some(port.parse::<u16>().map_err(|_| invalid())?)),
            None => (value, None),
        };
        let (addr, prefix) = match cidr.split_once('/') {
            Some((addr, prefix)) => (addr, prefix.parse::<u8>().map_err(|_| invalid())?),
            None => (cidr, 32),
        };
        let network: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        if prefix > 32 || port == Some(0) {
            return Err(invalid());
        }
        Ok(EgressRule {
            network: Ipv4Addr::from(u32::from(network) & mask(prefix)),
            prefix,
            port,
        })
    }
}

impl EgressRule {
    /// The protocols and port the rule names: the whole network, or TCP and UDP on its port.
    fn ports(&self) -> Vec<Option<(&'static str, u16)>> {
        match self.port {
            None => vec![None],
            Some(port) => vec![Some(("tcp", port)), Some(("udp", port))],
        }
    }

    /// The rule as nftables matches (`ip daddr CIDR [PROTO dport PORT]`).
    fn nft_matches(&self) -> Vec<String> {
        let dest = format!("ip daddr {}/{}", self.network, self.prefix);
        let with = |port| match port {
            None => dest.clone(),
            Some((proto, port)) => format!("{dest} {proto} dport {port}"),
        };
        self.ports().into_iter().map(with).collect()
    }

    /// The rule as iptables matches (`-d CIDR [-p PROTO --dport PORT]`).
    fn iptables_matches(&self) -> Vec<String> {
        let dest = format!("-d {}/{}", self.network, self.prefix);
        let with = |port| match port {
            None => dest.clone(),
            Some((proto, port)) => format!("{dest} -p {proto} --dport {port}"),
        };
        self.ports().into_iter().map(with).collect()
    }
}

impl TryFrom<String> for EgressRule {
    type Error = NetError;
    fn try_from(value: String) -> Result<Self, NetError> {
        value.parse()
    }
}

impl From<EgressRule> for String {
    fn from(rule: EgressRule) -> String {
        rule.to_string()
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// What the guest may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// The one TCP port of the host (at [`VmAddresses::host_veth`]) the guest may connect to:
    /// the node agent's VM-facing listener. No other address or port of the host is reachable.
    #[serde(default)]
    pub host_port: Option<u16>,
    /// `None`: every destination outside the blocked ranges is allowed. `Some`: only these
    /// (plus the DNS servers on port 53); a blocked destination stays blocked even when listed,
    /// unless it is also in [`EgressPolicy::allow_private`].
    #[serde(default)]
    pub allow: Option<Vec<EgressRule>>,
    /// The operator's exceptions to the blocked ranges ([`BLOCKED_V4`], the pool): e.g. a
    /// registry mirror on the LAN, `10.1.2.0/24:5000`. They never open the host's own
    /// addresses.
    #[serde(default)]
    pub allow_private: Vec<EgressRule>,
    /// TCP connections the guest opens to these addresses go to the host's listener
    /// ([`EgressPolicy::host_port`] at [`VmAddresses::host_veth`]) instead (DNAT in the VM's
    /// namespace): the registries the node mirrors.
    #[serde(default)]
    pub redirect_to_host: Vec<std::net::SocketAddrV4>,
}

/// The network part of a VM's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// This VM's slot in the pool; the caller keeps slots unique among running VMs.
    pub slot: u32,
    #[serde(default)]
    pub egress: EgressPolicy,
    /// Resolvers given to the guest (at most two are used).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// Everything needed to build one VM's network, computed without touching the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    /// `bvm-<id>`: the namespace name, the host veth's alias and the comment on host rules.
    pub tag: String,
    pub host_veth: String,
    pub addresses: VmAddresses,
    pub pool: AddressPool,
    pub spec: NetworkSpec,
    /// Owner of the TAP (the jailed Firecracker's uid); `None` leaves it to root.
    pub tap_owner: Option<u32>,
}

/// A host step and the step that undoes it.
type Step = (HostOp, Option<HostOp>);

impl NetworkPlan {
    pub fn new(
        tag: &str,
        pool: AddressPool,
        spec: NetworkSpec,
        tap_owner: Option<u32>,
    ) -> Result<Self, NetError> {
        let addresses = pool.addresses(spec.slot)?;
        if spec.egress.host_port.is_none() && !spec.egress.redirect_to_host.is_empty() {
            return Err(NetError::RedirectWithoutListener {
                redirects: spec.egress.redirect_to_host.clone(),
            });
        }
        Ok(NetworkPlan {
            tag: tag.to_string(),
            host_veth: format!("{HOST_VETH_PREFIX}{:08x}", u32::from(addresses.host_veth)),
            addresses,
            pool,
            spec,
            tap_owner,
        })
    }

    /// Path of the namespace, as the jailer's `--netns` wants it.
    pub fn netns_path(&self) -> String {
        format!("{NETNS_RUN_DIR}/{}", self.tag)
    }

    /// The kernel `ip=` parameter for this VM.
    pub fn kernel_ip_param(&self) -> String {
        self.addresses.kernel_ip_param(&self.spec.dns)
    }

    /// The destinations the guest may not reach ([`BLOCKED_V4`] and the pool), unless excepted.
    fn blocked_v4(&self) -> Vec<(Ipv4Addr, u8)> {
        let mut blocked = BLOCKED_V4.to_vec();
        blocked.push((self.pool.network, self.pool.prefix));
        blocked
    }

    /// What passes the blocked ranges before they are checked: the resolvers on port 53 (the
    /// guest is given at most two), then the operator's exceptions.
    fn exceptions(&self) -> Vec<EgressRule> {
        let resolvers = self.spec.dns.iter().take(2).map(|&dns| EgressRule {
            network: dns,
            prefix: 32,
            port: Some(DNS_PORT),
        });
        resolvers
            .chain(self.spec.egress.allow_private.iter().cloned())
            .collect()
    }

    /// The namespace's firewall: one nftables table [`NETNS_TABLE`] loaded with one `nft -f -`
    /// (one kernel transaction; `iptables-restore` in a fresh namespace took 20-45 ms here, `nft`
    /// about 6), family `inet` so IPv6 is filtered too. `forward` drops by default; the guest
    /// gets the host port, then its resolvers and the operator's exceptions go to `egress`, the
    /// blocked ranges (and the pool) are dropped, and the rest goes to `egress`, which accepts
    /// everything or only the build's allowlist. `input` keeps the guest off the namespace
    /// itself, `postrouting` masquerades on the veth. With registry redirects, `prerouting`
    /// first DNATs the guest's TCP connections to them to the listener.
    pub fn netns_rules(&self) -> String {
        let tap = format!("iifname \"{TAP}\"");
        let mut forward = vec!["ct state established,related accept".to_string()];
        if let Some(port) = self.spec.egress.host_port {
            forward.push(format!(
                "{tap} ip daddr {}/32 tcp dport {port} accept",
                self.addresses.host_veth
            ));
        }
        for rule in self.exceptions() {
            forward.extend(
                rule.nft_matches()
                    .into_iter()
                    .map(|m| format!("{tap} {m} goto egress")),
            );
        }
        forward.push(format!("{tap} ip daddr @blocked4 drop"));
        forward.push(format!("{tap} ip6 daddr @blocked6 drop"));
        forward.push(format!("{tap} goto egress"));
        let egress: Vec<String> = match &self.spec.egress.allow {
            None => vec!["accept".to_string()],
            Some(rules) => rules
                .iter()
                .flat_map(EgressRule::nft_matches)
                .map(|m| format!("{m} accept"))
                .collect(),
        };
        let set = |name: &str, kind: &str, elements: Vec<String>| {
            format!(
                "  set {name} {{\n    type {kind}; flags interval; auto-merge;\n    \
                 elements = {{ {} }}\n  }}\n",
                elements.join(", ")
            )
        };
        let chain = |name: &str, head: Option<&str>, rules: &[String]| {
            let mut text = format!("  chain {name} {{\n");
            for line in head
                .into_iter()
                .map(str::to_string)
                .chain(rules.iter().cloned())
            {
                text.push_str(&format!("    {line}\n"));
            }
            text + "  }\n"
        };
        let redirects = match self.spec.egress.host_port {
            Some(port) if !self.spec.egress.redirect_to_host.is_empty() => chain(
                "prerouting",
                Some("type nat hook prerouting priority dstnat; policy accept;"),
                &self
                    .spec
                    .egress
                    .redirect_to_host
                    .iter()
                    .map(|to| {
                        format!(
                            "{tap} ip daddr {} tcp dport {} dnat ip to {}:{port}",
                            to.ip(),
                            to.port(),
                            self.addresses.host_veth
                        )
                    })
                    .collect::<Vec<_>>(),
            ),
            _ => String::new(),
        };
        [
            format!("table inet {NETNS_TABLE} {{\n"),
            set(
                "blocked4",
                "ipv4_addr",
                self.blocked_v4()
                    .iter()
                    .map(|(net, prefix)| format!("{net}/{prefix}"))
                    .collect(),
            ),
            set(
                "blocked6",
                "ipv6_addr",
                BLOCKED_V6
                    .iter()
                    .map(|(net, prefix)| format!("{net}/{prefix}"))
                    .collect(),
            ),
            chain(
                "input",
                Some("type filter hook input priority filter; policy accept;"),
                &[
                    format!("{tap} ct state established,related accept"),
                    format!("{tap} drop"),
                ],
            ),
            chain(
                "forward",
                Some("type filter hook forward priority filter; policy drop;"),
                &forward,
            ),
            chain("egress", None, &egress),
            redirects,
            chain(
                "postrouting",
                Some("type nat hook postrouting priority srcnat; policy accept;"),
                &[format!("oifname \"{NS_VETH}\" masquerade")],
            ),
            "}\n".to_string(),
        ]
        .concat()
    }

    /// The host-side rules as an `iptables-restore --noflush` script, each rule tagged with a
    /// comment; `add` makes them, otherwise the same script removes them.
    ///
    /// - `raw`: a chain named after the host veth, jumped to first in `PREROUTING` (before
    ///   conntrack and any DNAT) for packets from the veth: the listener port returns, every
    ///   other packet to an address of the host (or a broadcast address of its networks)
    ///   drops, whatever DNAT would make of it; the
    ///   resolvers and the operator's exceptions return, the blocked ranges and the pool drop.
    ///   It never accepts, so being first opens nothing.
    /// - `filter`: `FORWARD` accepts from the veth (and replies to it), appended: rules before
    ///   it (`DOCKER-USER`, the operator's) still decide first. `INPUT` drops from the veth but
    ///   the listener port, inserted on top (it matches only this veth).
    /// - `nat`: the namespace's address is masqueraded leaving the host.
    pub fn host_rules(&self, add: bool) -> String {
        let (hv, tag) = (&self.host_veth, &self.tag);
        let comment = format!("-m comment --comment {tag}");
        let host_port = self.spec.egress.host_port;
        let listener =
            |port: u16| format!("-d {}/32 -p tcp --dport {port}", self.addresses.host_veth);
        let mut text = String::from("*raw\n");
        if add {
            text.push_str(&format!(
                ":{hv} - [0:0]\n-I PREROUTING -i {hv} {comment} -j {hv}\n"
            ));
            let mut chain = vec![];
            if let Some(port) = host_port {
                chain.push(format!("{} {comment} -j RETURN", listener(port)));
            }
            chain.push(format!(
                "-m addrtype --dst-type LOCAL,BROADCAST {comment} -j DROP"
            ));
            for rule in self.exceptions() {
                chain.extend(
                    rule.iptables_matches()
                        .into_iter()
                        .map(|m| format!("{m} {comment} -j RETURN")),
                );
            }
            for (net, prefix) in self.blocked_v4() {
                chain.push(format!("-d {net}/{prefix} {comment} -j DROP"));
            }
            for rule in chain {
                text.push_str(&format!("-A {hv} {rule}\n"));
            }
        } else {
            text.push_str(&format!(
                "-D PREROUTING -i {hv} {comment} -j {hv}\n-F {hv}\n-X {hv}\n"
            ));
        }
        let (insert, append) = if add { ("-I", "-A") } else { ("-D", "-D") };
        text.push_str("COMMIT\n*filter\n");
        text.push_str(&format!("{append} FORWARD -i {hv} {comment} -j ACCEPT\n"));
        text.push_str(&format!(
            "{append} FORWARD -o {hv} -m conntrack --ctstate ESTABLISHED,RELATED {comment} \
             -j ACCEPT\n"
        ));
        text.push_str(&format!("{insert} INPUT -i {hv} {comment} -j DROP\n"));
        if let Some(port) = host_port {
            text.push_str(&format!(
                "{insert} INPUT -i {hv} {} {comment} -j ACCEPT\n",
                listener(port)
            ));
        }
        text.push_str("COMMIT\n*nat\n");
        text.push_str(&format!(
            "{append} POSTROUTING -s {}/32 ! -o {hv} {comment} -j MASQUERADE\nCOMMIT\n",
            self.addresses.ns_veth
        ));
        text
    }

    /// Every host step, in order, each with its undo. Steps that only touch the inside of the
    /// namespace need none: they go with it.
    pub fn steps(&self) -> Vec<Step> {
        let a = &self.addresses;
        let (ns, hv) = (self.tag.as_str(), self.host_veth.as_str());
        let inside = Some(ns.to_string());
        let net = HostOp::Net;
        let up = |netns: &Option<String>, name: &str| {
            net(NetOp::LinkUp {
                netns: netns.clone(),
                name: name.to_string(),
                alias: None,
            })
        };
        let address = |netns: &Option<String>, name: &str, address| {
            net(NetOp::AddressAdd {
                netns: netns.clone(),
                name: name.to_string(),
                address,
                prefix: 30,
            })
        };
        let restore = |add| {
            HostOp::Run(
                HostCommand::new("iptables-restore", ["-w", "--noflush"])
                    .with_stdin(self.host_rules(add)),
            )
        };
        let ip_forward = |netns: Option<&str>| {
            HostOp::Sysctl(Sysctl {
                key: "net.ipv4.ip_forward",
                value: "1",
                netns: netns.map(str::to_string),
            })
        };
        vec![
            (
                net(NetOp::NetnsAdd { name: ns.into() }),
                Some(net(NetOp::NetnsDelete { name: ns.into() })),
            ),
            (
                net(NetOp::VethAdd {
                    name: hv.into(),
                    peer: NS_VETH.into(),
                    peer_netns: ns.into(),
                }),
                Some(net(NetOp::LinkDelete { name: hv.into() })),
            ),
            (
                net(NetOp::LinkUp {
                    netns: None,
                    name: hv.into(),
                    alias: Some(ns.into()),
                }),
                None,
            ),
            (address(&None, hv, a.host_veth), None),
            (up(&inside, "lo"), None),
            (address(&inside, NS_VETH, a.ns_veth), None),
            (up(&inside, NS_VETH), None),
            (
                net(NetOp::TapAdd {
                    netns: inside.clone(),
                    name: TAP.into(),
                    owner: self.tap_owner,
                }),
                None,
            ),
            (address(&inside, TAP, a.gateway), None),
            (up(&inside, TAP), None),
            (
                net(NetOp::DefaultRoute {
                    netns: inside.clone(),
                    via: a.host_veth,
                }),
                None,
            ),
            (ip_forward(Some(ns)), None),
            (
                HostOp::Run(
                    HostCommand::new("nft", ["-f", "-"])
                        .with_stdin(self.netns_rules())
                        .in_netns(ns),
                ),
                None,
            ),
            (ip_forward(None), None),
            (restore(true), Some(restore(false))),
        ]
    }

    /// Runs every step, pushing each undo onto `stack` as soon as its resource exists.
    pub fn apply(&self, host: &Arc<dyn Host>, stack: &mut CleanupStack) -> Result<(), NetError> {
        for (op, undo) in self.steps() {
            op.apply(host.as_ref()).map_err(|source| NetError::Step {
                step: op.to_string(),
                source,
            })?;
            if let Some(undo) = undo {
                let host = host.clone();
                stack.push(undo.to_string(), move || {
                    undo.apply(host.as_ref()).map_err(Into::into)
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every command; fails the one whose text contains `fail_on`.
    #[derive(Debug, Default)]
    pub(crate) struct RecordingHost {
        pub calls: Mutex<Vec<String>>,
        pub fail_on: Option<&'static str>,
    }

    impl Host for RecordingHost {
        fn run(&self, command: &HostCommand) -> Result<String, HostError> {
            let mut text = command.to_string();
            if let Some(input) = &command.stdin {
                text = format!("{text}\n{input}");
            }
            self.calls.lock().unwrap().push(text.clone());
            if self.fail_on.is_some_and(|f| text.contains(f)) {
                return Err(HostError::Failed {
                    command: text,
                    status: "exit status: 2".into(),
                    stderr: "RTNETLINK answers: File exists".into(),
                });
            }
            Ok(String::new())
        }

        fn sysctl(&self, sysctl: &Sysctl) -> Result<(), HostError> {
            self.calls.lock().unwrap().push(sysctl.to_string());
            Ok(())
        }

        fn net(&self, op: &NetOp) -> Result<(), HostError> {
            let text = op.to_string();
            self.calls.lock().unwrap().push(text.clone());
            if self.fail_on.is_some_and(|f| text.contains(f)) {
                return Err(HostError::Net {
                    op: text,
                    source: std::io::Error::from_raw_os_error(libc::EEXIST),
                });
            }
            Ok(())
        }
    }

    fn spec(slot: u32) -> NetworkSpec {
        NetworkSpec {
            slot,
            egress: EgressPolicy {
                host_port: Some(8080),
                allow: None,
                allow_private: vec![],
                redirect_to_host: Vec::new(),
            },
            dns: vec![Ipv4Addr::new(1, 1, 1, 1)],
        }
    }

    #[test]
    fn slots_are_disjoint_29s() {
        let pool = AddressPool::default();
        assert_eq!(pool.slots(), 8192);
        let a = pool.addresses(0).unwrap();
        assert_eq!(a.host_veth, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a.ns_veth, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(a.gateway, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(a.guest, Ipv4Addr::new(10, 200, 0, 6));
        let last = pool.addresses(8191).unwrap();
        assert_eq!(last.guest, Ipv4Addr::new(10, 200, 255, 254));
        assert!(matches!(
            pool.addresses(8192),
            Err(NetError::SlotOutOfRange {
                slot: 8192,
                slots: 8192
            })
        ));
        let bad = AddressPool {
            network: Ipv4Addr::new(10, 200, 0, 1),
            prefix: 16,
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("host bits"));
    }

    #[test]
    fn kernel_ip_param_and_mac() {
        let a = AddressPool::default().addresses(3).unwrap();
        assert_eq!(
            a.kernel_ip_param(&[Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]),
            "ip=10.200.0.30::10.200.0.29:255.255.255.252::eth0:off:1.1.1.1:8.8.8.8"
        );
        assert_eq!(
            a.kernel_ip_param(&[]),
            "ip=10.200.0.30::10.200.0.29:255.255.255.252::eth0:off"
        );
        assert_eq!(a.guest_mac(), "06:00:0a:c8:00:1e");
    }

    #[test]
    fn egress_rules_parse() {
        let rule: EgressRule = "10.1.2.3/8:443".parse().unwrap();
        assert_eq!(rule.to_string(), "10.0.0.0/8:443");
        assert_eq!("1.2.3.4".parse::<EgressRule>().unwrap().prefix, 32);
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/8:0", "10.0.0.0/8:http"] {
            let err = bad.parse::<EgressRule>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn netns_rules_let_out_the_listener_resolvers_and_exceptions_then_block_private() {
        let mut spec = spec(1);
        spec.dns.push(Ipv4Addr::new(10, 0, 0, 2));
        spec.egress.allow_private = vec!["10.1.2.0/24:5000".parse().unwrap()];
        let plan = NetworkPlan::new("bvm-a", AddressPool::default(), spec.clone(), None).unwrap();
        assert_eq!(
            plan.netns_rules(),
            "table inet builder {\n  \
             set blocked4 {\n    \
             type ipv4_addr; flags interval; auto-merge;\n    \
             elements = { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
             172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4, \
             10.200.0.0/16 }\n  \
             }\n  \
             set blocked6 {\n    \
             type ipv6_addr; flags interval; auto-merge;\n    \
             elements = { ::/128, ::1/128, ::ffff:0.0.0.0/96, fc00::/7, fe80::/10, ff00::/8 }\n  \
             }\n  \
             chain input {\n    \
             type filter hook input priority filter; policy accept;\n    \
             iifname \"tap0\" ct state established,related accept\n    \
             iifname \"tap0\" drop\n  \
             }\n  \
             chain forward {\n    \
             type filter hook forward priority filter; policy drop;\n    \
             ct state established,related accept\n    \
             iifname \"tap0\" ip daddr 10.200.0.9/32 tcp dport 8080 accept\n    \
             iifname \"tap0\" ip daddr 1.1.1.1/32 tcp dport 53 goto egress\n    \
             iifname \"tap0\" ip daddr 1.1.1.1/32 udp dport 53 goto egress\n    \
             iifname \"tap0\" ip daddr 10.0.0.2/32 tcp dport 53 goto egress\n    \
             iifname \"tap0\" ip daddr 10.0.0.2/32 udp dport 53 goto egress\n    \
             iifname \"tap0\" ip daddr 10.1.2.0/24 tcp dport 5000 goto egress\n    \
             iifname \"tap0\" ip daddr 10.1.2.0/24 udp dport 5000 goto egress\n    \
             iifname \"tap0\" ip daddr @blocked4 drop\n    \
             iifname \"tap0\" ip6 daddr @blocked6 drop\n    \
             iifname \"tap0\" goto egress\n  \
             }\n  \
             chain egress {\n    \
             accept\n  \
             }\n  \
             chain postrouting {\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"veth0\" masquerade\n  \
             }\n\
             }\n"
        );

        // An allowlist narrows what passes; a private entry in it is still blocked, as the
        // blocked ranges come first.
        spec.egress.allow = Some(vec![
            "192.0.2.0/24:443".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
        ]);
        let plan = NetworkPlan::new("bvm-a", AddressPool::default(), spec, None).unwrap();
        let rules = plan.netns_rules();
        assert!(
            rules.contains(
                "  chain egress {\n    \
                 ip daddr 192.0.2.0/24 tcp dport 443 accept\n    \
                 ip daddr 192.0.2.0/24 udp dport 443 accept\n    \
                 ip daddr 10.9.0.0/16 accept\n  }\n"
            ),
            "{rules}"
        );
        let blocked = rules.find("ip daddr @blocked4 drop").unwrap();
        assert!(rules.find("goto egress\n  }").unwrap() > blocked, "{rules}");
    }

    #[test]
    fn redirects_dnat_the_guests_tcp_to_the_listener_and_need_one() {
        let mut spec = spec(1);
        spec.egress.redirect_to_host = vec![
            "198.18.0.2:5000".parse().unwrap(),
            "10.1.2.3:443".parse().unwrap(),
        ];
        let plan = NetworkPlan::new("bvm-a", AddressPool::default(), spec.clone(), None).unwrap();
        let rules = plan.netns_rules();
        let prerouting = "  chain prerouting {\n    \
             type nat hook prerouting priority dstnat; policy accept;\n    \
             iifname \"tap0\" ip daddr 198.18.0.2 tcp dport 5000 dnat ip to 10.200.0.9:8080\n    \
             iifname \"tap0\" ip daddr 10.1.2.3 tcp dport 443 dnat ip to 10.200.0.9:8080\n  \
             }\n";
        assert!(rules.contains(prerouting), "{rules}");
        // Nothing else changes: the filter sees the listener after the DNAT.
        let plain = NetworkPlan::new("bvm-a", AddressPool::default(), self::spec(1), None)
            .unwrap()
            .netns_rules();
        assert_eq!(rules.replace(prerouting, ""), plain);

        spec.egress.host_port = None;
        let err = NetworkPlan::new("bvm-a", AddressPool::default(), spec, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the egress policy redirects [198.18.0.2:5000, 10.1.2.3:443] to the host's \
             listener but names no host_port for it"
        );
    }

    #[test]
    fn host_rules_drop_in_raw_before_dnat_and_append_the_forward_accept() {
        let mut spec = spec(1);
        spec.egress.allow_private = vec!["10.1.2.3".parse().unwrap()];
        let plan = NetworkPlan::new("bvm-a", AddressPool::default(), spec, None).unwrap();
        let c = "-m comment --comment bvm-a";
        let blocked: String = plan
            .blocked_v4()
            .iter()
            .map(|(net, prefix)| format!("-A bvh-0ac80009 -d {net}/{prefix} {c} -j DROP\n"))
            .collect();
        assert_eq!(
            plan.host_rules(true),
            format!(
                "*raw\n\
                 :bvh-0ac80009 - [0:0]\n\
                 -I PREROUTING -i bvh-0ac80009 {c} -j bvh-0ac80009\n\
                 -A bvh-0ac80009 -d 10.200.0.9/32 -p tcp --dport 8080 {c} -j RETURN\n\
                 -A bvh-0ac80009 -m addrtype --dst-type LOCAL,BROADCAST {c} -j DROP\n\
                 -A bvh-0ac80009 -d 1.1.1.1/32 -p tcp --dport 53 {c} -j RETURN\n\
                 -A bvh-0ac80009 -d 1.1.1.1/32 -p udp --dport 53 {c} -j RETURN\n\
                 -A bvh-0ac80009 -d 10.1.2.3/32 {c} -j RETURN\n\
                 {blocked}\
                 COMMIT\n\
                 *filter\n\
                 -A FORWARD -i bvh-0ac80009 {c} -j ACCEPT\n\
                 -A FORWARD -o bvh-0ac80009 -m conntrack --ctstate ESTABLISHED,RELATED {c} \
                 -j ACCEPT\n\
                 -I INPUT -i bvh-0ac80009 {c} -j DROP\n\
                 -I INPUT -i bvh-0ac80009 -d 10.200.0.9/32 -p tcp --dport 8080 {c} -j ACCEPT\n\
                 COMMIT\n\
                 *nat\n\
                 -A POSTROUTING -s 10.200.0.10/32 ! -o bvh-0ac80009 {c} -j MASQUERADE\n\
                 COMMIT\n"
            )
        );
        assert!(blocked.contains("-d 10.200.0.0/16 "), "the pool: {blocked}");
        assert_eq!(
            plan.host_rules(false),
            format!(
                "*raw\n\
                 -D PREROUTING -i bvh-0ac80009 {c} -j bvh-0ac80009\n\
                 -F bvh-0ac80009\n\
                 -X bvh-0ac80009\n\
                 COMMIT\n\
                 *filter\n\
                 -D FORWARD -i bvh-0ac80009 {c} -j ACCEPT\n\
                 -D FORWARD -o bvh-0ac80009 -m conntrack --ctstate ESTABLISHED,RELATED {c} \
                 -j ACCEPT\n\
                 -D INPUT -i bvh-0ac80009 {c} -j DROP\n\
                 -D INPUT -i bvh-0ac80009 -d 10.200.0.9/32 -p tcp --dport 8080 {c} -j ACCEPT\n\
                 COMMIT\n\
                 *nat\n\
                 -D POSTROUTING -s 10.200.0.10/32 ! -o bvh-0ac80009 {c} -j MASQUERADE\n\
                 COMMIT\n"
            )
        );
    }

    #[test]
    fn apply_records_every_step_and_stacks_undos_in_order() {
        let recorder = Arc::new(RecordingHost::default());
        let host: Arc<dyn Host> = recorder.clone();
        let plan = NetworkPlan::new("bvm-a", AddressPool::default(), spec(1), Some(10000)).unwrap();
        let mut stack = CleanupStack::new();
        plan.apply(&host, &mut stack).unwrap();
        let calls = recorder.calls.lock().unwrap().clone();
        assert_eq!(
            calls[..15],
            [
                "ip netns add bvm-a",
                "ip link add bvh-0ac80009 type veth peer name veth0 netns bvm-a",
                "ip link set dev bvh-0ac80009 alias bvm-a up",
                "ip addr add 10.200.0.9/30 dev bvh-0ac80009",
                "[netns bvm-a] ip link set dev lo up",
                "[netns bvm-a] ip addr add 10.200.0.10/30 dev veth0",
                "[netns bvm-a] ip link set dev veth0 up",
                "[netns bvm-a] ip tuntap add dev tap0 mode tap user 10000",
                "[netns bvm-a] ip addr add 10.200.0.13/30 dev tap0",
                "[netns bvm-a] ip link set dev tap0 up",
                "[netns bvm-a] ip route add default via 10.200.0.9",
                "[netns bvm-a] sysctl net.ipv4.ip_forward=1",
                &format!("[netns bvm-a] nft -f - <stdin>\n{}", plan.netns_rules()),
                "sysctl net.ipv4.ip_forward=1",
                &format!(
                    "iptables-restore -w --noflush <stdin>\n{}",
                    plan.host_rules(true)
                ),
            ]
        );
        assert_eq!(calls.len(), 15);
        // netns, veth, host rules.
        assert_eq!(stack.len(), 3);
        recorder.calls.lock().unwrap().clear();
        stack.run().unwrap();
        let undone = recorder.calls.lock().unwrap().clone();
        assert_eq!(undone.len(), 3);
        assert_eq!(
            undone[0],
            format!(
                "iptables-restore -w --noflush <stdin>\n{}",
                plan.host_rules(false)
            )
        );
        assert_eq!(undone[1], "ip link delete bvh-0ac80009");
        assert_eq!(undone[2], "ip netns delete bvm-a");
    }

    #[test]
    fn a_failed_step_leaves_only_the_undos_of_what_exists() {
        let recorder = Arc::new(RecordingHost {
            fail_on: Some("tuntap"),
            ..Default::default()
        });
        let host: Arc<dyn Host> = recorder.clone();
        let plan = NetworkPlan::new("bvm-a", AddressPool::default(), spec(1), None).unwrap();
        let mut stack = CleanupStack::new();
        let err = plan.apply(&host, &mut stack).unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting up the VM network failed at `[netns bvm-a] ip tuntap add dev tap0 mode tap`"
        );
        assert_eq!(stack.len(), 2, "{stack:?}");
    }
}
