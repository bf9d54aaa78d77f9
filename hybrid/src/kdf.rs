//! The key-derivation function that binds the Noise transcript and the ML-KEM secret together.
//!
//! HKDF in the style of the Noise specification, with HMAC-BLAKE2s:
//!
//! ```text
//! temp = HMAC(previous, label || 0x00 || handshake_hash || kem_secret)
//! out1 = HMAC(temp, 0x01)
//! out2 = HMAC(temp, out1 || 0x02)
//! ```
//!
//! `previous` is the preceding key of the chain (all zeros at the start), so each derived key
//! also depends on every earlier exchange. The handshake hash covers both static keys, both
//! ephemeral keys and both payloads (ML-KEM key and ciphertext included), so any change to the
//! transcript changes the output.

use std::fmt;

use blake2::Blake2s256;
use hmac::{Mac, SimpleHmac};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A 32-byte symmetric key derived by [`kdf`]: a WireGuard PSK or a channel key. Zeroed on
/// drop, compared in constant time, never printed.
#[derive(Clone)]
pub struct Psk(Zeroizing<[u8; 32]>);

impl Psk {
    /// The all-zero key that starts a chain.
    pub fn zero() -> Self {
        Self(Zeroizing::new([0u8; 32]))
    }

    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether this is the all-zero chain start.
    pub fn is_zero(&self) -> bool {
        self.0.ct_eq(&[0u8; 32]).into()
    }

    /// A public 8-byte identifier of this key (a one-way hash), safe to send and log. Used to
    /// tell a peer which key a new exchange chains from.
    pub fn id(&self) -> [u8; 8] {
        let out = hmac(b"lattice psk id v1", &[self.0.as_slice()]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&out[..8]);
        id
    }
}

impl PartialEq for Psk {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&*other.0).into()
    }
}

impl Eq for Psk {}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.id();
        write!(
            f,
            "Psk(id={:02x}{:02x}{:02x}{:02x}…)",
            id[0], id[1], id[2], id[3]
        )
    }
}

/// Derives two keys from a finished hybrid handshake. See the module docs.
pub fn kdf(
    label: &[u8],
    handshake_hash: &[u8; 32],
    kem_secret: &[u8; 32],
    previous: &Psk,
) -> (Psk, Psk) {
    let temp = Zeroizing::new(hmac(
        previous.as_bytes(),
        &[label, &[0u8], handshake_hash, kem_secret],
    ));
    let out1 = hmac(temp.as_slice(), &[&[1u8]]);
    let out2 = hmac(temp.as_slice(), &[&out1, &[2u8]]);
    (Psk::from_bytes(out1), Psk::from_bytes(out2))
}

/// HMAC-BLAKE2s over the concatenation of `parts`.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    hmac(key, parts)
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <SimpleHmac<Blake2s256> as Mac>::new_from_slice(key)
        .expect("HMAC accepts keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Known answers computed independently with Python's hmac + hashlib.blake2s; see
    // scripts/kdf-vectors.py.
    #[test]
    fn kdf_known_answer_zero_chain() {
        let (a, b) = kdf(b"lattice peer-psk v1", &[1u8; 32], &[2u8; 32], &Psk::zero());
        assert_eq!(hex(a.as_bytes()), KAT_ZERO_1);
        assert_eq!(hex(b.as_bytes()), KAT_ZERO_2);
    }

    #[test]
    fn kdf_known_answer_chained() {
        let prev = Psk::from_bytes([3u8; 32]);
        let (a, b) = kdf(b"lattice control v1", &[4u8; 32], &[5u8; 32], &prev);
        assert_eq!(hex(a.as_bytes()), KAT_CHAIN_1);
        assert_eq!(hex(b.as_bytes()), KAT_CHAIN_2);
    }

    #[test]
    fn psk_id_known_answer_and_debug_is_redacted() {
        let p = Psk::from_bytes([7u8; 32]);
        assert_eq!(hex(&p.id()), KAT_ID);
        assert_eq!(format!("{p:?}"), format!("Psk(id={}…)", &KAT_ID[..8]));
        assert!(Psk::zero().is_zero());
        assert!(!p.is_zero());
    }

    proptest! {
        #[test]
        fn flipping_any_input_bit_changes_the_key(
            which in 0usize..3, byte in 0usize..32, bit in 0u8..8,
        ) {
            let mut hh = [9u8; 32];
            let mut ss = [10u8; 32];
            let mut prev = [11u8; 32];
            let (base, _) = kdf(b"l", &hh, &ss, &Psk::from_bytes(prev));
            match which {
                0 => hh[byte] ^= 1 << bit,
                1 => ss[byte] ^= 1 << bit,
                _ => prev[byte] ^= 1 << bit,
            }
            let (changed, _) = kdf(b"l", &hh, &ss, &Psk::from_bytes(prev));
            prop_assert_ne!(base, changed);
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    const KAT_ZERO_1: &str = "4f79b6b2311726c603974ff9dee9f30110c9e0f8119b97315fa23d14253e2786";
    const KAT_ZERO_2: &str = "1401fed1ded0b045825fd7ceaf81dd5002fccdcdc49eeb3abe4040beca140263";
    const KAT_CHAIN_1: &str = "84acdf4705cd54fd777c0d11d053cebb70d7b2c0dea11bea5ca82af9612ed3c8";
    const KAT_CHAIN_2: &str = "0c8fbe450f41319e17fc2cbc8f01ea4ff365ef01133a3e6f71432f0c23e240d2";
    const KAT_ID: &str = "0c29fcd3dd7091a3";
}
