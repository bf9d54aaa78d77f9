//! One WireGuard tunnel per peer, run by the core's own WireGuard ([`crate::wg`]).
//!
//! This module is the seam between the rest of the core and WireGuard's protocol (STYLE S6):
//! WireGuard's timers (rekey after 120 s, retransmit after 5 s) run on the core's clock, so
//! the simulator drives them too, and the handshakes' ephemeral keys come from the core's
//! seeded randomness. Messages travel through the core as gotatun's `WgKind` (a parsed view of
//! the bytes).
//!
//! A [`Tunnel`] is a shared handle: the core keeps one per peer, and a shell that runs the
//! data plane on several threads encrypts and decrypts with it outside the core (see
//! [`crate::CryptoJob`]). A thread with a run of packets for one tunnel takes its lock once
//! for the run ([`Tunnel::lock`]) to take a sending counter or find the session for each
//! packet ([`SealSlot`], [`OpenSlot`]), and runs the AEAD after letting go of it: one peer's
//! two directions, and packets of one direction read on different threads, are sealed and
//! opened at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gotatun::noise::index_table::IndexTable;
use gotatun::packet::{Packet, WgKind};
use parking_lot::{Mutex, MutexGuard};
use rand_09::rngs::StdRng;

use crate::wg::{self, Identity, Outcome, handshake::Received};

/// A peer's WireGuard state: a handle to it, cloned into crypto jobs.
#[derive(Clone)]
pub(crate) struct Tunnel {
    inner: Arc<Mutex<Inner>>,
}

pub(crate) struct Inner {
    peer: wg::Peer,
    /// The wall clock (time since 1970) at an instant, for handshake timestamps.
    wall: (Instant, Duration),
}

/// What a message from the peer led to.
pub(crate) enum Opened {
    /// A data packet, or a keepalive (empty). `established`: it confirmed a session the
    /// peer's handshake made, so what waited for one can go ([`Tunnel::queued`]).
    Packet { inner: Packet, established: bool },
    /// The answer to the peer's handshake.
    Reply(WgKind),
    /// A session was made or confirmed: send what [`Tunnel::queued`] returns.
    Established,
    /// Taken; nothing to do (a cookie).
    Nothing,
    /// Refused.
    Err(wg::Error),
}

/// A counter of the sending session, taken under the tunnel's lock for one packet: the AEAD
/// runs after the lock is let go ([`Inner::seal_slot`]).
pub(crate) struct SealSlot {
    session: Arc<wg::Session>,
    counter: u64,
    mtu: usize,
}

impl SealSlot {
    /// Seals `packet` with this slot's counter, in its own buffer when it has the room
    /// ([`wg::session::SEAL_ROOM`]), else in a new one.
    pub(crate) fn seal_owned(&self, mut packet: Packet) -> Option<WgKind> {
        let bytes = std::mem::take(packet.buf_mut());
        kind(self.session.seal_in_place(self.counter, bytes, self.mtu))
    }
}

/// The session a data message names, found under the tunnel's lock: the AEAD runs after the
/// lock is let go ([`Inner::open_slot`]), and [`Inner::opened`] notes what it found.
///
/// Its replay window is kept by the threads that take the lock, not by those that run the AEAD
/// (which may be several for one session's messages at once): [`Inner::open_slot`] finds no
/// slot for a counter already seen, so a replay costs no AEAD, and [`Inner::opened`] marks the
/// counter, refusing a copy opened at the same time as one accepted first.
pub(crate) struct OpenSlot {
    session: Arc<wg::Session>,
    next: bool,
    /// The message's counter: checked when the slot was found, marked when it is accepted.
    counter: u64,
}

impl OpenSlot {
    /// Opens `message` in place: the packet (empty for a keepalive), not yet accepted.
    pub(crate) fn open(&self, now: Instant, message: WgKind) -> Result<Packet, wg::Error> {
        let mut packet: Packet = message.into();
        let bytes = std::mem::take(packet.buf_mut());
        let (counter, packet) = self.session.open_unmarked_in_place(now, bytes)?;
        debug_assert_eq!(counter, self.counter, "the counter its slot was found for");
        Ok(Packet::from_bytes(packet))
    }
}

/// Statistics for status output.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TunnelStats {
    pub(crate) since_handshake: Option<Duration>,
    pub(crate) tx_bytes: usize,
    pub(crate) rx_bytes: usize,
    pub(crate) handshakes: u64,
}

/// Our message as gotatun's parsed view; every message the core's WireGuard makes parses.
fn kind(msg: BytesMut) -> Option<WgKind> {
    Packet::from_bytes(msg).try_into_wg().ok()
}

