//! The post-quantum key schedule of one peer pair (a sub-machine of [`crate::NodeState`]).
//!
//! Every tunnel's WireGuard preshared key comes from a hybrid handshake (Noise IKpsk2 over
//! X25519 carrying ML-KEM-768, see the `hybrid` crate):
//!
//! - **Who initiates** is fixed by the two node keys (the lower one), so both sides agree and
//!   there are never two exchanges racing. The responder asks for one with a nudge when it
//!   needs a tunnel (traffic to send, or the peer talking to it with a key it lost).
//! - **Chaining.** Each new key is `KDF(label, handshake hash, ML-KEM secret)` salted with the
//!   key it replaces. Message 1 names the key to chain from (by its public id); message 2 (which
//!   is authenticated) says which one the responder used: the same, or none when it no longer
//!   has it (after a restart). A reset chain is counted and shown; it is never a downgrade to a
//!   classical key.
//! - **Replay.** Message 1 carries the initiator's wall-clock epoch; a responder accepts only
//!   newer epochs, and answers an exact duplicate of the last message 1 with its cached
//!   message 2 (the initiator's retransmission), changing nothing.
//! - **Installation.** Each side installs the new key as soon as it has it; the current
//!   WireGuard session continues (gotatun's live PSK update) and the initiator then starts a
//!   WireGuard handshake so the new key takes over at once. Keys rotate every
//!   `rotation` (2 minutes by default).

use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use hybrid::{InitiatorHandshake, Psk, Purpose, ResponderHandshake, StaticKeypair};
use rand::{Rng, rngs::StdRng};
use wire::NodeKey;

use crate::addr::Addr;
use crate::frame::{self, Kind};

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
/// After this long without a key, a responder reports the peer as stalled.
const STALLED: Duration = Duration::from_secs(5);
/// How long a responder answers retransmissions of the last message 1 from its cache.
const RETRANSMIT_WINDOW: Duration = Duration::from_secs(10);

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

/// The tag a nudge from `sender` to `receiver` carries: it tells the receiver who is asking
/// without putting either key on the wire.
pub fn nudge_tag(sender: &NodeKey, receiver: &NodeKey) -> [u8; 8] {
    let mut h = Blake2s256::new();
    h.update(b"lattice pq nudge v1");
    h.update(sender.as_bytes());
    h.update(receiver.as_bytes());
    let d = h.finalize();
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&d[..8]);
    tag
}

/// Hash of a message 1, to recognise retransmissions.
pub fn message_hash(msg: &[u8]) -> [u8; 32] {
    Blake2s256::digest(msg).into()
}

/// Why a handshake message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PqError {
    /// This node is the initiator for the sender, so it does not answer message 1s.
    #[error("message 1 from a peer this node initiates to")]
    WrongRole,
    /// Message 1 with an epoch that is not newer than the last one accepted.
    #[error("replayed or stale message 1")]
    Replay,
    /// The payload inside an authenticated message was malformed.
    #[error("malformed handshake payload")]
    Malformed,
    /// Message 2 failed authentication.
    #[error("message 2 failed authentication")]
    Authentication,
    /// Message 2 for no exchange in flight.
    #[error("message 2 for no pending exchange")]
    NoPending,
    /// A message 1 already answered, arriving again through another path.
    #[error("message 1 already answered on another path")]
    Duplicate,
}

