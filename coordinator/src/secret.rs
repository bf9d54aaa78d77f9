//! Secrets the coordinator hands out (auth keys, admin tokens): generation and hashing.
//! Only hashes are stored, and they are compared in constant time.

use blake2::{Blake2s256, Digest};
use rand::Rng;
use subtle::ConstantTimeEq;

/// Hash of an auth-key secret as stored in `auth_keys.secret_hash`.
pub fn auth_key_hash(id: &[u8], secret: &[u8]) -> [u8; 32] {
    hash(b"lattice auth-key v1", id, secret)
}

/// Hash of an admin-token secret as stored in `admin_tokens.secret_hash`.
pub fn admin_token_hash(id: &[u8], secret: &[u8]) -> [u8; 32] {
    hash(b"lattice admin-token v1", id, secret)
}

/// Constant-time comparison of a computed hash with a stored one.
pub fn hash_matches(computed: &[u8; 32], stored: &[u8]) -> bool {
    stored.len() == 32 && bool::from(computed.ct_eq(stored))
}

/// A secret the coordinator holds (the OpenID Connect client secret): wiped when dropped,
/// never shown by `Debug`.
#[derive(Clone)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: String) -> Self {
        Self(zeroize::Zeroizing::new(s))
    }

    /// The secret itself, to send where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Fresh random bytes for an id or secret.
pub fn random<const N: usize>(rng: &mut impl Rng) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill_bytes(&mut out);
    out
}

fn hash(label: &[u8], id: &[u8], secret: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(label);
    h.update([u8::try_from(id.len()).unwrap_or(u8::MAX)]);
    h.update(id);
    h.update(secret);
    h.finalize().into()
}

/// An admin token: `lt2-<id: 12 hex>-<secret: 40 hex>-<pin: 64 hex>`. The pin is the SHA-256
/// of the admin listener's TLS certificate, so the one string is enough to reach the admin
/// API safely (as an auth key is enough to trust the coordinator). Older `lt1-` tokens have no
/// pin.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// Public id.
    pub id: [u8; 6],
    /// Secret part.
    pub secret: [u8; 20],
    /// The admin listener's certificate pin (public).
    pub pin: Option<[u8; 32]>,
}

impl AdminToken {
    /// Parses the text form.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
        let pin = match (version, parts.next(), parts.next()) {
            ("lt1", None, None) => None,
            ("lt2", Some(pin), None) => Some(wire::keys::parse_hex(pin)?),
            _ => return None,
        };
        Some(Self {
            id: wire::keys::parse_hex(id)?,
            secret: wire::keys::parse_hex(secret)?,
            pin,
        })
    }

    /// The id as hex.
    pub fn id_hex(&self) -> String {
        let mut s = String::new();
        wire::keys::push_hex(&mut s, &self.id);
        s
    }

    /// The full text form, secret included.
    pub fn expose_secret(&self) -> String {
        let version = if self.pin.is_some() { "lt2" } else { "lt1" };
        let mut s = format!("{version}-{}-", self.id_hex());
        wire::keys::push_hex(&mut s, &self.secret);
        if let Some(pin) = &self.pin {
            s.push('-');
            wire::keys::push_hex(&mut s, pin);
        }
        s
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminToken({}-<redacted>)", self.id_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_domain_separated_and_compare_in_constant_time() {
        let a = auth_key_hash(b"id", b"secret");
        let t = admin_token_hash(b"id", b"secret");
        assert_ne!(a, t);
        assert!(hash_matches(&a, &a));
        assert!(!hash_matches(&a, &t));
        assert!(!hash_matches(&a, &a[..31]));
    }

    #[test]
    fn admin_token_round_trips_and_hides_secret() {
        let t = AdminToken {
            id: [1; 6],
            secret: [2; 20],
            pin: Some([3; 32]),
        };
        let text = t.expose_secret();
        assert!(text.starts_with("lt2-010101010101-"));
        assert_eq!(AdminToken::parse(&text), Some(t.clone()));
        assert!(!format!("{t:?}").contains("0202"));
        assert_eq!(AdminToken::parse("lt1-zz-00"), None);
        let old = AdminToken { pin: None, ..t };
        assert_eq!(AdminToken::parse(&old.expose_secret()), Some(old));
        assert_eq!(AdminToken::parse(&format!("{text}-extra")), None);
    }
}
