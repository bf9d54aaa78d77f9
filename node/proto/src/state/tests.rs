use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use wire::filter::{Action, DstPorts, FilterRule, PortRange};
use wire::netmap::{MapResponse, Node};
use wire::{IpProto, NodeId, NodeKey};

use gotatun::x25519::{PublicKey, StaticSecret};

use super::*;
use crate::addr::{Addr, SockId};
use crate::packet::tcp_flags;
use crate::packet::tests::{icmp_echo, ipv4, tcp, udp};
use crate::pq::{PqConfig, Role};

/// Decides whether the wire loses a datagram (from, to, bytes).
type DropIf = Box<dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> bool>;

/// N nodes on one flat network, each with one UDP address.
struct Net {
    now: Instant,
    nodes: Vec<NodeState>,
    addrs: Vec<SocketAddr>,
    /// Datagrams dropped on the wire (to simulate an unreachable endpoint).
    blackholed: Vec<SocketAddr>,
    /// Flip a byte in every Lattice frame on the wire (an attacker in the path).
    tamper_frames: bool,
    /// Every datagram that crossed the wire: (from, to, bytes).
    wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Drops the datagrams for which it returns true (from, to, bytes).
    drop_if: Option<DropIf>,
    /// Each node's datagrams reach each other node as one batch (`handle_datagrams`), and
    /// cores with crypto outside finish each node's jobs together (`handle_crypto_all`),
    /// instead of one by one.
    finish_together: bool,
}

pub(crate) fn private_key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    // byte 0's low bits are cleared by X25519 clamping, so vary byte 1
    k[1] = i as u8 + 1;
    k[31] = 0x40;
    k
}

/// Wall-clock base for the tests' nodes.
pub(crate) const WALL: u64 = 1_790_000_000_000;

pub(crate) fn config(i: usize, started_later_ms: u64) -> NodeConfig {
    NodeConfig {
        private_key: zeroize::Zeroizing::new(private_key(i)),
        tun_mtu: 1280,
        pq: PqConfig::default(),
        wall_clock_ms: WALL + started_later_ms,
    }
}

pub(crate) fn public_key(i: usize) -> NodeKey {
    let sk = StaticSecret::from(private_key(i));
    NodeKey::from_bytes(PublicKey::from(&sk).to_bytes())
}

pub(crate) fn overlay(i: usize) -> IpAddr {
    IpAddr::from([100, 64, 0, i as u8 + 1])
}

pub(crate) fn node(i: usize, endpoints: Vec<SocketAddr>) -> Node {
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

pub(crate) fn allow_all(i: usize) -> Vec<FilterRule> {
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
        valid: None,
        cap_grants: Vec::new(),
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
            let mut st = NodeState::new(config(i, 0), [i as u8; 32], now);
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
            tamper_frames: false,
            wire: vec![],
            drop_if: None,
            finish_together: false,
        }
    }

    /// Moves datagrams between nodes until nothing is in flight.
    fn run(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            // Together, the datagrams of every node reach each node as one batch.
            let mut batches: Vec<Vec<(SocketAddr, Packet)>> =
                (0..self.nodes.len()).map(|_| Vec::new()).collect();
            for i in 0..self.nodes.len() {
                // A core with crypto outside hands it out; run it as a shell's worker would.
                if self.finish_together {
                    let mut jobs = VecDeque::new();
                    self.nodes[i].take_crypto(&mut jobs);
                    let mut done: Vec<CryptoDone> = Vec::new();
                    CryptoJob::run_all(&mut jobs, &self.nodes[i].checks(), &mut done);
                    self.nodes[i].handle_crypto_all(self.now, &mut done);
                    assert!(done.is_empty());
                }
                while let Some(job) = self.nodes[i].poll_crypto() {
                    let done = job.run(&self.nodes[i].checks());
                    self.nodes[i].handle_crypto(self.now, done);
                }
                while let Some(t) = self.nodes[i].poll_transmit() {
                    moved = true;
                    let Addr::Udp(_, dst) = t.dst else {
                        continue;
                    };
                    if self.blackholed.contains(&dst) {
                        continue;
                    }
                    let from = self.addrs[i];
                    let mut bytes = t.payload.to_vec();
                    if let Some(f) = &mut self.drop_if
                        && f(from, dst, &bytes)
                    {
                        continue;
                    }
                    if self.tamper_frames && bytes.starts_with(&magicsock::FRAME_MAGIC) {
                        let n = bytes.len();
                        bytes[n / 2] ^= 0x01;
                    }
                    self.wire.push((from, dst, bytes.clone()));
                    if let Some(j) = self.addrs.iter().position(|a| *a == dst) {
                        if self.finish_together {
                            batches[j].push((from, Packet::copy_from(&bytes[..])));
                        } else {
                            self.nodes[j].handle_datagram(
                                self.now,
                                SockId::Main,
                                from,
                                Packet::copy_from(&bytes[..]),
                            );
                        }
                    }
                }
            }
            for (j, batch) in batches.into_iter().enumerate() {
                self.nodes[j].handle_datagrams(self.now, SockId::Main, batch);
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

/// The same exchange as above with every core handing its crypto out: the same packets
/// arrive, and the data packets' crypto really went through jobs.
#[test]
fn crypto_outside_the_core_delivers_what_inline_crypto_delivers() {
    let mut net = Net::new(3);
    for n in &mut net.nodes {
        n.set_crypto_outside(true);
    }
    let mut jobs = 0;
    for a in 0..3 {
        for b in 0..3 {
            if a == b {
                continue;
            }
            for round in 0..3u8 {
                let p = ipv4(v4(a), v4(b), 17, &udp(1000 + a as u16, 2000, &[round; 40]));
                net.nodes[a].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
                while let Some(job) = net.nodes[a].poll_crypto() {
                    assert_eq!(job.peer(), public_key(b));
                    let done = job.run(&net.nodes[a].checks());
                    net.nodes[a].handle_crypto(net.now, done);
                    jobs += 1;
                }
                net.run();
                assert_eq!(net.received(b), vec![p], "{a} -> {b}, round {round}");
            }
        }
    }
    // The first packet of each pair waits for the handshake; the rest are sealed as jobs.
    assert!(jobs >= 6 * 2, "{jobs} seal jobs");
    let st = net.nodes[1].status(net.now);
    assert!(st.peers.iter().all(|p| p.traffic.rx_packets >= 3));
}

/// Feeding TUN packets and datagrams as batches (`handle_tun_packets`, `handle_datagrams`)
/// and finishing a batch of jobs together (`handle_crypto_all`), where runs of one peer's packets share one look-up of the
/// peer, its tunnel and its path, deliver and count exactly what handling them one at a time
/// does: the same packets arrive in the same order, with the same counters on every node.
#[test]
fn batches_fed_and_finished_together_match_one_packet_at_a_time() {
    let outcome = |together: bool| {
        let mut net = Net::new(3);
        for a in 0..3 {
            for b in (0..3).filter(|b| *b != a) {
                net.send(a, ipv4(v4(a), v4(b), 17, &udp(999, 999, b"hello")));
            }
        }
        // Pongs make the direct paths trusted: sealed packets then have one target each.
        let trusted = |net: &Net| {
            net.nodes.iter().all(|n| {
                n.peers
                    .values()
                    .all(|p| p.path.sole_target(net.now, n.local_for(&p.node)).is_some())
            })
        };
        for _ in 0..10 {
            if trusted(&net) {
                break;
            }
            net.tick(Duration::from_secs(1));
        }
        assert!(trusted(&net), "every path is trusted");
        for n in &mut net.nodes {
            n.set_crypto_outside(true);
        }
        net.finish_together = together;
        // A run longer than one hold of a tunnel's lock (`run_all`), runs of packets for one
        // peer, two flows interleaved, and runs broken by another peer's packets; both
        // directions at once.
        let mut batches = [Vec::new(), Vec::new(), Vec::new()];
        for i in 0..150u16 {
            let p = ipv4(
                v4(0),
                v4(1),
                17,
                &udp(3000, 2000, &(1000 + i).to_be_bytes()),
            );
            batches[0].push(Packet::copy_from(&p[..]));
        }
        for i in 0..40u16 {
            let (from, to) = match i % 7 {
                0 => (0, 2),
                1 | 4 => (1, 0),
                3 => (2, 1),
                _ => (0, 1),
            };
            let p = ipv4(
                v4(from),
                v4(to),
                17,
                &udp(1000 + i % 2, 2000, &i.to_be_bytes()),
            );
            batches[from].push(Packet::copy_from(&p[..]));
        }
        for (from, batch) in batches.into_iter().enumerate() {
            if together {
                net.nodes[from].handle_tun_packets(net.now, batch);
            } else {
                for p in batch {
                    net.nodes[from].handle_tun_packet(net.now, p);
                }
            }
        }
        net.run();
        (0..3)
            .map(|i| {
                let st = net.nodes[i].status(net.now);
                let traffic: Vec<Traffic> = st.peers.iter().map(|p| p.traffic).collect();
                (net.received(i), st.counters, traffic, st.flows)
            })
            .collect::<Vec<_>>()
    };
    let (one_by_one, together) = (outcome(false), outcome(true));
    // Node 1 got the 150 and the 22 sent to it (and the two greetings).
    assert_eq!(one_by_one[1].0.len(), 150 + 22 + 2);
    assert_eq!(together, one_by_one);
}

/// `take_crypto` hands the jobs out in the order the core made them, into an empty queue
/// (by swapping) and behind jobs already taken: the packets arrive in the order they left.
#[test]
fn taken_crypto_jobs_keep_their_order() {
    let mut net = Net::new(2);
    let first = ipv4(v4(0), v4(1), 17, &udp(1000, 2000, b"first"));
    net.send(0, first.clone());
    assert_eq!(net.received(1), vec![first]);
    net.nodes[0].set_crypto_outside(true);
    let packets: Vec<Vec<u8>> = (0..5u8)
        .map(|i| ipv4(v4(0), v4(1), 17, &udp(1000, 2000, &[i; 20])))
        .collect();
    let mut jobs = VecDeque::new();
    for p in &packets[..2] {
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    }
    net.nodes[0].take_crypto(&mut jobs);
    assert_eq!(jobs.len(), 2, "swapped into the empty queue");
    for p in &packets[2..] {
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    }
    net.nodes[0].take_crypto(&mut jobs);
    assert_eq!(jobs.len(), 5, "appended behind the first two");
    assert!(net.nodes[0].poll_crypto().is_none());
    for job in jobs.drain(..) {
        let done = job.run(&net.nodes[0].checks());
        net.nodes[0].handle_crypto(net.now, done);
    }
    net.run();
    assert_eq!(net.received(1), packets);
}

/// Two nodes whose tunnel carried a first packet (UDP 1000 -> 2000, node 0 to node 1), with
/// node `outside` handing its crypto out as jobs from now on.
fn keyed_pair_with_crypto_outside(outside: usize) -> Net {
    let mut net = Net::new(2);
    let first = ipv4(v4(0), v4(1), 17, &udp(1000, 2000, b"first"));
    net.send(0, first.clone());
    assert_eq!(net.received(1), vec![first]);
    net.nodes[outside].set_crypto_outside(true);
    net
}

/// A crypto job checks the packet it opens against the flow table and the rules itself,
/// without the core: the packet's flow is in the table before the core finishes the job. A
/// packet let in before new rules arrive still reaches the TUN device, but the new rules cut
/// its flow (they forbid it), so the flow's next packet is dropped and counted.
#[test]
fn a_crypto_job_admits_its_packet_and_new_rules_before_it_finishes_cut_the_flow() {
    let mut net = keyed_pair_with_crypto_outside(1);
    let second = ipv4(v4(0), v4(1), 17, &udp(1001, 2000, b"second"));
    net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&second[..]));
    while let Some(t) = net.nodes[0].poll_transmit() {
        net.nodes[1].handle_datagram(net.now, SockId::Main, net.addrs[0], t.payload);
    }
    let job = net.nodes[1].poll_crypto().expect("an open job");
    assert!(net.nodes[1].poll_crypto().is_none());
    let flows = net.nodes[1].status(net.now).flows;
    let done = job.run(&net.nodes[1].checks());
    assert_eq!(
        net.nodes[1].status(net.now).flows,
        flows + 1,
        "admitted by the job"
    );
    net.nodes[1].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            packet_filter: Some(vec![]),
            ..Default::default()
        },
    );
    assert_eq!(net.nodes[1].status(net.now).counters.flows_cut, 2);
    net.nodes[1].handle_crypto(net.now, done);
    assert_eq!(net.received(1), vec![second], "let in before the change");
    net.nodes[1].set_crypto_outside(false);
    let filtered = net.nodes[1].status(net.now).counters.in_filtered;
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1001, 2000, b"third")));
    assert!(net.received(1).is_empty());
    assert_eq!(
        net.nodes[1].status(net.now).counters.in_filtered,
        filtered + 1
    );
}

