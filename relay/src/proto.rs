//! The relay protocol: frames and the authentication exchange (sans-IO).
//!
//! The same frames travel over both transports: one WebSocket binary message each, or on a
//! QUIC connection's first bidirectional stream with a 2-byte length in front (and `Send` /
//! `Recv` frames also as QUIC datagrams when they fit).
//!
//! ```text
//! 0x01 Challenge  relay -> node   version [1] | nonce [32]
//! 0x02 Auth       node -> relay   node key [32] | mac [32] | ticket
//! 0x03 Accepted   relay -> node   mac [32]
//! 0x04 Rejected   relay -> node   reason (UTF-8)
//! 0x10 Send       node -> relay   destination key [32] | payload
//! 0x11 Recv       relay -> node   source key [32] | payload
//! 0x12 PeerGone   relay -> node   key [32]      (the destination is not connected here)
//! 0x20 Ticket     node -> relay   ticket        (a refreshed ticket)
//! 0x21 Refuse     node -> relay   key [32] * n  (n <= 128: sources not to forward to it)
//! 0x30 Ping       either way      data [8]
//! 0x31 Pong       either way      data [8]
//! ```
//!
//! Authentication: the relay sends a fresh nonce; the node answers with its node key, its
//! ticket (the coordinator's signed statement that the key may use relays) and a MAC over the
//! nonce, the key and the ticket under a key only the holders of the node's and the relay's
//! private X25519 keys can compute (their static-static Diffie-Hellman). The relay answers
//! with its own MAC, proving it holds the relay key the netmap names. A ticket seen on the wire
//! is useless without the node's private key, and a replayed `Auth` fails the fresh nonce.

use hybrid::StaticKeypair;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Protocol version in `Challenge`.
pub const VERSION: u8 = 1;
/// Largest payload of `Send` / `Recv`.
pub const MAX_PAYLOAD: usize = 4096;
/// The bytes of a `Send` or `Recv` frame before its payload: the kind, then a node key.
pub const PACKET_HEADER: usize = 1 + 32;
/// Largest encoded frame.
pub const MAX_FRAME: usize = PACKET_HEADER + MAX_PAYLOAD;
/// Most sources one `Refuse` frame names.
pub const MAX_REFUSED: usize = 128;
/// ALPN of the QUIC transport.
pub const ALPN: &[u8] = b"lattice-relay/1";
const AUTH_LABEL: &[u8] = b"lattice relay auth v1";

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The relay's challenge.
    Challenge {
        /// Protocol version.
        version: u8,
        /// Fresh random nonce.
        nonce: [u8; 32],
    },
    /// The node's answer.
    Auth {
        /// The node key it claims.
        node_key: [u8; 32],
        /// Its MAC over the nonce, key and ticket.
        mac: [u8; 32],
        /// Its ticket.
        ticket: &'a [u8],
    },
    /// Authenticated.
    Accepted {
        /// The relay's MAC.
        mac: [u8; 32],
    },
    /// Refused (the relay closes the connection).
    Rejected {
        /// Why.
        reason: &'a str,
    },
    /// Forward `payload` to `dst`.
    Send {
        /// Destination node key.
        dst: [u8; 32],
        /// Opaque bytes.
        payload: &'a [u8],
    },
    /// `payload` from `src`.
    Recv {
        /// Source node key.
        src: [u8; 32],
        /// Opaque bytes.
        payload: &'a [u8],
    },
    /// The destination of an earlier `Send` is not connected to this relay.
    PeerGone {
        /// The node key.
        key: [u8; 32],
    },
    /// A refreshed ticket.
    Ticket {
        /// The ticket.
        ticket: &'a [u8],
    },
    /// The node's whole list of sources the relay must not forward to it (replacing the one
    /// before; empty: none), at most [`MAX_REFUSED`]: nodes that are not its peers. Read the
    /// keys with [`refused_keys`].
    Refuse {
        /// The keys, 32 bytes each.
        keys: &'a [u8],
    },
    /// Latency probe.
    Ping {
        /// Echoed in the pong.
        data: [u8; 8],
    },
    /// Answer to a ping.
    Pong {
        /// The ping's data.
        data: [u8; 8],
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed relay frame")]
pub struct Malformed;

fn arr<const N: usize>(b: &[u8]) -> Result<[u8; N], Malformed> {
    b.get(..N).and_then(|s| s.try_into().ok()).ok_or(Malformed)
}

/// Decodes one frame.
pub fn decode(b: &[u8]) -> Result<Frame<'_>, Malformed> {
    let (&kind, body) = b.split_first().ok_or(Malformed)?;
    if body.len() > MAX_FRAME {
        return Err(Malformed);
    }
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(Malformed)
        }
    };
    Ok(match kind {
        0x01 => {
            exact(33)?;
            Frame::Challenge {
                version: body[0],
                nonce: arr(&body[1..])?,
            }
        }
        0x02 => {
            if body.len() < 64 {
                return Err(Malformed);
            }
            Frame::Auth {
                node_key: arr(body)?,
                mac: arr(&body[32..])?,
                ticket: &body[64..],
            }
        }
        0x03 => {
            exact(32)?;
            Frame::Accepted { mac: arr(body)? }
        }
        0x04 => Frame::Rejected {
            reason: std::str::from_utf8(body).map_err(|_| Malformed)?,
        },
        0x10 | 0x11 => {
            if body.len() < 32 || body.len() - 32 > MAX_PAYLOAD {
                return Err(Malformed);
            }
            let key = arr(body)?;
            let payload = &body[32..];
            if kind == 0x10 {
                Frame::Send { dst: key, payload }
            } else {
                Frame::Recv { src: key, payload }
            }
        }
        0x12 => {
            exact(32)?;
            Frame::PeerGone { key: arr(body)? }
        }
        0x20 => Frame::Ticket { ticket: body },
        0x21 => {
            if body.len() % 32 != 0 || body.len() / 32 > MAX_REFUSED {
                return Err(Malformed);
            }
            Frame::Refuse { keys: body }
        }
        0x30 | 0x31 => {
            exact(8)?;
            let data = arr(body)?;
            if kind == 0x30 {
                Frame::Ping { data }
            } else {
                Frame::Pong { data }
            }
        }
        _ => return Err(Malformed),
    })
}

