use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use wire::filter::{Action, DstPorts, FilterRule, PortRange};
use wire::netmap::{MapResponse, Node};
use wire::{IpProto, NodeId, NodeKey};

use super::*;
use crate::packet::tcp_flags;
use crate::packet::tests::{icmp_echo, ipv4, tcp, udp};

/// N nodes on one flat network, each with one UDP address.
struct Net {
    now: Instant,
    nodes: Vec<NodeState>,
    addrs: Vec<SocketAddr>,
    /// Datagrams dropped on the wire (to simulate an unreachable endpoint).
    blackholed: Vec<SocketAddr>,
}

fn private_key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    // byte 0's low bits are cleared by X25519 clamping, so vary byte 1
    k[1] = i as u8 + 1;
    k[31] = 0x40;
    k
}

fn public_key(i: usize) -> NodeKey {
    let sk = StaticSecret::from(private_key(i));
    NodeKey::from_bytes(PublicKey::from(&sk).to_bytes())
}

fn overlay(i: usize) -> IpAddr {
    IpAddr::from([100, 64, 0, i as u8 + 1])
}

fn node(i: usize, endpoints: Vec<SocketAddr>) -> Node {
    Node {
        id: NodeId(i as u64 + 1),
        name: format!("n{i}"),
        fqdn: format!("n{i}.mesh.internal"),
        node_key: public_key(i),
        addresses: vec![overlay(i)],
        endpoints,
        user: None,
        tags: vec![],
        online: true,
        last_seen_unix: None,
        os: "linux".into(),
        ephemeral: false,
    }
}

fn allow_all(i: usize) -> Vec<FilterRule> {
    vec![FilterRule {
        origin: "test".into(),
        action: Action::Accept,
        src: vec!["0.0.0.0/0".parse().unwrap()],
        dst: vec![DstPorts {
            net: overlay(i).into(),
            ports: PortRange::ANY,
        }],
        protocols: vec![],
        all_protocols: true,
    }]
}

impl Net {
    fn new(n: usize) -> Self {
        let now = crate::test_epoch();
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| format!("192.0.2.{}:41641", i + 1).parse().unwrap())
            .collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut st = NodeState::new(
                NodeConfig {
                    private_key: private_key(i),
                    tun_mtu: 1280,
                },
                [i as u8; 32],
                now,
            );
            st.handle_netmap(
                now,
                MapResponse {
                    seq: 1,
                    node: Some(node(i, vec![addrs[i]])),
                    peers: Some(
                        (0..n)
                            .filter(|j| *j != i)
                            .map(|j| node(j, vec![addrs[j]]))
                            .collect(),
                    ),
                    packet_filter: Some(allow_all(i)),
                    ..Default::default()
                },
            );
            nodes.push(st);
        }
        Self {
            now,
            nodes,
            addrs,
            blackholed: vec![],
        }
    }

    /// Moves datagrams between nodes until nothing is in flight.
    fn run(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(t) = self.nodes[i].poll_transmit() {
                    moved = true;
                    if self.blackholed.contains(&t.dst) {
                        continue;
                    }
                    if let Some(j) = self.addrs.iter().position(|a| *a == t.dst) {
                        let from = self.addrs[i];
                        self.nodes[j].handle_datagram(self.now, from, t.payload);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("network did not settle");
    }

    fn send(&mut self, i: usize, packet: Vec<u8>) {
        self.nodes[i].handle_tun_packet(self.now, Packet::copy_from(&packet[..]));
        self.run();
    }

    fn received(&mut self, i: usize) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.nodes[i].poll_tun_write())
            .map(|p| p.to_vec())
            .collect()
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
        for n in &mut self.nodes {
            n.handle_timeout(self.now);
        }
        self.run();
    }
}

fn v4(i: usize) -> [u8; 4] {
    [100, 64, 0, i as u8 + 1]
}

#[test]
fn first_packet_triggers_a_handshake_and_arrives() {
    let mut net = Net::new(2);
    let ping = ipv4(v4(0), v4(1), 1, &icmp_echo(true, 7, false));
    net.send(0, ping.clone());
    assert_eq!(net.received(1), vec![ping]);
    let st = net.nodes[0].status(net.now);
    assert_eq!(st.peers[0].path.kind, PathKind::Direct);
    assert_eq!(st.peers[0].path.addr, Some(net.addrs[1]));
    assert_eq!(st.peers[0].handshakes, 1);
    let pong = ipv4(v4(1), v4(0), 1, &icmp_echo(false, 7, false));
    net.send(1, pong.clone());
    assert_eq!(net.received(0), vec![pong]);
}

