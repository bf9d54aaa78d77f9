//! The contract between Lattice processes (our `tailcfg`).
//!
//! Everything that crosses a process boundary is defined here: typed keys and ids, the
//! control-channel messages between node and coordinator, the netmap and its deltas, compiled
//! filter rules, and the auth-key text format. This crate holds types and their serde forms
//! only; it does no I/O, no cryptography and pulls in no runtime.
//!
//! Compatibility rules: new fields are `#[serde(default)]` or `Option`; enums are tagged with
//! `type`, snake_case, and carry an `Unknown` catch-all so an older peer skips what it does
//! not understand. [`CapabilityVersion`] is bumped with a dated note for every change.
#![warn(missing_docs)]

pub mod api;
pub mod authkey;
pub mod filter;
pub mod ids;
pub mod keys;
pub mod netmap;
pub mod relay;
pub mod version;

pub use api::{
    AttrValue, ClientMessage, ErrorCode, Hello, IdToken, MAX_REPORTED_PATHS, PathKind, PeerPath,
    ServerMessage, Welcome,
};
pub use authkey::{AuthKey, AuthKeyParseError};
pub use filter::{FilterRule, IpProto, PortRange, ValidRange};
pub use ids::{NodeId, UserId};
pub use keys::{ControlKey, KeyParseError, MachineKey, NodeKey, RelayKey, TicketKey};
pub use netmap::{DnsConfig, MapResponse, Node, TunnelSecurity};
pub use relay::{
    CertPin, NatInfo, REVOCATIONS_CONTEXT, RelayId, RelayInfo, Revocation, RevocationList,
    SignedRevocations,
};
pub use version::CapabilityVersion;

/// The address a sender is counted as by the limits that bound what one host may cost (a
/// node's budgets for strangers, a relay's STUN answers and handshakes): the address itself
/// for IPv4 (an IPv4-mapped IPv6 address as its IPv4 address), its /64 for IPv6, which one
/// host may hold whole.
pub fn counted_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}
