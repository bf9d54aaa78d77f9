//! The peer table, built from netmaps.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use gotatun::packet::Packet;
use tracing::{debug, warn};
use wire::NodeId;
use wire::netmap::{Node, TunnelSecurity};

use super::discovery::DiscoFreshness;
use super::{Event, NodeState};
use crate::addr::Addr;
use crate::budget::Bucket;
use crate::path::PathState;
use crate::pq::PqPeer;
use crate::tunnel::Tunnel;

/// Packets kept per peer while its tunnel is being keyed.
pub(super) const MAX_WAITING: usize = 64;

/// What a peer's traffic counters have seen since the peer appeared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// WireGuard data messages sent to the peer.
    pub tx_packets: u64,
    /// Authenticated WireGuard data messages received from the peer.
    pub rx_packets: u64,
    /// Times the path to the peer changed (direct, relayed, none, or another address).
    pub path_changes: u64,
}

pub(super) struct Peer {
    pub(super) node: Node,
    /// The WireGuard tunnel; absent until the first post-quantum key exists (or at once in a
    /// classical-only mesh), so no user packet ever crosses a classically keyed session.
    /// A handle (a tunnel with its sessions takes a few KB, which a peer without one should
    /// not carry), shared with crypto jobs in flight.
    pub(super) tunnel: Option<Tunnel>,
    pub(super) path: PathState,
    pub(super) pq: PqPeer,
    /// Whether a tunnel was asked for (traffic or a nudge).
    pub(super) pq_wanted: bool,
    /// User packets waiting for the tunnel.
    pub(super) waiting: VecDeque<Packet>,
    /// When we last reacted to the peer using a session we do not have.
    pub(super) last_stale_hint: Option<Instant>,
    /// The key disco messages with this peer are sealed under (`None`: unusable peer key).
    pub(super) disco_key: Option<zeroize::Zeroizing<[u8; 32]>>,
    /// Disco answers this peer may still get.
    pub(super) disco_tokens: Bucket,
    /// Post-quantum message 1s from this peer this node may still answer.
    pub(super) pq_tokens: Bucket,
    /// The session id of this peer's exchange in flight, as indexed in `pq_sessions`.
    pub(super) pq_session: Option<u32>,
    /// A WireGuard handshake that arrived before the confirmation of the key it uses: when,
    /// from where, the packet.
    pub(super) held_handshake: Option<(Instant, Addr, Packet)>,
    /// Freshness of the peer's disco messages.
    pub(super) disco_fresh: DiscoFreshness,
    /// Data packets sent to and received from the peer, and path changes, for metrics.
    pub(super) traffic: Traffic,
    /// Pings the user asked for (`lattice ping`) that await their pong: id, when, where to.
    pub(super) user_pings: Vec<([u8; 12], Instant, Addr)>,
}

impl NodeState {
    pub(super) fn upsert_peer(&mut self, now: Instant, node: Node) {
        if node.node_key == self.node_key {
            return;
        }
        if let Some(old_key) = self.by_id.get(&node.id).copied()
            && old_key != node.node_key
        {
            // The peer rotated its key: a new tunnel and a new key schedule; its connections
            // carry on.
            self.remove_peer(now, node.id, false);
            self.gate.reown(&old_key, node.node_key);
        }
        let key = node.node_key;
        if let Some(peer) = self.peers.get_mut(&key) {
            // Addresses it keeps are put back below; only a change copies the tables.
            for a in &peer.node.addresses {
                if self.routes.by_ip.get(a) == Some(&key) && !node.addresses.contains(a) {
                    Arc::make_mut(&mut self.routes).by_ip.remove(a);
                }
            }
            peer.path.set_endpoints(node.endpoints.clone());
            peer.path.set_peer_nat(node.nat.clone());
            peer.node = node;
        } else {
            let mut path = PathState::default();
            path.set_endpoints(node.endpoints.clone());
            path.set_peer_nat(node.nat.clone());
            debug!(peer = %node.name, key = %key, "peer added");
            self.by_id.insert(node.id, key);
            let mut peer = Peer {
                pq: PqPeer::new(self.node_key, key, self.pq_config),
                node,
                tunnel: None,
                path,
                pq_wanted: false,
                waiting: VecDeque::new(),
                last_stale_hint: None,
                disco_key: self
                    .keypair
                    .shared_key(key.as_bytes(), crate::disco::KEY_LABEL),
                disco_tokens: Bucket::full(now, super::discovery::DISCO_BURST),
                pq_tokens: Bucket::full(now, super::keys::PEER_PQ_BURST),
                pq_session: None,
                held_handshake: None,
                disco_fresh: DiscoFreshness::default(),
                traffic: Traffic::default(),
                user_pings: Vec::new(),
            };
            if self.security == TunnelSecurity::ClassicalOnly {
                peer.tunnel = Some(self.new_tunnel(now, key, None));
            }
            self.peers.insert(key, peer);
        }
        let peer = self.peers.get(&key).expect("inserted above");
        for a in &peer.node.addresses {
            if self.routes.by_ip.get(a) != Some(&key) {
                Arc::make_mut(&mut self.routes).by_ip.insert(*a, key);
            }
        }
        let endpoints = peer.node.endpoints.clone();
        for e in endpoints {
            self.claim_addr(e, key);
        }
    }

