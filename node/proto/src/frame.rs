//! Lattice's own frames on the shared UDP port (after [`FRAME_MAGIC`]) that carry the
//! post-quantum handshake, its cookies, and reassembly of messages that span two frames.
//!
//! ```text
//! magic "LTC\x01" | kind u8 | body
//! kind 1, 2 (PQ message 1, 2): session u32 | chunk index u8 | chunk count u8 | bytes | mac1 [16] | mac2 [16]
//! kind 4    (cookie reply):    session u32 | chunk index u8 | sealed(cookie [16])
//! ```
//!
//! Every handshake chunk carries two MACs, as WireGuard's handshake messages do:
//!
//! - `mac1` is keyed by a hash of the *receiver's* public key over everything before it. It
//!   costs one keyed hash to check and proves nothing but that the sender knows whom it talks
//!   to, so a stranger scanning the internet cannot make a node reassemble, decrypt or answer
//!   anything (WireGuard's "mac1").
//! - `mac2` is keyed by a *cookie*: a MAC of the sender's address under a secret of the
//!   receiver's that changes every two minutes. A node under load (or a source over its
//!   budget) answers chunks without a valid `mac2` with a cookie reply instead of processing
//!   them; only a sender that receives at its address can read the reply, so spoofed floods
//!   cannot exhaust the budgets of real sources. The reply is sealed under a key from the
//!   receiver's public key, with the `mac1` it answers as associated data, so nobody who did
//!   not see that chunk can forge one.
//!
//! Chunks are at most [`MAX_CHUNK`] bytes, so no frame comes near a 1280-byte path MTU and no
//! datagram is ever fragmented by IP. Nudges, key confirmations and path discovery travel as
//! sealed disco messages ([`crate::disco`]), which name their sender.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use subtle::ConstantTimeEq;
use wire::NodeKey;

use crate::addr::Addr;
use crate::magicsock::FRAME_MAGIC;

/// Largest handshake bytes in one frame.
pub const MAX_CHUNK: usize = 1000;
/// Length of `mac1` and `mac2`.
pub const MAC_LEN: usize = 16;
/// Most chunks one message may have.
const MAX_CHUNKS: u8 = 4;
/// Reassemblies kept at once.
const MAX_PARTIAL: usize = 64;
/// Reassemblies one source may have open; a flood from one source evicts only its own.
pub const MAX_PARTIAL_PER_SOURCE: usize = 4;
/// A reassembly older than this is dropped.
const PARTIAL_TTL: Duration = Duration::from_secs(5);
/// Header bytes of a chunk frame (magic, kind, session, index, count).
const CHUNK_HEADER: usize = 4 + 1 + 4 + 1 + 1;
/// A cookie secret lasts this long (WireGuard's two minutes).
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// A sender uses a cookie it received for at most this long.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(110);

/// Handshake frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Post-quantum handshake message 1.
    PqInit,
    /// Post-quantum handshake message 2.
    PqResp,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Self::PqInit => 1,
            Self::PqResp => 2,
        }
    }
}

const KIND_COOKIE: u8 = 4;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One chunk of a handshake message.
    Chunk(Chunk<'a>),
    /// A cookie reply to chunk `index` of the message with `session`.
    Cookie {
        /// The session of the message it answers.
        session: u32,
        /// The chunk it answers.
        index: u8,
        /// The sealed cookie.
        sealed: &'a [u8],
    },
}

/// One chunk of a handshake message, with its MACs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Message 1 or 2.
    pub kind: Kind,
    /// The initiator's session id.
    pub session: u32,
    /// Position of this chunk.
    pub index: u8,
    /// Number of chunks.
    pub count: u8,
    /// The bytes.
    pub bytes: &'a [u8],
    /// Everything `mac1` covers.
    pub signed: &'a [u8],
    /// `mac1`.
    pub mac1: [u8; MAC_LEN],
    /// `mac2` (all zeros when the sender had no cookie).
    pub mac2: [u8; MAC_LEN],
}

impl Chunk<'_> {
    /// Whether `mac1` is right for a receiver whose mac1 key is `key`.
    pub fn mac1_ok(&self, key: &Mac1Key) -> bool {
        key.mac(self.signed).ct_eq(&self.mac1).into()
    }

    /// Whether `mac2` is right for `cookie`.
    pub fn mac2_ok(&self, cookie: &[u8; MAC_LEN]) -> bool {
        mac2(cookie, self.signed, &self.mac1)
            .ct_eq(&self.mac2)
            .into()
    }
}

