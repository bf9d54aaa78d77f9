//! Where a datagram comes from or goes to: a UDP address reached from one of the node's
//! sockets, or a peer reached through a relay.

use std::fmt;
use std::net::SocketAddr;

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

pub use wire::counted_ip;
