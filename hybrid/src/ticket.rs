//! Relay tickets: the coordinator's signed statement that a node key may use the relays
//! until a given time.
//!
//! ```text
//! version 1 [1] | node key [32] | not after, unix seconds, big-endian [8] | Ed25519 signature [64]
//! ```
//!
//! The signature covers a context string and the first 41 bytes. Relays hold only the
//! coordinator's ticket public key. A ticket is a bearer statement about a key; a relay
//! also requires proof that the client holds that key's private half (see the relay
//! protocol), so a ticket seen on the wire is useless to anyone else. Signatures are Ed25519
//! (classical): forging one only buys relay service, never traffic contents, which stay
//! end-to-end encrypted with post-quantum keys.

use crate::sign::Signer;

/// Encoded ticket length.
pub const TICKET_LEN: usize = 1 + 32 + 8 + 64;
const VERSION: u8 = 1;
const CONTEXT: &[u8] = b"lattice relay ticket v1";

/// A verified (or freshly issued) ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The node key it vouches for.
    pub node_key: [u8; 32],
    /// Last second it is valid (Unix time).
    pub not_after: i64,
}

/// Why a ticket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Wrong length or version.
    #[error("malformed relay ticket")]
    Malformed,
    /// The signature does not verify under the coordinator's key.
    #[error("relay ticket not signed by this mesh's coordinator")]
    BadSignature,
    /// It has expired.
    #[error("relay ticket expired")]
    Expired,
}

/// The coordinator's signing half. The seed is zeroed on drop and never printed.
pub struct TicketSigner(Signer);

impl TicketSigner {
    /// The signer for a 32-byte seed (kept in the coordinator's state dir).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(Signer::from_seed(seed))
    }

    /// The seed, for persisting.
    pub fn seed(&self) -> &[u8; 32] {
        self.0.seed()
    }

    /// The public key relays verify with.
    pub fn public(&self) -> [u8; 32] {
        self.0.public()
    }

    /// Signs another statement relays check with the same key (`context` tells it apart
    /// from tickets), such as the list of revoked node keys.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; crate::sign::SIGNATURE_LEN] {
        assert_ne!(
            context, CONTEXT,
            "ticket signatures are made by `issue` only"
        );
        self.0.sign(context, message)
    }

    /// Issues a ticket.
    pub fn issue(&self, t: Ticket) -> [u8; TICKET_LEN] {
        let mut out = [0u8; TICKET_LEN];
        out[0] = VERSION;
        out[1..33].copy_from_slice(&t.node_key);
        out[33..41].copy_from_slice(&t.not_after.to_be_bytes());
        let sig = self.0.sign(CONTEXT, &out[..41]);
        out[41..].copy_from_slice(&sig);
        out
    }
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSigner")
            .field("public", &hex8(&self.public()))
            .field("seed", &"<redacted>")
            .finish()
    }
}

fn hex8(b: &[u8]) -> String {
    b.iter()
        .take(4)
        .map(|x| format!("{x:02x}"))
        .collect::<String>()
        + "…"
}

/// Verifies `bytes` under the coordinator's `public` key at Unix time `now`.
pub fn verify(public: &[u8; 32], bytes: &[u8], now: i64) -> Result<Ticket, TicketError> {
    if bytes.len() != TICKET_LEN || bytes[0] != VERSION {
        return Err(TicketError::Malformed);
    }
    if !crate::sign::verify(public, CONTEXT, &bytes[..41], &bytes[41..]) {
        return Err(TicketError::BadSignature);
    }
    let node_key: [u8; 32] = bytes[1..33]
        .try_into()
        .map_err(|_| TicketError::Malformed)?;
    let not_after = i64::from_be_bytes(
        bytes[33..41]
            .try_into()
            .map_err(|_| TicketError::Malformed)?,
    );
    if now > not_after {
        return Err(TicketError::Expired);
    }
    Ok(Ticket {
        node_key,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tickets_verify_until_they_expire_and_only_under_the_issuer() {
        let s = TicketSigner::from_seed([1; 32]);
        let t = Ticket {
            node_key: [9; 32],
            not_after: 1000,
        };
        let b = s.issue(t);
        assert_eq!(verify(&s.public(), &b, 999), Ok(t));
        assert_eq!(verify(&s.public(), &b, 1000), Ok(t));
        assert_eq!(verify(&s.public(), &b, 1001), Err(TicketError::Expired));
        let other = TicketSigner::from_seed([2; 32]);
        assert_eq!(
            verify(&other.public(), &b, 0),
            Err(TicketError::BadSignature)
        );
        // Any changed byte breaks it: the key, the time, the signature.
        for i in [1, 20, 35, 40, 41, 100] {
            let mut c = b;
            c[i] ^= 0x01;
            assert_eq!(
                verify(&s.public(), &c, 0),
                Err(TicketError::BadSignature),
                "byte {i}"
            );
        }
        assert_eq!(
            verify(&s.public(), &b[..100], 0),
            Err(TicketError::Malformed)
        );
        let mut v2 = b;
        v2[0] = 2;
        assert_eq!(verify(&s.public(), &v2, 0), Err(TicketError::Malformed));
        assert!(!format!("{s:?}").contains("0101"));
    }

    proptest! {
        #[test]
        fn verifying_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..130)) {
            let _ = verify(&[3; 32], &b, 0);
        }
    }
}
