//! Hybrid post-quantum Noise handshake, sans-IO.
//!
//! One construction serves both places Lattice needs a key exchange:
//!
//! - the node <-> coordinator control channel ([`Purpose::Control`]), whose transport keys are
//!   replaced by hybrid keys after the handshake ([`Completed::into_channel`]);
//! - the per-peer WireGuard preshared key ([`Purpose::PeerPsk`], [`Completed::peer_psk`]).
//!
//! The handshake is `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` (snow). The initiator's first
//! payload carries an ephemeral ML-KEM-768 encapsulation key; the responder's payload carries
//! the ciphertext. Both sides then derive keys with [`kdf`] from the Noise handshake hash and the
//! ML-KEM shared secret. An attacker must break both X25519 and ML-KEM-768 to learn them.
//! Authentication is classical (the X25519 static keys), as in Rosenpass-less WireGuard.
//!
//! No I/O and no hidden entropy: every function that needs randomness takes an RNG.
#![warn(missing_docs)]

mod channel;
pub mod erasing;
mod handshake;
mod kdf;
mod keys;
mod rng;
pub mod seal;
pub mod sign;
pub mod ticket;
mod x25519;

pub use channel::{Channel, ChannelError, MAX_MESSAGE_LEN};
pub use erasing::ErasingRng;
pub use handshake::{
    CIPHERTEXT_LEN, Completed, ENCAPSULATION_KEY_LEN, HandshakeError, Initiation,
    InitiatorHandshake, NOISE_PARAMS, Purpose, ResponderHandshake,
};
pub use kdf::{Psk, kdf, mac};
pub use keys::{FINGERPRINT_LEN, StaticKeypair, fingerprint};
