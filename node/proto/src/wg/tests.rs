//! Every exchange runs against gotatun's `Tunn`, an independent implementation of the same
//! protocol: if either side derived a key differently, nothing would open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::x25519::{PublicKey, StaticSecret};
use proptest::prelude::*;
use rand_09::SeedableRng as _;
use rand_09::rngs::StdRng;

use super::handshake::Identity;
use super::peer::{Outcome, Peer, QUEUE_MAX, read_initiation};
use super::session::{Replay, WINDOW};
use super::{
    Error, KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
};

const MTU: usize = 1420;
const WALL: Duration = Duration::from_secs(1_800_000_000);

fn secret(n: u8) -> [u8; 32] {
    let mut k = [n; 32];
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

fn public(n: u8) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(secret(n))).to_bytes()
}

fn table() -> IndexTable<StdRng> {
    IndexTable::from_rng(StdRng::seed_from_u64(7))
}

/// Our side: node 1, talking to node 2.
fn ours(psk: [u8; 32]) -> Peer {
    Peer::new(
        Arc::new(Identity::new(&secret(1))),
        public(2),
        psk,
        table(),
        [9; 32],
        MTU,
    )
}

/// gotatun's side: node 2, talking to node 1.
fn theirs(psk: [u8; 32]) -> Tunn<StdRng> {
    Tunn::new_with_rng(
        StaticSecret::from(secret(2)),
        PublicKey::from(public(1)),
        Some(psk),
        None,
        IndexTable::from_rng(StdRng::seed_from_u64(8)),
        Arc::new(RateLimiter::new(&PublicKey::from(public(2)), 100)),
        StdRng::seed_from_u64(9),
    )
}

/// An IPv4 packet with `n` bytes of payload marked with `mark`.
fn ip(n: usize, mark: u8) -> Vec<u8> {
    let mut p = vec![mark; 20 + n];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&((20 + n) as u16).to_be_bytes());
    p
}

fn wg(bytes: &[u8]) -> WgKind {
    Packet::from_bytes(BytesMut::from(bytes))
        .try_into_wg()
        .expect("a WireGuard message")
}

fn bytes(kind: WgKind) -> Vec<u8> {
    let p: Packet = kind.into();
    p.to_vec()
}

/// What gotatun makes of `msg`: the packet it delivers, or the message it sends back.
fn feed(tunn: &mut Tunn<StdRng>, msg: &[u8]) -> TunnResult {
    tunn.handle_incoming_packet(wg(msg))
}

/// The packet gotatun delivers, its padding cut off by the IPv4 header's length.
fn delivered(r: TunnResult) -> Vec<u8> {
    match r {
        TunnResult::WriteToTunnel(p) => {
            let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
            p[..len].to_vec()
        }
        other => panic!("expected a packet, got {}", describe(&other)),
    }
}

/// Whether gotatun opened `r` as a keepalive (an empty packet).
fn keepalive(r: &TunnResult) -> bool {
    matches!(r, TunnResult::WriteToTunnel(p) if p.is_empty())
}

fn describe(r: &TunnResult) -> String {
    match r {
        TunnResult::Done => "done".into(),
        TunnResult::Err(e) => format!("error {e:?}"),
        TunnResult::WriteToNetwork(_) => "a message".into(),
        TunnResult::WriteToTunnel(_) => "a packet".into(),
    }
}

fn seal_theirs(tunn: &mut Tunn<StdRng>, packet: &[u8]) -> Vec<u8> {
    bytes(
        tunn.handle_outgoing_packet(Packet::copy_from(packet), None)
            .expect("a session"),
    )
}

/// Runs our initiation against gotatun and returns both sides with a session.
fn established(psk: [u8; 32], t0: Instant) -> (Peer, Tunn<StdRng>, Vec<Vec<u8>>) {
    let (mut a, mut b) = (ours(psk), theirs(psk));
    let first = ip(100, 1);
    let init = a.send(t0, WALL, &first).expect("an initiation");
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &init) else {
        panic!("gotatun did not answer our initiation");
    };
    let resp = bytes(resp);
    assert!(matches!(
        a.receive(t0, BytesMut::from(&resp[..])),
        Ok(Outcome::Established)
    ));
    let sent = a.queued(t0).into_iter().map(|m| m.to_vec()).collect();
    (a, b, sent)
}

#[test]
fn our_initiation_makes_a_session_with_gotatun_both_ways() {
    let t0 = crate::test_epoch();
    let (mut a, mut b, sent) = established([3; 32], t0);
    assert_eq!(
        sent.len(),
        1,
        "the queued packet goes out as soon as the session exists"
    );
    assert_eq!(delivered(feed(&mut b, &sent[0])), ip(100, 1));
    // Both directions, sizes that need padding and one that fills the MTU.
    for (i, n) in [0usize, 1, 15, 16, 17, 1000, MTU - 20]
        .into_iter()
        .enumerate()
    {
        let p = ip(n, i as u8);
        let msg = a.send(t0, WALL, &p).expect("sealed");
        assert_eq!(delivered(feed(&mut b, &msg)), p);
        let back = seal_theirs(&mut b, &p);
        match a.receive(t0, BytesMut::from(&back[..])) {
            Ok(Outcome::Deliver { packet, .. }) => assert_eq!(&packet[..], &p[..]),
            other => panic!("expected a packet, got {other:?}"),
        }
    }
    let stats = a.stats(t0);
    assert_eq!(stats.handshakes, 1);
    assert!(stats.tx_bytes > 0 && stats.rx_bytes > 0);
}

