//! Encryption and decryption as jobs a shell may run outside the core.
//!
//! By default the core encrypts and decrypts inline, as it handles each packet. A shell that
//! spreads the data plane over several threads turns on [`NodeState::set_crypto_outside`]:
//! the core then decides where a data packet goes (its peer and that peer's tunnel) but
//! hands the rest out as a [`CryptoJob`], which the shell runs without holding the core and
//! hands back as a [`CryptoDone`]: the AEAD, and the flow-table work, which needs only the
//! route tables and the gate ([`Checks`]): checking the source of a packet to seal and
//! tracking its flow, or checking a packet it opened (its source, its destination, its flow
//! or the rules). The
//! core finishes the job (counts it, sends it on the peer's path or delivers it) exactly as
//! the inline path, which runs the same job at once, does.
//!
//! Order: the core hands jobs out in the order their packets came in, and finishing them in
//! that order reproduces the inline path's output. A shell keeps a peer's flow in order by
//! preparing each batch's jobs (counters taken in order, under the tunnel's lock) and
//! finishing them in sequence; their AEAD may run on any threads in between. Jobs for one
//! peer prepared on different threads interleave their counters (the peer's replay window
//! accepts them out of order, as for any reordering on the network).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use gotatun::packet::{Packet, WgKind};
use parking_lot::MutexGuard;
use tracing::trace;
use wire::NodeKey;

use super::data::{Delivery, Refusal, admit, track};
use super::routes::Routes;
use super::{NodeState, Transmit};
use crate::addr::Addr;
use crate::gate::{Gate, Held};
use crate::tunnel::{Inner, OpenSlot, Opened, SealSlot, Tunnel};
use crate::wg;

/// The most jobs prepared (and finished) under one hold of a tunnel's lock: the AEAD runs
/// after the lock is let go, so a thread waiting for the tunnel waits for a run's counters
/// and look-ups only, not for its encryption.
const RUN: usize = 64;

/// AEAD work for one packet and one peer's tunnel, with the flow-table work that goes with it.
pub struct CryptoJob {
    key: NodeKey,
    tunnel: Tunnel,
    /// When the packet was read (for the flow table).
    at: Instant,
    work: Work,
}

enum Work {
    /// A packet from the TUN device to encrypt. `check`: its source is yet to be checked and
    /// its flow tracked (a reset the node makes itself, or a packet that waited for the
    /// tunnel and was tracked then, is not).
    Seal { packet: Packet, check: bool },
    /// A packet the check refused: nothing to encrypt.
    Refused(Refusal),
    /// A WireGuard transport-data message from `from` to decrypt.
    Open { from: Addr, message: WgKind },
    /// What looked like one, not parsed yet ([`CryptoJob::check_all`] parses it).
    OpenRaw { from: Addr, datagram: Packet },
    /// What looked like one and is not: counted as an invalid WireGuard message.
    Invalid { from: Addr },
    /// A packet to seal with a counter taken under the tunnel's lock ([`CryptoJob::prepare`]).
    SealWith { packet: Packet, slot: SealSlot },
    /// A data message to open with the session found under the tunnel's lock.
    OpenWith {
        from: Addr,
        message: WgKind,
        slot: OpenSlot,
    },
    /// Finished: under the tunnel's lock (a handshake to start, no session, not parsed), or
    /// sealed, or a data message that did not open.
    Finished(Done),
    /// A data message opened, `len` bytes of packet: noted under the tunnel's lock when the
    /// job is finished ([`CryptoJob::finish_all`]).
    Opened {
        done: Done,
        slot: OpenSlot,
        len: usize,
    },
}

/// A finished [`CryptoJob`], for [`NodeState::handle_crypto`].
pub struct CryptoDone {
    key: NodeKey,
    tunnel: Tunnel,
    at: Instant,
    result: Done,
}

enum Done {
    Sealed(Option<WgKind>),
    Refused(Refusal),
    /// `delivery`: what the checks decided about the packet, once run
    /// ([`CryptoDone::check_all`]).
    Opened {
        from: Addr,
        result: Opened,
        delivery: Option<Delivery>,
    },
}

