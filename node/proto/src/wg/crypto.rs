//! The primitives WireGuard's protocol is built from (whitepaper section 5.4): BLAKE2s as the
//! hash, HMAC-BLAKE2s and the HKDF built on it, keyed BLAKE2s-128 as the MAC, X25519 (aws-lc),
//! ChaCha20-Poly1305 (aws-lc) and XChaCha20-Poly1305 for cookies (RustCrypto).

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{PrivateKey, UnparsedPublicKey, X25519, agree};
use blake2::digest::Mac as _;
use blake2::digest::consts::U16;
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace as _;
use chacha20poly1305::{KeyInit as _, XChaCha20Poly1305, XNonce};
use hmac::SimpleHmac;
use zeroize::Zeroizing;

/// The length of an AEAD tag.
pub(crate) const TAG_LEN: usize = 16;

/// `HASH(a || b || ...)`.
pub(crate) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// `HMAC(key, a || b || ...)` with BLAKE2s.
fn hmac(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut m = <SimpleHmac<Blake2s256> as hmac::Mac>::new_from_slice(key)
        .expect("HMAC takes a key of any length");
    for p in parts {
        hmac::Mac::update(&mut m, p);
    }
    Zeroizing::new(hmac::Mac::finalize(m).into_bytes().into())
}

/// `KDF_n(key, input)`: HKDF with HMAC-BLAKE2s, `N` outputs of 32 bytes (N is 1 to 3).
pub(crate) fn kdf<const N: usize>(key: &[u8; 32], input: &[u8]) -> [Zeroizing<[u8; 32]>; N] {
    let prk = hmac(key, &[input]);
    let mut out: [Zeroizing<[u8; 32]>; N] = std::array::from_fn(|_| Zeroizing::new([0u8; 32]));
    for i in 0..N {
        let counter = [i as u8 + 1];
        out[i] = if i == 0 {
            hmac(&*prk, &[&counter])
        } else {
            let before = *out[i - 1];
            hmac(&*prk, &[&before, &counter])
        };
    }
    out
}

/// `MAC(key, input)`: keyed BLAKE2s with a 16-byte output.
pub(crate) fn mac(key: &[u8], input: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(key)
        .expect("keys of at most 32 bytes");
    blake2::digest::Mac::update(&mut m, input);
    m.finalize().into_bytes().into()
}

/// The AEAD's nonce for `counter`: 32 zero bits, then the counter little-endian.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A ChaCha20-Poly1305 key (one direction of a session, or a handshake step's key).
pub(crate) struct AeadKey(LessSafeKey);

impl AeadKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Self(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"),
        ))
    }

    /// Seals `data` in place and returns its tag.
    pub(crate) fn seal(&self, counter: u64, aad: &[u8], data: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), data)
            .expect("ChaCha20-Poly1305 seals any length a datagram has");
        tag.as_ref().try_into().expect("a 16-byte tag")
    }

    /// Opens `data` (ciphertext then tag) in place; the plaintext's length, or `None` when the
    /// tag is wrong.
    pub(crate) fn open(&self, counter: u64, aad: &[u8], data: &mut [u8]) -> Option<usize> {
        let plain = self
            .0
            .open_in_place(nonce(counter), Aad::from(aad), data)
            .ok()?;
        Some(plain.len())
    }
}

/// `AEAD(key, 0, plain, aad)` into `out` (plain's length plus the tag).
pub(crate) fn seal_to(key: &[u8; 32], aad: &[u8], plain: &[u8], out: &mut [u8]) {
    let (body, tag) = out.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    tag.copy_from_slice(&AeadKey::new(key).seal(0, aad, body));
}

/// Opens `sealed` (with counter 0) into `out`, which is the tag's length shorter; `false` when
/// it does not authenticate.
pub(crate) fn open_to(key: &[u8; 32], aad: &[u8], sealed: &[u8], out: &mut [u8]) -> bool {
    let mut buf = Zeroizing::new(sealed.to_vec());
    match AeadKey::new(key).open(0, aad, &mut buf) {
        Some(n) if n == out.len() => {
            out.copy_from_slice(&buf[..n]);
            true
        }
        _ => false,
    }
}

/// `XAEAD(key, nonce, plain, aad)` for cookie replies.
pub(crate) fn xseal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], plain: &[u8; 16]) -> [u8; 32] {
    let mut buf = [0u8; 32];
    let (body, tag) = buf.split_at_mut(16);
    body.copy_from_slice(plain);
    let t = XChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, body)
        .expect("16 bytes always seal");
    tag.copy_from_slice(&t);
    buf
}

/// Opens a cookie reply's sealed cookie.
pub(crate) fn xopen(
    key: &[u8; 32],
    nonce: &[u8; 24],
    aad: &[u8],
    sealed: &[u8; 32],
) -> Option<[u8; 16]> {
    let mut body = [0u8; 16];
    body.copy_from_slice(&sealed[..16]);
    XChaCha20Poly1305::new(key.into())
        .decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            aad,
            &mut body,
            sealed[16..].into(),
        )
        .ok()?;
    Some(body)
}

/// An X25519 private key, parsed once.
pub(crate) struct StaticKey {
    key: PrivateKey,
    public: [u8; 32],
}

impl StaticKey {
    pub(crate) fn new(private: &[u8; 32]) -> Self {
        let key = PrivateKey::from_private_key(&X25519, private).expect("any 32 bytes are a key");
        let public = key
            .compute_public_key()
            .expect("a key has a public key")
            .as_ref()
            .try_into()
            .expect("32 bytes");
        Self { key, public }
    }

    pub(crate) fn public(&self) -> [u8; 32] {
        self.public
    }

    /// `DH(self, peer)`; `None` for a public key of low order (an all-zero result), which
    /// WireGuard refuses.
    pub(crate) fn dh(&self, peer: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let shared: Zeroizing<[u8; 32]> =
            agree(&self.key, UnparsedPublicKey::new(&X25519, *peer), (), |s| {
                Ok(Zeroizing::new(s.try_into().map_err(|_| ())?))
            })
            .ok()?;
        (shared.iter().any(|b| *b != 0)).then_some(shared)
    }
}