/// Encodes a frame.
pub fn encode(f: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match f {
        Frame::Challenge { version, nonce } => {
            out.push(0x01);
            out.push(*version);
            out.extend_from_slice(nonce);
        }
        Frame::Auth {
            node_key,
            mac,
            ticket,
        } => {
            out.push(0x02);
            out.extend_from_slice(node_key);
            out.extend_from_slice(mac);
            out.extend_from_slice(ticket);
        }
        Frame::Accepted { mac } => {
            out.push(0x03);
            out.extend_from_slice(mac);
        }
        Frame::Rejected { reason } => {
            out.push(0x04);
            out.extend_from_slice(reason.as_bytes());
        }
        Frame::Send { dst: key, payload } | Frame::Recv { src: key, payload } => {
            out.reserve(payload.len());
            out.push(if matches!(f, Frame::Send { .. }) {
                0x10
            } else {
                0x11
            });
            out.extend_from_slice(key);
            out.extend_from_slice(payload);
        }
        Frame::PeerGone { key } => {
            out.push(0x12);
            out.extend_from_slice(key);
        }
        Frame::Ticket { ticket } => {
            out.push(0x20);
            out.extend_from_slice(ticket);
        }
        Frame::Refuse { keys } => {
            out.push(0x21);
            out.extend_from_slice(keys);
        }
        Frame::Ping { data } => {
            out.push(0x30);
            out.extend_from_slice(data);
        }
        Frame::Pong { data } => {
            out.push(0x31);
            out.extend_from_slice(data);
        }
    }
    out
}

