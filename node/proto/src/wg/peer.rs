//! One peer's WireGuard state: the handshake in flight, up to three sessions, the packets
//! waiting for a session, and the timers of the whitepaper's section 6, all driven by the
//! caller's clock.
//!
//! Call order: [`Peer::send`] for each packet to the peer, [`Peer::receive`] for each message
//! from it (an initiation read first with [`read_initiation`], which tells whose it is),
//! [`Peer::update_timers`] at least every [`super::TIMER_GRANULARITY`], and
//! [`Peer::queued`] after anything that may have made a session ([`Outcome::Established`]).
//!
//! Sessions sit in three slots, as in the kernel's and wireguard-go's: `current` seals,
//! `previous` still opens what was sent before a rekey, and `next` holds the session a
//! responder made until the initiator's first data message confirms it (a responder never
//! sends with a key the initiator may not have).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gotatun::noise::index_table::IndexTable;
use rand::{Rng, RngExt};
use rand_09::rngs::StdRng;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use super::crypto::xopen;
use super::handshake::{
    self, Identity, Initiated, PublicKeyInfo, Received, Timestamp, consume_response, initiate,
    respond,
};
use super::message::{self, COOKIE_REPLY_LEN, INITIATION_LEN, Kind, RESPONSE_LEN, cookie_reply};
use super::session::{OpenError, Session};
use super::{
    COOKIE_REFRESH_TIME, KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT,
};
use hybrid::ErasingRng;

/// The most packets kept for a peer while its handshake runs (the oldest go first).
pub const QUEUE_MAX: usize = 128;
/// Initiations from one peer closer together than this are dropped (wireguard-go allows 50 a
/// second): a flood of valid initiations cannot make us answer faster.
const INITIATION_MIN_GAP: Duration = Duration::from_millis(20);
/// The most a retransmitted initiation waits beyond [`REKEY_TIMEOUT`].
const REKEY_JITTER_MAX: Duration = Duration::from_millis(333);
/// A session we started is rekeyed when data arrives this close to its end (whitepaper 6.2:
/// Reject-After-Time minus Keepalive-Timeout minus Rekey-Timeout).
const REKEY_ON_RECEIVE: Duration = Duration::from_secs(165);

/// Why a message was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a WireGuard message this peer can take (wrong length or type, or an initiation
    /// that must go through [`Peer::answer`]).
    #[error("malformed message")]
    Malformed,
    /// It does not authenticate.
    #[error("message does not authenticate")]
    Invalid,
    /// An initiation from another key than this peer's.
    #[error("initiation from another peer")]
    WrongPeer,
    /// An initiation no newer than one already answered (a replay).
    #[error("replayed initiation")]
    ReplayedInitiation,
    /// An initiation too soon after the last one.
    #[error("initiation flood")]
    Flood,
    /// A response or cookie reply to no handshake in flight, or data for no session.
    #[error("no matching handshake or session")]
    NoSession,
    /// A data message seen before or too old.
    #[error("replayed data message")]
    Replayed,
    /// Data for a session past its lifetime.
    #[error("session expired")]
    Expired,
    /// A key of low order.
    #[error("bad key")]
    BadKey,
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Replayed => Self::Replayed,
            OpenError::Invalid => Self::Invalid,
            OpenError::Expired => Self::Expired,
        }
    }
}

/// What a message from the peer led to.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to do (a cookie taken).
    Nothing,
    /// A keepalive: the peer is there, and sent no packet.
    Keepalive,
    /// A packet for the TUN device; `established` when it confirmed a session (then send
    /// what [`Peer::queued`] returns too).
    Deliver {
        /// The packet, its padding removed.
        packet: bytes::BytesMut,
        /// Whether it confirmed the session the peer's handshake made.
        established: bool,
    },
    /// A session was made or confirmed: send what [`Peer::queued`] returns.
    Established,
}

/// Reads an initiation addressed to `me`; `None` when it does not authenticate. Its `peer`
/// says which [`Peer`] answers it.
pub fn read_initiation(me: &Identity, msg: &[u8]) -> Option<Received> {
    handshake::consume_initiation(me, msg)
}

