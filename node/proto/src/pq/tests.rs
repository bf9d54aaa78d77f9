use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::admission::Sender;
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

fn from() -> Addr {
    Addr::main(FROM.parse().unwrap())
}

fn keys(p: &Pair) -> (NodeKey, NodeKey) {
    (
        NodeKey::from_bytes(p.a_key.public()),
        NodeKey::from_bytes(p.b_key.public()),
    )
}

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
            _ => vec![],
        })
        .collect()
}

fn discos_of(actions: &[PqAction]) -> Vec<Disco> {
    actions
        .iter()
        .filter_map(|a| match a {
            PqAction::SendDisco(m) | PqAction::ReplyDisco(_, m) => Some(m.clone()),
            _ => None,
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
    frames
        .iter()
        .filter_map(|f| match frame::decode(f)? {
            Frame::Chunk(c) => r.push(now, from(), &c).map(|m| (c.kind, c.session, m)),
            Frame::Cookie { .. } => None,
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
            from(),
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

    /// Delivers the initiator's confirmation to the responder; returns its actions.
    fn confirm(&mut self, ini_actions: &[PqAction]) -> Result<Vec<PqAction>, PqError> {
        let Some(Disco::PqConfirm { session, tag }) = discos_of(ini_actions).pop() else {
            panic!("no confirmation in {ini_actions:?}");
        };
        self.res.handle_confirm(self.now, from(), session, &tag)
    }

    fn ack(&mut self, res_actions: &[PqAction]) -> Result<(), PqError> {
        let Some(Disco::PqConfirmAck { session, tag }) = discos_of(res_actions).pop() else {
            panic!("no ack in {res_actions:?}");
        };
        self.ini.handle_confirm_ack(session, &tag)
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
        assert!(installed(&r).is_none(), "no key before the confirmation");
        let i = self.deliver_to_initiator(&frames_of(&r)).unwrap();
        let c = self.confirm(&i).unwrap();
        let (res_psk, rekey) = installed(&c).unwrap();
        assert!(!rekey);
        self.ack(&c).unwrap();
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
    let c = p.confirm(&i).unwrap();
    assert_eq!(k2, installed(&c).unwrap().0);
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
    let c = p.confirm(&i).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&c).unwrap().0);
    assert_eq!(p.res.status(p.now).handshakes, 1);
}

#[test]
fn a_replayed_old_message_1_is_refused_and_yields_no_key() {
    let mut p = pair(5);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let old_msg1 = frames_of(&out);
    let r = p.deliver_to_responder(&old_msg1).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    p.confirm(&i).unwrap();
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
fn a_forged_or_tampered_message_2_is_ignored_and_the_genuine_one_completes() {
    let mut p = pair(6);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let genuine = frames_of(&r);
    // An attacker who saw the session id answers first: a tampered copy, then garbage.
    let mut tampered = genuine.clone();
    let last = tampered.last_mut().unwrap();
    let n = last.len();
    last[n - 40] ^= 0x40;
    assert_eq!(
        p.deliver_to_initiator(&tampered).err(),
        Some(PqError::Authentication)
    );
    let (_, session, msg2) = messages(p.now, &genuine).pop().unwrap();
    assert_eq!(
        p.ini.handle_resp(p.now, &vec![0x5a; msg2.len()]).err(),
        Some(PqError::Authentication)
    );
    // Nothing changed: still in flight, no error shown, no backoff.
    assert!(!p.ini.established());
    assert_eq!(p.ini.pending_session(), Some(session));
    assert_eq!(p.ini.status(p.now).error, None);
    let i = p.deliver_to_initiator(&genuine).unwrap();
    let c = p.confirm(&i).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&c).unwrap().0);
}

#[test]
fn a_message_1_replayed_after_the_responder_restarted_installs_nothing() {
    let mut p = pair(12);
    p.exchange();
    // The attacker records a rotation's message 1.
    p.now += PqConfig::default().rotation;
    p.epoch += 1;
    let recorded = frames_of(&p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, p.epoch));
    let r = p.deliver_to_responder(&recorded).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    p.confirm(&i).unwrap();
    // The responder restarts: it no longer knows which epochs it answered.
    let (a, b) = keys(&p);
    p.res = PqPeer::new(b, a, PqConfig::default());
    let r = p
        .deliver_to_responder(&recorded)
        .expect("an old message 1 is answered after a restart");
    assert!(
        installed(&r).is_none(),
        "a replayed message 1 must not install a key the initiator does not hold"
    );
    assert!(!p.res.established());
    // Nobody can confirm it: the attacker has no key, and a tag from another key fails.
    assert_eq!(
        p.res.handle_confirm(p.now, from(), 1, &[0; 16]).err(),
        Some(PqError::NoPending)
    );
    // The real initiator's next exchange (nudged by the responder) replaces it and completes.
    p.now += Duration::from_secs(1);
    p.epoch += 1;
    let out = p
        .ini
        .handle_nudge(p.now, &mut p.rng, &p.a_key, p.epoch, p.epoch)
        .unwrap();
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    let c = p.confirm(&i).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&c).unwrap().0);
    assert_eq!(p.res.status(p.now).handshakes, 1);
}

