//! Telling apart what arrives on the node's UDP port (and through relays): WireGuard, STUN,
//! or Lattice's own frames.
//!
//! WireGuard never sees an address. Each peer's tunnel is reached through a stable per-peer
//! handle (its node key), and [`crate::path::PathState`] resolves that handle to where packets
//! go right now, so changing the path never touches WireGuard state.

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

/// Whether `b` looks like a WireGuard transport-data message (type 4), the one kind that
/// carries a peer's traffic; the others (handshakes, cookie replies) are rare.
pub fn is_wireguard_data(b: &[u8]) -> bool {
    b.len() >= 4 && b[..4] == [4, 0, 0, 0]
}

/// The receiver index of what looks like a WireGuard transport-data message: type 4 and at
/// least its 16-byte header and 16-byte tag. Whoever opens it checks the rest.
pub fn data_receiver(b: &[u8]) -> Option<u32> {
    const MIN_DATA: usize = 32;
    if b.len() < MIN_DATA || !is_wireguard_data(b) {
        return None;
    }
    Some(u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
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
        assert!(is_wireguard_data(&[4, 0, 0, 0, 9, 9]));
        assert!(
            !is_wireguard_data(&wg),
            "a handshake initiation is not data"
        );
        assert!(!is_wireguard_data(&[4, 0, 0]));
        assert!(!is_wireguard_data(&[4, 0, 1, 0]));
    }
}
