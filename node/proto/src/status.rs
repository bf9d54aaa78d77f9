//! Snapshots of the core's state for `lattice status` and the local API.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use wire::{NodeId, NodeKey};

/// Counters of dropped and handled packets, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets from the TUN for an address no peer owns.
    pub tun_no_route: u64,
    /// Packets from the TUN that could not be parsed.
    pub tun_malformed: u64,
    /// Packets from the TUN with a source address that is not this node's.
    pub tun_bad_source: u64,
    /// Datagrams that were neither WireGuard, STUN nor ours.
    pub udp_unknown: u64,
    /// WireGuard messages that failed validation (bad MAC, unknown index, replay, ...).
    pub wg_invalid: u64,
    /// WireGuard messages from keys that are not current peers.
    pub wg_unknown_peer: u64,
    /// Cookie replies sent because the node was under handshake load.
    pub wg_cookies_sent: u64,
    /// Handshakes with a valid cookie dropped: past their cookie's or the node's bound for
    /// the second.
    pub wg_shed: u64,
    /// Decrypted packets that could not be parsed.
    pub in_malformed: u64,
    /// Decrypted packets whose source address is not the sending peer's (cryptokey routing).
    pub in_spoofed: u64,
    /// Decrypted packets not addressed to this node.
    pub in_not_for_us: u64,
    /// Decrypted packets the filter dropped.
    pub in_filtered: u64,
    /// Established inbound flows cut because the rules (or a time window) stopped allowing
    /// them.
    pub flows_cut: u64,
    /// Decrypted packets delivered to the TUN.
    pub in_delivered: u64,
    /// Packets sent to peers.
    pub out_sent: u64,
    /// User packets dropped because the peer's tunnel was not keyed yet and the wait queue
    /// was full (or the peer talked to us with a key we no longer have).
    pub tun_no_tunnel: u64,
    /// Lattice frames that were malformed.
    pub frames_invalid: u64,
    /// Post-quantum handshake messages refused (undecryptable, unknown peer, replay, ...).
    pub pq_rejected: u64,
    /// Post-quantum message 1s dropped by the rate limiter.
    pub pq_rate_limited: u64,
    /// Post-quantum handshake frames whose `mac1` was wrong (senders that do not know this
    /// node's key).
    pub pq_bad_mac: u64,
    /// Cookie replies sent (the node was under load, or a source over its budget).
    pub pq_cookies_sent: u64,
    /// Packets through a relay from a key that is not a peer.
    pub relay_unknown_peer: u64,
    /// Times such a key sent enough to be refused at the relays ([`crate::strangers`]).
    pub relay_strangers_refused: u64,
    /// Disco messages that did not open or parse, or came from no peer.
    pub disco_invalid: u64,
    /// Disco pings answered.
    pub disco_pongs_sent: u64,
    /// Disco pings not answered because the peer exceeded its budget.
    pub disco_rate_limited: u64,
    /// Disco messages that authenticated but were replayed or stale.
    pub disco_stale: u64,
    /// Flows evicted from the flow table to make room (a peer at its quota, or a full
    /// table).
    pub flows_evicted: u64,
}

/// How a peer is reached (the kind the node also reports to the coordinator).
pub use wire::PathKind;

/// A peer's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStatus {
    /// The kind of path.
    pub kind: PathKind,
    /// The direct address, if direct.
    pub addr: Option<SocketAddr>,
    /// The relay, if relayed.
    pub relay: Option<String>,
    /// Why the path is what it is, when it is not direct.
    pub reason: Option<String>,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Id.
    pub id: NodeId,
    /// Short name.
    pub name: String,
    /// FQDN.
    pub fqdn: String,
    /// WireGuard key.
    pub node_key: NodeKey,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Reported endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Connected to the coordinator.
    pub online: bool,
    /// Owner.
    pub user: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Subnets (and exit routes) this node reaches through the peer: its primary routes.
    pub routes: Vec<ipnet::IpNet>,
    /// OS.
    pub os: String,
    /// Current path.
    pub path: PathStatus,
    /// Whether the session key carries a post-quantum preshared key.
    pub pq: bool,
    /// Age of the installed post-quantum key.
    pub pq_psk_age: Option<Duration>,
    /// Post-quantum exchanges completed with this peer.
    pub pq_handshakes: u64,
    /// Times the key chain restarted from zero (a side lost its key).
    pub pq_chain_resets: u64,
    /// Data packets both ways and path changes.
    pub traffic: crate::Traffic,
    /// Why the peer has no post-quantum key, or why the last rotation failed.
    pub pq_error: Option<String>,
    /// Time since the last completed WireGuard handshake.
    pub since_handshake: Option<Duration>,
    /// Time since the last authenticated packet from the peer.
    pub since_rx: Option<Duration>,
    /// Completed WireGuard handshakes.
    pub handshakes: u64,
    /// Bytes received (WireGuard messages).
    pub rx_bytes: u64,
    /// Bytes sent (WireGuard messages).
    pub tx_bytes: u64,
}

/// The state of `--exit-node`, for `lattice status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// What the user asked for.
    pub wanted: String,
    /// The peer carrying this node's internet traffic, when there is one.
    pub peer: Option<NodeId>,
    /// Its name.
    pub name: Option<String>,
    /// Whether it is connected to the coordinator.
    pub online: bool,
    /// Why no peer carries the traffic (it is dropped meanwhile: an exit node that went away
    /// never lets traffic out by the local network instead).
    pub problem: Option<String>,
}

/// The whole node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This node, once the coordinator has described it.
    pub self_node: Option<wire::Node>,
    /// Our WireGuard key.
    pub node_key: NodeKey,
    /// The mesh domain.
    pub domain: Option<String>,
    /// How the mesh keys its tunnels.
    pub tunnel_security: wire::TunnelSecurity,
    /// Peers, by name.
    pub peers: Vec<PeerStatus>,
    /// The exit node (`--exit-node`), if one was asked for.
    pub exit_node: Option<ExitStatus>,
    /// What the policy's `nodeAttrs` give this node.
    pub node_caps: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
    /// Tracked flows.
    pub flows: usize,
    /// Filter rules in force.
    pub filter_rules: usize,
    /// Nodes that are not peers, refused at the relays ([`crate::strangers`]).
    pub relay_refused: Vec<NodeKey>,
    /// Packet counters.
    pub counters: Counters,
}
