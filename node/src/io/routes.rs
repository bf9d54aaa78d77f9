//! The node's part in subnet routing, on Linux:
//!
//! - **As a client**: the subnets other nodes route for the mesh (their primary routes) are
//!   routed into the TUN device, so the kernel sends packets for them to the mesh. The routes
//!   are set with rtnetlink (`RTM_NEWROUTE` / `RTM_DELROUTE` in the main table, scope link,
//!   protocol [`RTPROT_LATTICE`]) and removed when they go away or the node stops.
//! - **As a router** (`--advertise-routes`, `--advertise-exit-node`): IP forwarding is switched
//!   on in the node's network namespace; an nftables table of its own (`lattice-TUN`, deleted
//!   when the node stops) masquerades traffic from the mesh that leaves through another
//!   interface (always for the internet; for the subnets unless `--snat-subnet-routes=false`),
//!   so LAN hosts need no route back to the mesh, and lets into the mesh only replies and
//!   packets from the advertised subnets: the internet behind an exit node never opens
//!   connections into the mesh.
//! - **With an exit node** (`--exit-node`): [`ExitRouting`] routes everything the main table
//!   has no more specific route for into the TUN device, by policy routing: a table of its own
//!   with a default route into the TUN device, consulted after the main table without its
//!   default route, and never for the node's own sockets, which carry [`SOCKET_MARK`]. So the
//!   LAN, the coordinator, relays and peers' direct paths stay where they were.
//!
//! Subnet routes go into the main table; exit routes never do.

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
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
/// The kernel's main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
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
/// prefix already) or delete `net` through interface `ifindex` in routing table `table`
/// (only a route of ours: protocol [`RTPROT_LATTICE`]).
pub fn route_message(add: bool, net: &IpNet, ifindex: u32, table: u32, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match net.network() {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut body = vec![
        family,
        net.prefix_len(),
        0,
        0,
        u8::try_from(table).unwrap_or(0),
        RTPROT_LATTICE,
        RT_SCOPE_LINK,
        RTN_UNICAST,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    if net.prefix_len() > 0 {
        push_attr(&mut body, RTA_DST, &addr);
    }
    push_attr(&mut body, RTA_OIF, &ifindex.to_ne_bytes());
    push_attr(&mut body, RTA_TABLE, &table.to_ne_bytes());
    let (kind, flags) = if add {
        (
            RTM_NEWROUTE,
            // Never replaces a route that is there already (a router's own LAN, say).
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK)
    };
    message(kind, flags, seq, &body)
}

/// A policy routing rule: at `priority`, packets (of `family`, and carrying `mark` under
/// `mask` if given) look up `table`; with `suppress_prefixlen`, answers from that table with a
/// prefix this short or shorter are ignored (`ip rule ... suppress_prefixlength N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Its place among the rules (lower first).
    pub priority: u32,
    /// The table to look up.
    pub table: u32,
    /// Only packets with this firewall mark (under the mask).
    pub mark: Option<(u32, u32)>,
    /// Ignore answers with a prefix this short or shorter.
    pub suppress_prefixlen: Option<u32>,
}

/// An `RTM_NEWRULE` (`add`) or `RTM_DELRULE` message for `rule`.
pub fn rule_message(add: bool, rule: &Rule, seq: u32) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let mut body = vec![
        rule.family,
        0,
        0,
        0,
        u8::try_from(rule.table).unwrap_or(0),
        0,
        0,
        FR_ACT_TO_TBL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut body, FRA_PRIORITY, &rule.priority.to_ne_bytes());
    push_attr(&mut body, FRA_TABLE, &rule.table.to_ne_bytes());
    if let Some((mark, mask)) = rule.mark {
        push_attr(&mut body, FRA_FWMARK, &mark.to_ne_bytes());
        push_attr(&mut body, FRA_FWMASK, &mask.to_ne_bytes());
    }
    if let Some(len) = rule.suppress_prefixlen {
        push_attr(&mut body, FRA_SUPPRESS_PREFIXLEN, &len.to_ne_bytes());
    }
    let (kind, flags) = if add {
        (
            RTM_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK)
    };
    message(kind, flags, seq, &body)
}

fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
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
    msg.extend_from_slice(body);
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
    request(&route_message(true, net, ifindex(dev)?, RT_TABLE_MAIN, 1))
}

/// Removes the route for `net` through `dev`.
pub fn remove(dev: &str, net: &IpNet) -> io::Result<()> {
    request(&route_message(false, net, ifindex(dev)?, RT_TABLE_MAIN, 2))
}

