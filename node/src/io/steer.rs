//! Which worker handles each sender's data: busy peers spread over the workers by count,
//! not by hash.
//!
//! The kernel hands each datagram to one of the workers' sockets by a hash of its addresses
//! (`SO_REUSEPORT`), so busy peers often share a worker while another idles (4 peers over 8
//! workers all land apart only 41% of the time). [`Steering`] gives each address that sends
//! WireGuard data a worker that owns it: the worker that received it first, unless another
//! owns fewer addresses, in which case the next such worker after it. The receiving worker
//! hands the owner that address's data, in the order it came ([`split`]). The owner decrypts
//! it and writes the packets to its own TUN queue, and the kernel's TUN driver sends a flow
//! out through the queue its packets were last written on: the other direction (a TCP
//! sender's data, where the peer only acknowledges) is read, sealed and sent by the owner
//! too. Each busy peer thus runs on a worker of its own both ways, as far as there are
//! workers.
//!
//! An address owns its worker while it sends: one silent for [`IDLE`] is forgotten, and
//! placed afresh when it sends again. The table is bounded ([`MAX_SENDERS`]): past that, a
//! new address stays with the worker that received it, as without steering, so datagrams
//! from many made-up addresses cost at most the table. Only transport data is steered;
//! handshakes and the node's own frames stay with the worker that received them.
//!
//! Deterministic: time comes from the caller.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use node_proto::Packet;
use node_proto::magicsock::is_wireguard_data;
use parking_lot::RwLock;
use tracing::debug;

/// How long an address keeps its worker without sending data.
pub const IDLE: Duration = Duration::from_secs(15);
/// The most addresses placed at once.
pub const MAX_SENDERS: usize = 4096;

/// Datagrams one worker hands another: the sender's address and the datagram, in order.
pub type Handoff = Vec<(SocketAddr, Packet)>;

/// The workers' shared table of which worker owns which sender.
pub struct Steering {
    workers: usize,
    on: bool,
    base: Instant,
    table: RwLock<Table>,
    handed_over: AtomicU64,
    dropped: AtomicU64,
}

struct Table {
    owners: HashMap<SocketAddr, Owner>,
    /// Addresses each worker owns.
    load: Vec<usize>,
    /// When idle addresses were last forgotten (seconds after `base`).
    swept: u64,
}

struct Owner {
    worker: usize,
    /// When it last sent (seconds after `base`); written by the one worker receiving it.
    seen: AtomicU64,
}

/// What [`Steering`] has done, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SteeringStats {
    /// Whether senders are steered at all.
    pub on: bool,
    /// Addresses each worker owns now.
    pub senders: Vec<usize>,
    /// Datagrams handed from the worker that received them to their owner.
    pub handed_over: u64,
    /// Datagrams dropped because their owner's queue was full.
    pub dropped: u64,
}

