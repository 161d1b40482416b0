//! Links, addresses, routes and named network namespaces changed in-process, over rtnetlink
//! and `/dev/net/tun`, instead of one `ip` process each (each spawn cost 2-6 ms on the 2-core
//! benchmark host; a request here costs tens of microseconds). A [`NetOp`] is what `ip` would
//! have been told, and shows as that command; [`apply`] performs it in the calling thread's
//! network namespace (see [`crate::host`] for running it inside another).
//!
//! Named namespaces follow `ip netns`: a bind mount of the namespace on
//! `/var/run/netns/<name>`, that directory being a shared mount point, so `ip netns`, the
//! jailer's `--netns` and [`crate::reclaim`] see them as if `ip` had made them.

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::host::NETNS_RUN_DIR;

// Netlink protocol numbers (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
// linux/if_addr.h, linux/veth.h).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// `sizeof(struct ifinfomsg)`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;

/// One change to the host's (or a namespace's) network, as `ip` would be told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    /// `ip netns add NAME`.
    NetnsAdd { name: String },
    /// `ip netns delete NAME`.
    NetnsDelete { name: String },
    /// `ip link add NAME type veth peer name PEER netns PEER_NETNS`.
    VethAdd {
        name: String,
        peer: String,
        peer_netns: String,
    },
    /// `ip link delete NAME` (its veth peer goes with it).
    LinkDelete { name: String },
    /// `ip link set dev NAME [alias ALIAS] up`.
    LinkUp {
        netns: Option<String>,
        name: String,
        alias: Option<String>,
    },
    /// `ip addr add ADDRESS/PREFIX dev NAME`.
    AddressAdd {
        netns: Option<String>,
        name: String,
        address: Ipv4Addr,
        prefix: u8,
    },
    /// `ip tuntap add dev NAME mode tap [user OWNER]`: a persistent TAP.
    TapAdd {
        netns: Option<String>,
        name: String,
        owner: Option<u32>,
    },
    /// `ip route add default via VIA`.
    DefaultRoute {
        netns: Option<String>,
        via: Ipv4Addr,
    },
}

impl NetOp {
    /// The named namespace the operation works in; `None`: the host's.
    pub fn netns(&self) -> Option<&str> {
        match self {
            NetOp::LinkUp { netns, .. }
            | NetOp::AddressAdd { netns, .. }
            | NetOp::TapAdd { netns, .. }
            | NetOp::DefaultRoute { netns, .. } => netns.as_deref(),
            NetOp::NetnsAdd { .. }
            | NetOp::NetnsDelete { .. }
            | NetOp::VethAdd { .. }
            | NetOp::LinkDelete { .. } => None,
        }
    }
}

impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(netns) = self.netns() {
            write!(f, "[netns {netns}] ")?;
        }
        match self {
            NetOp::NetnsAdd { name } => write!(f, "ip netns add {name}"),
            NetOp::NetnsDelete { name } => write!(f, "ip netns delete {name}"),
            NetOp::VethAdd {
                name,
                peer,
                peer_netns,
            } => write!(
                f,
                "ip link add {name} type veth peer name {peer} netns {peer_netns}"
            ),
            NetOp::LinkDelete { name } => write!(f, "ip link delete {name}"),
            NetOp::LinkUp { name, alias, .. } => {
                write!(f, "ip link set dev {name}")?;
                if let Some(alias) = alias {
                    write!(f, " alias {alias}")?;
                }
                write!(f, " up")
            }
            NetOp::AddressAdd {
                name,
                address,
                prefix,
                ..
            } => write!(f, "ip addr add {address}/{prefix} dev {name}"),
            NetOp::TapAdd { name, owner, .. } => {
                write!(f, "ip tuntap add dev {name} mode tap")?;
                if let Some(uid) = owner {
                    write!(f, " user {uid}")?;
                }
                Ok(())
            }
            NetOp::DefaultRoute { via, .. } => write!(f, "ip route add default via {via}"),
        }
    }
}