/// What crypto jobs check the packets they open against, without the core: the route tables
/// as they were when the jobs were handed out, and the packet filter with its flow table
/// ([`NodeState::checks`]).
#[derive(Clone, Debug)]
pub struct Checks {
    routes: Arc<Routes>,
    gate: Arc<Gate>,
}

impl Checks {
    /// Whether these are `st`'s checks as they stand (the route tables unchanged since).
    pub fn current(&self, st: &NodeState) -> bool {
        Arc::ptr_eq(&self.routes, &st.routes) && Arc::ptr_eq(&self.gate, &st.gate)
    }
}

/// Jobs of one peer's tunnel finished together ([`NodeState::handle_crypto_all`]).
#[derive(Clone, Copy)]
enum Run {
    /// Sealed data packets, all for this one target.
    Sealed(Addr),
    /// Opened data packets, all from this address.
    Opened(Addr),
}

impl Done {
    /// Whether this result belongs in `run`, behind the job that started it.
    fn joins(&self, run: Run) -> bool {
        match (self, run) {
            (Self::Sealed(Some(WgKind::Data(_))), Run::Sealed(_)) => true,
            (
                Self::Opened {
                    from,
                    result:
                        Opened::Packet {
                            inner,
                            established: false,
                        },
                    ..
                },
                Run::Opened(f),
            ) => *from == f && !inner.is_empty(),
            _ => false,
        }
    }
}

impl CryptoJob {
    /// Seals `packet`, read at `at`; `check`: see [`Work::Seal`].
    pub(super) fn seal(
        key: NodeKey,
        tunnel: Tunnel,
        at: Instant,
        packet: Packet,
        check: bool,
    ) -> Self {
        Self {
            key,
            tunnel,
            at,
            work: Work::Seal { packet, check },
        }
    }

    /// Opens `message`, which arrived from `from` at `at`.
    pub(super) fn open(
        key: NodeKey,
        tunnel: Tunnel,
        at: Instant,
        from: Addr,
        message: WgKind,
    ) -> Self {
        Self {
            key,
            tunnel,
            at,
            work: Work::Open { from, message },
        }
    }

    /// Opens `datagram`, which arrived from `from` at `at` and looked like a data message
    /// for this peer's session; it is parsed outside the core.
    pub(super) fn open_raw(
        key: NodeKey,
        tunnel: Tunnel,
        at: Instant,
        from: Addr,
        datagram: Packet,
    ) -> Self {
        Self {
            key,
            tunnel,
            at,
            work: Work::OpenRaw { from, datagram },
        }
    }

    /// The peer whose tunnel the job uses.
    pub fn peer(&self) -> NodeKey {
        self.key
    }

    /// Runs the job against `checks`: see [`CryptoJob::run_all`].
    pub fn run(self, checks: &Checks) -> CryptoDone {
        self.run_one(&checks.routes, &checks.gate)
    }

    fn run_one(mut self, routes: &Routes, gate: &Gate) -> CryptoDone {
        self.check(routes, &mut gate.held());
        let tunnel = self.tunnel.clone();
        let mut inner = tunnel.lock();
        self.prepare(&mut inner);
        self.crypt();
        let mut done = self.account(&mut inner);
        drop(inner);
        done.check(routes, &mut gate.held());
        done
    }

    /// Runs `jobs` in order, empties it, and appends what they did to `done`, as
    /// [`CryptoJob::run`] one by one would, in three steps, none of them under the core's
    /// lock, which a shell may run on different threads (in this order for each batch):
    /// - [`CryptoJob::check_all`]: the packets to seal are checked (their source must be this
    ///   node's, or in a subnet it routes) and their flows tracked, before any of them leaves;
    /// - [`CryptoJob::crypt_all`]: the AEAD;
    /// - [`CryptoDone::check_all`]: the packets opened are checked: whether their source
    ///   belongs to the peer, whether they are for this node, and whether their flow is known
    ///   or the rules admit it (the flow table is updated as for a packet delivered).
    ///
    /// The flow table's shards are locked only in the first and last steps, never across an
    /// AEAD.
    pub fn run_all(jobs: &mut VecDeque<Self>, checks: &Checks, done: &mut Vec<CryptoDone>) {
        let start = done.len();
        Self::check_all(jobs, checks);
        Self::crypt_all(jobs, checks, done);
        CryptoDone::check_all(&mut done[start..], checks);
    }

