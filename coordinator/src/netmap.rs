//! Per-node netmaps (pure): what a node may see, and the delta since what it was last sent.
//!
//! A session keeps a [`SentMap`] (the revisions it has sent); [`next_map`] compares it with a
//! [`Snapshot`] of the hub and returns the next message, or `None` when nothing the node can see
//! has changed. It looks only where the hub says something changed ([`Pending`]): the named
//! peers, or, when the node's rules may have changed, its rules and every peer (compared by
//! revision).

use std::collections::BTreeMap;
use std::sync::Arc;

use policy::{Compiled, CompiledPolicy};
use wire::NodeId;
use wire::netmap::{DnsConfig, MapResponse, Node};
use wire::{RelayInfo, TunnelSecurity};

use crate::addr::RESOLVER_V4;
use crate::hub::Pending;
use crate::model::NodeRecord;

/// A node as the hub holds it.
#[derive(Debug, Clone)]
pub struct LiveNode {
    /// The stored record.
    pub record: NodeRecord,
    /// Whether it holds a control connection.
    pub online: bool,
    /// Bumped whenever anything a peer could see changes.
    pub rev: u64,
    /// Its routes in force: approved by an admin or by the policy's autoApprovers, and
    /// advertised.
    pub routes: Vec<ipnet::IpNet>,
    /// Those it is the primary router for.
    pub primary_routes: Vec<ipnet::IpNet>,
}

/// The hub's state, as [`next_map`] reads it.
pub struct Snapshot<'a> {
    /// All non-expired nodes.
    pub nodes: &'a BTreeMap<NodeId, LiveNode>,
    /// The policy in force, compiled for these nodes.
    pub compiled: Arc<CompiledPolicy>,
    /// The mesh domain.
    pub domain: &'a str,
    /// How tunnels are keyed.
    pub tunnel_security: TunnelSecurity,
    /// The relays.
    pub relays: Arc<Vec<RelayInfo>>,
    /// Bumped when the relay list changes.
    pub relay_rev: u64,
    /// The coordinator replicas' URLs.
    pub coordinators: Arc<Vec<String>>,
    /// Bumped when `coordinators` changes.
    pub coordinators_rev: u64,
}

/// What one session has sent so far.
#[derive(Debug, Default)]
pub struct SentMap {
    seq: u64,
    self_rev: Option<u64>,
    peers: BTreeMap<NodeId, u64>,
    compiled: Option<Compiled>,
    filter_sent: bool,
    caps_sent: bool,
    dns_sent: bool,
    security_sent: Option<TunnelSecurity>,
    relays_sent: Option<u64>,
    coordinators_sent: Option<u64>,
}

