//! The control channel over a real WebSocket: what the coordinator accepts from a node before
//! it registers it.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use hybrid::{InitiatorHandshake, Psk, Purpose, StaticKeypair};
use rand::{SeedableRng, rngs::StdRng};
use support::{hello, key, state};
use tokio_tungstenite::tungstenite::Message;
use wire::{ClientMessage, ErrorCode, NodeKey, ServerMessage};

async fn serve(st: coordinator::state::AppState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = coordinator::api::router(st);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
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

/// Runs a control session: handshake as `machine`, then a hello claiming `node_key`; returns
/// the coordinator's first answer.
async fn first_answer(
    addr: SocketAddr,
    control: [u8; 32],
    machine: &StaticKeypair,
    node_key: NodeKey,
    auth: &str,
    proof: Proof,
) -> (ServerMessage, [u8; 32]) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/control"))
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(node_key.as_bytes()[0].into());
    let (ini, msg1) = InitiatorHandshake::start(
        &mut rng,
        Purpose::Control,
        machine,
        &control,
        &Psk::zero(),
        &[],
    )
    .unwrap();
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
    let json = serde_json::to_vec(&ClientMessage::Hello(h)).unwrap();
    for f in channel.seal(&json).unwrap() {
        ws.send(Message::Binary(f.into())).await.unwrap();
    }
    loop {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap()
            && let Some(m) = channel.open(&b).unwrap()
        {
            return (serde_json::from_slice(&m).unwrap(), session);
        }
    }
}

fn refused_with(m: &ServerMessage) -> Option<(ErrorCode, &str)> {
    match m {
        ServerMessage::Error { code, message } => Some((*code, message.as_str())),
        _ => None,
    }
}

#[tokio::test]
async fn a_node_must_prove_it_holds_its_node_key() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(dir.path()).await;
    let k = key(&st, true, 3600).await;
    let control = st.control_key.public();
    let addr = serve(st.clone()).await;
    let mut rng = StdRng::seed_from_u64(5);
    let (victim_machine, victim_node) = (
        StaticKeypair::generate(&mut rng),
        StaticKeypair::generate(&mut rng),
    );
    let victim_key = NodeKey::from_bytes(victim_node.public());
    let (m, victim_session) = first_answer(
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
        let (m, _) = first_answer(addr, control, &attacker, victim_key, &k, proof).await;
        let (code, msg) = refused_with(&m).unwrap_or_else(|| panic!("accepted: {m:?}"));
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(msg.contains("prove"), "{msg}");
    }
    // Nothing was registered for the attacker and the victim keeps its key.
    let nodes = coordinator::ops::list_nodes(&st).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_key, victim_key.to_text());
}
