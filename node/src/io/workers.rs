//! The data plane's workers: each reads its own TUN queue and its own UDP sockets (one port
//! shared with `SO_REUSEPORT`), feeds what it reads to the shared core, runs the encryption
//! and decryption the core hands out without holding it, and sends and writes the results
//! (`node_proto::shared::{feed, finish}`). With helpers ([`Modes::helpers`]) each worker is a
//! pipeline: its thread reads and feeds and prepares the batch's crypto jobs (`prepare`:
//! counters and sessions), a crypto thread of its own runs their AEAD and nothing else
//! (`crypt_prepared`), a finishing thread completes them in the core and hands its datagrams
//! and TUN packets to helper tasks that make the system calls; without, the worker does all
//! of it, batch after batch.
//!
//! The kernel keeps each flow on one TUN queue and each peer's datagrams on one socket, and
//! a worker's batches are finished one after another in the order it fed them, so each flow
//! leaves in the order it came. Workers run for different flows and peers at once; the
//! core's lock is held to decide and to finish, never during a data packet's AEAD or a
//! system call (handshakes, which change the core's state, still run under it).
//!
//! Left to the kernel's hash, busy peers often share a worker while another idles: each
//! sender of WireGuard data gets a worker that owns it ([`crate::io::steer`]), and the worker
//! that received its datagrams hands them over, in order, through the owner's queue.
//!
//! Workers send through relays themselves, and take the packets peers send through relays,
//! each worker those of its share of the peers (`RelayInbox`). What a worker cannot send
//! itself goes to the control loop: datagrams for an auxiliary socket, and the core's events
//! (a wake-up). The control loop's own packets for the TUN device go out through worker 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use node_proto::shared::{BatchOutput, complete, crypt_prepared, feed, finish, prepare};
use node_proto::{Addr, CryptoJob, NodeState, Packet, SockId, Transmit};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, watch};
use tracing::debug;

use crate::io::aead::{AeadHelpers, Asker};
use crate::io::relays::{RelayBatch, RelayPacket, RelaySenders};
use crate::io::steer::{Handoff, Steering, split};
use crate::io::tun::{ReadBufs, TunQueue, TunReader, is_packet_error};
use crate::io::udp::{RecvBufs, Sender, Sock, Sockets};

/// Most TUN reads per wake-up (each may carry a 64 KiB run of packets).
const TUN_READS: usize = 8;
/// Most relayed packets per batch.
const RELAY_BATCH: usize = 64;
/// Batches queued between a worker and the control loop, each way. When full, the batch is
/// dropped (as a full socket buffer drops), never waited for: the two wait on each other.
const HANDOFF: usize = 256;
/// Batches of datagrams waiting for each worker from the others (its senders' data). When
/// full, the batch is dropped and counted, never waited for: two workers may be handing each
/// other datagrams at once.
const HANDOFFS: usize = 64;
/// The most workers `--workers` defaults to, however many CPUs there are. Every batch takes
/// the core's one lock (twice when it has crypto jobs): on the 16-CPU machine a 1,280-byte
/// packet held it 0.28 us of its 2.2 us sealing on one thread (`scripts/bench-core`), and
/// threads each sealing for its own peer reached 2.1 M packets/s in all on 8 threads, about
/// 60% of what the lock allows, and no more on 12 or 16: past 8 workers the lock, not the
/// AEAD, limits a node. Since the flow table, the filter and the parsing of data messages
/// moved out of it (`gate`), a packet holds it about half as long (on 2 CPUs: 0.12 -> 0.06 us
/// sealing and opening); not yet measured on 16.
pub const DEFAULT_MAX: usize = 8;

/// How many workers to run: `asked`, or one per CPU up to [`DEFAULT_MAX`].
pub fn count(asked: Option<usize>) -> usize {
    asked.unwrap_or_else(|| cpus().min(DEFAULT_MAX))
}

/// How the workers run: `--io-helpers` and `--steering`, each `None` for its default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Modes {
    /// As pipelines with helpers ([`Modes::helpers`]).
    pub io_helpers: Option<bool>,
    /// With each sender steered to a worker of its own ([`crate::io::steer`]).
    pub steering: Option<bool>,
    /// Threads sharing the pipelined workers' AEAD ([`crate::io::aead`]).
    pub aead_helpers: Option<u16>,
}

