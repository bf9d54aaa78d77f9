//! Where a datagram comes from or goes to: a UDP address reached from one of the node's
//! sockets, or a peer reached through a relay.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use wire::{NodeKey, RelayId};

/// One of the node's UDP sockets: the main port (everything by default), or an extra socket
/// opened to reach a peer behind an endpoint-dependent NAT (each has its own NAT mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SockId {
    /// The node's main UDP port.
    Main,
    /// Extra socket `n` (the shell opens it on first use, on an ephemeral port).
    Aux(u16),
}

/// A place packets go to or come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    /// A UDP address, from (or to) one of the node's sockets.
    Udp(SockId, SocketAddr),
    /// A peer, through a relay.
    Relay(RelayId, NodeKey),
}

impl Addr {
    /// The main socket to `a`.
    pub fn main(a: SocketAddr) -> Self {
        Self::Udp(SockId::Main, a)
    }

    /// The UDP address, if this is one.
    pub fn udp(&self) -> Option<SocketAddr> {
        match self {
            Self::Udp(_, a) => Some(*a),
            Self::Relay(..) => None,
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Udp(SockId::Main, a) => write!(f, "{a}"),
            Self::Udp(SockId::Aux(n), a) => write!(f, "{a} (port {n})"),
            Self::Relay(r, k) => write!(f, "{k} via {r}"),
        }
    }
}

/// The address a sender is counted as by the budgets that bound what strangers may cost:
/// the address itself for IPv4 (an IPv4-mapped IPv6 address as its IPv4 address), its /64
/// for IPv6, which one host may hold whole.
pub fn counted_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}
