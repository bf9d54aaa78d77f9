//! One WireGuard tunnel per peer, run by gotatun's `Tunn`.
//!
//! This module is the seam between the sans-IO core and gotatun (STYLE S6). gotatun reads the
//! monotonic clock inside `noise/timers.rs` and draws handshake ephemerals from the OS, so
//! WireGuard's own timers (rekey after 120 s, retransmit after 5 s) follow real time even when
//! the rest of the core runs on virtual time; simulator tests therefore exercise paths and
//! policy, not WireGuard's timers. Everything else the `Tunn` needs (index allocation, retry
//! jitter) is seeded by the core.

use std::sync::Arc;
use std::time::Duration;

use gotatun::noise::errors::WireGuardError;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519::{PublicKey, StaticSecret};
use rand_09::rngs::StdRng;

/// A peer's WireGuard state.
pub(crate) struct Tunnel {
    tunn: Tunn<StdRng>,
    mtu: MtuWatcher,
    handshakes: u64,
}

/// Statistics for status output.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TunnelStats {
    pub(crate) since_handshake: Option<Duration>,
    pub(crate) tx_bytes: usize,
    pub(crate) rx_bytes: usize,
    pub(crate) handshakes: u64,
}

impl Tunnel {
    pub(crate) fn new(
        private: &StaticSecret,
        peer: [u8; 32],
        psk: Option<[u8; 32]>,
        index_table: IndexTable<StdRng>,
        rate_limiter: Arc<RateLimiter>,
        jitter: StdRng,
        mtu: u16,
    ) -> Self {
        Self {
            tunn: Tunn::new_with_rng(
                private.clone(),
                PublicKey::from(peer),
                psk,
                None,
                index_table,
                rate_limiter,
                jitter,
            ),
            mtu: MtuWatcher::new(mtu),
            handshakes: 0,
        }
    }

    /// Encrypts a packet for the peer; may instead return a handshake initiation (the packet
    /// is queued until the handshake completes).
    pub(crate) fn encapsulate(&mut self, packet: Packet) -> Option<WgKind> {
        self.tunn
            .handle_outgoing_packet(packet, Some(&mut self.mtu))
    }

    /// Processes a WireGuard message from the peer.
    pub(crate) fn decapsulate(&mut self, packet: WgKind) -> TunnResult {
        let responder_handshake = matches!(packet, WgKind::HandshakeInit(_));
        let initiator_handshake = matches!(packet, WgKind::HandshakeResp(_));
        let result = self.tunn.handle_incoming_packet(packet);
        if (responder_handshake || initiator_handshake)
            && matches!(result, TunnResult::WriteToNetwork(_))
        {
            self.handshakes += 1;
        }
        result
    }

    /// Uses `psk` for future handshakes; the current session keeps working until rekeyed.
    pub(crate) fn set_psk(&mut self, psk: [u8; 32]) {
        self.tunn.set_preshared_key(Some(psk));
    }

    /// Starts a handshake now unless one is already in flight.
    pub(crate) fn initiate(&mut self) -> Option<WgKind> {
        self.tunn.format_handshake_initiation(false).map(Into::into)
    }

    /// Packets that waited for a handshake, now encrypted.
    pub(crate) fn queued(&mut self) -> Vec<WgKind> {
        self.tunn.get_queued_packets(&mut self.mtu).collect()
    }

    /// Runs WireGuard's timers; may return a keepalive or a handshake to send.
    pub(crate) fn update_timers(&mut self) -> Result<Option<WgKind>, WireGuardError> {
        self.tunn.update_timers()
    }

    pub(crate) fn stats(&self) -> TunnelStats {
        let (since_handshake, tx_bytes, rx_bytes, _, _) = self.tunn.stats();
        TunnelStats {
            since_handshake,
            tx_bytes,
            rx_bytes,
            handshakes: self.handshakes,
        }
    }
}
