//! WireGuard's handshake, `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` (whitepaper section 5.4.2 to
//! 5.4.5), written out step by step: the initiator's message, the responder's reading of it and
//! its answer, the initiator's reading of the answer, and the transport keys both derive. The
//! ephemeral keys and the timestamp are the caller's (no hidden entropy or clock); mac1 and mac2
//! are written here, checked by [`super::cookie`].

use zeroize::Zeroizing;

use super::crypto::{StaticKey, hash, kdf, mac, open_to, seal_to};
use super::message::{
    self, INITIATION, INITIATION_LEN, RESPONSE, RESPONSE_LEN, initiation, response,
};

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
pub(crate) const LABEL_MAC1: &[u8] = b"mac1----";
pub(crate) const LABEL_COOKIE: &[u8] = b"cookie--";

/// A TAI64N timestamp (12 bytes, big-endian): compared as bytes, later is greater.
pub type Timestamp = [u8; 12];

/// The TAI64N label of `since_epoch` (wall-clock time since 1970), its nanoseconds rounded
/// down to a multiple of 2^24 (about 16.8 ms) as wireguard-go does, so that the timestamp
/// is no fine clock for whoever can read it.
pub fn timestamp(since_epoch: std::time::Duration) -> Timestamp {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(0x4000_0000_0000_000a_u64 + since_epoch.as_secs()).to_be_bytes());
    let nanos = since_epoch.subsec_nanos() & !0x00ff_ffff;
    t[8..].copy_from_slice(&nanos.to_be_bytes());
    t
}

/// The public half of a static key and what each handshake with its owner starts from.
#[derive(Clone)]
pub(crate) struct PublicKeyInfo {
    pub(crate) key: [u8; 32],
    /// `HASH(LABEL_MAC1 || key)`: the mac1 key of messages to its owner.
    pub(crate) mac1_key: [u8; 32],
    /// `HASH(LABEL_COOKIE || key)`: seals the cookies its owner sends.
    pub(crate) cookie_key: [u8; 32],
    /// The handshake hash before the first message to its owner: `HASH(HASH(HASH(C) ||
    /// IDENTIFIER) || key)`.
    hash0: [u8; 32],
}

fn chaining0() -> [u8; 32] {
    hash(&[CONSTRUCTION])
}

impl PublicKeyInfo {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self {
            key,
            mac1_key: hash(&[LABEL_MAC1, &key]),
            cookie_key: hash(&[LABEL_COOKIE, &key]),
            hash0: hash(&[&hash(&[&chaining0(), IDENTIFIER]), &key]),
        }
    }
}

/// This node's static key.
pub struct Identity {
    pub(crate) key: StaticKey,
    pub(crate) public: PublicKeyInfo,
}

impl Identity {
    /// The identity of the X25519 private key `private`.
    pub fn new(private: &[u8; 32]) -> Self {
        let key = StaticKey::new(private);
        let public = PublicKeyInfo::new(key.public());
        Self { key, public }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public.key
    }
}

/// The running state of a handshake: the chaining key and the hash.
struct Noise {
    chaining: Zeroizing<[u8; 32]>,
    hash: [u8; 32],
}

impl Noise {
    fn start(to: &PublicKeyInfo) -> Self {
        Self {
            chaining: Zeroizing::new(chaining0()),
            hash: to.hash0,
        }
    }

    fn mix_hash(&mut self, data: &[u8]) {
        self.hash = hash(&[&self.hash, data]);
    }

    /// `C = KDF1(C, input)`.
    fn mix_chain(&mut self, input: &[u8]) {
        let [c] = kdf::<1>(&self.chaining, input);
        self.chaining = c;
    }

    /// `(C, k) = KDF2(C, input)`: the key for the next sealed field.
    fn mix_key(&mut self, input: &[u8]) -> Zeroizing<[u8; 32]> {
        let [c, k] = kdf::<2>(&self.chaining, input);
        self.chaining = c;
        k
    }

