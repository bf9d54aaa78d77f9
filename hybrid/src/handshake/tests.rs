use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::channel::{ChannelError, MAX_MESSAGE_LEN};

struct Parties {
    rng: StdRng,
    alice: StaticKeypair,
    bob: StaticKeypair,
}

fn parties(seed: u64) -> Parties {
    let mut rng = StdRng::seed_from_u64(seed);
    let alice = StaticKeypair::generate(&mut rng);
    let bob = StaticKeypair::generate(&mut rng);
    Parties { rng, alice, bob }
}

fn handshake(p: &mut Parties, purpose: Purpose, psk: &Psk) -> (Completed, Completed, Vec<u8>) {
    let (ini, msg1) =
        InitiatorHandshake::start(&mut p.rng, purpose, &p.alice, &p.bob.public(), psk, b"hi")
            .unwrap();
    let (res, init) =
        ResponderHandshake::read_initiation(&mut p.rng, purpose, &p.bob, &msg1).unwrap();
    assert_eq!(init.remote_static, p.alice.public());
    assert_eq!(init.payload, b"hi");
    let (msg2, bob_done) = res.respond(&mut p.rng, psk, b"hello").unwrap();
    let alice_done = ini.finish(&msg2).unwrap();
    (alice_done, bob_done, msg1)
}

#[test]
fn both_sides_derive_the_same_psk_and_sizes_are_as_documented() {
    let mut p = parties(1);
    let (ini, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::PeerPsk,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        &[],
    )
    .unwrap();
    // e (32) + encrypted s (32 + 16) + encrypted payload (1184 + 16)
    assert_eq!(msg1.len(), 32 + 48 + ENCAPSULATION_KEY_LEN + 16);
    let (res, _) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1).unwrap();
    let (msg2, bob) = res.respond(&mut p.rng, &Psk::zero(), &[]).unwrap();
    assert_eq!(msg2.len(), 32 + CIPHERTEXT_LEN + 16);
    let alice = ini.finish(&msg2).unwrap();
    assert_eq!(alice.handshake_hash(), bob.handshake_hash());
    assert_eq!(alice.remote_static(), &p.bob.public());
    assert_eq!(bob.remote_static(), &p.alice.public());
    let prev = Psk::zero();
    assert_eq!(alice.peer_psk(&prev), bob.peer_psk(&prev));
    assert!(!alice.peer_psk(&prev).is_zero());
}

#[test]
fn responder_payload_reaches_initiator() {
    let mut p = parties(2);
    let (alice, _, _) = handshake(&mut p, Purpose::PeerPsk, &Psk::zero());
    assert_eq!(alice.payload(), b"hello");
}

#[test]
fn tampering_with_any_byte_of_message_1_fails() {
    let mut p = parties(3);
    let (_, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::PeerPsk,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        b"x",
    )
    .unwrap();
    for i in 0..msg1.len() {
        let mut bad = msg1.clone();
        bad[i] ^= 0x01;
        let r = ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &bad);
        assert!(r.is_err(), "flipping byte {i} of msg1 went unnoticed");
    }
    let truncated = &msg1[..msg1.len() - 1];
    assert!(
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, truncated)
            .is_err()
    );
}

#[test]
fn tampering_with_any_byte_of_message_2_fails() {
    let mut p = parties(4);
    let (ini, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::PeerPsk,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        &[],
    )
    .unwrap();
    let (res, _) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1).unwrap();
    let (msg2, _) = res.respond(&mut p.rng, &Psk::zero(), &[]).unwrap();
    // The initiator state is consumed by `finish`, so replay the start deterministically for
    // every position: same seed, same messages.
    drop(ini);
    for i in 0..msg2.len() {
        let mut p2 = parties(4);
        let (ini2, _) = InitiatorHandshake::start(
            &mut p2.rng,
            Purpose::PeerPsk,
            &p2.alice,
            &p2.bob.public(),
            &Psk::zero(),
            &[],
        )
        .unwrap();
        let mut bad = msg2.clone();
        bad[i] ^= 0x80;
        assert_eq!(
            ini2.finish(&bad).err(),
            Some(HandshakeError::Authentication),
            "flipping byte {i} of msg2 went unnoticed"
        );
    }
}

