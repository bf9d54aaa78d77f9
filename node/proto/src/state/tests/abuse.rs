//! Cheap remote attacks on the data plane's handshakes: floods, replays and forgeries that
//! must never keep a tunnel from coming up or restart one that works.

use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::*;
use crate::disco::Message;
use crate::frame::{Kind, Mac1Key};

fn responder_of(net: &Net) -> usize {
    if net.nodes[0].pq_role(public_key(1)) == Some(Role::Responder) {
        0
    } else {
        1
    }
}

fn spoofed(i: u32) -> SocketAddr {
    SocketAddr::from((
        [198, 18, (i >> 8) as u8, i as u8],
        1024 + (i % 50_000) as u16,
    ))
}

#[test]
fn a_handshake_junk_flood_does_not_keep_a_new_tunnel_from_coming_up() {
    let mut net = Net::new(2);
    let target = responder_of(&net);
    let other = 1 - target;
    let mut rng = StdRng::seed_from_u64(7);
    let now = net.now;
    // Strangers who do not know the target's key: well-formed two-chunk messages.
    for i in 0..5_000u32 {
        let junk: Vec<u8> = (0..1300).map(|_| rng.random()).collect();
        let stranger = Mac1Key::new(&NodeKey::from_bytes(rng.random()));
        for (f, _) in crate::frame::Message::new(Kind::PqInit, i, &junk).frames(&stranger, None) {
            net.nodes[target].handle_datagram(
                now,
                SockId::Main,
                spoofed(i),
                Packet::copy_from(&f[..]),
            );
        }
    }
    // Someone who knows the key (any peer, or anyone who read a netmap): mac1 is right, the
    // contents are junk, and every message comes from a different forged address.
    let mac1 = Mac1Key::new(&public_key(target));
    for i in 0..5_000u32 {
        let junk: Vec<u8> = (0..1300).map(|_| rng.random()).collect();
        for (f, _) in crate::frame::Message::new(Kind::PqInit, i, &junk).frames(&mac1, None) {
            net.nodes[target].handle_datagram(
                now,
                SockId::Main,
                spoofed(100_000 + i),
                Packet::copy_from(&f[..]),
            );
        }
    }
    // Forged nudges and confirmations in the peer's name.
    for _ in 0..1_000 {
        let mut sealed = vec![0u8; 40];
        rng.fill_bytes(&mut sealed);
        let f = crate::disco::frame(public_key(other).as_bytes(), &sealed);
        net.nodes[target].handle_datagram(now, SockId::Main, spoofed(7), Packet::copy_from(&f[..]));
    }
    while net.nodes[target].poll_transmit().is_some() {}
    let flooded = net.nodes[target].status(net.now).counters;
    assert!(flooded.pq_bad_mac >= 10_000, "{flooded:?}");
    assert!(flooded.disco_invalid >= 1_000, "{flooded:?}");
    // The honest peer's first packet still opens the tunnel within the same second, without
    // a cookie: the flood spent the strangers' budget, not the peers'.
    let p = ipv4(v4(other), v4(target), 17, &udp(1, 2, b"through the flood"));
    net.send(other, p.clone());
    assert_eq!(net.received(target), vec![p]);
    let after = net.nodes[target].status(net.now);
    assert!(after.peers[0].pq, "post-quantum tunnel up");
    assert_eq!(after.counters.pq_cookies_sent, flooded.pq_cookies_sent);
}

