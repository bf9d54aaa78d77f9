//! The relay server: authenticates nodes, then forwards `Send` frames to the destination's
//! session as `Recv` frames. It never looks inside payloads (WireGuard packets and Lattice
//! frames, encrypted end to end) and forwards only between nodes its [`Authorizer`] vouches
//! for: every session is checked again every second and closed the moment its ticket expires
//! or the authorizer stops vouching for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hybrid::StaticKeypair;
use rand::RngExt;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use wire::{NodeKey, TicketKey};

use crate::datagram::{Datagrams, Sent};
use crate::proto::{self, Frame, MAX_FRAME};
use crate::queue;
use crate::revocation::RevocationSet;
use crate::session::{self, ClientRate, Session, Step};
use crate::unix_now;

/// How long a client has to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one client before further ones are dropped.
const QUEUE: usize = 2048;
/// Bytes of frames queued for one WebSocket client: 2,048 full WireGuard packets of a 1280-byte
/// tunnel are 2.75 MB, and 2,048 of the largest frames were 8.5 MB.
const QUEUE_BYTES: usize = 3 << 20;
/// Frames queued each way between a QUIC session and its stream. The stream carries the
/// authentication, pings, tickets and only the packets too large for a datagram (the rest go
/// as datagrams), and quinn buffers what is written to it: a short queue in front is enough,
/// and bounds what the relay holds for a node that stops reading its stream (2,048 frames of
/// 4 KB were 8 MB).
const STREAM_QUEUE: usize = 256;
/// Bytes of frames queued for a QUIC session's stream (256 of the largest frames are 1 MB).
const STREAM_QUEUE_BYTES: usize = 1 << 20;

/// Limits on the QUIC listener, which faces the internet as the WebSocket's does
/// ([`crate::http::HttpLimits`]). A QUIC handshake costs the relay key work and a connection's
/// state before it knows whether the client can even receive at the address it claims, so a
/// flood of Initial packets from made-up addresses could otherwise fill its memory and CPUs
/// (and, in a coordinator, stop the coordinator too).
#[derive(Debug, Clone, Copy)]
pub struct QuicLimits {
    /// Connections open at once, handshakes included.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub per_ip: usize,
    /// Handshakes in progress past which a client that has not yet shown it receives at its
    /// address is sent a Retry instead: a stateless packet, smaller than what it answers, that
    /// costs no key work; the client comes back with the token it carries.
    pub retry_above: usize,
    /// Time for the QUIC handshake (authentication then has 10 s of its own).
    pub handshake_timeout: Duration,
    /// Handshakes one address may start (those answered with a Retry do not count).
    pub handshakes: crate::http::HandshakeRate,
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            per_ip: 4_096,
            retry_above: 64,
            handshake_timeout: AUTH_TIMEOUT,
            handshakes: crate::http::HandshakeRate::default(),
        }
    }
}

/// Decides who may use the relay.
pub trait Authorizer: Send + Sync + 'static {
    /// Checks `ticket` for `node_key` at Unix time `now`; returns the last second the session
    /// may run on it (past only where [`Self::serves_expired`] says so), or why it is refused.
    fn authorize(&self, node_key: &[u8; 32], ticket: &[u8], now: i64) -> Result<i64, String>;

    /// Whether `node_key` is still vouched for (asked every second for live sessions; an
    /// embedded relay answers from the coordinator's live membership).
    fn still_vouched(&self, _node_key: &[u8; 32]) -> bool {
        true
    }

    /// Whether `node_key`, whose ticket ran out at `not_after`, is still served at `now`
    /// (a standalone relay riding out a coordinator outage: [`crate::revocation`]).
    fn serves_expired(&self, _node_key: &[u8; 32], _not_after: i64, _now: i64) -> bool {
        false
    }
}

/// Accepts tickets signed by one coordinator key, except for node keys the coordinator has
/// revoked (when the relay follows its revocations).
pub struct TicketAuthorizer {
    key: TicketKey,
    revoked: Option<Arc<RevocationSet>>,
    excuse: Option<Excuse>,
}