/// Performs `op` in the calling thread's network namespace (its `netns` is the caller's
/// business), except [`NetOp::NetnsAdd`], which makes a new one.
pub fn apply(op: &NetOp) -> io::Result<()> {
    match op {
        NetOp::NetnsAdd { name } => netns_add(name),
        NetOp::NetnsDelete { name } => netns_delete(name),
        NetOp::VethAdd {
            name,
            peer,
            peer_netns,
        } => {
            let netns = File::open(Path::new(NETNS_RUN_DIR).join(peer_netns))?;
            let mut request =
                Request::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &[0; IFINFOMSG_LEN]);
            request.attr(IFLA_IFNAME, &c_string(name)?);
            request.begin(IFLA_LINKINFO);
            request.attr(IFLA_INFO_KIND, b"veth");
            request.begin(IFLA_INFO_DATA);
            request.begin(VETH_INFO_PEER);
            request.raw(&[0; IFINFOMSG_LEN]);
            request.attr(IFLA_IFNAME, &c_string(peer)?);
            request.attr(IFLA_NET_NS_FD, &(netns.as_raw_fd() as u32).to_ne_bytes());
            request.end();
            request.end();
            request.end();
            request.send()
        }
        NetOp::LinkDelete { name } => {
            let mut request = Request::new(RTM_DELLINK, 0, &[0; IFINFOMSG_LEN]);
            request.attr(IFLA_IFNAME, &c_string(name)?);
            request.send()
        }
        NetOp::LinkUp { name, alias, .. } => {
            let up = libc::IFF_UP as u32;
            let mut header = [0; IFINFOMSG_LEN];
            header[8..12].copy_from_slice(&up.to_ne_bytes()); // flags
            header[12..16].copy_from_slice(&up.to_ne_bytes()); // change
            let mut request = Request::new(RTM_NEWLINK, 0, &header);
            request.attr(IFLA_IFNAME, &c_string(name)?);
            if let Some(alias) = alias {
                request.attr(IFLA_IFALIAS, alias.as_bytes());
            }
            request.send()
        }
        NetOp::AddressAdd {
            name,
            address,
            prefix,
            ..
        } => {
            let index = if_index(name)?;
            // struct ifaddrmsg: family, prefixlen, flags, scope, index.
            let mut header = vec![libc::AF_INET as u8, *prefix, 0, RT_SCOPE_UNIVERSE];
            header.extend(index.to_ne_bytes());
            let mut request = Request::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &header);
            request.attr(IFA_LOCAL, &address.octets());
            request.attr(IFA_ADDRESS, &address.octets());
            request.send()
        }
        NetOp::TapAdd { name, owner, .. } => tap_add(name, *owner),
        NetOp::DefaultRoute { via, .. } => {
            // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
            let mut header = vec![
                libc::AF_INET as u8,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST,
            ];
            header.extend(0u32.to_ne_bytes());
            let mut request = Request::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &header);
            request.attr(RTA_GATEWAY, &via.octets());
            request.send()
        }
    }
}

fn c_string(name: &str) -> io::Result<Vec<u8>> {
    CString::new(name)
        .map(CString::into_bytes_with_nul)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in an interface name"))
}

fn if_index(name: &str) -> io::Result<u32> {
    let name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in an interface name"))?;
    // SAFETY: a NUL-terminated string; the call resolves it in this thread's namespace.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn path_c_string(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

/// `mount(2)` with an optional source and no data.
fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let source = source.map(path_c_string).transpose()?;
    let target = path_c_string(target)?;
    // SAFETY: NUL-terminated paths (or null, for a propagation change), a static fstype.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(c"none".as_ptr(), |s| s.as_ptr()),
            target.as_ptr(),
            c"none".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    check(rc).map(drop)
}

/// Makes `/var/run/netns` a shared mount point (bind-mounting it on itself the first time),
/// as `ip netns add` does, so a namespace mounted there later shows in every mount namespace.
fn share_run_dir() -> io::Result<()> {
    let dir = Path::new(NETNS_RUN_DIR);
    fs::create_dir_all(dir)?;
    match mount(None, dir, libc::MS_SHARED | libc::MS_REC) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(Some(dir), dir, libc::MS_BIND | libc::MS_REC)?;
            mount(None, dir, libc::MS_SHARED | libc::MS_REC)
        }
        other => other,
    }
}

fn netns_add(name: &str) -> io::Result<()> {
    share_run_dir()?;
    let path = Path::new(NETNS_RUN_DIR).join(name);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)?;
    // A new thread unshares its network namespace and pins it with the bind mount; the
    // namespace then outlives the thread.
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare only changes this thread, which ends right after.
                check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
                mount(
                    Some(Path::new("/proc/thread-self/ns/net")),
                    &path,
                    libc::MS_BIND,
                )
            })
            .join()
            .expect("the namespace thread does not panic")
    });
    if made.is_err() {
        let _ = fs::remove_file(&path);
    }
    made
}

fn netns_delete(name: &str) -> io::Result<()> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let target = path_c_string(&path)?;
    // SAFETY: a NUL-terminated path.
    if let Err(e) = check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }) {
        // Not mounted (a half-made namespace): the file still goes.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    fs::remove_file(&path)
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `/dev/net/tun` attached to the TAP `name` (made when missing), as `IFF_TAP | IFF_NO_PI`,
/// plus `IFF_VNET_HDR` for a VMM that passes virtio-net headers through it (QEMU). The one
/// place both the TAP's creation and QEMU's open of it go through.
pub(crate) fn tap_open(name: &str, vnet_hdr: bool) -> io::Result<File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq we own.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) })?;
    Ok(tun)
}

