//! Disco: the path-discovery messages nodes exchange directly and through relays.
//!
//! ```text
//! magic "LTC\x01" | kind 5 | sender node key [32] | sealed(message)
//! message: 1 Ping        tx [12]
//!          2 Pong        tx [12] | observed address (the ping's source as the responder saw it)
//!          3 CallMeMaybe flags [1] | public IP (family 0 none, 4 or 6, then bytes) | n [1] | n endpoints
//! endpoint / address: family [1] (4 or 6) | ip [4 or 16] | port [2]
//! ```
//!
//! Messages are sealed ([`hybrid::seal`]) under a key from the static-static X25519 result of
//! the two node keys, so only the two peers can make or read them; the header is bound as
//! associated data. A pong is only believed for a ping this node sent (fresh random tx id), and
//! a path is only adopted from a pong or from an authenticated WireGuard packet, never from a
//! ping, so a replayed ping can make a node answer but never move its traffic.

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

/// A disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Are you there on this path?
    Ping {
        /// Transaction id.
        tx: [u8; 12],
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
        /// [`FLAG_HARD_NAT`].
        flags: u8,
        /// The sender's public IP, if known.
        public_ip: Option<IpAddr>,
        /// The sender's endpoints.
        endpoints: Vec<SocketAddr>,
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
            Self::Ping { tx } => {
                out.push(1);
                out.extend_from_slice(tx);
            }
            Self::Pong { tx, observed } => {
                out.push(2);
                out.extend_from_slice(tx);
                put_addr(&mut out, *observed);
            }
            Self::CallMeMaybe {
                flags,
                public_ip,
                endpoints,
            } => {
                out.push(3);
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
        }
        out
    }

    /// Decodes a plaintext; `None` for anything malformed.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let m = match r.u8()? {
            1 => Self::Ping {
                tx: r.take(12)?.try_into().ok()?,
            },
            2 => Self::Pong {
                tx: r.take(12)?.try_into().ok()?,
                observed: r.addr()?,
            },
            3 => {
                let flags = r.u8()?;
                let public_ip = r.ip()?;
                let n = usize::from(r.u8()?);
                if n > MAX_ENDPOINTS {
                    return None;
                }
                let endpoints = (0..n).map(|_| r.addr()).collect::<Option<Vec<_>>>()?;
                Self::CallMeMaybe {
                    flags,
                    public_ip,
                    endpoints,
                }
            }
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
            Message::Ping { tx: [1; 12] },
            Message::Pong {
                tx: [2; 12],
                observed: "203.0.113.5:41641".parse().unwrap(),
            },
            Message::Pong {
                tx: [2; 12],
                observed: "[2001:db8::5]:41641".parse().unwrap(),
            },
            Message::CallMeMaybe {
                flags: FLAG_HARD_NAT,
                public_ip: Some("203.0.113.5".parse().unwrap()),
                endpoints: vec![
                    "10.0.0.2:41641".parse().unwrap(),
                    "[fd00::2]:41641".parse().unwrap(),
                ],
            },
            Message::CallMeMaybe {
                flags: 0,
                public_ip: None,
                endpoints: vec![],
            },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()), Some(m.clone()), "{m:?}");
        }
        // Trailing bytes, unknown types and short input are refused.
        let mut p = Message::Ping { tx: [1; 12] }.encode();
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
