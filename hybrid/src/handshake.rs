//! The two-message hybrid handshake.
//!
//! ```text
//! initiator                                         responder
//!   InitiatorHandshake::start  -- msg1: e, es, s, ss, {ek, payload} -->
//!                                                    ResponderHandshake::read_initiation
//!                                                    (caller checks the initiator's static key,
//!                                                     picks the psk, then) respond
//!   finish  <-- msg2: e, ee, se, psk, {ct, payload} --
//! ```
//!
//! `ek` is a fresh ML-KEM-768 encapsulation key (1184 bytes) and `ct` its ciphertext (1088
//! bytes). Both messages are authenticated by Noise, so tampering with any byte fails the
//! handshake. ML-KEM decapsulation never fails on its own (implicit rejection): a forged
//! ciphertext yields a key nobody else has, and the Noise layer has already rejected it.

use libcrux_ml_kem::mlkem768::{self, MlKem768Ciphertext, MlKem768PrivateKey, MlKem768PublicKey};
use rand::{CryptoRng, Rng};
use zeroize::Zeroizing;

use crate::channel::Channel;
use crate::kdf::{Psk, kdf};
use crate::keys::StaticKeypair;
use crate::rng::SeededResolver;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Size of an ML-KEM-768 encapsulation key.
pub const ENCAPSULATION_KEY_LEN: usize = 1184;
/// Size of an ML-KEM-768 ciphertext.
pub const CIPHERTEXT_LEN: usize = 1088;
/// Largest Noise message.
const MAX_NOISE_MESSAGE: usize = 65535;

/// What a handshake is for; used as the Noise prologue and the KDF label, so a message made
/// for one purpose is useless for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Node <-> coordinator control channel.
    Control,
    /// Per-peer WireGuard preshared key.
    PeerPsk,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Control => b"lattice control v1",
            Self::PeerPsk => b"lattice peer-psk v1",
        }
    }
}

/// Why a handshake failed. Deliberately coarse: a peer learns nothing from which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// A message failed authentication or decryption (tampered, wrong key, wrong psk).
    #[error("handshake message failed authentication")]
    Authentication,
    /// A message is too short, too long or has a malformed ML-KEM field.
    #[error("malformed handshake message")]
    Malformed,
    /// The remote static key is a low-order point or otherwise unusable.
    #[error("unusable remote static key")]
    BadRemoteKey,
    /// The payload is too large to fit in a Noise message.
    #[error("handshake payload too large")]
    PayloadTooLarge,
}

/// An ML-KEM-768 decapsulation key that is zeroed when dropped.
struct DecapsulationKey(MlKem768PrivateKey);

impl Drop for DecapsulationKey {
    fn drop(&mut self) {
        let n = MlKem768PrivateKey::len();
        // `zeroize` uses volatile writes, which the compiler may not elide as dead stores.
        zeroize::Zeroize::zeroize(&mut self.0[0..n]);
    }
}

/// The initiator side, waiting for the response.
pub struct InitiatorHandshake {
    noise: snow::HandshakeState,
    dk: DecapsulationKey,
    purpose: Purpose,
}

impl InitiatorHandshake {
    /// Starts a handshake towards `remote_static`, returning the state and message 1.
    ///
    /// `psk` is the previous key of the chain (zero for a fresh chain); the responder must use
    /// the same one or the handshake fails.
    pub fn start(
        rng: &mut impl CryptoRng,
        purpose: Purpose,
        local: &StaticKeypair,
        remote_static: &[u8; 32],
        psk: &Psk,
        payload: &[u8],
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut noise = builder(rng, purpose, local)
            .local_private_key(local.secret_bytes())
            .and_then(|b| b.remote_public_key(remote_static))
            .and_then(|b| b.psk(2, psk.as_bytes()))
            .and_then(|b| b.build_initiator())
            .map_err(|_| HandshakeError::BadRemoteKey)?;
        let mut seed = Zeroizing::new([0u8; 64]);
        rng.fill_bytes(seed.as_mut());
        let (sk, pk) = mlkem768::generate_key_pair(*seed).into_parts();
        let dk = DecapsulationKey(sk);
        let msg = write(&mut noise, &[pk.as_slice(), payload])?;
        Ok((Self { noise, dk, purpose }, msg))
    }

