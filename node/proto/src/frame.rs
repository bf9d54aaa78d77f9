//! Lattice's own frames on the shared UDP port (after [`FRAME_MAGIC`]), and reassembly of the
//! post-quantum handshake messages that span two frames.
//!
//! ```text
//! magic "LTC\x01" | kind u8 | body
//! kind 1, 2 (PQ message 1, 2): session u32 | chunk index u8 | chunk count u8 | bytes
//! kind 3    (PQ nudge):        tag [8]  (names sender and receiver to those who know both keys)
//! ```
//!
//! Chunks are at most [`MAX_CHUNK`] bytes, so no frame comes near a 1280-byte path MTU and no
//! datagram is ever fragmented by IP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::addr::Addr;
use crate::magicsock::FRAME_MAGIC;

/// Largest handshake bytes in one frame.
pub const MAX_CHUNK: usize = 1000;
/// Most chunks one message may have.
const MAX_CHUNKS: u8 = 4;
/// Reassemblies kept at once (oldest dropped first).
const MAX_PARTIAL: usize = 64;
/// A reassembly older than this is dropped.
const PARTIAL_TTL: Duration = Duration::from_secs(5);

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Post-quantum handshake message 1.
    PqInit,
    /// Post-quantum handshake message 2.
    PqResp,
    /// A responder asking its initiator for a new exchange.
    PqNudge,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Self::PqInit => 1,
            Self::PqResp => 2,
            Self::PqNudge => 3,
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One chunk of a handshake message.
    Chunk {
        /// Message 1 or 2.
        kind: Kind,
        /// The initiator's session id.
        session: u32,
        /// Position of this chunk.
        index: u8,
        /// Number of chunks.
        count: u8,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// A nudge.
    Nudge {
        /// Sender/receiver tag.
        tag: [u8; 8],
    },
}

/// Decodes a frame; `None` for anything malformed.
pub fn decode(b: &[u8]) -> Option<Frame<'_>> {
    let rest = b.strip_prefix(&FRAME_MAGIC)?;
    let (&kind, body) = rest.split_first()?;
    match kind {
        1 | 2 => {
            if body.len() < 7 {
                return None;
            }
            let session = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let (index, count) = (body[4], body[5]);
            if count == 0 || count > MAX_CHUNKS || index >= count || body.len() - 6 > MAX_CHUNK {
                return None;
            }
            Some(Frame::Chunk {
                kind: if kind == 1 {
                    Kind::PqInit
                } else {
                    Kind::PqResp
                },
                session,
                index,
                count,
                bytes: &body[6..],
            })
        }
        3 => Some(Frame::Nudge {
            tag: body.try_into().ok()?,
        }),
        _ => None,
    }
}

/// Splits a handshake message into frames.
pub fn encode_message(kind: Kind, session: u32, msg: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = msg.chunks(MAX_CHUNK).collect();
    let count = u8::try_from(chunks.len()).unwrap_or(u8::MAX);
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut f = Vec::with_capacity(FRAME_MAGIC.len() + 7 + c.len());
            f.extend_from_slice(&FRAME_MAGIC);
            f.push(kind.byte());
            f.extend_from_slice(&session.to_be_bytes());
            f.push(u8::try_from(i).unwrap_or(u8::MAX));
            f.push(count);
            f.extend_from_slice(c);
            f
        })
        .collect()
}

/// Encodes a nudge.
pub fn encode_nudge(tag: [u8; 8]) -> Vec<u8> {
    let mut f = FRAME_MAGIC.to_vec();
    f.push(Kind::PqNudge.byte());
    f.extend_from_slice(&tag);
    f
}

type PartialKey = (Addr, Kind, u32);

struct Partial {
    started: Instant,
    chunks: Vec<Option<Vec<u8>>>,
}

/// Reassembles multi-frame messages, bounded in memory and time.
#[derive(Default)]
pub struct Reassembly {
    partial: BTreeMap<PartialKey, Partial>,
}

impl Reassembly {
    /// Adds a chunk; returns the whole message once every chunk has arrived.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        now: Instant,
        from: Addr,
        kind: Kind,
        session: u32,
        index: u8,
        count: u8,
        bytes: &[u8],
    ) -> Option<Vec<u8>> {
        if count == 1 {
            return Some(bytes.to_vec());
        }
        self.partial
            .retain(|_, p| now.saturating_duration_since(p.started) < PARTIAL_TTL);
        let key = (from, kind, session);
        if !self.partial.contains_key(&key) && self.partial.len() >= MAX_PARTIAL {
            let oldest = self
                .partial
                .iter()
                .min_by_key(|(k, p)| (p.started, **k))
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.partial.remove(&k);
            }
        }
        let p = self.partial.entry(key).or_insert_with(|| Partial {
            started: now,
            chunks: vec![None; usize::from(count)],
        });
        if p.chunks.len() != usize::from(count) {
            self.partial.remove(&key);
            return None;
        }
        p.chunks[usize::from(index)] = Some(bytes.to_vec());
        if p.chunks.iter().all(Option::is_some) {
            let done = self.partial.remove(&key)?;
            return Some(done.chunks.into_iter().flatten().flatten().collect());
        }
        None
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

    #[test]
    fn messages_round_trip_through_frames_in_any_order() {
        let now = crate::test_epoch();
        let from = Addr::main("192.0.2.1:1".parse().unwrap());
        let msg: Vec<u8> = (0..1313u32).map(|i| i as u8).collect();
        let frames = encode_message(Kind::PqInit, 77, &msg);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.len() <= MAX_CHUNK + 11));
        let mut r = Reassembly::default();
        for f in frames.iter().rev() {
            let Some(Frame::Chunk {
                kind,
                session,
                index,
                count,
                bytes,
            }) = decode(f)
            else {
                panic!("not a chunk");
            };
            if let Some(whole) = r.push(now, from, kind, session, index, count, bytes) {
                assert_eq!(whole, msg);
            }
        }
        assert!(r.is_empty());
    }

    #[test]
    fn nudges_round_trip_and_garbage_is_rejected() {
        assert_eq!(
            decode(&encode_nudge([5; 8])),
            Some(Frame::Nudge { tag: [5; 8] })
        );
        assert_eq!(decode(b"LTC\x01"), None);
        assert_eq!(decode(b"LTC\x01\x03short"), None);
        assert_eq!(decode(b"LTC\x01\x09xxxxxxxxxx"), None);
        // index beyond count, zero count, too many chunks
        for (i, c) in [(2u8, 2u8), (0, 0), (0, 9)] {
            let mut f = FRAME_MAGIC.to_vec();
            f.extend([1, 0, 0, 0, 1, i, c, 0xaa]);
            assert_eq!(decode(&f), None);
        }
    }

    #[test]
    fn reassembly_is_bounded() {
        let now = crate::test_epoch();
        let mut r = Reassembly::default();
        for s in 0..1000u32 {
            let from = Addr::main(format!("192.0.2.{}:1", s % 250).parse().unwrap());
            assert!(r.push(now, from, Kind::PqInit, s, 0, 2, b"x").is_none());
        }
        assert_eq!(r.len(), MAX_PARTIAL);
        r.push(
            now + PARTIAL_TTL,
            Addr::main("192.0.2.1:1".parse().unwrap()),
            Kind::PqInit,
            5000,
            0,
            2,
            b"x",
        );
        assert_eq!(r.len(), 1);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&b);
            let mut framed = FRAME_MAGIC.to_vec();
            framed.append(&mut b);
            let _ = decode(&framed);
        }
    }
}
