//! How much of a data packet's work the shared core's lock serializes, and how the data
//! plane's batches scale over threads (`cargo bench -p node-proto --bench core_lock`).
//!
//! A hub with 1,000 peers in its netmap and tunnels to 16 of them: real `NodeState`s in memory
//! with real (post-quantum) tunnels. The hub's core is
//! shared as the node's workers share it (crypto outside, `shared::run_batch`):
//! - on one thread, the time per 1,280-byte packet spent under the core's lock and outside
//!   it (the flow-table checks and the AEAD), sealing packets for a peer and opening datagrams
//!   from one;
//! - on 1, 2, 4, 8, 12 and 16 threads (up to the CPU count), each sealing for or opening from its own
//!   peer, the packets per second all of them reach together.
//!
//! The time under the lock bounds what any number of workers can do: one packet's locked
//! work after another. Prints numbers; asserts nothing about them.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    missing_docs
)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use node_proto::shared::{BatchOutput, run_batch};
use node_proto::{CryptoDone, CryptoJob, NodeState, Packet, SockId};
use parking_lot::Mutex;

mod common;
use common::{addr, hub_and_peers, overlay, run, udp};

/// Peers in the hub's netmap.
const NETMAP: usize = 1000;
/// Peers with a tunnel, one per thread at most.
const PEERS: usize = 16;
/// Packets per batch (a worker's batches are of this order).
const BATCH: usize = 64;
/// Rounds of the one-thread measurement: the least time of each part is printed, as the
/// machine's other work only ever adds to it.
const ROUNDS: usize = 5;
/// Packets each thread seals or opens per measurement.
const PER_THREAD: usize = 30_000;
/// 1,280-byte IPv4 packets.
const PAYLOAD: [u8; 1252] = [0x5a; 1252];

fn main() {
    let mut now = Instant::now();
    let mut nodes = hub_and_peers(NETMAP, PEERS, Duration::from_secs(120), now);
    // Every tunnel up: the hub sends one packet to each peer.
    for i in 1..=PEERS {
        let p = udp(overlay(0), overlay(i), b"hello");
        nodes[0].handle_tun_packet(now, Packet::copy_from(&p[..]));
    }
    let mut setup = Duration::ZERO;
    run(&mut nodes, now, &mut setup);
    // A few heartbeats: their pongs make the direct paths trusted, as on a running node (a
    // sealed packet then has one target).
    for _ in 0..3 {
        now += Duration::from_secs(1);
        for n in &mut nodes {
            n.handle_timeout(now);
        }
        run(&mut nodes, now, &mut setup);
    }
    let mut peers = nodes.split_off(1);
    let mut hub = nodes.pop().unwrap();
    let up = hub.status(now).peers.iter().filter(|p| p.pq).count();
    assert_eq!(up, PEERS, "every tunnel is up");
    hub.set_crypto_outside(true);
    let core = Mutex::new(hub);

    println!(
        "a hub with {NETMAP} peers in its netmap; one thread, 1,280-byte packets in batches of \
         {BATCH}, the least of {ROUNDS} rounds (each part on its own):"
    );
    let sealing = (0..ROUNDS)
        .map(|_| breakdown(&core, now, outbound(1, PER_THREAD)))
        .reduce(Times::least)
        .unwrap();
    report("sealing for a peer", &sealing);
    let opening = (0..ROUNDS)
        .map(|_| {
            let datagrams = inbound(&mut peers[0], 1, now, PER_THREAD);
            breakdown(&core, now, datagrams)
        })
        .reduce(Times::least)
        .unwrap();
    report("opening from a peer", &opening);
    let (locked, locked_in) = (sealing.locked(), opening.locked());
    println!(
        "  the lock's bound, one packet's locked work after another: {:.2} M packets/s sealing \
         ({:.1} Gbit/s), {:.2} M opening ({:.1} Gbit/s)",
        1e3 / locked,
        1e3 / locked * 1280.0 * 8.0 / 1e3,
        1e3 / locked_in,
        1e3 / locked_in * 1280.0 * 8.0 / 1e3
    );

    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    println!("\nthreads, each for its own peer ({cpus} CPUs here): M packets/s in all");
    println!("threads    sealing   (vs 1)    opening   (vs 1)");
    let (mut one_out, mut one_in) = (0.0, 0.0);
    for threads in [1, 2, 4, 8, 12, 16]
        .into_iter()
        .filter(|t| *t <= cpus.min(PEERS))
    {
        let sealed = scaled(&core, now, threads, |t| outbound(t + 1, PER_THREAD));
        let mut lists: Vec<Option<Input>> = peers[..threads]
            .iter_mut()
            .enumerate()
            .map(|(t, p)| Some(inbound(p, t + 1, now, PER_THREAD)))
            .collect();
        let opened = scaled(&core, now, threads, |t| lists[t].take().unwrap());
        if threads == 1 {
            (one_out, one_in) = (sealed, opened);
        }
        println!(
            "{threads:>7} {sealed:>10.3} {:>8.2}x {opened:>10.3} {:>8.2}x",
            sealed / one_out,
            opened / one_in
        );
    }
}

/// What the batches feed the core: packets from the TUN device, or datagrams from peer `i`;
/// taken from the end, so the datagrams are kept last first.
enum Input {
    Out(Vec<Packet>),
    In(usize, Vec<Packet>),
}

/// `n` packets from the hub's TUN device to peer `i`.
fn outbound(i: usize, n: usize) -> Input {
    let p = udp(overlay(0), overlay(i), &PAYLOAD);
    Input::Out(
        (0..n)
            .map(|_| Packet::from_bytes(node_proto::wg::session::with_seal_room(&p)))
            .collect(),
    )
}

