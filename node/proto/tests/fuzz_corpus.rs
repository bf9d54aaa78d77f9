//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/*`) through the fuzz targets'
//! bodies, so every input the fuzzer kept (seeds, and any crash it found, turned into a
//! regression) is checked by the normal test suite. `UPDATE_FUZZ_SEEDS=1` rewrites the seeds.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

use node_proto::{Packet, SockId};
use proptest::collection::vec;
use proptest::prelude::*;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn the_committed_fuzz_corpora_replay_without_a_panic() {
    if std::env::var_os("UPDATE_FUZZ_SEEDS").is_some() {
        write_seeds();
    }
    for target in harness::TARGETS {
        let dir = corpus(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            harness::run(target, &std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus for {target}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The `keyed` target (crypto inline, or handed out as jobs one by one or in batches) on
    /// made-up attacks between two keyed nodes (injections, replays,
    /// altered copies, forgeries aimed at the indices on the way, the network holding the
    /// nodes' messages, pings and time passing): a ping each way still arrives within 6 s
    /// afterwards, and no tunnel data goes to the attacker's address (the target panics
    /// otherwise).
    #[test]
    fn an_attacker_between_two_keyed_nodes_never_stops_their_tunnel(
        mode in 0u8..4,
        recs in vec((any::<u8>(), vec(any::<u8>(), 0..48)), 1..48)
    ) {
        let mut input = vec![mode];
        input.extend(harness::encode_records(&recs));
        harness::keyed(&input);
    }
}

fn write_seeds() {
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    // Everything nodes 1 and 2 send node 0 while they key their tunnels and exchange a packet
    // with it: post-quantum frames, confirmations, disco, WireGuard. On the harness's clock,
    // so the seeds come out the same each time.
    let now = harness::epoch();
    let mut recs = Vec::new();
    for x in [1usize, 2] {
        let mut zero = harness::mesh_node(0);
        let mut other = harness::mesh_node(x);
        let ping = ipv4(
            [100, 64, 0, x as u8 + 1],
            [100, 64, 0, 1],
            1,
            &[8, 0, 0, 0, 0, 1, 0, 1],
        );
        other.handle_tun_packet(now, Packet::copy_from(&ping[..]));
        for _ in 0..20 {
            let mut moved = false;
            while let Some(t) = other.poll_transmit() {
                if t.dst == node_proto::Addr::main(harness::endpoint(0)) {
                    moved = true;
                    recs.push((x as u8 - 1, t.payload.to_vec()));
                    zero.handle_datagram(now, SockId::Main, harness::endpoint(x), t.payload);
                }
            }
            while let Some(t) = zero.poll_transmit() {
                if t.dst == node_proto::Addr::main(harness::endpoint(x)) {
                    moved = true;
                    other.handle_datagram(now, SockId::Main, harness::endpoint(0), t.payload);
                }
            }
            while zero.poll_tun_write().is_some() {}
            if !moved {
                break;
            }
        }
    }
    assert!(recs.len() > 4, "{}", recs.len());
    for (i, r) in recs.iter().enumerate() {
        seeds.push((
            "datagram",
            leak(format!("from-peer-{i}")),
            harness::encode_records(std::slice::from_ref(r)),
        ));
    }
    seeds.push(("datagram", "from-peer-all", harness::encode_records(&recs)));
    let ping = ipv4(
        [100, 64, 0, 2],
        [100, 64, 0, 1],
        1,
        &[8, 0, 0, 0, 0, 1, 0, 1],
    );
    let relayed: Vec<(u8, Vec<u8>)> = recs.iter().map(|(_, b)| (3u8, b.clone())).collect();
    seeds.push((
        "datagram",
        "through-relay",
        harness::encode_records(&relayed),
    ));
    let pq: Vec<(u8, Vec<u8>)> = recs
        .iter()
        .filter(|(_, b)| b.get(4).is_some_and(|k| *k == 1))
        .map(|(_, b)| (7u8, b.clone()))
        .collect();
    seeds.push(("pq_frames", "message-1", harness::encode_records(&pq)));
    // An attacker between two keyed nodes: replays of everything (to where it went, from
    // elsewhere, to the other node), altered copies, and time passing past rekeys.
    let replays: Vec<(u8, Vec<u8>)> = (0..48u8)
        .map(|i| (3 + i % 3 + (i & 0x10), vec![i]))
        .collect();
    let mut keyed = vec![("replays", harness::encode_records(&replays))];
    let altered: Vec<(u8, Vec<u8>)> = (0..48u8)
        .map(|i| (6 + i % 3, vec![i, 16 + i, 0x80, i]))
        .collect();
    keyed.push(("altered", harness::encode_records(&altered)));
    let mut talk = Vec::new();
    for i in 0..20u8 {
        talk.push((0xe9 + (i & 0x10), vec![i]));
        talk.push((0xed, vec![]));
        talk.push((3 + (i & 0x10), vec![0xff - i]));
    }
    keyed.push(("rekeys-and-replays", harness::encode_records(&talk)));
    // The sessions run out (196 s); the network holds a new handshake while forged
    // responses, cookie replies and data race it to every index on the way.
    let mut race: Vec<(u8, Vec<u8>)> = (0..14).map(|_| (0xed, vec![])).collect();
    race.push((0x0a, vec![]));
    race.push((0x19, vec![1]));
    for i in 0..24u8 {
        race.push((0x0c, vec![i / 3, i % 3, i]));
    }
    race.push((0x0b, vec![]));
    // The direct path goes down while both talk: the relay carries them; replays and
    // forgeries go on meanwhile; then it comes back.
    let mut outage = vec![(0x0d, vec![])];
    for i in 0..12u8 {
        outage.push((0x49 + (i & 1) * 0x10, vec![i]));
        outage.push((0x23 + (i & 1) * 0x10, vec![i * 7]));
        outage.push((0x0c, vec![i, i % 3, i]));
    }
    outage.push((0x0d, vec![]));
    outage.push((0x89, vec![99]));
    keyed.push((
        "forged-answers-race-a-handshake",
        harness::encode_records(&race),
    ));
    keyed.push(("direct-path-down", harness::encode_records(&outage)));
    // A host takes cookies at 30 ports of its address (node 0 under load from the first
    // floods), then floods with them from each port in turn as the sessions rekey and run out
    // (the nodes ping each other between floods).
    let mut cookied: Vec<(u8, Vec<u8>)> = (0..30u8).map(|p| (0x0e, vec![250, p])).collect();
    for i in 0..16u8 {
        cookied.push((0xce, vec![250, i % 30, i]));
        cookied.push((0x09 + (i & 1) * 0x10, vec![i]));
    }
    keyed.push(("cookie-flood", harness::encode_records(&cookied)));
    // Each with the crypto inline, handed out one job at a time, and in batches.
    for (name, recs) in keyed {
        for (mode, how) in [(0u8, "inline"), (1, "jobs"), (3, "batches")] {
            let mut input = vec![mode];
            input.extend_from_slice(&recs);
            seeds.push(("keyed", leak(format!("{name}-{how}")), input));
        }
    }
    for (i, (_, b)) in recs.iter().enumerate() {
        if b.get(4) == Some(&5) {
            seeds.push(("disco", leak(format!("frame-{i}")), b.clone()));
        }
    }
    seeds.push(("disco", "ping", vec![1; 21]));
    // Packets.
    let udp = ipv4(
        [100, 64, 0, 1],
        [100, 64, 0, 2],
        17,
        &[0, 1, 0, 2, 0, 12, 0, 0, 1, 2, 3, 4],
    );
    let syn = ipv4(
        [100, 64, 0, 2],
        [100, 64, 0, 1],
        6,
        &[
            0, 80, 0, 22, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ],
    );
    for (name, p) in [("icmp", &ping), ("udp", &udp), ("tcp-syn", &syn)] {
        seeds.push(("tun_packet", name, p.clone()));
        seeds.push(("packet_filter", name, p.clone()));
    }
    // STUN: a request and the relay's real answer.
    let req = node_proto::stun::binding_request([7; 12]);
    let answer = relay::stun::answer(&req, "203.0.113.5:41641".parse().unwrap()).unwrap();
    seeds.push(("stun", "request", req));
    seeds.push(("stun", "response", answer));
    // Relay frames.
    let send = relay::proto::encode_packet(false, &[3; 32], b"payload");
    seeds.push(("relay_frame", "send", send));
    seeds.push((
        "relay_frame",
        "challenge",
        relay::proto::encode(&relay::proto::Frame::Challenge {
            version: 1,
            nonce: [5; 32],
        }),
    ));
    // A control handshake's message 1 to node 0's key.
    let machine = hybrid::StaticKeypair::from_secret(harness::private_key(2));
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    let (_, m1) = hybrid::InitiatorHandshake::start(
        &mut rng,
        hybrid::Purpose::Control,
        &machine,
        harness::public_key(0).as_bytes(),
        &hybrid::Psk::zero(),
        &[],
    )
    .unwrap();
    seeds.push(("control_handshake", "message-1", m1));
    let hello = br#"{"type": "hello", "capability": 1, "node_key": "nodekey:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "hostname": "db-1", "endpoints": ["10.0.0.1:41641"]}"#;
    seeds.push((
        "control_channel",
        "hello",
        harness::encode_records(&[(1, hello.to_vec())]),
    ));
    seeds.push(("control_message", "hello", hello.to_vec()));
    seeds.push((
        "control_message",
        "endpoints",
        br#"{"type": "endpoints", "endpoints": ["198.51.100.7:41641"]}"#.to_vec(),
    ));
    // A ticket and a revocation list.
    let signer = hybrid::ticket::TicketSigner::from_seed([4; 32]);
    let t = signer.issue(hybrid::ticket::Ticket {
        node_key: [1; 32],
        not_after: 10,
    });
    seeds.push(("ticket", "valid", t.to_vec()));
    let list = serde_json::to_string(&wire::RevocationList {
        issued_at: 1,
        revoked: vec![wire::Revocation {
            node_key: harness::public_key(1),
            until: 5,
        }],
    })
    .unwrap();
    let mut sig = String::new();
    wire::keys::push_hex(
        &mut sig,
        &signer.sign(wire::REVOCATIONS_CONTEXT, list.as_bytes()),
    );
    seeds.push((
        "revocations",
        "signed",
        serde_json::to_vec(&wire::SignedRevocations { list, sig }).unwrap(),
    ));
    // A netmap: node 1's own view, as a full map.
    let snapshot = harness::mesh_node(1).netmap_snapshot();
    seeds.push(("netmap", "full", serde_json::to_vec(&snapshot).unwrap()));
    seeds.push((
        "authkey",
        "valid",
        format!(
            "lk1-{}-{}-{}",
            "11".repeat(16),
            "22".repeat(6),
            "33".repeat(20)
        )
        .into_bytes(),
    ));
    let _ = SockId::Main;
    for (target, name, bytes) in seeds {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let len = u16::try_from(20 + l4.len()).unwrap();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let sum = harness::checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(l4);
    p
}