fn tap_add(name: &str, owner: Option<u32>) -> io::Result<()> {
    let tun = tap_open(name, false)?;
    let fd = tun.as_raw_fd();
    // SAFETY: TUNSETOWNER and TUNSETPERSIST take an integer.
    unsafe {
        if let Some(uid) = owner {
            check(libc::ioctl(fd, libc::TUNSETOWNER, uid as libc::c_ulong))?;
        }
        check(libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong))?;
    }
    Ok(())
}

/// One rtnetlink request being built: the header, a family header, attributes.
struct Request {
    buf: Vec<u8>,
    /// Offsets of the nested attributes still open.
    open: Vec<usize>,
}

impl Request {
    fn new(kind: u16, flags: u16, header: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend(0u32.to_ne_bytes()); // nlmsg_len, set by send
        buf.extend(kind.to_ne_bytes());
        buf.extend((flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend(1u32.to_ne_bytes()); // nlmsg_seq
        buf.extend(0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        let mut request = Request { buf, open: vec![] };
        request.raw(header);
        request
    }

    /// Appends bytes, padded to netlink's 4-byte alignment.
    fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        self.buf.extend(((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.raw(data);
    }

    /// Opens a nested attribute; [`Request::end`] closes it.
    fn begin(&mut self, kind: u16) {
        self.open.push(self.buf.len());
        self.attr(kind, &[]);
    }

    fn end(&mut self) {
        let start = self.open.pop().expect("an open nested attribute");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Sends the request on a new NETLINK_ROUTE socket of this thread's namespace and waits
    /// for the kernel's acknowledgement.
    fn send(mut self) -> io::Result<()> {
        assert!(self.open.is_empty(), "nested attributes left open");
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: plain socket(2); the fd is owned right away.
        let socket = unsafe {
            OwnedFd::from_raw_fd(check(libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            ))?)
        };
        // SAFETY: sockaddr_nl is plain data; zero is the kernel's address.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: a valid buffer and address of the stated lengths.
        check(unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                self.buf.as_ptr().cast(),
                self.buf.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            ) as libc::c_int
        })?;
        let mut reply = [0u8; 4096];
        // SAFETY: a valid buffer of the stated length.
        let n = check(unsafe {
            libc::recv(
                socket.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
            ) as libc::c_int
        })? as usize;
        // struct nlmsghdr (16 bytes), then for NLMSG_ERROR the (negative) errno.
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        if n < 20 || kind != NLMSG_ERROR {
            return Err(io::Error::other(format!(
                "unexpected netlink reply (type {kind}, {n} bytes)"
            )));
        }
        match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(-errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_read_as_the_ip_commands_they_replace() {
        let ns = Some("bvm-a".to_string());
        let ops = [
            NetOp::VethAdd {
                name: "bvh-1".into(),
                peer: "veth0".into(),
                peer_netns: "bvm-a".into(),
            },
            NetOp::LinkUp {
                netns: None,
                name: "bvh-1".into(),
                alias: Some("bvm-a".into()),
            },
            NetOp::AddressAdd {
                netns: ns.clone(),
                name: "veth0".into(),
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 30,
            },
            NetOp::TapAdd {
                netns: ns.clone(),
                name: "tap0".into(),
                owner: Some(123),
            },
            NetOp::DefaultRoute {
                netns: ns,
                via: Ipv4Addr::new(10, 0, 0, 1),
            },
        ];
        let text: Vec<String> = ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "ip link add bvh-1 type veth peer name veth0 netns bvm-a",
                "ip link set dev bvh-1 alias bvm-a up",
                "[netns bvm-a] ip addr add 10.0.0.2/30 dev veth0",
                "[netns bvm-a] ip tuntap add dev tap0 mode tap user 123",
                "[netns bvm-a] ip route add default via 10.0.0.1",
            ]
        );
    }

    #[test]
    fn nested_attributes_are_sized_and_aligned() {
        let mut request = Request::new(RTM_NEWLINK, NLM_F_CREATE, &[0; IFINFOMSG_LEN]);
        request.attr(IFLA_IFNAME, b"ab\0");
        request.begin(IFLA_LINKINFO);
        request.attr(IFLA_INFO_KIND, b"veth");
        request.end();
        let buf = &request.buf;
        // nlmsghdr 16 + ifinfomsg 16, then "ab\0" padded to 8, then the nest: 4 + (4 + 4).
        assert_eq!(buf.len(), 16 + 16 + 8 + 12);
        assert_eq!(&buf[32..36], &[7, 0, 3, 0]);
        assert_eq!(&buf[40..44], &[12, 0, 18, 0]);
        assert_eq!(&buf[44..48], &[8, 0, 1, 0]);
        assert_eq!(&buf[48..52], b"veth");
        let flags = u16::from_ne_bytes([buf[6], buf[7]]);
        assert_eq!(flags, NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK);
    }
}