/// A host that holds an IPv6 /64 (as one host may) sends post-quantum message 1s with a right
/// mac1 from 50 of its addresses, ten a second from each, taking the cookies it is sent.
/// Were each address its own source, and all drawing on one node-wide budget, it would spend
/// that budget every moment and no peer's key exchange would get through (as this test saw,
/// run that way). Its /64 is one stranger's source, which costs the node that one source's
/// key work, and the peers' budget is apart, so a peer's first packet opens the tunnel at
/// once while the flood goes on.
#[test]
fn a_host_with_many_addresses_cannot_take_the_key_exchanges_peers_need() {
    let mut net = Net::new(2);
    let target = responder_of(&net);
    let other = 1 - target;
    let mut rng = StdRng::seed_from_u64(11);
    let mac1 = Mac1Key::new(&public_key(target));
    let addr = |i: u16| SocketAddr::from(([0x2001, 0xdb8, 1, 2, 0, 0, 0, i + 1], 41641));
    let mut cookies: Vec<Option<[u8; 16]>> = vec![None; 50];
    let mut session = 0u32;
    let mut flood = |net: &mut Net, rng: &mut StdRng| {
        for (i, cookie) in cookies.iter_mut().enumerate() {
            let from = addr(i as u16);
            let junk: Vec<u8> = (0..1300).map(|_| rng.random()).collect();
            session += 1;
            let frames = crate::frame::Message::new(Kind::PqInit, session, &junk)
                .frames(&mac1, cookie.as_ref());
            for (f, chunk_mac1) in frames {
                net.nodes[target].handle_datagram(
                    net.now,
                    SockId::Main,
                    from,
                    Packet::copy_from(&f[..]),
                );
                while let Some(t) = net.nodes[target].poll_transmit() {
                    if let Some(crate::frame::Frame::Cookie { sealed, .. }) =
                        crate::frame::decode(&t.payload)
                        && let Some(c) =
                            crate::admission::open_cookie(&public_key(target), &chunk_mac1, sealed)
                    {
                        *cookie = Some(c);
                    }
                }
            }
        }
        cookies.iter().filter(|c| c.is_some()).count()
    };
    // Ten rounds a second for three seconds before the peer starts, and on.
    // Each round comes first in its tenth of a second, before anything the nodes' timers
    // send (as a flood spread over time takes each token as it accrues).
    let mut held = 0;
    for _ in 0..30 {
        net.now += Duration::from_millis(100);
        held = flood(&mut net, &mut rng);
        net.tick(Duration::ZERO);
    }
    assert_eq!(held, 50, "the host took its cookies");
    // Its key work: at most its one source's proven budget (20 a second, a burst of 40) and
    // unproven one (5, a burst of 10) over the 3 s, not the strangers' node-wide budget.
    let worked = net.nodes[target].status(net.now).counters.pq_rejected;
    assert!(worked <= 40 + 10 + 3 * 25, "{worked} decrypted");
    let p = ipv4(v4(other), v4(target), 17, &udp(1, 2, b"through the flood"));
    net.nodes[other].handle_tun_packet(net.now, Packet::copy_from(&p[..]));
    let mut got = Vec::new();
    for _ in 0..30 {
        net.now += Duration::from_millis(100);
        flood(&mut net, &mut rng);
        net.tick(Duration::ZERO);
        got.extend(net.received(target));
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got, vec![p], "the peer's packet arrived");
}

#[test]
fn replayed_or_forged_nudges_do_not_restart_a_working_key_chain() {
    let mut net = Net::new(2);
    let responder = responder_of(&net);
    let initiator = 1 - responder;
    let p = ipv4(v4(responder), v4(initiator), 17, &udp(1, 2, b"x"));
    net.send(responder, p);
    assert_eq!(net.received(initiator).len(), 1);
    let nudges: Vec<Vec<u8>> = disco_messages(&net, initiator)
        .into_iter()
        .filter(|(_, m)| matches!(m, Message::PqNudge { .. }))
        .map(|(i, _)| net.wire[i].2.clone())
        .collect();
    assert!(!nudges.is_empty());
    let before = net.nodes[initiator].status(net.now);
    net.tick(Duration::from_secs(3));
    net.wire.clear();
    for (i, n) in nudges.iter().enumerate() {
        for from in [net.addrs[responder], spoofed(i as u32)] {
            net.nodes[initiator].handle_datagram(
                net.now,
                SockId::Main,
                from,
                Packet::copy_from(&n[..]),
            );
        }
    }
    net.run();
    let after = net.nodes[initiator].status(net.now);
    assert_eq!(after.peers[0].pq_handshakes, before.peers[0].pq_handshakes);
    assert!(
        first(&net, |b| is_pq(b, Kind::PqInit)).is_none(),
        "a replayed nudge started an exchange"
    );
    assert!(after.counters.disco_stale > before.counters.disco_stale);
    // A fresh nudge from the peer itself still works (it lost its key).
    net.tick(Duration::from_secs(2));
    let time = net.nodes[responder].epoch(net.now);
    net.nodes[responder].send_disco(
        public_key(initiator),
        Addr::main(net.addrs[initiator]),
        &Message::PqNudge { time },
    );
    net.run();
    assert!(first(&net, |b| is_pq(b, Kind::PqInit)).is_some());
}

