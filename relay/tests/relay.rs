//! The relay over real loopback sockets: QUIC and WebSocket clients exchange packets; nodes
//! without a valid ticket, without their key, or no longer vouched for get nothing.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hybrid::StaticKeypair;
use hybrid::ticket::{Ticket, TicketSigner};
use rand::{SeedableRng, rngs::StdRng};
use relay::client::{self, Incoming, Transport};
use relay::revocation::RevocationSet;
use relay::{QuicLimits, Relay, TicketAuthorizer, unix_now};
use wire::{CertPin, RelayId, RelayInfo, RelayKey, TicketKey};

/// Revokes `key` the way a standalone relay learns it: a list signed by the coordinator.
fn revoke(lab: &Lab, key: [u8; 32]) {
    publish(lab, &[key], unix_now(), unix_now());
}

/// Hands the relay a list issued at `issued_at` revoking `keys` (until two minutes after), as
/// if it came at `now`.
fn publish(lab: &Lab, keys: &[[u8; 32]], issued_at: i64, now: i64) {
    let list = wire::RevocationList {
        issued_at,
        revoked: keys
            .iter()
            .map(|k| wire::Revocation {
                node_key: wire::NodeKey::from_bytes(*k),
                until: issued_at + 120,
            })
            .collect(),
    };
    lab.revoked
        .apply(
            &TicketKey::from_bytes(lab.signer.public()),
            &relay::revocation::sign(&lab.signer, &list),
            now,
        )
        .unwrap();
}

struct Lab {
    relay: Relay,
    quic: relay::QuicListener,
    info: RelayInfo,
    signer: TicketSigner,
    revoked: Arc<RevocationSet>,
    rng: StdRng,
}

async fn lab() -> Lab {
    lab_with(QuicLimits::default(), 1).await
}

/// A relay whose QUIC is served by `threads` endpoints on threads of their own.
async fn lab_with(limits: QuicLimits, threads: usize) -> Lab {
    lab_limited(limits, threads, None).await
}

/// A relay as [`lab_with`] makes, forwarding for each node at most `rate`.
async fn lab_limited(limits: QuicLimits, threads: usize, rate: Option<relay::ClientRate>) -> Lab {
    lab_following(limits, threads, rate, RevocationSet::default()).await
}

/// A relay as [`lab_limited`] makes, following the coordinator's word in `revoked`.
async fn lab_following(
    limits: QuicLimits,
    threads: usize,
    rate: Option<relay::ClientRate>,
    revoked: RevocationSet,
) -> Lab {
    let mut rng = StdRng::seed_from_u64(9);
    let signer = TicketSigner::from_seed([4; 32]);
    let key = StaticKeypair::generate(&mut rng);
    let cert = relay::tls::RelayCert::generate().unwrap();
    let revoked = Arc::new(revoked);
    let auth = Arc::new(TicketAuthorizer::with_revocations(
        TicketKey::from_bytes(signer.public()),
        Arc::clone(&revoked),
    ));
    let relay = Relay::with_client_rate(key, auth, rate);
    let listener = relay::QuicListener::start(
        &relay,
        &cert,
        "127.0.0.1:0".parse().unwrap(),
        threads,
        limits,
    )
    .unwrap();
    let quic = listener.local_addr();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http: SocketAddr = tcp.local_addr().unwrap();
    tokio::spawn(relay.clone().run_sweeper());
    let tls = Arc::new(relay::tls::server_tls(&cert, &[b"http/1.1"]).unwrap());
    tokio::spawn(relay::http::serve_mixed(
        tcp,
        axum::Router::new(),
        relay.router(),
        relay::http::HttpLimits::default(),
        tls,
        std::future::pending(),
    ));
    let info = RelayInfo {
        id: RelayId(1),
        name: "test".into(),
        key: RelayKey::from_bytes(relay.public_key()),
        quic: Some(quic),
        cert_sha256: Some(CertPin(cert.pin())),
        websocket: Some(format!("https://{http}/relay")),
        stun: vec![],
    };
    Lab {
        relay,
        quic: listener,
        info,
        signer,
        revoked,
        rng,
    }
}

impl Lab {
    fn node(&mut self) -> (StaticKeypair, Vec<u8>) {
        self.node_until(unix_now() + 60)
    }

    /// A new node with a ticket that runs out at `not_after`.
    fn node_until(&mut self, not_after: i64) -> (StaticKeypair, Vec<u8>) {
        let k = StaticKeypair::generate(&mut self.rng);
        let t = self.signer.issue(Ticket {
            node_key: k.public(),
            not_after,
        });
        (k, t.to_vec())
    }

    /// A new node, connected to the relay as `info` offers it.
    async fn connected(&mut self, info: RelayInfo) -> (StaticKeypair, client::RelayConn) {
        let (k, t) = self.node();
        let c = client::connect(&info, &k, &t).await.unwrap();
        (k, c)
    }

    fn quic_only(&self) -> RelayInfo {
        RelayInfo {
            websocket: None,
            ..self.info.clone()
        }
    }

    fn ws_only(&self) -> RelayInfo {
        RelayInfo {
            quic: None,
            ..self.info.clone()
        }
    }
}