impl Steering {
    /// A table for `workers` workers (at least one), its clock starting at `now`; without
    /// `on`, every sender stays with the worker that received it.
    pub fn new(workers: usize, on: bool, now: Instant) -> Self {
        let workers = workers.max(1);
        Self {
            workers,
            on,
            base: now,
            table: RwLock::new(Table {
                owners: HashMap::new(),
                load: vec![0; workers],
                swept: 0,
            }),
            handed_over: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The worker that handles WireGuard data from `from`, received by worker `here`; places
    /// an address it does not know yet.
    pub fn owner(&self, from: SocketAddr, here: usize, now: Instant) -> usize {
        let here = here.min(self.workers - 1);
        if self.workers == 1 || !self.on {
            return here;
        }
        let t = self.secs(now);
        if let Some(o) = self.table.read().owners.get(&from) {
            o.saw(t);
            return o.worker;
        }
        self.place(from, here, t)
    }

    fn place(&self, from: SocketAddr, here: usize, t: u64) -> usize {
        let mut table = self.table.write();
        if let Some(o) = table.owners.get(&from) {
            o.saw(t);
            return o.worker;
        }
        if table.swept != t {
            table.forget_idle(t);
        }
        if table.owners.len() >= MAX_SENDERS {
            return here;
        }
        let least = table.load.iter().copied().min().unwrap_or(0);
        let worker = (0..self.workers)
            .map(|i| (here + i) % self.workers)
            .find(|&w| table.load[w] == least)
            .unwrap_or(here);
        table.load[worker] += 1;
        debug!(%from, received_by = here, worker, "sender placed");
        table.owners.insert(
            from,
            Owner {
                worker,
                seen: AtomicU64::new(t),
            },
        );
        worker
    }

    /// Whether senders are steered at all.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Counts `n` datagrams handed to their owner, or dropped because its queue was full.
    pub fn count(&self, n: usize, handed: bool) {
        let c = if handed {
            &self.handed_over
        } else {
            &self.dropped
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// What the table holds now and what it has handed over.
    pub fn stats(&self) -> SteeringStats {
        SteeringStats {
            on: self.on,
            senders: self.table.read().load.clone(),
            handed_over: self.handed_over.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_secs()
    }
}

impl Table {
    /// Forgets the addresses that have not sent for [`IDLE`].
    fn forget_idle(&mut self, t: u64) {
        let load = &mut self.load;
        self.owners.retain(|_, o| {
            let keep = o.seen.load(Ordering::Relaxed) + IDLE.as_secs() > t;
            if !keep {
                load[o.worker] -= 1;
            }
            keep
        });
        self.swept = t;
    }
}

impl Owner {
    fn saw(&self, t: u64) {
        // Written only when the second changes: the line stays shared between readers.
        if self.seen.load(Ordering::Relaxed) != t {
            self.seen.store(t, Ordering::Relaxed);
        }
    }
}

/// Sorts what one receive call brought worker `here`: datagrams it handles itself go to
/// `local`, WireGuard data whose sender another worker owns to `others[owner]`, each in the
/// order it came. `datagrams` yields each datagram with its sender; one receive slot holds
/// one sender's datagrams, so the owner is looked up once per sender in a row.
pub fn split(
    steering: &Steering,
    here: usize,
    now: Instant,
    datagrams: impl IntoIterator<Item = (SocketAddr, Packet)>,
    local: &mut Handoff,
    others: &mut [Handoff],
) {
    let mut last: Option<(SocketAddr, usize)> = None;
    for (from, d) in datagrams {
        let worker = if is_wireguard_data(&d) {
            match last {
                Some((a, w)) if a == from => w,
                _ => {
                    let w = steering.owner(from, here, now);
                    last = Some((from, w));
                    w
                }
            }
        } else {
            here
        };
        let p = (from, d);
        match others.get_mut(worker) {
            Some(q) if worker != here => q.push(p),
            _ => local.push(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 40000 + i))
    }

    /// A transport-data message numbered `n` (in its counter field).
    fn data(n: u64) -> Vec<u8> {
        let mut d = vec![4, 0, 0, 0, 0, 0, 0, 0];
        d.extend(n.to_le_bytes());
        d.extend([0u8; 16]);
        d
    }

    #[test]
    fn busy_senders_get_workers_of_their_own_and_keep_them() {
        let now = Instant::now();
        let s = Steering::new(8, true, now);
        // All four arrive at worker 5's socket: the first stays, the others go to the next
        // workers with nothing to do.
        let owners: Vec<usize> = (0..4).map(|i| s.owner(addr(i), 5, now)).collect();
        assert_eq!(owners, [5, 6, 7, 0]);
        for _ in 0..3 {
            for i in 0..4 {
                assert_eq!(
                    s.owner(addr(i), 5, now),
                    owners[i as usize],
                    "sender {i} moved"
                );
            }
        }
        // Eight more, whichever worker receives them, fill the rest evenly.
        for i in 4..12 {
            s.owner(addr(i), (i % 3) as usize, now);
        }
        assert_eq!(s.stats().senders, [2, 2, 2, 2, 1, 1, 1, 1]);
        // A sender that arrives where the load is already least stays there.
        assert_eq!(s.owner(addr(12), 5, now), 5);
    }

    #[test]
    fn a_silent_sender_is_forgotten_and_its_worker_goes_to_the_next() {
        let t0 = Instant::now();
        let s = Steering::new(2, true, t0);
        assert_eq!(s.owner(addr(0), 0, t0), 0);
        assert_eq!(s.owner(addr(1), 0, t0), 1);
        // Sender 0 keeps sending, sender 1 falls silent.
        let mut t = t0;
        while t < t0 + IDLE {
            t += Duration::from_secs(1);
            assert_eq!(s.owner(addr(0), 0, t), 0);
        }
        // A new sender arriving at worker 0 finds worker 1 free again (1's address is gone)...
        assert_eq!(s.owner(addr(2), 0, t), 1);
        assert_eq!(s.stats().senders, [1, 1]);
        // ... and sender 1, back, is placed afresh as the newcomer it now is.
        assert_eq!(s.owner(addr(1), 1, t), 1);
        assert_eq!(s.stats().senders, [1, 2]);
        // One second short of IDLE is not silent enough.
        let s = Steering::new(2, true, t0);
        s.owner(addr(0), 0, t0);
        s.owner(addr(1), 0, t0 + IDLE - Duration::from_secs(1));
        assert_eq!(s.stats().senders, [1, 1]);
    }

    #[test]
    fn the_table_is_bounded_and_one_worker_or_none_on_needs_none() {
        let now = Instant::now();
        let s = Steering::new(4, true, now);
        for i in 0..MAX_SENDERS {
            let a = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 1));
            s.owner(a, i % 4, now);
        }
        assert_eq!(s.stats().senders.iter().sum::<usize>(), MAX_SENDERS);
        // Full: a newcomer stays where it arrived, and is not remembered.
        assert_eq!(s.owner(addr(0), 3, now), 3);
        assert_eq!(s.owner(addr(0), 2, now), 2);
        assert_eq!(s.stats().senders.iter().sum::<usize>(), MAX_SENDERS);
        // Once they have gone silent, there is room again.
        assert_eq!(s.owner(addr(0), 2, now + IDLE), 2);
        assert_eq!(s.stats().senders, [0, 0, 1, 0]);

        let one = Steering::new(1, true, now);
        assert_eq!(one.owner(addr(0), 0, now), 0);
        assert_eq!(one.stats().senders, [0]);
        // Turned off, every sender stays where it arrived.
        let off = Steering::new(4, false, now);
        for i in 0..8 {
            assert_eq!(off.owner(addr(i), 1, now), 1);
        }
        assert_eq!(off.stats().senders, [0, 0, 0, 0]);
    }

    #[test]
    fn split_hands_each_owner_its_senders_data_in_order_and_keeps_the_rest() {
        let now = Instant::now();
        let s = Steering::new(4, true, now);
        let handshake = {
            let mut h = vec![1u8, 0, 0, 0];
            h.extend([7u8; 144]);
            h
        };
        // Six senders interleaved in runs, as receive slots bring them, each numbering its
        // data; sender 3 also sends a handshake in the middle of its data.
        let mut input: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut next = [0u64; 6];
        for round in 0..20u16 {
            for i in 0..6u16 {
                for _ in 0..=(round + i) % 4 {
                    let k = usize::from(i);
                    input.push((addr(i), data(next[k])));
                    next[k] += 1;
                }
                if i == 3 && round == 7 {
                    input.push((addr(3), handshake.clone()));
                }
            }
        }
        let (mut local, mut others) = (Vec::new(), (0..4).map(|_| Vec::new()).collect::<Vec<_>>());
        split(
            &s,
            2,
            now,
            input.iter().map(|(a, d)| (*a, Packet::copy_from(&d[..]))),
            &mut local,
            &mut others,
        );
        assert!(others[2].is_empty(), "a worker hands nothing to itself");
        let mut seen = [0u64; 6];
        for (w, got) in others.iter().enumerate().chain([(2, &local)]) {
            for (from, p) in got {
                let i = usize::from(from.port() - 40000);
                if p[0] == 1 {
                    assert_eq!(w, 2, "a handshake stays with the worker that received it");
                    continue;
                }
                assert_eq!(
                    s.owner(*from, 2, now),
                    w,
                    "sender {i}'s data went elsewhere"
                );
                let n = u64::from_le_bytes(p[8..16].try_into().unwrap());
                assert_eq!(n, seen[i], "sender {i}'s data out of order");
                seen[i] += 1;
            }
        }
        assert_eq!(seen, next, "datagrams lost");
        // Six senders over four workers: each worker owns one or two.
        let senders = s.stats().senders;
        assert_eq!(senders.iter().sum::<usize>(), 6);
        assert!(senders.iter().all(|&n| (1..=2).contains(&n)), "{senders:?}");
    }
}
