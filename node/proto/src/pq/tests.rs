use rand::SeedableRng;

use super::*;
use crate::frame::{Frame, Reassembly};

struct Pair {
    now: Instant,
    rng: StdRng,
    a_key: StaticKeypair,
    b_key: StaticKeypair,
    /// The initiator's state.
    ini: PqPeer,
    /// The responder's state.
    res: PqPeer,
    epoch: u64,
}

const FROM: &str = "192.0.2.7:41641";

fn pair(seed: u64) -> Pair {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut a = StaticKeypair::generate(&mut rng);
    let mut b = StaticKeypair::generate(&mut rng);
    if a.public() > b.public() {
        std::mem::swap(&mut a, &mut b);
    }
    let ak = NodeKey::from_bytes(a.public());
    let bk = NodeKey::from_bytes(b.public());
    Pair {
        now: crate::test_epoch(),
        rng,
        ini: PqPeer::new(ak, bk, PqConfig::default()),
        res: PqPeer::new(bk, ak, PqConfig::default()),
        a_key: a,
        b_key: b,
        epoch: 1_000,
    }
}

fn frames_of(actions: &[PqAction]) -> Vec<Vec<u8>> {
    actions
        .iter()
        .flat_map(|a| match a {
            PqAction::Send(f) | PqAction::Reply(_, f) => f.clone(),
            PqAction::Install { .. } => vec![],
        })
        .collect()
}

fn installed(actions: &[PqAction]) -> Option<(Psk, bool)> {
    actions.iter().find_map(|a| match a {
        PqAction::Install { psk, rekey } => Some((psk.clone(), *rekey)),
        _ => None,
    })
}

/// Reassembles frames into (kind, session, message).
fn messages(now: Instant, frames: &[Vec<u8>]) -> Vec<(Kind, u32, Vec<u8>)> {
    let mut r = Reassembly::default();
    let from = Addr::main(FROM.parse().unwrap());
    frames
        .iter()
        .filter_map(|f| match frame::decode(f)? {
            Frame::Chunk {
                kind,
                session,
                index,
                count,
                bytes,
            } => r
                .push(now, from, kind, session, index, count, bytes)
                .map(|m| (kind, session, m)),
            Frame::Nudge { .. } => None,
        })
        .collect()
}

impl Pair {
    /// Delivers message 1 frames to the responder; returns its actions.
    fn deliver_to_responder(&mut self, frames: &[Vec<u8>]) -> Result<Vec<PqAction>, PqError> {
        let (kind, session, msg1) = messages(self.now, frames).pop().expect("a whole message");
        assert_eq!(kind, Kind::PqInit);
        let (hs, init) = ResponderHandshake::read_initiation(
            &mut self.rng,
            Purpose::PeerPsk,
            &self.b_key,
            &msg1,
        )
        .expect("decrypts");
        assert_eq!(init.remote_static, self.a_key.public());
        self.res.handle_init(
            self.now,
            &mut self.rng,
            Addr::main(FROM.parse().unwrap()),
            session,
            message_hash(&msg1),
            hs,
            &init.payload,
        )
    }

    fn deliver_to_initiator(&mut self, frames: &[Vec<u8>]) -> Result<Vec<PqAction>, PqError> {
        let (kind, session, msg2) = messages(self.now, frames).pop().expect("a whole message");
        assert_eq!(kind, Kind::PqResp);
        assert_eq!(Some(session), self.ini.pending_session());
        self.ini.handle_resp(self.now, &msg2)
    }

    /// A complete exchange; returns the keys both sides installed.
    fn exchange(&mut self) -> (Psk, Psk) {
        self.epoch += 1;
        let out = self
            .ini
            .want(self.now, &mut self.rng, &self.a_key, self.epoch);
        let out = if out.is_empty() {
            self.now += self.ini.config.rotation;
            self.ini
                .handle_timeout(self.now, &mut self.rng, &self.a_key, self.epoch)
        } else {
            out
        };
        let r = self.deliver_to_responder(&frames_of(&out)).unwrap();
        let (res_psk, rekey) = installed(&r).unwrap();
        assert!(!rekey);
        let i = self.deliver_to_initiator(&frames_of(&r)).unwrap();
        (installed(&i).unwrap().0, res_psk)
    }
}

