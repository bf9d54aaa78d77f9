//! What the node-proto benches share: a hub and its peers, real `NodeState`s in memory, and
//! a network that carries their datagrams.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use node_proto::pq::PqConfig;
use node_proto::{NodeConfig, NodeState, SockId};
use wire::filter::{Action, DstPorts, FilterRule, PortRange};
use wire::netmap::{MapResponse, Node};
use wire::{NodeId, NodeKey};

pub(crate) fn key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[31] = 0x40;
    k
}

pub(crate) fn overlay(i: usize) -> Ipv4Addr {
    let n = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i as u32;
    Ipv4Addr::from(n)
}

pub(crate) fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32 + 1)),
        41641,
    )
}

pub(crate) fn node(i: usize, public: NodeKey) -> Node {
    Node {
        id: NodeId(i as u64 + 1),
        name: format!("n{i}"),
        fqdn: format!("n{i}.mesh.internal"),
        node_key: public,
        addresses: vec![overlay(i).into()],
        endpoints: vec![addr(i)],
        user: None,
        tags: vec![],
        online: true,
        last_seen_unix: None,
        key_expiry_unix: None,
        os: String::new(),
        ephemeral: false,
        home_relay: None,
        nat: None,
        advertised_routes: Vec::new(),
        approved_routes: Vec::new(),
        primary_routes: Vec::new(),
    }
}

/// A node's configuration (`rotation`: how often post-quantum keys are replaced).
pub(crate) fn config(i: usize, rotation: Duration) -> NodeConfig {
    NodeConfig {
        private_key: zeroize::Zeroizing::new(key(i)),
        tun_mtu: 1280,
        pq: PqConfig { rotation },
        wall_clock_ms: 1_790_000_000_000,
    }
}

/// A rule that lets anyone reach node `i`.
pub(crate) fn rule(i: usize) -> FilterRule {
    FilterRule {
        origin: "bench".into(),
        action: Action::Accept,
        src: vec!["0.0.0.0/0".parse().unwrap()],
        dst: vec![DstPorts {
            net: IpAddr::V4(overlay(i)).into(),
            ports: PortRange::ANY,
        }],
        protocols: vec![],
        all_protocols: true,
        valid: None,
        cap_grants: Vec::new(),
    }
}

/// Node `i`'s public key.
pub(crate) fn public_key(i: usize) -> NodeKey {
    let secret = gotatun::x25519::StaticSecret::from(key(i));
    NodeKey::from_bytes(gotatun::x25519::PublicKey::from(&secret).to_bytes())
}

/// Node 0 (the hub), whose netmap lists `netmap` peers, and the first `active` of them as
/// nodes that each know only the hub; netmaps applied.
pub(crate) fn hub_and_peers(
    netmap: usize,
    active: usize,
    rotation: Duration,
    now: Instant,
) -> Vec<NodeState> {
    let mut nodes: Vec<NodeState> = (0..=active)
        .map(|i| NodeState::new(config(i, rotation), [i as u8; 32], now))
        .collect();
    let keys: Vec<NodeKey> = (0..=netmap.max(active)).map(public_key).collect();
    assert_eq!(nodes[1].node_key(), keys[1], "keys derive as the core's do");
    nodes[0].handle_netmap(now, hub_map(netmap, &keys));
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        n.handle_netmap(now, peer_map(i, &keys));
    }
    nodes
}

/// Peer `i`'s netmap: the hub only, and the rule that admits anyone to the peer.
pub(crate) fn peer_map(i: usize, keys: &[NodeKey]) -> MapResponse {
    MapResponse {
        seq: 1,
        node: Some(node(i, keys[i])),
        peers: Some(vec![node(0, keys[0])]),
        packet_filter: Some(vec![rule(i)]),
        ..Default::default()
    }
}

/// The hub's netmap: every peer, and the rule that admits anyone to the hub.
pub(crate) fn hub_map(peers: usize, keys: &[NodeKey]) -> MapResponse {
    MapResponse {
        seq: 1,
        node: Some(node(0, keys[0])),
        peers: Some((1..=peers).map(|i| node(i, keys[i])).collect()),
        packet_filter: Some(vec![rule(0)]),
        ..Default::default()
    }
}

/// Delivers datagrams until the network is quiet; times the hub's share.
pub(crate) fn run(nodes: &mut [NodeState], now: Instant, hub_time: &mut Duration) -> usize {
    let mut moved = 0;
    loop {
        let mut progress = false;
        for i in 0..nodes.len() {
            loop {
                let t = Instant::now();
                let next = nodes[i].poll_transmit();
                if i == 0 {
                    *hub_time += t.elapsed();
                }
                let Some(tx) = next else { break };
                progress = true;
                moved += 1;
                let Some(dst) = tx.dst.udp() else { continue };
                let Some(j) = (dst.ip().to_string().starts_with("10."))
                    .then(|| match dst.ip() {
                        IpAddr::V4(v4) => (u32::from(v4) - 0x0a00_0000) as usize - 1,
                        IpAddr::V6(_) => usize::MAX,
                    })
                    .filter(|j| *j < nodes.len())
                else {
                    continue;
                };
                let from = addr(i);
                let t = Instant::now();
                nodes[j].handle_datagram(now, SockId::Main, from, tx.payload);
                if j == 0 {
                    *hub_time += t.elapsed();
                }
                while nodes[j].poll_tun_write().is_some() {}
            }
        }
        if !progress {
            return moved;
        }
    }
}

/// A UDP packet from `src` to `dst` with `payload`.
pub(crate) fn udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39]);
    p.extend_from_slice(&(total - 20).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}
