//! Small authenticated messages between two static keys: ChaCha20-Poly1305 (aws-lc) under a
//! key from [`crate::StaticKeypair::shared_key`], with a random 96-bit nonce carried in front.
//!
//! ```text
//! nonce [12] | ciphertext | tag [16]
//! ```
//!
//! Random nonces are safe here: a pair of keys seals at most a few messages per second
//! (disco pings), far below the 2^32 messages at which a 96-bit nonce collision becomes a
//! concern.

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rand::Rng;

/// Bytes a sealed message adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// Seals `plaintext` with `key`; `aad` is authenticated but not carried.
pub fn seal(rng: &mut impl Rng, key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte key"));
    let mut buf = plaintext.to_vec();
    k.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .expect("sealing a short message cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out
}

/// Opens a sealed message; `None` if it was not sealed with `key` and `aad`.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).ok()?);
    let mut buf = body.to_vec();
    let n = k
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(n);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn sealed_messages_open_only_with_the_same_key_and_aad() {
        let mut rng = StdRng::seed_from_u64(3);
        let s = seal(&mut rng, &[7; 32], b"hdr", b"ping");
        assert_eq!(s.len(), 4 + SEAL_OVERHEAD);
        assert_eq!(open(&[7; 32], b"hdr", &s).as_deref(), Some(&b"ping"[..]));
        assert_eq!(open(&[8; 32], b"hdr", &s), None);
        assert_eq!(open(&[7; 32], b"other", &s), None);
        let mut t = s.clone();
        t[14] ^= 1;
        assert_eq!(open(&[7; 32], b"hdr", &t), None);
        assert_eq!(open(&[7; 32], b"hdr", &s[..20]), None);
        // Two seals of the same message differ (fresh nonces).
        assert_ne!(s, seal(&mut rng, &[7; 32], b"hdr", b"ping"));
    }

    proptest! {
        #[test]
        fn opening_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = open(&[1; 32], b"", &b);
        }
    }
}
