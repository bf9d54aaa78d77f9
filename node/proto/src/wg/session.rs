//! One session's transport keys (whitepaper section 5.4.6): sealing and opening data messages.
//!
//! Both take `&self`: the sending counter is an atomic, so several threads can seal one
//! session's packets at once once each has taken its counters in order
//! ([`Session::reserve`]); the replay window is checked before the AEAD and marked after it
//! under a short lock of its own, so a forged message (one that does not open) never moves the
//! window, and two threads opening one session's messages at once accept each counter once.

use std::time::Instant;

use bytes::BytesMut;
use gotatun::noise::index_table::Index;
use parking_lot::Mutex;
use rand_09::rngs::StdRng;
use zeroize::Zeroizing;

use super::crypto::{AeadKey, TAG_LEN};
use super::message::{self, DATA, DATA_HEADER_LEN, DATA_MIN_LEN};
use super::{REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME};

/// The room a packet's buffer needs after the packet for [`Session::seal_in_place`]: the
/// header, at most 15 bytes of padding, and the tag.
pub const SEAL_ROOM: usize = DATA_HEADER_LEN + 15 + TAG_LEN;

/// A copy of `packet` in a buffer with [`SEAL_ROOM`] after it, for
/// [`Session::seal_in_place`] (a node reads from its TUN device into buffers with that room).
pub fn with_seal_room(packet: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(packet.len() + SEAL_ROOM);
    b.extend_from_slice(packet);
    b
}

/// Bits in the replay window's ring (as the Linux kernel and wireguard-go keep).
const RING_BITS: u64 = 8192;
const WORDS: u64 = RING_BITS / 64;
/// How far behind the greatest counter seen a message may still be accepted: one word less
/// than the ring, since the ring drops whole words as the greatest counter moves on.
pub(crate) const WINDOW: u64 = RING_BITS - 64;

/// Which counters of a session have been received (RFC 6479's sliding window).
#[derive(Clone)]
pub(crate) struct Replay {
    /// One more than the greatest counter accepted; 0 before the first.
    next: u64,
    ring: [u64; WORDS as usize],
}

impl Default for Replay {
    fn default() -> Self {
        Self {
            next: 0,
            ring: [0; WORDS as usize],
        }
    }
}

impl Replay {
    fn slot(counter: u64) -> (usize, u64) {
        (((counter / 64) % WORDS) as usize, 1 << (counter % 64))
    }

    /// Whether `counter` would be accepted now.
    pub(crate) fn check(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        if self.next - 1 - counter >= WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.ring[word] & bit == 0
    }

    /// Accepts `counter` if it is new and not too old; whether it was.
    pub(crate) fn accept(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            let new_word = counter / 64;
            if self.next > 0 {
                let top_word = (self.next - 1) / 64;
                for w in 1..=(new_word - top_word).min(WORDS) {
                    self.ring[((top_word + w) % WORDS) as usize] = 0;
                }
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::slot(counter);
        self.ring[word] |= bit;
        true
    }
}

/// Why a data message was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Its counter was seen before or is too far behind (a replay, or very late).
    #[error("replayed or too old counter")]
    Replayed,
    /// It does not authenticate under this session's key, or is no data message.
    #[error("does not authenticate")]
    Invalid,
    /// The session is past its lifetime.
    #[error("session expired")]
    Expired,
}

/// A session: transport keys, indices and counters.
pub struct Session {
    /// Ours (data to us carries it); freed when the session is dropped.
    local: Index<StdRng>,
    /// The peer's (our data to it carries it).
    pub(crate) remote_index: u32,
    send: AeadKey,
    receive: AeadKey,
    /// The next sending counter.
    counter: std::sync::atomic::AtomicU64,
    replay: Mutex<Replay>,
    pub(crate) born: Instant,
    /// Whether this node started the handshake that made it.
    pub(crate) initiator: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("local", &self.local.value())
            .field("remote", &self.remote_index)
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(
        local: Index<StdRng>,
        remote_index: u32,
        send: &Zeroizing<[u8; 32]>,
        receive: &Zeroizing<[u8; 32]>,
        born: Instant,
        initiator: bool,
    ) -> Self {
        Self {
            local,
            remote_index,
            send: AeadKey::new(send),
            receive: AeadKey::new(receive),
            counter: std::sync::atomic::AtomicU64::new(0),
            replay: Mutex::new(Replay::default()),
            born,
            initiator,
        }
    }

