//! One WireGuard tunnel per peer, run by gotatun's `Tunn`.
//!
//! This module is the seam between the sans-IO core and gotatun (STYLE S6). gotatun reads the
//! monotonic clock inside `noise/timers.rs` and draws handshake ephemerals from the OS, so
//! WireGuard's own timers (rekey after 120 s, retransmit after 5 s) follow real time even when
//! the rest of the core runs on virtual time; simulator tests therefore exercise paths and
//! policy, not WireGuard's timers. Everything else the `Tunn` needs (index allocation, retry
//! jitter) is seeded by the core.
//!
//! A [`Tunnel`] is a shared handle: the core keeps one per peer, and a shell that runs the
//! data plane on several threads encrypts and decrypts with it outside the core (see
//! [`crate::CryptoJob`]). gotatun's `Tunn` takes `&mut self` for every packet, so one
//! peer's packets pass through its tunnel one at a time (a short lock around the AEAD);
//! different peers' packets, and one peer's two directions between packets, run in parallel.
//! A thread with a run of packets for one tunnel takes its lock once for the run
//! ([`Tunnel::lock`]) and hands it on fairly.

use std::sync::Arc;
use std::time::Duration;

use gotatun::noise::errors::WireGuardError;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519::{PublicKey, StaticSecret};
use parking_lot::{Mutex, MutexGuard};
use rand_09::rngs::StdRng;

/// A peer's WireGuard state: a handle to it, cloned into crypto jobs.
#[derive(Clone)]
pub(crate) struct Tunnel {
    inner: Arc<Mutex<Inner>>,
}

pub(crate) struct Inner {
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
        let inner = Inner {
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
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// Whether `other` is a handle to this very tunnel (not a later one for the same peer).
    pub(crate) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Processes a WireGuard message from the peer.
    pub(crate) fn decapsulate(&self, packet: WgKind) -> TunnResult {
        self.inner.lock().decapsulate(packet)
    }

    /// The tunnel itself, for several packets in a row; release it with
    /// `MutexGuard::unlock_fair` so that a thread waiting for it gets it next.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Uses `psk` for future handshakes; the current session keeps working until rekeyed.
    pub(crate) fn set_psk(&self, psk: [u8; 32]) {
        self.inner.lock().tunn.set_preshared_key(Some(psk));
    }

    /// Starts a handshake now unless one is already in flight.
    pub(crate) fn initiate(&self) -> Option<WgKind> {
        self.inner
            .lock()
            .tunn
            .format_handshake_initiation(false)
            .map(Into::into)
    }

    /// Packets that waited for a handshake, now encrypted.
    pub(crate) fn queued(&self) -> Vec<WgKind> {
        let inner = &mut *self.inner.lock();
        inner.tunn.get_queued_packets(&mut inner.mtu).collect()
    }

    /// Runs WireGuard's timers; may return a keepalive or a handshake to send.
    pub(crate) fn update_timers(&self) -> Result<Option<WgKind>, WireGuardError> {
        self.inner.lock().tunn.update_timers()
    }

    pub(crate) fn stats(&self) -> TunnelStats {
        let inner = self.inner.lock();
        let (since_handshake, tx_bytes, rx_bytes, _, _) = inner.tunn.stats();
        TunnelStats {
            since_handshake,
            tx_bytes,
            rx_bytes,
            handshakes: inner.handshakes,
        }
    }
}

impl Inner {
    /// Encrypts a packet for the peer; may instead return a handshake initiation (the packet
    /// is queued until the handshake completes).
    pub(crate) fn encapsulate(&mut self, packet: Packet) -> Option<WgKind> {
        self.tunn
            .handle_outgoing_packet(packet, Some(&mut self.mtu))
    }

    /// [`Tunnel::decapsulate`] on a locked tunnel.
    pub(crate) fn decapsulate(&mut self, packet: WgKind) -> TunnResult {
        let handshake = matches!(packet, WgKind::HandshakeInit(_) | WgKind::HandshakeResp(_));
        let result = self.tunn.handle_incoming_packet(packet);
        if handshake && matches!(result, TunnResult::WriteToNetwork(_)) {
            self.handshakes += 1;
        }
        result
    }
}