/// Decodes a handshake frame; `None` for anything malformed (disco frames are parsed by
/// [`crate::disco`]).
pub fn decode(b: &[u8]) -> Option<Frame<'_>> {
    let rest = b.strip_prefix(&FRAME_MAGIC)?;
    let (&kind, body) = rest.split_first()?;
    match kind {
        1 | 2 => {
            if body.len() < 6 + 1 + 2 * MAC_LEN {
                return None;
            }
            let session = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let (index, count) = (body[4], body[5]);
            let bytes_len = body.len() - 6 - 2 * MAC_LEN;
            if count == 0 || count > MAX_CHUNKS || index >= count || bytes_len > MAX_CHUNK {
                return None;
            }
            let signed_len = CHUNK_HEADER + bytes_len;
            let mac1: [u8; MAC_LEN] = b[signed_len..signed_len + MAC_LEN].try_into().ok()?;
            let mac2: [u8; MAC_LEN] = b[signed_len + MAC_LEN..].try_into().ok()?;
            Some(Frame::Chunk(Chunk {
                kind: if kind == 1 {
                    Kind::PqInit
                } else {
                    Kind::PqResp
                },
                session,
                index,
                count,
                bytes: &body[6..6 + bytes_len],
                signed: &b[..signed_len],
                mac1,
                mac2,
            }))
        }
        KIND_COOKIE => {
            if body.len() != 5 + hybrid::seal::SEAL_OVERHEAD + MAC_LEN {
                return None;
            }
            Some(Frame::Cookie {
                session: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                index: body[4],
                sealed: &body[5..],
            })
        }
        _ => None,
    }
}

/// The key `mac1` is made with for one receiver: a hash of its public key.
#[derive(Clone)]
pub struct Mac1Key([u8; 32]);

impl Mac1Key {
    /// The mac1 key of the node with public key `receiver`.
    pub fn new(receiver: &NodeKey) -> Self {
        let mut h = Blake2s256::new();
        h.update(b"lattice pq mac1 v1");
        h.update(receiver.as_bytes());
        Self(h.finalize().into())
    }

    fn mac(&self, signed: &[u8]) -> [u8; MAC_LEN] {
        truncate(hybrid::mac(&self.0, &[signed]))
    }
}

/// The key cookie replies from `responder` are sealed with.
pub fn cookie_seal_key(responder: &NodeKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(b"lattice pq cookie v1");
    h.update(responder.as_bytes());
    h.finalize().into()
}

fn mac2(cookie: &[u8; MAC_LEN], signed: &[u8], mac1: &[u8; MAC_LEN]) -> [u8; MAC_LEN] {
    truncate(hybrid::mac(cookie, &[signed, mac1]))
}

fn truncate(full: [u8; 32]) -> [u8; MAC_LEN] {
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

/// A handshake message split into chunks (without MACs yet): see [`Self::frames`].
#[derive(Debug, Clone)]
pub struct Message {
    kind: Kind,
    session: u32,
    chunks: Vec<Vec<u8>>,
}

impl Message {
    /// Splits `msg` into chunks.
    pub fn new(kind: Kind, session: u32, msg: &[u8]) -> Self {
        Self {
            kind,
            session,
            chunks: msg.chunks(MAX_CHUNK).map(<[u8]>::to_vec).collect(),
        }
    }

    /// The message's session.
    pub fn session(&self) -> u32 {
        self.session
    }

    /// The frames to send to the receiver whose mac1 key is `key`, with `mac2` under
    /// `cookie` (zeros without one), and each frame's `mac1` (what a cookie reply is bound to).
    pub fn frames(
        &self,
        key: &Mac1Key,
        cookie: Option<&[u8; MAC_LEN]>,
    ) -> Vec<(Vec<u8>, [u8; MAC_LEN])> {
        let count = u8::try_from(self.chunks.len()).unwrap_or(u8::MAX);
        self.chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut f = Vec::with_capacity(CHUNK_HEADER + c.len() + 2 * MAC_LEN);
                f.extend_from_slice(&FRAME_MAGIC);
                f.push(self.kind.byte());
                f.extend_from_slice(&self.session.to_be_bytes());
                f.push(u8::try_from(i).unwrap_or(u8::MAX));
                f.push(count);
                f.extend_from_slice(c);
                let m1 = key.mac(&f);
                let m2 = cookie.map_or([0; MAC_LEN], |k| mac2(k, &f, &m1));
                f.extend_from_slice(&m1);
                f.extend_from_slice(&m2);
                (f, m1)
            })
            .collect()
    }
}

/// Encodes a cookie reply.
pub fn encode_cookie(session: u32, index: u8, sealed: &[u8]) -> Vec<u8> {
    let mut f = FRAME_MAGIC.to_vec();
    f.push(KIND_COOKIE);
    f.extend_from_slice(&session.to_be_bytes());
    f.push(index);
    f.extend_from_slice(sealed);
    f
}

