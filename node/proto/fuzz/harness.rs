//! The fuzz targets' bodies, shared by the coverage-guided fuzzer (`node/proto/fuzz`, run by
//! `scripts/fuzz`) and the workspace test that replays the committed corpora
//! (`node/proto/tests/fuzz_corpus.rs`). Each takes untrusted bytes and must never panic.
//!
//! Targets: every parser that reads bytes from the network — datagrams on the node's port and
//! through relays (WireGuard, handshake frames and cookies, disco, STUN), packets from the TUN
//! and from peers (packet parsing, the filter, the flow table), relay frames, the control
//! handshake and channel, relay tickets and revocation lists, control messages, netmaps and
//! auth keys.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::disallowed_methods
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use node_proto::{NodeConfig, NodeState, Packet, SockId};
use wire::filter::{Action, DstPorts, FilterRule, PortRange};
use wire::netmap::{MapResponse, Node};
use wire::{NodeId, NodeKey};

/// The names of the targets, as directories under `corpus/`.
pub const TARGETS: &[&str] = &[
    "datagram",
    "tun_packet",
    "packet_filter",
    "disco",
    "pq_frames",
    "stun",
    "relay_frame",
    "control_handshake",
    "control_channel",
    "ticket",
    "revocations",
    "control_message",
    "netmap",
    "authkey",
    "keyed",
];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "datagram" => datagram(data),
        "tun_packet" => tun_packet(data),
        "packet_filter" => packet_filter(data),
        "disco" => disco(data),
        "pq_frames" => pq_frames(data),
        "stun" => stun(data),
        "relay_frame" => relay_frame(data),
        "control_handshake" => control_handshake(data),
        "control_channel" => control_channel(data),
        "ticket" => ticket(data),
        "revocations" => revocations(data),
        "control_message" => control_message(data),
        "netmap" => netmap(data),
        "authkey" => authkey(data),
        "keyed" => keyed(data),
        other => panic!("no fuzz target {other}"),
    }
}

pub fn epoch() -> Instant {
    static T: OnceLock<Instant> = OnceLock::new();
    *T.get_or_init(Instant::now)
}

/// The private key of mesh node `i`.
pub fn private_key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[1] = i as u8 + 1;
    k[31] = 0x40;
    k
}

pub fn public_key(i: usize) -> NodeKey {
    let kp = hybrid::StaticKeypair::from_secret(private_key(i));
    NodeKey::from_bytes(kp.public())
}

pub fn overlay(i: usize) -> IpAddr {
    IpAddr::from([100, 64, 0, i as u8 + 1])
}

pub fn endpoint(i: usize) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i as u8 + 1], 41641))
}