    /// The first step of [`CryptoJob::run_all`]: checks the packets to seal and tracks their
    /// flows. Jobs checked already are left alone.
    pub fn check_all(jobs: &mut VecDeque<Self>, checks: &Checks) {
        let mut held = checks.gate.held();
        for job in jobs.iter_mut() {
            job.check(&checks.routes, &mut held);
        }
    }

    /// The second step of [`CryptoJob::run_all`]: runs the AEAD of `jobs` in order, empties
    /// it, and appends what they did to `done`: [`CryptoJob::prepare_all`], then
    /// [`CryptoJob::crypt_queue`], then [`CryptoJob::finish_all`]. A shell may instead split
    /// the prepared jobs between threads for the middle step
    /// ([`crate::shared::crypt_prepared`]).
    pub fn crypt_all(jobs: &mut VecDeque<Self>, checks: &Checks, done: &mut Vec<CryptoDone>) {
        Self::prepare_all(jobs, checks);
        Self::crypt_queue(jobs);
        Self::finish_all(jobs, done);
    }

    /// Prepares `jobs` for their AEAD: a run of jobs for one tunnel (at most `RUN`, 64) takes
    /// its lock once to take a sending counter or find the session of each job, and hands it
    /// on fairly (a thread waiting for the same tunnel, the other direction or a packet read
    /// on another worker, gets it within one run). Counters are taken in the jobs' order, so
    /// sealed in any order and on any threads, one run's messages still leave in order as the
    /// jobs are finished in order. A packet to seal that [`CryptoJob::check_all`] did not
    /// check is checked here first, so none leaves unchecked.
    pub fn prepare_all(jobs: &mut VecDeque<Self>, checks: &Checks) {
        if jobs.iter().any(Self::unchecked) {
            Self::check_all(jobs, checks);
        }
        let mut start = 0;
        while let Some(first) = jobs.get(start) {
            let tunnel = first.tunnel.clone();
            let n = jobs
                .range(start..)
                .take(RUN)
                .take_while(|j| j.tunnel.same(&tunnel))
                .count();
            let mut inner = tunnel.lock();
            // Prepared where they lie (a job is some 200 bytes: each move costs).
            for job in jobs.range_mut(start..start + n) {
                job.prepare(&mut inner);
            }
            MutexGuard::unlock_fair(inner);
            start += n;
        }
    }

    /// Runs the AEAD of prepared jobs, holding no lock: disjoint parts of one batch may run on
    /// different threads at once.
    pub fn crypt_prepared(jobs: &mut [Self]) {
        for job in jobs {
            job.crypt();
        }
    }

    /// [`CryptoJob::crypt_prepared`] on every job of a queue (a batch, or a part of one).
    pub fn crypt_queue(jobs: &mut VecDeque<Self>) {
        let (front, back) = jobs.as_mut_slices();
        Self::crypt_prepared(front);
        Self::crypt_prepared(back);
    }

    /// Takes the jobs whose AEAD ran off `jobs`, in order, and appends what they did to
    /// `done`; data opened is noted under its tunnel's lock, once for a run of one tunnel. A
    /// job left without its AEAD is dropped (counted as malformed), never sent unsealed.
    pub fn finish_all(jobs: &mut VecDeque<Self>, done: &mut Vec<CryptoDone>) {
        while let Some(first) = jobs.pop_front() {
            if !matches!(first.work, Work::Opened { .. }) {
                done.push(first.into_done());
                continue;
            }
            let tunnel = first.tunnel.clone();
            let mut inner = tunnel.lock();
            done.push(first.account(&mut inner));
            for _ in 1..RUN {
                let Some(job) = jobs.pop_front_if(|j| {
                    j.tunnel.same(&tunnel) && matches!(j.work, Work::Opened { .. })
                }) else {
                    break;
                };
                done.push(job.account(&mut inner));
            }
            MutexGuard::unlock_fair(inner);
        }
    }