struct Pending {
    handshake: Initiated,
    /// Kept for the session it becomes.
    index: gotatun::noise::index_table::Index<StdRng>,
    /// The first try of this handshake, or the last reason to make one since (data to send, a
    /// rekey): the handshake is given up Rekey-Attempt-Time after it.
    first: Instant,
    retransmit_at: Instant,
    /// Whether a cookie reply already brought a retransmission of this handshake forward
    /// (once per handshake, retransmissions included).
    hurried: bool,
}

/// One peer's WireGuard state. See the module docs.
pub struct Peer {
    me: Arc<Identity>,
    remote: PublicKeyInfo,
    psk: Zeroizing<[u8; 32]>,
    indices: IndexTable<StdRng>,
    rng: ErasingRng,
    mtu: usize,
    pending: Option<Pending>,
    current: Option<Arc<Session>>,
    previous: Option<Arc<Session>>,
    next: Option<Arc<Session>>,
    /// The newest initiation timestamp answered; kept for the peer's life, so an old
    /// initiation never makes a session again.
    last_timestamp: Option<Timestamp>,
    /// The newest timestamp we sent (each initiation's is later).
    sent_timestamp: Option<Timestamp>,
    last_initiation_in: Option<Instant>,
    last_initiation_out: Option<Instant>,
    /// The mac1 of our last handshake message and its sender index (a cookie reply to it is
    /// sealed with it).
    last_mac1: Option<(u32, [u8; 16])>,
    cookie: Option<([u8; 16], Instant)>,
    queue: VecDeque<bytes::BytesMut>,
    /// Data sent and nothing heard since: a new handshake then.
    handshake_due: Option<Instant>,
    /// Data heard and nothing sent since: a keepalive then.
    keepalive_due: Option<Instant>,
    /// No new session by then: every key is dropped.
    zero_due: Option<Instant>,
    /// The session we started was near its end when data came: rekeyed once.
    rekeyed_on_receive: bool,
    last_handshake: Option<Instant>,
    tx_bytes: u64,
    rx_bytes: u64,
    handshakes: u64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("current", &self.current)
            .field("handshake_in_flight", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}

/// Statistics for status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Time since the last handshake completed.
    pub since_handshake: Option<Duration>,
    /// Bytes of data messages sealed.
    pub tx_bytes: u64,
    /// Bytes of data messages opened.
    pub rx_bytes: u64,
    /// Handshakes completed (either side's).
    pub handshakes: u64,
}

impl Peer {
    /// A peer with static key `remote`, using `psk` (all zeros for none).
    pub fn new(
        me: Arc<Identity>,
        remote: [u8; 32],
        psk: [u8; 32],
        indices: IndexTable<StdRng>,
        seed: [u8; 32],
        mtu: usize,
    ) -> Self {
        Self {
            me,
            remote: PublicKeyInfo::new(remote),
            psk: Zeroizing::new(psk),
            indices,
            rng: rand::SeedableRng::from_seed(seed),
            mtu,
            pending: None,
            current: None,
            previous: None,
            next: None,
            last_timestamp: None,
            sent_timestamp: None,
            last_initiation_in: None,
            last_initiation_out: None,
            last_mac1: None,
            cookie: None,
            queue: VecDeque::new(),
            handshake_due: None,
            keepalive_due: None,
            zero_due: None,
            rekeyed_on_receive: false,
            last_handshake: None,
            tx_bytes: 0,
            rx_bytes: 0,
            handshakes: 0,
        }
    }

    /// Uses `psk` from the next handshake on; the sessions made before keep working.
    pub fn set_psk(&mut self, psk: [u8; 32]) {
        self.psk = Zeroizing::new(psk);
    }

    /// The session that seals now, if one may.
    pub fn sending(&self, now: Instant) -> Option<&Arc<Session>> {
        self.current
            .as_ref()
            .filter(|s| s.alive(now) && s.sent() < super::REJECT_AFTER_MESSAGES)
    }

