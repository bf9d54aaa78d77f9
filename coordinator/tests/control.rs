//! The control channel over a real WebSocket: what the coordinator accepts from a node before
//! it registers it.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use hybrid::{InitiatorHandshake, Psk, Purpose, StaticKeypair};
use rand::{SeedableRng, rngs::StdRng};
use support::{hello, key, state};
use tokio_tungstenite::tungstenite::Message;
use wire::{ClientMessage, ErrorCode, NodeKey, ServerMessage};

/// The public router on the coordinator's real listener (limits, peer addresses).
async fn serve(st: coordinator::state::AppState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = coordinator::api::router(st);
    tokio::spawn(relay::http::serve(
        listener,
        app,
        relay::http::HttpLimits::default(),
        std::future::pending(),
    ));
    addr
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket to `/control` from source address `from` (any 127.0.0.0/8 address is local).
async fn ws_from(
    addr: SocketAddr,
    from: [u8; 4],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((from, 0))).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/control"), stream).await?;
    Ok(ws)
}

/// Sends message 1; returns message 2, or None if the coordinator closed the session.
async fn handshake(ws: &mut Ws, msg1: Vec<u8>) -> Option<Vec<u8>> {
    ws.send(Message::Binary(msg1.into())).await.ok()?;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => return Some(b.to_vec()),
            Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) | Err(_) => return None,
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn msg1(machine: &StaticKeypair, control: &[u8; 32]) -> (InitiatorHandshake, Vec<u8>) {
    let mut rng = StdRng::from_rng(&mut rand::rng());
    InitiatorHandshake::start(
        &mut rng,
        Purpose::Control,
        machine,
        control,
        &Psk::zero(),
        &[],
    )
    .unwrap()
}

/// What the node claims in its hello, and how it proves it.
enum Proof {
    /// A proof made with this key (the right one, or someone else's).
    By(StaticKeypair),
    /// A proof from another session (replayed).
    Replayed([u8; 32]),
    /// None at all.
    Missing,
}

/// Runs a control session: handshake as `machine`, then a hello claiming `node_key`. Returns
/// the session, still open (its WebSocket and channel), the coordinator's first answer and
/// the handshake hash.
async fn session(
    addr: SocketAddr,
    control: [u8; 32],
    machine: &StaticKeypair,
    node_key: NodeKey,
    auth: &str,
    proof: Proof,
) -> (Ws, hybrid::Channel, ServerMessage, [u8; 32]) {
    let mut ws = ws_from(addr, [127, 0, 0, 1]).await.unwrap();
    let (ini, msg1) = msg1(machine, &control);
    ws.send(Message::Binary(msg1.into())).await.unwrap();
    let msg2 = loop {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
            break b;
        }
    };
    let done = ini.finish(&msg2).unwrap();
    let session = *done.handshake_hash();
    let mut channel = done.into_channel();
    let mut h = hello(1, "claimer", Some(auth));
    h.node_key = node_key;
    let proof = match proof {
        Proof::By(k) => Some(
            k.possession_proof(&control, &session, &machine.public())
                .unwrap(),
        ),
        Proof::Replayed(p) => Some(p),
        Proof::Missing => None,
    };
    h.node_key_proof = proof.map(|p| {
        let mut s = String::new();
        wire::keys::push_hex(&mut s, &p);
        s
    });
    send(&mut ws, &mut channel, &ClientMessage::Hello(h)).await;
    let first = next_message(&mut ws, &mut channel)
        .await
        .expect("the coordinator closed the session before answering");
    (ws, channel, first, session)
}

/// Sends one client message on a session.
async fn send(ws: &mut Ws, channel: &mut hybrid::Channel, m: &ClientMessage) {
    let json = serde_json::to_vec(m).unwrap();
    for f in channel.seal(&json).unwrap() {
        ws.send(Message::Binary(f.into())).await.unwrap();
    }
}