    /// Whether this is a packet to seal whose source and flow are still to be checked, or a
    /// datagram still to be parsed.
    fn unchecked(&self) -> bool {
        matches!(
            self.work,
            Work::Seal { check: true, .. } | Work::OpenRaw { .. }
        )
    }

    /// Checks and tracks a packet to seal, or parses a datagram to open (see
    /// [`CryptoJob::check_all`]).
    fn check(&mut self, routes: &Routes, held: &mut Held<'_>) {
        match &mut self.work {
            Work::Seal {
                packet,
                check: check @ true,
            } => {
                *check = false;
                if let Err(refusal) = track(routes, held, self.at, self.key, packet) {
                    self.work = Work::Refused(refusal);
                }
            }
            Work::OpenRaw { from, .. } => {
                // Invalid stands in while the datagram is moved out to be parsed.
                let from = *from;
                let raw = std::mem::replace(&mut self.work, Work::Invalid { from });
                self.work = raw.parsed();
            }
            _ => {}
        }
    }

    /// Under the tunnel's lock: takes a counter for a packet to seal, or finds the session of
    /// a data message to open; what cannot wait for the AEAD (a handshake to start for want of
    /// a session, a message that names none) is finished here.
    fn prepare(&mut self, inner: &mut Inner) {
        let at = self.at;
        // Refused stands in while the work is moved out.
        let work = std::mem::replace(&mut self.work, Work::Refused(Refusal::Malformed));
        self.work = match work.parsed() {
            Work::Seal { packet, .. } => match inner.seal_slot(at, packet.len()) {
                Some(slot) => Work::SealWith { packet, slot },
                None => Work::Finished(Done::Sealed(inner.encapsulate(at, &packet))),
            },
            Work::Open { from, message } => {
                let slot = match &message {
                    WgKind::Data(p) => {
                        inner.open_slot(p.header.receiver_idx.get(), p.header.counter.get())
                    }
                    _ => None,
                };
                match slot {
                    Some(slot) => Work::OpenWith {
                        from,
                        message,
                        slot,
                    },
                    None => Work::Finished(Done::Opened {
                        from,
                        result: inner.receive(at, message),
                        delivery: None,
                    }),
                }
            }
            Work::Refused(refusal) => Work::Finished(Done::Refused(refusal)),
            Work::Invalid { from } | Work::OpenRaw { from, .. } => Work::Finished(Done::Opened {
                from,
                result: Opened::Err(wg::Error::Malformed),
                delivery: None,
            }),
            prepared @ (Work::SealWith { .. }
            | Work::OpenWith { .. }
            | Work::Finished(_)
            | Work::Opened { .. }) => prepared,
        };
    }

    /// Runs the AEAD of a prepared job, holding no lock.
    fn crypt(&mut self) {
        let at = self.at;
        let work = std::mem::replace(&mut self.work, Work::Refused(Refusal::Malformed));
        self.work = match work {
            Work::SealWith { packet, slot } => {
                Work::Finished(Done::Sealed(slot.seal_owned(packet)))
            }
            Work::OpenWith {
                from,
                message,
                slot,
            } => match slot.open(at, message) {
                Ok(inner) => Work::Opened {
                    len: inner.len(),
                    done: Done::Opened {
                        from,
                        result: Opened::Packet {
                            inner,
                            established: false,
                        },
                        delivery: None,
                    },
                    slot,
                },
                Err(e) => Work::Finished(Done::Opened {
                    from,
                    result: Opened::Err(e),
                    delivery: None,
                }),
            },
            other => other,
        };
    }

