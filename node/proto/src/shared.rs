//! One core shared by the data plane's worker threads.
//!
//! A shell with several workers (each reading its own TUN queue and UDP socket) keeps one
//! [`NodeState`] behind a lock. [`run_batch`] is a worker's step: feed a batch of input under
//! the lock, run the encryption and decryption it asked for without the lock (so workers
//! encrypt for different peers, and the two directions of one peer, at the same time), with
//! the flow-table work that goes with it (the flow table has locks of its own, by flow: see
//! [`crate::gate`]), then finish the jobs in order under the lock again and take what is
//! ready to send and to write.
//!
//! Order: within one call, output keeps the input's order. A worker that makes its calls one
//! after another and sends their output in order therefore keeps the order of everything it
//! read; a flow read by one worker (a TUN queue and a UDP socket each keep a flow on one
//! reader) leaves in order. Calls on different workers interleave freely: their flows are
//! unordered with respect to each other, as on any network. A worker may also split the call
//! into its halves, [`feed`] and [`finish`], and finish on a second thread while it feeds its
//! next batch, or [`finish`] into its own parts, [`crypt`] and [`complete`], on two threads
//! (or [`prepare`] where it feeds, then [`crypt_prepared`] and [`complete`]): the order holds
//! as long as each thread takes the batches in the order they were fed.
//!
//! This module performs no I/O and reads no clock: `now` comes from the caller.

use std::collections::VecDeque;
use std::time::Instant;

use gotatun::packet::Packet;
use parking_lot::Mutex;

use crate::state::{Checks, CryptoDone, CryptoJob, NodeState, Transmit};

/// What one batch produced, in order. Reused from batch to batch.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Datagrams to send.
    pub transmits: Vec<Transmit>,
    /// Packets for the TUN device.
    pub tun_writes: Vec<Packet>,
    /// The core has events for the control loop.
    pub events: bool,
    /// When the core next needs `handle_timeout`.
    pub deadline: Option<Instant>,
    jobs: VecDeque<CryptoJob>,
    /// What the jobs check the packets they open against, taken with them.
    checks: Option<Checks>,
    done: Vec<CryptoDone>,
}

impl BatchOutput {
    /// Empties the output for the next batch (keeping its allocations).
    pub fn clear(&mut self) {
        self.transmits.clear();
        self.tun_writes.clear();
        self.events = false;
        self.deadline = None;
    }
}

/// Feeds `input` to the shared core, runs the crypto it asked for outside the lock, finishes
/// it in order and appends what is ready to `out`: [`feed`], then [`finish`]. The core must
/// have [`NodeState::set_crypto_outside`] on; with it off there are simply no jobs.
pub fn run_batch(
    core: &Mutex<NodeState>,
    now: Instant,
    out: &mut BatchOutput,
    input: impl FnOnce(&mut NodeState),
) {
    feed(core, out, input);
    finish(core, now, out);
}

/// The first half of [`run_batch`]: feeds `input` to the core under its lock and takes what
/// it made: the crypto jobs, kept in `out` for [`finish`], and what is ready already
/// (handshakes, replies), appended to `out` ahead of whatever the jobs will produce. Then,
/// without the lock, checks the jobs' packets to seal and tracks their flows
/// ([`CryptoJob::check_all`]), while they are fresh in this thread's cache.
///
/// A shell may hand `out` to another thread for [`finish`] and feed its next batch in the
/// meantime: as long as one thread finishes a feeder's batches in the order they were fed,
/// each flow keeps its order, as with [`run_batch`].
pub fn feed(core: &Mutex<NodeState>, out: &mut BatchOutput, input: impl FnOnce(&mut NodeState)) {
    let mut st = core.lock();
    input(&mut st);
    take_jobs(&mut st, out);
    take_ready(&mut st, out);
    drop(st);
    check_jobs(out);
}

/// The second half of [`run_batch`]: runs the jobs [`feed`] left in `out` without the lock,
/// then finishes them in order under it and appends what they produced: [`crypt`], then
/// [`complete`]. Takes the lock only if there are jobs.
pub fn finish(core: &Mutex<NodeState>, now: Instant, out: &mut BatchOutput) {
    crypt(out);
    complete(core, now, out);
}