/// Packets to seal that reach the AEAD step without the check step (a shell that skipped
/// it) are checked there first: one from a source that is not this node's is refused and
/// counted, never sealed; the others are sealed and their flow tracked.
#[test]
fn crypt_all_checks_what_the_check_step_did_not() {
    let mut net = keyed_pair_with_crypto_outside(0);
    let foreign = ipv4([10, 0, 0, 1], v4(1), 17, &udp(1000, 2000, b"spoofed"));
    let fine = ipv4(v4(0), v4(1), 17, &udp(1001, 2000, b"fine"));
    for p in [&foreign, &fine] {
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    }
    let mut jobs = VecDeque::new();
    net.nodes[0].take_crypto(&mut jobs);
    assert_eq!(jobs.len(), 2);
    let (flows, bad) = {
        let st = net.nodes[0].status(net.now);
        (st.flows, st.counters.tun_bad_source)
    };
    let mut done = Vec::new();
    CryptoJob::crypt_all(&mut jobs, &net.nodes[0].checks(), &mut done);
    assert_eq!(
        net.nodes[0].status(net.now).flows,
        flows + 1,
        "the fine one's flow"
    );
    net.nodes[0].handle_crypto_all(net.now, &mut done);
    assert_eq!(
        net.nodes[0].status(net.now).counters.tun_bad_source,
        bad + 1
    );
    net.nodes[0].set_crypto_outside(false);
    net.run();
    assert_eq!(net.received(1), vec![fine]);
}

/// The AEAD of prepared jobs runs without their tunnel's lock, on any thread: a batch of 150
/// packets for one peer, prepared in one pass, is sealed in four parts on four threads (the
/// last part started first) while the test holds the tunnel's lock, and opened on the other
/// node the same way; every packet arrives, in order, and the counts add up.
#[test]
fn prepared_jobs_crypted_on_several_threads_while_the_tunnel_is_locked_arrive_in_order() {
    let mut net = keyed_pair_with_crypto_outside(0);
    net.nodes[1].set_crypto_outside(true);
    let packets: Vec<Vec<u8>> = (0..150u16)
        .map(|i| ipv4(v4(0), v4(1), 17, &udp(1000, 2000, &i.to_be_bytes())))
        .collect();
    for p in &packets {
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    }
    let crypt_split = |node: &mut NodeState| -> Vec<CryptoDone> {
        let mut jobs = VecDeque::new();
        node.take_crypto(&mut jobs);
        assert_eq!(jobs.len(), 150);
        let checks = node.checks();
        CryptoJob::check_all(&mut jobs, &checks);
        CryptoJob::prepare_all(&mut jobs, &checks);
        let tunnel = node
            .peers
            .values()
            .next()
            .and_then(|p| p.tunnel.clone())
            .expect("a tunnel");
        let guard = tunnel.lock();
        let parts = jobs.make_contiguous().chunks_mut(40);
        let n = parts.len();
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            for part in parts.rev() {
                let tx = tx.clone();
                s.spawn(move || {
                    CryptoJob::crypt_prepared(part);
                    let _ = tx.send(());
                });
            }
            let all = (0..n).all(|_| rx.recv_timeout(Duration::from_secs(10)).is_ok());
            drop(guard);
            assert!(all, "the AEAD waited for the tunnel's lock");
        });
        let mut done = Vec::new();
        CryptoJob::finish_all(&mut jobs, &mut done);
        CryptoDone::check_all(&mut done, &checks);
        done
    };
    let mut done = crypt_split(&mut net.nodes[0]);
    net.nodes[0].handle_crypto_all(net.now, &mut done);
    let mut sent = 0;
    while let Some(t) = net.nodes[0].poll_transmit() {
        net.nodes[1].handle_datagram(net.now, SockId::Main, net.addrs[0], t.payload);
        sent += 1;
    }
    assert_eq!(sent, 150);
    let mut done = crypt_split(&mut net.nodes[1]);
    net.nodes[1].handle_crypto_all(net.now, &mut done);
    assert_eq!(net.received(1), packets);
    assert_eq!(net.nodes[1].status(net.now).counters.wg_invalid, 0);
}