    /// What the job did (its AEAD ran, or it was finished under the lock).
    fn into_done(self) -> CryptoDone {
        let result = match self.work {
            Work::Finished(done) | Work::Opened { done, .. } => done,
            // Every job is prepared and crypted before it is finished; one that was not is
            // dropped as malformed rather than sealed without its counter.
            Work::Seal { .. } | Work::Refused(_) | Work::SealWith { .. } => {
                debug_assert!(false, "finished before its AEAD");
                Done::Refused(Refusal::Malformed)
            }
            Work::Open { from, .. }
            | Work::OpenRaw { from, .. }
            | Work::Invalid { from }
            | Work::OpenWith { from, .. } => {
                debug_assert!(false, "finished before its AEAD");
                Done::Opened {
                    from,
                    result: Opened::Err(wg::Error::Malformed),
                    delivery: None,
                }
            }
        };
        CryptoDone {
            key: self.key,
            tunnel: self.tunnel,
            at: self.at,
            result,
        }
    }

    /// Finishes a job whose data message opened, accepting and noting it under the tunnel's
    /// lock (held by the caller): a copy of a message accepted first is refused as a replay;
    /// if it confirmed a session, the core sends what waited for one when it finishes the job.
    fn account(mut self, inner: &mut Inner) -> CryptoDone {
        let at = self.at;
        if let Work::Opened { done, slot, len } = &mut self.work
            && let Done::Opened { result, .. } = done
        {
            *result = match (
                inner.opened(at, slot, *len),
                std::mem::replace(result, Opened::Nothing),
            ) {
                (Err(e), _) => Opened::Err(e),
                (Ok(true), Opened::Packet { inner, .. }) if inner.is_empty() => Opened::Established,
                (Ok(true), Opened::Packet { inner, .. }) => Opened::Packet {
                    inner,
                    established: true,
                },
                (_, other) => other,
            };
        }
        self.into_done()
    }
}

impl Work {
    /// A datagram to open parsed: a data message, or invalid. Other work as it is.
    fn parsed(self) -> Self {
        match self {
            Self::OpenRaw { from, datagram } => match datagram.try_into_wg() {
                Ok(message @ WgKind::Data(_)) => Self::Open { from, message },
                _ => Self::Invalid { from },
            },
            other => other,
        }
    }
}

impl std::fmt::Debug for CryptoJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.work {
            Work::Seal { .. } | Work::SealWith { .. } => "seal",
            Work::Refused(_) => "refused",
            Work::Open { .. }
            | Work::OpenRaw { .. }
            | Work::Invalid { .. }
            | Work::OpenWith { .. } => "open",
            Work::Finished(_) | Work::Opened { .. } => "finished",
        };
        f.debug_struct("CryptoJob")
            .field("peer", &self.key)
            .field("kind", &kind)
            .finish()
    }
}

impl CryptoDone {
    /// The last step of [`CryptoJob::run_all`]: checks the data packets these jobs opened.
    /// Those already checked are left alone; one left unchecked is checked by the core when
    /// it finishes the job.
    pub fn check_all(done: &mut [Self], checks: &Checks) {
        let mut held = checks.gate.held();
        for d in done {
            d.check(&checks.routes, &mut held);
        }
    }

    /// Checks a data packet this job opened.
    fn check(&mut self, routes: &Routes, held: &mut Held<'_>) {
        if let Done::Opened {
            result: Opened::Packet { inner, .. },
            delivery: delivery @ None,
            ..
        } = &mut self.result
            && !inner.is_empty()
        {
            *delivery = Some(admit(routes, held, self.at, self.key, inner));
        }
    }
}

impl std::fmt::Debug for CryptoDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoDone")
            .field("peer", &self.key)
            .finish_non_exhaustive()
    }
}

impl NodeState {
    /// Hands encryption and decryption of data packets out as [`CryptoJob`]s
    /// ([`NodeState::poll_crypto`]) instead of running them inline. Packets that waited for
    /// a post-quantum key become jobs too when the key arrives. Handshakes, keepalives and the
    /// packets that waited in the tunnel for its handshake still run inline: they are rare and
    /// change the tunnel's state.
    pub fn set_crypto_outside(&mut self, on: bool) {
        self.crypto_outside = on;
    }