    /// Seals `plain` into `out` with `key` and the hash, then hashes what was sealed.
    fn seal(&mut self, key: &[u8; 32], plain: &[u8], out: &mut [u8]) {
        seal_to(key, &self.hash, plain, out);
        self.mix_hash(out);
    }

    /// Opens `sealed` into `out` with `key` and the hash, then hashes `sealed`.
    fn open(&mut self, key: &[u8; 32], sealed: &[u8], out: &mut [u8]) -> Option<()> {
        open_to(key, &self.hash, sealed, out).then_some(())?;
        self.mix_hash(sealed);
        Some(())
    }

    /// The transport keys: (the initiator's sending key, the responder's sending key).
    fn split(&self) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        let [a, b] = kdf::<2>(&self.chaining, &[]);
        (a, b)
    }
}

/// Writes mac1 (and mac2, with a cookie) of a handshake message whose mac1 starts at `at`.
pub(crate) fn write_macs(
    msg: &mut [u8],
    at: usize,
    to: &PublicKeyInfo,
    cookie: Option<&[u8; 16]>,
) -> [u8; 16] {
    let mac1 = mac(&to.mac1_key, &msg[..at]);
    msg[at..at + 16].copy_from_slice(&mac1);
    let mac2 = cookie.map_or([0; 16], |c| mac(c, &msg[..at + 16]));
    msg[at + 16..at + 32].copy_from_slice(&mac2);
    mac1
}

/// A handshake this node started, waiting for the answer.
pub(crate) struct Initiated {
    pub(crate) sender: u32,
    ephemeral: StaticKey,
    noise: Noise,
    /// The message's mac1, which a cookie reply to it is bound to.
    pub(crate) mac1: [u8; 16],
}

/// Writes an initiation to `peer` into `out`; `None` when the peer's key is of low order.
pub(crate) fn initiate(
    me: &Identity,
    peer: &PublicKeyInfo,
    ephemeral: &[u8; 32],
    sender: u32,
    now: &Timestamp,
    cookie: Option<&[u8; 16]>,
    out: &mut [u8; INITIATION_LEN],
) -> Option<Initiated> {
    let ephemeral = StaticKey::new(ephemeral);
    let mut noise = Noise::start(peer);
    out.fill(0);
    out[0] = INITIATION;
    out[initiation::SENDER..initiation::SENDER + 4].copy_from_slice(&sender.to_le_bytes());
    let e = ephemeral.public();
    out[initiation::EPHEMERAL..initiation::STATIC].copy_from_slice(&e);
    noise.mix_chain(&e);
    noise.mix_hash(&e);
    let k = noise.mix_key(&*ephemeral.dh(&peer.key)?);
    noise.seal(
        &k,
        &me.public.key,
        &mut out[initiation::STATIC..initiation::TIMESTAMP],
    );
    let k = noise.mix_key(&*me.key.dh(&peer.key)?);
    noise.seal(&k, now, &mut out[initiation::TIMESTAMP..initiation::MAC1]);
    let mac1 = write_macs(out, initiation::MAC1, peer, cookie);
    Some(Initiated {
        sender,
        ephemeral,
        noise,
        mac1,
    })
}

/// An initiation this node read: who sent it and what answering it needs.
pub struct Received {
    /// The initiator's static key.
    pub peer: [u8; 32],
    pub(crate) timestamp: Timestamp,
    /// The initiator's index, which our answer and data are addressed to.
    pub(crate) sender: u32,
    ephemeral: [u8; 32],
    noise: Noise,
}