/// Whether a node whose ticket ran out at `not_after` is still served at `now` (arguments:
/// node key, `not_after`, `now`).
pub type Excuse = Box<dyn Fn(&[u8; 32], i64, i64) -> bool + Send + Sync>;

impl TicketAuthorizer {
    /// An authorizer for tickets signed by `key`.
    pub fn new(key: TicketKey) -> Self {
        Self {
            key,
            revoked: None,
            excuse: None,
        }
    }

    /// Also refuses the keys in `revoked` (see [`crate::revocation`]).
    pub fn with_revocations(key: TicketKey, revoked: Arc<RevocationSet>) -> Self {
        Self {
            revoked: Some(revoked),
            ..Self::new(key)
        }
    }

    /// Also serves a node past its ticket where `excuse` says so (the coordinator's embedded
    /// relay while its database is away).
    pub fn with_excuse(key: TicketKey, excuse: Excuse) -> Self {
        Self {
            excuse: Some(excuse),
            ..Self::new(key)
        }
    }
}

impl Authorizer for TicketAuthorizer {
    fn authorize(&self, node_key: &[u8; 32], ticket: &[u8], now: i64) -> Result<i64, String> {
        // Its signature and key first; whether it ran out, after.
        let t = hybrid::ticket::verify(self.key.as_bytes(), ticket, i64::MIN)
            .map_err(|e| e.to_string())?;
        if &t.node_key != node_key {
            return Err("the ticket is for another node key".into());
        }
        if self
            .revoked
            .as_ref()
            .is_some_and(|r| r.is_revoked(node_key, now))
        {
            return Err("node is not vouched for by the coordinator (revoked)".into());
        }
        if now <= t.not_after {
            if let Some(r) = &self.revoked {
                r.served(node_key, t.not_after, now);
            }
            return Ok(t.not_after);
        }
        if self.serves_expired(node_key, t.not_after, now) {
            return Ok(t.not_after);
        }
        Err(hybrid::ticket::TicketError::Expired.to_string())
    }

    fn serves_expired(&self, node_key: &[u8; 32], not_after: i64, now: i64) -> bool {
        self.revoked
            .as_ref()
            .is_some_and(|r| r.serves_expired(node_key, not_after, now))
            || self
                .excuse
                .as_ref()
                .is_some_and(|e| e(node_key, not_after, now))
    }

    fn still_vouched(&self, node_key: &[u8; 32]) -> bool {
        !self
            .revoked
            .as_ref()
            .is_some_and(|r| r.is_revoked(node_key, unix_now()))
    }
}

/// Counters.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    rejected: AtomicU64,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_no_peer: AtomicU64,
    dropped_queue_full: AtomicU64,
    across_threads: AtomicU64,
    dropped_unvouched: AtomicU64,
    dropped_before_auth: AtomicU64,
    dropped_ticket_too_soon: AtomicU64,
    dropped_refused: AtomicU64,
    dropped_refuse_too_soon: AtomicU64,
    dropped_rate_limited: AtomicU64,
    malformed: AtomicU64,
    kicked: AtomicU64,
    quic_retried: AtomicU64,
    quic_refused: AtomicU64,
    quic_too_often: AtomicU64,
    quic_timed_out: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Sessions currently open.
    pub sessions: usize,
    /// Bytes of frames waiting in the sessions' queues to their nodes now (not counting what
    /// a QUIC connection holds itself).
    pub queued_bytes: u64,
    /// Sessions whose ticket has run out, served through a coordinator outage
    /// ([`crate::revocation`]).
    pub sessions_past_ticket: usize,
    /// Sessions authenticated.
    pub accepted: u64,
    /// Sessions refused.
    pub rejected: u64,
    /// Frames forwarded.
    pub forwarded: u64,
    /// Payload bytes forwarded.
    pub forwarded_bytes: u64,
    /// Frames for a destination not connected here.
    pub dropped_no_peer: u64,
    /// Frames dropped because the destination's queue was full.
    pub dropped_queue_full: u64,
    /// Frames for a QUIC client whose connection runs on another of the relay's threads,
    /// handed to its session's outbox (counted in `forwarded` once that session sent them,
    /// in `dropped_queue_full` if its connection refused them).
    pub across_threads: u64,
    /// Frames from a session that was no longer vouched for.
    pub dropped_unvouched: u64,
    /// Datagrams a QUIC client sent before it authenticated.
    pub dropped_before_auth: u64,
    /// Refreshed tickets dropped unchecked: another came from the same node in the same second.
    pub dropped_ticket_too_soon: u64,
    /// Packets not forwarded because their destination refuses their source (a node that is
    /// not its peer).
    pub dropped_refused: u64,
    /// `Refuse` frames dropped: another came from the same node in the same second.
    pub dropped_refuse_too_soon: u64,
    /// Packets dropped because their node sent more than the relay's per-node rate.
    pub dropped_rate_limited: u64,
    /// Frames that did not decode.
    pub malformed: u64,
    /// Sessions closed because their ticket expired or their node was no longer vouched for.
    pub kicked: u64,
    /// QUIC handshakes answered with a Retry (the relay was busy with others).
    pub quic_retried: u64,
    /// QUIC handshakes refused: the relay, or the client's address, had its connections.
    pub quic_refused: u64,
    /// QUIC handshakes refused: the client's address had started its handshakes for the
    /// moment ([`QuicLimits::handshakes`]).
    pub quic_too_often: u64,
    /// QUIC handshakes that did not finish in time.
    pub quic_timed_out: u64,
}