    /// Our index of this session.
    pub fn local_index(&self) -> u32 {
        self.local.value()
    }

    /// How many messages have been sealed (counters taken).
    pub(crate) fn sent(&self) -> u64 {
        self.counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the session may still be used at `now` (age only).
    pub(crate) fn alive(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.born) < REJECT_AFTER_TIME
    }

    /// Takes `n` sending counters in a row; the first, or `None` once the session has sent all
    /// it may.
    pub fn reserve(&self, n: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let first = self.counter.fetch_add(n, Ordering::Relaxed);
        if first.checked_add(n)? > REJECT_AFTER_MESSAGES {
            // Leave the counter past the limit; later callers fail too.
            return None;
        }
        Some(first)
    }

    /// Seals `packet` as the data message with `counter` (from [`Session::reserve`]), padded
    /// with zeros to a multiple of 16 bytes but not past `mtu`.
    pub fn seal(&self, counter: u64, packet: &[u8], mtu: usize) -> BytesMut {
        let padded = packet.len().next_multiple_of(16).min(mtu.max(packet.len()));
        let mut out = BytesMut::zeroed(DATA_HEADER_LEN + padded + TAG_LEN);
        out[0] = DATA;
        out[message::data::RECEIVER..message::data::COUNTER]
            .copy_from_slice(&self.remote_index.to_le_bytes());
        out[message::data::COUNTER..DATA_HEADER_LEN].copy_from_slice(&counter.to_le_bytes());
        out[DATA_HEADER_LEN..DATA_HEADER_LEN + packet.len()].copy_from_slice(packet);
        let end = DATA_HEADER_LEN + padded;
        let tag = self.send.seal(counter, &[], &mut out[DATA_HEADER_LEN..end]);
        out[end..].copy_from_slice(&tag);
        out
    }

    /// [`Session::seal`] in `packet`'s own buffer when it has room after the packet for the
    /// header, the padding and the tag ([`SEAL_ROOM`] bytes): the packet moves up by the
    /// header's length and is sealed where it lies, so no new buffer is allocated or filled.
    /// Without the room, as [`Session::seal`].
    pub fn seal_in_place(&self, counter: u64, mut packet: BytesMut, mtu: usize) -> BytesMut {
        let n = packet.len();
        let padded = n.next_multiple_of(16).min(mtu.max(n));
        if packet.capacity() < DATA_HEADER_LEN + padded + TAG_LEN {
            return self.seal(counter, &packet, mtu);
        }
        packet.resize(DATA_HEADER_LEN + padded, 0);
        packet.copy_within(0..n, DATA_HEADER_LEN);
        packet[DATA_HEADER_LEN + n..].fill(0);
        packet[..4].copy_from_slice(&[DATA, 0, 0, 0]);
        packet[message::data::RECEIVER..message::data::COUNTER]
            .copy_from_slice(&self.remote_index.to_le_bytes());
        packet[message::data::COUNTER..DATA_HEADER_LEN].copy_from_slice(&counter.to_le_bytes());
        let tag = self.send.seal(counter, &[], &mut packet[DATA_HEADER_LEN..]);
        packet.extend_from_slice(&tag);
        packet
    }

    /// Opens the data message `msg` in place (it must be addressed to this session): the
    /// range of `msg` that holds the packet, padding removed (empty for a keepalive). Its
    /// counter is checked against the replay window before the AEAD and marked after it, so
    /// a forged message never moves the window.
    pub fn open(&self, now: Instant, msg: &mut [u8]) -> Result<std::ops::Range<usize>, OpenError> {
        let counter = self.counter_of(now, msg)?;
        if !self.fresh(counter) {
            return Err(OpenError::Replayed);
        }
        let len = self.authenticate(counter, msg)?;
        if !self.accept(counter) {
            return Err(OpenError::Replayed);
        }
        packet_range(msg, len)
    }