    /// What the crypto jobs handed out now check the packets they open against: give the
    /// jobs of one [`NodeState::take_crypto`] the checks taken with them.
    pub fn checks(&self) -> Checks {
        Checks {
            routes: Arc::clone(&self.routes),
            gate: Arc::clone(&self.gate),
        }
    }

    /// The next crypto job, in the order the core made them.
    pub fn poll_crypto(&mut self) -> Option<CryptoJob> {
        self.crypto.pop_front()
    }

    /// Appends every waiting crypto job to `jobs`, in order, as [`NodeState::poll_crypto`]
    /// one by one would; into an empty `jobs` by swapping the queues, without moving a job.
    pub fn take_crypto(&mut self, jobs: &mut VecDeque<CryptoJob>) {
        if jobs.is_empty() {
            std::mem::swap(&mut self.crypto, jobs);
        } else {
            jobs.append(&mut self.crypto);
        }
    }

    /// Finishes a job [`NodeState::poll_crypto`] handed out. A job whose peer is gone, or
    /// whose tunnel was replaced while it ran, is dropped.
    pub fn handle_crypto(&mut self, now: Instant, done: CryptoDone) {
        let current = self.is_current(&done.key, &done.tunnel);
        match done.result {
            Done::Refused(Refusal::Malformed) => self.counters.tun_malformed += 1,
            Done::Refused(Refusal::BadSource) => self.counters.tun_bad_source += 1,
            _ if !current => {
                trace!(peer = %done.key, "crypto job for a tunnel that is gone; dropped");
            }
            Done::Sealed(wg) => self.sealed(now, done.key, wg),
            Done::Opened {
                from,
                result,
                delivery,
            } => self.opened(now, done.key, from, result, delivery),
        }
    }

    /// Finishes `done`'s jobs in order, as [`NodeState::handle_crypto`] would one by one, and
    /// empties it. A run of jobs for one peer's current tunnel (packets sealed for it while
    /// it has one path, or data opened from one of its addresses) looks the peer and its path
    /// up once, not for every packet: the lock of a shared core is held that much shorter.
    pub fn handle_crypto_all(&mut self, now: Instant, done: &mut Vec<CryptoDone>) {
        // Looked at in place before being taken (a peeking iterator would move each ~200-byte
        // result once more).
        let mut jobs = done.drain(..);
        while let Some(d) = jobs.next() {
            let Some(run) = self.run_of(now, &d) else {
                self.handle_crypto(now, d);
                continue;
            };
            let CryptoDone {
                key,
                tunnel,
                result,
                ..
            } = d;
            let mut next = || {
                let j = jobs.as_slice().first()?;
                (j.key == key && j.tunnel.same(&tunnel) && j.result.joins(run))
                    .then(|| jobs.next())
                    .flatten()
                    .map(|j| j.result)
            };
            match run {
                Run::Sealed(dst) => {
                    let mut n = 0;
                    for r in std::iter::once(result).chain(std::iter::from_fn(next)) {
                        if let Done::Sealed(Some(wg)) = r {
                            self.transmits.push_back(Transmit {
                                dst,
                                payload: wg.into(),
                                ttl: None,
                            });
                            n += 1;
                        }
                    }
                    if let Some(peer) = self.peers.get_mut(&key) {
                        peer.traffic.tx_packets += n;
                    }
                    self.counters.out_sent += n;
                }
                Run::Opened(from) => {
                    // The first learns the path as one by one would; for the others that
                    // would only count them (same address, same `now`).
                    if let Done::Opened {
                        result: Opened::Packet { inner, .. },
                        delivery,
                        ..
                    } = result
                    {
                        self.learn_path(now, key, from, 1);
                        self.deliver(now, key, inner, delivery);
                    }
                    // Learning the path can start a key exchange: if that replaced the
                    // tunnel, the rest go one by one (and are dropped).
                    if !self.is_current(&key, &tunnel) {
                        continue;
                    }
                    let mut n = 0;
                    while let Some(r) = next() {
                        if let Done::Opened {
                            result: Opened::Packet { inner, .. },
                            delivery,
                            ..
                        } = r
                        {
                            n += 1;
                            self.deliver(now, key, inner, delivery);
                        }
                    }
                    if let Some(peer) = self.peers.get_mut(&key) {
                        peer.traffic.rx_packets += n;
                    }
                }
            }
        }
    }