#[test]
fn confirmations_are_authenticated_repeated_ones_reacknowledged_and_retransmitted_until_acked() {
    let mut p = pair(13);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    let Some(Disco::PqConfirm { session, tag }) = discos_of(&i).pop() else {
        panic!()
    };
    assert!(p.res.awaiting_confirmation(p.now));
    let mut bad = tag;
    bad[0] ^= 1;
    assert_eq!(
        p.res.handle_confirm(p.now, from(), session, &bad).err(),
        Some(PqError::Authentication)
    );
    assert!(!p.res.established());
    // The confirmation (or its ack) is lost: the initiator sends it again.
    p.now += RETRANSMIT;
    let again = p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, 11);
    assert_eq!(discos_of(&again), vec![Disco::PqConfirm { session, tag }]);
    let c = p.res.handle_confirm(p.now, from(), session, &tag).unwrap();
    assert!(p.res.established() && !p.res.awaiting_confirmation(p.now));
    assert!(c.iter().any(|a| matches!(a, PqAction::Confirmed { .. })));
    // A repeat is acknowledged again and installs nothing new.
    let c2 = p.res.handle_confirm(p.now, from(), session, &tag).unwrap();
    assert!(installed(&c2).is_none());
    assert_eq!(p.res.status(p.now).handshakes, 1);
    let Some(Disco::PqConfirmAck { tag: ack, .. }) = discos_of(&c2).pop() else {
        panic!()
    };
    let mut bad_ack = ack;
    bad_ack[3] ^= 1;
    assert_eq!(
        p.ini.handle_confirm_ack(session, &bad_ack).err(),
        Some(PqError::Authentication)
    );
    p.ini.handle_confirm_ack(session, &ack).unwrap();
    // Replayed later, the confirmation draws no answer at all.
    let later = p.now + RETRANSMIT_WINDOW;
    assert_eq!(
        p.res.handle_confirm(later, from(), session, &tag).err(),
        Some(PqError::Replay)
    );
    p.now += RETRANSMIT * 2;
    assert!(
        discos_of(&p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, 12)).is_empty(),
        "no more confirmations once acknowledged"
    );
}