/// Reads an initiation addressed to `me` (its macs are checked elsewhere); `None` when it does
/// not authenticate.
pub(crate) fn consume_initiation(me: &Identity, msg: &[u8]) -> Option<Received> {
    if msg.len() != INITIATION_LEN || msg[0] != INITIATION {
        return None;
    }
    let mut noise = Noise::start(&me.public);
    let e = message::key_at(msg, initiation::EPHEMERAL);
    noise.mix_chain(&e);
    noise.mix_hash(&e);
    let k = noise.mix_key(&*me.key.dh(&e)?);
    let mut peer = [0u8; 32];
    noise.open(
        &k,
        &msg[initiation::STATIC..initiation::TIMESTAMP],
        &mut peer,
    )?;
    let k = noise.mix_key(&*me.key.dh(&peer)?);
    let mut timestamp = [0u8; 12];
    noise.open(
        &k,
        &msg[initiation::TIMESTAMP..initiation::MAC1],
        &mut timestamp,
    )?;
    Some(Received {
        peer,
        timestamp,
        sender: message::u32_at(msg, initiation::SENDER),
        ephemeral: e,
        noise,
    })
}

/// The keys of a finished handshake, one session's worth.
pub(crate) struct Keys {
    pub(crate) send: Zeroizing<[u8; 32]>,
    pub(crate) receive: Zeroizing<[u8; 32]>,
    /// The peer's: our data to it carries it.
    pub(crate) remote_index: u32,
}

/// Answers `received` (from the owner of `to`, whose key the caller checked) into `out` with
/// `psk`; `None` when a key is of low order.
pub(crate) fn respond(
    received: Received,
    to: &PublicKeyInfo,
    psk: &[u8; 32],
    ephemeral: &[u8; 32],
    sender: u32,
    cookie: Option<&[u8; 16]>,
    out: &mut [u8; RESPONSE_LEN],
) -> Option<Keys> {
    let Received {
        peer,
        sender: receiver,
        ephemeral: their_e,
        mut noise,
        ..
    } = received;
    debug_assert_eq!(peer, to.key, "answered for its sender");
    let ephemeral = StaticKey::new(ephemeral);
    out.fill(0);
    out[0] = RESPONSE;
    out[response::SENDER..response::SENDER + 4].copy_from_slice(&sender.to_le_bytes());
    out[response::RECEIVER..response::RECEIVER + 4].copy_from_slice(&receiver.to_le_bytes());
    let e = ephemeral.public();
    out[response::EPHEMERAL..response::EMPTY].copy_from_slice(&e);
    noise.mix_chain(&e);
    noise.mix_hash(&e);
    noise.mix_chain(&*ephemeral.dh(&their_e)?);
    noise.mix_chain(&*ephemeral.dh(&peer)?);
    let [c, tau, k] = kdf::<3>(&noise.chaining, psk);
    noise.chaining = c;
    noise.mix_hash(&*tau);
    noise.seal(&k, &[], &mut out[response::EMPTY..response::MAC1]);
    write_macs(out, response::MAC1, to, cookie);
    let (initiators, responders) = noise.split();
    Some(Keys {
        send: responders,
        receive: initiators,
        remote_index: receiver,
    })
}

/// Reads the answer to `initiated` (its macs are checked elsewhere); `None` when it does not
/// authenticate.
pub(crate) fn consume_response(
    me: &Identity,
    initiated: &Initiated,
    psk: &[u8; 32],
    msg: &[u8],
) -> Option<Keys> {
    if msg.len() != RESPONSE_LEN
        || msg[0] != RESPONSE
        || message::u32_at(msg, response::RECEIVER) != initiated.sender
    {
        return None;
    }
    let mut noise = Noise {
        chaining: initiated.noise.chaining.clone(),
        hash: initiated.noise.hash,
    };
    let e = message::key_at(msg, response::EPHEMERAL);
    noise.mix_chain(&e);
    noise.mix_hash(&e);
    noise.mix_chain(&*initiated.ephemeral.dh(&e)?);
    noise.mix_chain(&*me.key.dh(&e)?);
    let [c, tau, k] = kdf::<3>(&noise.chaining, psk);
    noise.chaining = c;
    noise.mix_hash(&*tau);
    noise.open(&k, &msg[response::EMPTY..response::MAC1], &mut [0u8; 0])?;
    let (initiators, responders) = noise.split();
    Some(Keys {
        send: initiators,
        receive: responders,
        remote_index: message::u32_at(msg, response::SENDER),
    })
}