#[test]
fn forged_message_2s_leave_the_handshake_usable_for_the_genuine_one() {
    let mut p = parties(14);
    let (ini, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::PeerPsk,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        b"hello",
    )
    .unwrap();
    let (res, _) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1).unwrap();
    let (msg2, bob_done) = res.respond(&mut p.rng, &Psk::zero(), b"world").unwrap();
    // An attacker answering first: a message from another exchange, a tampered copy of the
    // real one, and garbage of the right size. Each is refused and the state kept.
    let mut mallory = parties(15);
    let (_, other1) = InitiatorHandshake::start(
        &mut mallory.rng,
        Purpose::PeerPsk,
        &mallory.alice,
        &mallory.bob.public(),
        &Psk::zero(),
        &[],
    )
    .unwrap();
    let (other_res, _) = ResponderHandshake::read_initiation(
        &mut mallory.rng,
        Purpose::PeerPsk,
        &mallory.bob,
        &other1,
    )
    .unwrap();
    let (other2, _) = other_res
        .respond(&mut mallory.rng, &Psk::zero(), &[])
        .unwrap();
    let mut tampered = msg2.clone();
    tampered[40] ^= 1;
    let mut ini = ini;
    for forged in [other2, tampered, vec![0xa5; msg2.len()], vec![]] {
        match ini.finish_or_keep(&forged) {
            Err((Some(kept), HandshakeError::Authentication | HandshakeError::BadRemoteKey)) => {
                ini = *kept;
            }
            Err((kept, e)) => panic!(
                "forged message 2 ended the handshake: {e} ({})",
                kept.is_some()
            ),
            Ok(_) => panic!("a forged message 2 completed the handshake"),
        }
    }
    let alice_done = ini.finish_or_keep(&msg2).map_err(|(_, e)| e).unwrap();
    assert_eq!(alice_done.payload(), b"world");
    assert_eq!(
        alice_done.peer_psk(&Psk::zero()),
        bob_done.peer_psk(&Psk::zero())
    );
}

#[test]
fn wrong_responder_static_key_fails() {
    let mut p = parties(5);
    let mallory = StaticKeypair::generate(&mut p.rng);
    let (_, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::Control,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        &[],
    )
    .unwrap();
    // Mallory does not hold Bob's private key and cannot read message 1.
    let r = ResponderHandshake::read_initiation(&mut p.rng, Purpose::Control, &mallory, &msg1);
    assert_eq!(r.err(), Some(HandshakeError::Authentication));
}

#[test]
fn mismatched_psk_fails_at_the_initiator() {
    let mut p = parties(6);
    let (ini, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::PeerPsk,
        &p.alice,
        &p.bob.public(),
        &Psk::from_bytes([1; 32]),
        &[],
    )
    .unwrap();
    let (res, _) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1).unwrap();
    let (msg2, _) = res
        .respond(&mut p.rng, &Psk::from_bytes([2; 32]), &[])
        .unwrap();
    assert_eq!(
        ini.finish(&msg2).err(),
        Some(HandshakeError::Authentication)
    );
}

#[test]
fn purposes_are_domain_separated() {
    let mut p = parties(7);
    let (_, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::Control,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        &[],
    )
    .unwrap();
    let r = ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1);
    assert!(r.is_err());
}

#[test]
fn replayed_message_1_does_not_yield_the_initiators_key() {
    let mut p = parties(8);
    let (alice, bob, msg1) = handshake(&mut p, Purpose::PeerPsk, &Psk::zero());
    // An attacker replays message 1: the responder answers with a fresh ephemeral and a fresh
    // ML-KEM encapsulation, so the key it derives matches neither earlier run, and the attacker
    // (who has no ML-KEM decapsulation key) cannot compute it.
    let (res, _) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1).unwrap();
    let (_, bob_again) = res.respond(&mut p.rng, &Psk::zero(), &[]).unwrap();
    let prev = Psk::zero();
    assert_ne!(bob_again.peer_psk(&prev), alice.peer_psk(&prev));
    assert_ne!(bob_again.peer_psk(&prev), bob.peer_psk(&prev));
}

#[test]
fn low_order_remote_key_is_refused() {
    let mut p = parties(9);
    // The identity point (all zeros) is of low order.
    let r = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::Control,
        &p.alice,
        &[0u8; 32],
        &Psk::zero(),
        &[],
    );
    assert_eq!(r.err(), Some(HandshakeError::BadRemoteKey));
}

