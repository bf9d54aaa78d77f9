//! The network map a coordinator streams to each node: the first message is full, every later
//! one is a delta.
//!
//! Delta rules (as in Tailscale's `MapResponse`): a `None` field is unchanged; `peers` replaces
//! the whole peer list; `peers_changed` upserts by id; `peers_removed` deletes by id. A node
//! applies the fields in that order.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::filter::FilterRule;
use crate::ids::NodeId;
use crate::keys::NodeKey;
use crate::relay::{NatInfo, RelayId, RelayInfo};

/// A node as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's id.
    pub id: NodeId,
    /// Short name, unique in the mesh (`db-1`).
    pub name: String,
    /// Fully qualified name (`db-1.mesh.internal`).
    pub fqdn: String,
    /// WireGuard public key.
    pub node_key: NodeKey,
    /// Overlay addresses (one IPv4 from 100.64.0.0/10, one IPv6 from the mesh ULA).
    pub addresses: Vec<IpAddr>,
    /// UDP endpoints the node can be reached on, best first.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// The owning user, if the node is not tagged.
    #[serde(default)]
    pub user: Option<String>,
    /// ACL tags (`tag:db`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Whether the node currently holds a control connection.
    #[serde(default)]
    pub online: bool,
    /// Last time the coordinator heard from the node (Unix seconds).
    #[serde(default)]
    pub last_seen_unix: Option<i64>,
    /// When the node's key expires (Unix seconds): it then gets no peers until it renews
    /// (a fresh id token, or a re-join). `None`: it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_expiry_unix: Option<i64>,
    /// Operating system as reported by the node.
    #[serde(default)]
    pub os: String,
    /// Whether the node is removed automatically once it goes away.
    #[serde(default)]
    pub ephemeral: bool,
    /// The relay the node is reached through first (its lowest-latency one).
    #[serde(default)]
    pub home_relay: Option<RelayId>,
    /// How the node's NAT behaves, as the node measured it.
    #[serde(default)]
    pub nat: Option<NatInfo>,
    /// Routes the node advertises.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertised_routes: Vec<ipnet::IpNet>,
    /// Those approved (by an admin or the policy's `autoApprovers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_routes: Vec<ipnet::IpNet>,
    /// The approved routes this node is the primary router for (when several nodes offer
    /// one route, one of the online ones carries it; exit routes are always its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub primary_routes: Vec<ipnet::IpNet>,
}

/// DNS settings for the node's resolver at 100.100.100.100.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// The mesh domain (`mesh.internal`).
    pub domain: String,
    /// The resolver address nodes answer on.
    pub resolver: IpAddr,
}

/// One netmap message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapResponse {
    /// Increases by one per message on a connection.
    pub seq: u64,
    /// The receiving node itself (changed name, addresses, ...).
    #[serde(default)]
    pub node: Option<Node>,
    /// The complete peer list, replacing any earlier one.
    #[serde(default)]
    pub peers: Option<Vec<Node>>,
    /// Peers added or changed since the last message.
    #[serde(default)]
    pub peers_changed: Vec<Node>,
    /// Peers that are gone since the last message.
    #[serde(default)]
    pub peers_removed: Vec<NodeId>,
    /// The inbound filter rules for this node, replacing any earlier set.
    #[serde(default)]
    pub packet_filter: Option<Vec<FilterRule>>,
    /// DNS settings.
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    /// Mesh-wide tunnel security, set by an admin.
    #[serde(default)]
    pub tunnel_security: Option<TunnelSecurity>,
    /// The relays, replacing any earlier list.
    #[serde(default)]
    pub relays: Option<Vec<RelayInfo>>,
    /// A fresh relay ticket for this node (hex), replacing the earlier one.
    #[serde(default)]
    pub relay_ticket: Option<String>,
    /// The URLs of every coordinator replica serving the mesh, replacing any earlier list
    /// (a node fails over to them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinators: Option<Vec<String>>,
    /// What the policy's `nodeAttrs` give this node (attribute -> values; attributes carry
    /// none), replacing any earlier set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_caps: Option<std::collections::BTreeMap<String, Vec<serde_json::Value>>>,
    /// Subnets the policy steers this node's traffic for through chosen routers (grants with
    /// `via`): route -> the routers that may carry it, in order of preference (the first
    /// online one does), replacing any earlier set. They take precedence over the route's
    /// primary router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_routes: Option<std::collections::BTreeMap<ipnet::IpNet, Vec<NodeId>>>,
}