/// The firewall mark on the node's own sockets while it uses an exit node (`relay::dial`):
/// their traffic is routed by the main table, never into the mesh.
pub const SOCKET_MARK: u32 = 0x004c_0000;
/// The bits of the mark that are ours.
const MARK_MASK: u32 = 0x00ff_0000;
/// The routing table holding the default route into the TUN device.
pub const EXIT_TABLE: u32 = 0x4c4c;
/// The priority of the first of the three rules (before the main table's 32766).
pub const EXIT_RULE_PRIORITY: u32 = 5270;

/// Policy routing that sends what has no more specific route into the TUN device, toward the
/// exit node, for as long as it lives. When the node dies without undoing it, the table's
/// routes go with the TUN device, and the rules left behind lead nowhere: the main table's
/// default route is used again.
#[derive(Debug)]
pub struct ExitRouting {
    dev: String,
    families: Vec<u8>,
}

impl ExitRouting {
    /// The three rules for `family`: the node's own sockets by the main table; everything by
    /// the main table but its default route; the rest by [`EXIT_TABLE`].
    fn rules(family: u8) -> [Rule; 3] {
        [
            Rule {
                family,
                priority: EXIT_RULE_PRIORITY,
                table: RT_TABLE_MAIN,
                mark: Some((SOCKET_MARK, MARK_MASK)),
                suppress_prefixlen: None,
            },
            Rule {
                family,
                priority: EXIT_RULE_PRIORITY + 1,
                table: RT_TABLE_MAIN,
                mark: None,
                suppress_prefixlen: Some(0),
            },
            Rule {
                family,
                priority: EXIT_RULE_PRIORITY + 2,
                table: EXIT_TABLE,
                mark: None,
                suppress_prefixlen: None,
            },
        ]
    }