/// Who a datagram counts against: an IP address (UDP ports are free to vary, and a sender
/// can pick any; an IPv6 address's /64, [`crate::addr::counted_ip`]) or a peer through a
/// relay (the relay authenticated it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A UDP source address.
    Ip(IpAddr),
    /// A peer reached through a relay.
    Peer(NodeKey),
}

impl From<Addr> for Source {
    fn from(a: Addr) -> Self {
        match a {
            Addr::Udp(_, s) => Self::Ip(crate::addr::counted_ip(s.ip())),
            Addr::Relay(_, k) => Self::Peer(k),
        }
    }
}

type PartialKey = (Addr, Kind, u32);

struct Partial {
    started: Instant,
    chunks: Vec<Option<Vec<u8>>>,
}

/// Reassembles multi-frame messages, bounded in memory and time. Each source may hold at most
/// [`MAX_PARTIAL_PER_SOURCE`] partial messages, and when the table is full the source holding
/// the most loses its oldest, so a flood from some sources cannot evict the partial messages
/// of others.
#[derive(Default)]
pub struct Reassembly {
    partial: BTreeMap<PartialKey, Partial>,
    per_source: HashMap<Source, usize>,
}

impl Reassembly {
    /// Adds a chunk from `from`; returns the whole message once every chunk has arrived.
    pub fn push(&mut self, now: Instant, from: Addr, chunk: &Chunk<'_>) -> Option<Vec<u8>> {
        if chunk.count == 1 {
            return Some(chunk.bytes.to_vec());
        }
        self.expire(now);
        let key = (from, chunk.kind, chunk.session);
        let source = Source::from(from);
        if !self.partial.contains_key(&key) {
            if self.per_source.get(&source).copied().unwrap_or(0) >= MAX_PARTIAL_PER_SOURCE {
                self.evict_oldest_of(source);
            } else if self.partial.len() >= MAX_PARTIAL {
                let offender = self
                    .per_source
                    .iter()
                    .max_by_key(|(s, n)| (**n, **s))
                    .map(|(s, _)| *s);
                if let Some(s) = offender {
                    self.evict_oldest_of(s);
                }
            }
            self.partial.insert(
                key,
                Partial {
                    started: now,
                    chunks: vec![None; usize::from(chunk.count)],
                },
            );
            *self.per_source.entry(source).or_insert(0) += 1;
        }
        let p = self.partial.get_mut(&key)?;
        if p.chunks.len() != usize::from(chunk.count) {
            self.remove(&key);
            return None;
        }
        p.chunks[usize::from(chunk.index)] = Some(chunk.bytes.to_vec());
        if p.chunks.iter().all(Option::is_some) {
            let done = self.remove(&key)?;
            return Some(done.chunks.into_iter().flatten().flatten().collect());
        }
        None
    }