/// The replay window is kept by the threads that finish jobs, not by those that run their
/// AEAD: copies of one message opened on different threads at once are delivered once, and a
/// forged copy opened before the real one neither arrives nor keeps it out. A batch of 40
/// forgeries (a changed tag), the 40 messages, and 40 copies of them is opened in three parts
/// on three threads (the last part started first); a second batch of copies is refused whole.
#[test]
fn copies_of_a_message_opened_on_several_threads_at_once_are_delivered_once() {
    let mut net = keyed_pair_with_crypto_outside(1);
    let packets: Vec<Vec<u8>> = (0..40u16)
        .map(|i| ipv4(v4(0), v4(1), 17, &udp(1000, 2000, &i.to_be_bytes())))
        .collect();
    for p in &packets {
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    }
    let messages: Vec<Vec<u8>> = std::iter::from_fn(|| net.nodes[0].poll_transmit())
        .map(|t| t.payload.to_vec())
        .collect();
    assert_eq!(messages.len(), 40);
    let forged = messages.iter().map(|m| {
        let mut f = m.clone();
        let n = f.len();
        f[n - 1] ^= 1;
        f
    });
    let batch: Vec<Vec<u8>> = forged
        .chain(messages.iter().cloned())
        .chain(messages.iter().cloned())
        .collect();
    let (from, now) = (net.addrs[0], net.now);
    let open = |node: &mut NodeState, batch: &[Vec<u8>]| {
        node.handle_datagrams(
            now,
            SockId::Main,
            batch.iter().map(|d| (from, Packet::copy_from(&d[..]))),
        );
        let mut jobs = VecDeque::new();
        node.take_crypto(&mut jobs);
        let checks = node.checks();
        CryptoJob::check_all(&mut jobs, &checks);
        CryptoJob::prepare_all(&mut jobs, &checks);
        std::thread::scope(|s| {
            for part in jobs.make_contiguous().chunks_mut(40).rev() {
                s.spawn(move || CryptoJob::crypt_prepared(part));
            }
        });
        let mut done = Vec::new();
        CryptoJob::finish_all(&mut jobs, &mut done);
        CryptoDone::check_all(&mut done, &checks);
        node.handle_crypto_all(now, &mut done);
    };
    let invalid = net.nodes[1].status(net.now).counters.wg_invalid;
    open(&mut net.nodes[1], &batch);
    assert_eq!(net.received(1), packets);
    assert_eq!(
        net.nodes[1].status(net.now).counters.wg_invalid,
        invalid + 80,
        "the forgeries and the copies"
    );
    open(&mut net.nodes[1], &messages);
    assert!(net.received(1).is_empty());
    assert_eq!(
        net.nodes[1].status(net.now).counters.wg_invalid,
        invalid + 120
    );
}

/// A run of data messages from one address shares one look-up and each is parsed by its job:
/// one with a broken tag, and a stub too short to be a data message, are counted invalid,
/// and the others are delivered in order.
#[test]
fn data_messages_in_a_run_are_parsed_by_their_jobs_and_the_bad_ones_counted() {
    let mut net = keyed_pair_with_crypto_outside(1);
    let packets: Vec<Vec<u8>> = (0..4u8)
        .map(|i| ipv4(v4(0), v4(1), 17, &udp(1000, 2000, &[i; 20])))
        .collect();
    for p in &packets {
        net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    }
    let mut datagrams: Vec<Vec<u8>> = std::iter::from_fn(|| net.nodes[0].poll_transmit())
        .map(|t| t.payload.to_vec())
        .collect();
    assert_eq!(datagrams.len(), 4);
    // The second and third share the first's look-up; the stub breaks the run.
    let n = datagrams[2].len();
    datagrams[2][n - 1] ^= 1;
    let stub = datagrams[0][..20].to_vec();
    datagrams.insert(3, stub);
    let invalid = net.nodes[1].status(net.now).counters.wg_invalid;
    let from = net.addrs[0];
    net.nodes[1].handle_datagrams(
        net.now,
        SockId::Main,
        datagrams.iter().map(|d| (from, Packet::copy_from(&d[..]))),
    );
    let mut jobs = VecDeque::new();
    net.nodes[1].take_crypto(&mut jobs);
    assert_eq!(jobs.len(), 4, "the stub never became a job");
    let mut done = Vec::new();
    CryptoJob::run_all(&mut jobs, &net.nodes[1].checks(), &mut done);
    net.nodes[1].handle_crypto_all(net.now, &mut done);
    assert_eq!(
        net.received(1),
        vec![packets[0].clone(), packets[1].clone(), packets[3].clone()]
    );
    assert_eq!(
        net.nodes[1].status(net.now).counters.wg_invalid,
        invalid + 2
    );
}

/// A job that ran while its peer's tunnel was replaced (here by a switch of the mesh's
/// tunnel security) is dropped: nothing goes out from a tunnel the core no longer holds.
#[test]
fn a_crypto_job_for_a_replaced_tunnel_is_dropped() {
    let mut net = keyed_pair_with_crypto_outside(0);
    let p = ipv4(v4(0), v4(1), 17, &udp(1000, 2000, b"second"));
    net.nodes[0].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    let job = net.nodes[0].poll_crypto().expect("a seal job");
    let done = job.run(&net.nodes[0].checks());
    // The mesh switches to classical tunnels: node 0 rebuilds its tunnel to the same peer.
    net.nodes[0].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            tunnel_security: Some(TunnelSecurity::ClassicalOnly),
            ..Default::default()
        },
    );
    assert_eq!(
        net.nodes[0].status(net.now).peers.len(),
        1,
        "the peer stays"
    );
    while net.nodes[0].poll_transmit().is_some() {}
    net.nodes[0].handle_crypto(net.now, done);
    assert!(
        net.nodes[0].poll_transmit().is_none(),
        "the old tunnel's packet was sent"
    );
}

