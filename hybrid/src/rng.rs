//! Feeding caller-provided randomness to snow.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

use zeroize::Zeroizing;

use crate::erasing::ErasingRng;
use crate::x25519::{AwsX25519, StaticDhCache};

/// A snow resolver whose RNG is seeded by the caller (an [`ErasingRng`], so the handshake's
/// ephemeral keys cannot be drawn again from what it leaves in memory) and whose X25519 is
/// [`AwsX25519`];
/// hashing and the AEAD are snow's defaults (RustCrypto; they process a few kilobytes per
/// handshake).
pub(crate) struct SeededResolver {
    seed: Zeroizing<[u8; 32]>,
    static_cache: Option<Arc<StaticDhCache>>,
}

impl SeededResolver {
    pub(crate) fn new(rng: &mut impl Rng, static_cache: Option<Arc<StaticDhCache>>) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *seed);
        Self { seed, static_cache }
    }
}

struct SnowRng(ErasingRng);

impl Random for SnowRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SnowRng(ErasingRng::from_seed(*self.seed))))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(AwsX25519::new(self.static_cache.clone()))),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}
