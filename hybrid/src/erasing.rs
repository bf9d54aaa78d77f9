//! Randomness that erases its key as it goes ("fast key erasure"): the node's core draws all
//! its randomness from one, seeded once by the shell (STYLE S2), and every handshake's snow
//! state draws from one of its own: each refill derives the next key and a block of output from the
//! current key with keyed BLAKE2s, then forgets the current key. The generator's state at any
//! moment therefore reveals nothing it produced before: handshake ephemerals, post-quantum
//! secrets and cookie secrets drawn earlier stay secret if the process's memory is read
//! later, which a counter-mode generator (whose one key yields every past output) cannot
//! promise. Deterministic for a given seed, so the simulator replays exactly.

use std::convert::Infallible;

use blake2::Blake2sMac256;
use blake2::digest::{KeyInit, Mac};
use rand::{SeedableRng, TryCryptoRng, TryRng};
use zeroize::Zeroizing;

/// Output bytes per refill (each refill costs one keyed BLAKE2s per 32 bytes, plus one for
/// the next key).
const BLOCKS: usize = 8;
const BUF: usize = 32 * BLOCKS;

/// See the module docs.
pub struct ErasingRng {
    key: Zeroizing<[u8; 32]>,
    buf: Zeroizing<[u8; BUF]>,
    /// Bytes of `buf` already handed out (and zeroed).
    used: usize,
}

impl std::fmt::Debug for ErasingRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ErasingRng")
    }
}

fn prf(key: &[u8; 32], label: u8) -> [u8; 32] {
    let mut m = <Blake2sMac256 as KeyInit>::new_from_slice(key).expect("a 32-byte key");
    Mac::update(&mut m, b"lattice erasing rng");
    Mac::update(&mut m, &[label]);
    m.finalize().into_bytes().into()
}

impl ErasingRng {
    fn refill(&mut self) {
        for (i, block) in self.buf.chunks_exact_mut(32).enumerate() {
            block.copy_from_slice(&prf(&self.key, 1 + i as u8));
        }
        // The next key last: the current one is overwritten, and with it the way back.
        *self.key = prf(&self.key, 0);
        self.used = 0;
    }
}

impl SeedableRng for ErasingRng {
    type Seed = [u8; 32];

    fn from_seed(seed: Self::Seed) -> Self {
        Self {
            key: Zeroizing::new(seed),
            buf: Zeroizing::new([0; BUF]),
            used: BUF,
        }
    }
}

impl TryRng for ErasingRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, mut dst: &mut [u8]) -> Result<(), Infallible> {
        while !dst.is_empty() {
            if self.used == BUF {
                self.refill();
            }
            let n = dst.len().min(BUF - self.used);
            let (now, rest) = dst.split_at_mut(n);
            let src = &mut self.buf[self.used..self.used + n];
            now.copy_from_slice(src);
            // Handed out: not kept.
            src.fill(0);
            self.used += n;
            dst = rest;
        }
        Ok(())
    }
}

impl TryCryptoRng for ErasingRng {}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    /// The same seed gives the same stream however it is drawn, different seeds differ, and
    /// the state after drawing holds neither the seed nor any byte handed out.
    #[test]
    fn one_seed_one_stream_and_nothing_handed_out_stays_behind() {
        let mut a = ErasingRng::from_seed([7; 32]);
        let mut b = ErasingRng::from_seed([7; 32]);
        let mut whole = vec![0u8; 1000];
        a.fill_bytes(&mut whole);
        let mut pieces = Vec::new();
        for n in [1usize, 3, 31, 32, 33, 200, 256, 444] {
            let mut p = vec![0u8; n];
            b.fill_bytes(&mut p);
            pieces.extend(p);
        }
        assert_eq!(whole, pieces[..1000]);
        let mut c = ErasingRng::from_seed([8; 32]);
        let mut other = vec![0u8; 1000];
        c.fill_bytes(&mut other);
        assert_ne!(whole, other);
        // The key moved on from the seed, and the buffer keeps only what is yet to be drawn.
        assert_ne!(*a.key, [7u8; 32]);
        assert!(a.buf[..a.used].iter().all(|x| *x == 0));
        for w in whole.windows(16).step_by(16) {
            assert!(!a.buf.windows(16).any(|b| b == w) || w.iter().all(|x| *x == 0));
        }
        // Output looks uniform enough: every byte value appears in 1,000 bytes.
        let seen: std::collections::BTreeSet<u8> = whole.iter().copied().collect();
        assert!(seen.len() > 240, "{}", seen.len());
    }
}
