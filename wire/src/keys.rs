//! Typed public keys.
//!
//! Every key is 32 bytes (X25519). The text form is `<prefix>:<64 hex digits>` and is what serde
//! reads and writes; `Display` shows a short fingerprint (`nodekey:1a2b3c4d…`) that is safe and
//! compact in logs. Private keys never live in this crate: they are not part of any message.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A malformed key in text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text did not start with the expected `prefix:`.
    #[error("expected a key starting with `{expected}:`")]
    WrongPrefix {
        /// The prefix that was expected.
        expected: &'static str,
    },
    /// The hex part was not 64 hex digits.
    #[error("expected 64 hex digits after `{prefix}:`")]
    BadHex {
        /// The key's prefix.
        prefix: &'static str,
    },
}

/// A key's first eight bytes as a big-endian word (so words order as the bytes do).
#[inline]
fn word(key: &[u8; 32]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&key[..8]);
    u64::from_be_bytes(w)
}

macro_rules! public_key {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name([u8; 32]);

        impl Ord for $name {
            /// The bytes' order, the first eight compared as one word: keys are random, so
            /// that word nearly always decides, without a call to `memcmp` (maps of peers by
            /// key compare keys many times per data packet).
            #[inline]
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                match word(&self.0).cmp(&word(&other.0)) {
                    std::cmp::Ordering::Equal => self.0[8..].cmp(&other.0[8..]),
                    decided => decided,
                }
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl $name {
            /// The text prefix of this key type.
            pub const PREFIX: &'static str = $prefix;

            /// Wraps raw key bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The full text form, `prefix:<64 hex>`.
            pub fn to_text(&self) -> String {
                let mut s = String::with_capacity(Self::PREFIX.len() + 65);
                s.push_str(Self::PREFIX);
                s.push(':');
                push_hex(&mut s, &self.0);
                s
            }

            /// A short form for humans and logs: `prefix:<first 8 hex>`.
            pub fn short(&self) -> String {
                let mut s = String::with_capacity(Self::PREFIX.len() + 9);
                s.push_str(Self::PREFIX);
                s.push(':');
                push_hex(&mut s, &self.0[..4]);
                s
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.short())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.short())
            }
        }

        impl FromStr for $name {
            type Err = KeyParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let rest = s
                    .strip_prefix(Self::PREFIX)
                    .and_then(|r| r.strip_prefix(':'))
                    .ok_or(KeyParseError::WrongPrefix { expected: Self::PREFIX })?;
                parse_hex32(rest)
                    .map(Self)
                    .ok_or(KeyParseError::BadHex { prefix: Self::PREFIX })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_text())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

public_key!(
    /// A node's WireGuard static public key: what peers put in their tunnel configuration.
    NodeKey,
    "nodekey"
);
public_key!(
    /// A node's machine key: the static key it proves on every control connection. The
    /// coordinator identifies the node by this key and nothing else.
    MachineKey,
    "mkey"
);
public_key!(
    /// The coordinator's static Noise key, pinned by nodes through the fingerprint in the
    /// auth key.
    ControlKey,
    "controlkey"
);

public_key!(
    /// A relay's static X25519 key: nodes check the relay's proof of it, and prove their own
    /// node key to it, when they connect.
    RelayKey,
    "relaykey"
);
public_key!(
    /// The coordinator's Ed25519 key that signs relay tickets; standalone relays are started
    /// with it (`lattice-relay serve --coordinator-key`).
    TicketKey,
    "ticketkey"
);

/// Appends lowercase hex of `bytes` to `s`.
pub fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// Parses exactly `N` bytes of hex (either case). `None` on any other input.
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0])?;
        let lo = hex_digit(pair[1])?;
        out[i] = (hi << 4) | lo;
    }
    Some(out)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    parse_hex::<32>(s)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_form_round_trips() {
        let k = NodeKey::from_bytes([0xab; 32]);
        let text = k.to_text();
        assert_eq!(text, format!("nodekey:{}", "ab".repeat(32)));
        assert_eq!(text.parse::<NodeKey>().unwrap(), k);
        assert_eq!(k.to_string(), "nodekey:abababab");
    }

    #[test]
    fn can_deserialize_node_key_from_literal_json() {
        let json = format!("\"nodekey:{}\"", "01".repeat(32));
        let k: NodeKey = serde_json::from_str(&json).unwrap();
        assert_eq!(k.as_bytes(), &[1u8; 32]);
    }

    #[test]
    fn wrong_prefix_and_bad_hex_are_rejected() {
        let mk = format!("mkey:{}", "00".repeat(32));
        assert_eq!(
            mk.parse::<NodeKey>(),
            Err(KeyParseError::WrongPrefix {
                expected: "nodekey"
            })
        );
        assert_eq!(
            "nodekey:zz".parse::<NodeKey>(),
            Err(KeyParseError::BadHex { prefix: "nodekey" })
        );
        let short = format!("nodekey:{}", "00".repeat(31));
        assert!(short.parse::<NodeKey>().is_err());
        let json = format!("\"controlkey:{}\"", "00".repeat(32));
        assert!(serde_json::from_str::<NodeKey>(&json).is_err());
    }

    proptest! {
        #[test]
        fn any_key_round_trips_through_json(bytes in proptest::array::uniform32(any::<u8>())) {
            let k = MachineKey::from_bytes(bytes);
            let json = serde_json::to_string(&k).unwrap();
            prop_assert_eq!(serde_json::from_str::<MachineKey>(&json).unwrap(), k);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,80}") {
            let _ = s.parse::<NodeKey>();
            let _ = parse_hex::<4>(&s);
        }

        /// Keys order as their bytes do (the word comparison agrees with the bytes'),
        /// including keys that share a long prefix and equal keys.
        #[test]
        fn keys_order_as_their_bytes(
            a in proptest::array::uniform32(any::<u8>()),
            b in proptest::array::uniform32(any::<u8>()),
            shared in 0usize..=32,
        ) {
            let mut b = b;
            b[..shared].copy_from_slice(&a[..shared]);
            let (ka, kb) = (NodeKey::from_bytes(a), NodeKey::from_bytes(b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(kb.cmp(&ka), b.cmp(&a));
            prop_assert_eq!(ka.partial_cmp(&kb), Some(a.cmp(&b)));
        }
    }
}
