//! The sans-IO core of the Lattice node.
//!
//! [`NodeState`] owns everything about the data plane that is protocol rather than plumbing:
//! one WireGuard tunnel per peer, the path each peer is reached on, cryptokey routing, the
//! stateful packet filter, and the peer table built from the coordinator's netmap. It performs
//! no I/O. Its own code never reads a clock (every input carries `now`) and draws randomness
//! only from the seed it was built with: path discovery, the post-quantum key schedule,
//! admission control, the filter and the flow table are deterministic under the simulator.
//!
//! WireGuard's protocol is the core's own ([`wg`]): its timers (rekey, retransmit, expiry,
//! keepalive) and its cookies run on the core's clock, and its handshake ephemerals and cookie
//! secrets come from the seed, so the simulator drives them too. The generator erases its key
//! as it goes ([`hybrid::ErasingRng`]).
//!
//! The I/O shell (`node` crate) moves bytes between it and the TUN device, the UDP socket and
//! the control connection. See [`NodeState`] for the call order.
#![warn(missing_docs)]

pub mod addr;
pub mod admission;
mod budget;
pub mod conntrack;
pub mod disco;
pub mod filter;
pub mod frame;
pub mod gate;
pub mod home;
pub mod magicsock;
pub mod netcheck;
pub mod packet;
pub mod path;
pub mod pq;
pub mod relay_link;
pub mod shared;
mod state;
pub mod status;
pub mod strangers;
pub mod stun;
mod tunnel;
pub mod wg;

pub use addr::{Addr, SockId};

/// A hash map for the tables the data plane consults on every packet: foldhash, seeded at
/// random per process (std's SipHash cost a twentieth of the node's time in a bulk transfer).
/// Some keys come from peers (flow tuples, session indices); the random seed keeps them from
/// choosing collisions, and no output depends on the iteration order.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub use gotatun::packet::Packet;
pub use state::{Checks, CryptoDone, CryptoJob, Event, NodeConfig, NodeState, Traffic, Transmit};
pub use status::{Counters, ExitStatus, PathKind, PathStatus, PeerStatus, Status};

/// The origin of virtual time in tests: the one place the crate reads the clock.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_epoch() -> std::time::Instant {
    std::time::Instant::now()
}

#[cfg(test)]
mod sim;