/// A valid WireGuard handshake initiation from node `from` to node `to`.
fn wg_init(from: usize, to: usize, seed: u64) -> Packet {
    let mut rng = StdRng::seed_from_u64(seed);
    let tunnel = crate::tunnel::Tunnel::new(
        Arc::new(wg::Identity::new(&private_key(from))),
        *public_key(to).as_bytes(),
        None,
        IndexTable::from_rng(rand_09_rng(&mut rng)),
        rng.random(),
        1280,
        crate::test_epoch(),
        Duration::from_secs(1_800_000_000),
    );
    tunnel
        .initiate(crate::test_epoch())
        .expect("an initiation")
        .into()
}

#[test]
fn wireguard_handshake_budgets_reset_without_tunnels_and_are_per_relayed_peer() {
    let now = crate::test_epoch();
    let mut a = node_zero(
        now,
        MapResponse {
            peers: Some(vec![node(1, vec![]), node(2, vec![])]),
            packet_filter: Some(allow_all(0)),
            ..Default::default()
        },
    );
    let src: SocketAddr = "198.51.100.1:41641".parse().unwrap();
    let limit = HANDSHAKE_RATE_LIMIT as usize;
    for i in 0..=limit {
        a.handle_datagram(now, SockId::Main, src, wg_init(1, 0, i as u64));
    }
    assert_eq!(
        a.status(now).counters.wg_cookies_sent,
        1,
        "over the limit: a cookie"
    );
    // A second later the counts start again, though no tunnel exists.
    let later = now + Duration::from_secs(1);
    a.handle_datagram(later, SockId::Main, src, wg_init(1, 0, 999));
    assert_eq!(
        a.status(later).counters.wg_cookies_sent,
        1,
        "the count was not reset"
    );
    // Through a relay, each peer has its own budget: one peer's flood does not put another
    // under load.
    let relay = RelayId(1);
    for i in 0..=limit {
        a.handle_relay_packet(later, relay, public_key(1), wg_init(1, 0, 2000 + i as u64));
    }
    assert_eq!(a.status(later).counters.wg_cookies_sent, 2);
    a.handle_relay_packet(later, relay, public_key(2), wg_init(2, 0, 5000));
    assert_eq!(
        a.status(later).counters.wg_cookies_sent,
        2,
        "another relayed peer was charged"
    );
}

#[test]
fn a_stranger_flooding_through_a_relay_is_refused_there_until_the_netmap_lists_it() {
    let now = crate::test_epoch();
    let mut a = node_zero(
        now,
        MapResponse {
            peers: Some(vec![node(1, vec![])]),
            packet_filter: Some(allow_all(0)),
            ..Default::default()
        },
    );
    let refusals = |a: &mut NodeState| -> Vec<Vec<NodeKey>> {
        std::iter::from_fn(|| a.poll_event())
            .filter_map(|e| match e {
                Event::RelayRefusals(keys) => Some(keys),
                _ => None,
            })
            .collect()
    };
    let _ = refusals(&mut a);
    let relay = RelayId(1);
    // A peer's flood is the peer's business: nothing is refused.
    for i in 0..500 {
        a.handle_relay_packet(now, relay, public_key(1), wg_init(1, 0, i));
    }
    assert!(refusals(&mut a).is_empty());
    // Node 2 is not a peer (yet): its first packets are only dropped, a flood refused, once.
    for i in 0..10 {
        a.handle_relay_packet(now, relay, public_key(2), wg_init(2, 0, i));
    }
    assert!(refusals(&mut a).is_empty(), "refused after ten packets");
    for i in 10..1_000 {
        a.handle_relay_packet(now, relay, public_key(2), wg_init(2, 0, i));
    }
    assert_eq!(refusals(&mut a), vec![vec![public_key(2)]]);
    let c = a.status(now).counters;
    assert_eq!(
        (c.relay_unknown_peer, c.relay_strangers_refused),
        (1_000, 1)
    );
    assert_eq!(a.status(now).relay_refused, vec![public_key(2)]);
    // The coordinator lists it: let through at once.
    let later = now + Duration::from_secs(1);
    a.handle_netmap(
        later,
        MapResponse {
            peers_changed: vec![node(2, vec![])],
            ..Default::default()
        },
    );
    assert_eq!(refusals(&mut a), vec![vec![]]);
    assert!(a.status(later).relay_refused.is_empty());
    // Removed again and flooding again: refused again, and the refusal lapses once it has
    // been quiet for REFUSE_FOR.
    a.handle_netmap(
        later,
        MapResponse {
            peers_removed: vec![node(2, vec![]).id],
            ..Default::default()
        },
    );
    for i in 0..100 {
        a.handle_relay_packet(later, relay, public_key(2), wg_init(2, 0, 2_000 + i));
    }
    assert_eq!(refusals(&mut a), vec![vec![public_key(2)]]);
    let lapsed = later + crate::strangers::REFUSE_FOR + Duration::from_secs(10);
    a.handle_timeout(lapsed);
    assert_eq!(refusals(&mut a), vec![vec![]]);
}