/// The first part of [`finish`]: runs the jobs [`feed`] left in `out` (the AEAD,
/// [`CryptoJob::crypt_all`]), without the core. A shell may run it on a thread of its own
/// between the one that feeds and the one that completes, as long as the batches keep their
/// order through all three.
pub fn crypt(out: &mut BatchOutput) {
    debug_assert!(
        out.jobs.is_empty() || out.checks.is_some(),
        "jobs come with checks"
    );
    if let Some(checks) = &out.checks {
        CryptoJob::crypt_all(&mut out.jobs, checks, &mut out.done);
    }
}

/// [`crypt`] in three steps, for a shell whose crypto thread is its busiest: [`prepare`] on
/// the thread that fed the batch (sending counters taken in order, sessions found, replays
/// turned away: [`CryptoJob::prepare_all`]), then this on the crypto thread, then
/// [`complete`], which finishes the jobs in order. `share` gets the prepared jobs and must
/// run [`CryptoJob::crypt_prepared`] on every one of them, on whatever threads, leaving them
/// in order; so the crypto thread runs the AEAD and nothing else.
pub fn crypt_prepared(out: &mut BatchOutput, share: impl FnOnce(&mut VecDeque<CryptoJob>)) {
    if !out.jobs.is_empty() {
        share(&mut out.jobs);
    }
}

/// Prepares the jobs [`feed`] left in `out` for their AEAD: the first of the three steps
/// [`crypt_prepared`] describes. Preparing jobs again changes nothing.
pub fn prepare(out: &mut BatchOutput) {
    debug_assert!(
        out.jobs.is_empty() || out.checks.is_some(),
        "jobs come with checks"
    );
    if let Some(checks) = &out.checks
        && !out.jobs.is_empty()
    {
        CryptoJob::prepare_all(&mut out.jobs, checks);
    }
}

/// The second part of [`finish`]: finishes any jobs whose AEAD ran on another thread
/// ([`crypt_prepared`]; [`crypt`] finished its own), checks the packets they opened without
/// the core's lock ([`CryptoDone::check_all`]), then finishes the jobs in order under it and
/// appends what they produced. Finishing may make more jobs (packets a handshake released):
/// it runs those too. Takes the lock only if there are jobs.
pub fn complete(core: &Mutex<NodeState>, now: Instant, out: &mut BatchOutput) {
    if !out.jobs.is_empty() {
        CryptoJob::finish_all(&mut out.jobs, &mut out.done);
    }
    while !out.done.is_empty() {
        if let Some(checks) = &out.checks {
            CryptoDone::check_all(&mut out.done, checks);
        }
        let mut st = core.lock();
        st.handle_crypto_all(now, &mut out.done);
        take_jobs(&mut st, out);
        take_ready(&mut st, out);
        drop(st);
        check_jobs(out);
        crypt(out);
    }
}

/// Checks the packets to seal among `out`'s jobs ([`CryptoJob::check_all`]).
fn check_jobs(out: &mut BatchOutput) {
    if let Some(checks) = &out.checks
        && !out.jobs.is_empty()
    {
        CryptoJob::check_all(&mut out.jobs, checks);
    }
}

/// Appends the core's crypto jobs to `out`, with what they are to check against: the checks
/// as they stand now (kept from the last batch while the route tables are unchanged, which
/// spares two shared counters per batch).
fn take_jobs(st: &mut NodeState, out: &mut BatchOutput) {
    st.take_crypto(&mut out.jobs);
    if !out.jobs.is_empty() && !out.checks.as_ref().is_some_and(|c| c.current(st)) {
        out.checks = Some(st.checks());
    }
}