#[test]
fn roles_are_opposite_and_deterministic() {
    let p = pair(1);
    assert_eq!(p.ini.role(), Role::Initiator);
    assert_eq!(p.res.role(), Role::Responder);
}

#[test]
fn an_exchange_installs_the_same_post_quantum_key_on_both_sides() {
    let mut p = pair(2);
    let (a, b) = p.exchange();
    assert_eq!(a, b);
    assert!(!a.is_zero());
    assert!(p.ini.established() && p.res.established());
    assert_eq!(p.ini.status(p.now).handshakes, 1);
    assert_eq!(p.res.status(p.now).handshakes, 1);
}

#[test]
fn rotation_chains_from_the_previous_key_and_asks_for_a_rekey() {
    let mut p = pair(3);
    let (k1, _) = p.exchange();
    p.now += PqConfig::default().rotation;
    p.epoch += 1;
    let out = p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, p.epoch);
    assert!(!out.is_empty(), "rotation starts an exchange");
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    let (k2, rekey) = installed(&i).unwrap();
    assert!(
        rekey,
        "the initiator rekeys WireGuard so the new key takes over"
    );
    assert_eq!(k2, installed(&r).unwrap().0);
    assert_ne!(k1, k2);
    assert_eq!(p.ini.status(p.now).chain_resets, 0);
}

#[test]
fn a_retransmitted_message_1_gets_the_cached_answer_and_changes_nothing() {
    let mut p = pair(4);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let first = p.deliver_to_responder(&frames_of(&out)).unwrap();
    // message 2 is lost; the initiator retransmits
    p.now += RETRANSMIT;
    let again = p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, 11);
    assert_eq!(frames_of(&again), frames_of(&out));
    let second = p.deliver_to_responder(&frames_of(&again)).unwrap();
    assert!(
        installed(&second).is_none(),
        "no second key for a duplicate"
    );
    assert_eq!(frames_of(&second), frames_of(&first));
    let i = p.deliver_to_initiator(&frames_of(&second)).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&first).unwrap().0);
    assert_eq!(p.res.status(p.now).handshakes, 1);
}

#[test]
fn a_replayed_old_message_1_is_refused_and_yields_no_key() {
    let mut p = pair(5);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let old_msg1 = frames_of(&out);
    let r = p.deliver_to_responder(&old_msg1).unwrap();
    p.deliver_to_initiator(&frames_of(&r)).unwrap();
    let (k2, _) = p.exchange();
    // An attacker replays the first message 1 after the pair moved on.
    assert_eq!(
        p.deliver_to_responder(&old_msg1).err(),
        Some(PqError::Replay)
    );
    let (k3, _) = p.exchange();
    assert_ne!(k2, k3);
    assert_eq!(p.res.status(p.now).handshakes, 3);
}

#[test]
fn a_tampered_message_2_fails_the_attempt_and_nothing_is_installed() {
    let mut p = pair(6);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let mut frames = frames_of(&r);
    let last = frames.last_mut().unwrap();
    let n = last.len();
    last[n - 3] ^= 0x40;
    assert_eq!(
        p.deliver_to_initiator(&frames).err(),
        Some(PqError::Authentication)
    );
    assert!(!p.ini.established());
    let st = p.ini.status(p.now);
    assert!(st.error.unwrap().contains("did not authenticate"));
    // It tries again after a backoff and succeeds.
    p.now += MAX_BACKOFF;
    let retry = p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, 20);
    assert!(!retry.is_empty());
    let r = p.deliver_to_responder(&frames_of(&retry)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&r).unwrap().0);
}