    /// Seals `packet` for the peer, or queues it and returns a handshake initiation (if one
    /// is due) when there is no session to seal it with.
    pub fn send(&mut self, now: Instant, wall: Duration, packet: &[u8]) -> Option<bytes::BytesMut> {
        if let Some((s, counter)) = self.reserve(now, packet.len()) {
            return Some(s.seal(counter, packet, self.mtu));
        }
        if self.queue.len() >= QUEUE_MAX {
            self.queue.pop_front();
        }
        self.queue.push_back(bytes::BytesMut::from(packet));
        self.initiate(now, wall, false)
    }

    /// Takes the sending session's next counter for a packet of `len` bytes and notes it as
    /// sent: the caller seals it with [`Session::seal`] (outside any lock of its own, and on
    /// any thread). `None` when there is no session to seal with ([`Peer::send`] then queues
    /// the packet and starts a handshake).
    pub fn reserve(&mut self, now: Instant, len: usize) -> Option<(Arc<Session>, u64)> {
        let s = Arc::clone(self.sending(now)?);
        let counter = s.reserve(1)?;
        self.sent_data(now, len);
        Some((s, counter))
    }

    /// The packet size sessions pad to at most.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Notes that a data message of `len` bytes of packet (0: a keepalive) was sealed.
    fn sent_data(&mut self, now: Instant, len: usize) {
        self.tx_bytes += (len + message::DATA_MIN_LEN) as u64;
        self.keepalive_due = None;
        if len > 0 && self.handshake_due.is_none() {
            self.handshake_due = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
    }

    /// The packets that waited for a session, sealed; after [`Outcome::Established`], a
    /// keepalive when nothing waited and this node started the handshake (it confirms the
    /// session to the responder).
    pub fn queued(&mut self, now: Instant) -> Vec<bytes::BytesMut> {
        let Some(s) = self.sending(now).cloned() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(self.queue.len().max(1));
        while let Some(p) = self.queue.pop_front() {
            let Some(counter) = s.reserve(1) else { break };
            out.push(s.seal(counter, &p, self.mtu));
            self.sent_data(now, p.len());
        }
        if out.is_empty()
            && s.initiator
            && s.sent() == 0
            && let Some(counter) = s.reserve(1)
        {
            out.push(s.seal(counter, &[], self.mtu));
            self.sent_data(now, 0);
        }
        out
    }

    /// Starts a handshake unless one is in flight or one was sent less than Rekey-Timeout
    /// ago. `force` skips both checks (a new preshared key): the new initiation replaces the
    /// one in flight. Either way a handshake in flight is given up Rekey-Attempt-Time after
    /// the last call (new data to send is a new reason to keep trying), not after its first
    /// try, as the kernel and wireguard-go start their count of attempts again.
    pub fn initiate(
        &mut self,
        now: Instant,
        wall: Duration,
        force: bool,
    ) -> Option<bytes::BytesMut> {
        if let Some(p) = &mut self.pending {
            p.first = now;
        }
        self.initiation(now, wall, force)
    }

    /// Starts a handshake unless one is in flight or one was sent less than Rekey-Timeout ago,
    /// for a reason nothing authenticates (the peer seems to use a session we lost): unlike
    /// [`Peer::initiate`] it leaves a handshake in flight alone, so such a reason never keeps
    /// one going past Rekey-Attempt-Time.
    pub fn initiate_if_idle(&mut self, now: Instant, wall: Duration) -> Option<bytes::BytesMut> {
        if self.pending.is_some() {
            return None;
        }
        self.initiation(now, wall, false)
    }

    /// [`Peer::initiate`], the count of attempts left alone (a retransmission passes `force`).
    fn initiation(&mut self, now: Instant, wall: Duration, force: bool) -> Option<bytes::BytesMut> {
        if !force
            && (self.pending.is_some()
                || self
                    .last_initiation_out
                    .is_some_and(|t| now.saturating_duration_since(t) < REKEY_TIMEOUT))
        {
            return None;
        }
        let mut ts = handshake::timestamp(wall);
        if let Some(last) = self.sent_timestamp
            && ts <= last
        {
            ts = later(last);
        }
        let (index, ephemeral, cookie) = self.handshake_inputs(now);
        let mut msg = bytes::BytesMut::zeroed(INITIATION_LEN);
        let buf: &mut [u8; INITIATION_LEN] = (&mut msg[..]).try_into().expect("the length");
        let handshake = initiate(
            &self.me,
            &self.remote,
            &ephemeral,
            index.value(),
            &ts,
            cookie.as_ref(),
            buf,
        )?;
        self.sent_timestamp = Some(ts);
        self.last_initiation_out = Some(now);
        self.last_mac1 = Some((index.value(), handshake.mac1));
        let jitter = self.rng.random_range(Duration::ZERO..=REKEY_JITTER_MAX);
        let (first, hurried) = self
            .pending
            .as_ref()
            .map_or((now, false), |p| (p.first, p.hurried));
        self.pending = Some(Pending {
            handshake,
            index,
            first,
            retransmit_at: now + REKEY_TIMEOUT + jitter,
            hurried,
        });
        Some(msg)
    }

    /// What a new handshake message needs: our index for the session it may make, an
    /// ephemeral private key, and the cookie for its mac2 if one is fresh.
    fn handshake_inputs(
        &mut self,
        now: Instant,
    ) -> (
        gotatun::noise::index_table::Index<StdRng>,
        Zeroizing<[u8; 32]>,
        Option<[u8; 16]>,
    ) {
        let index = self.indices.new_index();
        let mut ephemeral = Zeroizing::new([0u8; 32]);
        self.rng.fill_bytes(&mut *ephemeral);
        (index, ephemeral, self.fresh_cookie(now))
    }

    fn fresh_cookie(&self, now: Instant) -> Option<[u8; 16]> {
        self.cookie
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_REFRESH_TIME)
            .map(|(c, _)| c)
    }