#[test]
fn chained_psks_differ_from_fresh_ones() {
    let mut p = parties(10);
    let (a1, b1, _) = handshake(&mut p, Purpose::PeerPsk, &Psk::zero());
    let k1 = a1.peer_psk(&Psk::zero());
    assert_eq!(k1, b1.peer_psk(&Psk::zero()));
    let (a2, b2, _) = handshake(&mut p, Purpose::PeerPsk, &k1);
    let k2 = a2.peer_psk(&k1);
    assert_eq!(k2, b2.peer_psk(&k1));
    assert_ne!(k1, k2);
}

#[test]
fn same_seed_same_transcript() {
    let mut p1 = parties(11);
    let mut p2 = parties(11);
    let (_, _, m1) = handshake(&mut p1, Purpose::Control, &Psk::zero());
    let (_, _, m2) = handshake(&mut p2, Purpose::Control, &Psk::zero());
    assert_eq!(m1, m2);
}

#[test]
fn control_channel_carries_small_and_large_messages_both_ways() {
    let mut p = parties(12);
    let (alice, bob, _) = handshake(&mut p, Purpose::Control, &Psk::zero());
    let mut a = alice.into_channel();
    let mut b = bob.into_channel();
    for msg in [vec![], b"netmap".to_vec(), vec![0x5a; 200_000]] {
        let frames = a.seal(&msg).unwrap();
        let mut got = None;
        for f in &frames {
            assert!(got.is_none());
            got = b.open(f).unwrap();
        }
        assert_eq!(got.unwrap(), msg);
        let frames = b.seal(&msg).unwrap();
        let opened: Vec<_> = frames.iter().map(|f| a.open(f).unwrap()).collect();
        let got = opened.into_iter().flatten().next();
        assert_eq!(got.unwrap(), msg);
    }
}

#[test]
fn control_channel_rejects_tampered_and_replayed_frames() {
    let mut p = parties(13);
    let (alice, bob, _) = handshake(&mut p, Purpose::Control, &Psk::zero());
    let mut a = alice.into_channel();
    let mut b = bob.into_channel();
    let f1 = a.seal(b"one").unwrap().remove(0);
    let mut bad = f1.clone();
    bad[3] ^= 1;
    assert_eq!(b.open(&bad), Err(ChannelError::Authentication));

    let mut p = parties(13);
    let (alice, bob, _) = handshake(&mut p, Purpose::Control, &Psk::zero());
    let mut a = alice.into_channel();
    let mut b = bob.into_channel();
    let f1 = a.seal(b"one").unwrap().remove(0);
    assert_eq!(b.open(&f1).unwrap().unwrap(), b"one");
    assert_eq!(b.open(&f1), Err(ChannelError::Authentication));
    assert!(a.seal(&vec![0; MAX_MESSAGE_LEN + 1]).is_err());
}

#[test]
fn a_limited_channel_refuses_a_large_message_before_buffering_it_whole() {
    let mut p = parties(16);
    let (alice, bob, _) = handshake(&mut p, Purpose::Control, &Psk::zero());
    let mut a = alice.into_channel();
    let mut b = bob.into_channel();
    b.limit_inbound(100_000);
    let frames = a.seal(&vec![7u8; 1 << 20]).unwrap();
    assert!(frames.len() > 2);
    // The first frame fits; the second takes the message past the limit and is refused.
    assert_eq!(b.open(&frames[0]), Ok(None));
    assert_eq!(b.open(&frames[1]), Err(ChannelError::TooLarge));
    // A message within the limit still passes on a fresh channel.
    let mut p = parties(16);
    let (alice, bob, _) = handshake(&mut p, Purpose::Control, &Psk::zero());
    let (mut a, mut b) = (alice.into_channel(), bob.into_channel());
    b.limit_inbound(100_000);
    let frames = a.seal(&[1u8; 99_000]).unwrap();
    assert_eq!(b.open(&frames[0]), Ok(None));
    assert_eq!(b.open(&frames[1]).unwrap().unwrap().len(), 99_000);
}