#[test]
fn a_peer_cannot_spoof_another_peers_overlay_address() {
    let mut net = Net::new(3);
    // node 0 sends a packet claiming to come from node 2's address
    let spoofed = ipv4(v4(2), v4(1), 17, &udp(1, 2, b"x"));
    net.nodes[0].routes_mut().local_addrs.push(overlay(2)); // get it past node 0's own source check
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
                valid: None,
                cap_grants: Vec::new(),
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

/// A TCP segment with sequence numbers and a payload.
fn tcp_seg(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut t = tcp(sport, dport, flags);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(payload);
    t
}

/// An ssh-only rule for node `i`, valid in `[from, until)` Unix seconds if given.
fn ssh_rule(i: usize, valid: Option<(i64, i64)>) -> FilterRule {
    FilterRule {
        origin: "p.hujson:3:5".into(),
        action: Action::Accept,
        src: vec!["0.0.0.0/0".parse().unwrap()],
        dst: vec![DstPorts {
            net: overlay(i).into(),
            ports: PortRange {
                first: 22,
                last: 22,
            },
        }],
        protocols: vec![IpProto::TCP],
        all_protocols: false,
        valid: valid.map(|(from, until)| vec![wire::filter::ValidRange { from, until }]),
        cap_grants: Vec::new(),
    }
}

/// An accept rule from node `src`'s address to `dst` (a subnet, the internet), any
/// protocol and port.
fn accept_from(src: usize, dst: ipnet::IpNet, origin: &str) -> FilterRule {
    FilterRule {
        origin: origin.into(),
        action: Action::Accept,
        src: vec![overlay(src).into()],
        dst: vec![DstPorts {
            net: dst,
            ports: PortRange::ANY,
        }],
        protocols: vec![],
        all_protocols: true,
        valid: None,
        cap_grants: Vec::new(),
    }
}

fn set_rules(net: &mut Net, i: usize, rules: Vec<FilterRule>) {
    let now = net.now;
    net.nodes[i].handle_netmap(
        now,
        MapResponse {
            seq: 2,
            packet_filter: Some(rules),
            ..Default::default()
        },
    );
}

/// Opens an ssh connection from node 0 to node 1 with 10 bytes sent each way; returns the
/// next sequence numbers of the client and the server.
fn open_ssh(net: &mut Net) -> (u32, u32) {
    let (c, srv) = (1000u32, 5000u32);
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(40000, 22, tcp_flags::SYN, c, 0, b""),
        ),
    );
    net.send(
        1,
        ipv4(
            v4(1),
            v4(0),
            6,
            &tcp_seg(22, 40000, tcp_flags::SYN | tcp_flags::ACK, srv, c + 1, b""),
        ),
    );
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(40000, 22, tcp_flags::ACK, c + 1, srv + 1, b"0123456789"),
        ),
    );
    net.send(
        1,
        ipv4(
            v4(1),
            v4(0),
            6,
            &tcp_seg(22, 40000, tcp_flags::ACK, srv + 1, c + 11, b"9876543210"),
        ),
    );
    assert_eq!(
        net.received(1).len(),
        2,
        "the server got the SYN and the data"
    );
    assert_eq!(
        net.received(0).len(),
        2,
        "the client got the SYN-ACK and the data"
    );
    (c + 11, srv + 11)
}

/// The RST packets among `packets`: (src, sport, seq, ack).
fn resets(packets: &[Vec<u8>]) -> Vec<(IpAddr, u16, u32, u32)> {
    packets
        .iter()
        .filter_map(|p| {
            let info = packet::PacketInfo::parse(p).ok()?;
            match info.transport {
                packet::Transport::Tcp {
                    flags, seq, ack, ..
                } if flags & tcp_flags::RST != 0 => {
                    Some((info.tuple.src, info.tuple.src_port, seq, ack))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn a_cut_tcp_connection_is_reset_on_both_ends() {
    let mut net = Net::new(2);
    set_rules(&mut net, 1, vec![ssh_rule(1, None)]);
    let (client_next, server_next) = open_ssh(&mut net);
    set_rules(&mut net, 1, vec![]);
    net.run();
    // The server's socket gets a RST "from the client" at exactly the sequence it expects...
    let to_server = net.received(1);
    assert_eq!(
        resets(&to_server),
        vec![(overlay(0), 40000, client_next, server_next)]
    );
    // ...and the client gets one from the server through the tunnel, which its own filter
    // lets in as part of the flow it opened.
    let to_client = net.received(0);
    assert_eq!(
        resets(&to_client),
        vec![(overlay(1), 22, server_next, client_next)]
    );
    assert_eq!(net.nodes[1].status(net.now).counters.flows_cut, 1);
    // Nothing more of the flow gets through, and the server answering cannot reopen it.
    net.send(
        1,
        ipv4(
            v4(1),
            v4(0),
            6,
            &tcp_seg(22, 40000, tcp_flags::ACK, server_next, client_next, b"x"),
        ),
    );
    net.received(0);
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(
                40000,
                22,
                tcp_flags::ACK,
                client_next,
                server_next + 1,
                b"y",
            ),
        ),
    );
    assert!(net.received(1).is_empty());
}

#[test]
fn a_peer_leaving_the_view_has_its_connections_reset_on_both_ends() {
    let mut net = Net::new(2);
    set_rules(&mut net, 1, vec![ssh_rule(1, None)]);
    let (client_next, server_next) = open_ssh(&mut net);
    // The policy now hides node 0 from node 1 (e.g. its posture failed).
    let now = net.now;
    net.nodes[1].handle_netmap(
        now,
        MapResponse {
            seq: 3,
            peers_removed: vec![NodeId(1)],
            packet_filter: Some(vec![]),
            ..Default::default()
        },
    );
    net.run();
    assert_eq!(
        resets(&net.received(1)),
        vec![(overlay(0), 40000, client_next, server_next)]
    );
    assert_eq!(
        resets(&net.received(0)),
        vec![(overlay(1), 22, server_next, client_next)]
    );
    // A key rotation of a peer, by contrast, keeps its connections.
    let mut net = Net::new(2);
    set_rules(&mut net, 1, vec![ssh_rule(1, None)]);
    open_ssh(&mut net);
    let cut_before = net.nodes[1].status(net.now).counters.flows_cut;
    let mut rotated = node(0, vec![net.addrs[0]]);
    rotated.node_key = public_key(7);
    let now = net.now;
    net.nodes[1].handle_netmap(
        now,
        MapResponse {
            seq: 3,
            peers_changed: vec![rotated],
            ..Default::default()
        },
    );
    assert!(resets(&net.received(1)).is_empty());
    assert_eq!(net.nodes[1].status(net.now).counters.flows_cut, cut_before);
}

#[test]
fn a_closing_time_window_cuts_flows_when_it_closes_and_an_opening_one_admits() {
    let mut net = Net::new(2);
    let start = (WALL / 1000) as i64;
    set_rules(
        &mut net,
        1,
        vec![ssh_rule(1, Some((start + 10, start + 70)))],
    );
    // Before the window: refused.
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(39999, 22, tcp_flags::SYN, 1, 0, b""),
        ),
    );
    assert!(net.received(1).is_empty());
    net.tick(Duration::from_millis(9_999));
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(39998, 22, tcp_flags::SYN, 1, 0, b""),
        ),
    );
    assert!(net.received(1).is_empty(), "admitted too early");
    net.tick(Duration::from_millis(1));
    let (client_next, server_next) = open_ssh(&mut net);
    // The window closes 60 s later; the node wakes exactly then.
    for _ in 0..59 {
        net.tick(Duration::from_secs(1));
        assert!(net.received(1).is_empty(), "cut too early");
    }
    net.tick(Duration::from_secs(1));
    assert_eq!(
        resets(&net.received(1)),
        vec![(overlay(0), 40000, client_next, server_next)]
    );
    assert_eq!(resets(&net.received(0)).len(), 1);
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(40001, 22, tcp_flags::SYN, 1, 0, b""),
        ),
    );
    assert!(net.received(1).is_empty());
}

#[test]
fn a_wall_clock_jump_expires_rules_at_once_and_the_clock_never_goes_back() {
    let mut net = Net::new(2);
    let start = (WALL / 1000) as i64;
    set_rules(&mut net, 1, vec![ssh_rule(1, Some((start, start + 3600)))]);
    open_ssh(&mut net);
    // The machine slept for two hours: the monotonic clock did not move, the wall clock did.
    net.nodes[1].sync_wall_clock(net.now, WALL + 7_200_000);
    assert!(net.nodes[1].poll_timeout().unwrap().0 <= net.now);
    net.tick(Duration::ZERO);
    assert_eq!(resets(&net.received(1)).len(), 1);
    // A clock stepped back does not revive the rule.
    net.nodes[1].sync_wall_clock(net.now, WALL);
    net.tick(Duration::ZERO);
    net.send(
        0,
        ipv4(
            v4(0),
            v4(1),
            6,
            &tcp_seg(40001, 22, tcp_flags::SYN, 1, 0, b""),
        ),
    );
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
    let mut fresh = NodeState::new(config(7, 1000), [9; 32], net.now);
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
            net.nodes[1].handle_datagram(net.now, SockId::Main, net.addrs[0], Packet::copy_from(&d[..]));
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
    let mut restarted = NodeState::new(config(1, 60_000), [42; 32], net.now);
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
fn a_snapshot_keeps_the_relays_and_the_relay_ticket() {
    let mut net = Net::new(2);
    net.nodes[1].handle_netmap(
        net.now,
        MapResponse {
            relays: Some(vec![relay(1), relay(2)]),
            relay_ticket: Some("abcd".into()),
            ..MapResponse::default()
        },
    );
    let snap = net.nodes[1].netmap_snapshot();
    let mut restarted = NodeState::new(config(1, 60_000), [42; 32], net.now);
    restarted.handle_netmap(net.now, snap);
    assert_eq!(restarted.relays(), [relay(1), relay(2)]);
    assert_eq!(restarted.relay_ticket(), Some("abcd"));
    let events: Vec<Event> = std::iter::from_fn(|| restarted.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(e, Event::RelaysChanged)));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::RelayTicket(t) if t == "abcd")),
        "the relay connections are given the ticket"
    );
}