impl Modes {
    /// Whether `workers` workers run as pipelines with helpers (`--io-helpers`, or by default when
    /// there are at least two CPUs per worker): a crypto thread per worker runs each batch's AEAD
    /// and a finishing thread the core's last step while the worker reads and feeds the next batch,
    /// and helper tasks on the runtime's threads send and write the TUN device. One stream then
    /// runs on four threads per direction instead of one. On 16 CPUs with 8 workers, the throughput
    /// bench's one stream: 4.13 and 3.95 Gbit/s with a finishing thread doing the AEAD too, 3.17
    /// and 3.56 with the worker encrypting itself; then, with the AEAD on its own thread, 4.51 and
    /// 5.27 against 4.04 and 4.18 with one finishing thread (ping under load 3.03 and 3.70 ms
    /// against 1.45 and 1.63: the faster stream keeps more in the queues). Where the CPUs are not
    /// there, the hand-offs' wake-ups and context switches cost more than the overlap gains (on 2
    /// CPUs with 2 workers, in five alternating runs: one stream 2.43 Gbit/s on average with helper
    /// tasks, 2.72 without), and each worker does it all itself.
    pub fn helpers(&self, workers: usize) -> bool {
        self.io_helpers.unwrap_or_else(|| spare_cpus(workers))
    }

    /// Whether `workers` workers steer senders, by default where there are at least two CPUs per
    /// worker (as for [`Modes::helpers`]): balance helps where workers wait for CPUs that are idle,
    /// while each hand-over costs a wake-up of the owner. On 2 CPUs with 2 workers, where every CPU
    /// is busy anyway, it made no difference one way or the other (the throughput bench's 4-peer
    /// row, three alternating pairs: 4.17, 4.12 and 4.08 Gbit/s without, 4.24, 3.75 and 4.08 with).
    pub fn steering(&self, workers: usize) -> bool {
        workers > 1 && self.steering.unwrap_or_else(|| spare_cpus(workers))
    }

    /// How many threads share the AEAD of `workers` pipelined workers' batches
    /// (`--aead-helpers`, by default [`default_aead_helpers`] of the CPUs, and none without
    /// pipelines: their crypto threads are what hands parts out).
    pub fn aead_helpers(&self, workers: usize) -> usize {
        if self.helpers(workers) {
            self.aead_helpers
                .map_or_else(|| default_aead_helpers(cpus()), usize::from)
        } else {
            0
        }
    }
}

/// The most AEAD helpers a node starts by default.
pub const DEFAULT_MAX_AEAD_HELPERS: usize = 8;

/// AEAD helpers by default on `cpus` CPUs: half of them less two, at most
/// [`DEFAULT_MAX_AEAD_HELPERS`] (six on 16 CPUs; none up to 4). Without helpers one stream is
/// bound by its worker's crypto thread: on 16 CPUs (the device), the throughput bench's one
/// stream ran at 5.58 Gbit/s without and 8.16 with six (its crypto thread 79% busy without,
/// no thread past 79% with), the 4-peer row at 12.28 and 13.45, ping under load 1.99 ms in
/// both. (Before the replay window left its mutex, six helpers gave one stream 11-18% more
/// but the 4-peer row 7-14% less, each helper taking that mutex twice a packet.)
pub fn default_aead_helpers(cpus: usize) -> usize {
    (cpus / 2).saturating_sub(2).min(DEFAULT_MAX_AEAD_HELPERS)
}

/// The workers' own runtimes, one per worker: a worker's thread drives a single-threaded
/// runtime of its own, with which its sockets and TUN queue are registered, so it waits for
/// them in its own `epoll` and wakes itself. Driven by the node's shared runtime (through
/// `Handle::block_on`), one of that runtime's threads waited for them and woke the worker:
/// two wake-ups for each readiness (the runtime's threads took 6.8% of all samples in a
/// one-stream profile on 2 CPUs, most of it waking up).
pub struct Runtimes(Vec<OwnRuntime>);

impl Runtimes {
    /// One runtime for each of `n` workers (at least one).
    pub fn new(n: usize) -> std::io::Result<Self> {
        (0..n.max(1))
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|r| OwnRuntime(Some(r)))
            })
            .collect::<std::io::Result<_>>()
            .map(Self)
    }

    /// Their handles, in order, for registering each worker's sockets and TUN queue.
    pub fn handles(&self) -> Vec<Option<tokio::runtime::Handle>> {
        self.0
            .iter()
            .map(|r| r.0.as_ref().map(|r| r.handle().clone()))
            .collect()
    }
}

/// A worker's runtime. Dropped anywhere, even on a thread of the shared runtime (where
/// dropping a runtime would wait, and tokio forbids it), it shuts down without waiting.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.shutdown_background();
        }
    }
}