/// Appends what the core has ready to `out`. Every holder of the lock takes it all before
/// letting go, so what it takes is its own batch's.
fn take_ready(st: &mut NodeState, out: &mut BatchOutput) {
    out.transmits
        .extend(std::iter::from_fn(|| st.poll_transmit()));
    out.tun_writes
        .extend(std::iter::from_fn(|| st.poll_tun_write()));
    out.events |= st.has_events();
    out.deadline = st.poll_timeout().map(|(t, _)| t);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;
    use wire::netmap::MapResponse;

    use super::*;
    use crate::addr::{Addr, SockId};
    use crate::packet::tests::{ipv4, udp};
    use crate::state::tests::{allow_all, config, node};

    const V4: [[u8; 4]; 2] = [[100, 64, 0, 1], [100, 64, 0, 2]];

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, i as u8 + 1], 41641))
    }

    /// Two cores that know each other, with crypto outside, and a tunnel between them.
    fn pair(now: Instant) -> [Mutex<NodeState>; 2] {
        let cores = [0, 1].map(|i| {
            let mut st = NodeState::new(config(i, 0), [i as u8; 32], now);
            st.handle_netmap(
                now,
                MapResponse {
                    seq: 1,
                    node: Some(node(i, vec![addr(i)])),
                    peers: Some(vec![node(1 - i, vec![addr(1 - i)])]),
                    packet_filter: Some(allow_all(i)),
                    ..Default::default()
                },
            );
            st.set_crypto_outside(true);
            Mutex::new(st)
        });
        // The first packet waits for the keys; move datagrams until nothing moves.
        let mut out = BatchOutput::default();
        let mut delivered = Vec::new();
        run_batch(&cores[0], now, &mut out, |st| {
            st.handle_tun_packet(now, Packet::copy_from(&datagram(0, 0)[..]));
        });
        let mut from = 0;
        for _ in 0..100 {
            if out.transmits.is_empty() {
                from = 1 - from;
                run_batch(&cores[from], now, &mut out, |_| {});
                if out.transmits.is_empty() {
                    break;
                }
            }
            let to = 1 - from;
            let sent: Vec<Transmit> = out.transmits.drain(..).collect();
            out.clear();
            run_batch(&cores[to], now, &mut out, |st| {
                for t in sent {
                    assert!(matches!(t.dst, Addr::Udp(_, a) if a == addr(to)));
                    st.handle_datagram(now, SockId::Main, addr(from), t.payload);
                }
            });
            delivered.extend(out.tun_writes.drain(..).map(|p| (to, p.to_vec())));
            from = to;
        }
        assert_eq!(
            delivered,
            vec![(1, datagram(0, 0))],
            "the first packet arrived"
        );
        cores
    }

    /// Packet `seq` of flow `flow`, from core 0 to core 1.
    fn datagram(flow: u16, seq: u32) -> Vec<u8> {
        ipv4(
            V4[0],
            V4[1],
            17,
            &udp(1000 + flow, 2000, &seq.to_be_bytes()),
        )
    }

    /// (flow, seq) of a packet `datagram` built.
    fn flow_and_seq(p: &[u8]) -> (u16, u32) {
        let flow = u16::from_be_bytes([p[20], p[21]]) - 1000;
        let seq = u32::from_be_bytes(p[28..32].try_into().unwrap());
        (flow, seq)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Packets of several flows go through core 0's workers at once (each flow read by
        /// one worker, as a multi-queue TUN device hashes it, in batches of random sizes;
        /// `stages`: 1, each worker does it all; 2, a thread of its own finishes each batch
        /// while the worker feeds the next; 3, one thread runs the batches' crypto and
        /// another completes them; 4, as 3 but the worker prepares the jobs and the crypto
        /// thread only runs their AEAD),
        /// cross the network with the workers' outputs interleaved at random, and come out
        /// of core 1 (one worker, as all of a peer's datagrams reach one socket): every
        /// flow's packets arrive, each exactly once and in the order they were sent.
        #[test]
        fn each_flow_keeps_its_order_through_parallel_workers(
            flows in proptest::collection::vec(0u16..6, 1..400),
            workers in 1usize..5,
            batch_sizes in proptest::collection::vec(1usize..40, 1..20),
            interleave in proptest::collection::vec(any::<u8>(), 1..64),
            stages in 1usize..=4,
        ) {
            let now = crate::test_epoch();
            let cores = pair(now);
            // Number each flow's packets in order and hand each flow to one worker.
            let mut next = [0u32; 6];
            let mut queues = vec![Vec::new(); workers];
            for &f in &flows {
                queues[usize::from(f) % workers].push(datagram(f, next[usize::from(f)] + 1));
                next[usize::from(f)] += 1;
            }
            let outputs: Vec<Vec<Transmit>> = std::thread::scope(|s| {
                let handles: Vec<_> = queues
                    .into_iter()
                    .enumerate()
                    .map(|(w, queue)| {
                        let core = &cores[0];
                        let sizes = &batch_sizes;
                        s.spawn(move || {
                            let mut packets = queue.into_iter().peekable();
                            let mut b = w;
                            // Feeds the next batch into `out`; false when none is left.
                            let mut next_batch = |out: &mut BatchOutput| {
                                if packets.peek().is_none() {
                                    return false;
                                }
                                let n = sizes[b % sizes.len()];
                                b += 1;
                                feed(core, out, |st| {
                                    for p in packets.by_ref().take(n) {
                                        st.handle_tun_packet(now, Packet::copy_from(&p[..]));
                                    }
                                });
                                if stages == 4 {
                                    prepare(out);
                                }
                                true
                            };
                            if stages == 1 {
                                let mut sent = Vec::new();
                                let mut out = BatchOutput::default();
                                while next_batch(&mut out) {
                                    finish(core, now, &mut out);
                                    sent.append(&mut out.transmits);
                                    prop_assert!(out.tun_writes.is_empty());
                                    out.clear();
                                }
                                return Ok(sent);
                            }
                            // A finisher thread of its own takes each fed batch, in order,
                            // while this one feeds the next; with three (or four) stages, a
                            // crypto thread between them runs each batch's AEAD (and only
                            // that, with four).
                            let (tx, rx) = std::sync::mpsc::sync_channel::<BatchOutput>(2);
                            std::thread::scope(|s2| {
                                let rx = if stages >= 3 {
                                    let (tx2, rx2) = std::sync::mpsc::sync_channel(2);
                                    s2.spawn(move || {
                                        for mut out in rx {
                                            if stages == 4 {
                                                crypt_prepared(
                                                    &mut out,
                                                    CryptoJob::crypt_queue,
                                                );
                                            } else {
                                                crypt(&mut out);
                                            }
                                            tx2.send(out).unwrap();
                                        }
                                    });
                                    rx2
                                } else {
                                    rx
                                };
                                let finisher = s2.spawn(move || {
                                    let mut sent = Vec::new();
                                    for mut out in rx {
                                        if stages >= 3 {
                                            complete(core, now, &mut out);
                                        } else {
                                            finish(core, now, &mut out);
                                        }
                                        sent.append(&mut out.transmits);
                                        assert!(out.tun_writes.is_empty());
                                    }
                                    sent
                                });
                                let mut out = BatchOutput::default();
                                while next_batch(&mut out) {
                                    tx.send(std::mem::take(&mut out)).unwrap();
                                }
                                drop(tx);
                                Ok(finisher.join().unwrap())
                            })
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<_, _>>()
            })?;
            // The network merges the workers' streams; each stays in its own order.
            let mut streams: Vec<std::vec::IntoIter<Transmit>> =
                outputs.into_iter().map(Vec::into_iter).collect();
            let mut wire = Vec::new();
            let mut pick = interleave.iter().cycle();
            while !streams.is_empty() {
                let i = usize::from(*pick.next().unwrap()) % streams.len();
                match streams[i].next() {
                    Some(t) => wire.push(t),
                    None => {
                        streams.remove(i);
                    }
                }
            }
            prop_assert_eq!(wire.len(), flows.len());
            let mut got = Vec::new();
            let mut out = BatchOutput::default();
            let mut wire = wire.into_iter().peekable();
            let mut b = 0;
            while wire.peek().is_some() {
                let n = batch_sizes[b % batch_sizes.len()];
                b += 1;
                out.clear();
                run_batch(&cores[1], now, &mut out, |st| {
                    for t in wire.by_ref().take(n) {
                        st.handle_datagram(now, SockId::Main, addr(0), t.payload);
                    }
                });
                got.extend(out.tun_writes.drain(..).map(|p| flow_and_seq(&p)));
            }
            for f in 0..6u16 {
                let seqs: Vec<u32> =
                    got.iter().filter(|(g, _)| *g == f).map(|(_, s)| *s).collect();
                let want: Vec<u32> = (1..=next[usize::from(f)]).collect();
                prop_assert_eq!(seqs, want, "flow {}", f);
            }
        }
    }
}