#[test]
fn gotatuns_initiation_is_answered_and_the_session_waits_for_its_first_data() {
    let t0 = crate::test_epoch();
    let (mut a, mut b) = (ours([4; 32]), theirs([4; 32]));
    let me = Identity::new(&secret(1));
    let init = bytes(
        b.format_handshake_initiation(false)
            .expect("an initiation")
            .into(),
    );
    let received = read_initiation(&me, &init).expect("it reads");
    assert_eq!(received.peer, public(2));
    let resp = a.answer(t0, received).expect("answered");
    // Until the initiator's first data arrives, the responder has nothing to seal with.
    assert!(a.sending(t0).is_none());
    let reply = feed(&mut b, &resp);
    let TunnResult::WriteToNetwork(keepalive) = reply else {
        panic!("gotatun did not confirm: {}", describe(&reply));
    };
    let keepalive = bytes(keepalive);
    assert!(matches!(
        a.receive(t0, BytesMut::from(&keepalive[..])),
        Ok(Outcome::Established)
    ));
    let p = ip(64, 7);
    let msg = a
        .send(t0, WALL, &p)
        .expect("sealed with the confirmed session");
    assert_eq!(delivered(feed(&mut b, &msg)), p);
    // The same initiation again is a replay: no second session.
    let again = read_initiation(&me, &init).expect("it reads");
    assert_eq!(
        a.answer(t0 + Duration::from_secs(1), again).unwrap_err(),
        Error::ReplayedInitiation
    );
}

#[test]
fn different_preshared_keys_make_no_session() {
    let t0 = crate::test_epoch();
    let (mut a, mut b) = (ours([5; 32]), theirs([6; 32]));
    let init = a.send(t0, WALL, &ip(10, 0)).expect("an initiation");
    // gotatun answers (the PSK is only mixed into the response), and we cannot open it.
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &init) else {
        panic!("no response");
    };
    assert_eq!(
        a.receive(t0, BytesMut::from(&bytes(resp)[..])).unwrap_err(),
        Error::Invalid
    );
    assert!(a.sending(t0).is_none());
    assert!(
        a.handshaking(),
        "the handshake stays in flight for the real answer"
    );
}

#[test]
fn a_tampered_or_replayed_data_message_is_refused_and_the_window_holds() {
    let t0 = crate::test_epoch();
    let (mut a, mut b, _) = established([3; 32], t0);
    let msgs: Vec<Vec<u8>> = (0..5).map(|i| seal_theirs(&mut b, &ip(40, i))).collect();
    let mut forged = msgs[4].clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        a.receive(t0, BytesMut::from(&forged[..])).unwrap_err(),
        Error::Invalid
    );
    // The forged copy of counter 4 did not mark it: the real one still opens.
    for i in [4usize, 0, 2, 1, 3] {
        let m = msgs[i].clone();
        assert!(
            matches!(
                a.receive(t0, BytesMut::from(&m[..])),
                Ok(Outcome::Deliver { .. })
            ),
            "message {i}"
        );
    }
    for m in &msgs {
        assert_eq!(
            a.receive(t0, BytesMut::from(&m[..])).unwrap_err(),
            Error::Replayed
        );
    }
    // Past its lifetime a session opens nothing.
    let late = seal_theirs(&mut b, &ip(40, 9));
    assert_eq!(
        a.receive(t0 + REJECT_AFTER_TIME, BytesMut::from(&late[..]))
            .unwrap_err(),
        Error::Expired
    );
}

#[test]
fn counters_taken_in_order_and_sealed_on_several_threads_arrive_in_order() {
    let t0 = crate::test_epoch();
    let (a, mut b, sent) = established([3; 32], t0);
    assert!(matches!(
        feed(&mut b, &sent[0]),
        TunnResult::WriteToTunnel(_)
    ));
    let session = Arc::clone(a.sending(t0).expect("a session"));
    let runs: Vec<(u64, Vec<Vec<u8>>)> = (0..4u8)
        .map(|r| {
            let packets: Vec<Vec<u8>> = (0..64).map(|i| ip(200 + i, r)).collect();
            (session.reserve(64).expect("counters"), packets)
        })
        .collect();
    let sealed: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(first, packets)| {
                let session = &session;
                s.spawn(move || {
                    packets
                        .iter()
                        .enumerate()
                        .map(|(i, p)| session.seal(first + i as u64, p, MTU).to_vec())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sealed"))
            .collect()
    });
    for ((_, packets), msgs) in runs.iter().zip(&sealed) {
        for (p, m) in packets.iter().zip(msgs) {
            assert_eq!(&delivered(feed(&mut b, m)), p);
        }
    }
}

#[test]
fn a_handshake_is_retried_with_a_new_initiation_and_given_up_with_its_queue() {
    let t0 = crate::test_epoch();
    let mut a = ours([3; 32]);
    let first = a.send(t0, WALL, &ip(10, 1)).expect("an initiation");
    for n in 2..=QUEUE_MAX + 10 {
        assert!(
            a.send(t0, WALL, &ip(10, n as u8)).is_none(),
            "one handshake in flight"
        );
    }
    assert!(
        a.update_timers(t0 + REKEY_TIMEOUT - Duration::from_millis(1), WALL)
            .is_none()
    );
    let mut now = t0;
    let mut retries = Vec::new();
    while now < t0 + REKEY_ATTEMPT_TIME + REKEY_TIMEOUT * 2 {
        now += Duration::from_millis(250);
        if let Some(m) = a.update_timers(now, WALL + (now - t0)) {
            retries.push((now - t0, m.to_vec()));
        }
    }
    // One every 5 to 5.34 s until 90 s have passed since the first, each a new initiation.
    let at: Vec<Duration> = retries.iter().map(|r| r.0).collect();
    assert!((16..=17).contains(&retries.len()), "{at:?}");
    assert!(*at.last().unwrap() < REKEY_ATTEMPT_TIME, "{at:?}");
    for pair in retries.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= REKEY_TIMEOUT && gap <= REKEY_TIMEOUT + Duration::from_millis(600),
            "{gap:?}"
        );
        assert_ne!(pair[0].1, pair[1].1);
    }
    assert_ne!(first.to_vec(), retries[0].1);
    assert!(!a.handshaking(), "given up");
    // The queue went with it: a late session sends nothing that waited.
    let mut b = theirs([3; 32]);
    let init = a
        .send(now, WALL + (now - t0), &[])
        .expect("a new handshake for new data");
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &init) else {
        panic!()
    };
    assert!(matches!(
        a.receive(now, BytesMut::from(&bytes(resp)[..])),
        Ok(Outcome::Established)
    ));
    let out = a.queued(now);
    assert_eq!(out.len(), 1, "only the packet sent with the new handshake");
}