/// `n` datagrams peer `i` (`peer`) sealed for the hub, the last first.
fn inbound(peer: &mut NodeState, i: usize, now: Instant, n: usize) -> Input {
    let p = udp(overlay(i), overlay(0), &PAYLOAD);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        peer.handle_tun_packet(now, Packet::copy_from(&p[..]));
        out.extend(
            std::iter::from_fn(|| peer.poll_transmit())
                .filter(|t| t.dst.udp() == Some(addr(0)))
                .map(|t| t.payload),
        );
    }
    assert_eq!(
        out.len(),
        n,
        "peer {i} sealed one datagram per packet, to the hub"
    );
    out.reverse();
    Input::In(i, out)
}

/// Feeds one batch of `input` to a core under its lock.
fn feed(st: &mut NodeState, now: Instant, input: &mut Input, n: usize) {
    match input {
        Input::Out(packets) => {
            let rest = packets.len().saturating_sub(n);
            st.handle_tun_packets(now, packets.drain(rest..));
        }
        Input::In(i, datagrams) => {
            let rest = datagrams.len().saturating_sub(n);
            let from = addr(*i);
            st.handle_datagrams(
                now,
                SockId::Main,
                datagrams.drain(rest..).rev().map(|d| (from, d)),
            );
        }
    }
}

/// `packets` copied into buffers this thread allocates.
fn own(packets: Vec<Packet>) -> Vec<Packet> {
    packets.iter().map(|p| Packet::copy_from(&p[..])).collect()
}

fn remaining(input: &Input) -> usize {
    match input {
        Input::Out(p) | Input::In(_, p) => p.len(),
    }
}

/// Runs `run_batch`'s steps on one thread with clocks around them: nanoseconds per packet
/// under the lock and outside it. A copy of those steps, as the core itself reads no clock;
/// one round of jobs per batch is all data packets need (`run_batch` loops for jobs that
/// finishing others makes).
fn breakdown(core: &Mutex<NodeState>, now: Instant, mut input: Input) -> Times {
    let packets = remaining(&input);
    let (mut fed, mut finished, mut outside) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut jobs = VecDeque::new();
    let mut done: Vec<CryptoDone> = Vec::new();
    // What a batch produced, taken under the lock and dropped outside it, as `run_batch` does.
    let mut out = BatchOutput::default();
    while remaining(&input) > 0 {
        let a = Instant::now();
        let mut st = core.lock();
        feed(&mut st, now, &mut input, BATCH);
        st.take_crypto(&mut jobs);
        let checks = st.checks();
        drop(st);
        let b = Instant::now();
        CryptoJob::run_all(&mut jobs, &checks, &mut done);
        let c = Instant::now();
        let mut st = core.lock();
        st.handle_crypto_all(now, &mut done);
        out.transmits
            .extend(std::iter::from_fn(|| st.poll_transmit()));
        out.tun_writes
            .extend(std::iter::from_fn(|| st.poll_tun_write()));
        drop(st);
        fed += b - a;
        finished += c.elapsed();
        let d = Instant::now();
        out.clear();
        outside += (c - b) + d.elapsed();
    }
    let per = |d: Duration| d.as_nanos() as f64 / packets as f64;
    Times {
        fed: per(fed),
        finished: per(finished),
        outside: per(outside),
    }
}

/// Nanoseconds per packet: under the lock handing it in and finishing its job, and outside.
struct Times {
    fed: f64,
    finished: f64,
    outside: f64,
}

impl Times {
    fn locked(&self) -> f64 {
        self.fed + self.finished
    }

    /// Each part's lesser time of two rounds.
    fn least(self, other: Self) -> Self {
        Self {
            fed: self.fed.min(other.fed),
            finished: self.finished.min(other.finished),
            outside: self.outside.min(other.outside),
        }
    }
}

fn report(what: &str, t: &Times) {
    let locked = t.locked();
    println!(
        "  {what}: {:.0} ns per packet; {locked:.0} ns under the core's lock ({:.0}%: {:.0} handing \
         it in, {:.0} finishing its job), {:.0} ns outside it (checks and AEAD, dropping the output)",
        locked + t.outside,
        100.0 * locked / (locked + t.outside),
        t.fed,
        t.finished,
        t.outside
    );
}

/// `threads` threads, thread `t` feeding `input(t)` through `run_batch` in batches: the
/// packets per second (millions) of all of them together. Each thread first copies its
/// input into buffers of its own, as a worker reads into its own (packets allocated on one
/// thread and freed on many would measure the allocator too); the clock starts once all
/// have.
fn scaled(
    core: &Mutex<NodeState>,
    now: Instant,
    threads: usize,
    mut input: impl FnMut(usize) -> Input,
) -> f64 {
    let inputs: Vec<Input> = (0..threads).map(&mut input).collect();
    let packets: usize = inputs.iter().map(remaining).sum();
    let ready = std::sync::Barrier::new(threads + 1);
    let mut start = Instant::now();
    std::thread::scope(|s| {
        for input in inputs {
            let ready = &ready;
            s.spawn(move || {
                let mut input = match input {
                    Input::Out(p) => Input::Out(own(p)),
                    Input::In(i, p) => Input::In(i, own(p)),
                };
                let mut out = BatchOutput::default();
                ready.wait();
                while remaining(&input) > 0 {
                    run_batch(core, now, &mut out, |st| feed(st, now, &mut input, BATCH));
                    out.clear();
                }
            });
        }
        ready.wait();
        start = Instant::now();
    });
    packets as f64 / start.elapsed().as_secs_f64() / 1e6
}