    /// [`Session::open`] without the replay window, for a caller that opens many messages on
    /// several threads at once and keeps the window itself, one thread at a time: it checks
    /// [`Session::fresh`] before (a replay is not worth its AEAD) and must [`Session::accept`]
    /// the counter (returned with the range) before it uses the packet, dropping it as a
    /// replay if that fails (a copy opened at the same time was accepted first). Marking the
    /// window once per message from every thread that opens made them wait for each other.
    pub fn open_unmarked(
        &self,
        now: Instant,
        msg: &mut [u8],
    ) -> Result<(u64, std::ops::Range<usize>), OpenError> {
        let counter = self.counter_of(now, msg)?;
        let len = self.authenticate(counter, msg)?;
        Ok((counter, packet_range(msg, len)?))
    }

    /// Whether a message with `counter` may still be accepted: neither seen nor too old.
    pub fn fresh(&self, counter: u64) -> bool {
        self.replay.lock().check(counter)
    }

    /// Marks `counter` received, if it is fresh: whether it was.
    pub fn accept(&self, counter: u64) -> bool {
        self.replay.lock().accept(counter)
    }

    /// The counter of the data message `msg`, if it is one and the session is still alive.
    fn counter_of(&self, now: Instant, msg: &[u8]) -> Result<u64, OpenError> {
        if msg.len() < DATA_MIN_LEN || msg[0] != DATA {
            return Err(OpenError::Invalid);
        }
        if !self.alive(now) {
            return Err(OpenError::Expired);
        }
        Ok(message::u64_at(msg, message::data::COUNTER))
    }

    /// Opens `msg`'s payload in place with `counter`: the plaintext's length.
    fn authenticate(&self, counter: u64, msg: &mut [u8]) -> Result<usize, OpenError> {
        self.receive
            .open(counter, &[], &mut msg[DATA_HEADER_LEN..])
            .ok_or(OpenError::Invalid)
    }
}

impl Session {
    /// [`Session::open`] on a message of its own: the message cut down to the packet, in
    /// place (no copy).
    pub fn open_in_place(&self, now: Instant, mut msg: BytesMut) -> Result<BytesMut, OpenError> {
        let range = self.open(now, &mut msg)?;
        Ok(cut(msg, range))
    }

    /// [`Session::open_unmarked`] on a message of its own: its counter and the message cut
    /// down to the packet.
    pub fn open_unmarked_in_place(
        &self,
        now: Instant,
        mut msg: BytesMut,
    ) -> Result<(u64, BytesMut), OpenError> {
        let (counter, range) = self.open_unmarked(now, &mut msg)?;
        Ok((counter, cut(msg, range)))
    }
}

/// `msg` cut down to `range`, in place.
fn cut(mut msg: BytesMut, range: std::ops::Range<usize>) -> BytesMut {
    msg.truncate(range.end);
    bytes::Buf::advance(&mut msg, range.start);
    msg
}

/// Where the IP packet lies in an opened message whose plaintext is `len` bytes, padding
/// removed.
fn packet_range(msg: &[u8], len: usize) -> Result<std::ops::Range<usize>, OpenError> {
    let plain = &msg[DATA_HEADER_LEN..DATA_HEADER_LEN + len];
    let inner = ip_length(plain).ok_or(OpenError::Invalid)?;
    Ok(DATA_HEADER_LEN..DATA_HEADER_LEN + inner)
}

/// The length of the IP packet at the start of `plain` (0 for a keepalive), or `None` when
/// its header claims more than there is, or it is no IP packet.
fn ip_length(plain: &[u8]) -> Option<usize> {
    let Some(first) = plain.first() else {
        return Some(0);
    };
    let n = match first >> 4 {
        4 if plain.len() >= 20 => usize::from(u16::from_be_bytes([plain[2], plain[3]])),
        6 if plain.len() >= 40 => 40 + usize::from(u16::from_be_bytes([plain[4], plain[5]])),
        _ => return None,
    };
    (n <= plain.len()).then_some(n)
}
