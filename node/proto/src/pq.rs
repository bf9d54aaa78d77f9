//! The post-quantum key schedule of one peer pair (a sub-machine of [`crate::NodeState`]).
//!
//! Every tunnel's WireGuard preshared key comes from a hybrid handshake (Noise IKpsk2 over
//! X25519 carrying ML-KEM-768, see the `hybrid` crate):
//!
//! - **Who initiates** is fixed by the two node keys (the lower one), so both sides agree and
//!   there are never two exchanges racing. The responder asks for one with a nudge (a sealed
//!   disco message carrying its clock) when it needs a tunnel (traffic to send, or the peer
//!   talking to it with a key it lost). Only a nudge that authenticates and is fresh (newer than
//!   the last from that peer and within [`NUDGE_WINDOW`] of our clock) makes an initiator start
//!   over; nothing unauthenticated ever restarts a working key chain.
//! - **Chaining.** Each new key is `KDF(label, handshake hash, ML-KEM secret)` salted with the
//!   key it replaces. Message 1 names the key to chain from (by its public id); message 2 (which
//!   is authenticated) says which one the responder used: the same, or none when it no longer
//!   has it (after a restart). A reset chain is counted and shown; it is never a downgrade to a
//!   classical key.
//! - **Key confirmation.** The responder holds the key of an exchange it answered until the
//!   initiator proves it has the same key (a confirm message with a MAC under it); only then
//!   does it install it and acknowledge. So a replayed message 1 (from before a restart, when
//!   the responder no longer remembers which epochs it saw) can make it answer, but never
//!   replace a working key with one the initiator does not hold: the replay state no longer
//!   needs to survive restarts. The initiator installs at message 2 and confirms; the
//!   responder holds a WireGuard handshake that overtakes the confirmation until it arrives.
//! - **Forgery.** A message 2 that does not authenticate is ignored and the exchange stays in
//!   flight for the genuine answer, as WireGuard ignores packets that do not authenticate.
//! - **Replay.** Message 1 carries the initiator's wall-clock epoch; a responder answers only
//!   newer epochs, and answers an exact duplicate of the last message 1 with its cached
//!   message 2 (the initiator's retransmission), changing nothing.
//! - **Cookies.** Handshake frames carry `mac1`/`mac2` ([`crate::frame`]); a cookie reply from
//!   the responder is kept and used for the retransmission it triggers and later ones.
//! - **Installation.** The current WireGuard session continues with the old key (the tunnel
//!   takes the new key for its next handshake) and the initiator then starts a WireGuard handshake so the new key takes
//!   over at once. Keys rotate every `rotation` (2 minutes by default).

use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use hybrid::{InitiatorHandshake, Psk, Purpose, ResponderHandshake, StaticKeypair};
use rand::CryptoRng;
use subtle::ConstantTimeEq;
use wire::NodeKey;

use crate::addr::Addr;
use crate::disco::Message as Disco;
use crate::frame::{self, COOKIE_LIFETIME, Kind, MAC_LEN, Mac1Key};

/// Settings of the key schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PqConfig {
    /// How often the initiator replaces the key.
    pub rotation: Duration,
}

impl Default for PqConfig {
    fn default() -> Self {
        Self {
            rotation: Duration::from_secs(120),
        }
    }
}

const PAYLOAD_VERSION: u8 = 1;
const PAYLOAD_LEN: usize = 17;
const RETRANSMIT: Duration = Duration::from_secs(1);
const MAX_RETRANSMITS: u32 = 5;
const MIN_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const NUDGE_INTERVAL: Duration = Duration::from_secs(1);
/// A nudge further than this from our clock is refused (bounds replays across restarts).
pub const NUDGE_WINDOW: Duration = Duration::from_secs(300);
/// After this long without a key, a responder reports the peer as stalled.
const STALLED: Duration = Duration::from_secs(5);
/// How long a responder answers retransmissions of the last message 1 from its cache.
const RETRANSMIT_WINDOW: Duration = Duration::from_secs(10);
/// How long a responder holds a WireGuard handshake waiting for the confirmation of the key
/// it belongs to (the initiator's WireGuard retransmits after 5 s).
pub const HOLD_FOR_CONFIRM: Duration = Duration::from_secs(4);

