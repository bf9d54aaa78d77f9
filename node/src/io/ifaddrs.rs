//! Local interface addresses, for the endpoints a node reports to the coordinator.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface name.
    pub name: String,
    /// Address.
    pub addr: IpAddr,
    /// A point-to-point interface: another VPN's tunnel (WireGuard, OpenVPN, our own) or PPP.
    pub point_to_point: bool,
}

/// Every address on every up interface.
pub fn list() -> std::io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned and is not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_UP as u32) == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family we check before
        // reading it as the matching type.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let point_to_point = ifa.ifa_flags & (libc::IFF_POINTOPOINT as u32) != 0;
        out.push(IfAddr {
            name,
            addr,
            point_to_point,
        });
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The endpoints to report: every routable local address (not loopback, link-local, the
/// overlay itself or the TUN device) with the node's UDP port.
///
/// Addresses on point-to-point interfaces are left out: they belong to tunnels (another
/// VPN, or ours), and a "direct" path through another VPN's tunnel carries our traffic
/// inside theirs, at their speed, and breaks when they go down. A PPP uplink's address is
/// still found: STUN reports it as the public address.
pub fn endpoints(port: u16, tun_name: &str, overlay: &[IpAddr], has_v6: bool) -> Vec<SocketAddr> {
    let Ok(addrs) = list() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| {
            a.name != tun_name
                && !a.point_to_point
                && usable(a.addr, overlay)
                && (has_v6 || a.addr.is_ipv4())
        })
        .map(|a| SocketAddr::new(a.addr, port))
        .collect();
    out.sort_by_key(|a| (a.is_ipv6(), *a));
    out.dedup();
    out.truncate(16);
    out
}

fn usable(ip: IpAddr, overlay: &[IpAddr]) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || overlay.contains(&ip) {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => {
            let cgnat = u32::from(v4) & 0xffc0_0000 == u32::from(Ipv4Addr::new(100, 64, 0, 0));
            !v4.is_link_local() && !cgnat
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_link_local_and_overlay_addresses_are_not_endpoints() {
        let overlay: Vec<IpAddr> = vec!["fd00::1".parse().unwrap()];
        assert!(!usable("127.0.0.1".parse().unwrap(), &overlay));
        assert!(!usable("169.254.3.4".parse().unwrap(), &overlay));
        assert!(!usable("100.64.0.7".parse().unwrap(), &overlay));
        assert!(!usable("fe80::1".parse().unwrap(), &overlay));
        assert!(!usable("fd00::1".parse().unwrap(), &overlay));
        assert!(usable("198.51.100.7".parse().unwrap(), &overlay));
        assert!(usable("2001:db8::1".parse().unwrap(), &overlay));
    }

    #[test]
    fn listing_local_addresses_works() {
        let addrs = list().unwrap();
        assert!(addrs.iter().any(|a| a.addr.is_loopback()));
    }
}