    fn expire(&mut self, now: Instant) {
        let old: Vec<PartialKey> = self
            .partial
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.started) >= PARTIAL_TTL)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.remove(&k);
        }
    }

    fn evict_oldest_of(&mut self, source: Source) {
        let oldest = self
            .partial
            .iter()
            .filter(|(k, _)| Source::from(k.0) == source)
            .min_by_key(|(k, p)| (p.started, **k))
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            self.remove(&k);
        }
    }

    fn remove(&mut self, key: &PartialKey) -> Option<Partial> {
        let p = self.partial.remove(key)?;
        let source = Source::from(key.0);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(p)
    }

    /// Partial messages held.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Mac1Key {
        Mac1Key::new(&NodeKey::from_bytes([9; 32]))
    }

    fn chunks(frames: &[(Vec<u8>, [u8; MAC_LEN])]) -> Vec<Chunk<'_>> {
        frames
            .iter()
            .map(|(f, _)| match decode(f) {
                Some(Frame::Chunk(c)) => c,
                other => panic!("not a chunk: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn messages_round_trip_through_frames_in_any_order() {
        let now = crate::test_epoch();
        let from = Addr::main("192.0.2.1:1".parse().unwrap());
        let msg: Vec<u8> = (0..1313u32).map(|i| i as u8).collect();
        let frames = Message::new(Kind::PqInit, 77, &msg).frames(&key(), None);
        assert_eq!(frames.len(), 2);
        assert!(
            frames
                .iter()
                .all(|(f, _)| f.len() <= MAX_CHUNK + CHUNK_HEADER + 2 * MAC_LEN)
        );
        let mut r = Reassembly::default();
        let mut whole = None;
        for c in chunks(&frames).iter().rev() {
            assert!(c.mac1_ok(&key()));
            assert_eq!(c.mac2, [0; MAC_LEN]);
            whole = whole.or(r.push(now, from, c));
        }
        assert_eq!(whole, Some(msg));
        assert!(r.is_empty());
    }

    #[test]
    fn mac1_binds_the_receiver_and_every_byte_and_mac2_the_cookie() {
        let msg = [7u8; 300];
        let cookie = [3u8; MAC_LEN];
        let frames = Message::new(Kind::PqInit, 5, &msg).frames(&key(), Some(&cookie));
        let (f, m1) = &frames[0];
        let c = &chunks(&frames)[0];
        assert_eq!(&c.mac1, m1);
        assert!(c.mac1_ok(&key()) && c.mac2_ok(&cookie));
        assert!(!c.mac1_ok(&Mac1Key::new(&NodeKey::from_bytes([8; 32]))));
        assert!(!c.mac2_ok(&[4u8; MAC_LEN]));
        // Flipping any byte before the MACs breaks mac1 (or the framing).
        for i in FRAME_MAGIC.len()..f.len() - 2 * MAC_LEN {
            let mut t = f.clone();
            t[i] ^= 0x01;
            if let Some(Frame::Chunk(c)) = decode(&t) {
                assert!(!c.mac1_ok(&key()), "byte {i} is not covered by mac1");
            }
        }
    }

    #[test]
    fn cookie_replies_round_trip_and_garbage_is_rejected() {
        let sealed = [1u8; hybrid::seal::SEAL_OVERHEAD + MAC_LEN];
        assert_eq!(
            decode(&encode_cookie(9, 1, &sealed)),
            Some(Frame::Cookie {
                session: 9,
                index: 1,
                sealed: &sealed[..]
            })
        );
        assert_eq!(decode(&encode_cookie(9, 1, &sealed[1..])), None);
        assert_eq!(decode(b"LTC\x01"), None);
        assert_eq!(decode(b"LTC\x01\x03short"), None);
        assert_eq!(decode(b"LTC\x01\x09xxxxxxxxxx"), None);
        // index beyond count, zero count, too many chunks
        for (i, c) in [(2u8, 2u8), (0, 0), (0, 9)] {
            let mut f = FRAME_MAGIC.to_vec();
            f.extend([1, 0, 0, 0, 1, i, c, 0xaa]);
            f.extend([0u8; 2 * MAC_LEN]);
            assert_eq!(decode(&f), None);
        }
    }

    fn half(session: u32) -> Vec<(Vec<u8>, [u8; MAC_LEN])> {
        Message::new(Kind::PqInit, session, &[0x55; 1500]).frames(&key(), None)
    }

    #[test]
    fn reassembly_is_bounded_in_size_and_time() {
        let now = crate::test_epoch();
        let mut r = Reassembly::default();
        for s in 0..1000u32 {
            let from = Addr::main(format!("192.0.2.{}:1", s % 250).parse().unwrap());
            let frames = half(s);
            assert!(r.push(now, from, &chunks(&frames)[0]).is_none());
        }
        assert_eq!(r.len(), MAX_PARTIAL);
        let from = Addr::main("192.0.2.1:1".parse().unwrap());
        r.push(now + PARTIAL_TTL, from, &chunks(&half(5000))[0]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_flood_from_some_sources_does_not_evict_another_sources_partial_message() {
        let now = crate::test_epoch();
        let mut r = Reassembly::default();
        let honest = Addr::main("198.51.100.7:41641".parse().unwrap());
        let frames = half(42);
        let cs = chunks(&frames);
        assert!(r.push(now, honest, &cs[0]).is_none());
        // One source with many ports, a crowd of 30 sources, and one host with many addresses
        // of its IPv6 /64 (one source), each sending thousands of first halves.
        for s in 0..6000u32 {
            let port = 1024 + (s % 60000) as u16;
            let flooder = match s % 3 {
                0 => Addr::main(format!("203.0.113.9:{port}").parse().unwrap()),
                1 => Addr::main(format!("203.0.113.{}:1", 100 + s % 30).parse().unwrap()),
                _ => Addr::main(format!("[2001:db8:1:2::{s:x}]:1").parse().unwrap()),
            };
            r.push(now, flooder, &chunks(&half(s + 100))[0]);
        }
        assert!(r.len() <= MAX_PARTIAL);
        let from_the_64 = r
            .partial
            .keys()
            .filter(|k| {
                k.0.udp()
                    .is_some_and(|a| a.ip().to_string().starts_with("2001:db8:1:2:"))
            })
            .count();
        assert!(from_the_64 <= MAX_PARTIAL_PER_SOURCE, "{from_the_64} held");
        // The honest second half still completes the honest message.
        assert_eq!(r.push(now, honest, &cs[1]), Some(vec![0x55; 1500]));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = decode(&b);
            let mut framed = FRAME_MAGIC.to_vec();
            framed.append(&mut b);
            if let Some(Frame::Chunk(c)) = decode(&framed) {
                let _ = c.mac1_ok(&key());
            }
        }
    }
}