/// Whether there are at least two CPUs for each of `workers` workers.
fn spare_cpus(workers: usize) -> bool {
    cpus() >= 2 * workers
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// What the workers and the control loop share.
pub struct Shared {
    /// The sans-IO core.
    pub core: Mutex<NodeState>,
    /// Wakes the control loop: the core has events, or wants its timer earlier.
    pub wake: Notify,
    /// When the control loop will next wake by itself (nanoseconds after `base`).
    control_deadline: AtomicU64,
    base: Instant,
    /// TUN reads dropped as malformed by the offload code (before the core saw them).
    pub tun_read_errors: AtomicU64,
    /// Packets in TUN writes the kernel refused.
    pub tun_write_failed: Arc<AtomicU64>,
    /// Which worker handles each sender's data.
    pub steering: Steering,
    /// Read buffers handed on as packets, and how many of them were used again
    /// ([`crate::io::recycle`]), over all workers.
    pub buffers_handed_on: AtomicU64,
    pub buffers_reused: AtomicU64,
}

impl Shared {
    /// Shares `core` among `workers` workers and the control loop, which steer senders to
    /// workers of their own with `steering`.
    pub fn new(core: NodeState, workers: usize, steering: bool) -> Arc<Self> {
        let base = Instant::now();
        Arc::new(Self {
            core: Mutex::new(core),
            wake: Notify::new(),
            control_deadline: AtomicU64::new(0),
            base,
            tun_read_errors: AtomicU64::new(0),
            tun_write_failed: Arc::default(),
            steering: Steering::new(workers, steering, base),
            buffers_handed_on: AtomicU64::new(0),
            buffers_reused: AtomicU64::new(0),
        })
    }

    /// The control loop sleeps until `at` unless woken.
    pub fn set_control_deadline(&self, at: Instant) {
        self.control_deadline
            .store(self.nanos(at), Ordering::Relaxed);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Wakes the control loop if a batch left events or wants the timer before it wakes.
    fn maybe_wake(&self, out: &BatchOutput) {
        let earlier = out
            .deadline
            .is_some_and(|d| self.nanos(d) < self.control_deadline.load(Ordering::Relaxed));
        if out.events || earlier {
            self.wake.notify_one();
        }
    }
}

/// What a worker hands the control loop.
pub enum ToControl {
    /// Datagrams for auxiliary sockets.
    Transmits(Vec<Transmit>),
    /// The worker stopped on an error the node cannot run without.
    Failed(anyhow::Error),
}

/// How the workers run: as pipelines or not ([`Modes::helpers`]), and the threads that share
/// the pipelines' AEAD ([`Modes::aead_helpers`]).
pub struct Pipelines {
    pub helpers: bool,
    pub aead: Option<Arc<AeadHelpers>>,
}

/// The running workers; dropping this stops them.
///
/// Each worker runs on a thread of its own, driving its own runtime ([`Runtimes`]), and
/// its crypto and finishing threads (with helpers) run on threads of their own too, not as
/// tasks on the shared runtime's threads: what they wake (the UDP senders and TUN writers,
/// with helpers) then runs on the shared runtime's threads in parallel with them, instead of
/// waiting on the same thread behind them.
pub struct Workers {
    count: usize,
    /// Whether the workers run as pipelines with helpers ([`Modes::helpers`]).
    helpers: bool,
    /// The threads sharing the pipelines' AEAD, if any ([`Modes::aead_helpers`]).
    aead: Option<Arc<AeadHelpers>>,
    stop: watch::Sender<bool>,
    queues: Vec<mpsc::Sender<TunQueue>>,
    /// Each worker's runtime, for its TUN queue.
    runtimes: Vec<Option<tokio::runtime::Handle>>,
    /// The control loop's packets for the TUN device (written by worker 0).
    to_tun: mpsc::Sender<Vec<Packet>>,
    /// From the workers.
    pub from_workers: mpsc::Receiver<ToControl>,
}

impl Workers {
    /// Starts one worker per set of sockets, for a TUN device of `mtu`, sending through
    /// helper tasks with `helpers`; they send through `relays`, and worker `i` takes the
    /// packets that come through them from `relay_packets[i]`. Worker `i` runs on
    /// `runtimes`' `i`th runtime, with which its sockets were registered
    /// ([`crate::io::udp::Sockets::bind_group_on`]); one without runs on the current one.
    pub fn start(
        shared: &Arc<Shared>,
        sockets: &[Arc<Sockets>],
        pipelines: Pipelines,
        mtu: u16,
        relays: RelaySenders,
        relay_packets: Vec<mpsc::Receiver<RelayPacket>>,
        runtimes: Runtimes,
    ) -> Self {
        let Pipelines { helpers, aead } = pipelines;
        let handles = runtimes.handles();
        let mut own_runtimes = runtimes.0.into_iter();
        let (to_control, from_workers) = mpsc::channel(HANDOFF);
        let (to_tun, control_writes) = mpsc::channel(HANDOFF);
        let mut control_writes = Some(control_writes);
        let mut relay_packets = relay_packets.into_iter();
        let (handoffs, handed): (Vec<_>, Vec<_>) =
            sockets.iter().map(|_| mpsc::channel(HANDOFFS)).unzip();
        let handoffs: Arc<[mpsc::Sender<Handoff>]> = Arc::from(handoffs);
        let mut handed = handed.into_iter();
        let (stop, stopped) = watch::channel(false);
        let runtime = tokio::runtime::Handle::current();
        let mut queues = Vec::new();
        for (id, socks) in sockets.iter().enumerate() {
            let own = own_runtimes.next();
            let (queue_tx, queue_rx) = mpsc::channel(1);
            queues.push(queue_tx);
            let finisher = Finisher {
                id,
                shared: Arc::clone(shared),
                sockets: Arc::clone(socks),
                sender: Sender::start(Arc::clone(socks), helpers),
                tun: None,
                relays: RelayBatch::new(relays.clone()),
                to_control: to_control.clone(),
                forward: Vec::new(),
            };
            let finishing = if helpers {
                match Finishing::start(finisher, &runtime, aead.clone()) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ =
                            to_control.try_send(ToControl::Failed(anyhow::Error::new(e).context(
                                format!("starting data-plane worker {id}'s finishing thread"),
                            )));
                        continue;
                    }
                }
            } else {
                Finishing::Here(Box::new(finisher))
            };
            let w = Worker {
                id,
                mtu,
                shared: Arc::clone(shared),
                sockets: Arc::clone(socks),
                tun: None,
                new_queue: queue_rx,
                control_writes: control_writes.take(),
                relay_packets: relay_packets.next(),
                handoffs: Arc::clone(&handoffs),
                handed: handed.next(),
                received: Vec::new(),
                local: Vec::new(),
                staged: sockets.iter().map(|_| Vec::new()).collect(),
                to_control: to_control.clone(),
                out: BatchOutput::default(),
                finishing,
                from_tun: Vec::new(),
            };
            let shared_runtime = runtime.clone();
            let mut stopped = stopped.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lattice-dp{id}"))
                .spawn(move || {
                    let run = async move {
                        tokio::select! {
                            () = w.run() => {}
                            _ = stopped.wait_for(|s| *s) => {}
                        }
                    };
                    match own.as_ref().and_then(|r| r.0.as_ref()) {
                        Some(rt) => rt.block_on(run),
                        None => shared_runtime.block_on(run),
                    }
                });
            if let Err(e) = spawned {
                // Without its thread a worker's socket and TUN queue would go unread.
                let _ = to_control.try_send(ToControl::Failed(
                    anyhow::Error::new(e).context(format!("starting data-plane worker {id}")),
                ));
            }
        }
        Self {
            count: sockets.len(),
            helpers,
            aead,
            stop,
            queues,
            runtimes: handles,
            to_tun,
            from_workers,
        }
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Each worker's runtime, in order, for its TUN queue ([`crate::io::tun::Tun::create`]).
    pub fn runtimes(&self) -> &[Option<tokio::runtime::Handle>] {
        &self.runtimes
    }

    /// Whether the workers run as pipelines with helpers.
    pub fn helpers(&self) -> bool {
        self.helpers
    }

    /// How many threads share the pipelines' AEAD, and how many parts of batches they were
    /// handed.
    pub fn aead_helpers(&self) -> (usize, u64) {
        self.aead
            .as_ref()
            .map_or((0, 0), |a| (a.helpers(), a.handed_out()))
    }

    /// Whether none run (never: at least one is started).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Hands each worker its queue of the TUN device (one per worker, in order).
    pub fn attach_tun(&self, queues: Vec<TunQueue>) {
        for (tx, q) in self.queues.iter().zip(queues) {
            let _ = tx.try_send(q);
        }
    }

    /// Writes the control loop's packets to the TUN device (through worker 0); dropped when
    /// its queue is full.
    pub fn write_tun(&self, packets: Vec<Packet>) {
        if packets.is_empty() {
            return;
        }
        if let Err(e) = self.to_tun.try_send(packets) {
            debug!(error = %e, "TUN writes from the control loop dropped");
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Worker {
    id: usize,
    mtu: u16,
    shared: Arc<Shared>,
    sockets: Arc<Sockets>,
    tun: Option<TunReader>,
    new_queue: mpsc::Receiver<TunQueue>,
    /// Worker 0 writes the control loop's TUN packets.
    control_writes: Option<mpsc::Receiver<Vec<Packet>>>,
    /// The packets of this worker's share of the peers that send through relays
    /// ([`crate::io::relays::RelayInbox`]).
    relay_packets: Option<mpsc::Receiver<RelayPacket>>,
    /// Each worker's queue of datagrams handed over by the others.
    handoffs: Arc<[mpsc::Sender<Handoff>]>,
    /// This worker's.
    handed: Option<mpsc::Receiver<Handoff>>,
    /// The datagrams of the last receive call, as they came.
    received: Vec<(SocketAddr, Packet)>,
    /// Datagrams this worker handles itself, from the last receive call.
    local: Handoff,
    /// Datagrams for other workers (by worker), from the last receive call.
    staged: Vec<Handoff>,
    to_control: mpsc::Sender<ToControl>,
    /// The batch being fed.
    out: BatchOutput,
    finishing: Finishing,
    /// Packets read from the TUN device, for the next batch.
    from_tun: Vec<Packet>,
}

/// Who finishes a worker's batches: runs their crypto, finishes them in the core, sends
/// and writes what they produced.
enum Finishing {
    /// The worker, before it reads again.
    Here(Box<Finisher>),
    /// Threads of its own (one runs the crypto, the next completes), batch after batch in
    /// the order they were fed, while the worker reads and feeds the next (with helpers: a
    /// pipeline, where there are CPUs for it).
    Thread {
        to: mpsc::Sender<ToFinisher>,
        /// Finished batches, their buffers ready to fill again: [`PIPELINE`] of them at the
        /// start, and the worker takes one for each batch it hands on, so no more than that
        /// are ever in flight, whichever stage is the slowest.
        spare: mpsc::Receiver<BatchOutput>,
    },
}

/// What a worker hands its finishing thread.
enum ToFinisher {
    Batch(BatchOutput),
    /// The TUN queue to write (the worker keeps its reading side).
    Tun(TunQueue),
}

/// Batches fed but not yet finished, per worker with a finishing thread, wherever they wait:
/// enough to keep all three busy, few enough that a burst waits in the kernel's queues
/// rather than ours. Each queue between two stages holds half of them, so whichever stage is
/// the slowest has that many waiting for it; without the bound on them all, a slow last stage
/// would have both queues full in front of it, and a ping behind them all.
const PIPELINE: usize = 4;

impl Finishing {
    /// Starts the worker's crypto thread (`lattice-aeadN`), which runs the AEAD of each batch
    /// the worker prepared, and its finishing thread (`lattice-finN`), which completes the
    /// batch in the core and sends and writes what it made, each batch through both in the
    /// order it was fed.
    /// Splitting the two lets one direction of one peer's traffic run its AEAD back to back
    /// on a core of its own; with `aead` helpers, a big batch's AEAD is shared with them
    /// ([`crate::io::aead`]).
    fn start(
        mut finisher: Finisher,
        runtime: &tokio::runtime::Handle,
        aead: Option<Arc<AeadHelpers>>,
    ) -> std::io::Result<Self> {
        let (to, mut batches) = mpsc::channel(PIPELINE / 2);
        let (to_finish, mut crypted) = mpsc::channel(PIPELINE / 2);
        let (give_back, spare) = mpsc::channel(PIPELINE);
        for _ in 0..PIPELINE {
            let _ = give_back.try_send(BatchOutput::default());
        }
        // Ends when the worker (holding `to`) is dropped, or the finishing thread stops.
        std::thread::Builder::new()
            .name(format!("lattice-aead{}", finisher.id))
            .spawn(move || {
                let mut asker = Asker::default();
                while let Some(mut m) = batches.blocking_recv() {
                    // Prepared by the worker, finished by the finishing thread: the AEAD alone.
                    if let ToFinisher::Batch(out) = &mut m {
                        crypt_prepared(out, |jobs| match &aead {
                            Some(pool) => pool.crypt(&mut asker, jobs),
                            None => CryptoJob::crypt_queue(jobs),
                        });
                    }
                    if to_finish.blocking_send(m).is_err() {
                        break;
                    }
                }
            })?;
        let runtime = runtime.clone();
        // Ends when the crypto thread (holding `to_finish`) does.
        std::thread::Builder::new()
            .name(format!("lattice-fin{}", finisher.id))
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(m) = crypted.recv().await {
                        match m {
                            ToFinisher::Batch(mut out) => {
                                finisher.complete(&mut out).await;
                                let _ = give_back.try_send(out);
                            }
                            ToFinisher::Tun(q) => finisher.tun = Some(q),
                        }
                    }
                });
            })?;
        Ok(Self::Thread { to, spare })
    }

    /// Hands the finisher the TUN queue to write.
    async fn take_tun(&mut self, q: TunQueue) {
        match self {
            Self::Here(f) => f.tun = Some(q),
            Self::Thread { to, .. } => {
                // A stopped thread is found by the next batch.
                let _ = to.send(ToFinisher::Tun(q)).await;
            }
        }
    }
}