#[test]
fn stale_session_hints_are_rate_limited_and_ignore_strangers() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    // A data message with an unknown index from an unknown address: no reaction.
    let mut data = vec![4u8, 0, 0, 0, 9, 9, 9, 9];
    data.extend([0u8; 40]);
    let stranger: SocketAddr = "203.0.113.9:5".parse().unwrap();
    net.nodes[1].handle_datagram(
        net.now,
        SockId::Main,
        stranger,
        Packet::copy_from(&data[..]),
    );
    assert!(net.nodes[1].poll_transmit().is_none());
    // From the peer's address, Rekey-Timeout after the last handshake: one handshake, then
    // nothing for a while.
    net.tick(Duration::from_secs(6));
    while net.nodes[1].poll_transmit().is_some() {}
    net.nodes[1].handle_datagram(
        net.now,
        SockId::Main,
        net.addrs[0],
        Packet::copy_from(&data[..]),
    );
    let t = net.nodes[1]
        .poll_transmit()
        .expect("a handshake towards the peer");
    assert_eq!(t.dst, Addr::main(net.addrs[0]));
    assert!(net.nodes[1].poll_transmit().is_none());
    net.nodes[1].handle_datagram(
        net.now,
        SockId::Main,
        net.addrs[0],
        Packet::copy_from(&data[..]),
    );
    assert!(net.nodes[1].poll_transmit().is_none());
    // Past the hints' own interval, with that handshake still in flight: nothing either
    // (whoever sends from the peer's address must not replace it; it completes).
    net.now += Duration::from_secs(3);
    net.nodes[1].handle_datagram(
        net.now,
        SockId::Main,
        net.addrs[0],
        Packet::copy_from(&data[..]),
    );
    assert!(
        net.nodes[1].poll_transmit().is_none(),
        "junk replaced the handshake in flight"
    );
    let before = net.nodes[1].status(net.now).peers[0].handshakes;
    net.nodes[0].handle_datagram(net.now, SockId::Main, net.addrs[1], t.payload);
    net.run();
    assert_eq!(
        net.nodes[1].status(net.now).peers[0].handshakes,
        before + 1,
        "the handshake in flight completed"
    );
}

/// Index in `net.wire` of the first datagram matching `f`.
fn first(net: &Net, f: impl Fn(&[u8]) -> bool) -> Option<usize> {
    net.wire.iter().position(|(_, _, b)| f(b))
}

fn is_wg(b: &[u8]) -> bool {
    magicsock::classify(b) == DatagramKind::WireGuard
}

fn is_pq(b: &[u8], kind: crate::frame::Kind) -> bool {
    matches!(crate::frame::decode(b), Some(crate::frame::Frame::Chunk(c)) if c.kind == kind)
}

fn is_pq_resp(b: &[u8]) -> bool {
    is_pq(b, crate::frame::Kind::PqResp)
}

/// The disco messages node `to` could open on the wire, with their index in `net.wire`.
fn disco_messages(net: &Net, to: usize) -> Vec<(usize, crate::disco::Message)> {
    let me = StaticKeypair::from_secret(private_key(to));
    net.wire
        .iter()
        .enumerate()
        .filter(|(_, (_, dst, _))| *dst == net.addrs[to])
        .filter_map(|(i, (_, _, b))| {
            let (sender, sealed) = crate::disco::parse_frame(b)?;
            let key = me.shared_key(&sender, crate::disco::KEY_LABEL)?;
            let plain = hybrid::seal::open(&key, &crate::disco::header(&sender), sealed)?;
            Some((i, crate::disco::Message::decode(&plain)?))
        })
        .collect()
}

#[test]
fn no_wireguard_message_precedes_the_post_quantum_key() {
    let mut net = Net::new(2);
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"first"));
    net.send(0, p.clone());
    assert_eq!(
        net.received(1),
        vec![p],
        "the first packet waited for the key, then arrived"
    );
    let first_wg = first(&net, is_wg).expect("a wireguard handshake happened");
    let first_resp = first(&net, is_pq_resp).expect("a post-quantum exchange happened");
    assert!(
        first_resp < first_wg,
        "wireguard started only after the post-quantum reply"
    );
    for n in &net.nodes {
        let st = n.status(net.now);
        assert!(st.peers[0].pq, "status shows post-quantum");
        assert_eq!(st.peers[0].pq_handshakes, 1);
        assert!(st.peers[0].pq_psk_age.is_some());
        assert_eq!(st.peers[0].pq_error, None);
    }
    // The frames never exceed a conservative path MTU.
    assert!(
        net.wire.iter().all(|(_, _, b)| b.len() <= 1100),
        "no oversized datagram"
    );
}

#[test]
fn traffic_from_the_responder_nudges_the_initiator() {
    let mut net = Net::new(2);
    let responder = if net.nodes[0].pq_role(public_key(1)) == Some(Role::Responder) {
        0
    } else {
        1
    };
    let other = 1 - responder;
    let p = ipv4(
        v4(responder),
        v4(other),
        17,
        &udp(1, 2, b"from the responder"),
    );
    net.send(responder, p.clone());
    assert_eq!(net.received(other), vec![p]);
    let nudge = disco_messages(&net, other)
        .into_iter()
        .find(|(_, m)| matches!(m, crate::disco::Message::PqNudge { .. }))
        .expect("the responder nudged");
    let init = first(&net, |b| is_pq(b, crate::frame::Kind::PqInit)).unwrap();
    assert!(nudge.0 < init, "the initiator started because of the nudge");
}

#[test]
fn rotations_lose_no_packet_and_chain_the_keys() {
    let mut net = Net::new(2);
    for n in &mut net.nodes {
        n.pq_config.rotation = Duration::from_secs(5);
    }
    // Peers were added before the shorter rotation was set: re-create their key schedules.
    for i in 0..2 {
        let mut st = NodeState::new(
            NodeConfig {
                pq: PqConfig {
                    rotation: Duration::from_secs(5),
                },
                ..config(i, 0)
            },
            [i as u8; 32],
            net.now,
        );
        st.handle_netmap(
            net.now,
            MapResponse {
                seq: 1,
                node: Some(node(i, vec![net.addrs[i]])),
                peers: Some(vec![node(1 - i, vec![net.addrs[1 - i]])]),
                packet_filter: Some(allow_all(i)),
                ..Default::default()
            },
        );
        net.nodes[i] = st;
    }
    let mut sent = 0;
    for round in 0..40u16 {
        for (a, b) in [(0, 1), (1, 0)] {
            let p = ipv4(v4(a), v4(b), 17, &udp(round, 9, b"stream"));
            net.send(a, p.clone());
            assert_eq!(net.received(b), vec![p], "round {round}: {a} -> {b}");
            sent += 1;
        }
        net.tick(Duration::from_millis(500));
    }
    assert_eq!(sent, 80);
    let st = net.nodes[0].status(net.now);
    assert!(
        st.peers[0].pq_handshakes >= 3,
        "three rotations in 20 s: {}",
        st.peers[0].pq_handshakes
    );
    assert_eq!(st.peers[0].pq_chain_resets, 0);
    assert!(st.peers[0].pq_psk_age.unwrap() <= Duration::from_secs(6));
}