impl Tunnel {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        me: Arc<Identity>,
        peer: [u8; 32],
        psk: Option<[u8; 32]>,
        index_table: IndexTable<StdRng>,
        seed: [u8; 32],
        mtu: u16,
        now: Instant,
        wall: Duration,
    ) -> Self {
        let inner = Inner {
            peer: wg::Peer::new(
                me,
                peer,
                psk.unwrap_or([0; 32]),
                index_table,
                seed,
                usize::from(mtu),
            ),
            wall: (now, wall),
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// Whether `other` is a handle to this very tunnel (not a later one for the same peer).
    pub(crate) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Answers the peer's initiation (read with [`wg::peer::read_initiation`]).
    pub(crate) fn answer(&self, now: Instant, received: Received) -> Opened {
        match self.inner.lock().peer.answer(now, received) {
            Ok(reply) => kind(reply).map_or(Opened::Err(wg::Error::Malformed), Opened::Reply),
            Err(e) => Opened::Err(e),
        }
    }

    /// Processes a response, cookie reply or data message from the peer.
    pub(crate) fn receive(&self, now: Instant, message: WgKind) -> Opened {
        self.inner.lock().receive(now, message)
    }

    /// The tunnel itself, for several packets in a row; release it with
    /// `MutexGuard::unlock_fair` so that a thread waiting for it gets it next.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Uses `psk` for future handshakes; the current session keeps working until rekeyed.
    pub(crate) fn set_psk(&self, psk: [u8; 32]) {
        self.inner.lock().peer.set_psk(psk);
    }

    /// Starts a handshake now, replacing one in flight (the core asks for one when the
    /// preshared key changed, which its authenticated key exchange says).
    pub(crate) fn initiate(&self, now: Instant) -> Option<WgKind> {
        let inner = &mut *self.inner.lock();
        let wall = inner.wall_at(now);
        inner.peer.initiate(now, wall, true).and_then(kind)
    }

    /// Starts a handshake unless one is in flight or one was sent less than Rekey-Timeout ago
    /// (the core asks for one when the peer seems to use a session we lost, which nothing
    /// authenticates: whoever can send from the peer's address can ask, and must not be able
    /// to replace a handshake in flight or make one more often than WireGuard would).
    pub(crate) fn initiate_unless_recent(&self, now: Instant) -> Option<WgKind> {
        let inner = &mut *self.inner.lock();
        let wall = inner.wall_at(now);
        inner.peer.initiate_if_idle(now, wall).and_then(kind)
    }

    /// Packets that waited for a session, now encrypted (or a keepalive that confirms a new
    /// session to its responder).
    pub(crate) fn queued(&self, now: Instant) -> Vec<WgKind> {
        let sealed = self.inner.lock().peer.queued(now);
        sealed.into_iter().filter_map(kind).collect()
    }

    /// Runs WireGuard's timers (the wall clock reads `wall` now); may return a keepalive or a
    /// handshake to send.
    pub(crate) fn update_timers(&self, now: Instant, wall: Duration) -> Option<WgKind> {
        let inner = &mut *self.inner.lock();
        inner.wall = (now, wall);
        inner.peer.update_timers(now, wall).and_then(kind)
    }

    pub(crate) fn stats(&self, now: Instant) -> TunnelStats {
        let s = self.inner.lock().peer.stats(now);
        TunnelStats {
            since_handshake: s.since_handshake,
            tx_bytes: usize::try_from(s.tx_bytes).unwrap_or(usize::MAX),
            rx_bytes: usize::try_from(s.rx_bytes).unwrap_or(usize::MAX),
            handshakes: s.handshakes,
        }
    }
}

impl Inner {
    fn wall_at(&self, now: Instant) -> Duration {
        self.wall.1 + now.saturating_duration_since(self.wall.0)
    }

    /// Encrypts a packet for the peer; may instead return a handshake initiation (the packet
    /// is queued until the handshake completes).
    pub(crate) fn encapsulate(&mut self, now: Instant, packet: &Packet) -> Option<WgKind> {
        let wall = self.wall_at(now);
        self.peer.send(now, wall, packet).and_then(kind)
    }

    /// A counter to seal a packet of `len` bytes with, noted as sent; `None` when there is no
    /// session (then [`Inner::encapsulate`] queues the packet and starts a handshake).
    pub(crate) fn seal_slot(&mut self, now: Instant, len: usize) -> Option<SealSlot> {
        let (session, counter) = self.peer.reserve(now, len)?;
        Some(SealSlot {
            session,
            counter,
            mtu: self.peer.mtu(),
        })
    }

    /// The session the data message with receiver index `index` and `counter` names, if any
    /// and if that counter may still be accepted ([`Inner::receive`] refuses the rest without
    /// their AEAD).
    pub(crate) fn open_slot(&self, index: u32, counter: u64) -> Option<OpenSlot> {
        let (session, next) = self.peer.receiving(index)?;
        session.fresh(counter).then(|| OpenSlot {
            session: Arc::clone(session),
            next,
            counter,
        })
    }

    /// Accepts a data message opened through `slot`, `len` bytes of packet, and notes it:
    /// whether it confirmed a session (then what waited for one can go), or `Err` for a
    /// replay (a copy of it was accepted since its slot was found).
    pub(crate) fn opened(
        &mut self,
        now: Instant,
        slot: &OpenSlot,
        len: usize,
    ) -> Result<bool, wg::Error> {
        if !slot.session.accept(slot.counter) {
            return Err(wg::Error::Replayed);
        }
        Ok(self.peer.opened(now, &slot.session, slot.next, len))
    }

    /// [`Tunnel::receive`] on a locked tunnel.
    pub(crate) fn receive(&mut self, now: Instant, message: WgKind) -> Opened {
        let mut packet: Packet = message.into();
        let bytes = std::mem::take(packet.buf_mut());
        match self.peer.receive(now, bytes) {
            Ok(Outcome::Deliver {
                packet,
                established,
            }) => Opened::Packet {
                inner: Packet::from_bytes(packet),
                established,
            },
            Ok(Outcome::Keepalive) => Opened::Packet {
                inner: Packet::from_bytes(BytesMut::new()),
                established: false,
            },
            Ok(Outcome::Established) => Opened::Established,
            Ok(Outcome::Nothing) => Opened::Nothing,
            Err(e) => Opened::Err(e),
        }
    }
}