/// The second half of a worker: finishes its batches ([`Finishing`]).
struct Finisher {
    id: usize,
    shared: Arc<Shared>,
    sockets: Arc<Sockets>,
    sender: Sender,
    tun: Option<TunQueue>,
    relays: RelayBatch,
    to_control: mpsc::Sender<ToControl>,
    forward: Vec<Transmit>,
}

impl Worker {
    async fn run(mut self) {
        if let Err(e) = self.serve().await {
            let _ = self.to_control.send(ToControl::Failed(e)).await;
        }
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        let mut tun_bufs = ReadBufs::new(self.mtu);
        let mut udp4 = RecvBufs::default();
        let mut udp6 = RecvBufs::default();
        let sockets = Arc::clone(&self.sockets);
        // The buffer counts last added to the shared ones.
        let mut published = (0, 0);
        loop {
            tokio::select! {
                r = read_tun(self.tun.as_ref(), &mut tun_bufs) => {
                    let now = Instant::now();
                    match r {
                        Ok(n) => self.take_tun(&mut tun_bufs, n),
                        Err(e) if is_packet_error(&e) => self.tun_read_error(&e),
                        Err(e) => return Err(e).context("reading the TUN device"),
                    }
                    // Whatever else is waiting, up to a limit, goes to the core in one batch
                    // (a read may carry one packet: a UDP flow's are not coalesced).
                    for _ in 1..TUN_READS {
                        let Some(tun) = &self.tun else { break };
                        match tun.try_read(&mut tun_bufs) {
                            Ok(n) => self.take_tun(&mut tun_bufs, n),
                            Err(e) if is_packet_error(&e) => self.tun_read_error(&e),
                            Err(_) => break,
                        }
                    }
                    self.handle_tun(now);
                }
                r = udp4.recv(Some(&sockets.v4)) => {
                    let n = r.context("reading the UDP socket")?;
                    self.handle_udp(&mut udp4, n);
                }
                r = udp6.recv(sockets.v6.as_ref()) => {
                    let n = r.context("reading the UDP socket")?;
                    self.handle_udp(&mut udp6, n);
                }
                Some(q) = self.new_queue.recv() => {
                    debug!(worker = self.id, "reading a TUN queue");
                    self.tun = Some(q.reader());
                    self.finishing.take_tun(q).await;
                }
                Some(packets) = recv_if(self.control_writes.as_mut()) => {
                    self.out.tun_writes.extend(packets);
                }
                Some(first) = recv_if(self.relay_packets.as_mut()) => {
                    self.handle_relayed(first);
                }
                Some(datagrams) = recv_if(self.handed.as_mut()) => {
                    self.handle_handed(datagrams);
                }
            }
            self.finish().await?;
            let counts = [&udp4.slots, &udp6.slots, &tun_bufs.packets]
                .iter()
                .map(|s| s.counts())
                .fold((0, 0), |(h, r), c| (h + c.0, r + c.1));
            if counts != published {
                let shared = &self.shared;
                shared
                    .buffers_handed_on
                    .fetch_add(counts.0 - published.0, Ordering::Relaxed);
                shared
                    .buffers_reused
                    .fetch_add(counts.1 - published.1, Ordering::Relaxed);
                published = counts;
            }
        }
    }