/// The next message from the coordinator, or None once the session is closed.
async fn next_message(ws: &mut Ws, channel: &mut hybrid::Channel) -> Option<ServerMessage> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                if let Some(m) = channel.open(&b).unwrap() {
                    return Some(serde_json::from_slice(&m).unwrap());
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

fn refused_with(m: &ServerMessage) -> Option<(ErrorCode, &str)> {
    match m {
        ServerMessage::Error { code, message } => Some((*code, message.as_str())),
        _ => None,
    }
}

db_test!(async fn a_node_must_prove_it_holds_its_node_key(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let control = st.control_key.public();
    let addr = serve(st.clone()).await;
    let mut rng = StdRng::seed_from_u64(5);
    let (victim_machine, victim_node) = (
        StaticKeypair::generate(&mut rng),
        StaticKeypair::generate(&mut rng),
    );
    let victim_key = NodeKey::from_bytes(victim_node.public());
    let (_, _, m, victim_session) = session(
        addr,
        control,
        &victim_machine,
        victim_key,
        &k,
        Proof::By(victim_node.clone()),
    )
    .await;
    assert!(matches!(m, ServerMessage::Welcome(_)), "{m:?}");
    let victim_proof = victim_node
        .possession_proof(&control, &victim_session, &victim_machine.public())
        .unwrap();

    // An attacker with its own machine key claims the victim's node key: with no proof, with a
    // proof made by its own key, and with the victim's proof from the victim's session.
    let attacker = StaticKeypair::generate(&mut rng);
    let own = StaticKeypair::generate(&mut rng);
    for proof in [
        Proof::Missing,
        Proof::By(own),
        Proof::Replayed(victim_proof),
    ] {
        let (_, _, m, _) = session(addr, control, &attacker, victim_key, &k, proof).await;
        let (code, msg) = refused_with(&m).unwrap_or_else(|| panic!("accepted: {m:?}"));
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(msg.contains("prove"), "{msg}");
    }
    // Nothing was registered for the attacker and the victim keeps its key.
    let nodes = coordinator::ops::list_nodes(&st).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_key, victim_key.to_text());
});

db_test!(async fn a_replayed_message_1_gets_no_handshake(tdb) {
    let st = state(&tdb).await;
    let control = st.control_key.public();
    let addr = serve(st).await;
    let machine = StaticKeypair::generate(&mut StdRng::seed_from_u64(8));
    let (_, m1) = msg1(&machine, &control);
    let mut ws = ws_from(addr, [127, 0, 0, 1]).await.unwrap();
    assert!(handshake(&mut ws, m1.clone()).await.is_some());
    let mut again = ws_from(addr, [127, 0, 0, 1]).await.unwrap();
    assert!(
        handshake(&mut again, m1).await.is_none(),
        "a recorded message 1 was answered again"
    );
});

db_test!(async fn a_node_cannot_make_the_coordinator_buffer_a_large_message(tdb) {
    let st = state(&tdb).await;
    let control = st.control_key.public();
    let addr = serve(st).await;
    let machine = StaticKeypair::generate(&mut StdRng::seed_from_u64(9));
    let (ini, m1) = msg1(&machine, &control);
    let mut ws = ws_from(addr, [127, 0, 0, 1]).await.unwrap();
    let m2 = handshake(&mut ws, m1).await.unwrap();
    let mut channel = ini.finish(&m2).unwrap().into_channel();
    // 4 MiB in 64 KiB frames, before any hello: the session ends long before the end.
    let mut sent = 0usize;
    for f in channel.seal(&vec![b' '; 4 << 20]).unwrap() {
        if ws.send(Message::Binary(f.into())).await.is_err() {
            break;
        }
        sent += 1;
    }
    let closed = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(_)))) => break false,
            Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => break true,
            Ok(Some(Ok(_))) => {}
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the coordinator kept the session after {sent} frames"
    );
});

