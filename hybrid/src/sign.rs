//! Ed25519 signatures with a context string (aws-lc): relay tickets and the coordinator's
//! audit log use them. Every signature covers `context || message`, so a signature made for
//! one purpose is useless for another.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rand::Rng;
use zeroize::Zeroizing;

/// Length of a signature.
pub const SIGNATURE_LEN: usize = 64;

/// A signing key. The seed is zeroed on drop and never printed.
pub struct Signer {
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

impl Signer {
    /// The signer for a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        let pair =
            Ed25519KeyPair::from_seed_unchecked(seed.as_slice()).expect("any 32 bytes are a seed");
        Self { seed, pair }
    }

    /// A fresh signer from `rng`.
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(*seed)
    }

    /// The seed, for persisting.
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes")
    }

    /// Signs `context || message`.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let sig = self.pair.sign(&[context, message].concat());
        sig.as_ref()
            .try_into()
            .expect("Ed25519 signatures are 64 bytes")
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.public();
        f.debug_struct("Signer")
            .field(
                "public",
                &format_args!("{:02x}{:02x}{:02x}{:02x}…", p[0], p[1], p[2], p[3]),
            )
            .field("seed", &"<redacted>")
            .finish()
    }
}

/// Whether `signature` is `public`'s signature over `context || message`.
pub fn verify(public: &[u8; 32], context: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&[context, message].concat(), signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_key_context_and_message() {
        let s = Signer::from_seed([5; 32]);
        let sig = s.sign(b"ctx", b"message");
        assert!(verify(&s.public(), b"ctx", b"message", &sig));
        assert!(!verify(&s.public(), b"other", b"message", &sig));
        assert!(!verify(&s.public(), b"ctx", b"messagE", &sig));
        assert!(!verify(
            &Signer::from_seed([6; 32]).public(),
            b"ctx",
            b"message",
            &sig
        ));
        assert!(!verify(&s.public(), b"ctx", b"message", &sig[..63]));
        assert!(!format!("{s:?}").contains("0505"));
    }
}