    /// Finishes the batch fed since the last call, here or on the finishing thread (an error
    /// if that thread has stopped: the worker's traffic would go nowhere).
    async fn finish(&mut self) -> anyhow::Result<()> {
        match &mut self.finishing {
            Finishing::Here(f) => f.finish(&mut self.out).await,
            Finishing::Thread { to, spare } => {
                let Some(next) = spare.recv().await else {
                    anyhow::bail!("data-plane worker {}'s finishing thread stopped", self.id);
                };
                let mut fed = std::mem::replace(&mut self.out, next);
                // Counters and sessions taken here, so the crypto thread (the one that bounds
                // a single stream) runs only the AEAD.
                prepare(&mut fed);
                if to.send(ToFinisher::Batch(fed)).await.is_err() {
                    anyhow::bail!("data-plane worker {}'s finishing thread stopped", self.id);
                }
            }
        }
        Ok(())
    }

    /// Keeps the packets of one TUN read for [`Worker::handle_tun`], each in the buffer it was
    /// read into, which has room to be sealed where it lies ([`ReadBufs`]).
    fn take_tun(&mut self, bufs: &mut ReadBufs, n: usize) {
        bufs.take(n, &mut self.from_tun);
    }

    /// Hands the packets read from the TUN device to the core, in one batch.
    fn handle_tun(&mut self, now: Instant) {
        let packets = &mut self.from_tun;
        feed(&self.shared.core, &mut self.out, |st| {
            st.handle_tun_packets(now, packets.drain(..));
        });
    }