#[test]
fn every_pair_of_three_nodes_talks_both_ways() {
    let mut net = Net::new(3);
    for a in 0..3 {
        for b in 0..3 {
            if a == b {
                continue;
            }
            let p = ipv4(v4(a), v4(b), 17, &udp(1000 + a as u16, 2000, b"hello"));
            net.send(a, p.clone());
            assert_eq!(net.received(b), vec![p], "{a} -> {b}");
        }
    }
}

#[test]
fn a_peer_cannot_spoof_another_peers_overlay_address() {
    let mut net = Net::new(3);
    // node 0 sends a packet claiming to come from node 2's address
    let spoofed = ipv4(v4(2), v4(1), 17, &udp(1, 2, b"x"));
    net.nodes[0].local_addrs.push(overlay(2)); // get it past node 0's own source check
    net.send(0, spoofed);
    assert!(net.received(1).is_empty());
    assert_eq!(net.nodes[1].status(net.now).counters.in_spoofed, 1);
}

#[test]
fn packets_for_unknown_addresses_and_foreign_sources_are_dropped() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), [100, 64, 9, 9], 17, &udp(1, 2, b"")));
    net.send(0, ipv4([10, 0, 0, 1], v4(1), 17, &udp(1, 2, b"")));
    let c = net.nodes[0].status(net.now).counters;
    assert_eq!(c.tun_no_route, 1);
    assert_eq!(c.tun_bad_source, 1);
}

#[test]
fn a_removed_peer_is_cut_off_immediately() {
    let mut net = Net::new(2);
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"before"));
    net.send(0, p.clone());
    assert_eq!(net.received(1), vec![p]);
    net.nodes[1].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            peers_removed: vec![NodeId(1)],
            ..Default::default()
        },
    );
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"after")));
    assert!(net.received(1).is_empty());
    assert!(net.nodes[1].status(net.now).counters.wg_unknown_peer >= 1);
    assert!(net.nodes[1].status(net.now).peers.is_empty());
}

#[test]
fn the_filter_admits_replies_but_not_unsolicited_connections() {
    let mut net = Net::new(2);
    // node 1 only accepts tcp/22 from anyone
    net.nodes[1].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            packet_filter: Some(vec![FilterRule {
                origin: "ssh only".into(),
                action: Action::Accept,
                src: vec!["0.0.0.0/0".parse().unwrap()],
                dst: vec![DstPorts {
                    net: overlay(1).into(),
                    ports: PortRange {
                        first: 22,
                        last: 22,
                    },
                }],
                protocols: vec![IpProto::TCP],
                all_protocols: false,
            }]),
            ..Default::default()
        },
    );
    let syn22 = ipv4(v4(0), v4(1), 6, &tcp(40000, 22, tcp_flags::SYN));
    net.send(0, syn22.clone());
    assert_eq!(net.received(1), vec![syn22]);
    let syn80 = ipv4(v4(0), v4(1), 6, &tcp(40001, 80, tcp_flags::SYN));
    net.send(0, syn80);
    assert!(net.received(1).is_empty());
    assert_eq!(net.nodes[1].status(net.now).counters.in_filtered, 1);
    // node 1 opens a connection to node 0: the reply passes node 1's filter
    net.send(1, ipv4(v4(1), v4(0), 6, &tcp(50000, 8080, tcp_flags::SYN)));
    let synack = ipv4(
        v4(0),
        v4(1),
        6,
        &tcp(8080, 50000, tcp_flags::SYN | tcp_flags::ACK),
    );
    net.send(0, synack.clone());
    assert_eq!(net.received(1), vec![synack]);
}

#[test]
fn a_new_stricter_filter_cuts_established_inbound_flows() {
    let mut net = Net::new(2);
    let syn = ipv4(v4(0), v4(1), 6, &tcp(40000, 5201, tcp_flags::SYN));
    net.send(0, syn);
    assert_eq!(net.received(1).len(), 1);
    net.nodes[1].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            packet_filter: Some(vec![]),
            ..Default::default()
        },
    );
    net.send(0, ipv4(v4(0), v4(1), 6, &tcp(40000, 5201, tcp_flags::ACK)));
    assert!(net.received(1).is_empty());
}