/// Which side of the exchange this node is for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This node starts exchanges.
    Initiator,
    /// This node answers them.
    Responder,
}

/// The role of `me` towards `peer`.
pub fn role(me: &NodeKey, peer: &NodeKey) -> Role {
    if me.as_bytes() < peer.as_bytes() {
        Role::Initiator
    } else {
        Role::Responder
    }
}

/// Hash of a message 1, to recognise retransmissions.
pub fn message_hash(msg: &[u8]) -> [u8; 32] {
    Blake2s256::digest(msg).into()
}

/// The tag of a key confirmation (`ack` false) or its acknowledgement, under key `psk`.
fn confirm_tag(psk: &Psk, session: u32, ack: bool) -> [u8; 16] {
    let label: &[u8] = if ack {
        b"lattice pq confirm ack v1"
    } else {
        b"lattice pq confirm v1"
    };
    let full = hybrid::mac(psk.as_bytes(), &[label, &session.to_be_bytes()]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&full[..16]);
    tag
}

/// Why a handshake message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PqError {
    /// The message is for the other role (message 1 to an initiator, a nudge to a responder).
    #[error("message for the other role")]
    WrongRole,
    /// Message 1 with an epoch that is not newer than the last one accepted, or a nudge that
    /// is not fresh.
    #[error("replayed or stale message")]
    Replay,
    /// The payload inside an authenticated message was malformed.
    #[error("malformed handshake payload")]
    Malformed,
    /// A message failed authentication (ignored; the exchange stays in flight).
    #[error("message failed authentication")]
    Authentication,
    /// A message for no exchange in flight.
    #[error("message for no pending exchange")]
    NoPending,
    /// A message 1 already answered, arriving again through another path.
    #[error("message 1 already answered on another path")]
    Duplicate,
    /// A nudge within the minimum interval of the last one acted on.
    #[error("too soon after the last nudge")]
    TooSoon,
}

/// What the caller must do.
#[derive(Debug)]
pub enum PqAction {
    /// Send these frames to the peer (on its path, or every candidate while none is known).
    Send(Vec<Vec<u8>>),
    /// Send these frames back to where message 1 came from.
    Reply(Addr, Vec<Vec<u8>>),
    /// Seal this disco message for the peer and send it on its path.
    SendDisco(Disco),
    /// Seal this disco message for the peer and send it to this address.
    ReplyDisco(Addr, Disco),
    /// Use this preshared key from now on; with `rekey`, start a WireGuard handshake so it takes
    /// over the current session at once.
    Install {
        /// The new key.
        psk: Psk,
        /// Whether to rekey WireGuard now.
        rekey: bool,
    },
    /// (Responder) the initiator proved it holds the key of an exchange, from `from`: the
    /// path is live, and a WireGuard handshake held for the confirmation can go ahead.
    Confirmed {
        /// Where the confirmation came from.
        from: Addr,
    },
}

struct Epoch {
    psk: Psk,
    installed_at: Instant,
}

/// The responder's answer to the last message 1, for the initiator's retransmissions: only
/// to the same address and only for a short while, so a replay from elsewhere cannot make this
/// node send anything.
struct CachedResponse {
    msg1: [u8; 32],
    to: Addr,
    at: Instant,
    frames: Vec<Vec<u8>>,
}

/// (Responder) an exchange answered but not yet confirmed by the initiator.
struct Unconfirmed {
    session: u32,
    psk: Psk,
    answered_at: Instant,
    /// The initiator chained from a key we no longer have (counted once confirmed).
    reset: bool,
}

struct Pending {
    session: u32,
    handshake: InitiatorHandshake,
    msg: frame::Message,
    /// The `mac1` of each chunk (the same on every retransmission), which cookie replies are
    /// bound to.
    mac1s: Vec<[u8; MAC_LEN]>,
    /// Whether the last transmission carried a `mac2`.
    sent_with_cookie: bool,
    epoch: u64,
    chain: Psk,
    sent_at: Instant,
    retransmits: u32,
}

/// (Initiator) a key installed and confirmed to the responder, waiting for its ack.
struct Confirming {
    session: u32,
    sent_at: Instant,
    retransmits: u32,
}