    /// Hands a packet that came through a relay, and those waiting behind it, to the core.
    fn handle_relayed(&mut self, first: RelayPacket) {
        let now = Instant::now();
        let Some(rx) = self.relay_packets.as_mut() else {
            return;
        };
        feed(&self.shared.core, &mut self.out, |st| {
            let more = std::iter::from_fn(|| rx.try_recv().ok()).take(RELAY_BATCH - 1);
            for p in std::iter::once(first).chain(more) {
                // Usually the only holder of its buffer by now, so no copy.
                let payload = p
                    .payload
                    .try_into_mut()
                    .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
                st.handle_relay_packet(now, p.id, p.src, Packet::from_bytes(payload));
            }
        });
    }

    fn tun_read_error(&self, e: &std::io::Error) {
        let total = self.shared.tun_read_errors.fetch_add(1, Ordering::Relaxed) + 1;
        debug!(error = %e, total, "dropped a malformed read from the TUN device");
    }

    /// Hands what one receive call brought to the core, datagram by datagram, except the
    /// data of senders other workers own, which goes to them.
    fn handle_udp(&mut self, bufs: &mut RecvBufs, n: usize) {
        let now = Instant::now();
        bufs.take(n, &mut self.received);
        let steering = &self.shared.steering;
        split(
            steering,
            self.id,
            now,
            self.received.drain(..),
            &mut self.local,
            &mut self.staged,
        );
        for (w, staged) in self.staged.iter_mut().enumerate() {
            if staged.is_empty() {
                continue;
            }
            let n = staged.len();
            let handed = self.handoffs[w].try_send(std::mem::take(staged)).is_ok();
            steering.count(n, handed);
        }
        let local = &mut self.local;
        feed(&self.shared.core, &mut self.out, |st| {
            st.handle_datagrams(now, SockId::Main, local.drain(..));
        });
    }

