//! Relay connections: one task per relay in the netmap, reconnecting with backoff, measuring
//! latency, and moving packets between the relay and the event loop.
//!
//! The connections run on a thread of their own with its own runtime (`lattice-relays`): a
//! relayed packet passes the QUIC endpoint's driver, the connection's driver and the task that
//! hands it to the data plane, and on one thread each of them wakes the next without waking
//! another thread (on the node's shared runtime the three woke each other across its threads,
//! and on two CPUs that cost a tenth of the relayed path's throughput).
//!
//! A connection is considered dead when two latency probes in a row go unanswered
//! ([`DEAD_AFTER`]), so a restarted relay is found again within seconds rather than after
//! QUIC's idle timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hybrid::StaticKeypair;
use relay::client::{self, Incoming};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use wire::{NodeKey, RelayId, RelayInfo};

/// Latency probe interval.
const PING_EVERY: Duration = Duration::from_secs(2);
/// A connection with no pong for this long is replaced.
const DEAD_AFTER: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long stopping the relay thread waits for its blocking tasks (name look-ups).
const SHUTDOWN_WAIT: Duration = Duration::from_millis(500);
/// Most relays connected at once.
pub const MAX_RELAYS: usize = 8;

/// What relay tasks tell the event loop.
#[derive(Debug)]
pub enum RelayEvent {
    /// Connected (and authenticated).
    Up {
        /// Which relay.
        id: RelayId,
        /// `quic` or `websocket`.
        transport: &'static str,
    },
    /// Disconnected, or could not connect.
    Down {
        /// Which relay.
        id: RelayId,
        /// Why.
        error: String,
    },
    /// The relay has no session for `key`.
    PeerGone {
        /// Which relay.
        id: RelayId,
        /// The peer.
        key: NodeKey,
    },
    /// A latency measurement.
    Rtt {
        /// Which relay.
        id: RelayId,
        /// Round-trip time.
        rtt: Duration,
    },
}

/// A packet from a peer through a relay (for the data plane, not the control loop).
#[derive(Debug)]
pub struct RelayPacket {
    /// Which relay.
    pub id: RelayId,
    /// The peer's key.
    pub src: NodeKey,
    /// The bytes.
    pub payload: Bytes,
}

/// Where packets that come through relays go: one queue per data-plane worker. A peer's
/// packets always go to the same worker (so they stay in order), and peers are spread over
/// all of them (by their key, which is random), so a node with many relayed peers opens
/// their packets on all its cores, not on one.
#[derive(Clone, Debug)]
pub struct RelayInbox(Arc<[mpsc::Sender<RelayPacket>]>);

/// Packets queued for the workers through relays, shared out among their queues (each holds at
/// least 512).
const INBOX: usize = 4096;

impl RelayInbox {
    /// An inbox for `workers` workers (at least one), and each worker's queue, in order.
    pub fn new(workers: usize) -> (Self, Vec<mpsc::Receiver<RelayPacket>>) {
        let n = workers.max(1);
        let (tx, rx) = (0..n).map(|_| mpsc::channel((INBOX / n).max(512))).unzip();
        (Self(Arc::from(Vec::into_boxed_slice(tx))), rx)
    }

    /// The worker that takes `peer`'s packets.
    pub fn worker_for(&self, peer: &NodeKey) -> usize {
        let b = peer.as_bytes();
        let h = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        (h % self.0.len() as u64) as usize
    }

    /// Queues `p` for its peer's worker, waiting while that queue is full; fails once the
    /// worker is gone.
    async fn send(&self, p: RelayPacket) -> Result<(), mpsc::error::SendError<RelayPacket>> {
        self.0[self.worker_for(&p.src)].send(p).await
    }
}

/// A connection's frame queue, while connected.
type SendSlot = Arc<Mutex<Option<client::FrameSender>>>;

/// Where packets for each relay go: shared by the control loop and the data-plane workers,
/// which queue packets on a connection directly.
#[derive(Clone, Default)]
pub struct RelaySenders(Arc<RwLock<HashMap<RelayId, SendSlot>>>);

impl RelaySenders {
    /// Queues a `Send` frame (built with `relay::proto::encode_packet`) through relay `id`;
    /// false if it cannot be queued.
    pub fn send(&self, id: RelayId, frame: Bytes) -> bool {
        let Ok(map) = self.0.read() else {
            return false;
        };
        map.get(&id).is_some_and(|slot| {
            slot.lock()
                .ok()
                .and_then(|s| s.as_ref().map(|s| s.send(frame)))
                .unwrap_or(false)
        })
    }