    /// Answers an initiation read by [`read_initiation`]: the response to send.
    pub fn answer(&mut self, now: Instant, received: Received) -> Result<bytes::BytesMut, Error> {
        if received.peer.ct_eq(&self.remote.key).unwrap_u8() == 0 {
            return Err(Error::WrongPeer);
        }
        if self.last_timestamp.is_some_and(|t| received.timestamp <= t) {
            return Err(Error::ReplayedInitiation);
        }
        if self
            .last_initiation_in
            .is_some_and(|t| now.saturating_duration_since(t) < INITIATION_MIN_GAP)
        {
            return Err(Error::Flood);
        }
        let timestamp = received.timestamp;
        let (index, ephemeral, cookie) = self.handshake_inputs(now);
        let mut msg = bytes::BytesMut::zeroed(RESPONSE_LEN);
        let buf: &mut [u8; RESPONSE_LEN] = (&mut msg[..]).try_into().expect("the length");
        let keys = respond(
            received,
            &self.remote,
            &self.psk,
            &ephemeral,
            index.value(),
            cookie.as_ref(),
            buf,
        )
        .ok_or(Error::BadKey)?;
        let mac1: [u8; 16] = msg[message::response::MAC1..message::response::MAC1 + 16]
            .try_into()
            .expect("16 bytes");
        self.last_mac1 = Some((index.value(), mac1));
        self.last_timestamp = Some(timestamp);
        self.last_initiation_in = Some(now);
        let session = Session::new(
            index,
            keys.remote_index,
            &keys.send,
            &keys.receive,
            now,
            false,
        );
        // A responder's session waits in `next` for the initiator's first data; an older
        // unconfirmed one is replaced, and the previous session makes room.
        self.next = Some(Arc::new(session));
        self.previous = None;
        self.handshakes += 1;
        self.handshake_done(now);
        Ok(msg)
    }

    fn handshake_done(&mut self, now: Instant) {
        self.last_handshake = Some(now);
        self.zero_due = Some(now + REJECT_AFTER_TIME * 3);
        self.handshake_due = None;
    }

