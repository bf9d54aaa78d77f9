//! Static X25519 key pairs and key fingerprints.

use std::fmt;
use std::sync::Arc;

use blake2::{Blake2s256, Digest};
use rand::Rng;
use zeroize::Zeroizing;

use crate::x25519::StaticDhCache;

/// Domain separation of node-key possession proofs.
const NODE_KEY_PROOF: &[u8] = b"lattice node key proof v1";

/// Length of a control-key fingerprint in bytes.
pub const FINGERPRINT_LEN: usize = 16;

/// A static X25519 key pair. The secret is zeroed on drop and never printed. Clones share
/// the cache of static-static Diffie-Hellman results.
#[derive(Clone)]
pub struct StaticKeypair {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    cache: Arc<StaticDhCache>,
}

impl StaticKeypair {
    /// Generates a new key pair from `rng`.
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(secret.as_mut());
        Self::from_secret(*secret)
    }

    /// Rebuilds a key pair from its secret bytes (e.g. read from the state dir).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = Zeroizing::new(secret);
        let cache = StaticDhCache::new(&secret).expect("any 32 bytes are an X25519 private key");
        Self {
            secret,
            public: cache.public(),
            cache: Arc::new(cache),
        }
    }

    pub(crate) fn cache(&self) -> Arc<StaticDhCache> {
        Arc::clone(&self.cache)
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// A symmetric key shared with the holder of `peer`'s private key, for `label`'s purpose:
    /// HMAC-BLAKE2s keyed by the static-static X25519 result (cached). `None` when `peer` is a
    /// low-order point (the result would be public).
    pub fn shared_key(&self, peer: &[u8; 32], label: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        let dh = self.cache.static_static(peer)?;
        Some(Zeroizing::new(crate::kdf::mac(dh.as_slice(), &[label])))
    }

    /// Proof that the holder of this key (a node's WireGuard key) takes part in the control
    /// session whose handshake hash is `session`, for machine key `machine`; only the holder of
    /// the private half of `verifier` (the coordinator) can check it, and it is useless in any
    /// other session. `None` when `verifier` is a low-order point.
    pub fn possession_proof(
        &self,
        verifier: &[u8; 32],
        session: &[u8; 32],
        machine: &[u8; 32],
    ) -> Option<[u8; 32]> {
        let key = self.shared_key(verifier, NODE_KEY_PROOF)?;
        Some(crate::kdf::mac(key.as_slice(), &[session, machine]))
    }

    /// Checks a [`Self::possession_proof`] made by the holder of `prover`'s private key, in
    /// constant time.
    pub fn check_possession_proof(
        &self,
        prover: &[u8; 32],
        session: &[u8; 32],
        machine: &[u8; 32],
        proof: &[u8; 32],
    ) -> bool {
        use subtle::ConstantTimeEq;
        self.possession_proof(prover, session, machine)
            .is_some_and(|p| bool::from(p.ct_eq(proof)))
    }

    /// The secret bytes, for persisting to a 0600 file and for handing to WireGuard.
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.secret
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeypair")
            .field(
                "public",
                &format_args!(
                    "{:02x}{:02x}{:02x}{:02x}…",
                    self.public[0], self.public[1], self.public[2], self.public[3]
                ),
            )
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The fingerprint of a coordinator's control key, as embedded in auth keys:
/// the first 16 bytes of BLAKE2s-256("lattice control-key fingerprint v1" || key).
pub fn fingerprint(public_key: &[u8; 32]) -> [u8; FINGERPRINT_LEN] {
    let mut h = Blake2s256::new();
    h.update(b"lattice control-key fingerprint v1");
    h.update(public_key);
    let digest = h.finalize();
    let mut out = [0u8; FINGERPRINT_LEN];
    out.copy_from_slice(&digest[..FINGERPRINT_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn possession_proofs_check_only_for_the_key_session_and_machine_they_were_made_for() {
        let mut rng = StdRng::seed_from_u64(11);
        let node = StaticKeypair::generate(&mut rng);
        let coordinator = StaticKeypair::generate(&mut rng);
        let other = StaticKeypair::generate(&mut rng);
        let (session, machine) = ([1u8; 32], [2u8; 32]);
        let proof = node
            .possession_proof(&coordinator.public(), &session, &machine)
            .unwrap();
        assert!(coordinator.check_possession_proof(&node.public(), &session, &machine, &proof));
        // Another key claiming it, another session (a replay), another machine: refused.
        assert!(!coordinator.check_possession_proof(&other.public(), &session, &machine, &proof));
        assert!(!coordinator.check_possession_proof(&node.public(), &[3; 32], &machine, &proof));
        assert!(!coordinator.check_possession_proof(&node.public(), &session, &[4; 32], &proof));
        let mut bad = proof;
        bad[0] ^= 1;
        assert!(!coordinator.check_possession_proof(&node.public(), &session, &machine, &bad));
        // A low-order key proves nothing.
        assert!(!coordinator.check_possession_proof(&[0; 32], &session, &machine, &[0; 32]));
    }

    #[test]
    fn public_key_matches_the_x25519_base_point_multiplication() {
        // RFC 7748 section 6.1, Alice's key pair.
        let sk = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pk = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(StaticKeypair::from_secret(sk).public(), pk);
    }

    #[test]
    fn both_ends_derive_the_same_shared_key_per_label() {
        let mut rng = StdRng::seed_from_u64(7);
        let a = StaticKeypair::generate(&mut rng);
        let b = StaticKeypair::generate(&mut rng);
        let ab = a.shared_key(&b.public(), b"disco").unwrap();
        assert_eq!(ab, b.shared_key(&a.public(), b"disco").unwrap());
        assert_ne!(ab, a.shared_key(&b.public(), b"relay").unwrap());
        let c = StaticKeypair::generate(&mut rng);
        assert_ne!(ab, c.shared_key(&a.public(), b"disco").unwrap());
        // A low-order public key gives no key at all.
        assert!(a.shared_key(&[0u8; 32], b"disco").is_none());
        let mut order8 = [0u8; 32];
        order8[0] = 1;
        assert!(a.shared_key(&order8, b"disco").is_none());
    }

    #[test]
    fn debug_hides_the_secret() {
        let kp = StaticKeypair::generate(&mut StdRng::seed_from_u64(1));
        let dbg = format!("{kp:?}");
        assert!(dbg.contains("<redacted>"));
        let secret_hex: String = kp
            .secret_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!dbg.contains(&secret_hex[..8]));
    }

    #[test]
    fn fingerprint_known_answer() {
        // Computed independently with Python: hashlib.blake2s(b"lattice control-key
        // fingerprint v1" + bytes(32)).hexdigest()[:32]
        assert_eq!(
            hex(&fingerprint(&[0u8; 32])),
            "8dbc5ddd2aa2d0bd032e3bcbf708347b"
        );
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }
}
