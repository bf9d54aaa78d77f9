//! The magicsock's two sans-IO jobs: telling apart what arrives on the node's one UDP port,
//! and mapping each peer to the path its packets currently take.
//!
//! WireGuard never sees an address. Each peer's tunnel is reached through a stable per-peer
//! handle (its node key), and [`PathState`] resolves that handle to where packets go right
//! now, so changing the path never touches WireGuard state.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Prefix of Lattice's own frames (disco, PQ handshake) on the shared UDP port. It cannot be
/// confused with WireGuard (first byte 1..=4 followed by three zeros) or STUN (first two bits
/// zero plus the magic cookie).
pub const FRAME_MAGIC: [u8; 4] = *b"LTC\x01";

/// What a datagram on the shared port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A STUN message.
    Stun,
    /// One of Lattice's own frames.
    Frame,
    /// A WireGuard message.
    WireGuard,
    /// Anything else (dropped and counted).
    Unknown,
}

const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// Classifies a datagram by its signature.
pub fn classify(b: &[u8]) -> DatagramKind {
    if b.len() >= 4 && (1..=4).contains(&b[0]) && b[1..4] == [0, 0, 0] {
        return DatagramKind::WireGuard;
    }
    if b.len() >= 20 && b[0] & 0xc0 == 0 && b[4..8] == STUN_MAGIC_COOKIE {
        return DatagramKind::Stun;
    }
    if b.starts_with(&FRAME_MAGIC) {
        return DatagramKind::Frame;
    }
    DatagramKind::Unknown
}

/// After this long without an authenticated packet from the confirmed address, handshakes go
/// to every candidate again.
const CONFIRMED_TRUST: Duration = Duration::from_secs(12);

/// Where one peer's packets go.
#[derive(Debug, Clone, Default)]
pub struct PathState {
    candidates: Vec<SocketAddr>,
    confirmed: Option<SocketAddr>,
    last_authenticated: Option<Instant>,
}

/// A peer's current path, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Packets go straight to this address.
    Direct(SocketAddr),
    /// No address has answered yet; packets are tried on every candidate.
    Probing,
    /// The peer reported no endpoint.
    None,
}

impl PathState {
    /// Replaces the peer's reported endpoints.
    pub fn set_candidates(&mut self, mut candidates: Vec<SocketAddr>) {
        candidates.dedup();
        candidates.truncate(16);
        self.candidates = candidates;
    }

    /// An authenticated packet arrived from `from`: that address works. Returns whether the
    /// path changed.
    pub fn learn(&mut self, now: Instant, from: SocketAddr) -> bool {
        self.last_authenticated = Some(now);
        let changed = self.confirmed != Some(from);
        self.confirmed = Some(from);
        changed
    }

    /// Where a data packet goes.
    pub fn data_target(&self) -> Option<SocketAddr> {
        self.confirmed.or_else(|| self.candidates.first().copied())
    }

    /// Where a handshake goes: the confirmed address while it is fresh, else every candidate
    /// (and the last confirmed one) so whichever works can answer.
    pub fn handshake_targets(&self, now: Instant) -> Vec<SocketAddr> {
        let fresh = self
            .last_authenticated
            .is_some_and(|t| now.saturating_duration_since(t) < CONFIRMED_TRUST);
        match self.confirmed {
            Some(c) if fresh => vec![c],
            _ => {
                let mut all: Vec<SocketAddr> = self.confirmed.into_iter().collect();
                for c in &self.candidates {
                    if !all.contains(c) {
                        all.push(*c);
                    }
                }
                all
            }
        }
    }

    /// The path for status output.
    pub fn current(&self) -> Path {
        match (self.confirmed, self.candidates.is_empty()) {
            (Some(a), _) => Path::Direct(a),
            (None, false) => Path::Probing,
            (None, true) => Path::None,
        }
    }

    /// Whether `addr` is where this peer's packets are known or expected to come from.
    pub fn knows(&self, addr: SocketAddr) -> bool {
        self.confirmed == Some(addr) || self.candidates.contains(&addr)
    }

    /// When an authenticated packet last arrived.
    pub fn last_authenticated(&self) -> Option<Instant> {
        self.last_authenticated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_signature() {
        let mut wg = vec![1u8, 0, 0, 0];
        wg.extend([0u8; 144]);
        assert_eq!(classify(&wg), DatagramKind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0, 9, 9]), DatagramKind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        stun.extend([0u8; 12]);
        assert_eq!(classify(&stun), DatagramKind::Stun);
        assert_eq!(classify(&stun[..19]), DatagramKind::Unknown);
        assert_eq!(classify(b"LTC\x01rest"), DatagramKind::Frame);
        assert_eq!(classify(b""), DatagramKind::Unknown);
        // QUIC greases its fixed bit; a QUIC long header must not look like ours.
        assert_eq!(classify(&[0xc3, 0, 0, 0, 1]), DatagramKind::Unknown);
    }

    #[test]
    fn handshakes_fan_out_until_an_address_answers() {
        let now = crate::test_epoch();
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let mut p = PathState::default();
        assert_eq!(p.current(), Path::None);
        p.set_candidates(vec![a, b]);
        assert_eq!(p.current(), Path::Probing);
        assert_eq!(p.handshake_targets(now), vec![a, b]);
        assert_eq!(p.data_target(), Some(a));
        assert!(p.learn(now, b));
        assert!(!p.learn(now, b));
        assert_eq!(p.current(), Path::Direct(b));
        assert_eq!(p.handshake_targets(now), vec![b]);
        assert_eq!(p.data_target(), Some(b));
        // silence: fan out again, confirmed first
        let later = now + Duration::from_secs(20);
        assert_eq!(p.handshake_targets(later), vec![b, a]);
    }
}