#[test]
fn tampered_post_quantum_messages_mean_no_tunnel_and_no_user_traffic() {
    let mut net = Net::new(2);
    net.tamper_frames = true;
    for _ in 0..10 {
        net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"must not arrive")));
        net.send(1, ipv4(v4(1), v4(0), 17, &udp(1, 2, b"must not arrive")));
        net.tick(Duration::from_secs(3));
    }
    assert!(net.received(0).is_empty() && net.received(1).is_empty());
    assert!(
        first(&net, is_wg).is_none(),
        "not a single wireguard message was sent"
    );
    let ini = if net.nodes[0].pq_role(public_key(1)) == Some(Role::Initiator) {
        0
    } else {
        1
    };
    let st = net.nodes[ini].status(net.now);
    assert!(!st.peers[0].pq);
    assert_eq!(st.peers[0].path.kind, PathKind::None);
    let why = st.peers[0].path.reason.clone().unwrap();
    assert!(why.contains("post-quantum"), "{why}");
}

#[test]
fn a_replayed_message_1_is_refused_and_changes_no_key() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    assert_eq!(net.received(1).len(), 1);
    let init_frames: Vec<(SocketAddr, SocketAddr, Vec<u8>)> = net
        .wire
        .iter()
        .filter(|(_, _, b)| is_pq(b, crate::frame::Kind::PqInit))
        .cloned()
        .collect();
    assert!(!init_frames.is_empty());
    let responder = net
        .addrs
        .iter()
        .position(|a| *a == init_frames[0].1)
        .unwrap();
    let before = net.nodes[responder].status(net.now);
    // Much later, an attacker replays message 1 from another address.
    net.now += Duration::from_secs(60);
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    for (_, _, b) in &init_frames {
        net.nodes[responder].handle_datagram(
            net.now,
            SockId::Main,
            attacker,
            Packet::copy_from(&b[..]),
        );
    }
    let after = net.nodes[responder].status(net.now);
    assert_eq!(
        after.peers[0].pq_handshakes, before.peers[0].pq_handshakes,
        "no new key"
    );
    assert!(after.counters.pq_rejected > before.counters.pq_rejected);
    assert!(
        net.nodes[responder].poll_transmit().is_none(),
        "nothing sent to the attacker"
    );
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"still works")));
    assert_eq!(net.received(1).len(), 1);
}

#[test]
fn a_classical_only_mesh_uses_plain_wireguard_and_says_so() {
    let mut net = Net::new(2);
    for n in &mut net.nodes {
        n.handle_netmap(
            net.now,
            MapResponse {
                seq: 2,
                tunnel_security: Some(TunnelSecurity::ClassicalOnly),
                ..Default::default()
            },
        );
    }
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"classical"));
    net.send(0, p.clone());
    assert_eq!(net.received(1), vec![p]);
    assert!(
        net.wire
            .iter()
            .all(|(_, _, b)| !b.starts_with(&magicsock::FRAME_MAGIC)),
        "no post-quantum frames"
    );
    let st = net.nodes[0].status(net.now);
    assert!(!st.peers[0].pq);
    assert!(st.peers[0].pq_error.as_ref().unwrap().contains("classical"));
    // Back to post-quantum: classical tunnels are dropped and traffic waits for a new key.
    for n in &mut net.nodes {
        n.handle_netmap(
            net.now,
            MapResponse {
                seq: 3,
                tunnel_security: Some(TunnelSecurity::PostQuantum),
                ..Default::default()
            },
        );
    }
    net.wire.clear();
    let p = ipv4(v4(0), v4(1), 17, &udp(1, 2, b"post-quantum again"));
    net.send(0, p.clone());
    assert_eq!(net.received(1), vec![p]);
    assert!(first(&net, is_pq_resp).unwrap() < first(&net, is_wg).unwrap());
    assert!(net.nodes[0].status(net.now).peers[0].pq);
}

#[test]
fn the_next_rule_change_is_a_wake_up_deadline() {
    let mut net = Net::new(1);
    let start = (WALL / 1000) as i64;
    set_rules(
        &mut net,
        0,
        vec![ssh_rule(0, Some((start + 3, start + 3600)))],
    );
    assert_eq!(
        net.nodes[0].poll_timeout().unwrap(),
        (net.now + Duration::from_secs(3), "rules")
    );
    net.tick(Duration::from_secs(3));
    assert_ne!(
        net.nodes[0].poll_timeout().unwrap().1,
        "rules",
        "the next change is an hour away"
    );
    assert_eq!(net.nodes[0].status(net.now).filter_rules, 1);
}

mod abuse;
mod keys;

#[test]
fn a_subnet_behind_a_router_is_reached_through_it_and_only_its_own_subnet() {
    let mut net = Net::new(2);
    let route: ipnet::IpNet = "10.33.0.0/24".parse().unwrap();
    let lan_host = [10, 33, 0, 5];
    // Nothing routes there yet.
    net.send(0, ipv4(v4(0), lan_host, 17, &udp(1000, 53, b"early")));
    assert_eq!(net.nodes[0].status(net.now).counters.tun_no_route, 1);

    // Node 1 becomes the primary router of 10.33.0.0/24; its filter admits node 0 there.
    let mut router = node(1, vec![net.addrs[1]]);
    router.approved_routes = vec![route];
    router.primary_routes = vec![route];
    let now = net.now;
    net.nodes[0].handle_netmap(
        now,
        MapResponse {
            seq: 2,
            peers_changed: vec![router.clone()],
            ..Default::default()
        },
    );
    let mut rules = allow_all(1);
    rules.push(accept_from(0, route, "route"));
    net.nodes[1].handle_netmap(
        now,
        MapResponse {
            seq: 2,
            node: Some(router),
            packet_filter: Some(rules),
            ..Default::default()
        },
    );
    let events = |st: &mut NodeState| -> Vec<Event> {
        std::iter::from_fn(|| st.poll_event())
            .filter(|e| matches!(e, Event::RoutesChanged { .. }))
            .collect()
    };
    assert_eq!(
        events(&mut net.nodes[0]),
        [Event::RoutesChanged {
            via_peers: vec![route],
            served: vec![],
            exit: false,
        }]
    );
    assert_eq!(
        events(&mut net.nodes[1]),
        [Event::RoutesChanged {
            via_peers: vec![],
            served: vec![route],
            exit: false,
        }]
    );

    // A packet for the LAN host goes to the router, which hands it to its OS to forward; the
    // host's reply comes back through the router.
    let q = ipv4(v4(0), lan_host, 17, &udp(1000, 53, b"query"));
    net.send(0, q.clone());
    assert_eq!(net.received(1), vec![q]);
    let a = ipv4(lan_host, v4(0), 17, &udp(53, 1000, b"answer"));
    net.send(1, a.clone());
    assert_eq!(net.received(0), vec![a]);

    // The router may not speak for addresses outside its subnet, nor a peer for the subnet.
    net.send(1, ipv4([10, 34, 0, 5], v4(0), 17, &udp(53, 1000, b"x")));
    assert_eq!(net.nodes[1].status(net.now).counters.tun_bad_source, 1);
    let mut third = Net::new(3);
    third.nodes[2]
        .routes_mut()
        .local_addrs
        .push(IpAddr::from(lan_host));
    third.send(2, ipv4(lan_host, v4(0), 17, &udp(53, 1000, b"spoof")));
    assert!(third.received(0).is_empty());
    assert_eq!(third.nodes[0].status(third.now).counters.in_spoofed, 1);
}