    /// Reads message 2 and completes the handshake.
    pub fn finish(self, msg2: &[u8]) -> Result<Completed, HandshakeError> {
        self.finish_or_keep(msg2).map_err(|(_, e)| e)
    }

    /// Like [`Self::finish`], but a message 2 that does not authenticate (forged, tampered,
    /// or meant for another exchange) leaves the handshake usable: it comes back with the
    /// error, so the genuine answer can still complete it (as WireGuard ignores packets that
    /// do not authenticate). A message that authenticates but is malformed ends it (`None`).
    pub fn finish_or_keep(
        mut self,
        msg2: &[u8],
    ) -> Result<Completed, (Option<Box<Self>>, HandshakeError)> {
        // snow restores its symmetric state when a message fails to decrypt, so a failed read
        // changes nothing the next read depends on.
        let plain = match read(&mut self.noise, msg2) {
            Ok(p) => p,
            Err(e) => return Err((Some(Box::new(self)), e)),
        };
        self.complete(&plain).map_err(|e| (None, e))
    }

    fn complete(self, plain: &[u8]) -> Result<Completed, HandshakeError> {
        if plain.len() < CIPHERTEXT_LEN {
            return Err(HandshakeError::Malformed);
        }
        let ct = MlKem768Ciphertext::try_from(&plain[..CIPHERTEXT_LEN])
            .map_err(|_| HandshakeError::Malformed)?;
        let kem_secret = Zeroizing::new(mlkem768::decapsulate(&self.dk.0, &ct));
        Completed::new(
            self.noise,
            kem_secret,
            plain[CIPHERTEXT_LEN..].to_vec(),
            self.purpose,
        )
    }
}

/// What the responder learned from message 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiation {
    /// The initiator's static public key, authenticated by the handshake.
    pub remote_static: [u8; 32],
    /// The initiator's application payload.
    pub payload: Vec<u8>,
}

/// The responder side, between reading message 1 and writing message 2.
pub struct ResponderHandshake {
    noise: snow::HandshakeState,
    ek: MlKem768PublicKey,
    purpose: Purpose,
}

impl ResponderHandshake {
    /// Reads message 1. The caller decides from [`Initiation::remote_static`] (and the payload)
    /// whether to answer, and with which psk.
    pub fn read_initiation(
        rng: &mut impl CryptoRng,
        purpose: Purpose,
        local: &StaticKeypair,
        msg1: &[u8],
    ) -> Result<(Self, Initiation), HandshakeError> {
        let mut noise = builder(rng, purpose, local)
            .local_private_key(local.secret_bytes())
            .and_then(|b| b.psk(2, &[0u8; 32]))
            .and_then(|b| b.build_responder())
            .map_err(|_| HandshakeError::Malformed)?;
        let plain = read(&mut noise, msg1)?;
        if plain.len() < ENCAPSULATION_KEY_LEN {
            return Err(HandshakeError::Malformed);
        }
        let ek = MlKem768PublicKey::try_from(&plain[..ENCAPSULATION_KEY_LEN])
            .map_err(|_| HandshakeError::Malformed)?;
        // FIPS 203 input check: the key's coefficients must be reduced.
        if !mlkem768::validate_public_key(&ek) {
            return Err(HandshakeError::Malformed);
        }
        let remote: [u8; 32] = noise
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or(HandshakeError::Malformed)?;
        let initiation = Initiation {
            remote_static: remote,
            payload: plain[ENCAPSULATION_KEY_LEN..].to_vec(),
        };
        Ok((Self { noise, ek, purpose }, initiation))
    }

    /// Writes message 2 with `psk` (the previous key of the chain) and completes.
    pub fn respond(
        mut self,
        rng: &mut impl CryptoRng,
        psk: &Psk,
        payload: &[u8],
    ) -> Result<(Vec<u8>, Completed), HandshakeError> {
        self.noise
            .set_psk(2, psk.as_bytes())
            .map_err(|_| HandshakeError::Malformed)?;
        let mut randomness = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(randomness.as_mut());
        let (ct, ss) = mlkem768::encapsulate(&self.ek, *randomness);
        let kem_secret = Zeroizing::new(ss);
        let msg = write(&mut self.noise, &[ct.as_slice(), payload])?;
        let completed = Completed::new(self.noise, kem_secret, Vec::new(), self.purpose)?;
        Ok((msg, completed))
    }
}

