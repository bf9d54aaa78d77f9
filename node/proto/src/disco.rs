//! Disco: the small sealed messages two peers exchange directly and through relays, for path
//! discovery and for steering their post-quantum key schedule.
//!
//! ```text
//! magic "LTC\x01" | kind 5 | sender node key [32] | sealed(message)
//! message: 1 Ping          tx [12] | time u64
//!          2 Pong          tx [12] | observed address (the ping's source as the responder saw it)
//!          3 CallMeMaybe   time u64 | flags [1] | public IP (family 0 none, 4 or 6, then bytes) | n [1] | n endpoints
//!          4 PqNudge       time u64
//!          5 PqConfirm     session u32 | tag [16]
//!          6 PqConfirmAck  session u32 | tag [16]
//! endpoint / address: family [1] (4 or 6) | ip [4 or 16] | port [2]
//! time: the sender's wall clock, Unix milliseconds
//! ```
//!
//! Messages are sealed ([`hybrid::seal`]) under a key from the static-static X25519 result of
//! the two node keys, so only the two peers can make or read them; the header is bound as
//! associated data. The sender's key in the header finds the peer in one lookup. Sealing
//! proves who sent a message, not when; freshness comes from the receiver:
//!
//! - a pong is only believed for a ping this node sent (fresh random tx id), and a path is only
//!   adopted from a pong or an authenticated WireGuard packet, never from a ping, so a replayed
//!   ping can at most draw an answer;
//! - pings, call-me-maybes and nudges carry the sender's clock; each peer's messages must move
//!   forward (pings within a short reordering window, never the same tx twice), so a replay
//!   within a run is refused, and call-me-maybes and nudges must also be within a few minutes
//!   of the receiver's clock, which bounds replays across restarts;
//! - key confirmations carry a MAC under the new post-quantum key, which nobody else has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::magicsock::FRAME_MAGIC;

/// Frame kind of disco messages.
pub const KIND: u8 = 5;
/// Domain separation for the sealing key.
pub const KEY_LABEL: &[u8] = b"lattice disco v1";
/// Most endpoints in one call-me-maybe.
pub const MAX_ENDPOINTS: usize = 16;

/// CallMeMaybe flag: the sender is behind an endpoint-dependent (hard) NAT and has opened
/// extra ports towards the receiver; an easy-NAT receiver should spray its public IP.
pub const FLAG_HARD_NAT: u8 = 0x01;

/// CallMeMaybe flag: an answer to the receiver's call-me-maybe, sent after the sender primed
/// its NAT toward the receiver's endpoints: the receiver may ping now (and answers nothing).
pub const FLAG_REPLY: u8 = 0x02;

/// A disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Are you there on this path?
    Ping {
        /// Transaction id.
        tx: [u8; 12],
        /// The sender's clock (Unix ms).
        time: u64,
    },
    /// Yes; this is where your ping came from.
    Pong {
        /// The ping's transaction id.
        tx: [u8; 12],
        /// The ping's source as the responder saw it.
        observed: SocketAddr,
    },
    /// Here are my endpoints: ping them now (sent through a relay, for simultaneous open).
    CallMeMaybe {
        /// The sender's clock (Unix ms).
        time: u64,
        /// [`FLAG_HARD_NAT`].
        flags: u8,
        /// The sender's public IP, if known.
        public_ip: Option<IpAddr>,
        /// The sender's endpoints.
        endpoints: Vec<SocketAddr>,
    },
    /// A responder asking its initiator for a new post-quantum exchange (it has no key, or
    /// lost the one the initiator uses).
    PqNudge {
        /// The sender's clock (Unix ms).
        time: u64,
    },
    /// The initiator has the key of exchange `session` (message 3 of the key schedule).
    PqConfirm {
        /// The exchange.
        session: u32,
        /// MAC under the new key.
        tag: [u8; 16],
    },
    /// The responder installed the key of exchange `session`.
    PqConfirmAck {
        /// The exchange.
        session: u32,
        /// MAC under the new key.
        tag: [u8; 16],
    },
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    put_ip(out, a.ip());
    out.extend_from_slice(&a.port().to_be_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn ip(&mut self) -> Option<Option<IpAddr>> {
        match self.u8()? {
            0 => Some(None),
            4 => {
                let b: [u8; 4] = self.take(4)?.try_into().ok()?;
                Some(Some(IpAddr::V4(Ipv4Addr::from(b))))
            }
            6 => {
                let b: [u8; 16] = self.take(16)?.try_into().ok()?;
                Some(Some(IpAddr::V6(Ipv6Addr::from(b))))
            }
            _ => None,
        }
    }

    fn addr(&mut self) -> Option<SocketAddr> {
        let ip = self.ip()??;
        let p = self.take(2)?;
        Some(SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])))
    }
}