    /// Routes the internet (IPv4, and IPv6 where the host has it) into TUN device `dev`.
    pub fn start(dev: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let index = ifindex(dev).with_context(|| format!("finding the TUN device {dev}"))?;
        let mut me = Self {
            dev: dev.to_owned(),
            families: Vec::new(),
        };
        for (family, default) in [
            (libc::AF_INET as u8, "0.0.0.0/0"),
            (libc::AF_INET6 as u8, "::/0"),
        ] {
            let net: IpNet = default.parse().unwrap_or_else(|_| IpNet::default());
            // Rules a node that died left behind are replaced, not doubled.
            for rule in Self::rules(family) {
                for _ in 0..16 {
                    if request(&rule_message(false, &rule, 3)).is_err() {
                        break;
                    }
                }
            }
            let added = request(&route_message(true, &net, index, EXIT_TABLE, 4))
                .or_else(|e| {
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .and_then(|()| {
                    Self::rules(family)
                        .iter()
                        .try_for_each(|rule| request(&rule_message(true, rule, 5)))
                });
            match added {
                Ok(()) => me.families.push(family),
                Err(e) if family == libc::AF_INET6 as u8 => {
                    tracing::warn!(error = %e, "IPv6 internet traffic does not go through the exit node (IPv6 policy routing failed)");
                    me.undo(family, index);
                }
                Err(e) => {
                    me.undo(family, index);
                    return Err(e).context("routing IPv4 through the exit node (policy routing)");
                }
            }
        }
        tracing::info!(
            %dev,
            table = EXIT_TABLE,
            mark = format_args!("{SOCKET_MARK:#x}"),
            "internet traffic goes through the exit node; the LAN and this node's own \
             connections do not"
        );
        Ok(me)
    }

    fn undo(&self, family: u8, index: u32) {
        for rule in Self::rules(family) {
            let _ = request(&rule_message(false, &rule, 6));
        }
        let net: IpNet = if family == libc::AF_INET as u8 {
            "0.0.0.0/0"
        } else {
            "::/0"
        }
        .parse()
        .unwrap_or_else(|_| IpNet::default());
        let _ = request(&route_message(false, &net, index, EXIT_TABLE, 7));
    }

    /// Removes the rules and routes.
    pub fn stop(&mut self) {
        let index = ifindex(&self.dev).unwrap_or(0);
        for family in std::mem::take(&mut self.families) {
            self.undo(family, index);
        }
    }
}

impl Drop for ExitRouting {
    fn drop(&mut self) {
        self.stop();
    }
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

/// The nftables ruleset of a router on TUN device `tun`, in its own table `lattice-TUN`:
///
/// - masquerade traffic from the mesh leaving by another interface: all of it with `snat`, or
///   else only what goes to the internet (an exit node's traffic can come back no other way);
/// - into the mesh from other interfaces, only replies and packets from the advertised
///   subnets (the internet behind an exit node, or a LAN host spoofing another subnet's
///   address, opens no connection into the mesh).
///
/// Written as one transaction that replaces the table whole.
pub fn router_ruleset(tun: &str, snat: bool, served: &[IpNet], exit: bool) -> String {
    let table = format!("lattice-{tun}");
    let set = |v6: bool| -> Option<String> {
        let nets: Vec<String> = served
            .iter()
            .filter(|n| n.addr().is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        (!nets.is_empty()).then(|| format!("{{ {} }}", nets.join(", ")))
    };
    let (v4, v6) = (set(false), set(true));
    let mut post = Vec::new();
    if snat {
        post.push(format!(r#"iifname "{tun}" oifname != "{tun}" masquerade"#));
    } else if exit {
        for (fam, set) in [("ip", &v4), ("ip6", &v6)] {
            post.push(match set {
                Some(set) => {
                    format!(r#"iifname "{tun}" oifname != "{tun}" {fam} daddr != {set} masquerade"#)
                }
                None => format!(
                    r#"meta nfproto {} iifname "{tun}" oifname != "{tun}" masquerade"#,
                    if fam == "ip" { "ipv4" } else { "ipv6" }
                ),
            });
        }
    }
    let mut fwd = vec![format!(
        r#"iifname != "{tun}" oifname "{tun}" ct state established,related accept"#
    )];
    for (fam, set) in [("ip", &v4), ("ip6", &v6)] {
        if let Some(set) = set {
            fwd.push(format!(
                r#"iifname != "{tun}" oifname "{tun}" {fam} saddr {set} accept"#
            ));
        }
    }
    fwd.push(format!(
        r#"iifname != "{tun}" oifname "{tun}" counter drop"#
    ));
    let indent =
        |rules: &[String]| -> String { rules.iter().map(|r| format!("    {r}\n")).collect() };
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  \
         chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n{}  }}\n  \
         chain into_mesh {{\n    type filter hook forward priority filter; policy accept;\n{}  }}\n}}\n",
        indent(&post),
        indent(&fwd)
    )
}

/// What a router set up, to undo when it stops.
#[derive(Debug, Default)]
pub struct RouterSetup {
    /// The TUN device whose table is in place.
    table_of: Option<String>,
    applied: Option<String>,
}

impl RouterSetup {
    /// Turns on IP forwarding (IPv4 and IPv6) in this network namespace and brings the
    /// router's nftables table in line with what it routes ([`router_ruleset`]).
    pub fn apply(
        &mut self,
        tun: &str,
        snat: bool,
        served: &[IpNet],
        exit: bool,
    ) -> anyhow::Result<()> {
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
            tracing::info!(%path, "turned on {what} to route for the mesh");
        }
        let ruleset = router_ruleset(tun, snat, served, exit);
        if self.applied.as_ref() == Some(&ruleset) {
            return Ok(());
        }
        nft(&ruleset).context("setting up forwarding rules for the mesh (nft)")?;
        tracing::info!(table = %format!("lattice-{tun}"), snat, exit, "forwarding for the mesh");
        self.table_of = Some(tun.to_owned());
        self.applied = Some(ruleset);
        Ok(())
    }

    /// Removes what [`RouterSetup::apply`] added (forwarding stays as it is: other software
    /// may rely on it).
    pub fn stop(&mut self) {
        self.applied = None;
        if let Some(tun) = self.table_of.take()
            && let Err(e) = nft(&format!("delete table inet lattice-{tun}\n"))
        {
            tracing::warn!(error = %format!("{e:#}"), "could not remove the forwarding table");
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
        let m = route_message(true, &net, 7, RT_TABLE_MAIN, 1);
        // header 16 + rtmsg 12 + RTA_DST (4 + 4) + RTA_OIF (4 + 4) + RTA_TABLE (4 + 4)
        assert_eq!(m.len(), 52);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 52);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            RTM_NEWROUTE
        );
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 24, "prefix length");
        assert_eq!(m[20], 254, "the main table");
        assert_eq!(m[21], RTPROT_LATTICE);
        assert_eq!(&m[32..36], &[10, 33, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[40..44].try_into().unwrap()), 7);
        let v6: IpNet = "fd00:1::/64".parse().unwrap();
        let d = route_message(false, &v6, 3, RT_TABLE_MAIN, 2);
        assert_eq!(d.len(), 16 + 12 + 20 + 8 + 8);
        assert_eq!(
            u16::from_ne_bytes(d[4..6].try_into().unwrap()),
            RTM_DELROUTE
        );
    }

    #[test]
    fn a_rule_message_carries_priority_table_mark_and_suppression() {
        let rules = ExitRouting::rules(libc::AF_INET as u8);
        let marked = rule_message(true, &rules[0], 1);
        // header 16 + fib_rule_hdr 12 + priority 8 + table 8 + fwmark 8 + fwmask 8
        assert_eq!(marked.len(), 60);
        assert_eq!(
            u16::from_ne_bytes(marked[4..6].try_into().unwrap()),
            RTM_NEWRULE
        );
        assert_eq!(marked[16], libc::AF_INET as u8);
        assert_eq!(marked[20], 254, "the main table");
        assert_eq!(marked[23], FR_ACT_TO_TBL);
        let attrs = |m: &[u8]| -> Vec<(u16, u32)> {
            m[28..]
                .chunks(8)
                .map(|a| {
                    (
                        u16::from_ne_bytes([a[2], a[3]]),
                        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                    )
                })
                .collect()
        };
        assert_eq!(
            attrs(&marked),
            [
                (FRA_PRIORITY, EXIT_RULE_PRIORITY),
                (FRA_TABLE, RT_TABLE_MAIN),
                (FRA_FWMARK, SOCKET_MARK),
                (FRA_FWMASK, MARK_MASK)
            ]
        );
        assert_eq!(
            attrs(&rule_message(false, &rules[1], 2)),
            [
                (FRA_PRIORITY, EXIT_RULE_PRIORITY + 1),
                (FRA_TABLE, RT_TABLE_MAIN),
                (FRA_SUPPRESS_PREFIXLEN, 0)
            ]
        );
        let to_exit = rule_message(true, &rules[2], 3);
        assert_eq!(to_exit[20], 0, "a table above 255 goes in FRA_TABLE only");
        assert_eq!(
            attrs(&to_exit),
            [
                (FRA_PRIORITY, EXIT_RULE_PRIORITY + 2),
                (FRA_TABLE, EXIT_TABLE)
            ]
        );
        // The default route into the exit table has no destination attribute.
        let default = route_message(true, &"0.0.0.0/0".parse().unwrap(), 9, EXIT_TABLE, 4);
        assert_eq!(default.len(), 16 + 12 + 8 + 8);
        assert_eq!(default[17], 0);
    }

    #[test]
    fn a_routers_ruleset_masquerades_as_asked_and_lets_only_replies_and_its_subnets_in() {
        let served: Vec<IpNet> = vec![
            "10.33.0.0/24".parse().unwrap(),
            "fd33::/64".parse().unwrap(),
        ];
        let snat = router_ruleset("lat0", true, &served, true);
        assert!(snat.starts_with("table inet lattice-lat0\ndelete table inet lattice-lat0\n"));
        assert!(snat.contains(r#"iifname "lat0" oifname != "lat0" masquerade"#));
        assert!(snat.contains(r#"ct state established,related accept"#));
        assert!(snat.contains(r#"ip saddr { 10.33.0.0/24 } accept"#));
        assert!(snat.contains(r#"ip6 saddr { fd33::/64 } accept"#));
        assert!(snat.ends_with("    iifname != \"lat0\" oifname \"lat0\" counter drop\n  }\n}\n"));
        // Keeping the senders' addresses toward the subnets, but not toward the internet.
        let keep = router_ruleset("lat0", false, &served, true);
        assert!(keep.contains(r#"ip daddr != { 10.33.0.0/24 } masquerade"#));
        assert!(keep.contains(r#"ip6 daddr != { fd33::/64 } masquerade"#));
        // A subnet router that keeps addresses masquerades nothing.
        let plain = router_ruleset("lat0", false, &served, false);
        assert!(!plain.contains("masquerade"));
        // An exit node with no subnets masquerades both families and lets only replies in.
        let exit = router_ruleset("lat0", false, &[], true);
        assert!(exit.contains(r#"meta nfproto ipv4 iifname "lat0" oifname != "lat0" masquerade"#));
        assert!(exit.contains(r#"meta nfproto ipv6 iifname "lat0" oifname != "lat0" masquerade"#));
        assert!(!exit.contains("saddr"));
        // nft itself accepts every variant, where it can check (root).
        if nix_root()
            && std::process::Command::new("nft")
                .arg("--version")
                .output()
                .is_ok()
        {
            for r in [&snat, &keep, &plain, &exit] {
                let checked = std::process::Command::new("sh")
                    .args(["-c", "unshare -n nft -c -f /dev/stdin"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .and_then(|mut c| {
                        use std::io::Write as _;
                        c.stdin.take().unwrap().write_all(r.as_bytes())?;
                        c.wait_with_output()
                    })
                    .unwrap();
                assert!(
                    checked.status.success(),
                    "{r}\n{}",
                    String::from_utf8_lossy(&checked.stderr)
                );
            }
        }
    }

    fn nix_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
