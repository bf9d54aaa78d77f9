//! The node's part in subnet routing, on Linux:
//!
//! - **As a client**: the subnets other nodes route for the mesh (their primary routes) are
//!   routed into the TUN device, so the kernel sends packets for them to the mesh. The routes
//!   are set with rtnetlink (`RTM_NEWROUTE` / `RTM_DELROUTE` in the main table, scope link,
//!   protocol [`RTPROT_LATTICE`]) and removed when they go away or the node stops.
//! - **As a router** (`--advertise-routes`): IP forwarding is switched on in the node's network
//!   namespace, and, unless `--snat-subnet-routes=false`, traffic from the mesh that leaves
//!   through another interface is masqueraded (an nftables table of its own, `lattice-snat`,
//!   deleted when the node stops), so LAN hosts need no route back to the mesh.
//!
//! Exit routes (`0.0.0.0/0`, `::/0`) are never installed here (`--exit-node` is separate).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnet::IpNet;

/// The routing protocol number the node's routes carry (so they are recognisable as ours).
pub const RTPROT_LATTICE: u8 = 0x4c;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One route message: `add` (create, failing with `EEXIST` if the kernel has a route for the
/// prefix already) or delete `net` through interface `ifindex` (only a route of ours:
/// protocol [`RTPROT_LATTICE`]).
pub fn route_message(add: bool, net: &IpNet, ifindex: u32, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match net.network() {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut body = vec![
        family,
        net.prefix_len(),
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_LATTICE,
        RT_SCOPE_LINK,
        RTN_UNICAST,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut body, RTA_DST, &addr);
    push_attr(&mut body, RTA_OIF, &ifindex.to_ne_bytes());
    let (kind, flags) = if add {
        (
            RTM_NEWROUTE,
            // Never replaces a route that is there already (a router's own LAN, say).
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK)
    };
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(
        &u32::try_from(16 + body.len())
            .unwrap_or(u32::MAX)
            .to_ne_bytes(),
    );
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Sends one rtnetlink request and waits for its acknowledgement.
fn request(msg: &[u8]) -> io::Result<()> {
    // SAFETY: a plain socket call; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sending `msg.len()` bytes from a live buffer to the kernel (a zeroed
    // sockaddr_nl addresses the kernel).
    let sent = unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: receiving into a live buffer of its own length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}

/// Routes `net` into interface `dev`. A route the kernel has for the prefix already (not ours)
/// is left alone: `EEXIST`.
pub fn add(dev: &str, net: &IpNet) -> io::Result<()> {
    request(&route_message(true, net, ifindex(dev)?, 1))
}

/// Removes the route for `net` through `dev`.
pub fn remove(dev: &str, net: &IpNet) -> io::Result<()> {
    request(&route_message(false, net, ifindex(dev)?, 2))
}

fn ifindex(dev: &str) -> io::Result<u32> {
    let name =
        std::ffi::CString::new(dev).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated name that lives across the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

/// The nftables table that masquerades mesh traffic leaving through the LAN.
const SNAT_TABLE: &str = "lattice-snat";

/// What a router set up, to undo when it stops.
#[derive(Debug, Default)]
pub struct RouterSetup {
    snat: bool,
}

impl RouterSetup {
    /// Turns on IP forwarding (IPv4 and IPv6) in this network namespace and, with `snat`,
    /// masquerades traffic from TUN device `tun` that leaves through another interface.
    pub fn start(tun: &str, snat: bool) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        for (path, what) in [
            ("/proc/sys/net/ipv4/ip_forward", "IPv4 forwarding"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6 forwarding"),
        ] {
            if std::fs::read_to_string(path)
                .map(|v| v.trim() == "1")
                .unwrap_or(false)
            {
                continue;
            }
            std::fs::write(path, "1").with_context(|| format!("turning on {what} ({path})"))?;
            tracing::info!(%path, "turned on {what} to route the advertised subnets");
        }
        if snat {
            let ruleset = format!(
                "table inet {SNAT_TABLE}\ndelete table inet {SNAT_TABLE}\n\
                 table inet {SNAT_TABLE} {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
                 iifname \"{tun}\" oifname != \"{tun}\" masquerade\n  }}\n}}\n"
            );
            nft(&ruleset).context("setting up source NAT for the advertised subnets (nft)")?;
            tracing::info!(
                table = SNAT_TABLE,
                "mesh traffic to the advertised subnets is masqueraded"
            );
        }
        Ok(Self { snat })
    }

    /// Removes what [`RouterSetup::start`] added (forwarding stays as it is: other software
    /// may rely on it).
    pub fn stop(&mut self) {
        if std::mem::take(&mut self.snat)
            && let Err(e) = nft(&format!("delete table inet {SNAT_TABLE}\n"))
        {
            tracing::warn!(error = %format!("{e:#}"), "could not remove the source NAT table");
        }
    }
}

impl Drop for RouterSetup {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nft(ruleset: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running nft: {e} (is nftables installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_message_is_laid_out_as_rtnetlink_expects() {
        let net: IpNet = "10.33.0.0/24".parse().unwrap();
        let m = route_message(true, &net, 7, 1);
        // header 16 + rtmsg 12 + RTA_DST (4 + 4) + RTA_OIF (4 + 4)
        assert_eq!(m.len(), 44);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 44);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            RTM_NEWROUTE
        );
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 24, "prefix length");
        assert_eq!(m[20], RT_TABLE_MAIN);
        assert_eq!(m[21], RTPROT_LATTICE);
        assert_eq!(&m[32..36], &[10, 33, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[40..44].try_into().unwrap()), 7);
        let v6: IpNet = "fd00:1::/64".parse().unwrap();
        let d = route_message(false, &v6, 3, 2);
        assert_eq!(d.len(), 16 + 12 + 20 + 8);
        assert_eq!(
            u16::from_ne_bytes(d[4..6].try_into().unwrap()),
            RTM_DELROUTE
        );
    }
}