#[test]
fn replayed_disco_pings_are_not_answered_and_never_become_candidates() {
    let mut net = Net::new(2);
    net.send(0, ipv4(v4(0), v4(1), 17, &udp(1, 2, b"x")));
    net.tick(Duration::from_secs(1));
    let pings: Vec<Vec<u8>> = disco_messages(&net, 1)
        .into_iter()
        .filter(|(_, m)| matches!(m, Message::Ping { .. }))
        .map(|(i, _)| net.wire[i].2.clone())
        .collect();
    assert!(!pings.is_empty());
    net.tick(Duration::from_secs(2));
    net.wire.clear();
    let before = net.nodes[1].status(net.now).counters;
    // Replayed from the peer's own address and from an attacker's.
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    for p in &pings {
        for from in [net.addrs[0], attacker] {
            net.nodes[1].handle_datagram(net.now, SockId::Main, from, Packet::copy_from(&p[..]));
        }
    }
    let after = net.nodes[1].status(net.now).counters;
    assert_eq!(
        after.disco_pongs_sent, before.disco_pongs_sent,
        "a replayed ping was answered"
    );
    assert_eq!(
        after.disco_stale - before.disco_stale,
        2 * pings.len() as u64
    );
    // Nothing the node sends from now on (probes, handshakes, key exchanges) goes to the
    // attacker's address.
    net.run();
    for _ in 0..10 {
        net.tick(Duration::from_secs(30));
    }
    assert!(
        net.wire.iter().all(|(_, to, _)| *to != attacker),
        "traffic went to a replayed ping's source"
    );
}

#[test]
fn a_denied_peer_cannot_send_icmp_errors_about_our_flows_with_others() {
    let mut net = Net::new(3);
    // Node 0 lets in only ICMP from node 1 (node 2 may reach it on nothing).
    let only_1 = FilterRule {
        origin: "test".into(),
        action: Action::Accept,
        src: vec![IpAddr::from(v4(1)).into()],
        dst: vec![DstPorts {
            net: overlay(0).into(),
            ports: PortRange::ANY,
        }],
        protocols: vec![],
        all_protocols: true,
        valid: None,
        cap_grants: Vec::new(),
    };
    set_rules(&mut net, 0, vec![only_1]);
    // Node 0 talks to node 1 over UDP.
    let out = ipv4(v4(0), v4(1), 17, &udp(1000, 2000, b"hello"));
    net.send(0, out.clone());
    assert_eq!(net.received(1).len(), 1);
    let error_about = |from: usize| {
        let mut err = vec![3, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&out[..28]);
        ipv4(v4(from), v4(0), 1, &err)
    };
    // Node 2 also talks to node 0 (so it has a tunnel) and then forges errors about the flow.
    net.send(2, error_about(2));
    assert!(
        net.received(0).is_empty(),
        "an error from another peer was delivered"
    );
    // The flow's own peer may report errors about it.
    net.send(1, error_about(1));
    assert_eq!(net.received(0).len(), 1);
}

/// Three nodes, node 1's tunnel to node 0 up (a packet went through).
fn three_with_a_tunnel() -> Net {
    let mut net = Net::new(3);
    let p = ipv4(v4(1), v4(0), 17, &udp(1, 2, b"before"));
    net.send(1, p.clone());
    assert_eq!(net.received(0), vec![p]);
    net
}

/// Sends node 0 `n` WireGuard initiations with a right mac1 (the attacker read the node's key
/// from a netmap) and junk after it, each from the address `from(i)` gives, and drops what
/// node 0 sends back; returns how many cost key work and how many were answered with a
/// cookie reply.
fn junk_initiations(
    net: &mut Net,
    rng: &mut StdRng,
    n: u32,
    mut from: impl FnMut(u32) -> SocketAddr,
) -> (u64, u64) {
    let before = net.nodes[0].status(net.now).counters;
    for i in 0..n {
        let mut m = [0u8; 148];
        rng.fill_bytes(&mut m);
        m[..4].copy_from_slice(&[1, 0, 0, 0]);
        wg::message::set_mac1(&mut m, public_key(0).as_bytes());
        net.nodes[0].handle_datagram(net.now, SockId::Main, from(i), Packet::copy_from(&m[..]));
    }
    while net.nodes[0].poll_transmit().is_some() {}
    let after = net.nodes[0].status(net.now).counters;
    let worked =
        after.wg_unknown_peer + after.wg_invalid - before.wg_unknown_peer - before.wg_invalid;
    (worked, after.wg_cookies_sent - before.wg_cookies_sent)
}