    /// Takes a message from the peer (a response, a cookie reply or data; an initiation goes
    /// through [`read_initiation`] and [`Peer::answer`]). A data message is opened in place:
    /// the packet delivered is `msg` itself, cut to the packet.
    pub fn receive(&mut self, now: Instant, msg: bytes::BytesMut) -> Result<Outcome, Error> {
        match message::kind(&msg).ok_or(Error::Malformed)? {
            Kind::Initiation => Err(Error::Malformed),
            Kind::Response => self.take_response(now, &msg),
            Kind::CookieReply => self.take_cookie(now, &msg),
            Kind::Data => self.take_data(now, msg),
        }
    }

    fn take_response(&mut self, now: Instant, msg: &[u8]) -> Result<Outcome, Error> {
        let receiver = message::u32_at(msg, message::response::RECEIVER);
        let pending = self
            .pending
            .take_if(|p| p.handshake.sender == receiver)
            .ok_or(Error::NoSession)?;
        let Some(keys) = consume_response(&self.me, &pending.handshake, &self.psk, msg) else {
            self.pending = Some(pending);
            return Err(Error::Invalid);
        };
        let session = Session::new(
            pending.index,
            keys.remote_index,
            &keys.send,
            &keys.receive,
            now,
            true,
        );
        self.previous = self.next.take().or_else(|| self.current.take());
        self.current = Some(Arc::new(session));
        self.rekeyed_on_receive = false;
        self.handshakes += 1;
        self.handshake_done(now);
        Ok(Outcome::Established)
    }

    fn take_cookie(&mut self, now: Instant, msg: &[u8]) -> Result<Outcome, Error> {
        debug_assert_eq!(msg.len(), COOKIE_REPLY_LEN);
        let receiver = message::u32_at(msg, cookie_reply::RECEIVER);
        let (_, mac1) = self
            .last_mac1
            .filter(|(i, _)| *i == receiver)
            .ok_or(Error::NoSession)?;
        let nonce: [u8; 24] = msg[cookie_reply::NONCE..cookie_reply::COOKIE]
            .try_into()
            .expect("24 bytes");
        let sealed: [u8; 32] = msg[cookie_reply::COOKIE..].try_into().expect("32 bytes");
        let cookie =
            xopen(&self.remote.cookie_key, &nonce, &mac1, &sealed).ok_or(Error::Invalid)?;
        self.cookie = Some((cookie, now));
        // The handshake it answers goes again with the cookie at the next tick of the timers
        // rather than after Rekey-Timeout: once per handshake, its retransmissions included, so
        // cookie replies (which only the peer, or one who sees our mac1, can make) never make
        // it retry faster than that.
        if let Some(p) = self
            .pending
            .as_mut()
            .filter(|p| p.index.value() == receiver && !p.hurried)
        {
            p.hurried = true;
            p.retransmit_at = now;
        }
        Ok(Outcome::Nothing)
    }

    /// The session `index` names, and whether it is the unconfirmed `next`.
    pub fn receiving(&self, index: u32) -> Option<(&Arc<Session>, bool)> {
        let is = |s: &&Arc<Session>| s.local_index() == index;
        if let Some(s) = self.current.as_ref().filter(is) {
            return Some((s, false));
        }
        if let Some(s) = self.next.as_ref().filter(is) {
            return Some((s, true));
        }
        self.previous.as_ref().filter(is).map(|s| (s, false))
    }

    fn take_data(&mut self, now: Instant, msg: bytes::BytesMut) -> Result<Outcome, Error> {
        let index = message::u32_at(&msg, message::data::RECEIVER);
        let (session, next) = self.receiving(index).ok_or(Error::NoSession)?;
        let session = Arc::clone(session);
        let packet = session.open_in_place(now, msg)?;
        let established = self.opened(now, &session, next, packet.len());
        Ok(match (packet.is_empty(), established) {
            (true, true) => Outcome::Established,
            (true, false) => Outcome::Keepalive,
            (false, established) => Outcome::Deliver {
                packet,
                established,
            },
        })
    }