#[test]
fn a_ping_the_user_asks_for_comes_back_over_the_path_in_use() {
    let mut net = Net::new(2);
    // A first packet sets the tunnel and the direct path up.
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"hi")));
    assert_eq!(net.received(1).len(), 1);
    let _ = std::iter::from_fn(|| net.nodes[0].poll_event()).count();
    let now = net.now;
    assert_eq!(net.nodes[0].ping(now, "n1.mesh.internal."), Ok(NodeId(2)));
    net.tick(Duration::from_millis(20));
    let replies: Vec<Event> = std::iter::from_fn(|| net.nodes[0].poll_event())
        .filter(|e| matches!(e, Event::PingReply { .. }))
        .collect();
    match replies.as_slice() {
        [
            Event::PingReply {
                peer,
                name,
                ipv4,
                from,
                rtt,
            },
        ] => {
            assert_eq!(*peer, NodeId(2));
            assert_eq!((name.as_str(), *ipv4), ("n1", Some(IpAddr::from(v4(1)))));
            assert_eq!(from.udp(), Some(net.addrs[1]), "over the direct path");
            assert!(*rtt <= Duration::from_millis(20));
        }
        other => panic!("one reply expected: {other:?}"),
    }
    // By address too; an unknown name is refused with why.
    assert_eq!(net.nodes[0].ping(now, &v4_text(1)), Ok(NodeId(2)));
    assert_eq!(
        net.nodes[0].ping(now, "nobody"),
        Err("no peer named nobody is visible to this node".into())
    );
}

fn v4_text(i: usize) -> String {
    IpAddr::from(v4(i)).to_string()
}

#[test]
fn a_via_grant_steers_a_subnet_through_its_router_instead_of_the_primary() {
    let mut net = Net::new(4);
    let route: ipnet::IpNet = "10.44.0.0/16".parse().unwrap();
    let lan_host = [10, 44, 0, 5];
    let now = net.now;
    // n1 and n2 both serve the route; n1 is its primary; n3 is offline.
    let mut peers = Vec::new();
    for (i, primary, online) in [(1, true, true), (2, false, true), (3, false, false)] {
        let mut r = node(i, vec![net.addrs[i]]);
        r.approved_routes = vec![route];
        r.primary_routes = if primary { vec![route] } else { vec![] };
        r.online = online;
        peers.push(r.clone());
        net.nodes[i].handle_netmap(
            now,
            MapResponse {
                seq: 2,
                node: Some(r),
                ..Default::default()
            },
        );
        let mut rules = allow_all(i);
        rules[0].dst.push(DstPorts {
            net: route,
            ports: PortRange::ANY,
        });
        set_rules(&mut net, i, rules);
    }
    net.nodes[0].handle_netmap(
        now,
        MapResponse {
            seq: 2,
            peers_changed: peers,
            ..Default::default()
        },
    );
    let q = || ipv4(v4(0), lan_host, 17, &udp(1000, 53, b"q"));
    net.send(0, q());
    assert_eq!(net.received(1), vec![q()], "the primary carries it");

    // The policy steers node 0 through n3 (offline) or n2: the first online one carries it.
    net.nodes[0].handle_netmap(
        now,
        MapResponse {
            seq: 3,
            via_routes: Some([(route, vec![NodeId(4), NodeId(3)])].into()),
            ..Default::default()
        },
    );
    net.send(0, q());
    assert!(
        net.received(1).is_empty(),
        "not through the primary any more"
    );
    assert_eq!(net.received(2), vec![q()]);
    // Its replies come back from the subnet through n2, and are admitted.
    let a = ipv4(lan_host, v4(0), 17, &udp(53, 1000, b"a"));
    net.send(2, a.clone());
    assert_eq!(net.received(0), vec![a]);
    // The steering ends with the grant: back to the primary.
    net.nodes[0].handle_netmap(
        now,
        MapResponse {
            seq: 4,
            via_routes: Some(Default::default()),
            ..Default::default()
        },
    );
    net.send(0, q());
    assert_eq!(net.received(1), vec![q()]);
}

#[test]
fn an_exit_node_carries_internet_traffic_for_the_node_that_chose_it_and_only_replies_come_back() {
    let mut net = Net::new(3);
    let internet = [198, 18, 0, 80];
    let now = net.now;
    // Node 0 chooses n1 before n1 offers exit routes: internet traffic is dropped, and status
    // says why.
    net.nodes[0].set_exit_node(Some("n1.mesh.internal.".into()));
    net.send(0, ipv4(v4(0), internet, 17, &udp(1000, 53, b"early")));
    assert_eq!(net.nodes[0].status(net.now).counters.tun_no_route, 1);
    let exit = net.nodes[0].status(now).exit_node.unwrap();
    assert_eq!(exit.name.as_deref(), Some("n1"));
    assert!(
        exit.problem
            .unwrap()
            .contains("does not offer an approved exit route"),
        "the problem names the cause"
    );

    // n1's exit routes are approved; its filter lets node 0 out to the internet.
    let exit_routes: Vec<ipnet::IpNet> =
        vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    let mut n1 = node(1, vec![net.addrs[1]]);
    n1.approved_routes.clone_from(&exit_routes);
    n1.primary_routes.clone_from(&exit_routes);
    for i in [0, 2] {
        net.nodes[i].handle_netmap(
            now,
            MapResponse {
                seq: 2,
                peers_changed: vec![n1.clone()],
                ..Default::default()
            },
        );
    }
    let mut rules = allow_all(1);
    rules.push(accept_from(0, "0.0.0.0/0".parse().unwrap(), "exit"));
    net.nodes[1].handle_netmap(
        now,
        MapResponse {
            seq: 2,
            node: Some(n1),
            packet_filter: Some(rules),
            ..Default::default()
        },
    );
    let routes: Vec<Event> = std::iter::from_fn(|| net.nodes[1].poll_event())
        .filter(|e| matches!(e, Event::RoutesChanged { .. }))
        .collect();
    assert_eq!(
        routes,
        [Event::RoutesChanged {
            via_peers: vec![],
            served: vec![],
            exit: true,
        }],
        "the exit node's shell sets up forwarding; exit routes are no subnet routes"
    );
    let exit = net.nodes[0].status(now).exit_node.unwrap();
    assert_eq!((exit.problem, exit.online), (None, true));

    // Node 0's internet traffic goes to n1, which hands it to its OS; the answer comes back.
    let q = ipv4(v4(0), internet, 17, &udp(1000, 53, b"query"));
    net.send(0, q.clone());
    assert_eq!(net.received(1), vec![q]);
    let a = ipv4(internet, v4(0), 17, &udp(53, 1000, b"answer"));
    net.send(1, a.clone());
    assert_eq!(net.received(0), vec![a]);

    // The internet cannot open a connection to node 0 through the exit node, though node 0's
    // rules admit every source.
    let filtered = net.nodes[0].status(net.now).counters.in_filtered;
    net.send(1, ipv4(internet, v4(0), 17, &udp(53, 2000, b"unsolicited")));
    assert!(net.received(0).is_empty());
    assert_eq!(
        net.nodes[0].status(net.now).counters.in_filtered,
        filtered + 1
    );
    // The exit node cannot speak for mesh addresses, a peer's or one nobody has.
    for src in [v4(2), [100, 64, 9, 9]] {
        net.nodes[1]
            .routes_mut()
            .local_addrs
            .push(IpAddr::from(src));
        net.send(1, ipv4(src, v4(0), 17, &udp(53, 1000, b"spoof")));
    }
    assert!(net.received(0).is_empty());
    assert_eq!(net.nodes[0].status(net.now).counters.in_spoofed, 2);
    // Mesh addresses nobody owns never go to the exit node.
    net.send(0, ipv4(v4(0), [100, 64, 9, 9], 17, &udp(1000, 53, b"x")));
    assert_eq!(net.nodes[0].status(net.now).counters.tun_no_route, 2);
    // A node that did not choose the exit node takes no internet source from it.
    net.send(1, ipv4(internet, v4(2), 17, &udp(53, 1000, b"not yours")));
    assert!(net.received(2).is_empty());
    assert_eq!(net.nodes[2].status(net.now).counters.in_spoofed, 1);
    // When node 2 chooses n1 too, n1's filter keeps it in: it admits node 0 only.
    net.nodes[2].set_exit_node(Some("n1".into()));
    let dropped = net.nodes[1].status(net.now).counters.in_filtered;
    net.send(2, ipv4(v4(2), internet, 17, &udp(1001, 53, b"me too")));
    assert!(net.received(1).is_empty());
    assert_eq!(
        net.nodes[1].status(net.now).counters.in_filtered,
        dropped + 1
    );

    // Without an exit node, internet traffic has no route again.
    net.nodes[0].set_exit_node(None);
    net.send(0, ipv4(v4(0), internet, 17, &udp(1000, 53, b"late")));
    assert_eq!(net.nodes[0].status(net.now).counters.tun_no_route, 3);
    assert!(net.received(1).is_empty());
    assert_eq!(net.nodes[0].status(net.now).exit_node, None);
}