    /// Notes that peer `key` says it may be reached at `a` (its netmap entry, its
    /// call-me-maybe). A claim, which nothing checks, so it does not take an address another
    /// peer is known at: only an authenticated packet from there does
    /// ([`NodeState::learn_path`]). Otherwise a peer could list another's address and have
    /// that peer's handshakes counted against its own budget, which it can spend.
    pub(super) fn claim_addr(&mut self, a: std::net::SocketAddr, key: wire::NodeKey) {
        match self.by_addr.entry(a) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(key);
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if !self.peers.contains_key(o.get()) {
                    o.insert(key);
                }
            }
        }
    }

    /// Drops peer `id`. When it is `gone` (removed from the mesh, or no longer visible under
    /// the policy) its connections are reset on both ends first; a key rotation keeps them.
    pub(super) fn remove_peer(&mut self, now: Instant, id: NodeId, gone: bool) {
        let Some(key) = self.by_id.get(&id).copied() else {
            return;
        };
        if gone && let Some(peer) = self.peers.get(&key) {
            let cut = self.gate.take_owner(&key);
            if !cut.is_empty() {
                debug!(peer = %peer.node.name, flows = cut.len(), "resetting the connections of a departed peer");
                self.reset_flows(now, &cut);
            }
        }
        self.by_id.remove(&id);
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        for a in &peer.node.addresses {
            if self.routes.by_ip.get(a) == Some(&key) {
                self.routes_mut().by_ip.remove(a);
            }
        }
        if let Some(s) = peer.pq_session
            && self.pq_sessions.get(&s) == Some(&key)
        {
            self.pq_sessions.remove(&s);
        }
        // Its WireGuard indices are freed with its tunnel; `by_index` entries pointing at a key
        // that is no longer a peer are ignored on lookup and dropped by the next sweep, so a
        // netmap removing many peers costs O(n), not O(n) per peer.
        debug!(peer = %peer.node.name, key = %key, "peer removed");
    }

    /// Switches the mesh's tunnel security. Every tunnel is rebuilt under the new mode, so no
    /// classical tunnel survives a switch back to post-quantum.
    pub(super) fn set_security(&mut self, now: Instant, security: TunnelSecurity) {
        match security {
            TunnelSecurity::ClassicalOnly => warn!(
                "the mesh admin allows classical tunnels: new tunnels carry no post-quantum key"
            ),
            TunnelSecurity::PostQuantum => debug!("tunnels require post-quantum keys"),
        }
        self.security = security;
        let keys: Vec<_> = self.peers.keys().copied().collect();
        for key in keys {
            let tunnel = match security {
                TunnelSecurity::ClassicalOnly => Some(self.new_tunnel(now, key, None)),
                TunnelSecurity::PostQuantum => None,
            };
            if let Some(p) = self.peers.get_mut(&key) {
                p.tunnel = tunnel;
                p.pq = PqPeer::new(self.node_key, key, self.pq_config);
                p.pq_wanted = false;
                p.pq_session = None;
                p.held_handshake = None;
            }
        }
        self.pq_sessions.clear();
        self.by_index.clear();
        self.events
            .push_back(Event::TunnelSecurityChanged(security));
    }
}
#[cfg(test)]
mod tests {
    /// A node holds one `Peer` per netmap entry, thousands of them, most never in use: the
    /// tunnel and the post-quantum exchange in flight live behind boxes. Inline they made a
    /// peer 24 KB (37 MB for 1,000 peers, measured by the pq_rotation bench).
    #[test]
    fn a_peer_without_a_tunnel_stays_small() {
        assert!(
            size_of::<super::Peer>() <= 2048,
            "Peer is {} bytes",
            size_of::<super::Peer>()
        );
        assert!(size_of::<crate::pq::PqPeer>() <= 1024);
    }
}
