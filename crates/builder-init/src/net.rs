//! Hostname and network: `lo` up, and `eth0` from the kernel's `ip=` parameter
//! (`ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`),
//! through the classic `ioctl`s so no tool from the image is needed. A kernel with
//! `CONFIG_IP_PNP` has already done the same; doing it again is harmless.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub netmask: Ipv4Addr,
    pub hostname: Option<String>,
    pub device: String,
    pub dns: Vec<Ipv4Addr>,
}

impl IpConfig {
    /// The static configuration in `ip=`, if the command line has one (`dhcp` etc. are not ours).
    pub fn from_cmdline(cmdline: &str) -> Option<Self> {
        let value = cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix("ip="))?;
        let fields: Vec<&str> = value.split(':').collect();
        let address = fields.first()?.parse().ok()?;
        let field = |i: usize| fields.get(i).copied().filter(|f| !f.is_empty());
        Some(IpConfig {
            address,
            gateway: field(2).and_then(|g| g.parse().ok()),
            netmask: field(3)
                .and_then(|m| m.parse().ok())
                .unwrap_or(Ipv4Addr::new(255, 255, 255, 0)),
            hostname: field(4).map(str::to_string),
            device: field(5).unwrap_or("eth0").to_string(),
            dns: [field(7), field(8)]
                .into_iter()
                .flatten()
                .filter_map(|d| d.parse().ok())
                .collect(),
        })
    }
}

pub fn set_hostname(name: &str) -> Result<(), String> {
    // SAFETY: pointer and length describe `name`.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(format!(
            "cannot set the hostname: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Linux's `struct rtentry` (the libc crate has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor we own.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(device: &str) -> Result<libc::ifreq, String> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if device.len() >= req.ifr_name.len() {
        return Err(format!("the interface name `{device}` is too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(device.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl<T>(
    socket: &Socket,
    request: libc::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<(), String> {
    // SAFETY: `arg` is the structure this request expects.
    let rc = unsafe { libc::ioctl(socket.0, request as _, arg as *mut T) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // EEXIST: the kernel's own ip= autoconfiguration already added the route.
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("{what}: {err}"));
        }
    }
    Ok(())
}

fn bring_up(socket: &Socket, device: &str) -> Result<(), String> {
    let mut req = ifreq(device)?;
    ioctl(
        socket,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("cannot read the flags of {device}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        socket,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("cannot bring {device} up"),
    )
}

/// Brings `lo` up and, when given, configures the `ip=` interface, its default route and DNS.
pub fn configure(ip: Option<&IpConfig>) -> Result<(), String> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "cannot open a socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let socket = Socket(fd);
    bring_up(&socket, "lo")?;
    let Some(ip) = ip else { return Ok(()) };
    let mut req = ifreq(&ip.device)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip.address);
    ioctl(
        &socket,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("cannot set the address of {}", ip.device),
    )?;
    let mut req = ifreq(&ip.device)?;
    req.ifr_ifru.ifru_netmask = sockaddr(ip.netmask);
    ioctl(
        &socket,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("cannot set the netmask of {}", ip.device),
    )?;
    bring_up(&socket, &ip.device)?;
    if let Some(gateway) = ip.gateway {
        let mut device = std::ffi::CString::new(ip.device.as_str())
            .map_err(|_| "the interface name has a NUL".to_string())?
            .into_bytes_with_nul();
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gateway),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: device.as_mut_ptr().cast(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        ioctl(
            &socket,
            libc::SIOCADDRT,
            &mut route,
            &format!("cannot add the default route via {gateway}"),
        )?;
    }
    if !ip.dns.is_empty() {
        let text: String = ip.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        // The image's /etc may be read-only or absent; DNS is then the image's own business.
        let _ = std::fs::write("/etc/resolv.conf", text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_ip_parameter() {
        let ip = IpConfig::from_cmdline(
            "console=ttyS0 ip=10.200.0.2::10.200.0.1:255.255.255.252:myapp:eth0:off:1.1.1.1 reboot=k",
        )
        .unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(10, 200, 0, 1)));
        assert_eq!(ip.netmask, Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(ip.hostname.as_deref(), Some("myapp"));
        assert_eq!(ip.device, "eth0");
        assert_eq!(ip.dns, [Ipv4Addr::new(1, 1, 1, 1)]);
        assert_eq!(IpConfig::from_cmdline("ip=dhcp"), None);
        assert_eq!(IpConfig::from_cmdline("console=ttyS0"), None);
    }
}