/// The relay's counters once it has counted `forwarded` frames (it counts each just after
/// forwarding it, so a test that has received them may look first), or after 2 s.
async fn counted(relay: &Relay, forwarded: u64) -> relay::StatsSnapshot {
    let wait = async {
        while relay.stats().forwarded < forwarded {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    relay.stats()
}

/// A bare QUIC connection to the relay `info` offers (no relay session on it yet): the client
/// endpoint and the connection.
async fn quic_client(info: &RelayInfo) -> (quinn::Endpoint, quinn::Connection) {
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client
        .set_default_client_config(relay::tls::client_config(info.cert_sha256.unwrap().0).unwrap());
    let conn = client
        .connect(info.quic.unwrap(), relay::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    (client, conn)
}

async fn next_packet(c: &mut client::RelayConn) -> Option<([u8; 32], Vec<u8>)> {
    loop {
        match tokio::time::timeout(Duration::from_secs(3), c.recv()).await {
            Ok(Some(Incoming::Packet { src, payload })) => return Some((src, payload.to_vec())),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_and_websocket_nodes_exchange_packets_through_the_relay() {
    let mut lab = lab().await;
    let (a, mut ca) = lab.connected(lab.quic_only()).await;
    let (b, mut cb) = lab.connected(lab.ws_only()).await;
    assert_eq!(ca.transport(), Transport::Quic);
    assert_eq!(cb.transport(), Transport::WebSocket);
    // Large packets (a full WireGuard packet) and small ones, both ways.
    let big = vec![0xab; 1400];
    assert!(ca.send(&b.public(), &big));
    assert_eq!(next_packet(&mut cb).await, Some((a.public(), big)));
    assert!(cb.send(&a.public(), b"pong"));
    assert_eq!(
        next_packet(&mut ca).await,
        Some((b.public(), b"pong".to_vec()))
    );
    // A burst arrives complete and in order over the WebSocket.
    for i in 0..500u16 {
        assert!(ca.send(&b.public(), &i.to_be_bytes()));
    }
    for i in 0..500u16 {
        assert_eq!(next_packet(&mut cb).await.unwrap().1, i.to_be_bytes());
    }
    // Latency probes work on both transports.
    ca.ping();
    let pong = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(Incoming::Pong(rtt)) = ca.recv().await {
                return rtt;
            }
        }
    })
    .await
    .unwrap();
    assert!(pong < Duration::from_secs(1));
    // A packet for a node that is not connected comes back as PeerGone.
    assert!(ca.send(&[7; 32], b"x"));
    let gone = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(Incoming::PeerGone(k)) = ca.recv().await {
                return k;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(gone, [7; 32]);
    let s = counted(&lab.relay, 502).await;
    assert_eq!(s.sessions, 2);
    assert!(s.forwarded >= 502, "{s:?}");
}

/// Streams a QUIC client opens would hold the relay's memory until read, and the relay reads
/// only the one it opens itself: a client may open none (by quinn's defaults it could open 200
/// and send 1.25 MB on each, before any authentication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_may_open_no_streams_of_its_own() {
    let mut lab = lab().await;
    let (_client, conn) = quic_client(&lab.quic_only()).await;
    let uni = tokio::time::timeout(Duration::from_millis(500), conn.open_uni()).await;
    assert!(uni.is_err(), "the client opened a unidirectional stream");
    let bi = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(bi.is_err(), "the client opened a bidirectional stream");
    // The relay's own stream still reaches it, and nodes are still served.
    let relays = tokio::time::timeout(Duration::from_secs(2), conn.accept_bi()).await;
    assert!(
        matches!(relays, Ok(Ok(_))),
        "the relay's stream did not come"
    );
    let (a, ca) = lab.connected(lab.quic_only()).await;
    let (b, mut cb) = lab.connected(lab.quic_only()).await;
    assert!(ca.send(&b.public(), b"still served"));
    let (src, p) = next_packet(&mut cb).await.expect("the packet is missing");
    assert_eq!((src, p.as_slice()), (a.public(), &b"still served"[..]));
}

/// A ticket's check is a signature verification on the thread that forwards everyone's
/// packets: a node that floods refreshed tickets gets one checked a second, the rest dropped
/// and counted, and its packets still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flooding_refreshed_tickets_gets_one_checked_a_second() {
    let mut lab = lab().await;
    let (a, ca) = lab.connected(lab.quic_only()).await;
    let (b, mut cb) = lab.connected(lab.quic_only()).await;
    let ticket = lab.signer.issue(Ticket {
        node_key: a.public(),
        not_after: unix_now() + 120,
    });
    let started = std::time::Instant::now();
    for _ in 0..500 {
        ca.refresh_ticket(&ticket);
    }
    assert!(ca.send(&b.public(), b"after the flood"));
    let (src, p) = next_packet(&mut cb).await.expect("the packet is missing");
    assert_eq!((src, p.as_slice()), (a.public(), &b"after the flood"[..]));
    // The 500 arrive within a few seconds: at most one checked in each.
    let wait = async {
        while lab.relay.stats().dropped_ticket_too_soon + 2 + started.elapsed().as_secs() < 500 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), wait).await;
    let s = lab.relay.stats();
    let checked = 500 - s.dropped_ticket_too_soon;
    assert!(
        checked <= 2 + started.elapsed().as_secs(),
        "{checked} checked in {:?}: {s:?}",
        started.elapsed()
    );
    assert_eq!(s.malformed, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_nodes_get_packets_of_every_size_datagrams_or_not() {
    let mut lab = lab().await;
    let (a, ca) = lab.connected(lab.quic_only()).await;
    let (b, mut cb) = lab.connected(lab.quic_only()).await;
    assert_eq!(cb.transport(), Transport::Quic);
    // Small, a full WireGuard packet, larger than any datagram (so on the stream, both hops),
    // the largest payload there is, then small again: the sender remembers the datagram size
    // it was told and must ask again for the large ones, and still send the small ones as
    // datagrams after them. Datagrams and the stream are not ordered with each other.
    let sizes = [16usize, 1400, 3000, relay::proto::MAX_PAYLOAD, 16, 1400];
    let sent: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| vec![i as u8; *n])
        .collect();
    for p in &sent {
        assert!(ca.send(&b.public(), p), "{} bytes not queued", p.len());
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let (src, p) = next_packet(&mut cb).await.expect("a packet is missing");
        assert_eq!(src, a.public());
        got.push(p);
    }
    got.sort_by_key(|p| p[0]);
    assert_eq!(got, sent);
    let s = counted(&lab.relay, sent.len() as u64).await;
    assert_eq!(s.forwarded, sent.len() as u64, "{s:?}");
    assert_eq!(s.dropped_queue_full, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_nodes_served_by_different_threads_reach_each_other_until_the_listener_closes() {
    let mut lab = lab_with(QuicLimits::default(), 4).await;
    let mut nodes = Vec::new();
    for _ in 0..12 {
        let (k, c) = lab.connected(lab.quic_only()).await;
        assert_eq!(c.transport(), Transport::Quic);
        nodes.push((k, c));
    }
    // The kernel spread them by address over the four endpoints (all twelve on one would
    // happen about once in four million runs).
    let open = lab.quic.open_connections();
    assert_eq!(open.iter().sum::<usize>(), 12, "{open:?}");
    assert!(open.iter().filter(|n| **n > 0).count() >= 2, "{open:?}");
    // Each node sends a burst to the next: a full WireGuard packet, then numbered small ones.
    let keys: Vec<[u8; 32]> = nodes.iter().map(|(k, _)| k.public()).collect();
    for (i, (_, c)) in nodes.iter().enumerate() {
        let to = keys[(i + 1) % keys.len()];
        assert!(c.send(&to, &[i as u8; 1400]));
        for n in 0..100u16 {
            assert!(c.send(&to, &n.to_be_bytes()));
        }
    }
    for i in 0..nodes.len() {
        let from = keys[(i + keys.len() - 1) % keys.len()];
        let c = &mut nodes[i].1;
        let mut got = Vec::new();
        while got.len() < 101 {
            let (src, p) = next_packet(c).await.expect("a packet is missing");
            assert_eq!(src, from);
            got.push(p);
        }
        got.sort();
        let mut want: Vec<Vec<u8>> = (0..100u16).map(|n| n.to_be_bytes().to_vec()).collect();
        want.push(vec![((i + keys.len() - 1) % keys.len()) as u8; 1400]);
        want.sort();
        assert_eq!(got, want, "node {i}");
    }
    let s = counted(&lab.relay, 12 * 101).await;
    assert_eq!(s.forwarded, 12 * 101, "{s:?}");
    // In the ring of twelve spread over two endpoints or more, some node's successor is on
    // another thread: its bursts went through that session's outbox, whole.
    assert!(
        s.across_threads > 0 && s.across_threads <= s.forwarded,
        "{s:?}"
    );
    assert_eq!(s.dropped_queue_full, 0, "{s:?}");
    // Dropping the listener closes every endpoint, and with it every node's connection.
    drop(lab.quic);
    for (i, (_, c)) in nodes.iter_mut().enumerate() {
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            while c.recv().await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "node {i} still connected");
    }
}

/// A client whose address changes (a NAT rebinding) may land on another endpoint of the
/// listener, which does not know its connection: that endpoint's stateless reset, made with
/// the reset key all endpoints share, ends the connection at once, so the node reconnects
/// instead of waiting out an idle timeout. The client moves to a new port until that happens
/// (each move lands on the other endpoint half the time; one that stays is a migration the
/// first endpoint follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_moves_to_another_endpoint_is_reset_at_once() {
    let lab = lab_with(QuicLimits::default(), 2).await;
    let info = lab.quic_only();
    let (client, conn) = quic_client(&info).await;
    for _ in 0..64 {
        client
            .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        // Large enough to be answered with a reset (smaller ones are not, against loops).
        let _ = conn.send_datagram(vec![0u8; 1000].into());
        let closed = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
        if closed.is_ok() {
            break;
        }
    }
    assert!(
        matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)),
        "{:?}",
        conn.close_reason()
    );
}