db_test!(async fn a_handshake_flood_and_half_open_sockets_do_not_stop_a_node_from_registering(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let control = st.control_key.public();
    let admission = std::sync::Arc::clone(&st.admission);
    let addr = serve(st).await;
    // Half-open sockets: upgraded, then silent, from one address.
    let mut silent = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        match ws_from(addr, [127, 0, 0, 2]).await {
            Ok(ws) => silent.push(ws),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(silent.len(), coordinator::admission::MAX_PRE_AUTH_PER_IP);
    assert_eq!(refused, 100 - coordinator::admission::MAX_PRE_AUTH_PER_IP);
    // A handshake flood with fresh message 1s from other addresses, running while the node
    // registers.
    let flood = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for i in 0..400u32 {
            let from = [127, 0, 1 + (i % 8) as u8, 1];
            tasks.push(tokio::spawn(async move {
                let m = StaticKeypair::generate(&mut StdRng::from_rng(&mut rand::rng()));
                let (_, m1) = msg1(&m, &control);
                if let Ok(mut ws) = ws_from(addr, from).await {
                    let _ = handshake(&mut ws, m1).await;
                    // Hold the session without ever sending a hello.
                    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let node = StaticKeypair::generate(&mut StdRng::seed_from_u64(31));
    let machine = StaticKeypair::generate(&mut StdRng::seed_from_u64(32));
    let started = std::time::Instant::now();
    let (_, _, m, _) = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        session(
            addr,
            control,
            &machine,
            NodeKey::from_bytes(node.public()),
            &k,
            Proof::By(node),
        ),
    )
    .await
    .expect("the node could not register during the flood");
    assert!(matches!(m, ServerMessage::Welcome(_)), "{m:?}");
    eprintln!("registered during the flood in {:?}", started.elapsed());
    flood.await.unwrap();
    drop(silent);
    // Every unauthenticated slot comes back.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(admission.pre_auth(), 0);
});

/// A node (its keys from `seed`) that joined with auth key `k`: its session.
async fn joined(
    addr: SocketAddr,
    control: [u8; 32],
    k: &str,
    seed: u64,
) -> (Ws, hybrid::Channel, NodeKey) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (machine, node) = (
        StaticKeypair::generate(&mut rng),
        StaticKeypair::generate(&mut rng),
    );
    let key = NodeKey::from_bytes(node.public());
    let (ws, channel, m, _) = session(addr, control, &machine, key, k, Proof::By(node)).await;
    assert!(matches!(m, ServerMessage::Welcome(_)), "{m:?}");
    (ws, channel, key)
}

db_test!(async fn a_node_flooding_reports_costs_its_peers_a_bounded_number_of_netmaps(tdb) {
    const FLOOD: u16 = 1_000;
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let control = st.control_key.public();
    let addr = serve(st.clone()).await;
    let (a_ws, mut a_channel, a_key) = joined(addr, control, &k, 41).await;
    let (mut b_ws, mut b_channel, _) = joined(addr, control, &k, 42).await;
    // B counts the netmaps that tell it about A, and keeps A's latest endpoints.
    let (seen_tx, mut seen) = tokio::sync::watch::channel((0u64, Vec::new()));
    tokio::spawn(async move {
        while let Some(m) = next_message(&mut b_ws, &mut b_channel).await {
            if let ServerMessage::Map(map) = m {
                for n in map.peers.iter().flatten().chain(&map.peers_changed) {
                    if n.node_key == a_key {
                        seen_tx.send_modify(|(count, eps)| {
                            *count += 1;
                            eps.clone_from(&n.endpoints);
                        });
                    }
                }
            }
        }
    });
    let wait = std::time::Duration::from_secs(20);
    tokio::time::timeout(wait, seen.wait_for(|(count, _)| *count > 0))
        .await
        .expect("B never heard of A")
        .unwrap();
    let before = seen.borrow().0;
    // A reads everything it is sent (an attacker would) and floods endpoint reports.
    let (mut a_tx, mut a_rx) = a_ws.split();
    tokio::spawn(async move { while a_rx.next().await.is_some() {} });
    let endpoints = |i: u16| vec![SocketAddr::from(([198, 51, 100, 7], 1_000 + i))];
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let m = ClientMessage::Endpoints { endpoints: endpoints(i) };
        for f in a_channel.seal(&serde_json::to_vec(&m).unwrap()).unwrap() {
            a_tx.send(Message::Binary(f.into())).await.unwrap();
        }
    }
    let sent = started.elapsed();
    // The last report is not lost: B learns it.
    let last = endpoints(FLOOD - 1);
    tokio::time::timeout(wait, seen.wait_for(|(_, eps)| *eps == last))
        .await
        .expect("B never learned A's last endpoints")
        .unwrap();
    let took = started.elapsed();
    let maps = seen.borrow().0 - before;
    eprintln!("{FLOOD} reports sent in {sent:?}; B got {maps} netmaps about A, the last after {took:?}");
    let bound = coordinator::api::control::REPORT_BURST as u64 + took.as_secs() + 2;
    assert!(
        maps <= bound,
        "{FLOOD} endpoint reports cost B {maps} netmaps in {took:?} (at most {bound} expected)"
    );
    // Every report was acted on or replaced by a newer one while it waited.
    let c = &st.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (applied, superseded) = (load(&c.reports_applied), load(&c.reports_superseded));
    assert_eq!(applied + superseded, u64::from(FLOOD), "{applied} applied, {superseded} superseded");
    assert!(load(&c.reports_held) >= superseded);
});

db_test!(async fn access_requests_beyond_the_burst_are_answered_that_they_come_too_fast(tdb) {
    use coordinator::api::control::ACCESS_BURST;
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let control = st.control_key.public();
    let addr = serve(st.clone()).await;
    let (mut ws, mut channel, _) = joined(addr, control, &k, 43).await;
    let sent = u64::from(ACCESS_BURST) + 5;
    for req in 0..sent {
        // No reason given: refused without touching the database, but counted all the same.
        let m = ClientMessage::RequestAccess {
            req,
            to: "tag:db".into(),
            ports: "22".into(),
            for_secs: 600,
            reason: String::new(),
        };
        send(&mut ws, &mut channel, &m).await;
    }
    let mut answers = Vec::new();
    while answers.len() < sent as usize {
        let m = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            next_message(&mut ws, &mut channel),
        )
        .await
        .expect("an access request went unanswered")
        .expect("the session closed");
        if let ServerMessage::AccessRequestResult { req, id, error } = m {
            assert_eq!(id, None);
            answers.push((req, error.unwrap()));
        }
    }
    for (i, (req, error)) in answers.iter().enumerate() {
        assert_eq!(*req, i as u64);
        let expected = if i < ACCESS_BURST as usize {
            "give a reason"
        } else {
            "too many access requests"
        };
        assert!(error.contains(expected), "request {i}: {error}");
    }
    assert_eq!(st.counters.access_requests_throttled.load(std::sync::atomic::Ordering::Relaxed), 5);
});

db_test!(async fn a_report_the_database_cannot_store_is_tried_again_and_the_session_goes_on(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let control = st.control_key.public();
    let addr = serve(st.clone()).await;
    let (a_ws, mut a_channel, a_key) = joined(addr, control, &k, 51).await;
    let (mut b_ws, mut b_channel, _) = joined(addr, control, &k, 52).await;
    // B keeps A's latest endpoints.
    let (seen_tx, mut seen) = tokio::sync::watch::channel(None::<Vec<SocketAddr>>);
    tokio::spawn(async move {
        while let Some(m) = next_message(&mut b_ws, &mut b_channel).await {
            if let ServerMessage::Map(map) = m {
                for n in map.peers.iter().flatten().chain(&map.peers_changed) {
                    if n.node_key == a_key {
                        seen_tx.send_replace(Some(n.endpoints.clone()));
                    }
                }
            }
        }
    });
    let wait = std::time::Duration::from_secs(20);
    tokio::time::timeout(wait, seen.wait_for(Option::is_some))
        .await
        .expect("B never heard of A")
        .unwrap();
    // A reads what it is sent, and notes if its session ends.
    let (mut a_tx, mut a_rx) = a_ws.split();
    let a_ended = tokio::spawn(async move {
        loop {
            match a_rx.next().await {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return true,
                Some(Ok(_)) => {}
            }
        }
    });
    // The database refuses to change any node's row: an outage as the coordinator sees it.
    let mut c = st.db.acquire().await.unwrap();
    let outage: &[&str] = if tdb.is_postgres() {
        &[
            "CREATE TABLE outage (x INTEGER)",
            "CREATE FUNCTION outage() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF EXISTS (SELECT 1 FROM outage) THEN RAISE EXCEPTION 'the database is away'; \
             END IF; RETURN NEW; END $$",
            "CREATE TRIGGER outage BEFORE UPDATE ON nodes FOR EACH ROW EXECUTE FUNCTION outage()",
        ]
    } else {
        &[
            "CREATE TABLE outage (x INTEGER)",
            "CREATE TRIGGER outage BEFORE UPDATE ON nodes WHEN EXISTS (SELECT 1 FROM outage) \
             BEGIN SELECT RAISE(ABORT, 'the database is away'); END",
        ]
    };
    for q in outage.iter().chain(&["INSERT INTO outage VALUES (1)"]) {
        sqlx::query(sqlx::AssertSqlSafe(*q))
            .execute(&mut *c)
            .await
            .unwrap();
    }
    let new = vec![SocketAddr::from(([198, 51, 100, 9], 4242))];
    let m = ClientMessage::Endpoints {
        endpoints: new.clone(),
    };
    for f in a_channel.seal(&serde_json::to_vec(&m).unwrap()).unwrap() {
        a_tx.send(Message::Binary(f.into())).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let failed = st
        .counters
        .reports_failed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(failed >= 2, "the report was tried {failed} times and failed");
    assert_ne!(seen.borrow().as_ref(), Some(&new), "stored during the outage");
    assert!(!a_ended.is_finished(), "A's session ended with the database");
    // The database is back: the report waiting is stored and B learns it, A never reconnected.
    sqlx::query("DELETE FROM outage")
        .execute(&mut *c)
        .await
        .unwrap();
    tokio::time::timeout(wait, seen.wait_for(|eps| eps.as_ref() == Some(&new)))
        .await
        .expect("B never learned the endpoints A reported during the outage")
        .unwrap();
    assert!(!a_ended.is_finished(), "A's session ended");
});