/// A peer's key-schedule state, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PqStatus {
    /// A post-quantum key is installed.
    pub established: bool,
    /// Age of the installed key.
    pub psk_age: Option<Duration>,
    /// Exchanges completed.
    pub handshakes: u64,
    /// Chains that had to restart from zero (a side lost its key).
    pub chain_resets: u64,
    /// Why the last attempt failed, while no key is installed or the last rotation failed.
    pub error: Option<String>,
}

/// See the module docs.
pub struct PqPeer {
    role: Role,
    peer: NodeKey,
    mac1: Mac1Key,
    config: PqConfig,
    current: Option<Epoch>,
    /// The session whose key `current` is (to re-acknowledge a repeated confirmation).
    current_session: Option<u32>,
    previous: Option<Psk>,
    /// Boxed: the handshake state is kilobytes, held only during an exchange.
    pending: Option<Box<Pending>>,
    confirming: Option<Confirming>,
    /// The peer has confirmed holding a key of the current chain (until then a fresh tunnel
    /// is not shown as post-quantum: it cannot carry traffic yet).
    confirmed: bool,
    cookie: Option<(Instant, [u8; MAC_LEN])>,
    last_epoch_seen: u64,
    /// (Initiator) the epoch of the last exchange started: each new one is later, even within
    /// one millisecond.
    last_epoch_sent: u64,
    cached_response: Option<CachedResponse>,
    unconfirmed: Option<Unconfirmed>,
    last_nudge_time: u64,
    last_nudge_acted: Option<Instant>,
    wanted: bool,
    wanted_since: Option<Instant>,
    nudges_sent: u64,
    next_attempt: Option<Instant>,
    backoff: Duration,
    next_nudge: Option<Instant>,
    next_rotation: Option<Instant>,
    handshakes: u64,
    chain_resets: u64,
    error: Option<String>,
}

impl PqPeer {
    /// Fresh state for the pair (`me`, `peer`).
    pub fn new(me: NodeKey, peer: NodeKey, config: PqConfig) -> Self {
        Self {
            role: role(&me, &peer),
            peer,
            mac1: Mac1Key::new(&peer),
            config,
            current: None,
            current_session: None,
            previous: None,
            pending: None,
            confirming: None,
            confirmed: false,
            cookie: None,
            last_epoch_seen: 0,
            last_epoch_sent: 0,
            cached_response: None,
            unconfirmed: None,
            last_nudge_time: 0,
            last_nudge_acted: None,
            wanted: false,
            wanted_since: None,
            nudges_sent: 0,
            next_attempt: None,
            backoff: MIN_BACKOFF,
            next_nudge: None,
            next_rotation: None,
            handshakes: 0,
            chain_resets: 0,
            error: None,
        }
    }

    /// This node's role for the peer.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether a key is installed.
    pub fn established(&self) -> bool {
        self.current.is_some()
    }

    /// Someone needs a tunnel to this peer (traffic, or the peer talks to us with a session
    /// we do not have): the initiator starts an exchange unless it has a key or one is in
    /// flight, the responder asks for one.
    pub fn want(
        &mut self,
        now: Instant,
        rng: &mut impl CryptoRng,
        local: &StaticKeypair,
        epoch: u64,
    ) -> Vec<PqAction> {
        self.wanted = true;
        if self.current.is_none() {
            self.wanted_since.get_or_insert(now);
        }
        match self.role {
            Role::Initiator => {
                let due = self.next_attempt.is_none_or(|t| now >= t);
                if self.pending.is_none() && self.current.is_none() && due {
                    return self.start(now, rng, local, epoch);
                }
                Vec::new()
            }
            Role::Responder => self.nudge(now, epoch),
        }
    }

    /// A new path to the peer opened (or the relay we counted on looks down): what went out
    /// may have been lost on the old one, so the next nudge, or the retransmission of the
    /// exchange in flight, is due now rather than when its timer says.
    pub fn hurry(&mut self, now: Instant) {
        self.next_nudge = None;
        if let Some(p) = &mut self.pending {
            p.sent_at = now.checked_sub(RETRANSMIT).unwrap_or(p.sent_at);
        }
    }

