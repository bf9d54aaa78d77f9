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