/// A finished handshake.
pub struct Completed {
    purpose: Purpose,
    handshake_hash: [u8; 32],
    kem_secret: Zeroizing<[u8; 32]>,
    remote_static: [u8; 32],
    payload: Vec<u8>,
    transport: snow::TransportState,
}

impl Completed {
    fn new(
        noise: snow::HandshakeState,
        kem_secret: Zeroizing<[u8; 32]>,
        payload: Vec<u8>,
        purpose: Purpose,
    ) -> Result<Self, HandshakeError> {
        let handshake_hash: [u8; 32] = noise
            .get_handshake_hash()
            .try_into()
            .map_err(|_| HandshakeError::Malformed)?;
        let remote_static: [u8; 32] = noise
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or(HandshakeError::Malformed)?;
        let transport = noise
            .into_transport_mode()
            .map_err(|_| HandshakeError::Malformed)?;
        Ok(Self {
            purpose,
            handshake_hash,
            kem_secret,
            remote_static,
            payload,
            transport,
        })
    }

    /// The other side's static public key.
    pub fn remote_static(&self) -> &[u8; 32] {
        &self.remote_static
    }

    /// The responder's payload (on the initiator side; empty on the responder side, which got
    /// the initiator's payload from [`Initiation`]).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The Noise handshake hash (public; binds the whole transcript).
    pub fn handshake_hash(&self) -> &[u8; 32] {
        &self.handshake_hash
    }

    /// The next preshared key of a peer chain: `KDF(label, handshake hash, ML-KEM secret)`
    /// salted with the previous key.
    pub fn peer_psk(&self, previous: &Psk) -> Psk {
        debug_assert_eq!(self.purpose, Purpose::PeerPsk);
        kdf(
            self.purpose.label(),
            &self.handshake_hash,
            &self.kem_secret,
            previous,
        )
        .0
    }

    /// Turns a control handshake into an encrypted channel whose keys are hybrid: Noise's own
    /// transport keys are replaced by `KDF(label, handshake hash, ML-KEM secret)`.
    pub fn into_channel(mut self) -> Channel {
        let (i2r, r2i) = kdf(
            self.purpose.label(),
            &self.handshake_hash,
            &self.kem_secret,
            &Psk::zero(),
        );
        self.transport
            .rekey_manually(Some(i2r.as_bytes()), Some(r2i.as_bytes()));
        Channel::new(self.transport)
    }
}

fn builder(rng: &mut impl Rng, purpose: Purpose, local: &StaticKeypair) -> snow::Builder<'static> {
    let params = NOISE_PARAMS.parse().expect("the protocol name is valid");
    let resolver = SeededResolver::new(rng, Some(local.cache()));
    snow::Builder::with_resolver(params, Box::new(resolver))
        .prologue(purpose.label())
        .expect("a prologue is set once")
}

/// Noise overhead of our messages: an ephemeral key, an encrypted static key and two tags.
const NOISE_OVERHEAD: usize = 32 + 48 + 16;

fn write(noise: &mut snow::HandshakeState, parts: &[&[u8]]) -> Result<Vec<u8>, HandshakeError> {
    let plain: Vec<u8> = parts.concat();
    if plain.len() + NOISE_OVERHEAD > MAX_NOISE_MESSAGE {
        return Err(HandshakeError::PayloadTooLarge);
    }
    let mut out = vec![0u8; plain.len() + NOISE_OVERHEAD];
    let n = noise.write_message(&plain, &mut out).map_err(|e| match e {
        snow::Error::Dh => HandshakeError::BadRemoteKey,
        _ => HandshakeError::PayloadTooLarge,
    })?;
    out.truncate(n);
    Ok(out)
}

fn read(noise: &mut snow::HandshakeState, msg: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    if msg.len() > MAX_NOISE_MESSAGE {
        return Err(HandshakeError::Malformed);
    }
    let mut plain = vec![0u8; msg.len()];
    let n = noise.read_message(msg, &mut plain).map_err(|e| match e {
        snow::Error::Dh => HandshakeError::BadRemoteKey,
        _ => HandshakeError::Authentication,
    })?;
    plain.truncate(n);
    Ok(plain)
}

#[cfg(test)]
mod tests;