    /// Whether `tunnel` is peer `key`'s tunnel now.
    fn is_current(&self, key: &NodeKey, tunnel: &Tunnel) -> bool {
        self.peers
            .get(key)
            .and_then(|p| p.tunnel.as_ref())
            .is_some_and(|t| t.same(tunnel))
    }

    /// Whether `d` can head a run ([`NodeState::handle_crypto_all`]): a job for its peer's
    /// current tunnel that sealed a data packet while the peer has a sole target, or opened
    /// a data packet.
    fn run_of(&self, now: Instant, d: &CryptoDone) -> Option<Run> {
        let peer = self.peers.get(&d.key)?;
        if !peer.tunnel.as_ref().is_some_and(|t| t.same(&d.tunnel)) {
            return None;
        }
        match &d.result {
            Done::Sealed(Some(WgKind::Data(_))) => peer
                .path
                .sole_target(now, self.local_for(&peer.node))
                .map(Run::Sealed),
            Done::Opened {
                from,
                result:
                    Opened::Packet {
                        inner,
                        established: false,
                    },
                ..
            } if !inner.is_empty() => Some(Run::Opened(*from)),
            _ => None,
        }
    }

    /// Runs `job` inline or queues it for the shell.
    pub(super) fn crypto_job(&mut self, now: Instant, job: CryptoJob) {
        if self.crypto_outside {
            self.crypto.push_back(job);
        } else {
            let done = job.run_one(&self.routes, &self.gate);
            self.handle_crypto(now, done);
        }
    }

    fn sealed(&mut self, now: Instant, key: NodeKey, wg: Option<WgKind>) {
        let Some(wg) = wg else {
            return;
        };
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.traffic.tx_packets += 1;
        }
        self.send_to_peer(now, key, wg);
    }

    /// What a WireGuard message from peer `key` decrypted (or was answered) to.
    /// `delivery`: what the checks decided, if they ran (a data packet opened by a job).
    pub(super) fn opened(
        &mut self,
        now: Instant,
        key: NodeKey,
        from: Addr,
        result: Opened,
        delivery: Option<Delivery>,
    ) {
        match result {
            Opened::Reply(reply) => {
                self.learn_path(now, key, from, 0);
                self.register_index(key, &reply);
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: reply.into(),
                    ttl: None,
                });
            }
            Opened::Established => {
                self.learn_path(now, key, from, 0);
                self.send_queued(now, key, from);
            }
            Opened::Packet { inner, established } => {
                self.learn_path(now, key, from, u64::from(!inner.is_empty()));
                if established {
                    self.send_queued(now, key, from);
                }
                if !inner.is_empty() {
                    self.deliver(now, key, inner, delivery);
                }
            }
            Opened::Nothing => {}
            Opened::Err(e) => {
                self.counters.wg_invalid += 1;
                trace!(peer = %key, error = %e, "wireguard message rejected");
            }
        }
    }

    /// Sends `from` the packets that waited for peer `key`'s new session.
    fn send_queued(&mut self, now: Instant, key: NodeKey, from: Addr) {
        let queued = self
            .peers
            .get(&key)
            .and_then(|p| p.tunnel.as_ref())
            .map(|t| t.queued(now))
            .unwrap_or_default();
        for q in queued {
            self.transmits.push_back(Transmit {
                dst: from,
                payload: q.into(),
                ttl: None,
            });
            self.counters.out_sent += 1;
        }
    }
}