struct Entry {
    id: u64,
    tx: queue::Sender,
    /// A QUIC client's datagrams: packets for it go straight out as datagrams, from the
    /// thread its connection runs on.
    quic: Option<QuicOut>,
    alive: Arc<AtomicBool>,
    close: watch::Sender<bool>,
    valid_until: i64,
    /// Nodes whose packets this one refuses (sorted): not forwarded to it.
    refused: Vec<[u8; 32]>,
}

/// Where a QUIC client's packets go out.
///
/// A session queues a packet as a datagram itself when the destination's connection runs on its
/// own thread; packets from a session on another thread go to the destination's outbox, which
/// its own session empties. (On 16 CPUs the relay forwarded less on four threads than on
/// one, 1.32-1.35 against 1.65-1.68 Gbit/s, when a session queued on another thread's
/// connection itself, under the lock that connection's driver holds while it encrypts a batch.)
/// A session hands over what it has for an outbox once per batch of frames it handled
/// ([`Handoffs`]): each handover wakes the destination's thread, a system call (with a wake
/// per packet, a relay thread on 16 CPUs spent 16% of its time in `write()`, most likely
/// those wakes).
struct QuicOut {
    datagrams: Datagrams,
    thread: std::thread::ThreadId,
    outbox: queue::BatchSender,
}

/// Packets for QUIC sessions on other threads, gathered while a session handles a batch of
/// frames, each destination's handed to its outbox at once ([`Relay::hand_off`]).
#[derive(Default)]
struct Handoffs(Vec<([u8; 32], queue::BatchSender, Vec<Bytes>)>);

impl Handoffs {
    fn push(&mut self, dst: [u8; 32], outbox: &queue::BatchSender, frame: Bytes) {
        match self.0.iter_mut().find(|(k, _, _)| *k == dst) {
            Some((_, _, frames)) => frames.push(frame),
            None => self.0.push((dst, outbox.clone(), vec![frame])),
        }
    }
}

/// Datagrams a QUIC session handles at most before it looks at its other inputs again.
const DATAGRAM_BATCH: usize = 64;

/// Frames waiting in a QUIC session's outbox (about 1.4 MB of packets): when full, a packet
/// is dropped, as a full socket buffer drops.
const OUTBOX: usize = 1024;
/// Batches a session takes from its outbox at once, after the one that woke it.
const OUTBOX_BATCHES: usize = 16;
/// Bytes waiting in a QUIC session's outbox (1,024 of the largest frames are 4.2 MB).
const OUTBOX_BYTES: usize = 3 << 19;

struct Inner {
    key: StaticKeypair,
    auth: Arc<dyn Authorizer>,
    /// What each node may have forwarded (`None`: no limit).
    client_rate: Option<ClientRate>,
    clients: RwLock<HashMap<[u8; 32], Entry>>,
    next_id: AtomicU64,
    stats: Stats,
}

