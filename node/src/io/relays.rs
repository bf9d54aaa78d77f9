//! Relay connections: one task per relay in the netmap, reconnecting with backoff, measuring
//! latency, and moving packets between the relay and the event loop.
//!
//! The connections run on a thread of their own with its own runtime (`lattice-relays`): a
//! relayed packet passes the QUIC endpoint's driver, the connection's driver and the task that
//! hands it to the data plane, and on one thread each of them wakes the next without waking
//! another thread (on the node's shared runtime the three woke each other across its threads,
//! and on two CPUs that cost a tenth of the relayed path's throughput).
//!
//! When to probe a relay, give a connection up as dead, dial again and send the list of
//! refused strangers is the core's (`node_proto::relay_link`); this module dials, moves
//! frames and sleeps until the next of those.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hybrid::StaticKeypair;
use node_proto::relay_link::{Action, Link, Redial};
use relay::client::{self, Incoming};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use wire::{NodeKey, RelayId, RelayInfo};

/// How long stopping the relay thread waits for its blocking tasks (name look-ups).
const SHUTDOWN_WAIT: Duration = Duration::from_millis(500);
/// Most relays connected at once.
pub const MAX_RELAYS: usize = 8;
const _: () = assert!(node_proto::strangers::MAX_REFUSED <= relay::proto::MAX_REFUSED);

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
    /// Queues `Send` frames (built with `relay::proto::encode_packet`) through relay `id`, all
    /// at once (`relay::client::FrameSender::send_batch`); how many were queued.
    pub fn send_batch(&self, id: RelayId, frames: Vec<Bytes>) -> usize {
        let Ok(map) = self.0.read() else {
            return 0;
        };
        map.get(&id).map_or(0, |slot| {
            slot.lock()
                .ok()
                .and_then(|s| s.as_ref().map(|s| s.send_batch(frames)))
                .unwrap_or(0)
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

/// Frames for relays gathered while a batch is finished, each relay's sent at once
/// ([`RelaySenders::send_batch`]) by [`RelayBatch::flush`].
pub struct RelayBatch {
    senders: RelaySenders,
    frames: Vec<(RelayId, Vec<Bytes>)>,
}

impl RelayBatch {
    /// An empty batch for `senders`.
    pub fn new(senders: RelaySenders) -> Self {
        Self {
            senders,
            frames: Vec::new(),
        }
    }

    /// Adds a `Send` frame for relay `id`.
    pub fn push(&mut self, id: RelayId, frame: Bytes) {
        match self.frames.iter_mut().find(|(r, _)| *r == id) {
            Some((_, frames)) => frames.push(frame),
            None => self.frames.push((id, vec![frame])),
        }
    }

    /// Queues what was added, each relay's frames at once.
    pub fn flush(&mut self) {
        for (id, frames) in self.frames.drain(..) {
            self.senders.send_batch(id, frames);
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
    /// Nodes, not peers, every relay should forward nothing from to this one.
    refused: watch::Sender<Vec<[u8; 32]>>,
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
            refused: watch::channel(Vec::new()).0,
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

    /// Tells every relay, now and on each connection, to forward nothing from `keys` (nodes
    /// that are not peers: [`node_proto::strangers`]) to this node.
    pub fn set_refused(&self, keys: &[NodeKey]) {
        self.refused
            .send_replace(keys.iter().map(|k| *k.as_bytes()).collect());
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
                Told {
                    ticket: self.ticket.subscribe(),
                    refused: self.refused.subscribe(),
                },
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
    mut told: Told,
    out: SendSlot,
    (events, packets): (mpsc::Sender<RelayEvent>, RelayInbox),
) {
    let id = info.id;
    let mut redial = Redial::default();
    loop {
        let t = loop {
            if let Some(t) = told.ticket.borrow_and_update().clone() {
                break t;
            }
            if told.ticket.changed().await.is_err() {
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
                tokio::time::sleep(redial.failed()).await;
                continue;
            }
        };
        redial.connected();
        let transport = conn.transport().name();
        info!(relay = %info.name, transport, "relay connected");
        if events.send(RelayEvent::Up { id, transport }).await.is_err() {
            return;
        }
        set_sender(&out, Some(conn.sender()));
        let reason = serve(id, conn, &mut told, &events, &packets).await;
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
    told: &mut Told,
    events: &mpsc::Sender<RelayEvent>,
    packets: &RelayInbox,
) -> Option<String> {
    // A new connection's relay refuses nothing yet: the list goes out at once if it has any.
    let refusing = !told.refused.borrow_and_update().is_empty();
    let mut link = Link::new(Instant::now(), refusing);
    let timer = tokio::time::sleep_until(link.next_timeout().into());
    tokio::pin!(timer);
    // Whether the link may have something to do: after its timer and after the list changed,
    // not after a frame (hearing one changes nothing due before the next probe's time).
    let mut check = true;
    loop {
        if std::mem::take(&mut check) {
            let now = Instant::now();
            while let Some(action) = link.poll(now) {
                match action {
                    Action::Ping => conn.ping(),
                    Action::SendRefusals => {
                        let list = told.refused.borrow_and_update().clone();
                        link.refusals_sent(now, conn.refuse(&list));
                    }
                    Action::Dead => return Some("the relay stopped answering".into()),
                }
            }
            timer
                .as_mut()
                .reset(tokio::time::Instant::from_std(link.next_timeout()));
        }
        tokio::select! {
            () = &mut timer => check = true,
            changed = told.refused.changed() => {
                if changed.is_err() {
                    return None;
                }
                link.refusals_changed();
                check = true;
            }
            inc = conn.recv() => {
                let Some(inc) = inc else {
                    return Some("the relay closed the connection".into());
                };
                link.heard(Instant::now());
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
            changed = told.ticket.changed() => {
                if changed.is_err() {
                    return None;
                }
                if let Some(t) = told.ticket.borrow_and_update().clone() {
                    conn.refresh_ticket(&t);
                }
            }
        }
    }
}

/// What the manager tells every connection: the latest relay ticket, and the strangers
/// relays should refuse.
struct Told {
    ticket: watch::Receiver<Option<Vec<u8>>>,
    refused: watch::Receiver<Vec<[u8; 32]>>,
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

    /// Hex, as the coordinator sends tickets.
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_strangers_are_sent_to_the_relay_which_drops_their_packets() {
        use hybrid::ticket::{Ticket, TicketSigner};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let signer = TicketSigner::from_seed([5; 32]);
        let ticket = |k: &StaticKeypair| {
            signer
                .issue(Ticket {
                    node_key: k.public(),
                    not_after: now + 60,
                })
                .to_vec()
        };
        // A relay on loopback.
        let relay_key = StaticKeypair::from_secret([11; 32]);
        let auth = Arc::new(relay::TicketAuthorizer::new(wire::TicketKey::from_bytes(
            signer.public(),
        )));
        let relay = relay::Relay::new(relay_key, auth);
        let cert = relay::tls::RelayCert::generate().unwrap();
        let listener = relay::QuicListener::start(
            &relay,
            &cert,
            "127.0.0.1:0".parse().unwrap(),
            1,
            relay::QuicLimits::default(),
        )
        .unwrap();
        let info = RelayInfo {
            id: RelayId(1),
            name: "r".into(),
            key: wire::RelayKey::from_bytes(relay.public_key()),
            quic: Some(listener.local_addr()),
            cert_sha256: Some(wire::CertPin(cert.pin())),
            websocket: None,
            stun: vec![],
        };
        // This node's connections, and a stranger connected directly.
        let me = StaticKeypair::from_secret([12; 32]);
        let (events_tx, mut events) = mpsc::channel(64);
        let (inbox, mut queues) = RelayInbox::new(1);
        let mut manager =
            RelayManager::new(me.clone(), relay::dial::Dialer::default(), events_tx, inbox)
                .unwrap();
        manager.set_ticket(&hex(&ticket(&me)));
        // Refused before the connection is up: sent once it is.
        let stranger = StaticKeypair::from_secret([13; 32]);
        let other = StaticKeypair::from_secret([14; 32]);
        manager.set_refused(&[NodeKey::from_bytes(stranger.public())]);
        manager.set_relays(std::slice::from_ref(&info));
        let up = async {
            loop {
                if let Some(RelayEvent::Up { .. }) = events.recv().await {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), up)
            .await
            .unwrap();
        let cs = client::connect(&info, &stranger, &ticket(&stranger))
            .await
            .unwrap();
        let co = client::connect(&info, &other, &ticket(&other))
            .await
            .unwrap();
        // Only the other node's packets arrive; the stranger's are dropped at the relay.
        let wait = async {
            loop {
                cs.send(&me.public(), b"flood");
                co.send(&me.public(), b"hello");
                if let Ok(Some(p)) =
                    tokio::time::timeout(Duration::from_millis(50), queues[0].recv()).await
                {
                    assert_eq!(p.src, NodeKey::from_bytes(other.public()));
                    if relay.stats().dropped_refused > 0 {
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the relay never dropped the stranger's packets");
        // Lifted (the relay takes the new list within relay_link::REFUSE_EVERY): the stranger
        // gets through.
        manager.set_refused(&[]);
        let through = async {
            loop {
                cs.send(&me.public(), b"let in");
                if let Ok(Some(p)) =
                    tokio::time::timeout(Duration::from_millis(50), queues[0].recv()).await
                    && p.src == NodeKey::from_bytes(stranger.public())
                {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), through)
            .await
            .expect("the stranger was never let through again");
        assert_eq!(relay.stats().dropped_refuse_too_soon, 0);
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