#[test]
fn channel_keys_are_not_the_classical_noise_keys() {
    // The channel must use the hybrid keys: a frame sealed under Noise's own split keys must
    // not open.
    let mut p = parties(14);
    let (ini, msg1) = InitiatorHandshake::start(
        &mut p.rng,
        Purpose::Control,
        &p.alice,
        &p.bob.public(),
        &Psk::zero(),
        &[],
    )
    .unwrap();
    let (res, _) =
        ResponderHandshake::read_initiation(&mut p.rng, Purpose::Control, &p.bob, &msg1).unwrap();
    let (msg2, bob) = res.respond(&mut p.rng, &Psk::zero(), &[]).unwrap();
    let mut alice = ini.finish(&msg2).unwrap();
    let mut classical = vec![0u8; 64];
    let n = alice
        .transport
        .write_message(&[FINAL_FLAG, b'x'], &mut classical)
        .unwrap();
    let mut b = bob.into_channel();
    assert_eq!(b.open(&classical[..n]), Err(ChannelError::Authentication));
}

const FINAL_FLAG: u8 = 0;

#[test]
fn libcrux_ml_kem_agrees_with_rustcrypto_ml_kem_byte_for_byte() {
    use ml_kem::array::Array;
    use ml_kem::{Decapsulate, KeyExport};
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..20 {
        let mut seed = [0u8; 64];
        rng.fill_bytes(&mut seed);
        let mut m = [0u8; 32];
        rng.fill_bytes(&mut m);
        // key generation from the same (d, z)
        let ours = mlkem768::generate_key_pair(seed);
        let theirs = ml_kem::ml_kem_768::DecapsulationKey::from_seed(Array::from(seed));
        let their_ek = theirs.encapsulation_key().to_bytes();
        assert_eq!(ours.pk().as_slice(), their_ek.as_slice());
        // encapsulation with the same message
        let (ct, ss) = mlkem768::encapsulate(ours.public_key(), m);
        let (their_ct, their_ss) = theirs
            .encapsulation_key()
            .encapsulate_deterministic(&Array::from(m));
        assert_eq!(ct.as_slice(), their_ct.as_slice());
        assert_eq!(ss.as_slice(), their_ss.as_slice());
        // each decapsulates the other's ciphertext
        assert_eq!(
            theirs.decapsulate(&their_ct).as_slice(),
            mlkem768::decapsulate(ours.private_key(), &ct).as_slice()
        );
        // a tampered ciphertext yields the same implicit-rejection key in both
        let mut bad = *ct.as_slice();
        bad[5] ^= 1;
        let bad_ours = mlkem768::decapsulate(ours.private_key(), &MlKem768Ciphertext::from(bad));
        let bad_theirs = theirs.decapsulate(&Array::from(bad));
        assert_eq!(bad_ours.as_slice(), bad_theirs.as_slice());
        assert_ne!(bad_ours.as_slice(), ss.as_slice());
    }
}

#[test]
fn the_static_static_cache_gives_the_same_keys() {
    let mut p = parties(15);
    let (a1, b1, _) = handshake(&mut p, Purpose::PeerPsk, &Psk::zero());
    let (a2, b2, _) = handshake(&mut p, Purpose::PeerPsk, &Psk::zero());
    assert_eq!(a1.peer_psk(&Psk::zero()), b1.peer_psk(&Psk::zero()));
    assert_eq!(a2.peer_psk(&Psk::zero()), b2.peer_psk(&Psk::zero()));
    assert_ne!(a1.peer_psk(&Psk::zero()), a2.peer_psk(&Psk::zero()));
}

#[test]
fn an_encapsulation_key_with_unreduced_coefficients_is_refused() {
    // A message 1 whose ML-KEM key fails the FIPS 203 modulus check.
    let mut p = parties(16);
    let bad_ek = [0xffu8; ENCAPSULATION_KEY_LEN];
    let mut noise = builder(&mut p.rng, Purpose::PeerPsk, &p.alice)
        .local_private_key(p.alice.secret_bytes())
        .unwrap()
        .remote_public_key(&p.bob.public())
        .unwrap()
        .psk(2, &[0; 32])
        .unwrap()
        .build_initiator()
        .unwrap();
    let msg1 = write(&mut noise, &[&bad_ek]).unwrap();
    let r = ResponderHandshake::read_initiation(&mut p.rng, Purpose::PeerPsk, &p.bob, &msg1);
    assert_eq!(r.err(), Some(HandshakeError::Malformed));
}