impl SentMap {
    /// Messages sent so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// The wire form of a node.
pub fn wire_node(live: &LiveNode, domain: &str) -> Node {
    let r = &live.record;
    Node {
        id: r.id,
        name: r.name.clone(),
        fqdn: format!("{}.{domain}", r.name),
        node_key: r.node_key,
        addresses: r.addresses(),
        endpoints: r.endpoints.clone(),
        user: r.user.clone(),
        tags: r.tags.clone(),
        online: live.online,
        last_seen_unix: r.last_seen,
        key_expiry_unix: r.expires_at,
        os: r.os.clone(),
        ephemeral: r.ephemeral,
        home_relay: r.home_relay,
        nat: r.nat.clone(),
        advertised_routes: r.advertised_routes.clone(),
        approved_routes: live.routes.clone(),
        primary_routes: live.primary_routes.clone(),
    }
}

/// The next message for node `me`, or `None` if it is up to date (or unknown), looking at what
/// `pending` names. A `ticket` (a fresh relay ticket) is always sent.
pub fn next_map(
    sent: &mut SentMap,
    snap: &Snapshot<'_>,
    me: NodeId,
    ticket: Option<String>,
    pending: &Pending,
) -> Option<MapResponse> {
    let me_live = snap.nodes.get(&me)?;
    let first = sent.seq == 0;
    let everything = first || pending.everything || sent.compiled.is_none();
    let mut recompiled = false;
    let mut caps_changed = false;
    if everything {
        let compiled = snap.compiled.for_node(me);
        recompiled = sent
            .compiled
            .as_ref()
            .is_none_or(|old| old.rules != compiled.rules);
        caps_changed = sent.compiled.as_ref().is_none_or(|old| {
            old.node_caps != compiled.node_caps || old.via_routes != compiled.via_routes
        });
        sent.compiled = Some(compiled);
    }
    let compiled = sent.compiled.as_ref().expect("set just above");
    let mut msg = MapResponse::default();

    if sent.self_rev != Some(me_live.rev) {
        msg.node = Some(wire_node(me_live, snap.domain));
        sent.self_rev = Some(me_live.rev);
    }

    let visible = compiled
        .visible_peers
        .iter()
        .filter_map(|id| snap.nodes.get(id).map(|n| (*id, n)));
    if first {
        let mut peers = Vec::new();
        for (id, n) in visible {
            peers.push(wire_node(n, snap.domain));
            sent.peers.insert(id, n.rev);
        }
        msg.peers = Some(peers);
    } else if everything {
        let mut still = BTreeMap::new();
        for (id, n) in visible {
            if sent.peers.get(&id) != Some(&n.rev) {
                msg.peers_changed.push(wire_node(n, snap.domain));
            }
            still.insert(id, n.rev);
        }
        msg.peers_removed = sent
            .peers
            .keys()
            .filter(|id| !still.contains_key(id))
            .copied()
            .collect();
        sent.peers = still;
    } else {
        // Only the named peers changed, and the node's rules did not.
        for id in &pending.peers {
            if !compiled.visible_peers.contains(id) {
                continue;
            }
            match snap.nodes.get(id) {
                Some(n) if sent.peers.get(id) != Some(&n.rev) => {
                    msg.peers_changed.push(wire_node(n, snap.domain));
                    sent.peers.insert(*id, n.rev);
                }
                Some(_) => {}
                None => {
                    if sent.peers.remove(id).is_some() {
                        msg.peers_removed.push(*id);
                    }
                }
            }
        }
    }

    if recompiled || !sent.filter_sent {
        msg.packet_filter = Some(sent.compiled.as_ref().expect("set").rules.clone());
        sent.filter_sent = true;
    }
    if caps_changed || !sent.caps_sent {
        let c = sent.compiled.as_ref().expect("set");
        msg.node_caps = Some(c.node_caps.clone());
        msg.via_routes = Some(c.via_routes.clone());
        sent.caps_sent = true;
    }
    if !sent.dns_sent {
        msg.dns = Some(DnsConfig {
            domain: snap.domain.to_owned(),
            resolver: RESOLVER_V4.into(),
        });
        sent.dns_sent = true;
    }

    if sent.security_sent != Some(snap.tunnel_security) {
        msg.tunnel_security = Some(snap.tunnel_security);
        sent.security_sent = Some(snap.tunnel_security);
    }

    if sent.relays_sent != Some(snap.relay_rev) {
        msg.relays = Some(snap.relays.as_ref().clone());
        sent.relays_sent = Some(snap.relay_rev);
    }
    if sent.coordinators_sent != Some(snap.coordinators_rev) {
        if !snap.coordinators.is_empty() || sent.coordinators_sent.is_some() {
            msg.coordinators = Some(snap.coordinators.as_ref().clone());
        }
        sent.coordinators_sent = Some(snap.coordinators_rev);
    }
    msg.relay_ticket = ticket;

    if msg.is_empty() {
        return None;
    }
    sent.seq += 1;
    msg.seq = sent.seq;
    Some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Inventory, InventoryNode, Policy};

    struct World {
        nodes: BTreeMap<NodeId, LiveNode>,
        inventory: Inventory,
        policy: Policy,
        policy_rev: u64,
        membership_rev: u64,
        relays: Arc<Vec<RelayInfo>>,
        relay_rev: u64,
    }

    impl World {
        fn new(n: u64) -> Self {
            let mut w = Self {
                nodes: BTreeMap::new(),
                inventory: Inventory::new(),
                policy: Policy::allow_all(),
                policy_rev: 1,
                membership_rev: 0,
                relays: Arc::new(vec![]),
                relay_rev: 0,
            };
            for i in 1..=n {
                w.add(i);
            }
            w
        }