/// Data sent while a handshake is retried is a new reason to keep trying: the handshake is
/// given up Rekey-Attempt-Time after the last packet queued, not after its first try, so a
/// packet queued just before that would have run out still goes when the peer answers (the
/// kernel and wireguard-go start their count of attempts again for new data too).
#[test]
fn data_sent_during_a_handshake_keeps_it_going_and_goes_with_the_session() {
    let t0 = crate::test_epoch();
    let (mut a, mut b) = (ours([3; 32]), theirs([3; 32]));
    a.send(t0, WALL, &ip(10, 1)).expect("an initiation");
    let mut now = t0;
    let mut last = None;
    let mut run_until = |a: &mut Peer, now: &mut Instant, until: Duration| {
        while *now < t0 + until {
            *now += Duration::from_millis(250);
            if let Some(m) = a.update_timers(*now, WALL + (*now - t0)) {
                last = Some(m.to_vec());
            }
        }
    };
    run_until(&mut a, &mut now, Duration::from_secs(85));
    let late = ip(20, 2);
    assert!(a.send(now, WALL + (now - t0), &late).is_none(), "in flight");
    run_until(&mut a, &mut now, Duration::from_secs(100));
    assert!(a.handshaking(), "still trying 100 s after the first try");
    let init = last.clone().expect("retransmissions");
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &init) else {
        panic!("gotatun answers the latest initiation")
    };
    assert!(matches!(
        a.receive(now, BytesMut::from(&bytes(resp)[..])),
        Ok(Outcome::Established)
    ));
    let out = a.queued(now);
    assert_eq!(out.len(), 2, "both packets that waited");
    let got: Vec<Vec<u8>> = out.iter().map(|m| delivered(feed(&mut b, m))).collect();
    assert_eq!(got, vec![ip(10, 1), late]);
    // Without new data it is given up Rekey-Attempt-Time after the last packet queued.
    let mut c = ours([3; 32]);
    let t1 = now;
    c.send(t1, WALL, &ip(10, 1)).expect("an initiation");
    c.send(t1 + Duration::from_secs(30), WALL, &ip(10, 2));
    let mut at = t1;
    while c.handshaking() {
        at += Duration::from_millis(250);
        c.update_timers(at, WALL + (at - t1));
    }
    let gave_up = at - t1;
    assert!(
        gave_up >= Duration::from_secs(30) + REKEY_ATTEMPT_TIME
            && gave_up <= Duration::from_secs(30) + REKEY_ATTEMPT_TIME + REKEY_TIMEOUT * 2,
        "{gave_up:?}"
    );
    // A reason nothing authenticates (`initiate_if_idle`) neither replaces the handshake in
    // flight nor keeps it going: it is given up Rekey-Attempt-Time after its first try.
    let mut d = ours([3; 32]);
    d.send(t1, WALL, &ip(10, 1)).expect("an initiation");
    let mut at = t1;
    while d.handshaking() && at - t1 < REKEY_ATTEMPT_TIME * 2 {
        at += Duration::from_millis(250);
        if at - t1 > Duration::from_secs(60) {
            assert!(d.initiate_if_idle(at, WALL + (at - t1)).is_none());
        }
        d.update_timers(at, WALL + (at - t1));
    }
    let gave_up = at - t1;
    assert!(
        gave_up >= REKEY_ATTEMPT_TIME && gave_up <= REKEY_ATTEMPT_TIME + REKEY_TIMEOUT * 2,
        "{gave_up:?}"
    );
}

/// A packet sealed in its own buffer (with room after it) makes the message a new buffer
/// would, where the packet lay; without the room it is sealed into a new one; gotatun opens
/// it. Sizes around the padding's steps and up to the MTU.
#[test]
fn sealing_in_the_packets_own_buffer_makes_the_same_message() {
    use super::session::{SEAL_ROOM, with_seal_room};
    let t0 = crate::test_epoch();
    let (mut a, mut b, _) = established([3; 32], t0);
    for n in [0usize, 1, 11, 12, 13, 100, 1380, 1399, 1400] {
        let p = ip(n, 7);
        let (s, c) = a.reserve(t0, p.len()).expect("a session");
        let copied = s.seal(c, &p, MTU);
        let room = with_seal_room(&p);
        let at = room.as_ptr();
        let sealed = s.seal_in_place(c, room, MTU);
        assert_eq!(sealed, copied, "{n}");
        assert_eq!(sealed.as_ptr(), at, "sealed where it lay ({n})");
        let tight = BytesMut::from(&p[..]);
        assert!(tight.capacity() < p.len() + SEAL_ROOM, "{n}");
        assert_eq!(s.seal_in_place(c, tight, MTU), copied, "{n}");
        assert_eq!(delivered(feed(&mut b, &sealed)), p, "{n}");
    }
}

#[test]
fn the_newest_queued_packets_are_kept() {
    let t0 = crate::test_epoch();
    let (mut a, mut b) = (ours([3; 32]), theirs([3; 32]));
    let init = a.send(t0, WALL, &ip(10, 0)).expect("an initiation");
    for n in 1..QUEUE_MAX + 5 {
        a.send(t0, WALL, &ip(10, (n % 250) as u8));
    }
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &init) else {
        panic!()
    };
    assert!(matches!(
        a.receive(t0, BytesMut::from(&bytes(resp)[..])),
        Ok(Outcome::Established)
    ));
    let out = a.queued(t0);
    assert_eq!(out.len(), QUEUE_MAX);
    assert_eq!(delivered(feed(&mut b, &out[0])), ip(10, 5));
}