impl Message {
    /// The plaintext encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self {
            Self::Ping { tx, time } => {
                out.push(1);
                out.extend_from_slice(tx);
                out.extend_from_slice(&time.to_be_bytes());
            }
            Self::Pong { tx, observed } => {
                out.push(2);
                out.extend_from_slice(tx);
                put_addr(&mut out, *observed);
            }
            Self::CallMeMaybe {
                time,
                flags,
                public_ip,
                endpoints,
            } => {
                out.push(3);
                out.extend_from_slice(&time.to_be_bytes());
                out.push(*flags);
                match public_ip {
                    Some(ip) => put_ip(&mut out, *ip),
                    None => out.push(0),
                }
                let n = endpoints.len().min(MAX_ENDPOINTS);
                out.push(u8::try_from(n).unwrap_or(0));
                for e in &endpoints[..n] {
                    put_addr(&mut out, *e);
                }
            }
            Self::PqNudge { time } => {
                out.push(4);
                out.extend_from_slice(&time.to_be_bytes());
            }
            Self::PqConfirm { session, tag } => {
                out.push(5);
                out.extend_from_slice(&session.to_be_bytes());
                out.extend_from_slice(tag);
            }
            Self::PqConfirmAck { session, tag } => {
                out.push(6);
                out.extend_from_slice(&session.to_be_bytes());
                out.extend_from_slice(tag);
            }
        }
        out
    }

    /// Decodes a plaintext; `None` for anything malformed.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let m = match r.u8()? {
            1 => Self::Ping {
                tx: r.take(12)?.try_into().ok()?,
                time: r.u64()?,
            },
            2 => Self::Pong {
                tx: r.take(12)?.try_into().ok()?,
                observed: r.addr()?,
            },
            3 => {
                let time = r.u64()?;
                let flags = r.u8()?;
                let public_ip = r.ip()?;
                let n = usize::from(r.u8()?);
                if n > MAX_ENDPOINTS {
                    return None;
                }
                let endpoints = (0..n).map(|_| r.addr()).collect::<Option<Vec<_>>>()?;
                Self::CallMeMaybe {
                    time,
                    flags,
                    public_ip,
                    endpoints,
                }
            }
            4 => Self::PqNudge { time: r.u64()? },
            5 => Self::PqConfirm {
                session: r.u32()?,
                tag: r.take(16)?.try_into().ok()?,
            },
            6 => Self::PqConfirmAck {
                session: r.u32()?,
                tag: r.take(16)?.try_into().ok()?,
            },
            _ => return None,
        };
        r.0.is_empty().then_some(m)
    }
}

/// The frame header (also the sealing's associated data).
pub fn header(sender: &[u8; 32]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FRAME_MAGIC.len() + 33);
    h.extend_from_slice(&FRAME_MAGIC);
    h.push(KIND);
    h.extend_from_slice(sender);
    h
}

/// Builds a disco frame from a sealed message.
pub fn frame(sender: &[u8; 32], sealed: &[u8]) -> Vec<u8> {
    let mut f = header(sender);
    f.extend_from_slice(sealed);
    f
}

/// Splits a disco frame into its sender key and sealed bytes.
pub fn parse_frame(b: &[u8]) -> Option<([u8; 32], &[u8])> {
    let rest = b.strip_prefix(&FRAME_MAGIC)?;
    let (&kind, rest) = rest.split_first()?;
    if kind != KIND || rest.len() < 32 {
        return None;
    }
    let (key, sealed) = rest.split_at(32);
    Some((key.try_into().ok()?, sealed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let msgs = [
            Message::Ping {
                tx: [1; 12],
                time: 1_790_000_000_123,
            },
            Message::Pong {
                tx: [2; 12],
                observed: "203.0.113.5:41641".parse().unwrap(),
            },
            Message::Pong {
                tx: [2; 12],
                observed: "[2001:db8::5]:41641".parse().unwrap(),
            },
            Message::CallMeMaybe {
                time: 5,
                flags: FLAG_HARD_NAT,
                public_ip: Some("203.0.113.5".parse().unwrap()),
                endpoints: vec![
                    "10.0.0.2:41641".parse().unwrap(),
                    "[fd00::2]:41641".parse().unwrap(),
                ],
            },
            Message::CallMeMaybe {
                time: u64::MAX,
                flags: 0,
                public_ip: None,
                endpoints: vec![],
            },
            Message::PqNudge { time: 77 },
            Message::PqConfirm {
                session: 0xdead_beef,
                tag: [9; 16],
            },
            Message::PqConfirmAck {
                session: 1,
                tag: [8; 16],
            },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()), Some(m.clone()), "{m:?}");
        }
        // Trailing bytes, unknown types and short input are refused.
        let mut p = Message::Ping {
            tx: [1; 12],
            time: 0,
        }
        .encode();
        p.push(0);
        assert_eq!(Message::decode(&p), None);
        assert_eq!(Message::decode(&[9]), None);
        assert_eq!(Message::decode(&[2, 0, 0]), None);
        let f = frame(&[7; 32], b"sealed");
        assert_eq!(parse_frame(&f), Some(([7; 32], &b"sealed"[..])));
        assert_eq!(parse_frame(b"LTC\x01\x05short"), None);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = Message::decode(&b);
            let _ = parse_frame(&b);
        }
    }
}