/// How tunnels between nodes are keyed (a per-mesh admin setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelSecurity {
    /// Every tunnel carries a post-quantum preshared key; a peer that cannot complete the
    /// post-quantum handshake gets no tunnel. The default.
    #[default]
    PostQuantum,
    /// Tunnels use classical WireGuard only. An explicit admin choice (e.g. to talk to stock
    /// WireGuard peers); logged and shown in every node's status.
    ClassicalOnly,
}

impl MapResponse {
    /// Whether this message replaces the whole peer list.
    pub fn is_full(&self) -> bool {
        self.peers.is_some()
    }

    /// Whether the message carries nothing.
    pub fn is_empty(&self) -> bool {
        self.node.is_none()
            && self.peers.is_none()
            && self.peers_changed.is_empty()
            && self.peers_removed.is_empty()
            && self.packet_filter.is_none()
            && self.dns.is_none()
            && self.tunnel_security.is_none()
            && self.relays.is_none()
            && self.relay_ticket.is_none()
            && self.coordinators.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn node(id: u64, name: &str) -> Node {
        Node {
            id: NodeId(id),
            name: name.into(),
            fqdn: format!("{name}.mesh.internal"),
            node_key: NodeKey::from_bytes([id as u8; 32]),
            addresses: vec![
                format!("100.64.0.{id}").parse().unwrap(),
                format!("fd7a:1::{id}").parse().unwrap(),
            ],
            endpoints: vec!["198.51.100.7:41641".parse().unwrap()],
            user: None,
            tags: vec!["tag:db".into()],
            online: true,
            last_seen_unix: Some(1_790_000_000),
            key_expiry_unix: None,
            os: "linux".into(),
            ephemeral: false,
            home_relay: None,
            nat: None,
            advertised_routes: Vec::new(),
            approved_routes: Vec::new(),
            primary_routes: Vec::new(),
        }
    }

    #[test]
    fn can_deserialize_map_response_delta() {
        let json = format!(
            r#"{{"seq": 7, "peers_changed": [{{
                "id": 3, "name": "db-1", "fqdn": "db-1.mesh.internal",
                "node_key": "nodekey:{}", "addresses": ["100.64.0.3", "fd7a:1::3"],
                "some_future_field": {{"x": 1}}
            }}], "peers_removed": [9]}}"#,
            "03".repeat(32)
        );
        let m: MapResponse = serde_json::from_str(&json).unwrap();
        assert_eq!(m.seq, 7);
        assert!(!m.is_full());
        assert_eq!(m.peers_changed[0].name, "db-1");
        assert!(m.peers_changed[0].endpoints.is_empty());
        assert_eq!(m.peers_removed, vec![NodeId(9)]);
        assert!(m.packet_filter.is_none());
        assert!(m.tunnel_security.is_none());
        let unknown = r#"{"seq": 1, "tunnel_security": "quantum_teleport"}"#;
        assert!(
            serde_json::from_str::<MapResponse>(unknown).is_err(),
            "an unknown security mode is rejected, never read as classical"
        );
    }

    #[test]
    fn full_map_round_trips() {
        let m = MapResponse {
            seq: 1,
            node: Some(node(1, "a")),
            peers: Some(vec![node(2, "b"), node(3, "c")]),
            packet_filter: Some(vec![]),
            dns: Some(DnsConfig {
                domain: "mesh.internal".into(),
                resolver: "100.100.100.100".parse().unwrap(),
            }),
            tunnel_security: Some(TunnelSecurity::ClassicalOnly),
            ..MapResponse::default()
        };
        let json = serde_json::to_string(&m).unwrap();
        let back: MapResponse = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert!(back.is_full());
        assert!(!back.is_empty());
        assert!(MapResponse::default().is_empty());
    }
}