#[test]
fn keepalives_rekeys_and_silence_follow_the_timers() {
    let t0 = crate::test_epoch();
    let (mut a, mut b, sent) = established([3; 32], t0);
    assert!(matches!(
        feed(&mut b, &sent[0]),
        TunnResult::WriteToTunnel(_)
    ));
    // Data heard, nothing sent: a keepalive after 10 s, and only one.
    let msg = seal_theirs(&mut b, &ip(20, 1));
    assert!(matches!(
        a.receive(t0, BytesMut::from(&msg[..])),
        Ok(Outcome::Deliver { .. })
    ));
    assert!(
        a.update_timers(t0 + KEEPALIVE_TIMEOUT - Duration::from_millis(1), WALL)
            .is_none()
    );
    let ka = a
        .update_timers(t0 + KEEPALIVE_TIMEOUT, WALL)
        .expect("a keepalive");
    assert!(
        keepalive(&feed(&mut b, &ka)),
        "gotatun takes it as a keepalive"
    );
    assert!(a.update_timers(t0 + KEEPALIVE_TIMEOUT * 2, WALL).is_none());
    // Data sent and nothing heard for 15 s: a new handshake.
    let t1 = t0 + Duration::from_secs(30);
    let m = a.send(t1, WALL, &ip(20, 2)).expect("sealed");
    assert!(matches!(feed(&mut b, &m), TunnResult::WriteToTunnel(_)));
    assert!(
        a.update_timers(t1 + Duration::from_secs(14), WALL)
            .is_none()
    );
    let hs = a
        .update_timers(t1 + Duration::from_secs(15), WALL)
        .expect("a handshake");
    assert_eq!(
        super::message::kind(&hs),
        Some(super::message::Kind::Initiation)
    );
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &hs) else {
        panic!()
    };
    let t2 = t1 + Duration::from_secs(15);
    assert!(matches!(
        a.receive(t2, BytesMut::from(&bytes(resp)[..])),
        Ok(Outcome::Established)
    ));
    let confirm = a.queued(t2);
    assert_eq!(confirm.len(), 1, "a keepalive confirms the session");
    assert!(keepalive(&feed(&mut b, &confirm[0])));
    // A session we started and send on is rekeyed after 120 s.
    let t3 = t2 + REKEY_AFTER_TIME - Duration::from_secs(1);
    let m = a.send(t3, WALL, &ip(20, 3)).expect("sealed");
    assert!(matches!(feed(&mut b, &m), TunnResult::WriteToTunnel(_)));
    let back = seal_theirs(&mut b, &ip(20, 4));
    assert!(matches!(
        a.receive(t3, BytesMut::from(&back[..])),
        Ok(Outcome::Deliver { .. })
    ));
    let rekey = a
        .update_timers(t2 + REKEY_AFTER_TIME, WALL)
        .expect("a rekey");
    assert_eq!(
        super::message::kind(&rekey),
        Some(super::message::Kind::Initiation)
    );
    // The old session still opens what gotatun sent on it before the new one exists.
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &rekey) else {
        panic!()
    };
    let t4 = t2 + REKEY_AFTER_TIME;
    assert!(matches!(
        a.receive(t4, BytesMut::from(&bytes(resp)[..])),
        Ok(Outcome::Established)
    ));
    assert!(matches!(
        a.receive(t4, BytesMut::from(&back[..])),
        Err(Error::Replayed)
    ));
    // Three session lifetimes with no new one: every key is gone.
    assert!(a.update_timers(t4 + REJECT_AFTER_TIME * 3, WALL).is_none());
    assert!(a.sending(t4).is_none());
}

#[test]
fn a_cookie_reply_is_taken_and_the_next_initiation_passes_the_rate_limiter() {
    let t0 = crate::test_epoch();
    let mut a = ours([3; 32]);
    // gotatun's limiter with a limit of zero: every handshake must carry a cookie.
    let limiter = RateLimiter::new(&PublicKey::from(public(2)), 0);
    let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let init = a.send(t0, WALL, &ip(10, 0)).expect("an initiation");
    let Err(TunnResult::WriteToNetwork(cookie)) =
        limiter.verify_packet(src, Packet::from_bytes(BytesMut::from(&init[..])))
    else {
        panic!("no cookie reply under load");
    };
    let cookie = bytes(cookie);
    assert!(matches!(
        a.receive(t0, BytesMut::from(&cookie[..])),
        Ok(Outcome::Nothing)
    ));
    // A forged cookie reply (another index) is refused.
    let mut other = cookie.clone();
    other[4] ^= 1;
    assert_eq!(
        a.receive(t0, BytesMut::from(&other[..])).unwrap_err(),
        Error::NoSession
    );
    let retry = a
        .update_timers(
            t0 + REKEY_TIMEOUT + Duration::from_millis(400),
            WALL + Duration::from_secs(6),
        )
        .expect("a retry");
    assert!(
        limiter
            .verify_packet(src, Packet::from_bytes(BytesMut::from(&retry[..])))
            .is_ok(),
        "mac2 carries the cookie"
    );
    let from_elsewhere: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    assert!(
        limiter
            .verify_packet(
                from_elsewhere,
                Packet::from_bytes(BytesMut::from(&retry[..]))
            )
            .is_err(),
        "the cookie is bound to the address"
    );
}