#[test]
fn a_cookie_reply_is_kept_and_makes_message_1_go_again_with_mac2() {
    let mut p = pair(14);
    let (a, b) = keys(&p);
    let mut rng = StdRng::seed_from_u64(99);
    let mut adm = crate::admission::Admission::new(&b, &mut rng, p.now);
    let out = p.ini.want(p.now, &mut p.rng, &p.a_key, 10);
    let frames = frames_of(&out);
    let Some(Frame::Chunk(c)) = frame::decode(&frames[0]) else {
        panic!()
    };
    assert_eq!(c.mac2, [0; MAC_LEN]);
    // The responder is under pressure and answers with a cookie.
    let crate::admission::ChunkVerdict::Cookie(reply) =
        adm.check_chunk(p.now, &mut rng, from(), Sender::Stranger, &c, true)
    else {
        panic!("no cookie")
    };
    let Some(Frame::Cookie {
        session,
        index,
        sealed,
    }) = frame::decode(&reply)
    else {
        panic!()
    };
    // A cookie for another chunk, or sealed by someone else, is refused.
    assert_eq!(
        p.ini.handle_cookie(p.now, session, 1, sealed).err(),
        Some(PqError::Authentication)
    );
    assert_eq!(
        p.ini.handle_cookie(p.now, session ^ 1, index, sealed).err(),
        Some(PqError::NoPending)
    );
    let resent = p.ini.handle_cookie(p.now, session, index, sealed).unwrap();
    let frames = frames_of(&resent);
    assert_eq!(frames.len(), 2, "message 1 goes again at once");
    for f in &frames {
        let Some(Frame::Chunk(c)) = frame::decode(f) else {
            panic!()
        };
        assert_eq!(
            adm.check_chunk(p.now, &mut rng, from(), Sender::Stranger, &c, true),
            crate::admission::ChunkVerdict::Accept { proven: true }
        );
    }
    // Only once per transmission; retransmissions keep using it.
    assert!(
        p.ini
            .handle_cookie(p.now, session, index, sealed)
            .unwrap()
            .is_empty()
    );
    p.now += RETRANSMIT;
    let again = frames_of(&p.ini.handle_timeout(p.now, &mut p.rng, &p.a_key, 10));
    let Some(Frame::Chunk(c)) = frame::decode(&again[0]) else {
        panic!()
    };
    assert_ne!(c.mac2, [0; MAC_LEN]);
    let _ = a;
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
    let (a, b) = keys(&p);
    p.res = PqPeer::new(b, a, PqConfig::default());
    let nudge = p.res.want(p.now, &mut p.rng, &p.b_key, p.epoch);
    let Some(Disco::PqNudge { time }) = discos_of(&nudge).pop() else {
        panic!("no nudge: {nudge:?}")
    };
    p.epoch += 1;
    let out = p
        .ini
        .handle_nudge(p.now, &mut p.rng, &p.a_key, p.epoch, time)
        .unwrap();
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    let c = p.confirm(&i).unwrap();
    assert_eq!(installed(&i).unwrap().0, installed(&c).unwrap().0);
    assert_eq!(p.ini.status(p.now).chain_resets, 1);
    assert_eq!(p.res.status(p.now).chain_resets, 1);
}

#[test]
fn nudges_are_rate_limited_and_only_fresh_ones_restart_a_working_chain() {
    let mut p = pair(9);
    assert!(!p.res.want(p.now, &mut p.rng, &p.b_key, p.epoch).is_empty());
    assert!(p.res.want(p.now, &mut p.rng, &p.b_key, p.epoch).is_empty());
    p.now += NUDGE_INTERVAL;
    assert!(!p.res.want(p.now, &mut p.rng, &p.b_key, p.epoch).is_empty());

    let (k1, _) = p.exchange();
    let window = u64::try_from(NUDGE_WINDOW.as_millis()).unwrap();
    p.epoch += 1;
    let t = p.epoch;
    p.now += NUDGE_INTERVAL;
    let out = p
        .ini
        .handle_nudge(p.now, &mut p.rng, &p.a_key, p.epoch, t)
        .unwrap();
    let r = p.deliver_to_responder(&frames_of(&out)).unwrap();
    let i = p.deliver_to_initiator(&frames_of(&r)).unwrap();
    let c = p.confirm(&i).unwrap();
    p.ack(&c).unwrap();
    assert_ne!(installed(&i).unwrap().0, k1);
    // The same nudge again, an older one, or one far from our clock changes nothing.
    for stale in [t, t - 1, t + window + 1, t.saturating_sub(window + 1)] {
        p.now += NUDGE_INTERVAL;
        let r = p
            .ini
            .handle_nudge(p.now, &mut p.rng, &p.a_key, p.epoch, stale);
        assert_eq!(
            r.err(),
            Some(PqError::Replay),
            "nudge at {stale} was acted on"
        );
        assert_eq!(p.ini.pending_session(), None);
    }
    // A responder's nudge is for the initiator only.
    assert_eq!(
        p.res
            .handle_nudge(p.now, &mut p.rng, &p.b_key, p.epoch, t + 10)
            .err(),
        Some(PqError::WrongRole)
    );
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