    /// Hands the core datagrams another worker received from senders this one owns.
    fn handle_handed(&mut self, datagrams: Handoff) {
        let now = Instant::now();
        feed(&self.shared.core, &mut self.out, |st| {
            st.handle_datagrams(now, SockId::Main, datagrams);
        });
    }
}

impl Finisher {
    /// Runs the batch's crypto, finishes it in the core, and sends and writes what it made.
    async fn finish(&mut self, out: &mut BatchOutput) {
        finish(&self.shared.core, Instant::now(), out);
        self.flush(out).await;
    }

    /// Finishes a batch whose AEAD ran on the crypto thread, and sends and writes what it made.
    async fn complete(&mut self, out: &mut BatchOutput) {
        complete(&self.shared.core, Instant::now(), out);
        self.flush(out).await;
    }

    /// Sends and writes what the batches produced; hands the rest to the control loop.
    async fn flush(&mut self, out: &mut BatchOutput) {
        for t in out.transmits.drain(..) {
            if let Some(aux) = send(t, &mut self.sender, &self.sockets, &mut self.relays).await {
                self.forward.push(aux);
            }
        }
        self.relays.flush();
        self.sender.flush().await;
        if !self.forward.is_empty() {
            let batch = std::mem::take(&mut self.forward);
            if let Err(e) = self.to_control.try_send(ToControl::Transmits(batch)) {
                debug!(worker = self.id, error = %e, "datagrams for the control loop dropped");
            }
        }
        match &mut self.tun {
            Some(tun) => {
                for p in out.tun_writes.drain(..) {
                    if tun.queue(&p) {
                        tun.write_queued().await;
                    }
                }
                tun.write_queued().await;
            }
            None => out.tun_writes.clear(),
        }
        self.shared.maybe_wake(out);
        out.clear();
    }
}