/// A cookie reply brings its handshake's retry forward to the next tick of the timers, not
/// Rekey-Timeout later, and only once per handshake: a cookie reply to the retry (a
/// responder that keeps asking, or forgeries by one who sees our mac1) waits as WireGuard does.
#[test]
fn a_cookie_reply_brings_the_retry_forward_once() {
    use super::cookie::{Checker, Sender, Verdict};
    let t0 = crate::test_epoch();
    let tick = super::TIMER_GRANULARITY;
    let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let mut checker = Checker::new(public(2), 0, [6; 32], t0);
    let mut a = ours([3; 32]);
    let init = a.send(t0, WALL, &ip(10, 0)).expect("an initiation");
    let Verdict::CookieReply(reply) = checker.check(t0, src, Sender::Stranger, &init) else {
        panic!("no cookie reply under load");
    };
    assert!(matches!(a.receive(t0, reply), Ok(Outcome::Nothing)));
    let retry = a
        .update_timers(t0 + tick, WALL)
        .expect("a retry at the next tick");
    assert!(matches!(
        checker.check(t0 + tick, src, Sender::Stranger, &retry),
        Verdict::Pass
    ));
    // Its answer lost, and a cookie reply to it (made with a fresh secret: another address):
    // the next retry waits for Rekey-Timeout.
    let mut other = Checker::new(public(2), 0, [7; 32], t0);
    let Verdict::CookieReply(reply) = other.check(t0 + tick, src, Sender::Stranger, &retry) else {
        panic!("no cookie reply");
    };
    assert!(matches!(a.receive(t0 + tick, reply), Ok(Outcome::Nothing)));
    for n in 2..20u32 {
        assert!(a.update_timers(t0 + tick * n, WALL).is_none(), "tick {n}");
    }
    assert!(
        a.update_timers(t0 + tick + REKEY_TIMEOUT + Duration::from_millis(400), WALL)
            .is_some()
    );
}

#[test]
fn an_initiation_from_a_stranger_or_too_soon_is_refused() {
    let t0 = crate::test_epoch();
    let me = Identity::new(&secret(1));
    let mut a = ours([3; 32]);
    // Node 3 (a key this peer is not) initiates to us.
    let mut stranger = Tunn::new_with_rng(
        StaticSecret::from(secret(3)),
        PublicKey::from(public(1)),
        None,
        None,
        IndexTable::from_rng(StdRng::seed_from_u64(1)),
        Arc::new(RateLimiter::new(&PublicKey::from(public(3)), 100)),
        StdRng::seed_from_u64(2),
    );
    let init = bytes(stranger.format_handshake_initiation(false).unwrap().into());
    let r = read_initiation(&me, &init).expect("it reads: the sender is authenticated");
    assert_eq!(r.peer, public(3));
    assert_eq!(a.answer(t0, r).unwrap_err(), Error::WrongPeer);
    // Addressed to someone else, it does not read at all.
    let other = Identity::new(&secret(4));
    assert!(read_initiation(&other, &init).is_none());
    // Two initiations from the peer within 20 ms: the second is dropped.
    let mut b = theirs([3; 32]);
    let i1 = bytes(b.format_handshake_initiation(true).unwrap().into());
    let i2 = bytes(b.format_handshake_initiation(true).unwrap().into());
    a.answer(t0, read_initiation(&me, &i1).unwrap())
        .expect("answered");
    assert_eq!(
        a.answer(
            t0 + Duration::from_millis(5),
            read_initiation(&me, &i2).unwrap()
        )
        .unwrap_err(),
        Error::Flood
    );
}

#[test]
fn garbage_is_refused_without_a_panic() {
    let t0 = crate::test_epoch();
    let (mut a, _b, _) = established([3; 32], t0);
    let me = Identity::new(&secret(1));
    for len in [0usize, 1, 3, 4, 31, 32, 64, 92, 148, 200] {
        for ty in 0..6u8 {
            let mut m = vec![0u8; len];
            if let Some(f) = m.first_mut() {
                *f = ty;
            }
            assert!(a.receive(t0, BytesMut::from(&m[..])).is_err());
            assert!(read_initiation(&me, &m).is_none());
        }
    }
}

/// The plain definition of the replay window: every counter seen, accepted when new and
/// fewer than WINDOW behind the greatest.
#[derive(Default)]
struct PlainWindow(std::collections::BTreeSet<u64>);

impl PlainWindow {
    fn accept(&mut self, c: u64) -> bool {
        let fresh = !self.0.contains(&c)
            && self.0.last().is_none_or(|max| c > *max || max - c < WINDOW)
            && c < super::REJECT_AFTER_MESSAGES;
        if fresh {
            self.0.insert(c);
        }
        fresh
    }
}

proptest! {
    #[test]
    fn the_replay_window_agrees_with_its_plain_definition(
        steps in prop::collection::vec((0u8..5, 0u64..20_000), 1..600)
    ) {
        let (mut ring, mut plain) = (Replay::default(), PlainWindow::default());
        let mut top = 0u64;
        for (how, n) in steps {
            // Mostly near the top (in order, a little late, a little early), sometimes far.
            let c = match how {
                0 => top + 1,
                1 => top.saturating_sub(n % 200),
                2 => top + n % 300,
                // Right at the window's edge.
                3 => top.saturating_sub(WINDOW - 2 + n % 4),
                _ => n * 7,
            };
            top = top.max(c);
            prop_assert_eq!(ring.check(c), plain.accept_would(c), "check {}", c);
            prop_assert_eq!(ring.accept(c), plain.accept(c), "accept {}", c);
        }
    }
}

impl PlainWindow {
    fn accept_would(&self, c: u64) -> bool {
        !self.0.contains(&c)
            && self.0.last().is_none_or(|max| c > *max || max - c < WINDOW)
            && c < super::REJECT_AFTER_MESSAGES
    }
}