    fn set(&self, id: RelayId, slot: Option<SendSlot>) {
        if let Ok(mut map) = self.0.write() {
            match slot {
                Some(s) => map.insert(id, s),
                None => map.remove(&id),
            };
        }
    }
}

struct Handle {
    info: RelayInfo,
    task: tokio::task::JoinHandle<()>,
}

/// The thread the relay connections run on, with its own single-threaded runtime; dropping
/// this stops the runtime (and with it every connection) and waits for the thread.
struct RelayThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RelayThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lattice-relays".into())
            .spawn(move || {
                // Runs the spawned connections until told to stop (or the manager is gone).
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
                // A relay's name still being resolved (a blocking task) must not hold up
                // the node's exit.
                runtime.shutdown_timeout(SHUTDOWN_WAIT);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for RelayThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("the relay thread panicked");
        }
    }
}

/// The node's relay connections.
pub struct RelayManager {
    node: StaticKeypair,
    dialer: relay::dial::Dialer,
    ticket: watch::Sender<Option<Vec<u8>>>,
    conns: HashMap<RelayId, Handle>,
    senders: RelaySenders,
    events: mpsc::Sender<RelayEvent>,
    packets: RelayInbox,
    /// Where the connections run.
    thread: RelayThread,
}

impl Drop for RelayManager {
    fn drop(&mut self) {
        for h in self.conns.values() {
            h.task.abort();
        }
    }
}

impl RelayManager {
    /// A manager that connects as `node` with sockets from `dialer`, reports to `events`
    /// and hands peers' packets to the workers through `packets`; fails if its thread cannot
    /// start.
    pub fn new(
        node: StaticKeypair,
        dialer: relay::dial::Dialer,
        events: mpsc::Sender<RelayEvent>,
        packets: RelayInbox,
    ) -> std::io::Result<Self> {
        Ok(Self {
            node,
            dialer,
            ticket: watch::channel(None).0,
            conns: HashMap::new(),
            senders: RelaySenders::default(),
            events,
            packets,
            thread: RelayThread::start()?,
        })
    }

    /// The send side of every connection, for the data plane.
    pub fn senders(&self) -> RelaySenders {
        self.senders.clone()
    }

    /// A fresh ticket (hex) from the coordinator: used for new connections and handed to
    /// live ones.
    pub fn set_ticket(&self, hex: &str) {
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect();
        match bytes {
            Some(b) => {
                self.ticket.send_replace(Some(b));
            }
            None => warn!("the coordinator sent a malformed relay ticket"),
        }
    }

    /// Connects to the relays in `list` (at most [`MAX_RELAYS`]) and drops the others.
    pub fn set_relays(&mut self, list: &[RelayInfo]) {
        let wanted: Vec<&RelayInfo> = list.iter().take(MAX_RELAYS).collect();
        let senders = &self.senders;
        self.conns.retain(|id, h| {
            let keep = wanted.iter().any(|r| r.id == *id && **r == h.info);
            if !keep {
                h.task.abort();
                senders.set(*id, None);
            }
            keep
        });
        for r in wanted {
            if self.conns.contains_key(&r.id) {
                continue;
            }
            let out: SendSlot = Arc::new(Mutex::new(None));
            self.senders.set(r.id, Some(Arc::clone(&out)));
            let task = self.thread.handle.spawn(run(
                self.dialer,
                r.clone(),
                self.node.clone(),
                self.ticket.subscribe(),
                out,
                (self.events.clone(), self.packets.clone()),
            ));
            self.conns.insert(
                r.id,
                Handle {
                    info: r.clone(),
                    task,
                },
            );
        }
    }
}

