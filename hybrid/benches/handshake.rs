//! Cost of the hybrid handshake per side (`cargo bench -p hybrid --bench handshake`).
//! Prints numbers; asserts nothing.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hybrid::{InitiatorHandshake, Psk, Purpose, ResponderHandshake, StaticKeypair};
use rand::{SeedableRng, rngs::StdRng};

fn main() {
    let n: u32 = std::env::var("HANDSHAKES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut rng = StdRng::seed_from_u64(7);
    let alice = StaticKeypair::generate(&mut rng);
    let bob = StaticKeypair::generate(&mut rng);
    let prev = Psk::zero();
    // warm up
    for _ in 0..50 {
        one(&mut rng, &alice, &bob, &prev, &mut [Duration::ZERO; 3]);
    }
    let mut t = [Duration::ZERO; 3];
    let start = Instant::now();
    for _ in 0..n {
        one(&mut rng, &alice, &bob, &prev, &mut t);
    }
    let total = start.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    let initiator = per(t[0]) + per(t[2]);
    let responder = per(t[1]);
    println!("hybrid handshake (Noise IKpsk2 X25519 + ML-KEM-768), {n} runs, one core:");
    println!(
        "  initiator: {initiator:8.1} us  (start {:.1} + finish {:.1})",
        per(t[0]),
        per(t[2])
    );
    println!("  responder: {responder:8.1} us  (read + respond)");
    println!(
        "  both sides on one core: {:.1} us per handshake -> {:.0} handshakes/s per core",
        per(total),
        f64::from(n) / total.as_secs_f64()
    );
    println!(
        "  per side, the busier side bounds a core at {:.0} handshakes/s",
        1e6 / initiator.max(responder)
    );
}

fn one(
    rng: &mut StdRng,
    alice: &StaticKeypair,
    bob: &StaticKeypair,
    prev: &Psk,
    t: &mut [Duration; 3],
) {
    let s = Instant::now();
    let (ini, msg1) =
        InitiatorHandshake::start(rng, Purpose::PeerPsk, alice, &bob.public(), prev, &[0; 17])
            .unwrap();
    t[0] += s.elapsed();
    let s = Instant::now();
    let (res, _) = ResponderHandshake::read_initiation(rng, Purpose::PeerPsk, bob, &msg1).unwrap();
    let (msg2, done_b) = res.respond(rng, prev, &[0; 17]).unwrap();
    let _ = done_b.peer_psk(prev);
    t[1] += s.elapsed();
    let s = Instant::now();
    let done_a = ini.finish(&msg2).unwrap();
    let _ = done_a.peer_psk(prev);
    t[2] += s.elapsed();
}