/// Our cookie checker against gotatun's initiator and our own: under load a handshake without
/// a cookie gets a cookie reply, which both take, and their next handshake passes from the
/// same address and not from another; a wrong mac1 never passes.
#[test]
fn our_cookie_replies_are_taken_by_gotatun_and_by_us() {
    use super::cookie::{Checker, Sender, Verdict};
    let t0 = crate::test_epoch();
    let src: SocketAddr = "192.0.2.7:51820".parse().unwrap();
    let elsewhere: SocketAddr = "192.0.2.8:51820".parse().unwrap();
    // Node 1's checker, with no handshake let through without a cookie.
    let mut checker = Checker::new(public(1), 0, [5; 32], t0);
    let mut b = theirs([3; 32]);
    let init = bytes(b.format_handshake_initiation(false).unwrap().into());
    let Verdict::CookieReply(reply) = checker.check(t0, src, Sender::Stranger, &init) else {
        panic!("no cookie reply under load");
    };
    assert!(
        matches!(feed(&mut b, &reply), TunnResult::Done),
        "gotatun takes our cookie"
    );
    let again = bytes(b.format_handshake_initiation(true).unwrap().into());
    assert!(matches!(
        checker.check(t0, src, Sender::Stranger, &again),
        Verdict::Pass
    ));
    assert!(matches!(
        checker.check(t0, elsewhere, Sender::Stranger, &again),
        Verdict::CookieReply(_)
    ));
    // Our own initiator, to node 2's checker.
    let mut checker2 = Checker::new(public(2), 0, [6; 32], t0);
    let mut a = ours([3; 32]);
    let init = a.send(t0, WALL, &ip(10, 0)).expect("an initiation");
    let Verdict::CookieReply(reply) = checker2.check(t0, src, Sender::Stranger, &init) else {
        panic!("no cookie reply under load");
    };
    assert!(matches!(a.receive(t0, reply), Ok(Outcome::Nothing)));
    let retry = a
        .update_timers(
            t0 + REKEY_TIMEOUT + Duration::from_millis(400),
            WALL + Duration::from_secs(6),
        )
        .expect("a retry");
    assert!(matches!(
        checker2.check(t0, src, Sender::Stranger, &retry),
        Verdict::Pass
    ));
    // gotatun answers the retry; its response's mac1 passes node 1's checker.
    let TunnResult::WriteToNetwork(resp) = feed(&mut b, &retry) else {
        panic!("gotatun did not answer");
    };
    let mut node1 = Checker::new(public(1), 100, [8; 32], t0);
    assert!(matches!(
        node1.check(t0, src, Sender::Stranger, &bytes(resp)),
        Verdict::Pass
    ));
    // mac1 covers the whole message: any change is refused, whatever the load.
    let mut open = Checker::new(public(2), 100, [7; 32], t0);
    for at in [0usize, 4, 8, 50, 100, 115, 116, 131] {
        let mut bad = retry.to_vec();
        bad[at] ^= 1;
        assert!(
            matches!(
                open.check(t0, src, Sender::Stranger, &bad),
                Verdict::Invalid
            ),
            "byte {at}"
        );
    }
    assert!(matches!(
        open.check(t0, src, Sender::Stranger, &retry),
        Verdict::Pass
    ));
    assert!(matches!(
        open.check(t0, src, Sender::Stranger, &[4, 0, 0, 0]),
        Verdict::Invalid
    ));
    // `set_mac1` makes the mac1 anyone who knows the key can: junk with it passes mac1 (and
    // is refused later, by the handshake itself), and only for that key.
    let mut junk = vec![9u8; 148];
    junk[..4].copy_from_slice(&[1, 0, 0, 0]);
    assert!(matches!(
        open.check(t0, src, Sender::Stranger, &junk),
        Verdict::Invalid
    ));
    assert!(super::message::set_mac1(&mut junk, &public(2)));
    assert!(matches!(
        open.check(t0, src, Sender::Stranger, &junk),
        Verdict::Pass
    ));
    assert!(super::message::set_mac1(&mut junk, &public(1)));
    assert!(matches!(
        open.check(t0, src, Sender::Stranger, &junk),
        Verdict::Invalid
    ));
    assert!(!super::message::set_mac1(&mut [4u8; 32], &public(2)));
}

/// Each source has its limit each second; past the bound on sources, a new one must show a
/// cookie however few it sent, while peers, counted apart, need none.
#[test]
fn the_limit_is_per_source_per_second_and_the_sources_are_bounded() {
    use super::cookie::{Checker, MAX_SOURCES, Sender, Verdict};
    let t0 = crate::test_epoch();
    let mut checker = Checker::new(public(1), 3, [5; 32], t0);
    let mut b = theirs([3; 32]);
    let init = bytes(b.format_handshake_initiation(false).unwrap().into());
    let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let other: SocketAddr = "192.0.2.2:1".parse().unwrap();
    for _ in 0..3 {
        assert!(matches!(
            checker.check(t0, a, Sender::Stranger, &init),
            Verdict::Pass
        ));
    }
    assert!(matches!(
        checker.check(t0, a, Sender::Stranger, &init),
        Verdict::CookieReply(_)
    ));
    assert!(matches!(
        checker.check(t0, other, Sender::Stranger, &init),
        Verdict::Pass
    ));
    let t1 = t0 + Duration::from_secs(1);
    assert!(
        matches!(checker.check(t1, a, Sender::Stranger, &init), Verdict::Pass),
        "a new second"
    );
    for i in 0..MAX_SOURCES as u32 {
        // Each in a /64 of its own.
        let ip = std::net::Ipv6Addr::from((u128::from(i) + 1) << 64);
        let _ = checker.check(t1, SocketAddr::from((ip, 1)), Sender::Stranger, &init);
    }
    let late: SocketAddr = "198.51.100.9:1".parse().unwrap();
    assert!(matches!(
        checker.check(t1, late, Sender::Stranger, &init),
        Verdict::CookieReply(_)
    ));
    // Those filled the strangers' counts, not the peers': a peer's handshake still passes.
    let peer = Sender::Peer {
        key: k_bytes(1),
        relayed: false,
    };
    let peers_address: SocketAddr = "198.51.100.10:41641".parse().unwrap();
    assert!(matches!(
        checker.check(t1, peers_address, peer, &init),
        Verdict::Pass
    ));
    assert!(matches!(
        checker.check(t1 + Duration::from_secs(1), late, Sender::Stranger, &init),
        Verdict::Pass
    ));
}