/// Encodes a `Refuse` frame naming `keys` (the first [`MAX_REFUSED`]).
pub fn encode_refuse(keys: &[[u8; 32]]) -> Vec<u8> {
    let keys = &keys[..keys.len().min(MAX_REFUSED)];
    let mut out = Vec::with_capacity(1 + 32 * keys.len());
    out.push(0x21);
    for k in keys {
        out.extend_from_slice(k);
    }
    out
}

/// The keys of a decoded `Refuse` frame.
pub fn refused_keys(keys: &[u8]) -> impl Iterator<Item = [u8; 32]> + '_ {
    keys.chunks_exact(32).filter_map(|k| k.try_into().ok())
}

/// Encodes a `Send` or `Recv` without building a [`Frame`]: `kind` byte, key, payload.
pub fn encode_packet(recv: bool, key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PACKET_HEADER + payload.len());
    out.push(if recv { 0x11 } else { 0x10 });
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
    out
}

/// Turns an encoded `Send` frame into the `Recv` frame its destination gets from `src`, in
/// place (both have a 32-byte key after the kind); false, and `frame` untouched, when it is
/// not a `Send` frame.
pub fn send_to_recv(frame: &mut [u8], src: &[u8; 32]) -> bool {
    if frame.len() < PACKET_HEADER || frame[0] != 0x10 {
        return false;
    }
    frame[0] = 0x11;
    frame[1..PACKET_HEADER].copy_from_slice(src);
    true
}

fn auth_key(mine: &StaticKeypair, theirs: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    mine.shared_key(theirs, AUTH_LABEL)
}

/// The node's MAC for `Auth`. `None` if the relay key is unusable (low order).
pub fn client_mac(
    node: &StaticKeypair,
    relay_key: &[u8; 32],
    nonce: &[u8; 32],
    ticket: &[u8],
) -> Option<[u8; 32]> {
    let k = auth_key(node, relay_key)?;
    Some(hybrid::mac(
        k.as_slice(),
        &[b"client", nonce, &node.public(), ticket],
    ))
}

/// The relay's MAC for `Accepted`.
pub fn server_mac(
    relay: &StaticKeypair,
    node_key: &[u8; 32],
    nonce: &[u8; 32],
) -> Option<[u8; 32]> {
    let k = auth_key(relay, node_key)?;
    Some(hybrid::mac(k.as_slice(), &[b"server", nonce, node_key]))
}

/// Checks the node's MAC (constant time).
pub fn check_client_mac(
    relay: &StaticKeypair,
    node_key: &[u8; 32],
    nonce: &[u8; 32],
    ticket: &[u8],
    mac: &[u8; 32],
) -> bool {
    let Some(k) = auth_key(relay, node_key) else {
        return false;
    };
    let want = hybrid::mac(k.as_slice(), &[b"client", nonce, node_key, ticket]);
    ct_eq(&want, mac)
}

