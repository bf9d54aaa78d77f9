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
        other => panic!("no fuzz target {other}"),
    }
}

fn epoch() -> Instant {
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
    use node_proto::admission::Admission;
    use node_proto::frame::{self, Frame, Reassembly};
    let now = epoch();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let mut adm = Admission::new(&public_key(0), &mut rng, now);
    let mut r = Reassembly::default();
    for (sel, bytes) in records(data) {
        let from = node_proto::Addr::main(SocketAddr::from(([198, 51, 100, sel], 41641)));
        match frame::decode(bytes) {
            Some(Frame::Chunk(c)) => {
                let _ = adm.check_chunk(now, &mut rng, from, &c, sel & 1 == 1);
                if let Some(msg) = r.push(now, from, &c) {
                    let _ = adm.take_message(now, from, sel & 2 == 2);
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
        assert!(relay::proto::decode(&again).is_ok());
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
