//! The Lattice relay: forwards opaque frames between nodes the coordinator vouches for, over
//! QUIC datagrams (or a WebSocket where UDP is blocked), and answers STUN.
//!
//! - [`proto`]: frames and the authentication exchange (sans-IO);
//! - [`server::Relay`]: the forwarding server (QUIC endpoint, WebSocket route, sweeper);
//! - [`session`]: what each side of a session decides: the authentication exchange, and each
//!   frame a node sends (forward, refuse sources, refresh a ticket; its rate, if limited)
//!   (sans-IO);
//! - [`quic::QuicListener`]: its QUIC endpoints on threads of their own;
//! - `queue`: a session's frames to its node, bounded by frames and by bytes;
//! - [`client::connect`]: a node's connection to a relay;
//! - [`datagram`]: frames as QUIC datagrams (both ends);
//! - [`dial::Dialer`]: how a node's outbound sockets are made (marked, for exit nodes);
//! - [`stun`]: the STUN server;
//! - [`identity`], [`tls`]: the relay's persistent key and pinned certificate;
//! - [`revocation`]: node keys the coordinator revoked, polled by standalone relays;
//! - [`http`]: serving HTTP to the internet with connection limits and header deadlines (the
//!   coordinator's listener uses it too).
//!
//! A standalone relay is `lattice-relay serve`; the coordinator embeds one by default.
#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod datagram;
pub mod dial;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod proto;
mod queue;
pub mod quic;
pub mod revocation;
pub mod server;
pub mod session;
pub mod stun;
pub mod tls;

pub use quic::QuicListener;
pub use server::{Authorizer, QuicLimits, Relay, StatsSnapshot, TicketAuthorizer};
pub use session::ClientRate;

/// The system's time in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