    /// Notes a data message with `len` bytes of packet opened with `session` (found by
    /// [`Peer::receiving`]; `next`: it was the unconfirmed one): whether it confirmed the
    /// session (then send what [`Peer::queued`] returns).
    pub fn opened(&mut self, now: Instant, session: &Session, next: bool, len: usize) -> bool {
        let established = next && self.confirm(session.local_index());
        self.received_data(now, session, len);
        established
    }

    /// The initiator used the session in `next` (index `index`): it becomes current.
    fn confirm(&mut self, index: u32) -> bool {
        if self.next.as_ref().is_none_or(|s| s.local_index() != index) {
            return false;
        }
        self.previous = self.current.take();
        self.current = self.next.take();
        true
    }

    /// Notes a data message with `len` bytes of packet opened with `session`.
    fn received_data(&mut self, now: Instant, session: &Session, len: usize) {
        self.rx_bytes += (len + message::DATA_MIN_LEN) as u64;
        self.handshake_due = None;
        if len > 0 && self.keepalive_due.is_none() {
            self.keepalive_due = Some(now + KEEPALIVE_TIMEOUT);
        }
        if session.initiator
            && !self.rekeyed_on_receive
            && now.saturating_duration_since(session.born) >= REKEY_ON_RECEIVE
            && self
                .current
                .as_ref()
                .is_some_and(|c| std::ptr::eq(&**c, session))
        {
            self.rekeyed_on_receive = true;
            // Picked up by the next timer run (it sends at most one message per call).
            self.handshake_due = Some(now);
        }
    }

    /// Runs the timers; a message to send (a handshake or a keepalive), if one is due.
    pub fn update_timers(&mut self, now: Instant, wall: Duration) -> Option<bytes::BytesMut> {
        if self.zero_due.is_some_and(|t| now >= t) {
            // Nothing new for three session lifetimes: forget every key and queued packet.
            self.zero_due = None;
            self.current = None;
            self.previous = None;
            self.next = None;
            self.pending = None;
            self.queue.clear();
            self.handshake_due = None;
            self.keepalive_due = None;
            return None;
        }
        if let Some(p) = &self.pending
            && now >= p.retransmit_at
        {
            if now.saturating_duration_since(p.first) >= REKEY_ATTEMPT_TIME {
                // Given up: the packets that waited go too.
                self.pending = None;
                self.queue.clear();
                self.handshake_due = None;
                return None;
            }
            return self.initiation(now, wall, true);
        }
        if self.pending.is_none()
            && let Some(s) = &self.current
            && s.initiator
            && s.sent() > 0
            && (now.saturating_duration_since(s.born) >= REKEY_AFTER_TIME
                || s.sent() >= REKEY_AFTER_MESSAGES)
            && let Some(m) = self.initiate(now, wall, false)
        {
            return Some(m);
        }
        if self.handshake_due.is_some_and(|t| now >= t) {
            self.handshake_due = None;
            if let Some(m) = self.initiate(now, wall, false) {
                return Some(m);
            }
        }
        if self.keepalive_due.is_some_and(|t| now >= t) {
            self.keepalive_due = None;
            if let Some(s) = self.sending(now).cloned()
                && let Some(counter) = s.reserve(1)
            {
                let msg = s.seal(counter, &[], self.mtu);
                self.sent_data(now, 0);
                return Some(msg);
            }
        }
        None
    }

    /// Statistics for status output.
    pub fn stats(&self, now: Instant) -> Stats {
        Stats {
            since_handshake: self
                .last_handshake
                .map(|t| now.saturating_duration_since(t)),
            tx_bytes: self.tx_bytes,
            rx_bytes: self.rx_bytes,
            handshakes: self.handshakes,
        }
    }

    /// Whether a handshake of ours waits for its answer.
    pub fn handshaking(&self) -> bool {
        self.pending.is_some()
    }
}

/// A timestamp one nanosecond step after `t`.
fn later(mut t: Timestamp) -> Timestamp {
    let n = u128::from_be_bytes({
        let mut b = [0u8; 16];
        b[4..].copy_from_slice(&t);
        b
    }) + 1;
    t.copy_from_slice(&n.to_be_bytes()[4..]);
    t
}