/// Batches of `Send` frames (`FrameSender::send_batch`, as a node's workers queue a batch's
/// relayed packets) arrive whole at the other node: over QUIC as datagrams queued on the
/// connection's own thread, those too large for one on the stream; over the WebSocket in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_frames_reach_the_other_node_over_quic_and_the_websocket() {
    let mut lab = lab().await;
    for info in [lab.quic_only(), lab.ws_only()] {
        let (a, ca) = lab.connected(info.clone()).await;
        let (b, mut cb) = lab.connected(info).await;
        let packet = |i: usize| {
            // Every 25th larger than any datagram.
            let len = if i % 25 == 7 { 3000 } else { 1312 };
            let mut p = vec![(i % 251) as u8; len];
            p[..4].copy_from_slice(&(i as u32).to_be_bytes());
            p
        };
        let sender = ca.sender();
        for batch in 0..4 {
            let frames: Vec<bytes::Bytes> = (batch * 50..batch * 50 + 50)
                .map(|i| relay::proto::encode_packet(false, &b.public(), &packet(i)).into())
                .collect();
            assert_eq!(sender.send_batch(frames), 50, "batch {batch} queued whole");
        }
        let mut got = Vec::new();
        while got.len() < 200 {
            let (src, p) = next_packet(&mut cb).await.expect("a packet is missing");
            assert_eq!(src, a.public());
            got.push(p);
        }
        if ca.transport() == Transport::WebSocket {
            assert_eq!(got, (0..200).map(packet).collect::<Vec<_>>(), "in order");
        }
        // Datagrams and the stream are not ordered with each other.
        got.sort_by_key(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
        assert_eq!(got, (0..200).map(packet).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_nodes_exchange_bursts_complete_and_in_order() {
    let mut lab = lab().await;
    let (a, mut ca) = lab.connected(lab.ws_only()).await;
    let (b, mut cb) = lab.connected(lab.ws_only()).await;
    assert_eq!(ca.transport(), Transport::WebSocket);
    // Bursts queued faster than they are written, both ways at once: the writers on both
    // ends (the node's and the relay's) send what is waiting in batches and flush each one.
    // Sizes vary up to the largest payload, and a lone packet follows each burst (it must
    // not wait for more to come).
    let packet = |i: usize| {
        let len = 4 + (i * 613) % (relay::proto::MAX_PAYLOAD - 3);
        let mut p = vec![(i % 251) as u8; len];
        p[..4].copy_from_slice(&(i as u32).to_be_bytes());
        p
    };
    for round in 0..3 {
        let n = 300;
        for i in 0..n {
            assert!(ca.send(&b.public(), &packet(round * 1000 + i)));
            assert!(cb.send(&a.public(), &packet(round * 1000 + i)));
        }
        for i in 0..n {
            let want = packet(round * 1000 + i);
            assert_eq!(next_packet(&mut cb).await, Some((a.public(), want.clone())));
            assert_eq!(next_packet(&mut ca).await, Some((b.public(), want)));
        }
        assert!(ca.send(&b.public(), b"lone"));
        assert_eq!(
            next_packet(&mut cb).await,
            Some((a.public(), b"lone".to_vec()))
        );
    }
    let s = counted(&lab.relay, 3 * 601).await;
    assert_eq!(s.forwarded, 3 * 601, "{s:?}");
    assert_eq!(s.dropped_queue_full, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_the_coordinator_does_not_vouch_for_get_nothing() {
    let mut lab = lab().await;
    let (a, ta) = lab.node();
    let info = lab.ws_only();
    // No ticket, another mesh's ticket, an expired ticket, someone else's ticket.
    let stranger = TicketSigner::from_seed([5; 32]).issue(Ticket {
        node_key: a.public(),
        not_after: unix_now() + 60,
    });
    let expired = lab.signer.issue(Ticket {
        node_key: a.public(),
        not_after: unix_now() - 1,
    });
    let (b, tb) = lab.node();
    for (ticket, why) in [
        (vec![], "malformed"),
        (stranger.to_vec(), "not signed"),
        (expired.to_vec(), "expired"),
        (tb.clone(), "another node key"),
    ] {
        let err = client::connect(&info, &a, &ticket).await.err().unwrap();
        assert!(format!("{err:#}").contains(why), "{why}: {err:#}");
    }
    // A ticket without the key it names: a thief who saw b's ticket cannot use it.
    let thief = StaticKeypair::generate(&mut lab.rng);
    let err = client::connect(&info, &thief, &tb).await.err().unwrap();
    assert!(format!("{err:#}").contains("another node key"), "{err:#}");
    // A relay that cannot prove the listed key is refused by the node.
    let impostor = RelayInfo {
        key: RelayKey::from_bytes(StaticKeypair::generate(&mut lab.rng).public()),
        ..info.clone()
    };
    let err = client::connect(&impostor, &a, &ta).await.err().unwrap();
    assert!(
        format!("{err:#}").contains("authentication failed"),
        "{err:#}"
    );
    // A QUIC certificate that does not match the pin is refused (no fallback offered here).
    let wrong_pin = RelayInfo {
        cert_sha256: Some(CertPin([0; 32])),
        ..lab.quic_only()
    };
    assert!(client::connect(&wrong_pin, &a, &ta).await.is_err());
    assert!(lab.relay.stats().rejected >= 5);
    assert_eq!(lab.relay.stats().sessions, 0);
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_no_longer_vouched_for_is_cut_off_within_a_second() {
    let mut lab = lab().await;
    let (a, ta) = lab.node();
    let (b, tb) = lab.node();
    let ca = client::connect(&lab.quic_only(), &a, &ta).await.unwrap();
    let mut cb = client::connect(&lab.ws_only(), &b, &tb).await.unwrap();
    assert!(ca.send(&b.public(), b"before"));
    assert!(next_packet(&mut cb).await.is_some());
    revoke(&lab, a.public());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!lab.relay.is_connected(&a.public()));
    ca.send(&b.public(), b"after");
    assert_eq!(
        next_packet(&mut cb).await,
        None,
        "nothing from a revoked node arrives"
    );
    // Reconnecting does not help.
    assert!(client::connect(&lab.ws_only(), &a, &ta).await.is_err());
    assert_eq!(lab.relay.stats().kicked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_falls_back_to_the_websocket_when_udp_is_blocked() {
    let mut lab = lab().await;
    let (a, ta) = lab.node();
    // A QUIC address where nothing answers (a bound UDP socket that never replies).
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let info = RelayInfo {
        quic: Some(black_hole.local_addr().unwrap()),
        ..lab.info.clone()
    };
    let started = std::time::Instant::now();
    let c = client::connect(&info, &a, &ta).await.unwrap();
    assert_eq!(c.transport(), Transport::WebSocket);
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_runs_only_over_tls_with_the_pinned_certificate() {
    let mut lab = lab().await;
    let (a, ta) = lab.node();
    let ws = lab.ws_only();
    // A plain ws:// URL is refused by the client before anything is sent.
    let plain = RelayInfo {
        websocket: ws
            .websocket
            .as_ref()
            .map(|u| u.replace("https://", "http://")),
        ..ws.clone()
    };
    let err = client::connect(&plain, &a, &ta).await.err().unwrap();
    assert!(format!("{err:#}").contains("not https://"), "{err:#}");
    // A relay presenting another certificate (an impostor on the path) is refused.
    let wrong_pin = RelayInfo {
        cert_sha256: Some(CertPin([7; 32])),
        ..ws.clone()
    };
    assert!(client::connect(&wrong_pin, &a, &ta).await.is_err());
    // The real one works.
    let c = client::connect(&ws, &a, &ta).await.unwrap();
    assert_eq!(c.transport(), Transport::WebSocket);
}

/// A QUIC client whose handshake never finishes, as one with a made-up source address: its
/// packets reach the relay from a socket of their own that drops whatever the relay answers.
async fn stalled_handshake(
    relay: SocketAddr,
    pin: [u8; 32],
) -> (quinn::Endpoint, quinn::Connecting) {
    let proxy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = proxy.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = proxy.recv_from(&mut buf).await {
            if from != relay {
                let _ = proxy.send_to(&buf[..n], relay).await;
            }
        }
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(relay::tls::client_config(pin).unwrap());
    let connecting = client.connect(at, relay::tls::SERVER_NAME).unwrap();
    (client, connecting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_quic_handshakes_that_never_finish_holds_no_state_and_nodes_still_connect() {
    let limits = QuicLimits {
        retry_above: 8,
        handshake_timeout: Duration::from_secs(2),
        ..QuicLimits::default()
    };
    // Four endpoints: the handshakes in progress are counted across them.
    let mut lab = lab_with(limits, 4).await;
    let relay_addr = lab.info.quic.unwrap();
    let pin = lab.info.cert_sha256.unwrap().0;
    let flood = tokio::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..64 {
        stalled.push(stalled_handshake(relay_addr, pin).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The relay keeps state for the first few only; the rest were sent Retry packets (which
    // their made-up addresses never see).
    let open = lab.quic.open_connections();
    assert!(open.iter().sum::<usize>() <= 8, "{open:?} handshakes held");
    let s = lab.relay.stats();
    assert!(s.quic_retried >= 56, "{s:?}");
    // Nodes still get in over QUIC (answering their Retry) while the flood goes on.
    let (a, mut ca) = lab.connected(lab.quic_only()).await;
    assert_eq!(ca.transport(), Transport::Quic);
    let (b, cb) = lab.connected(lab.quic_only()).await;
    assert!(cb.send(&a.public(), b"through"));
    assert_eq!(
        next_packet(&mut ca).await,
        Some((b.public(), b"through".to_vec()))
    );
    // The handshakes that never finish are let go at the 2 s deadline (QUIC's own idle
    // timeout would keep them for 20 s), the flood still going.
    tokio::time::sleep_until(flood + Duration::from_secs(3)).await;
    let s = lab.relay.stats();
    assert!(s.quic_timed_out >= 8, "{s:?}");
    assert!(lab.relay.is_connected(&a.public()) && lab.relay.is_connected(&b.public()));
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_handshakes_from_an_address_beyond_its_rate_are_refused() {
    // Four endpoints: the handshakes from one address are counted across them.
    let mut lab = lab_with(
        QuicLimits {
            handshakes: relay::http::HandshakeRate {
                burst: 2,
                interval: Duration::from_secs(3),
            },
            ..QuicLimits::default()
        },
        4,
    )
    .await;
    let info = lab.quic_only();
    let start = std::time::Instant::now();
    let (_, _c1) = lab.connected(info.clone()).await;
    let (_, _c2) = lab.connected(info.clone()).await;
    let (k, t) = lab.node();
    let err = client::connect(&info, &k, &t)
        .await
        .err()
        .expect("a third handshake within 3 s");
    assert!(format!("{err:#}").contains("quic"), "{err:#}");
    assert_eq!(lab.relay.stats().quic_too_often, 1);
    // Open connections are not what counts: 3 s later the address may start one more.
    tokio::time::sleep_until((start + Duration::from_millis(3100)).into()).await;
    let c = client::connect(&info, &k, &t).await.unwrap();
    assert_eq!(c.transport(), Transport::Quic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_beyond_the_per_address_limit_are_refused() {
    // Four endpoints: the connections from one address are counted across them.
    let mut lab = lab_with(
        QuicLimits {
            per_ip: 2,
            ..QuicLimits::default()
        },
        4,
    )
    .await;
    let info = lab.quic_only();
    let (_, c1) = lab.connected(info.clone()).await;
    let (_, _c2) = lab.connected(info.clone()).await;
    let (k, t) = lab.node();
    let err = client::connect(&info, &k, &t)
        .await
        .err()
        .expect("a third connection");
    assert!(format!("{err:#}").contains("quic"), "{err:#}");
    assert!(lab.relay.stats().quic_refused >= 1);
    // A slot freed is a slot to take.
    drop(c1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client::connect(&info, &k, &t).await.unwrap();
    assert_eq!(c.transport(), Transport::Quic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_sent_before_authenticating_are_dropped_not_kept() {
    let mut lab = lab().await;
    let info = lab.quic_only();
    let (_client, conn) = quic_client(&info).await;
    // The relay's challenge arrives; the client never answers it and sends datagrams instead.
    let (_send, mut recv) = conn.accept_bi().await.unwrap();
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.unwrap();
    for i in 0..500u32 {
        let mut d = vec![0u8; 1000];
        d[..4].copy_from_slice(&i.to_be_bytes());
        conn.send_datagram(d.into()).unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let read = async {
        while lab.relay.stats().dropped_before_auth < 400 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("datagrams left unread: {:?}", lab.relay.stats()));
    assert_eq!(lab.relay.stats().sessions, 0);
    assert_eq!(lab.relay.stats().forwarded, 0);
    // A node that authenticates afterwards is served as usual.
    let (a, mut ca) = lab.connected(info.clone()).await;
    let (b, cb) = lab.connected(info).await;
    assert!(cb.send(&a.public(), b"after"));
    assert_eq!(
        next_packet(&mut ca).await,
        Some((b.public(), b"after".to_vec()))
    );
}

/// Receives for `wait`: how many packets came from each of `keys`, in that order.
async fn received_from(c: &mut client::RelayConn, keys: &[[u8; 32]], wait: Duration) -> Vec<u64> {
    let mut got = vec![0; keys.len()];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(inc)) = tokio::time::timeout_at(deadline, c.recv()).await {
        if let Incoming::Packet { src, .. } = inc
            && let Some(i) = keys.iter().position(|k| *k == src)
        {
            got[i] += 1;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_what_strangers_send_it_and_the_relay_drops_it_while_peers_get_through() {
    let mut lab = lab().await;
    let (v, mut cv) = lab.connected(lab.quic_only()).await;
    let (x, cx) = lab.connected(lab.quic_only()).await;
    let (y, cy) = lab.connected(lab.ws_only()).await;
    let (vk, xk, yk) = (v.public(), x.public(), y.public());
    let packet = [0x55u8; 1200];
    // Before V refuses anything, X's packets reach it.
    assert!(cx.send(&vk, &packet));
    assert_eq!(next_packet(&mut cv).await.map(|p| p.0), Some(xk));
    assert!(cv.refuse(&[xk]));
    let applied = async {
        while lab.relay.stats().dropped_refused == 0 {
            cx.send(&vk, &packet);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), applied)
        .await
        .expect("the relay never applied V's refusal");
    let _ = received_from(&mut cv, &[], Duration::from_millis(200)).await;
    // X floods V while Y sends: only Y's packets arrive, and X's are counted as refused.
    let before = lab.relay.stats().dropped_refused;
    let mut flooded = 0u64;
    for i in 0..2_000u32 {
        if cx.send(&vk, &packet) {
            flooded += 1;
        }
        if i % 40 == 0 {
            assert!(cy.send(&vk, &i.to_le_bytes()));
        }
        if i % 200 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let got = received_from(&mut cv, &[xk, yk], Duration::from_millis(1_500)).await;
    assert_eq!(got, vec![0, 50], "packets from X and from Y");
    let s = lab.relay.stats();
    assert!(
        s.dropped_refused - before >= flooded * 9 / 10,
        "{flooded} flooded, {} refused: {s:?}",
        s.dropped_refused - before
    );
    assert_eq!(s.malformed, 0, "{s:?}");
    // Once V takes X off its list (a second later: one list a second), X gets through again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(cv.refuse(&[]));
    let through = async {
        loop {
            cx.send(&vk, &packet);
            let got = received_from(&mut cv, &[xk], Duration::from_millis(50)).await;
            if got[0] > 0 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), through)
        .await
        .expect("X never got through after V lifted its refusal");
    assert_eq!(lab.relay.stats().dropped_refuse_too_soon, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_no_more_than_the_relays_rate_and_others_keep_theirs() {
    let rate = relay::ClientRate {
        bytes_per_sec: 1_000_000,
        burst: 100_000,
    };
    let mut lab = lab_limited(QuicLimits::default(), 1, Some(rate)).await;
    let (v, mut cv) = lab.connected(lab.quic_only()).await;
    let (x, cx) = lab.connected(lab.quic_only()).await;
    let (y, cy) = lab.connected(lab.ws_only()).await;
    let (vk, xk, yk) = (v.public(), x.public(), y.public());
    // X sends 2.4 MB at once, Y a little: X gets its burst and its rate, Y all it sent.
    let started = std::time::Instant::now();
    let packet = [0x55u8; 1_000];
    let mut queued = 0u64;
    for i in 0..2_400u32 {
        if cx.send(&vk, &packet) {
            queued += 1;
        }
        if i % 100 == 0 {
            assert!(cy.send(&vk, &packet));
            tokio::task::yield_now().await;
        }
    }
    let got = received_from(&mut cv, &[xk, yk], Duration::from_millis(1_000)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = (rate.burst as f64 + rate.bytes_per_sec as f64 * elapsed) / 1_000.0;
    assert_eq!(got[1], 24, "Y's packets");
    assert!(
        got[0] as f64 <= allowed + 1.0,
        "X got {} packets through in {elapsed:.2}s, at most {allowed:.0} allowed",
        got[0]
    );
    assert!(
        got[0] >= 100,
        "X got only {} packets through: not even its burst",
        got[0]
    );
    let s = lab.relay.stats();
    assert!(
        s.dropped_rate_limited + got[0] + 100 >= queued,
        "{queued} queued, {} through, {} rate limited: {s:?}",
        got[0],
        s.dropped_rate_limited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_connecting_again_takes_over_from_its_older_connection() {
    let mut lab = lab().await;
    let (a, t) = lab.node();
    let mut old = client::connect(&lab.quic_only(), &a, &t).await.unwrap();
    let (_b, cb) = lab.connected(lab.ws_only()).await;
    // The same node again (it moved networks, or restarted): the newest connection wins, and
    // the older one is closed.
    let mut new = client::connect(&lab.ws_only(), &a, &t).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        while old.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the older connection was kept");
    assert!(cb.send(&a.public(), b"to the newest"));
    let (_, p) = next_packet(&mut new).await.expect("the packet is missing");
    assert_eq!(p, b"to the newest");
    assert_eq!(lab.relay.stats().sessions, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_costs_the_relay_a_bounded_queue() {
    let mut lab = lab().await;
    // V never reads: its own queue fills, then its stream's window, then the relay's queue to
    // it, and the relay drops the rest.
    let (v, _never_read) = lab.connected(lab.quic_only()).await;
    let (_x, cx) = lab.connected(lab.quic_only()).await;
    // Packets too large for a datagram, so they go on the stream.
    let big = vec![0x11u8; relay::proto::MAX_PAYLOAD];
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if !cx.send(&v.public(), &big) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = lab.relay.stats();
    eprintln!(
        "forwarded {} frames to a node that reads nothing",
        s.forwarded
    );
    // V's own queue (2,048 frames), its stream's window (1.25 MB, about 300 of these) and the
    // relay's 256-frame queue: the relay keeps about 1 MB of them, not 8.
    assert!(s.dropped_queue_full > 0, "{s:?}");
    assert!(
        s.forwarded <= 2_048 + 320 + 256 + 64,
        "the relay took {} frames for a node that reads nothing: {s:?}",
        s.forwarded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_node_that_stops_reading_costs_the_relay_a_bounded_number_of_bytes() {
    let mut lab = lab().await;
    // V never reads: its own queue fills, then the TCP connection's buffers, then the relay's
    // queue to it, and the relay drops the rest.
    let (v, _never_read) = lab.connected(lab.ws_only()).await;
    let (_x, cx) = lab.connected(lab.quic_only()).await;
    // The largest packets: bounded by frames alone, the queue held 2,048 of them (8.5 MB).
    let big = vec![0x22u8; relay::proto::MAX_PAYLOAD];
    let started = std::time::Instant::now();
    let mut most = 0;
    // 3 s, and on until the relay's queue to V is at least half full (V's own buffers fill
    // first, slower on a loaded machine), at most 20 s.
    let bound = 3 << 20;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(3)
        || (started.elapsed() < Duration::from_secs(20)
            && (!sent.is_multiple_of(256) || lab.relay.stats().queued_bytes <= bound / 2))
    {
        sent += 1;
        if !cx.send(&v.public(), &big) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            most = most.max(lab.relay.stats().queued_bytes);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = lab.relay.stats();
    eprintln!(
        "the relay queued at most {most} bytes for a node that reads nothing, {} now",
        s.queued_bytes
    );
    assert!(s.dropped_queue_full > 0, "{s:?}");
    // V's queue holds at most 3 MiB (X's may hold a few small frames meanwhile).
    assert!(
        s.queued_bytes > bound / 2 && most <= bound + 4096,
        "queued {} bytes, at most {most}: {s:?}",
        s.queued_bytes
    );
}

/// A relay restarted during a coordinator outage takes back what it kept in its state
/// directory: a node it served comes back with its expired ticket, one it never served and one
/// revoked before the restart do not; a relay that kept nothing refuses them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_during_an_outage_serves_the_nodes_it_served_before() {
    let grace = Duration::from_secs(3600);
    let mut lab = lab_following(
        QuicLimits::default(),
        1,
        None,
        RevocationSet::with_outage_grace(grace),
    )
    .await;
    let t0 = unix_now();
    // The last list came 40 s ago: the coordinator is gone.
    publish(&lab, &[], t0 - 40, t0 - 40);
    let (a, ta) = lab.node_until(t0 + 2);
    let (r, tr) = lab.node_until(t0 + 2);
    let (x, tx) = lab.node_until(t0 + 2);
    // B, with a ticket that lasts, connects after the restart only.
    let (b, tb) = lab.node_until(t0 + 60);
    let ca = client::connect(&lab.quic_only(), &a, &ta).await.unwrap();
    let cr = client::connect(&lab.quic_only(), &r, &tr).await.unwrap();
    // R is revoked (a list replayed from before the outage still says so).
    publish(&lab, &[r.public()], t0 - 40, unix_now());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(relay::revocation::KEPT_FILE);
    let (kept, changed) = lab.revoked.kept();
    assert!(changed, "serving A changed what is kept");
    relay::revocation::save_kept(&path, &kept).unwrap();
    drop((ca, cr));
    // The relay restarts, its tickets' end passes.
    let loaded = relay::revocation::load_kept(&path).unwrap().expect("kept");
    assert_eq!(loaded, kept);
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(3)).await;
    assert!(unix_now() > t0 + 2);
    let restored = RevocationSet::with_outage_grace(grace);
    restored.restore(loaded, unix_now());
    let lab = lab_following(QuicLimits::default(), 1, None, restored).await;
    let expired = |e: Option<anyhow::Error>| format!("{:#}", e.expect("refused"));
    let ca = client::connect(&lab.quic_only(), &a, &ta)
        .await
        .expect("A, served before");
    let mut cb = client::connect(&lab.quic_only(), &b, &tb).await.unwrap();
    assert!(ca.send(&b.public(), b"after the restart"));
    assert_eq!(
        next_packet(&mut cb).await,
        Some((a.public(), b"after the restart".to_vec())),
        "{:?}",
        lab.relay.stats()
    );
    assert!(expired(client::connect(&lab.quic_only(), &x, &tx).await.err()).contains("expired"));
    assert!(
        client::connect(&lab.quic_only(), &r, &tr).await.is_err(),
        "R was revoked"
    );
    assert!(lab.revoked.is_revoked(&r.public(), unix_now()));
    // Without what it kept, a restarted relay refuses A too.
    let forgetful = lab_following(
        QuicLimits::default(),
        1,
        None,
        RevocationSet::with_outage_grace(grace),
    )
    .await;
    assert!(
        expired(client::connect(&forgetful.quic_only(), &a, &ta).await.err()).contains("expired")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_coordinator_outage_the_nodes_a_relay_served_are_served_past_their_tickets() {
    let grace = RevocationSet::with_outage_grace(Duration::from_secs(3600));
    let mut lab = lab_following(QuicLimits::default(), 1, None, grace).await;
    let t0 = unix_now();
    // The last list from the coordinator came 40 s ago: it is gone.
    publish(&lab, &[], t0 - 40, t0 - 40);
    let (a, ta) = lab.node_until(t0 + 2);
    let (b, tb) = lab.node_until(t0 + 2);
    let (c, tc) = lab.node_until(t0 + 2);
    let (x, tx) = lab.node_until(t0 + 2);
    let ca = client::connect(&lab.quic_only(), &a, &ta).await.unwrap();
    let mut cb = client::connect(&lab.ws_only(), &b, &tb).await.unwrap();
    let _cc = client::connect(&lab.quic_only(), &c, &tc).await.unwrap();
    // Past the tickets' end (the sweeper runs every second): still served.
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(4)).await;
    assert!(unix_now() > t0 + 2);
    for k in [&a, &b, &c] {
        assert!(
            lab.relay.is_connected(&k.public()),
            "{:?}",
            lab.relay.stats()
        );
    }
    assert_eq!(lab.relay.stats().sessions_past_ticket, 3);
    assert!(ca.send(&b.public(), b"still here"));
    assert_eq!(
        next_packet(&mut cb).await,
        Some((a.public(), b"still here".to_vec()))
    );
    // A node it served may come back with its last ticket; one it never served may not.
    drop(ca);
    let ca = client::connect(&lab.quic_only(), &a, &ta).await.unwrap();
    assert!(ca.send(&b.public(), b"back"));
    assert_eq!(
        next_packet(&mut cb).await,
        Some((a.public(), b"back".to_vec()))
    );
    let err = client::connect(&lab.quic_only(), &x, &tx).await.err();
    assert!(
        format!("{:#}", err.expect("a node never served")).contains("expired"),
        "refused as expired"
    );
    // A list that revokes C (even an old one replayed) ends its grace for good.
    publish(&lab, &[c.public()], t0 - 40, unix_now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!lab.relay.is_connected(&c.public()));
    assert!(client::connect(&lab.quic_only(), &c, &tc).await.is_err());

    // The coordinator is back: the nodes have two minutes to bring fresh tickets...
    let t1 = unix_now();
    publish(&lab, &[], t1, t1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(lab.relay.is_connected(&a.public()));
    // ... and are let go once lists kept coming for two minutes and no fresh ticket came.
    for i in 1..=7 {
        publish(&lab, &[], t1 + 20 * i, t1 + 20 * i);
    }
    lab.relay.sweep(t1 + 140);
    assert!(!lab.relay.is_connected(&a.public()) && !lab.relay.is_connected(&b.public()));
    assert!(
        !lab.revoked.serves_expired(&a.public(), t0 + 2, t1 + 140),
        "an expired ticket once the coordinator is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_outage_grace_a_session_ends_with_its_ticket() {
    let mut lab = lab().await;
    let t0 = unix_now();
    let (a, ta) = lab.node_until(t0 + 1);
    let _ca = client::connect(&lab.quic_only(), &a, &ta).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !lab.relay.is_connected(&a.public()),
        "kicked when its ticket ran out"
    );
    assert!(client::connect(&lab.quic_only(), &a, &ta).await.is_err());
}