/// An IPv6 /64 counts as one source (one host may hold it whole), and an IPv4-mapped address
/// as its IPv4 address.
#[test]
fn a_v6_64_is_one_source_and_a_mapped_address_is_its_v4() {
    use super::cookie::{Checker, Sender, Verdict};
    let t0 = crate::test_epoch();
    let mut checker = Checker::new(public(1), 3, [5; 32], t0);
    let mut b = theirs([3; 32]);
    let init = bytes(b.format_handshake_initiation(false).unwrap().into());
    let mut check = |a: &str| checker.check(t0, a.parse().unwrap(), Sender::Stranger, &init);
    for a in ["[2001:db8::1]:1", "[2001:db8::2]:2", "[2001:db8::ffff:1]:3"] {
        assert!(matches!(check(a), Verdict::Pass), "{a}");
    }
    assert!(matches!(check("[2001:db8::3]:1"), Verdict::CookieReply(_)));
    assert!(matches!(check("[2001:db8:0:1::1]:1"), Verdict::Pass));
    for a in ["192.0.2.1:1", "[::ffff:192.0.2.1]:2", "192.0.2.1:3"] {
        assert!(matches!(check(a), Verdict::Pass), "{a}");
    }
    assert!(matches!(
        check("[::ffff:192.0.2.1]:4"),
        Verdict::CookieReply(_)
    ));
}