/// A flood of WireGuard initiations with a right mac1 from made-up addresses, 5,000 in each
/// second: the node does key work for at most `STRANGERS_UNDER_LOAD` of them a second and
/// answers the rest with cookie replies, a working tunnel carries data throughout, and a new
/// peer's handshake (from the address the netmap lists for it) gets through at once: the flood
/// spends the strangers' budget, not the peers'.
#[test]
fn a_wireguard_handshake_flood_costs_bounded_key_work_and_stops_no_tunnel() {
    use crate::wg::cookie::STRANGERS_UNDER_LOAD;
    let mut net = three_with_a_tunnel();
    let mut rng = StdRng::seed_from_u64(9);
    let mut sent = 0u32;
    let mut flood = |net: &mut Net| {
        let r = junk_initiations(net, &mut rng, 5_000, |i| spoofed(sent + i));
        sent += 5_000;
        r
    };
    let (worked, cookies) = flood(&mut net);
    assert_eq!(
        worked,
        u64::from(STRANGERS_UNDER_LOAD),
        "key work for the first ones only"
    );
    assert_eq!(worked + cookies, 5_000, "cookie replies for the rest");
    let p = ipv4(v4(1), v4(0), 17, &udp(1, 2, b"during"));
    net.send(1, p.clone());
    assert_eq!(net.received(0), vec![p], "the working tunnel carries data");
    // Node 2's first handshake passes at once, the flood going on.
    let cookies_before = net.nodes[0].status(net.now).counters.wg_cookies_sent;
    let q = ipv4(v4(2), v4(0), 17, &udp(1, 2, b"new peer"));
    net.send(2, q.clone());
    assert_eq!(net.received(0), vec![q], "node 2's packet arrived");
    assert_eq!(
        net.nodes[0].status(net.now).counters.wg_cookies_sent,
        cookies_before,
        "node 2 needed no cookie"
    );
    for _ in 0..4 {
        net.tick(Duration::from_secs(1));
        let (worked, _) = flood(&mut net);
        assert!(worked <= u64::from(STRANGERS_UNDER_LOAD));
    }
}