        fn add(&mut self, i: u64) {
            let rec = NodeRecord::for_test(i as u8, &[]);
            self.inventory.upsert(InventoryNode {
                routes: Vec::new(),
                id: rec.id,
                name: rec.name.clone(),
                addresses: rec.addresses(),
                user: None,
                tags: vec![],
                attrs: rec.policy_attrs(),
            });
            self.nodes.insert(
                rec.id,
                LiveNode {
                    routes: Vec::new(),
                    primary_routes: Vec::new(),
                    record: rec,
                    online: false,
                    rev: 1,
                },
            );
            self.membership_rev += 1;
        }

        fn remove(&mut self, i: u64) {
            self.nodes.remove(&NodeId(i));
            self.inventory.remove(NodeId(i));
            self.membership_rev += 1;
        }

        fn snap(&self) -> Snapshot<'_> {
            Snapshot {
                nodes: &self.nodes,
                compiled: Arc::new(
                    self.policy
                        .compile(&self.inventory, jiff::Timestamp::UNIX_EPOCH),
                ),
                domain: "mesh.internal",
                tunnel_security: TunnelSecurity::PostQuantum,
                relays: Arc::clone(&self.relays),
                relay_rev: self.relay_rev,
                coordinators: Arc::new(vec![]),
                coordinators_rev: 0,
            }
        }
    }

    #[test]
    fn first_map_is_full_then_nothing_until_a_change() {
        let w = World::new(3);
        let mut sent = SentMap::default();
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        assert_eq!(m.seq, 1);
        assert!(m.is_full());
        let names: Vec<_> = m.peers.unwrap().iter().map(|p| p.fqdn.clone()).collect();
        assert_eq!(names, ["n2.mesh.internal", "n3.mesh.internal"]);
        assert_eq!(m.node.unwrap().name, "n1");
        assert_eq!(m.packet_filter.unwrap().len(), 1);
        assert_eq!(m.dns.unwrap().resolver.to_string(), "100.100.100.100");
        assert_eq!(m.tunnel_security, Some(TunnelSecurity::PostQuantum));
        assert!(next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).is_none());
    }

    #[test]
    fn a_session_looks_only_at_the_peers_it_is_told_about() {
        let mut w = World::new(4);
        let mut sent = SentMap::default();
        next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        for id in [2, 3] {
            let n = w.nodes.get_mut(&NodeId(id)).unwrap();
            n.online = true;
            n.rev += 1;
        }
        let only = |ids: &[u64]| Pending {
            peers: ids.iter().map(|i| NodeId(*i)).collect(),
            ..Pending::default()
        };
        // Told about node 4 (unchanged): nothing to send, and 2 and 3 are not looked at.
        assert!(next_map(&mut sent, &w.snap(), NodeId(1), None, &only(&[4])).is_none());
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &only(&[2])).unwrap();
        assert_eq!(
            m.peers_changed.iter().map(|p| p.id).collect::<Vec<_>>(),
            [NodeId(2)]
        );
        assert!(m.packet_filter.is_none());
        // A full look finds what was not named yet, once.
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        assert_eq!(
            m.peers_changed.iter().map(|p| p.id).collect::<Vec<_>>(),
            [NodeId(3)]
        );
        assert!(next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).is_none());
    }

    #[test]
    fn a_peer_going_online_is_a_one_peer_delta() {
        let mut w = World::new(3);
        let mut sent = SentMap::default();
        next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        let n2 = w.nodes.get_mut(&NodeId(2)).unwrap();
        n2.online = true;
        n2.rev += 1;
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        assert_eq!(m.seq, 2);
        assert!(!m.is_full());
        assert_eq!(m.peers_changed.len(), 1);
        assert!(m.peers_changed[0].online);
        assert!(m.packet_filter.is_none(), "membership did not change");
        assert!(m.node.is_none());
    }

    #[test]
    fn removed_and_added_peers_show_up_in_the_delta() {
        let mut w = World::new(3);
        let mut sent = SentMap::default();
        next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        w.remove(3);
        w.add(4);
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        assert_eq!(m.peers_removed, vec![NodeId(3)]);
        assert_eq!(
            m.peers_changed.iter().map(|p| p.id).collect::<Vec<_>>(),
            [NodeId(4)]
        );
        // Allow-all rules for node 1 name only node 1's addresses, so they did not change.
        assert!(m.packet_filter.is_none());
    }

    #[test]
    fn a_removed_node_gets_nothing() {
        let mut w = World::new(2);
        let mut sent = SentMap::default();
        next_map(&mut sent, &w.snap(), NodeId(2), None, &Pending::all()).unwrap();
        w.remove(2);
        assert!(next_map(&mut sent, &w.snap(), NodeId(2), None, &Pending::all()).is_none());
    }

    #[test]
    fn a_stricter_policy_hides_peers_and_sends_new_rules() {
        let mut w = World::new(3);
        let mut sent = SentMap::default();
        next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        // Only n2 may reach n1 now; n3 disappears from n1's map.
        let text = r#"{"hosts": {"n2": "100.64.0.2"},
                       "acls": [{"action": "accept", "src": ["n2"], "dst": ["100.64.0.1:22"]}]}"#;
        w.policy = Policy::parse("p.hujson", text).unwrap();
        w.policy_rev += 1;
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        assert_eq!(m.peers_removed, vec![NodeId(3)]);
        let rules = m.packet_filter.unwrap();
        assert_eq!(rules.len(), 1);
        // The host is n2's IPv4 address: that address only (as in Tailscale, a source
        // prefix admits the addresses inside it, not the rest of the node).
        assert_eq!(rules[0].src, vec!["100.64.0.2/32".parse().unwrap()]);
        // n3 sees nobody, and gets no rules.
        let mut sent3 = SentMap::default();
        let m3 = next_map(&mut sent3, &w.snap(), NodeId(3), None, &Pending::all()).unwrap();
        assert!(m3.peers.unwrap().is_empty());
        assert!(m3.packet_filter.unwrap().is_empty());
    }

    #[test]
    fn policy_attrs_merge_hello_posture_and_custom_attributes() {
        let w = World::new(1);
        let mut rec = w.nodes[&NodeId(1)].record.clone();
        rec.client_version = "0.1.0".into();
        rec.posture
            .insert("node:os".into(), wire::AttrValue::String("linux".into()));
        rec.posture
            .insert("fact:edr".into(), wire::AttrValue::Bool(true));
        // A node cannot smuggle admin attributes in through its posture report.
        rec.posture
            .insert("custom:admin".into(), wire::AttrValue::Bool(true));
        rec.custom_attrs
            .insert("custom:team".into(), wire::AttrValue::String("sre".into()));
        let a = rec.policy_attrs();
        assert_eq!(
            a["node:clientVersion"],
            wire::AttrValue::String("0.1.0".into())
        );
        assert_eq!(a["fact:edr"], wire::AttrValue::Bool(true));
        assert_eq!(a["custom:team"], wire::AttrValue::String("sre".into()));
        assert!(!a.contains_key("custom:admin"));
    }

    #[test]
    fn relays_go_out_once_and_on_change_and_tickets_whenever_given() {
        let mut w = World::new(2);
        let mut sent = SentMap::default();
        let first = next_map(
            &mut sent,
            &w.snap(),
            NodeId(1),
            Some("ab".into()),
            &Pending::all(),
        )
        .unwrap();
        assert_eq!(first.relays, Some(vec![]));
        assert_eq!(first.relay_ticket.as_deref(), Some("ab"));
        assert!(next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).is_none());
        // A ticket alone is a message of its own.
        let t = next_map(
            &mut sent,
            &w.snap(),
            NodeId(1),
            Some("cd".into()),
            &Pending::all(),
        )
        .unwrap();
        assert!(t.relays.is_none() && t.peers.is_none() && t.packet_filter.is_none());
        assert_eq!(t.relay_ticket.as_deref(), Some("cd"));
        w.relays = Arc::new(vec![RelayInfo {
            id: wire::RelayId(0),
            name: "coordinator".into(),
            key: wire::RelayKey::from_bytes([1; 32]),
            quic: None,
            cert_sha256: None,
            websocket: Some("http://198.51.100.1:8080/relay".into()),
            stun: vec![],
        }]);
        w.relay_rev += 1;
        let m = next_map(&mut sent, &w.snap(), NodeId(1), None, &Pending::all()).unwrap();
        assert_eq!(m.relays.unwrap().len(), 1);
    }
}