    /// (Initiator) an authenticated nudge from the peer sent at its clock `time`: it has no
    /// key, or lost the one we use, so start over even though a key is installed. `epoch` is
    /// our clock.
    pub fn handle_nudge(
        &mut self,
        now: Instant,
        rng: &mut impl CryptoRng,
        local: &StaticKeypair,
        epoch: u64,
        time: u64,
    ) -> Result<Vec<PqAction>, PqError> {
        if self.role != Role::Initiator {
            return Err(PqError::WrongRole);
        }
        let window = u64::try_from(NUDGE_WINDOW.as_millis()).unwrap_or(u64::MAX);
        if time <= self.last_nudge_time || time.abs_diff(epoch) > window {
            return Err(PqError::Replay);
        }
        self.last_nudge_time = time;
        self.wanted = true;
        if self.current.is_none() {
            self.wanted_since.get_or_insert(now);
        }
        if self.pending.is_some()
            || self
                .last_nudge_acted
                .is_some_and(|t| now.saturating_duration_since(t) < NUDGE_INTERVAL)
        {
            return Err(PqError::TooSoon);
        }
        self.last_nudge_acted = Some(now);
        Ok(self.start(now, rng, local, epoch))
    }

    fn nudge(&mut self, now: Instant, epoch: u64) -> Vec<PqAction> {
        if self.next_nudge.is_some_and(|t| now < t) {
            return Vec::new();
        }
        self.next_nudge = Some(now + NUDGE_INTERVAL);
        self.nudges_sent += 1;
        vec![PqAction::SendDisco(Disco::PqNudge { time: epoch })]
    }

    fn start(
        &mut self,
        now: Instant,
        rng: &mut impl CryptoRng,
        local: &StaticKeypair,
        epoch: u64,
    ) -> Vec<PqAction> {
        let epoch = epoch.max(self.last_epoch_sent.saturating_add(1));
        self.last_epoch_sent = epoch;
        let chain = self
            .current
            .as_ref()
            .map_or_else(Psk::zero, |c| c.psk.clone());
        let payload = encode_payload(epoch, &chain);
        match InitiatorHandshake::start(
            rng,
            Purpose::PeerPsk,
            local,
            self.peer.as_bytes(),
            &Psk::zero(),
            &payload,
        ) {
            Ok((handshake, msg1)) => {
                let session = rng.next_u32();
                let msg = frame::Message::new(Kind::PqInit, session, &msg1);
                let cookie = self.cookie(now);
                let sent = msg.frames(&self.mac1, cookie.as_ref());
                self.pending = Some(Box::new(Pending {
                    session,
                    handshake,
                    mac1s: sent.iter().map(|(_, m)| *m).collect(),
                    sent_with_cookie: cookie.is_some(),
                    msg,
                    epoch,
                    chain,
                    sent_at: now,
                    retransmits: 0,
                }));
                vec![PqAction::Send(sent.into_iter().map(|(f, _)| f).collect())]
            }
            Err(e) => {
                self.fail(now, format!("cannot start the post-quantum handshake: {e}"));
                Vec::new()
            }
        }
    }

    /// The cookie to send with, while it is fresh.
    fn cookie(&self, now: Instant) -> Option<[u8; MAC_LEN]> {
        self.cookie
            .filter(|(at, _)| now.saturating_duration_since(*at) < COOKIE_LIFETIME)
            .map(|(_, c)| c)
    }

    /// (Initiator) a cookie reply to chunk `index` of exchange `session`. A genuine one is
    /// kept, and a message 1 sent without a cookie goes again at once with it.
    pub fn handle_cookie(
        &mut self,
        now: Instant,
        session: u32,
        index: u8,
        sealed: &[u8],
    ) -> Result<Vec<PqAction>, PqError> {
        let p = self
            .pending
            .as_mut()
            .filter(|p| p.session == session)
            .ok_or(PqError::NoPending)?;
        let mac1 = p.mac1s.get(usize::from(index)).ok_or(PqError::Malformed)?;
        let cookie = crate::admission::open_cookie(&self.peer, mac1, sealed)
            .ok_or(PqError::Authentication)?;
        self.cookie = Some((now, cookie));
        if p.sent_with_cookie {
            return Ok(Vec::new());
        }
        p.sent_with_cookie = true;
        p.sent_at = now;
        let frames = p.msg.frames(&self.mac1, Some(&cookie));
        Ok(vec![PqAction::Send(
            frames.into_iter().map(|(f, _)| f).collect(),
        )])
    }