fn node(i: usize) -> Node {
    Node {
        id: NodeId(i as u64 + 1),
        name: format!("n{i}"),
        fqdn: format!("n{i}.mesh.internal"),
        node_key: public_key(i),
        addresses: vec![overlay(i)],
        endpoints: vec![endpoint(i)],
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

/// Node `i` of a three-node mesh that lets everything in.
pub fn mesh_node(i: usize) -> NodeState {
    let now = epoch();
    let mut st = NodeState::new(
        NodeConfig {
            private_key: zeroize::Zeroizing::new(private_key(i)),
            tun_mtu: 1280,
            pq: Default::default(),
            wall_clock_ms: 1_790_000_000_000,
        },
        [i as u8; 32],
        now,
    );
    st.handle_netmap(
        now,
        MapResponse {
            seq: 1,
            node: Some(node(i)),
            peers: Some((0..3).filter(|j| *j != i).map(node).collect()),
            packet_filter: Some(vec![FilterRule {
                origin: "fuzz".into(),
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
            }]),
            ..Default::default()
        },
    );
    st
}

fn drain(st: &mut NodeState) {
    while st.poll_transmit().is_some() {}
    while st.poll_tun_write().is_some() {}
    while st.poll_event().is_some() {}
}

/// Splits `data` into records: `[selector u8][len u16 be][bytes]`, the last one taking the
/// rest. Lets one input carry several datagrams (a handshake's two chunks, say).
pub fn records(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some((&sel, rest)) = data.split_first() {
        if rest.len() < 2 {
            out.push((sel, rest));
            break;
        }
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        out.push((sel, &rest[2..2 + n]));
        data = &rest[2 + n..];
    }
    out
}

/// Encodes records for [`records`] (seed generation).
pub fn encode_records(recs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (sel, b) in recs {
        out.push(*sel);
        out.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// Datagrams to node 0 from its peers' endpoints, from strangers and through relays.
pub fn datagram(data: &[u8]) {
    let mut st = mesh_node(0);
    let mut now = epoch();
    for (sel, bytes) in records(data) {
        now += Duration::from_millis(u64::from(sel >> 4) * 100);
        match sel & 0x0f {
            0 => st.handle_datagram(now, SockId::Main, endpoint(1), Packet::copy_from(bytes)),
            1 => st.handle_datagram(now, SockId::Main, endpoint(2), Packet::copy_from(bytes)),
            2 => st.handle_datagram(
                now,
                SockId::Aux(3),
                SocketAddr::from(([203, 0, 113, 9], 999)),
                Packet::copy_from(bytes),
            ),
            3 => st.handle_relay_packet(
                now,
                wire::RelayId(0),
                public_key(1),
                Packet::copy_from(bytes),
            ),
            4 => st.handle_relay_packet(
                now,
                wire::RelayId(0),
                public_key(7),
                Packet::copy_from(bytes),
            ),
            5 => st.handle_tun_packet(now, Packet::copy_from(bytes)),
            _ => st.handle_timeout(now),
        }
        drain(&mut st);
    }
    let _ = st.status(now);
}

/// What an attacker may do between two nodes whose tunnel is up ([`keyed`]).
struct Pair {
    nodes: [NodeState; 2],
    now: Instant,
    /// The newest datagrams the nodes sent each other (to node `.0`), kept once delivered:
    /// the attacker replays what it saw, but does not win races with the originals.
    captured: Vec<(usize, Vec<u8>)>,
    sent: usize,
    /// Packets a node wrote to its TUN device since the last look.
    delivered: [Vec<Vec<u8>>; 2],
    /// Whether the network holds what the nodes send (until [`Pair::release`]), so the
    /// attacker's forgeries can race it.
    hold: bool,
    /// Datagrams held: to which node, whether through a relay.
    in_flight: Vec<(usize, bool, Packet)>,
    /// Whether the nodes hand their crypto out as jobs, as a node's workers run them.
    outside: bool,
    /// With `outside`: whether each node's datagrams arrive, and its jobs run, in batches (as
    /// the workers read and run them), or one by one.
    batched: bool,
    /// Whether the direct path between the nodes is down (their UDP to each other is lost;
    /// the relay, to which both are connected, still carries what they send through it).
    direct_down: bool,
    /// What the nodes sent to the attacker's host (any port of [`STRANGER`]'s address).
    to_attacker: Vec<(SocketAddr, Vec<u8>)>,
    /// The WireGuard cookies the attacker's host holds: for which node, at which port.
    cookies: std::collections::HashMap<(usize, u16), [u8; 16]>,
}

/// Where [`keyed`]'s attacker sends from when it does not forge a node's address.
const STRANGER: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9)), 41641);

/// How many of the nodes' own datagrams [`Pair`] keeps for replays.
const CAPTURED: usize = 256;

impl Pair {
    /// Nodes 0 and 1 of the mesh, their tunnel keyed by a ping from 1 to 0; `mode` bit 0:
    /// crypto outside the core ([`Pair::outside`]), bit 1: in batches ([`Pair::batched`]).
    fn up(mode: u8) -> Self {
        let outside = mode & 1 == 1;
        let mut nodes = [mesh_node(0), mesh_node(1)];
        let relay = wire::RelayInfo {
            id: wire::RelayId(0),
            name: "relay".into(),
            key: wire::RelayKey::from_bytes([9; 32]),
            quic: None,
            cert_sha256: None,
            websocket: None,
            stun: Vec::new(),
        };
        for n in &mut nodes {
            n.set_crypto_outside(outside);
            n.handle_netmap(
                epoch(),
                MapResponse {
                    seq: 2,
                    relays: Some(vec![relay.clone()]),
                    ..Default::default()
                },
            );
            n.relay_state(epoch(), wire::RelayId(0), true);
        }
        let mut pair = Self {
            nodes,
            now: epoch(),
            captured: Vec::new(),
            sent: 0,
            delivered: [Vec::new(), Vec::new()],
            hold: false,
            in_flight: Vec::new(),
            outside,
            batched: outside && mode & 2 == 2,
            direct_down: false,
            to_attacker: Vec::new(),
            cookies: std::collections::HashMap::new(),
        };
        let p = ping(1, 0, 0);
        pair.send(1, &p);
        assert!(
            pair.delivered[0].contains(&p),
            "the tunnel does not come up"
        );
        pair.delivered = [Vec::new(), Vec::new()];
        pair
    }

    /// Node `from` sends `packet` from its TUN device; then everything moves.
    fn send(&mut self, from: usize, packet: &[u8]) {
        self.nodes[from].handle_tun_packet(self.now, Packet::copy_from(packet));
        self.pump();
    }

    /// Lets `d` pass, running each node's timers when it asks to be woken (as the node's
    /// shell does), and moving what they send.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next = self
                .nodes
                .iter()
                .filter_map(|n| n.poll_timeout().map(|(t, _)| t))
                .min();
            match next {
                Some(t) if t <= until => {
                    // A timer that asks for now again moves the clock a little anyway.
                    self.now = t.max(self.now + Duration::from_millis(1)).min(until);
                    self.tick();
                    if self.now == until {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.now = until;
    }

    /// Both nodes' timers, then everything moves.
    fn tick(&mut self) {
        for n in &mut self.nodes {
            n.handle_timeout(self.now);
        }
        self.pump();
    }

    /// Delivers what the network held, in order, and delivers from now on.
    fn release(&mut self) {
        self.hold = false;
        for (to, relayed, bytes) in std::mem::take(&mut self.in_flight) {
            self.capture(to, &bytes);
            self.deliver(to, relayed, bytes);
        }
        self.pump();
    }

    /// Moves what each node sends the other until nothing moves (at most 50 rounds), or
    /// holds it; keeps copies, and drops what goes anywhere else. Crypto jobs run first.
    fn pump(&mut self) {
        for _ in 0..50 {
            let mut moved = false;
            let mut batches: [Vec<(SocketAddr, Packet)>; 2] = [Vec::new(), Vec::new()];
            for from in 0..2 {
                let to = 1 - from;
                self.run_crypto(from);
                while let Some(t) = self.nodes[from].poll_transmit() {
                    let relayed = match t.dst {
                        node_proto::Addr::Udp(SockId::Main, a) if a == endpoint(to) => false,
                        node_proto::Addr::Relay(_, k) if k == public_key(to) => true,
                        node_proto::Addr::Udp(_, a) if a.ip() == STRANGER.ip() => {
                            // Cookie replies go back to whoever asked; tunnel data never.
                            assert!(
                                t.payload.first() != Some(&4),
                                "node {from} sends tunnel data to the attacker's address"
                            );
                            if self.to_attacker.len() < 4096 {
                                self.to_attacker.push((a, t.payload.to_vec()));
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    if self.direct_down && !relayed {
                        continue;
                    }
                    if self.hold {
                        self.in_flight.push((to, relayed, t.payload));
                        continue;
                    }
                    moved = true;
                    self.capture(to, &t.payload);
                    if self.batched && !relayed {
                        batches[to].push((endpoint(from), t.payload));
                    } else {
                        self.deliver(to, relayed, t.payload);
                    }
                }
                while let Some(p) = self.nodes[from].poll_tun_write() {
                    self.delivered[from].push(p.to_vec());
                }
                while self.nodes[from].poll_event().is_some() {}
            }
            for (to, batch) in batches.into_iter().enumerate() {
                if !batch.is_empty() {
                    self.nodes[to].handle_datagrams(self.now, SockId::Main, batch);
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs node `i`'s crypto jobs as its workers would: a batch at a time, in three steps,
    /// or one by one.
    fn run_crypto(&mut self, i: usize) {
        if !self.outside {
            return;
        }
        let now = self.now;
        let n = &mut self.nodes[i];
        if self.batched {
            let mut jobs = std::collections::VecDeque::new();
            n.take_crypto(&mut jobs);
            let mut done = Vec::new();
            node_proto::CryptoJob::run_all(&mut jobs, &n.checks(), &mut done);
            n.handle_crypto_all(now, &mut done);
        } else {
            while let Some(job) = n.poll_crypto() {
                let done = job.run(&n.checks());
                n.handle_crypto(now, done);
            }
        }
    }

    fn capture(&mut self, to: usize, bytes: &[u8]) {
        let entry = (to, bytes.to_vec());
        if self.captured.len() < CAPTURED {
            self.captured.push(entry);
        } else {
            self.captured[self.sent % CAPTURED] = entry;
        }
        self.sent += 1;
    }

    /// The attacker's datagram `bytes` to node `to`, from `from`.
    fn inject(&mut self, to: usize, from: SocketAddr, bytes: &[u8]) {
        self.nodes[to].handle_datagram(self.now, SockId::Main, from, Packet::copy_from(bytes));
    }

    /// [`keyed`]'s op 14: the attacker's host floods node `to` from one of its ports with
    /// initiations carrying the port's cookie, then takes the cookies the node sends it.
    fn cookie_flood(&mut self, to: usize, bytes: &[u8]) {
        let count = 4 * u32::from(*bytes.first().unwrap_or(&1));
        let port = 1024 + u16::from(*bytes.get(1).unwrap_or(&0));
        let from = SocketAddr::new(STRANGER.ip(), port);
        let key = *public_key(to).as_bytes();
        let mut mac1s = std::collections::HashMap::new();
        for i in 0..count {
            let mut m = [0u8; 148];
            m[0] = 1;
            m[4..8].copy_from_slice(&i.to_le_bytes());
            for (j, b) in bytes.iter().skip(2).enumerate() {
                m[8 + (j + i as usize) % 100] ^= b;
            }
            let cookie = self.cookies.get(&(to, port)).copied();
            node_proto::wg::message::set_macs(&mut m, &key, cookie.as_ref());
            mac1s.insert(i, <[u8; 16]>::try_from(&m[116..132]).expect("16 bytes"));
            self.inject(to, from, &m);
        }
        self.pump();
        // A cookie reply names the sender index of the initiation it answers.
        for (a, reply) in std::mem::take(&mut self.to_attacker) {
            if a == from
                && let Some(index) = reply.get(4..8)
                && let Some(mac1) = mac1s.get(&u32::from_le_bytes(index.try_into().expect("4")))
                && let Some(c) = node_proto::wg::message::open_cookie(&reply, &key, mac1)
            {
                self.cookies.insert((to, port), c);
            }
        }
    }

    /// Hands node `to` a datagram from the other node, directly or through a relay.
    fn deliver(&mut self, to: usize, relayed: bool, bytes: Packet) {
        let now = self.now;
        if relayed {
            self.nodes[to].handle_relay_packet(now, wire::RelayId(0), public_key(1 - to), bytes);
        } else {
            self.nodes[to].handle_datagram(now, SockId::Main, endpoint(1 - to), bytes);
        }
    }

    /// A captured datagram chosen by `pick`, and the node it went to.
    fn pick(&self, pick: &[u8]) -> Option<(usize, Vec<u8>)> {
        let i = usize::from(*pick.first()?);
        self.captured.get(i % self.captured.len().max(1)).cloned()
    }

    /// A datagram seen on the way, chosen by `pick`: one still held when `pick[0]`'s top bit
    /// is clear and any is, else one delivered.
    fn pick_seen(&self, pick: &[u8]) -> Option<(usize, &[u8])> {
        let i = usize::from(*pick.first()?);
        if i < 0x80 && !self.in_flight.is_empty() {
            let (to, _, bytes) = &self.in_flight[i % self.in_flight.len()];
            return Some((*to, &bytes[..]));
        }
        let (to, bytes) = self.captured.get(i % self.captured.len().max(1))?;
        Some((*to, &bytes[..]))
    }

    /// Whether pings each way, one a second as `ping` sends them, get through within 6 s of
    /// the core's clock (one handshake retransmission, as after a cookie reply) with the
    /// timers running. Without an attack the first arrives at once; a packet sealed just
    /// before the other side replaced its sessions (after a long hold) may be lost, as in
    /// WireGuard, and the next one goes.
    fn still_works(&mut self) -> Result<(), String> {
        self.direct_down = false;
        self.release();
        for (from, to) in [(1, 0), (0, 1)] {
            self.delivered = [Vec::new(), Vec::new()];
            let mut sent = Vec::new();
            for tick in 0..=24u16 {
                if tick % 4 == 0 {
                    let p = ping(from, to, tick / 4);
                    self.send(from, &p);
                    sent.push(p);
                }
                if self.delivered[to].iter().any(|d| sent.contains(d)) {
                    break;
                }
                if tick == 24 {
                    return Err(format!(
                        "none of node {from}'s pings reached node {to} within 6 s: {:?}",
                        self.nodes[from].status(self.now).peers
                    ));
                }
                self.advance(Duration::from_millis(250));
            }
        }
        Ok(())
    }
}

/// An ICMP echo request from mesh node `from` to `to` with sequence number `seq`.
fn ping(from: usize, to: usize, seq: u16) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (overlay(from), overlay(to)) else {
        unreachable!("the mesh is IPv4")
    };
    let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[8, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&seq.to_be_bytes());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let sum = checksum(&p[20..]);
    p[22..24].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The internet checksum of `b`.
pub fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An attacker between two nodes whose tunnel is up, who knows their public keys and sees
/// what they send each other: injects made-up datagrams, replays what it saw and alters
/// copies, to either node, from the other's address, from elsewhere or through a relay in
/// the other's name; forges responses, cookie replies and data (mac1 right) aimed at the
/// indices it sees; floods with initiations from many ports of a host that takes its cookies, while the network holds the nodes' own messages for a while (delayed,
/// never dropped) or the direct path between them goes down (both reach a relay); the nodes
/// go on talking, and time passes. Whatever it sends, the tunnel
/// must keep working, and no tunnel data may go to the attacker's address: afterwards a ping
/// each way arrives within 6 s (panics otherwise).
///
/// The first byte picks how the nodes run their crypto: inline in the core (bit 0 clear),
/// handed out as jobs one by one (bit 0), or in batches with the datagrams that carry them
/// (bits 0 and 1), as a node's workers do. Then records: the selector's low 4 bits pick the
/// action (14: a host with many ports floods with the cookies it takes), bit 4 the target node, the top 3 bits advance the clock in 2 s steps first (up to
/// 64 records: 15 minutes, past every session's end).
pub fn keyed(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut pair = Pair::up(mode);
    for (sel, bytes) in records(data).into_iter().take(64) {
        pair.advance(Duration::from_secs(u64::from(sel >> 5) * 2));
        let to = usize::from(sel >> 4 & 1);
        let now = pair.now;
        let stranger = STRANGER;
        match sel & 0x0f {
            0 => pair.inject(to, endpoint(1 - to), bytes),
            1 => pair.inject(to, stranger, bytes),
            2 => pair.nodes[to].handle_relay_packet(
                now,
                wire::RelayId(0),
                public_key(1 - to),
                Packet::copy_from(bytes),
            ),
            // A replay, to the node it went to or the other one.
            3..=5 => {
                if let Some((dst, msg)) = pair.pick(bytes) {
                    let dst = if sel & 0x0f == 5 { 1 - dst } else { dst };
                    let from = if sel & 0x0f == 4 {
                        stranger
                    } else {
                        endpoint(1 - dst)
                    };
                    pair.inject(dst, from, &msg);
                }
            }
            // An altered copy: bytes xored in at an offset, the copy cut short, or its
            // header kept (type, index, counter) and the rest made up.
            6..=8 => {
                if let Some((dst, mut msg)) = pair.pick(bytes) {
                    let rest = bytes.get(1..).unwrap_or_default();
                    match sel & 0x0f {
                        6 => {
                            let at = usize::from(*rest.first().unwrap_or(&0));
                            for (i, b) in rest.iter().skip(1).enumerate() {
                                if let Some(m) = msg.get_mut(at + i) {
                                    *m ^= b;
                                }
                            }
                        }
                        7 => msg.truncate(usize::from(*rest.first().unwrap_or(&0))),
                        _ => {
                            msg.truncate(16);
                            msg.extend_from_slice(rest);
                        }
                    }
                    pair.inject(dst, endpoint(1 - dst), &msg);
                }
            }
            9 => {
                let seq = u16::from_be_bytes([*bytes.first().unwrap_or(&0), 1]);
                pair.send(to, &ping(to, 1 - to, seq));
                continue;
            }
            // The network holds what the nodes send (congestion, or an attacker on the path),
            // then delivers it.
            10 => {
                pair.hold = true;
                continue;
            }
            11 => {
                pair.release();
                continue;
            }
            // A forgery aimed at a handshake or session seen on the way (delivered or not):
            // a response, cookie reply or data message (by `bytes[1]`) to the sender index
            // of message `bytes[0]`, sent to the node that index is its, the rest made up.
            12 => {
                let forged = pair.pick_seen(bytes).and_then(|(to, msg)| {
                    let index: [u8; 4] = msg.get(4..8)?.try_into().ok()?;
                    let kind = 2 + bytes.get(1)? % 3;
                    let mut f = vec![kind, 0, 0, 0];
                    // The sender's index sits at 4 in an initiation or response; the
                    // receiver's at 8 in a response, at 4 in a cookie reply or data.
                    if kind == 2 {
                        f.extend_from_slice(&[0; 4]);
                    }
                    f.extend_from_slice(&index);
                    f.extend_from_slice(bytes.get(2..).unwrap_or_default());
                    let len = match kind {
                        2 => 92,
                        3 => 64,
                        _ => f.len().max(32),
                    };
                    f.resize(len, 0);
                    // The attacker knows the public keys: a response's mac1 is right.
                    node_proto::wg::message::set_mac1(&mut f, public_key(1 - to).as_bytes());
                    // The message went to `to`; its sender index is the other node's.
                    Some((1 - to, f))
                });
                if let Some((dst, f)) = forged {
                    pair.inject(dst, endpoint(1 - dst), &f);
                }
            }
            // The direct path goes down (the relay still carries), or comes back.
            13 => {
                pair.direct_down = !pair.direct_down;
                continue;
            }
            // A host that receives what is sent to it (the attacker's address, any port):
            // `4 * bytes[0]` WireGuard initiations with a right mac1, junk after it, from port
            // `bytes[1]`, each with the cookie that port holds (it takes the cookies it is sent).
            14 => {
                pair.cookie_flood(to, bytes);
                continue;
            }
            _ => {
                pair.tick();
                continue;
            }
        }
        pair.pump();
    }
    if let Err(e) = pair.still_works() {
        panic!("{e}");
    }
}

/// Packets the operating system writes to the TUN device.
pub fn tun_packet(data: &[u8]) {
    let mut st = mesh_node(0);
    st.handle_tun_packet(epoch(), Packet::copy_from(data));
    drain(&mut st);
}

/// Packet parsing, the filter and the flow table on one packet from a peer.
pub fn packet_filter(data: &[u8]) {
    use node_proto::conntrack::FlowTable;
    use node_proto::filter::Filter;
    use node_proto::packet::PacketInfo;
    let _ = node_proto::packet::destination(data);
    let _ = node_proto::packet::source(data);
    let _ = node_proto::packet::claimed_len(data);
    let Ok(info) = PacketInfo::parse(data) else {
        return;
    };
    let filter = Filter::new(
        vec![FilterRule {
            origin: "fuzz".into(),
            action: Action::Accept,
            src: vec!["100.64.0.0/10".parse().unwrap()],
            dst: vec![DstPorts {
                net: "100.64.0.0/10".parse().unwrap(),
                ports: PortRange {
                    first: 22,
                    last: 443,
                },
            }],
            protocols: vec![],
            all_protocols: true,
            valid: None,
            cap_grants: Vec::new(),
        }],
        0,
    );
    let mut flows = FlowTable::new(16, 8);
    let now = epoch();
    let owner = public_key(1);
    flows.track_outbound(now, owner, &info.tuple.reversed(), info.transport);
    let _ = flows.classify_inbound(now, owner, &info.tuple, info.transport);
    if filter.evaluate(&info.tuple).is_accept() {
        flows.admit_inbound(now, owner, &info.tuple, info.transport);
    }
    let _ = flows.retain_inbound(|_| false);
    let _ = flows.take_owner(&owner);
}

/// Disco frames and messages.
pub fn disco(data: &[u8]) {
    if let Some((_, sealed)) = node_proto::disco::parse_frame(data) {
        let _ = node_proto::disco::Message::decode(sealed);
    }
    if let Some(m) = node_proto::disco::Message::decode(data) {
        assert_eq!(node_proto::disco::Message::decode(&m.encode()), Some(m));
    }
}

/// Handshake frames, reassembly and admission.
pub fn pq_frames(data: &[u8]) {
    use node_proto::admission::{Admission, Sender};
    use node_proto::frame::{self, Frame, Reassembly};
    let now = epoch();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let mut adm = Admission::new(&public_key(0), &mut rng, now);
    let mut r = Reassembly::default();
    for (sel, bytes) in records(data) {
        let from = node_proto::Addr::main(SocketAddr::from(([198, 51, 100, sel], 41641)));
        // Every fourth address is a peer's.
        let sender = if sel & 12 == 12 {
            Sender::Peer(public_key(usize::from(sel % 3)))
        } else {
            Sender::Stranger
        };
        match frame::decode(bytes) {
            Some(Frame::Chunk(c)) => {
                let _ = adm.check_chunk(now, &mut rng, from, sender, &c, sel & 1 == 1);
                if let Some(msg) = r.push(now, from, &c) {
                    let _ = adm.take_message(now, from, sender, sel & 2 == 2);
                    let _ = node_proto::pq::message_hash(&msg);
                }
            }
            Some(Frame::Cookie { sealed, .. }) => {
                let _ = node_proto::admission::open_cookie(&public_key(0), &[0; 16], sealed);
            }
            None => {}
        }
    }
}

/// STUN responses.
pub fn stun(data: &[u8]) {
    let _ = node_proto::stun::parse_response(data);
}

/// Relay frames (both directions).
pub fn relay_frame(data: &[u8]) {
    if let Ok(f) = relay::proto::decode(data) {
        let again = relay::proto::encode(&f);
        assert_eq!(relay::proto::decode(&again), Ok(f));
    }
    // What a relay's session makes of it, from an admitted node whose rate is limited.
    struct Fixed(Instant);
    impl relay::session::Clock for Fixed {
        fn unix(&self) -> i64 {
            1_000
        }
        fn now(&self) -> Instant {
            self.0
        }
    }
    let auth = relay::TicketAuthorizer::new(wire::TicketKey::from_bytes([9; 32]));
    let mut session = relay::session::Session::new([1; 32], Some(relay::ClientRate::mbit(1)));
    let clock = Fixed(epoch());
    for _ in 0..2 {
        let _ = session.on_frame(data, true, &auth, &clock);
    }
}

/// Message 1 of the control handshake (and of the peer-PSK one), as a coordinator or node
/// reads it from anyone.
pub fn control_handshake(data: &[u8]) {
    let kp = hybrid::StaticKeypair::from_secret(private_key(0));
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
    for purpose in [hybrid::Purpose::Control, hybrid::Purpose::PeerPsk] {
        if let Ok((res, _)) =
            hybrid::ResponderHandshake::read_initiation(&mut rng, purpose, &kp, data)
        {
            let _ = res.respond(&mut rng, &hybrid::Psk::zero(), &[]);
        }
    }
}

/// Frames on an established control channel, as the coordinator reads a node's.
pub fn control_channel(data: &[u8]) {
    let a = hybrid::StaticKeypair::from_secret(private_key(1));
    let b = hybrid::StaticKeypair::from_secret(private_key(0));
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let (ini, m1) = hybrid::InitiatorHandshake::start(
        &mut rng,
        hybrid::Purpose::Control,
        &a,
        &b.public(),
        &hybrid::Psk::zero(),
        &[],
    )
    .unwrap();
    let (res, _) =
        hybrid::ResponderHandshake::read_initiation(&mut rng, hybrid::Purpose::Control, &b, &m1)
            .unwrap();
    let (m2, done) = res.respond(&mut rng, &hybrid::Psk::zero(), &[]).unwrap();
    let mut sender = ini.finish(&m2).unwrap().into_channel();
    let mut ch = done.into_channel();
    ch.limit_inbound(256 << 10);
    for (sel, bytes) in records(data) {
        // Half the records are the fuzzer's bytes sealed properly (past authentication), half
        // raw frames.
        if sel & 1 == 1 {
            for f in sender.seal(bytes).unwrap_or_default() {
                if ch.open(&f).is_err() {
                    return;
                }
            }
        } else if ch.open(bytes).is_err() {
            return;
        }
    }
}

/// Relay tickets as a relay checks them.
pub fn ticket(data: &[u8]) {
    let _ = hybrid::ticket::verify(&[9; 32], data, 0);
    let signer = hybrid::ticket::TicketSigner::from_seed([4; 32]);
    let _ = hybrid::ticket::verify(&signer.public(), data, 0);
}

/// Revocation lists as a relay fetches them.
pub fn revocations(data: &[u8]) {
    let set = relay::revocation::RevocationSet::default();
    let key = wire::TicketKey::from_bytes([9; 32]);
    if let Ok(s) = serde_json::from_slice::<wire::SignedRevocations>(data) {
        let _ = set.apply(&key, &s, 0);
    }
    let _ = serde_json::from_slice::<wire::RevocationList>(data);
}

/// Control messages, both directions (JSON inside the channel).
pub fn control_message(data: &[u8]) {
    let _ = serde_json::from_slice::<wire::ClientMessage>(data);
    let _ = serde_json::from_slice::<wire::ServerMessage>(data);
}

/// Netmaps, applied to a node.
pub fn netmap(data: &[u8]) {
    let Ok(map) = serde_json::from_slice::<MapResponse>(data) else {
        return;
    };
    let mut st = mesh_node(0);
    st.handle_netmap(epoch(), map);
    drain(&mut st);
    let _ = st.status(epoch());
    let _ = st.netmap_snapshot();
}

/// Auth keys as `lattice up` and the coordinator parse them.
pub fn authkey(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<wire::AuthKey>();
    }
}