/// What the caller must do.
#[derive(Debug)]
pub enum PqAction {
    /// Send these frames to the peer (on its path, or every candidate while none is known).
    Send(Vec<Vec<u8>>),
    /// Send these frames back to where message 1 came from.
    Reply(Addr, Vec<Vec<u8>>),
    /// Use this preshared key from now on; with `rekey`, start a WireGuard handshake so it takes
    /// over the current session at once.
    Install {
        /// The new key.
        psk: Psk,
        /// Whether to rekey WireGuard now.
        rekey: bool,
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

struct Pending {
    session: u32,
    handshake: InitiatorHandshake,
    frames: Vec<Vec<u8>>,
    epoch: u64,
    chain: Psk,
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
    me: NodeKey,
    peer: NodeKey,
    config: PqConfig,
    current: Option<Epoch>,
    previous: Option<Psk>,
    pending: Option<Pending>,
    last_epoch_seen: u64,
    cached_response: Option<CachedResponse>,
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
            me,
            peer,
            config,
            current: None,
            previous: None,
            pending: None,
            last_epoch_seen: 0,
            cached_response: None,
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

    /// Someone needs a tunnel to this peer (traffic, or the peer nudged us): the initiator
    /// starts an exchange, the responder asks for one.
    pub fn want(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
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
            Role::Responder => self.nudge(now),
        }
    }

    /// The peer lost its key (it nudged us, or talks to us with a session we cannot match):
    /// start over even though a key is installed.
    pub fn restart(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        local: &StaticKeypair,
        epoch: u64,
    ) -> Vec<PqAction> {
        self.wanted = true;
        if self.current.is_none() {
            self.wanted_since.get_or_insert(now);
        }
        match self.role {
            Role::Initiator
                if self.pending.is_none() && self.next_attempt.is_none_or(|t| now >= t) =>
            {
                // Rate limit restarts caused by unauthenticated signals.
                self.next_attempt = Some(now + NUDGE_INTERVAL);
                self.start(now, rng, local, epoch)
            }
            Role::Initiator => Vec::new(),
            Role::Responder => self.nudge(now),
        }
    }

    fn nudge(&mut self, now: Instant) -> Vec<PqAction> {
        if self.next_nudge.is_some_and(|t| now < t) {
            return Vec::new();
        }
        self.next_nudge = Some(now + NUDGE_INTERVAL);
        self.nudges_sent += 1;
        vec![PqAction::Send(vec![frame::encode_nudge(nudge_tag(
            &self.me, &self.peer,
        ))])]
    }

    fn start(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        local: &StaticKeypair,
        epoch: u64,
    ) -> Vec<PqAction> {
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
                let frames = frame::encode_message(Kind::PqInit, session, &msg1);
                self.pending = Some(Pending {
                    session,
                    handshake,
                    frames: frames.clone(),
                    epoch,
                    chain,
                    sent_at: now,
                    retransmits: 0,
                });
                vec![PqAction::Send(frames)]
            }
            Err(e) => {
                self.fail(now, format!("cannot start the post-quantum handshake: {e}"));
                Vec::new()
            }
        }
    }

    /// Message 1 from this peer (frames with initiator session `session`), already
    /// decrypted by the caller, which learned the sender from it.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_init(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
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
        let chain = if chain_id == [0; 8] {
            Psk::zero()
        } else if let Some(c) = self.current.as_ref().filter(|c| c.psk.id() == chain_id) {
            c.psk.clone()
        } else if let Some(p) = self.previous.as_ref().filter(|p| p.id() == chain_id) {
            p.clone()
        } else {
            self.chain_resets += 1;
            Psk::zero()
        };
        let reply = encode_payload(epoch, &chain);
        let (msg2, done) = responder
            .respond(rng, &Psk::zero(), &reply)
            .map_err(|_| PqError::Malformed)?;
        let psk = done.peer_psk(&chain);
        self.last_epoch_seen = epoch;
        let frames = frame::encode_message(Kind::PqResp, session, &msg2);
        self.cached_response = Some(CachedResponse {
            msg1: msg1_hash,
            to: from,
            at: now,
            frames: frames.clone(),
        });
        self.install(now, psk.clone());
        Ok(vec![
            PqAction::Reply(from, frames),
            PqAction::Install { psk, rekey: false },
        ])
    }

    /// The session id of the exchange in flight, if any.
    pub fn pending_session(&self) -> Option<u32> {
        self.pending.as_ref().map(|p| p.session)
    }

    /// Message 2 for the exchange in flight.
    pub fn handle_resp(&mut self, now: Instant, msg2: &[u8]) -> Result<Vec<PqAction>, PqError> {
        let pending = self.pending.take().ok_or(PqError::NoPending)?;
        let Ok(done) = pending.handshake.finish(msg2) else {
            self.fail(
                now,
                "post-quantum handshake failed: message 2 did not authenticate".into(),
            );
            return Err(PqError::Authentication);
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
        self.install(now, psk.clone());
        self.next_rotation = Some(now + self.config.rotation);
        Ok(vec![PqAction::Install { psk, rekey }])
    }

    /// Retransmissions, failures and rotation.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        local: &StaticKeypair,
        epoch: u64,
    ) -> Vec<PqAction> {
        if self.role != Role::Initiator {
            return Vec::new();
        }
        if let Some(p) = &mut self.pending {
            if now.saturating_duration_since(p.sent_at) < RETRANSMIT {
                return Vec::new();
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
                return Vec::new();
            }
            p.retransmits += 1;
            p.sent_at = now;
            return vec![PqAction::Send(p.frames.clone())];
        }
        let rotation_due = self.next_rotation.is_some_and(|t| now >= t);
        let retry_due =
            self.current.is_none() && self.wanted && self.next_attempt.is_some_and(|t| now >= t);
        if rotation_due || retry_due {
            return self.start(now, rng, local, epoch);
        }
        Vec::new()
    }

    /// When `handle_timeout` must next run for this peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.role != Role::Initiator {
            return None;
        }
        if let Some(p) = &self.pending {
            return Some(p.sent_at + RETRANSMIT);
        }
        let retry = self
            .next_attempt
            .filter(|_| self.current.is_none() && self.wanted);
        match (self.next_rotation, retry) {
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
            established: self.current.is_some(),
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