#[test]
fn handshakes_fan_out_to_all_endpoints_and_settle_on_the_one_that_answers() {
    let mut net = Net::new(2);
    let dead: SocketAddr = "198.51.100.99:41641".parse().unwrap();
    net.blackholed.push(dead);
    net.nodes[0].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            peers_changed: vec![node(1, vec![dead, net.addrs[1]])],
            ..Default::default()
        },
    );
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x"));
    net.send(0, p.clone());
    assert_eq!(net.received(1), vec![p]);
    let st = net.nodes[0].status(net.now);
    assert_eq!(st.peers[0].path.addr, Some(net.addrs[1]));
}

#[test]
fn peer_key_rotation_replaces_the_tunnel() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    assert_eq!(net.received(1).len(), 1);
    // node 1 gets a new key; node 0 learns of it from the netmap
    let new_private = private_key(7);
    let mut fresh = NodeState::new(
        NodeConfig {
            private_key: new_private,
            tun_mtu: 1280,
        },
        [9; 32],
        net.now,
    );
    let mut n1 = node(1, vec![net.addrs[1]]);
    n1.node_key = public_key(7);
    fresh.handle_netmap(
        net.now,
        MapResponse {
            seq: 1,
            node: Some(n1.clone()),
            peers: Some(vec![node(0, vec![net.addrs[0]])]),
            packet_filter: Some(allow_all(1)),
            ..Default::default()
        },
    );
    net.nodes[1] = fresh;
    net.nodes[0].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            peers_changed: vec![n1],
            ..Default::default()
        },
    );
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"y"));
    net.send(0, p.clone());
    assert_eq!(net.received(1), vec![p]);
    assert_eq!(
        net.nodes[0].status(net.now).peers[0].node_key,
        public_key(7)
    );
}

#[test]
fn timers_keep_running_and_poll_timeout_is_always_set() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    for _ in 0..20 {
        let (deadline, _) = net.nodes[0].poll_timeout().unwrap();
        assert!(deadline <= net.now + SWEEP_INTERVAL);
        net.tick(Duration::from_millis(300));
    }
    assert_eq!(net.received(1).len(), 1);
}

proptest! {
    #[test]
    fn hostile_datagrams_never_panic_and_are_counted(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        wg_prefix in any::<bool>(),
    ) {
        let mut net = Net::new(2);
        for mut d in datagrams {
            if wg_prefix && d.len() >= 4 {
                d[0] = (d[0] % 4) + 1;
                d[1..4].copy_from_slice(&[0, 0, 0]);
            }
            net.nodes[1].handle_datagram(net.now, net.addrs[0], Packet::copy_from(&d[..]));
        }
        net.run();
        prop_assert!(net.received(1).is_empty());
        let c = net.nodes[1].status(net.now).counters;
        prop_assert!(c.udp_unknown + c.wg_invalid + c.wg_unknown_peer > 0);
    }

    #[test]
    fn hostile_tun_packets_never_panic(packet in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut net = Net::new(2);
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&packet[..]));
        net.run();
    }
}

#[test]
fn a_snapshot_restores_the_same_mesh_in_a_fresh_node() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    let snap = net.nodes[1].netmap_snapshot();
    let mut restarted = NodeState::new(
        NodeConfig {
            private_key: private_key(1),
            tun_mtu: 1280,
        },
        [42; 32],
        net.now,
    );
    restarted.handle_netmap(net.now, snap);
    net.nodes[1] = restarted;
    // Node 0 still uses the old session: that packet is lost, but it makes node 1 start a
    // handshake at once, so the next packet arrives.
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"lost")));
    assert!(net.received(1).is_empty());
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"after restart"));
    net.send(0, p.clone());
    assert_eq!(net.received(1), vec![p]);
}

#[test]
fn stale_session_hints_are_rate_limited_and_ignore_strangers() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    // A data message with an unknown index from an unknown address: no reaction.
    let mut data = vec![4u8, 0, 0, 0, 9, 9, 9, 9];
    data.extend([0u8; 40]);
    let stranger: SocketAddr = "203.0.113.9:5".parse().unwrap();
    net.nodes[1].handle_datagram(net.now, stranger, Packet::copy_from(&data[..]));
    assert!(net.nodes[1].poll_transmit().is_none());
    // From the peer's address: one handshake, then nothing for a while.
    net.nodes[1].handle_datagram(net.now, net.addrs[0], Packet::copy_from(&data[..]));
    let t = net.nodes[1]
        .poll_transmit()
        .expect("a handshake towards the peer");
    assert_eq!(t.dst, net.addrs[0]);
    assert!(net.nodes[1].poll_transmit().is_none());
    net.nodes[1].handle_datagram(net.now, net.addrs[0], Packet::copy_from(&data[..]));
    assert!(net.nodes[1].poll_transmit().is_none());
}