#[test]
fn app_grants_tell_the_destination_what_a_peer_may_do_and_admit_no_packet() {
    let mut net = Net::new(3);
    let caps: BTreeMap<String, Vec<serde_json::Value>> = [(
        "example.com/cap/db".to_owned(),
        vec![serde_json::json!({"role": "ro"})],
    )]
    .into();
    let grant = FilterRule {
        origin: "app".into(),
        action: Action::Accept,
        src: vec![overlay(0).into()],
        dst: vec![],
        protocols: vec![],
        all_protocols: false,
        valid: None,
        cap_grants: vec![wire::filter::CapGrant {
            dsts: vec![overlay(1).into()],
            caps: caps.clone(),
        }],
    };
    // Node 1 admits nothing but carries the grant.
    set_rules(&mut net, 1, vec![grant]);
    assert_eq!(net.nodes[1].capabilities_of(overlay(0)), caps);
    assert!(
        net.nodes[1].capabilities_of(overlay(2)).is_empty(),
        "not granted to node 2"
    );
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    assert!(net.received(1).is_empty(), "an app grant admits no packet");
}

/// Node 0, given `map` (its own node and the first sequence number filled in).
pub(super) fn node_zero(now: Instant, map: MapResponse) -> NodeState {
    let mut a = NodeState::new(config(0, 0), [0; 32], now);
    a.handle_netmap(
        now,
        MapResponse {
            seq: 1,
            node: Some(node(0, vec![])),
            ..map
        },
    );
    a
}

/// Relay `id` of a test netmap (no way to reach it: the tests say when it is connected).
fn relay(id: u32) -> RelayInfo {
    RelayInfo {
        id: RelayId(id),
        name: format!("r{id}"),
        key: wire::RelayKey::from_bytes([id as u8; 32]),
        quic: None,
        cert_sha256: None,
        websocket: None,
        stun: Vec::new(),
    }
}

/// The core chooses the home relay: the first connected, a faster one by a fifth, the best
/// left when it goes down or leaves the relay list; each change is an event for the shell,
/// and peers without a relay of their own are reached through it.
#[test]
fn the_home_relay_follows_connections_round_trips_and_the_relay_list() {
    use wire::{RelayId, RelayInfo};
    let now = crate::test_epoch();
    let map = |seq: u64, relays: Vec<RelayInfo>| MapResponse {
        seq,
        node: Some(node(0, vec![])),
        peers: Some(vec![node(1, vec![])]),
        packet_filter: Some(allow_all(0)),
        relays: Some(relays),
        ..Default::default()
    };
    let mut a = NodeState::new(config(0, 0), [0; 32], now);
    a.handle_netmap(now, map(1, vec![relay(1), relay(2)]));
    let homes = |a: &mut NodeState| -> Vec<Option<RelayId>> {
        std::iter::from_fn(|| a.poll_event())
            .filter_map(|e| match e {
                Event::HomeRelay(h) => Some(h),
                _ => None,
            })
            .collect()
    };
    homes(&mut a);
    a.relay_state(now, RelayId(2), true);
    a.relay_state(now, RelayId(1), true);
    assert_eq!(homes(&mut a), vec![Some(RelayId(2))], "the first connected");
    a.relay_rtt(RelayId(2), Duration::from_millis(40));
    a.relay_rtt(RelayId(1), Duration::from_millis(35));
    assert!(homes(&mut a).is_empty(), "not a fifth faster");
    a.relay_rtt(RelayId(1), Duration::from_millis(10));
    assert_eq!(homes(&mut a), vec![Some(RelayId(1))]);
    assert_eq!(a.home_relay().home(), Some(RelayId(1)));
    // Peer 1 names no home relay: it is reached through ours.
    let peer = a.peers.get(&public_key(1)).unwrap().node.clone();
    assert_eq!(a.relay_for(&peer), Some(RelayId(1)));
    a.relay_state(now, RelayId(1), false);
    assert_eq!(homes(&mut a), vec![Some(RelayId(2))], "the one left");
    a.relay_state(now, RelayId(1), true);
    a.handle_netmap(now, map(2, vec![relay(1)]));
    assert_eq!(
        homes(&mut a),
        vec![Some(RelayId(1))],
        "relay 2 left the list"
    );
    a.relay_state(now, RelayId(1), false);
    assert_eq!(homes(&mut a), vec![None]);
    assert_eq!(a.relay_for(&peer), None);
}

/// What the coordinator is told of this node (its home relay, its NAT with the gateway port
/// mapping) is reported once per change, and again after the shell could not deliver it.
#[test]
fn the_coordinator_is_told_the_home_relay_and_nat_once_per_change() {
    use wire::{NatInfo, RelayId};
    let now = crate::test_epoch();
    let mut a = node_zero(
        now,
        MapResponse {
            relays: Some(vec![relay(1)]),
            ..Default::default()
        },
    );
    let reports = |a: &mut NodeState| -> Vec<(Option<RelayId>, NatInfo)> {
        std::iter::from_fn(|| a.poll_event())
            .filter_map(|e| match e {
                Event::ReportNetInfo { home_relay, nat } => Some((home_relay, nat)),
                _ => None,
            })
            .collect()
    };
    assert!(reports(&mut a).is_empty(), "nothing to tell yet");
    let mapped: SocketAddr = "203.0.113.7:41641".parse().unwrap();
    a.set_port_mapping(Some(mapped));
    assert!(
        reports(&mut a).is_empty(),
        "a mapping alone, before any netcheck"
    );
    a.relay_state(now, RelayId(1), true);
    assert_eq!(
        reports(&mut a),
        vec![(Some(RelayId(1)), NatInfo::default())]
    );
    // A netcheck's result: the NAT goes with the port mapping.
    let nat = NatInfo {
        udp: true,
        ..NatInfo::default()
    };
    a.nat = Some(nat.clone());
    a.report_netinfo();
    let with_mapping = NatInfo {
        port_mapped: Some(mapped),
        ..nat.clone()
    };
    assert_eq!(
        reports(&mut a),
        vec![(Some(RelayId(1)), with_mapping.clone())]
    );
    assert_eq!(a.netinfo(), (Some(RelayId(1)), Some(with_mapping)));
    a.set_port_mapping(Some(mapped));
    a.relay_rtt(RelayId(1), Duration::from_millis(5));
    assert!(reports(&mut a).is_empty(), "nothing changed");
    // Lost on the way: the next change reports all of it.
    a.netinfo_undelivered();
    a.set_port_mapping(None);
    assert_eq!(reports(&mut a), vec![(Some(RelayId(1)), nat.clone())]);
    a.relay_state(now, RelayId(1), false);
    assert_eq!(reports(&mut a), vec![(None, nat)]);
    // Advertised: the gateway's mapping first, then the interfaces' candidates, once each
    // (no netcheck ran here, so no public address; the simulator's NAT tests need that one).
    let lan: SocketAddr = "192.168.1.5:41641".parse().unwrap();
    assert_eq!(a.advertised_endpoints(vec![lan]), vec![lan]);
    a.set_port_mapping(Some(mapped));
    assert_eq!(a.advertised_endpoints(vec![lan]), vec![mapped, lan]);
    assert_eq!(a.advertised_endpoints(vec![lan, mapped]), vec![lan, mapped]);
}
