//! The sans-IO core of the Lattice node.
//!
//! [`NodeState`] owns everything about the data plane that is protocol rather than plumbing:
//! one WireGuard tunnel per peer, the path each peer is reached on, cryptokey routing, the
//! stateful packet filter, and the peer table built from the coordinator's netmap. It performs
//! no I/O, never reads a clock (every input carries `now`) and draws randomness only from the
//! seed it was built with. The I/O shell (`node` crate) moves bytes between it and the TUN
//! device, the UDP socket and the control connection. See [`NodeState`] for the call order.
#![warn(missing_docs)]

pub mod addr;
pub mod conntrack;
pub mod disco;
pub mod filter;
pub mod frame;
pub mod magicsock;
pub mod netcheck;
pub mod packet;
pub mod path;
pub mod pq;
mod state;
pub mod status;
pub mod stun;
mod tunnel;

pub use addr::{Addr, SockId};
pub use gotatun::packet::Packet;
pub use state::{Event, NodeConfig, NodeState, Transmit};
pub use status::{Counters, PathKind, PathStatus, PeerStatus, Status};

/// The origin of virtual time in tests: the one place the crate reads the clock.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_epoch() -> std::time::Instant {
    std::time::Instant::now()
}

#[cfg(test)]
mod sim;