/// A host that receives its cookies, at 50 ports of one address, sends 100 initiations with
/// valid cookies from each port at the start of a second (5,000; it takes new cookies when the
/// node's secret changes). Were cookies counted per address and port against one node-wide
/// bound, it would take every handshake the node passes in those seconds and shed the peers':
/// node 1's rekeys would fail and its packets stop when its session expires (as this test
/// saw, run that way). It is a stranger: one source, `PER_SOURCE` a second with cookies
/// whatever its ports, from the strangers' budget, so peers' handshakes still pass.
#[test]
fn a_host_with_cookies_for_many_ports_cannot_shed_a_peers_handshakes() {
    use crate::wg::cookie::PER_SOURCE;
    let mut net = three_with_a_tunnel();
    let mut rng = StdRng::seed_from_u64(10);
    let attacker = |port: u16| SocketAddr::from(([203, 0, 113, 9], 1024 + port));
    let key0 = *public_key(0).as_bytes();
    // Under load (a spoofed flood first), each port asks and receives its cookie.
    junk_initiations(&mut net, &mut rng, 5_000, spoofed);
    let mut cookies = Vec::new();
    for port in 0..50u16 {
        let mut m = [0u8; 148];
        rng.fill_bytes(&mut m);
        m[..4].copy_from_slice(&[1, 0, 0, 0]);
        wg::message::set_mac1(&mut m, &key0);
        let mac1: [u8; 16] = m[116..132].try_into().unwrap();
        net.nodes[0].handle_datagram(
            net.now,
            SockId::Main,
            attacker(port),
            Packet::copy_from(&m[..]),
        );
        let reply = std::iter::from_fn(|| net.nodes[0].poll_transmit())
            .find(|t| t.dst == Addr::main(attacker(port)))
            .expect("a cookie reply");
        cookies.push(wg::message::open_cookie(&reply.payload, &key0, &mac1).expect("a cookie"));
    }
    // A burst: 100 from each port, each with its cookie; a cookie reply instead (the node's
    // cookie secret changed, every two minutes) brings the port a new one.
    let mut burst = |net: &mut Net, rng: &mut StdRng| {
        let before = net.nodes[0].status(net.now).counters;
        for (port, cookie) in cookies.iter_mut().enumerate() {
            let from = attacker(port as u16);
            for _ in 0..100 {
                let mut m = [0u8; 148];
                rng.fill_bytes(&mut m);
                m[..4].copy_from_slice(&[1, 0, 0, 0]);
                wg::message::set_macs(&mut m, &key0, Some(cookie));
                let mac1: [u8; 16] = m[116..132].try_into().unwrap();
                net.nodes[0].handle_datagram(
                    net.now,
                    SockId::Main,
                    from,
                    Packet::copy_from(&m[..]),
                );
                while let Some(t) = net.nodes[0].poll_transmit() {
                    if let Some(new) = wg::message::open_cookie(&t.payload, &key0, &mac1) {
                        *cookie = new;
                    }
                }
            }
        }
        let after = net.nodes[0].status(net.now).counters;
        let worked =
            after.wg_unknown_peer + after.wg_invalid - before.wg_unknown_peer - before.wg_invalid;
        (worked, after.wg_shed - before.wg_shed)
    };
    // Each second opens with the bursts; node 2, a peer at the address the netmap lists,
    // starts its first handshake just after one, and its packet arrives at once.
    net.tick(Duration::from_secs(1));
    let (worked, shed) = burst(&mut net, &mut rng);
    // One source: its first `HANDSHAKE_RATE_LIMIT` pass without a cookie, `PER_SOURCE` more
    // with one.
    let one_source = u64::from(HANDSHAKE_RATE_LIMIT + PER_SOURCE);
    assert_eq!(worked, one_source, "key work");
    assert_eq!(shed, 5_000 - one_source, "shed");
    let q = ipv4(v4(2), v4(0), 17, &udp(1, 2, b"new peer"));
    net.send(2, q.clone());
    assert_eq!(net.received(0), vec![q], "node 2's handshake passed");
    // And node 1 rekeys through it: node 1 sends a packet a second and each arrives, past
    // Reject-After-Time (180 s) of the session it had, while every second from before its
    // rekey (Rekey-After-Time, 120 s) on opens with the bursts (and one in 30 before).
    for s in 0..190 {
        // The bursts come first in their second, before anything the nodes' timers send.
        net.now += Duration::from_secs(1);
        if s % 30 == 0 || s >= 110 {
            burst(&mut net, &mut rng);
        }
        net.tick(Duration::ZERO);
        let p = ipv4(v4(1), v4(0), 17, &udp(1, 2, &(s as u32).to_be_bytes()));
        net.send(1, p.clone());
        assert_eq!(net.received(0), vec![p], "second {s}");
    }
}

/// A peer that lists another's address among its own endpoints (a claim nothing checks)
/// does not take it: the address stays the peer's that an authenticated packet came from, so
/// that peer's handshakes are not counted against the liar's budget (which the liar can
/// spend). An address no peer holds is taken by the first claim.
#[test]
fn a_peer_listing_another_peers_address_does_not_take_it() {
    let mut net = three_with_a_tunnel();
    let (a1, a2) = (net.addrs[1], net.addrs[2]);
    let elsewhere: SocketAddr = "198.51.100.20:41641".parse().unwrap();
    net.nodes[0].handle_netmap(
        net.now,
        MapResponse {
            seq: 2,
            peers_changed: vec![node(2, vec![a2, a1, elsewhere])],
            ..Default::default()
        },
    );
    let claimed = |net: &Net, a: SocketAddr| net.nodes[0].claimed_peer(Addr::main(a));
    assert_eq!(claimed(&net, a1), Some(public_key(1)));
    assert_eq!(claimed(&net, a2), Some(public_key(2)));
    assert_eq!(claimed(&net, elsewhere), Some(public_key(2)));
    // The same through node 2's own netmap entry sent again, after node 1 was also listed.
    net.nodes[0].handle_netmap(
        net.now,
        MapResponse {
            seq: 3,
            peers_changed: vec![node(1, vec![a1]), node(2, vec![a1, a2])],
            ..Default::default()
        },
    );
    assert_eq!(claimed(&net, a1), Some(public_key(1)));
}
