//! The auth-key text format.
//!
//! `lk1-<fingerprint: 32 hex>-<id: 12 hex>-<secret: 40 hex>`
//!
//! - the fingerprint pins the coordinator's [`ControlKey`](crate::ControlKey): a node that is
//!   handed only this one string can verify it is talking to the right coordinator;
//! - the id lets the coordinator find the key's row without a secret-dependent lookup;
//! - the secret is compared (as a hash, in constant time) by the coordinator, which stores only
//!   its hash.
//!
//! `Debug` never shows the secret; the full text is available only through
//! [`AuthKey::expose_secret`] and serde (the key travels inside the encrypted control channel).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::{parse_hex, push_hex};

/// Length of the coordinator key fingerprint inside an auth key, in bytes.
pub const FINGERPRINT_LEN: usize = 16;
/// Length of the auth key id, in bytes.
pub const ID_LEN: usize = 6;
/// Length of the auth key secret, in bytes.
pub const SECRET_LEN: usize = 20;

const PREFIX: &str = "lk1";

/// A malformed auth key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthKeyParseError {
    /// The key does not have the `lk1-...` shape.
    #[error("auth key must look like lk1-<32 hex>-<12 hex>-<40 hex>")]
    Malformed,
}

/// An auth key as issued by `lattice-coordinator authkey create`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey {
    fingerprint: [u8; FINGERPRINT_LEN],
    id: [u8; ID_LEN],
    secret: [u8; SECRET_LEN],
}

impl AuthKey {
    /// Assembles a key from its parts.
    pub fn new(
        fingerprint: [u8; FINGERPRINT_LEN],
        id: [u8; ID_LEN],
        secret: [u8; SECRET_LEN],
    ) -> Self {
        Self {
            fingerprint,
            id,
            secret,
        }
    }

    /// The pinned coordinator-key fingerprint.
    pub fn fingerprint(&self) -> &[u8; FINGERPRINT_LEN] {
        &self.fingerprint
    }

    /// The key's public id, as stored in the coordinator's database.
    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.id
    }

    /// The key's id in hex, safe to log and show.
    pub fn id_hex(&self) -> String {
        let mut s = String::with_capacity(ID_LEN * 2);
        push_hex(&mut s, &self.id);
        s
    }

    /// The secret bytes.
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// The full text form, secret included. Only for handing the key to a user once.
    pub fn expose_secret(&self) -> String {
        let mut s = String::with_capacity(3 + 3 + 2 * (FINGERPRINT_LEN + ID_LEN + SECRET_LEN));
        s.push_str(PREFIX);
        s.push('-');
        push_hex(&mut s, &self.fingerprint);
        s.push('-');
        push_hex(&mut s, &self.id);
        s.push('-');
        push_hex(&mut s, &self.secret);
        s
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthKey({}-<redacted>)", self.id_hex())
    }
}

impl FromStr for AuthKey {
    type Err = AuthKeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        let (Some(PREFIX), Some(fp), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(AuthKeyParseError::Malformed);
        };
        Ok(Self {
            fingerprint: parse_hex(fp).ok_or(AuthKeyParseError::Malformed)?,
            id: parse_hex(id).ok_or(AuthKeyParseError::Malformed)?,
            secret: parse_hex(secret).ok_or(AuthKeyParseError::Malformed)?,
        })
    }
}

impl Serialize for AuthKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.expose_secret())
    }
}

impl<'de> Deserialize<'de> for AuthKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> AuthKey {
        AuthKey::new([0x11; 16], [0x22; 6], [0x33; 20])
    }

    #[test]
    fn text_form_round_trips() {
        let text = sample().expose_secret();
        assert_eq!(
            text,
            format!(
                "lk1-{}-{}-{}",
                "11".repeat(16),
                "22".repeat(6),
                "33".repeat(20)
            )
        );
        assert_eq!(text.parse::<AuthKey>().unwrap(), sample());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let dbg = format!("{:?}", sample());
        assert_eq!(dbg, "AuthKey(222222222222-<redacted>)");
        assert!(!dbg.contains("3333"));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "lk1",
            "lk2-00-00-00",
            &format!("lk1-{}-{}", "11".repeat(16), "22".repeat(6)),
            &format!(
                "lk1-{}-{}-{}-x",
                "11".repeat(16),
                "22".repeat(6),
                "33".repeat(20)
            ),
            &format!(
                "lk1-{}-{}-{}",
                "1".repeat(32),
                "2".repeat(12),
                "g".repeat(40)
            ),
        ] {
            assert_eq!(
                bad.parse::<AuthKey>(),
                Err(AuthKeyParseError::Malformed),
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_key_round_trips(fp in proptest::array::uniform16(any::<u8>()),
                               id in proptest::array::uniform6(any::<u8>()),
                               secret in proptest::array::uniform20(any::<u8>())) {
            let k = AuthKey::new(fp, id, secret);
            prop_assert_eq!(k.expose_secret().parse::<AuthKey>().unwrap(), k);
        }
    }
}
