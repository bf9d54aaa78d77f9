//! The post-quantum key schedule end to end inside the core: confirmation, lost messages,
//! reordering and restarts.

use super::*;
use crate::disco::Message;
use crate::frame::Kind;

fn roles(net: &Net) -> (usize, usize) {
    if net.nodes[0].pq_role(public_key(1)) == Some(Role::Initiator) {
        (0, 1)
    } else {
        (1, 0)
    }
}

/// Opens a disco frame for node `to` (None if it is not one, or does not open).
fn open_disco(to: usize, b: &[u8]) -> Option<Message> {
    let me = StaticKeypair::from_secret(private_key(to));
    let (sender, sealed) = crate::disco::parse_frame(b)?;
    let key = me.shared_key(&sender, crate::disco::KEY_LABEL)?;
    let plain = hybrid::seal::open(&key, &crate::disco::header(&sender), sealed)?;
    Message::decode(&plain)
}

#[test]
fn a_wireguard_handshake_that_overtakes_the_key_confirmation_waits_for_it() {
    let mut net = Net::new(2);
    let (ini, res) = roles(&net);
    let res_addr = net.addrs[res];
    // The first confirmation is lost on the way.
    let mut dropped = 0;
    net.drop_if = Some(Box::new(move |_, to, b| {
        if to == res_addr
            && dropped == 0
            && matches!(open_disco(res, b), Some(Message::PqConfirm { .. }))
        {
            dropped += 1;
            return true;
        }
        false
    }));
    let p = ipv4(v4(ini), v4(res), 17, &udp(1, 2, b"after the confirmation"));
    net.send(ini, p.clone());
    // The initiator has the key and sent its WireGuard handshake; the responder holds it.
    // Neither side shows a post-quantum tunnel: the key is not confirmed yet.
    assert!(net.received(res).is_empty());
    for i in [ini, res] {
        let st = net.nodes[i].status(net.now);
        assert!(
            !st.peers[0].pq,
            "node {i} shows an unconfirmed key as a tunnel"
        );
        assert_eq!(st.peers[0].path.kind, PathKind::None);
    }
    let wg_from_res = |net: &Net| {
        net.wire
            .iter()
            .any(|(from, _, b)| *from == res_addr && is_wg(b))
    };
    assert!(
        !wg_from_res(&net),
        "the responder answered a handshake for a key it lacks"
    );
    // The confirmation goes again a second later; the held handshake completes at once.
    net.tick(Duration::from_secs(1));
    assert_eq!(net.received(res), vec![p]);
    assert!(net.nodes[res].status(net.now).peers[0].pq);
    assert!(net.nodes[ini].status(net.now).peers[0].pq);
    assert!(wg_from_res(&net));
    let st = net.nodes[res].status(net.now);
    assert_eq!(st.peers[0].pq_handshakes, 1);
}

#[test]
fn a_message_1_replayed_to_a_restarted_responder_changes_nothing_it_uses() {
    let mut net = Net::new(2);
    let (ini, res) = roles(&net);
    let p = ipv4(v4(ini), v4(res), 17, &udp(1, 2, b"x"));
    net.send(ini, p);
    assert_eq!(net.received(res).len(), 1);
    let recorded: Vec<Vec<u8>> = net
        .wire
        .iter()
        .filter(|(_, _, b)| is_pq(b, Kind::PqInit))
        .map(|(_, _, b)| b.clone())
        .collect();
    // The responder restarts (same keys, fresh state) and gets the old message 1 from an
    // attacker before the initiator notices anything.
    let mut fresh = NodeState::new(config(res, 5_000), [res as u8 + 50; 32], net.now);
    fresh.handle_netmap(
        net.now,
        MapResponse {
            seq: 1,
            node: Some(node(res, vec![net.addrs[res]])),
            peers: Some(vec![node(ini, vec![net.addrs[ini]])]),
            packet_filter: Some(allow_all(res)),
            ..Default::default()
        },
    );
    net.nodes[res] = fresh;
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    for b in &recorded {
        net.nodes[res].handle_datagram(net.now, SockId::Main, attacker, Packet::copy_from(&b[..]));
    }
    while net.nodes[res].poll_transmit().is_some() {}
    let st = net.nodes[res].status(net.now);
    assert!(!st.peers[0].pq, "the replay installed a key");
    assert_eq!(st.peers[0].pq_handshakes, 0);
    // Traffic both ways recovers: the restarted responder asks for a key and gets one.
    let back = ipv4(v4(res), v4(ini), 17, &udp(2, 1, b"after restart"));
    net.send(res, back.clone());
    assert_eq!(net.received(ini), vec![back]);
    let again = ipv4(v4(ini), v4(res), 17, &udp(1, 2, b"and back"));
    net.send(ini, again.clone());
    net.tick(Duration::from_secs(1));
    assert_eq!(net.received(res), vec![again]);
    assert!(net.nodes[res].status(net.now).peers[0].pq);
}