/// Sends `t` on the UDP socket or adds it to `relays` (sent on [`RelayBatch::flush`]); hands
/// back a datagram for an auxiliary socket (those belong to the control loop).
pub async fn send(
    t: Transmit,
    sender: &mut Sender,
    sockets: &Sockets,
    relays: &mut RelayBatch,
) -> Option<Transmit> {
    let dst = match t.dst {
        Addr::Udp(SockId::Main, dst) => dst,
        Addr::Relay(r, key) => {
            // The relay's Send frame, built here: the packet's one copy on its way.
            let frame = relay::proto::encode_packet(false, key.as_bytes(), &t.payload);
            relays.push(r, frame.into());
            return None;
        }
        Addr::Udp(SockId::Aux(_), _) => return Some(t),
    };
    match t.ttl {
        // A primer leaves on its own, with its own TTL.
        Some(ttl) => sender.push_with_ttl(dst, t.payload, ttl).await,
        None => {
            let max = sockets.for_dst(&dst).map_or(1, Sock::max_segments);
            sender.push(dst, t.payload, max).await;
        }
    }
    None
}

async fn read_tun(tun: Option<&TunReader>, bufs: &mut ReadBufs) -> std::io::Result<usize> {
    match tun {
        Some(t) => t.read(bufs).await,
        None => std::future::pending().await,
    }
}

/// The next message on a channel only one worker has; never returns for the others.
async fn recv_if<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::*;

    /// Helpers by default only where the CPUs are many: none on the 2- and 4-CPU machines a
    /// node often runs on, six on 16, never more than the cap; an asked count wins, and
    /// without pipelines there are none.
    #[test]
    fn aead_helpers_by_default_grow_with_the_cpus_up_to_the_cap() {
        let by_cpus: Vec<usize> = [1, 2, 4, 6, 8, 16, 20, 64]
            .into_iter()
            .map(default_aead_helpers)
            .collect();
        assert_eq!(by_cpus, [0, 0, 0, 1, 2, 6, 8, 8]);
        let asked = Modes {
            io_helpers: Some(true),
            aead_helpers: Some(3),
            ..Modes::default()
        };
        assert_eq!(asked.aead_helpers(8), 3);
        let default = Modes {
            io_helpers: Some(true),
            ..Modes::default()
        };
        assert_eq!(default.aead_helpers(8), default_aead_helpers(cpus()));
        let no_pipelines = Modes {
            io_helpers: Some(false),
            aead_helpers: Some(3),
            ..Modes::default()
        };
        assert_eq!(no_pipelines.aead_helpers(8), 0);
    }

    /// A worker's sockets, registered with its own runtime, are read on the thread that
    /// drives it, while the test's runtime is blocked (were they registered with the test's
    /// runtime, nothing would wake the reader); the runtimes, dropped on a thread of the
    /// shared runtime (as when the node fails to start after making them), shut down there
    /// instead of panicking.
    #[tokio::test]
    async fn a_workers_runtime_serves_its_sockets_on_its_thread_and_drops_anywhere() {
        let mut runtimes = Runtimes::new(2).expect("runtimes");
        let handles = runtimes.handles();
        let group =
            Sockets::bind_group_on(0, relay::dial::Dialer::PLAIN, &handles[..1]).expect("bind");
        let port = group[0].port;
        let own = runtimes.0.remove(0);
        let reader = std::thread::spawn(move || {
            let rt = own.0.as_ref().expect("a runtime");
            rt.block_on(async {
                let mut bufs = RecvBufs::default();
                let n =
                    tokio::time::timeout(Duration::from_secs(10), bufs.recv(Some(&group[0].v4)))
                        .await
                        .expect("a datagram within 10 s")
                        .expect("received");
                let mut got = Vec::new();
                bufs.take(n, &mut got);
                got[0].1.to_vec()
            })
        });
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let tx = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sender");
        tx.send_to(b"to the worker", to).expect("sent");
        // Blocks the test's runtime on purpose: only the worker's runtime may serve the socket.
        let got = reader.join().expect("reader");
        assert_eq!(got, b"to the worker");
        // The other runtime is dropped here, on the test's runtime.
        drop(runtimes);
    }
}