async fn run(
    dialer: relay::dial::Dialer,
    info: RelayInfo,
    node: StaticKeypair,
    mut ticket: watch::Receiver<Option<Vec<u8>>>,
    out: SendSlot,
    (events, packets): (mpsc::Sender<RelayEvent>, RelayInbox),
) {
    let id = info.id;
    let mut backoff = Duration::from_millis(250);
    loop {
        let t = loop {
            if let Some(t) = ticket.borrow_and_update().clone() {
                break t;
            }
            if ticket.changed().await.is_err() {
                return;
            }
        };
        let conn = match client::connect_with(dialer, &info, &node, &t).await {
            Ok(c) => c,
            Err(e) => {
                let error = format!("{e:#}");
                debug!(relay = %info.name, %error, "relay connection failed");
                if events.send(RelayEvent::Down { id, error }).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        let transport = conn.transport().name();
        info!(relay = %info.name, transport, "relay connected");
        if events.send(RelayEvent::Up { id, transport }).await.is_err() {
            return;
        }
        set_sender(&out, Some(conn.sender()));
        let reason = serve(id, conn, &mut ticket, &events, &packets).await;
        set_sender(&out, None);
        let Some(reason) = reason else { return };
        info!(relay = %info.name, %reason, "relay connection lost");
        if events
            .send(RelayEvent::Down { id, error: reason })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Runs one connection; returns why it ended (`None`: the event loop is gone).
async fn serve(
    id: RelayId,
    mut conn: client::RelayConn,
    ticket: &mut watch::Receiver<Option<Vec<u8>>>,
    events: &mpsc::Sender<RelayEvent>,
    packets: &RelayInbox,
) -> Option<String> {
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut last_heard = Instant::now();
    conn.ping();
    loop {
        tokio::select! {
            inc = conn.recv() => {
                let Some(inc) = inc else {
                    return Some("the relay closed the connection".into());
                };
                last_heard = Instant::now();
                let ev = match inc {
                    Incoming::Packet { src, payload } => {
                        let p = RelayPacket { id, src: NodeKey::from_bytes(src), payload };
                        if packets.send(p).await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    Incoming::PeerGone(k) => RelayEvent::PeerGone {
                        id,
                        key: NodeKey::from_bytes(k),
                    },
                    Incoming::Pong(rtt) => RelayEvent::Rtt { id, rtt },
                };
                if events.send(ev).await.is_err() {
                    return None;
                }
            }
            changed = ticket.changed() => {
                if changed.is_err() {
                    return None;
                }
                if let Some(t) = ticket.borrow_and_update().clone() {
                    conn.refresh_ticket(&t);
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > DEAD_AFTER {
                    return Some("the relay stopped answering".into());
                }
                conn.ping();
            }
        }
    }
}

/// Points the event loop's sends for a relay at `sender` (`None`: not connected).
fn set_sender(slot: &Mutex<Option<client::FrameSender>>, sender: Option<client::FrameSender>) {
    if let Ok(mut s) = slot.lock() {
        *s = sender;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real node key (an X25519 public key), one per `i`.
    fn key(i: u32) -> NodeKey {
        let mut secret = [7u8; 32];
        secret[1..5].copy_from_slice(&i.to_le_bytes());
        NodeKey::from_bytes(StaticKeypair::from_secret(secret).public())
    }

    #[tokio::test]
    async fn relayed_packets_go_to_one_worker_per_peer_in_order_and_peers_spread() {
        let (inbox, mut queues) = RelayInbox::new(4);
        assert_eq!(queues.len(), 4);
        // Every worker gets some of 64 peers, and a peer always the same worker.
        let mut per_worker = [0usize; 4];
        for i in 0..64 {
            let w = inbox.worker_for(&key(i));
            assert_eq!(w, inbox.worker_for(&key(i)));
            per_worker[w] += 1;
        }
        assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
        // Interleaved packets of 8 peers: each arrives at its peer's worker, in its order.
        let id = RelayId(1);
        for seq in 0..50u8 {
            for i in 0..8 {
                let p = RelayPacket {
                    id,
                    src: key(i),
                    payload: Bytes::from(vec![seq]),
                };
                inbox.send(p).await.unwrap();
            }
        }
        let mut next = HashMap::new();
        let mut got = 0;
        for (w, q) in queues.iter_mut().enumerate() {
            while let Ok(p) = q.try_recv() {
                assert_eq!(inbox.worker_for(&p.src), w);
                let expected = next.entry(p.src).or_insert(0u8);
                assert_eq!(p.payload[0], *expected, "out of order");
                *expected += 1;
                got += 1;
            }
        }
        assert_eq!(got, 400);
        // A single worker takes every peer.
        let (one, _queues) = RelayInbox::new(1);
        assert!((0..16).all(|i| one.worker_for(&key(i)) == 0));
    }
}