    /// Message 1 from this peer (frames with initiator session `session`), already
    /// decrypted by the caller, which learned the sender from it. The answer goes back to
    /// `from`; the key is held until the initiator confirms it.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_init(
        &mut self,
        now: Instant,
        rng: &mut impl CryptoRng,
        from: Addr,
        session: u32,
        msg1_hash: [u8; 32],
        responder: ResponderHandshake,
        payload: &[u8],
    ) -> Result<Vec<PqAction>, PqError> {
        if self.role != Role::Responder {
            return Err(PqError::WrongRole);
        }
        if let Some(c) = &self.cached_response
            && c.msg1 == msg1_hash
        {
            let fresh = now.saturating_duration_since(c.at) < RETRANSMIT_WINDOW;
            if c.to == from && fresh {
                return Ok(vec![PqAction::Reply(from, c.frames.clone())]);
            }
            if fresh {
                // The same message 1 through another path (sent both directly and through a
                // relay): already answered on the first.
                return Err(PqError::Duplicate);
            }
            return Err(PqError::Replay);
        }
        let (epoch, chain_id) = decode_payload(payload).ok_or(PqError::Malformed)?;
        if epoch <= self.last_epoch_seen {
            return Err(PqError::Replay);
        }
        let known = [
            self.current.as_ref().map(|c| &c.psk),
            self.previous.as_ref(),
            self.unconfirmed.as_ref().map(|u| &u.psk),
        ];
        let chain = if chain_id == [0; 8] {
            Psk::zero()
        } else if let Some(k) = known.into_iter().flatten().find(|k| k.id() == chain_id) {
            k.clone()
        } else {
            Psk::zero()
        };
        let reset = chain_id != [0; 8] && chain.is_zero();
        let reply = encode_payload(epoch, &chain);
        let (msg2, done) = responder
            .respond(rng, &Psk::zero(), &reply)
            .map_err(|_| PqError::Malformed)?;
        let psk = done.peer_psk(&chain);
        self.last_epoch_seen = epoch;
        let frames: Vec<Vec<u8>> = frame::Message::new(Kind::PqResp, session, &msg2)
            .frames(&self.mac1, None)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        self.cached_response = Some(CachedResponse {
            msg1: msg1_hash,
            to: from,
            at: now,
            frames: frames.clone(),
        });
        self.unconfirmed = Some(Unconfirmed {
            session,
            psk,
            answered_at: now,
            reset,
        });
        Ok(vec![PqAction::Reply(from, frames)])
    }

    /// (Responder) whether an exchange was answered recently and awaits its confirmation (a
    /// WireGuard handshake from the peer now most likely uses that key).
    pub fn awaiting_confirmation(&self, now: Instant) -> bool {
        self.unconfirmed
            .as_ref()
            .is_some_and(|u| now.saturating_duration_since(u.answered_at) < HOLD_FOR_CONFIRM)
    }

    /// (Responder) the initiator's confirmation of exchange `session`, from `from`.
    pub fn handle_confirm(
        &mut self,
        now: Instant,
        from: Addr,
        session: u32,
        tag: &[u8; 16],
    ) -> Result<Vec<PqAction>, PqError> {
        if self.role != Role::Responder {
            return Err(PqError::WrongRole);
        }
        if let Some(u) = self.unconfirmed.as_ref().filter(|u| u.session == session) {
            if !bool::from(confirm_tag(&u.psk, session, false).ct_eq(tag)) {
                return Err(PqError::Authentication);
            }
            let psk = u.psk.clone();
            if u.reset {
                self.chain_resets += 1;
            }
            self.unconfirmed = None;
            self.install(now, psk.clone());
            self.confirmed = true;
            self.current_session = Some(session);
            let ack = confirm_tag(&psk, session, true);
            return Ok(vec![
                PqAction::Install { psk, rekey: false },
                PqAction::ReplyDisco(from, Disco::PqConfirmAck { session, tag: ack }),
                PqAction::Confirmed { from },
            ]);
        }
        // A repeated confirmation (our ack was lost): acknowledge again, change nothing. Only
        // while the initiator may still be retransmitting: a confirmation replayed later, from
        // anywhere, draws nothing.
        if self.current_session == Some(session)
            && let Some(c) = &self.current
        {
            if !bool::from(confirm_tag(&c.psk, session, false).ct_eq(tag)) {
                return Err(PqError::Authentication);
            }
            if now.saturating_duration_since(c.installed_at) >= RETRANSMIT_WINDOW {
                return Err(PqError::Replay);
            }
            let ack = confirm_tag(&c.psk, session, true);
            return Ok(vec![PqAction::ReplyDisco(
                from,
                Disco::PqConfirmAck { session, tag: ack },
            )]);
        }
        Err(PqError::NoPending)
    }

    /// (Initiator) the responder's acknowledgement of our confirmation.
    pub fn handle_confirm_ack(&mut self, session: u32, tag: &[u8; 16]) -> Result<(), PqError> {
        let c = self
            .confirming
            .as_ref()
            .filter(|c| c.session == session)
            .ok_or(PqError::NoPending)?;
        let current = self.current.as_ref().ok_or(PqError::NoPending)?;
        if !bool::from(confirm_tag(&current.psk, c.session, true).ct_eq(tag)) {
            return Err(PqError::Authentication);
        }
        self.confirming = None;
        self.confirmed = true;
        self.error = None;
        Ok(())
    }

    /// The session id of the exchange in flight, if any.
    pub fn pending_session(&self) -> Option<u32> {
        self.pending.as_ref().map(|p| p.session)
    }

    /// Message 2 for the exchange in flight. One that does not authenticate changes nothing.
    pub fn handle_resp(&mut self, now: Instant, msg2: &[u8]) -> Result<Vec<PqAction>, PqError> {
        let mut pending = self.pending.take().ok_or(PqError::NoPending)?;
        let done = match pending.handshake.finish_or_keep(msg2) {
            Ok(done) => done,
            Err((Some(kept), _)) => {
                pending.handshake = *kept;
                self.pending = Some(pending);
                return Err(PqError::Authentication);
            }
            Err((None, _)) => {
                self.fail(now, "post-quantum handshake failed: malformed reply".into());
                return Err(PqError::Malformed);
            }
        };
        let Some((epoch, chain_id)) = decode_payload(done.payload()) else {
            self.fail(now, "post-quantum handshake failed: malformed reply".into());
            return Err(PqError::Malformed);
        };
        if epoch != pending.epoch {
            self.fail(
                now,
                "post-quantum handshake failed: reply for another attempt".into(),
            );
            return Err(PqError::Malformed);
        }
        let chain = if chain_id == pending.chain.id() && !pending.chain.is_zero() {
            pending.chain
        } else if chain_id == [0; 8] {
            if !pending.chain.is_zero() {
                self.chain_resets += 1;
            }
            Psk::zero()
        } else {
            self.fail(now, "post-quantum handshake failed: unknown chain".into());
            return Err(PqError::Malformed);
        };
        let psk = done.peer_psk(&chain);
        let rekey = self.current.is_some();
        if !rekey {
            self.confirmed = false;
        }
        self.install(now, psk.clone());
        self.current_session = Some(pending.session);
        self.next_rotation = Some(now + self.config.rotation);
        self.confirming = Some(Confirming {
            session: pending.session,
            sent_at: now,
            retransmits: 0,
        });
        let tag = confirm_tag(&psk, pending.session, false);
        Ok(vec![
            // The confirmation first, so that on one path it arrives before the WireGuard
            // handshake the new key starts.
            PqAction::SendDisco(Disco::PqConfirm {
                session: pending.session,
                tag,
            }),
            PqAction::Install { psk, rekey },
        ])
    }

    /// Retransmissions, failures and rotation.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        rng: &mut impl CryptoRng,
        local: &StaticKeypair,
        epoch: u64,
    ) -> Vec<PqAction> {
        if self.role != Role::Initiator {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(c) = &mut self.confirming
            && now.saturating_duration_since(c.sent_at) >= RETRANSMIT
        {
            if c.retransmits >= MAX_RETRANSMITS {
                // The key is installed; if the responder never got it, the next exchange
                // (it nudges while it has none) chains from it anyway: the responder keeps
                // it as a candidate.
                self.confirming = None;
                if !self.confirmed {
                    self.error = Some(format!(
                        "the peer never confirmed the post-quantum key ({} attempts)",
                        MAX_RETRANSMITS + 1
                    ));
                }
            } else if let Some(cur) = &self.current {
                c.retransmits += 1;
                c.sent_at = now;
                out.push(PqAction::SendDisco(Disco::PqConfirm {
                    session: c.session,
                    tag: confirm_tag(&cur.psk, c.session, false),
                }));
            }
        }
        let cookie = self.cookie(now);
        if let Some(p) = &mut self.pending {
            if now.saturating_duration_since(p.sent_at) < RETRANSMIT {
                return out;
            }
            if p.retransmits >= MAX_RETRANSMITS {
                self.pending = None;
                self.fail(
                    now,
                    format!(
                        "no answer to the post-quantum handshake after {} attempts",
                        MAX_RETRANSMITS + 1
                    ),
                );
                return out;
            }
            p.retransmits += 1;
            p.sent_at = now;
            p.sent_with_cookie = cookie.is_some();
            let frames = p.msg.frames(&self.mac1, cookie.as_ref());
            out.push(PqAction::Send(frames.into_iter().map(|(f, _)| f).collect()));
            return out;
        }
        let rotation_due = self.next_rotation.is_some_and(|t| now >= t);
        let retry_due =
            self.current.is_none() && self.wanted && self.next_attempt.is_some_and(|t| now >= t);
        if rotation_due || retry_due {
            out.extend(self.start(now, rng, local, epoch));
        }
        out
    }

    /// When `handle_timeout` must next run for this peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.role != Role::Initiator {
            return None;
        }
        let confirm = self.confirming.as_ref().map(|c| c.sent_at + RETRANSMIT);
        let main = if let Some(p) = &self.pending {
            Some(p.sent_at + RETRANSMIT)
        } else {
            let retry = self
                .next_attempt
                .filter(|_| self.current.is_none() && self.wanted);
            match (self.next_rotation, retry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match (main, confirm) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Status for `lattice status`.
    pub fn status(&self, now: Instant) -> PqStatus {
        let waited = self
            .wanted_since
            .filter(|_| self.current.is_none())
            .map(|t| now.saturating_duration_since(t));
        let error = self.error.clone().or_else(|| match (self.role, waited) {
            (Role::Responder, Some(w)) if w >= STALLED => Some(format!(
                "the peer has not completed a post-quantum handshake in {}s ({} requests sent, \
                 answers failed or never came)",
                w.as_secs(),
                self.nudges_sent
            )),
            _ => None,
        });
        PqStatus {
            established: self.current.is_some() && self.confirmed,
            psk_age: self
                .current
                .as_ref()
                .map(|c| now.saturating_duration_since(c.installed_at)),
            handshakes: self.handshakes,
            chain_resets: self.chain_resets,
            error,
        }
    }

    fn install(&mut self, now: Instant, psk: Psk) {
        if let Some(old) = self.current.take() {
            self.previous = Some(old.psk);
        }
        self.current = Some(Epoch {
            psk,
            installed_at: now,
        });
        self.handshakes += 1;
        self.error = None;
        self.wanted_since = None;
        self.backoff = MIN_BACKOFF;
        self.next_attempt = None;
    }

    fn fail(&mut self, now: Instant, error: String) {
        self.error = Some(error);
        self.next_attempt = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        if self.current.is_some() {
            // A failed rotation: keep the installed (post-quantum) key and try again later.
            self.next_rotation = Some(now + self.backoff);
        }
    }
}

fn encode_payload(epoch: u64, chain: &Psk) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    p[0] = PAYLOAD_VERSION;
    p[1..9].copy_from_slice(&epoch.to_be_bytes());
    if !chain.is_zero() {
        p[9..17].copy_from_slice(&chain.id());
    }
    p
}

fn decode_payload(p: &[u8]) -> Option<(u64, [u8; 8])> {
    if p.len() != PAYLOAD_LEN || p[0] != PAYLOAD_VERSION {
        return None;
    }
    let epoch = u64::from_be_bytes(p[1..9].try_into().ok()?);
    let chain: [u8; 8] = p[9..17].try_into().ok()?;
    Some((epoch, chain))
}

#[cfg(test)]
mod tests;
