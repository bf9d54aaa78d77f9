//! X25519 for snow, backed by aws-lc (its assembly field arithmetic runs a Diffie-Hellman in
//! about a third of the time of the portable implementations), with two additions:
//!
//! - a Diffie-Hellman whose result is all zeros (a low-order public key, known to everyone)
//!   fails, so the handshake fails instead of proceeding with a public secret;
//! - the static-static result (`ss` in Noise IK) is cached per peer key, as WireGuard
//!   precomputes it: it never changes, and it is one of the four Diffie-Hellmans per side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_lc_rs::agreement::{PrivateKey, UnparsedPublicKey, X25519, agree};
use snow::types::{Dh, Random};
use zeroize::Zeroizing;

/// Most cached static-static results per local key (a mesh rarely has more peers).
const CACHE_MAX: usize = 16_384;

/// The parsed form of one local static key and its cached static-static results.
pub(crate) struct StaticDhCache {
    owner_private: Zeroizing<[u8; 32]>,
    owner: [u8; 32],
    key: Arc<PrivateKey>,
    entries: Mutex<HashMap<[u8; 32], Zeroizing<[u8; 32]>>>,
}

impl StaticDhCache {
    pub(crate) fn new(private: &[u8; 32]) -> Option<Self> {
        let key = PrivateKey::from_private_key(&X25519, private).ok()?;
        let owner = key.compute_public_key().ok()?.as_ref().try_into().ok()?;
        Some(Self {
            owner_private: Zeroizing::new(*private),
            owner,
            key: Arc::new(key),
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// The public key.
    pub(crate) fn public(&self) -> [u8; 32] {
        self.owner
    }

    /// The static-static Diffie-Hellman with `peer` (cached); `None` for a low-order key.
    pub(crate) fn static_static(&self, peer: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        if let Some(hit) = self.get(peer) {
            return Some(hit);
        }
        let shared: Zeroizing<[u8; 32]> = agree(
            self.key.as_ref(),
            UnparsedPublicKey::new(&X25519, *peer),
            (),
            |s| {
                let arr: [u8; 32] = s.try_into().map_err(|_| ())?;
                Ok(Zeroizing::new(arr))
            },
        )
        .ok()?;
        if shared.iter().all(|b| *b == 0) {
            return None;
        }
        self.insert(*peer, &shared);
        Some(shared)
    }

    fn get(&self, peer: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        self.entries.lock().ok()?.get(peer).cloned()
    }

    fn insert(&self, peer: [u8; 32], shared: &[u8; 32]) {
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= CACHE_MAX {
                m.clear();
            }
            m.insert(peer, Zeroizing::new(*shared));
        }
    }
}

/// X25519 for snow. See the module docs.
pub(crate) struct AwsX25519 {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    key: Option<Arc<PrivateKey>>,
    cache: Option<Arc<StaticDhCache>>,
    use_cache: bool,
}

impl AwsX25519 {
    pub(crate) fn new(cache: Option<Arc<StaticDhCache>>) -> Self {
        Self {
            private: Zeroizing::new([0; 32]),
            public: [0; 32],
            key: None,
            cache,
            use_cache: false,
        }
    }
}

impl Dh for AwsX25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        let n = privkey.len().min(32);
        zeroize::Zeroize::zeroize(&mut *self.private);
        self.private[..n].copy_from_slice(&privkey[..n]);
        // The local static key: reuse its parsed form instead of deriving it again.
        if let Some(c) = &self.cache
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                &self.private[..],
                &c.owner_private[..],
            ))
        {
            self.key = Some(Arc::clone(&c.key));
            self.public = c.owner;
            self.use_cache = true;
            return;
        }
        self.use_cache = false;
        self.key = PrivateKey::from_private_key(&X25519, self.private.as_slice())
            .ok()
            .map(Arc::new);
        self.public = self
            .key
            .as_ref()
            .and_then(|k| k.compute_public_key().ok())
            .and_then(|p| p.as_ref().try_into().ok())
            .unwrap_or([0; 32]);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(k.as_mut())?;
        self.set(k.as_slice());
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        self.private.as_slice()
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: [u8; 32] = pubkey
            .get(..32)
            .and_then(|p| p.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let cache = self.cache.as_ref().filter(|_| self.use_cache);
        if let Some(hit) = cache.and_then(|c| c.get(&peer)) {
            out.get_mut(..32)
                .ok_or(snow::Error::Dh)?
                .copy_from_slice(hit.as_slice());
            return Ok(());
        }
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?;
        let shared: Zeroizing<[u8; 32]> = agree(
            key.as_ref(),
            UnparsedPublicKey::new(&X25519, peer),
            snow::Error::Dh,
            |s| {
                let arr: [u8; 32] = s.try_into().map_err(|_| snow::Error::Dh)?;
                Ok(Zeroizing::new(arr))
            },
        )?;
        // aws-lc refuses low-order points; belt and braces for an all-zero result.
        if shared.iter().all(|b| *b == 0) {
            return Err(snow::Error::Dh);
        }
        if let Some(c) = cache {
            c.insert(peer, &shared);
        }
        out.get_mut(..32)
            .ok_or(snow::Error::Dh)?
            .copy_from_slice(shared.as_slice());
        Ok(())
    }
}