/// What passes to key work is bounded each second, whatever the sources, in two budgets:
/// strangers' and peers'. Past `STRANGERS_UNDER_LOAD`, a flood from made-up addresses gets
/// only cookie replies; a stranger that receives its cookies passes, but one host at most
/// `PER_SOURCE` times a second whatever its ports, and all strangers together up to
/// `STRANGERS_MAX`; the rest are shed. None of it touches the peers' budget: a peer passes at
/// once, and peers have bounds of their own. A new second starts afresh.
#[test]
fn a_node_passes_a_bounded_number_of_handshakes_a_second_cookie_or_not() {
    use super::cookie::{
        Checker, PEERS_MAX, PEERS_UNDER_LOAD, PER_SOURCE, STRANGERS_MAX, STRANGERS_UNDER_LOAD,
        Sender, Verdict,
    };
    let t0 = crate::test_epoch();
    let mut checker = Checker::new(public(1), 100, [5; 32], t0);
    let mut b = theirs([3; 32]);
    let init = bytes(b.format_handshake_initiation(false).unwrap().into());
    let spoofed = |i: u32| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1));
    let stranger = Sender::Stranger;
    let (mut passed, mut cookies) = (0, 0);
    for i in 0..STRANGERS_UNDER_LOAD + 500 {
        match checker.check(t0, spoofed(i), stranger, &init) {
            Verdict::Pass => passed += 1,
            Verdict::CookieReply(_) => cookies += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (passed, cookies),
        (STRANGERS_UNDER_LOAD, 500),
        "one each, from new sources"
    );
    // Under load: a sender that takes its cookie gets through.
    let through = |checker: &mut Checker, b: &mut Tunn<StdRng>, src: SocketAddr, who: Sender| {
        let first = bytes(b.format_handshake_initiation(true).unwrap().into());
        let Verdict::CookieReply(reply) = checker.check(t0, src, who, &first) else {
            panic!("no cookie reply under load");
        };
        assert!(matches!(feed(b, &reply), TunnResult::Done));
        let again = bytes(b.format_handshake_initiation(true).unwrap().into());
        checker.check(t0, src, who, &again)
    };
    let honest: SocketAddr = "198.51.100.7:51820".parse().unwrap();
    assert!(matches!(
        through(&mut checker, &mut b, honest, stranger),
        Verdict::Pass
    ));
    // A source passes PER_SOURCE with cookies a second: the same message again, then shed,
    // and so are its other ports, each with a cookie of its own.
    let again = bytes(b.format_handshake_initiation(true).unwrap().into());
    for _ in 1..PER_SOURCE {
        assert!(matches!(
            checker.check(t0, honest, stranger, &again),
            Verdict::Pass
        ));
    }
    assert!(matches!(
        checker.check(t0, honest, stranger, &again),
        Verdict::Shed
    ));
    let other_port: SocketAddr = "198.51.100.7:1".parse().unwrap();
    assert!(matches!(
        through(&mut checker, &mut b, other_port, stranger),
        Verdict::Shed
    ));
    // Many hosts with cookies: passed until STRANGERS_MAX in all, then shed.
    let mut shed = 0;
    for host in 1..=(STRANGERS_MAX - STRANGERS_UNDER_LOAD - PER_SOURCE + 10) {
        let src = SocketAddr::from((std::net::Ipv4Addr::from(0xcb00_7100 + host), 1));
        match through(&mut checker, &mut b, src, stranger) {
            Verdict::Pass => {}
            Verdict::Shed => shed += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(shed, 10, "past STRANGERS_MAX in one second");
    // The peers' budget is untouched: a peer passes at once, even from an address strangers
    // used; past PEERS_UNDER_LOAD peers need cookies, and past PEERS_MAX they are shed.
    for k in 0..PEERS_UNDER_LOAD {
        let peer = Sender::Peer {
            key: k_bytes(k),
            relayed: false,
        };
        assert!(
            matches!(checker.check(t0, honest, peer, &init), Verdict::Pass),
            "peer {k}"
        );
    }
    let late = Sender::Peer {
        key: k_bytes(PEERS_UNDER_LOAD),
        relayed: false,
    };
    assert!(matches!(
        checker.check(t0, honest, late, &init),
        Verdict::CookieReply(_)
    ));
    let mut shed = 0;
    for k in 0..(PEERS_MAX - PEERS_UNDER_LOAD + 5) {
        let src = SocketAddr::from((std::net::Ipv4Addr::from(0xc612_0000 + k), 1));
        let peer = Sender::Peer {
            key: k_bytes(PEERS_MAX + k),
            relayed: false,
        };
        match through(&mut checker, &mut b, src, peer) {
            Verdict::Pass => {}
            Verdict::Shed => shed += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(shed, 5, "past PEERS_MAX in one second");
    let t1 = t0 + Duration::from_secs(1);
    assert!(matches!(
        checker.check(t1, honest, stranger, &again),
        Verdict::Pass
    ));
    assert!(matches!(
        checker.check(t1, spoofed(1), stranger, &init),
        Verdict::Pass
    ));
}

/// A peer still looking for a direct path sends each handshake both through a relay and
/// straight to us: the copies count apart, so its `limit` a second holds on each path (a
/// keyed fuzz input found a peer pushed to cookies, and a 5 s retry, by its own copies).
#[test]
fn a_peers_relayed_and_direct_handshakes_count_apart() {
    use super::cookie::{Checker, Sender, Verdict};
    let t0 = crate::test_epoch();
    let mut checker = Checker::new(public(1), 3, [5; 32], t0);
    let mut b = theirs([3; 32]);
    let init = bytes(b.format_handshake_initiation(false).unwrap().into());
    let direct: SocketAddr = "198.51.100.7:41641".parse().unwrap();
    let stand_in: SocketAddr = "[100::1]:0".parse().unwrap();
    let key = k_bytes(7);
    for _ in 0..3 {
        for (src, relayed) in [(direct, false), (stand_in, true)] {
            let peer = Sender::Peer { key, relayed };
            assert!(matches!(checker.check(t0, src, peer, &init), Verdict::Pass));
        }
    }
    let peer = Sender::Peer {
        key,
        relayed: false,
    };
    assert!(matches!(
        checker.check(t0, direct, peer, &init),
        Verdict::CookieReply(_)
    ));
}

/// A made-up peer key, different for each `k`.
fn k_bytes(k: u32) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&k.to_le_bytes());
    key
}

/// Both sides start a handshake at the same moment (each has a packet to send): each answers
/// the other's and completes its own, and the packets that waited, and every packet after,
/// arrive both ways, whether the other side is ours or gotatun.
#[test]
fn both_sides_initiating_at_once_end_with_sessions_that_work() {
    let t0 = crate::test_epoch();
    let me1 = Identity::new(&secret(1));
    let me2 = Arc::new(Identity::new(&secret(2)));
    // Ours against ours.
    let mut a = ours([3; 32]);
    let mut b = Peer::new(Arc::clone(&me2), public(1), [3; 32], table(), [11; 32], MTU);
    let init_a = a.send(t0, WALL, &ip(30, 1)).expect("a's initiation");
    let init_b = b.send(t0, WALL, &ip(30, 2)).expect("b's initiation");
    let resp_b = b
        .answer(t0, read_initiation(&me2, &init_a).unwrap())
        .expect("b answers");
    let resp_a = a
        .answer(t0, read_initiation(&me1, &init_b).unwrap())
        .expect("a answers");
    assert!(matches!(a.receive(t0, resp_b), Ok(Outcome::Established)));
    assert!(matches!(b.receive(t0, resp_a), Ok(Outcome::Established)));
    let from_a = a.queued(t0);
    let from_b = b.queued(t0);
    assert_eq!((from_a.len(), from_b.len()), (1, 1));
    let got = |p: &mut Peer, m: BytesMut| match p.receive(t0, m) {
        Ok(Outcome::Deliver { packet, .. }) => packet.to_vec(),
        other => panic!("expected a packet, got {other:?}"),
    };
    assert_eq!(got(&mut b, from_a.into_iter().next().unwrap()), ip(30, 1));
    assert_eq!(got(&mut a, from_b.into_iter().next().unwrap()), ip(30, 2));
    for i in 0..20u8 {
        let m = a.send(t0, WALL, &ip(40, i)).expect("sealed");
        assert_eq!(got(&mut b, m), ip(40, i));
        let m = b.send(t0, WALL, &ip(41, i)).expect("sealed");
        assert_eq!(got(&mut a, m), ip(41, i));
    }
    // Ours against gotatun.
    let mut a = ours([4; 32]);
    let mut g = theirs([4; 32]);
    let init_a = a.send(t0, WALL, &ip(30, 3)).expect("our initiation");
    let first_g = g.handle_outgoing_packet(Packet::copy_from(&ip(30, 4)[..]), None);
    let init_g = bytes(first_g.expect("gotatun's initiation"));
    let resp_a = a
        .answer(t0, read_initiation(&me1, &init_g).unwrap())
        .expect("we answer");
    let TunnResult::WriteToNetwork(resp_g) = feed(&mut g, &init_a) else {
        panic!("gotatun did not answer");
    };
    assert!(matches!(
        a.receive(t0, BytesMut::from(&bytes(resp_g)[..])),
        Ok(Outcome::Established)
    ));
    let reply = feed(&mut g, &resp_a);
    let TunnResult::WriteToNetwork(confirm) = reply else {
        panic!("gotatun did not confirm: {}", describe(&reply));
    };
    let mut from_g: Vec<Vec<u8>> = vec![bytes(confirm)];
    from_g.extend(
        g.get_queued_packets(&mut gotatun::tun::MtuWatcher::new(MTU as u16))
            .map(bytes),
    );
    for m in a.queued(t0) {
        let r = feed(&mut g, &m);
        assert!(
            matches!(r, TunnResult::WriteToTunnel(_)),
            "{}",
            describe(&r)
        );
    }
    let mut delivered_to_us = Vec::new();
    for m in from_g {
        if let Ok(Outcome::Deliver { packet, .. }) = a.receive(t0, BytesMut::from(&m[..])) {
            delivered_to_us.push(packet.to_vec());
        }
    }
    assert_eq!(delivered_to_us, vec![ip(30, 4)], "gotatun's waiting packet");
    for i in 0..20u8 {
        let m = a.send(t0, WALL, &ip(50, i)).expect("sealed");
        assert_eq!(delivered(feed(&mut g, &m)), ip(50, i));
        let m = seal_theirs(&mut g, &ip(51, i));
        assert_eq!(got(&mut a, BytesMut::from(&m[..])), ip(51, i));
    }
}