/// A relay (cheap to clone).
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

/// The system's clocks.
struct SystemClock;

impl session::Clock for SystemClock {
    fn unix(&self) -> i64 {
        unix_now()
    }
    fn now(&self) -> Instant {
        Instant::now()
    }
}

impl Relay {
    /// A relay with static key `key` admitting whom `auth` vouches for.
    pub fn new(key: StaticKeypair, auth: Arc<dyn Authorizer>) -> Self {
        Self::with_client_rate(key, auth, None)
    }

    /// A relay that forwards for each node no more than `rate` allows (`None`: no limit); the
    /// rest is dropped and counted (`rate_limited`).
    pub fn with_client_rate(
        key: StaticKeypair,
        auth: Arc<dyn Authorizer>,
        rate: Option<ClientRate>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                key,
                auth,
                client_rate: rate,
                clients: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                stats: Stats::default(),
            }),
        }
    }

    /// The relay's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.key.public()
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = unix_now();
        let (sessions, queued_bytes, sessions_past_ticket) = {
            let clients = self.read();
            let queued = clients
                .values()
                .map(|e| e.tx.queued() + e.quic.as_ref().map_or(0, |q| q.outbox.queued()));
            let past = clients.values().filter(|e| e.valid_until < now).count();
            (clients.len(), queued.sum::<usize>() as u64, past)
        };
        StatsSnapshot {
            sessions,
            queued_bytes,
            sessions_past_ticket,
            accepted: l(&s.accepted),
            rejected: l(&s.rejected),
            forwarded: l(&s.forwarded),
            forwarded_bytes: l(&s.forwarded_bytes),
            dropped_no_peer: l(&s.dropped_no_peer),
            dropped_queue_full: l(&s.dropped_queue_full),
            across_threads: l(&s.across_threads),
            dropped_unvouched: l(&s.dropped_unvouched),
            dropped_before_auth: l(&s.dropped_before_auth),
            dropped_ticket_too_soon: l(&s.dropped_ticket_too_soon),
            dropped_refused: l(&s.dropped_refused),
            dropped_refuse_too_soon: l(&s.dropped_refuse_too_soon),
            dropped_rate_limited: l(&s.dropped_rate_limited),
            malformed: l(&s.malformed),
            kicked: l(&s.kicked),
            quic_retried: l(&s.quic_retried),
            quic_refused: l(&s.quic_refused),
            quic_too_often: l(&s.quic_too_often),
            quic_timed_out: l(&s.quic_timed_out),
        }
    }

    /// The node keys with a session here.
    pub fn session_keys(&self) -> Vec<[u8; 32]> {
        let mut keys: Vec<[u8; 32]> = self.read().keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// Whether `key` has a session here.
    pub fn is_connected(&self, key: &[u8; 32]) -> bool {
        self.read().contains_key(key)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], Entry>> {
        self.inner.clients.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], Entry>> {
        self.inner
            .clients
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Closes `key`'s session at once (the node was removed).
    pub fn kick(&self, key: &[u8; 32]) {
        if let Some(e) = self.write().remove(key) {
            e.alive.store(false, Ordering::Relaxed);
            let _ = e.close.send(true);
            self.inner.stats.kicked.fetch_add(1, Ordering::Relaxed);
            info!(node = %NodeKey::from_bytes(*key), "relay session closed: no longer vouched for");
        }
    }

    /// Closes sessions whose ticket expired or whose node is no longer vouched for.
    pub fn sweep(&self, now: i64) {
        let stale: Vec<[u8; 32]> = self
            .read()
            .iter()
            .filter(|(k, e)| {
                (now > e.valid_until && !self.inner.auth.serves_expired(k, e.valid_until, now))
                    || !self.inner.auth.still_vouched(k)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.kick(&k);
        }
    }

    /// Runs [`Self::sweep`] every second until the task is dropped.
    pub async fn run_sweeper(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.sweep(unix_now());
        }
    }

    /// Accepts QUIC connections on `endpoint` until it closes, within `limits`, counting
    /// connections and handshakes in `gate`, which the other endpoints of a
    /// [`crate::quic::QuicListener`] share.
    pub(crate) async fn serve_quic(
        self,
        endpoint: quinn::Endpoint,
        limits: QuicLimits,
        gate: QuicGate,
    ) {
        let QuicGate {
            admission,
            handshaking,
            handshakes,
        } = gate;
        let stats = &self.inner.stats;
        while let Some(incoming) = endpoint.accept().await {
            let remote = incoming.remote_address();
            // An address proven by a Retry always goes on (so nodes get in during a flood).
            let handshake = if incoming.remote_address_validated() {
                Handshaking::enter(&handshaking)
            } else if let Some(h) = Handshaking::try_enter(&handshaking, limits.retry_above) {
                h
            } else {
                // Counted first: the client may see the answer before this thread goes on.
                stats.quic_retried.fetch_add(1, Ordering::Relaxed);
                // Never fails: an address not yet validated may always be sent a Retry.
                let _ = incoming.retry();
                continue;
            };
            let Some(slot) = admission.admit(remote.ip()) else {
                debug!(%remote, "QUIC connection limit reached; refusing a handshake");
                stats.quic_refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                continue;
            };
            if !handshakes.allow(remote.ip(), Instant::now()) {
                debug!(%remote, "too many QUIC handshakes from this address; refusing one");
                stats.quic_too_often.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                continue;
            }
            let relay = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let conn = tokio::time::timeout(limits.handshake_timeout, incoming).await;
                drop(handshake);
                match conn {
                    Ok(Ok(conn)) => {
                        if let Err(e) = relay.quic_session(conn).await {
                            debug!(%remote, error = %format!("{e:#}"), "relay QUIC session ended");
                        }
                    }
                    Ok(Err(e)) => debug!(%remote, error = %e, "QUIC handshake failed"),
                    Err(_) => {
                        // Dropping the handshake closes the connection.
                        relay
                            .inner
                            .stats
                            .quic_timed_out
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(%remote, "QUIC handshake timed out");
                    }
                }
            });
        }
    }

    /// The WebSocket route (`GET /relay`), for networks that block UDP.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/relay", get(ws_upgrade))
            .with_state(self.clone())
    }

    async fn quic_session(&self, conn: quinn::Connection) -> anyhow::Result<()> {
        let remote = conn.remote_address();
        // The relay opens the stream: its first bytes are the challenge.
        let (mut send, mut recv) = tokio::time::timeout(AUTH_TIMEOUT, conn.open_bi()).await??;
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
        let (out_tx, mut out_rx) = queue::channel(STREAM_QUEUE, STREAM_QUEUE_BYTES);
        // Reader: the stream's frames (the session reads datagrams itself).
        let reader = tokio::spawn(async move {
            while let Ok(Some(f)) = read_prefixed(&mut recv).await {
                if in_tx.send(Bytes::from(f)).await.is_err() {
                    return;
                }
            }
        });
        // Writer: the stream (`Recv` frames that fit go out as datagrams from `handle`).
        let writer = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if send.write_all(&proto::length_prefixed(&f)).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        });
        let result = self
            .session(remote, "quic", Some(conn.clone()), in_rx, out_tx)
            .await;
        reader.abort();
        let _ = tokio::time::timeout(Duration::from_millis(200), writer).await;
        conn.close(0u32.into(), b"bye");
        result
    }

    /// The transport-independent part of a session.
    async fn session(
        &self,
        remote: SocketAddr,
        transport: &'static str,
        quic: Option<quinn::Connection>,
        mut incoming: mpsc::Receiver<Bytes>,
        out: queue::Sender,
    ) -> anyhow::Result<()> {
        let nonce: [u8; 32] = rand::rng().random();
        if !out.try_send(session::challenge(nonce).into()) {
            anyhow::bail!("closed before the challenge");
        }
        // Until the node authenticates, its datagrams are read and dropped: nothing it sends
        // before then is kept but its first frame (QUIC would otherwise hold megabytes of them
        // per connection for the whole wait).
        let before_auth = async {
            loop {
                tokio::select! {
                    f = incoming.recv() => return f,
                    d = read_datagram(quic.as_ref()) => {
                        d?;
                        self.inner.stats.dropped_before_auth.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        let first = tokio::time::timeout(AUTH_TIMEOUT, before_auth)
            .await
            .map_err(|_| anyhow::anyhow!("no authentication"))?
            .ok_or_else(|| anyhow::anyhow!("closed before authenticating"))?;
        let auth = session::authenticate(
            &self.inner.key,
            &*self.inner.auth,
            &nonce,
            &first,
            unix_now(),
        );
        let (key, valid_until) = match auth {
            Ok(ok) => ok,
            Err(reason) => {
                self.inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
                info!(%remote, %transport, %reason, "relay session refused");
                out.try_send(proto::encode(&Frame::Rejected { reason: &reason }).into());
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
        };
        let accepted = session::accepted(&self.inner.key, &key, &nonce)
            .ok_or_else(|| anyhow::anyhow!("unusable node key"))?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let alive = Arc::new(AtomicBool::new(true));
        // A QUIC session runs on its endpoint's thread (`QuicListener`) from start to end.
        let here = std::thread::current().id();
        let own = quic.map(Datagrams::new);
        let datagrams = own.as_ref().map(Datagrams::connection);
        let (outbox_tx, mut outbox) = match &own {
            Some(_) => {
                let (tx, rx) = queue::batch_channel(OUTBOX, OUTBOX_BYTES);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (close_tx, mut close_rx) = watch::channel(false);
        {
            let mut clients = self.write();
            // Queued under the lock that registers the node: every frame forwarded to it
            // follows its Accepted, and nothing sent to it once it has read that answer finds
            // it missing. (Only the Challenge was queued before: there is room.)
            if !out.try_send(accepted.into()) {
                anyhow::bail!("closed while authenticating");
            }
            if let Some(old) = clients.insert(
                key,
                Entry {
                    id,
                    tx: out.clone(),
                    quic: own
                        .clone()
                        .zip(outbox_tx)
                        .map(|(datagrams, outbox)| QuicOut {
                            datagrams,
                            thread: here,
                            outbox,
                        }),
                    alive: Arc::clone(&alive),
                    close: close_tx,
                    valid_until,
                    refused: Vec::new(),
                },
            ) {
                // The newest connection of a node wins (it reconnected, or moved networks).
                old.alive.store(false, Ordering::Relaxed);
                let _ = old.close.send(true);
            }
        }
        self.inner.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let node = NodeKey::from_bytes(key);
        info!(%node, %remote, %transport, "relay session up");
        let mut session = Session::new(key, self.inner.client_rate);
        let mut handoffs = Handoffs::default();
        let at = (here, id);
        loop {
            tokio::select! {
                _ = close_rx.changed() => break,
                f = incoming.recv() => {
                    let Some(f) = f else { break };
                    self.handle(at, &mut session, &alive, (&out, &mut handoffs), f);
                    self.hand_off(&mut handoffs);
                }
                d = read_datagram(datagrams) => {
                    let Some(d) = d else { break };
                    self.handle(at, &mut session, &alive, (&out, &mut handoffs), d);
                    // Those that arrived with it, without going round the select for each.
                    if let Some(conn) = datagrams {
                        for _ in 1..DATAGRAM_BATCH {
                            let Some(Ok(d)) = conn.read_datagram().now_or_never() else { break };
                            self.handle(at, &mut session, &alive, (&out, &mut handoffs), d);
                        }
                    }
                    self.hand_off(&mut handoffs);
                }
                Some(batch) = recv_some(outbox.as_mut()) => {
                    // Packets sessions on other threads forwarded here: sent on this thread,
                    // where the connection's driver runs, with those waiting behind them, and
                    // counted as forwarded once sent.
                    let Some(own) = &own else { continue };
                    let rest = outbox.as_mut().map(|rx| std::iter::from_fn(|| rx.try_recv()));
                    let batches = std::iter::once(batch)
                        .chain(rest.into_iter().flatten().take(OUTBOX_BATCHES));
                    for f in batches.flatten() {
                        let len = f.len().saturating_sub(proto::PACKET_HEADER) as u64;
                        self.count_sent(to_quic(own, &out, f), len);
                    }
                }
            }
        }
        {
            let mut clients = self.write();
            if clients.get(&key).is_some_and(|e| e.id == id) {
                clients.remove(&key);
            }
        }
        info!(%node, %transport, "relay session down");
        Ok(())
    }

    /// Counts a packet with `len` bytes of payload as forwarded, or as dropped when its
    /// destination's queue (or connection) refused it.
    fn count_sent(&self, sent: bool, len: u64) {
        let stats = &self.inner.stats;
        if sent {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            stats.forwarded_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands each outbox its packets gathered in `handoffs`, counting those that did not fit
    /// as dropped.
    fn hand_off(&self, handoffs: &mut Handoffs) {
        let stats = &self.inner.stats;
        for (_, outbox, frames) in handoffs.0.drain(..) {
            let n = frames.len();
            let queued = outbox.try_send(frames);
            // Counted as forwarded by the destination's session, once sent.
            stats
                .across_threads
                .fetch_add(queued as u64, Ordering::Relaxed);
            stats
                .dropped_queue_full
                .fetch_add((n - queued) as u64, Ordering::Relaxed);
        }
    }

    /// Does what a frame from the node of `session` (its entry `id`), which runs on thread
    /// `here`, asks for: replies go to `out`, packets for QUIC sessions on other threads to
    /// `handoffs` (for [`Relay::hand_off`]).
    fn handle(
        &self,
        (here, id): (std::thread::ThreadId, u64),
        session: &mut Session,
        alive: &AtomicBool,
        (out, handoffs): (&queue::Sender, &mut Handoffs),
        frame: Bytes,
    ) {
        let stats = &self.inner.stats;
        let step = session.on_frame(
            &frame,
            alive.load(Ordering::Relaxed),
            &*self.inner.auth,
            &SystemClock,
        );
        match step {
            Step::Forward { dst, len } => {
                let found = {
                    let clients = self.read();
                    clients.get(&dst).map(|e| {
                        if !e.refused.is_empty() && e.refused.binary_search(session.key()).is_ok() {
                            stats.dropped_refused.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        let recv = session::into_recv(frame, session.key());
                        match &e.quic {
                            Some(q) if q.thread == here => {
                                self.count_sent(to_quic(&q.datagrams, &e.tx, recv), len);
                            }
                            Some(q) => handoffs.push(dst, &q.outbox, recv),
                            None => self.count_sent(e.tx.try_send(recv), len),
                        }
                    })
                };
                if found.is_none() {
                    stats.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
                    if let Some(gone) = session.peer_gone(dst, Instant::now()) {
                        out.try_send(gone);
                    }
                }
            }
            Step::Unvouched => {
                stats.dropped_unvouched.fetch_add(1, Ordering::Relaxed);
            }
            Step::RateLimited => {
                stats.dropped_rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            Step::Reply(f) => {
                out.try_send(f);
            }
            // A session changes only its own entry, not a newer session's of the same node
            // (a frame of the old connection handled after the new one registered).
            Step::ValidUntil(until) => {
                if let Some(e) = self.write().get_mut(session.key())
                    && e.id == id
                {
                    e.valid_until = e.valid_until.max(until);
                }
            }
            Step::TicketRefused(reason) => {
                debug!(node = %NodeKey::from_bytes(*session.key()), %reason, "refreshed ticket refused");
            }
            Step::Refuse(keys) => {
                debug!(node = %NodeKey::from_bytes(*session.key()), refused = keys.len(), "refused sources");
                if let Some(e) = self.write().get_mut(session.key())
                    && e.id == id
                {
                    e.refused = keys;
                }
            }
            Step::RefuseTooSoon => {
                stats
                    .dropped_refuse_too_soon
                    .fetch_add(1, Ordering::Relaxed);
            }
            Step::TicketTooSoon => {
                stats
                    .dropped_ticket_too_soon
                    .fetch_add(1, Ordering::Relaxed);
            }
            Step::Nothing => {}
            Step::Unexpected { first } => {
                if first {
                    warn!(node = %NodeKey::from_bytes(*session.key()), "unexpected frame from a relay client (further ones are only counted)");
                }
                stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
            Step::Malformed => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sends a `Recv` frame to a QUIC client as a datagram, or on its stream (`stream`) when it
/// is larger than a datagram may be; false if the connection or the stream's queue refused it.
/// Runs on the thread the client's connection runs on.
fn to_quic(datagrams: &Datagrams, stream: &queue::Sender, frame: Bytes) -> bool {
    match datagrams.send(frame) {
        Sent::Queued => true,
        Sent::Dropped => false,
        Sent::TooLarge(f) => stream.try_send(f),
    }
}

async fn ws_upgrade(State(relay): State<Relay>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_FRAME + 16)
        .max_frame_size(MAX_FRAME + 16)
        .on_upgrade(move |socket| async move {
            relay.ws_session(socket).await;
        })
}

impl Relay {
    async fn ws_session(&self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
        let (out_tx, mut out_rx) = queue::channel(QUEUE, QUEUE_BYTES);
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Binary(b) => {
                        let sent = in_tx.send(b).await;
                        if sent.is_err() {
                            return;
                        }
                    }
                    Message::Close(_) => return,
                    _ => {}
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if write_burst(&mut sink, f, || out_rx.try_recv(), Message::Binary)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let remote: SocketAddr = ([0, 0, 0, 0], 0).into();
        if let Err(e) = self.session(remote, "websocket", None, in_rx, out_tx).await {
            debug!(error = %format!("{e:#}"), "relay WebSocket session ended");
        }
        reader.abort();
        let _ = tokio::time::timeout(Duration::from_millis(200), writer).await;
    }
}

/// One QUIC handshake in progress, counted while it lives.
/// What the QUIC endpoints of one relay count together: connections (in all and per address)
/// and handshakes in progress.
#[derive(Clone)]
pub(crate) struct QuicGate {
    admission: crate::http::Admission,
    handshaking: Arc<AtomicUsize>,
    handshakes: crate::http::Handshakes,
}

impl QuicGate {
    pub(crate) fn new(limits: &QuicLimits) -> Self {
        Self {
            admission: crate::http::Admission::new(limits.max_connections, limits.per_ip),
            handshaking: Arc::new(AtomicUsize::new(0)),
            handshakes: crate::http::Handshakes::new(limits.handshakes),
        }
    }
}

struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }

    /// Enters only while fewer than `limit` are in progress, checked and counted in one step:
    /// the endpoints on other threads take theirs at the same time (checked first and counted
    /// after, two threads each saw seven of eight and both went ahead).
    fn try_enter(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The next frame on a queue a session may not have (never, without one).
async fn recv_some(rx: Option<&mut queue::BatchReceiver>) -> Option<Vec<Bytes>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next datagram of a QUIC session (never, for a WebSocket); `None` once the connection
/// is gone. Cancel-safe: a datagram not yet returned stays in the connection.
async fn read_datagram(quic: Option<&quinn::Connection>) -> Option<Bytes> {
    match quic {
        Some(c) => c.read_datagram().await.ok(),
        None => std::future::pending().await,
    }
}

/// Most frames written to a WebSocket between two flushes.
const WS_BATCH: usize = 64;

/// Writes `first` and then the frames already waiting (`waiting` gives the next, at most
/// [`WS_BATCH`] in all) to a WebSocket `sink`, each as one binary message made by `message`,
/// and flushes once at the end: a burst then leaves in a few large writes and TLS records
/// instead of one write and one record per packet.
pub(crate) async fn write_burst<S, M>(
    sink: &mut S,
    first: Bytes,
    mut waiting: impl FnMut() -> Option<Bytes>,
    message: impl Fn(Bytes) -> M,
) -> Result<(), S::Error>
where
    S: futures_util::Sink<M> + Unpin,
{
    sink.feed(message(first)).await?;
    for _ in 1..WS_BATCH {
        match waiting() {
            Some(f) => sink.feed(message(f)).await?,
            None => break,
        }
    }
    sink.flush().await
}

/// Reads one length-prefixed frame; `None` at the end of the stream.
pub(crate) async fn read_prefixed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> anyhow::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = usize::from(u16::from_be_bytes(len));
    if n == 0 || n > MAX_FRAME + 1 {
        anyhow::bail!("bad frame length {n}");
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}