/// Checks the relay's MAC (constant time).
pub fn check_server_mac(
    node: &StaticKeypair,
    relay_key: &[u8; 32],
    nonce: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    let Some(k) = auth_key(node, relay_key) else {
        return false;
    };
    let want = hybrid::mac(k.as_slice(), &[b"server", nonce, &node.public()]);
    ct_eq(&want, mac)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Prefixes a frame with its 2-byte length, for the QUIC stream.
pub fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + frame.len());
    out.extend_from_slice(&u16::try_from(frame.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(frame);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn a_send_frame_becomes_the_recv_frame_encode_would_build() {
        let (dst, src, payload) = ([1u8; 32], [2u8; 32], b"wireguard bytes");
        let mut f = encode_packet(false, &dst, payload);
        assert!(send_to_recv(&mut f, &src));
        assert_eq!(f, encode_packet(true, &src, payload));
        assert_eq!(
            decode(&f),
            Ok(Frame::Recv {
                src,
                payload: &payload[..]
            })
        );
        // Anything else is left alone: a Recv frame, a short one, another kind.
        for mut other in [
            f.clone(),
            vec![0x10; 32],
            encode(&Frame::Ping { data: [0; 8] }),
        ] {
            let before = other.clone();
            assert!(!send_to_recv(&mut other, &src));
            assert_eq!(other, before);
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let frames = [
            Frame::Challenge {
                version: 1,
                nonce: [3; 32],
            },
            Frame::Auth {
                node_key: [1; 32],
                mac: [2; 32],
                ticket: b"ticket-bytes",
            },
            Frame::Accepted { mac: [4; 32] },
            Frame::Rejected {
                reason: "ticket expired",
            },
            Frame::Send {
                dst: [5; 32],
                payload: b"wg",
            },
            Frame::Recv {
                src: [6; 32],
                payload: &[0u8; MAX_PAYLOAD],
            },
            Frame::PeerGone { key: [7; 32] },
            Frame::Ticket { ticket: b"t" },
            Frame::Refuse { keys: &[] },
            Frame::Refuse {
                keys: &[10; 32 * MAX_REFUSED],
            },
            Frame::Ping { data: [8; 8] },
            Frame::Pong { data: [9; 8] },
        ];
        for f in frames {
            let b = encode(&f);
            assert_eq!(decode(&b), Ok(f.clone()), "{f:?}");
        }
        assert_eq!(
            encode_packet(true, &[6; 32], b"x"),
            encode(&Frame::Recv {
                src: [6; 32],
                payload: b"x"
            })
        );
        let mut too_big = encode_packet(false, &[1; 32], &[0u8; MAX_PAYLOAD]);
        too_big.push(0);
        assert_eq!(decode(&too_big), Err(Malformed));
        assert_eq!(decode(&[]), Err(Malformed));
        assert_eq!(decode(&[0x30, 1, 2]), Err(Malformed));
        assert_eq!(decode(&[0x99]), Err(Malformed));
        // A Refuse frame holds whole keys, no more than MAX_REFUSED of them.
        assert_eq!(decode(&[0x21; 32]), Err(Malformed));
        let keys: Vec<[u8; 32]> = (0..=MAX_REFUSED as u8).map(|i| [i; 32]).collect();
        let mut too_many = encode_refuse(&keys);
        assert_eq!(
            too_many.len(),
            1 + 32 * MAX_REFUSED,
            "encode keeps the first ones"
        );
        let Ok(Frame::Refuse { keys: got }) = decode(&too_many) else {
            panic!("not a Refuse frame");
        };
        assert!(refused_keys(got).eq(keys[..MAX_REFUSED].iter().copied()));
        too_many.extend_from_slice(&[0; 32]);
        assert_eq!(decode(&too_many), Err(Malformed));
    }

    #[test]
    fn the_macs_prove_each_side_holds_its_key() {
        let mut rng = StdRng::seed_from_u64(1);
        let node = StaticKeypair::generate(&mut rng);
        let relay = StaticKeypair::generate(&mut rng);
        let other = StaticKeypair::generate(&mut rng);
        let nonce = [5u8; 32];
        let mac = client_mac(&node, &relay.public(), &nonce, b"t").unwrap();
        assert!(check_client_mac(&relay, &node.public(), &nonce, b"t", &mac));
        // Another nonce, ticket or claimed key fails; so does a MAC from a third key.
        assert!(!check_client_mac(
            &relay,
            &node.public(),
            &[6; 32],
            b"t",
            &mac
        ));
        assert!(!check_client_mac(
            &relay,
            &node.public(),
            &nonce,
            b"u",
            &mac
        ));
        assert!(!check_client_mac(
            &relay,
            &other.public(),
            &nonce,
            b"t",
            &mac
        ));
        let forged = client_mac(&other, &relay.public(), &nonce, b"t").unwrap();
        assert!(!check_client_mac(
            &relay,
            &node.public(),
            &nonce,
            b"t",
            &forged
        ));
        let smac = server_mac(&relay, &node.public(), &nonce).unwrap();
        assert!(check_server_mac(&node, &relay.public(), &nonce, &smac));
        let fake = server_mac(&other, &node.public(), &nonce).unwrap();
        assert!(!check_server_mac(&node, &relay.public(), &nonce, &fake));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
        }
    }
}