#[test]
fn unanswered_exchanges_fail_with_a_reason_and_back_off() {
    let mut p = pair(7);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    assert!(!out.is_empty());
    for _ in 0..MAX_RETRANSMITS {
        p.now += RETRANSMIT;
        assert!(
            !p.ini
                .handle_timeout(p.now, &mut p.rng, &p.a_key, 10)
                .is_empty()
        );
    }
    p.now += RETRANSMIT;
    assert!(
        p.ini
            .handle_timeout(p.now, &mut p.rng, &p.a_key, 10)
            .is_empty()
    );
    let st = p.ini.status(p.now);
    assert!(!st.established);
    assert!(st.error.unwrap().contains("no answer"));
    assert!(p.ini.poll_timeout().unwrap() > p.now, "retries later");
}

#[test]
fn a_responder_that_lost_its_key_restarts_the_chain_and_both_agree() {
    let mut p = pair(8);
    p.exchange();
    // The responder restarts: fresh state, no key.
    p.res = PqPeer::new(p.res.me, p.res.peer, PqConfig::default());
    let nudge = p.res.want(p.now, &mut p.rng, &p.b_key, 0);
    assert!(matches!(
        frame::decode(&frames_of(&nudge)[0]),
        Some(Frame::Nudge { .. })
    ));
    p.epoch += 1;
    let out = p.ini.restart(p.now, &mut p.rng, &p.a_key, p.epoch);
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&r).unwrap().0);
    assert_eq!(p.ini.status(p.now).chain_resets, 1);
}

#[test]
fn nudges_are_rate_limited_and_tags_are_directional() {
    let mut p = pair(9);
    assert!(!p.res.want(p.now, &mut p.rng, &p.b_key, 0).is_empty());
    assert!(p.res.want(p.now, &mut p.rng, &p.b_key, 0).is_empty());
    p.now += NUDGE_INTERVAL;
    assert!(!p.res.want(p.now, &mut p.rng, &p.b_key, 0).is_empty());
    let (a, b) = (p.ini.me, p.res.me);
    assert_ne!(nudge_tag(&a, &b), nudge_tag(&b, &a));
}

#[test]
fn the_cached_answer_goes_only_to_the_original_sender_and_only_briefly() {
    let mut p = pair(11);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let (_, session, msg1) = messages(p.now, &frames_of(&out)).pop().unwrap();
    let feed = |p: &mut Pair, from: &str| {
        let (hs, init) =
            ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.b_key, &msg1)
                .unwrap();
        p.res.handle_init(
            p.now,
            &mut p.rng,
            Addr::main(from.parse().unwrap()),
            session,
            message_hash(&msg1),
            hs,
            &init.payload,
        )
    };
    assert!(feed(&mut p, FROM).is_ok());
    assert!(
        feed(&mut p, FROM).is_ok(),
        "a retransmission from the same address is answered"
    );
    assert_eq!(
        feed(&mut p, "203.0.113.1:9").err(),
        Some(PqError::Duplicate),
        "not from elsewhere"
    );
    p.now += RETRANSMIT_WINDOW;
    assert_eq!(
        feed(&mut p, FROM).err(),
        Some(PqError::Replay),
        "not after the window"
    );
}

#[test]
fn a_message_1_to_the_initiator_is_refused() {
    let mut p = pair(10);
    // Make the responder-side state believe it initiates (roles swapped) and feed it a msg1.
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let (_, session, msg1) = messages(p.now, &frames_of(&out)).pop().unwrap();
    let (hs, init) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.b_key, &msg1).unwrap();
    let r = p.ini.handle_init(
        p.now,
        &mut p.rng,
        Addr::main(FROM.parse().unwrap()),
        session,
        message_hash(&msg1),
        hs,
        &init.payload,
    );
    assert_eq!(r.err(), Some(PqError::WrongRole));
}
