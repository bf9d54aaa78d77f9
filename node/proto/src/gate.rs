//! The packet filter and the flow table it fills, shared by the core and the threads that run
//! its crypto jobs.
//!
//! A packet a peer sent is checked against the flow table (a reply, a further packet of an
//! admitted flow) and, for a new flow, against the rules. With the data plane on several
//! threads those checks run where the packet was decrypted, outside the core's lock, so the
//! table is split into [`SHARDS`] shards, each behind a lock of its own: a flow's two
//! directions hash to the same shard, and threads handling different flows seldom meet.
//!
//! The rules are read for new flows only (a flow's later packets find it in the table) and
//! replaced rarely, so they sit behind a read-write lock. Replacing them cuts the inbound flows
//! they no longer allow ([`Gate::set_filter`]): a flow admitted under the old rules by a thread
//! that read them just before the swap is in its shard by the time that shard is rechecked,
//! because admission reads the rules while it holds the shard's lock and the recheck takes each
//! shard's lock after the swap. No flow the new rules forbid survives the change.
//!
//! Each shard holds `1/SHARDS` of the table's capacity and of each peer's quota; flows spread
//! over the shards by a hash seeded by the core, so the bounds hold for the table as a whole
//! as they did for one table (a peer's flows evict its own first, and when a shard is full, the
//! peer holding the most of that shard loses its oldest).

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::time::Instant;

use foldhash::fast::FixedState;
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use wire::NodeKey;

use crate::conntrack::{CutFlow, DEFAULT_CAPACITY, DEFAULT_PER_PEER, FlowTable, Known};
use crate::filter::Filter;
use crate::packet::{FiveTuple, Transport};

/// Shards of the flow table: more than the workers a node runs by default (8), so two
/// workers' flows seldom share one.
pub const SHARDS: usize = 16;

/// See the module docs.
pub struct Gate {
    filter: RwLock<Filter>,
    shards: Box<[Mutex<FlowTable>]>,
    hasher: FixedState,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("flows", &self.len())
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// No rules (nothing new is admitted) and an empty table of the default size;
    /// `seed` places flows in shards.
    pub fn new(seed: u64) -> Self {
        Self::with_capacity(DEFAULT_CAPACITY, DEFAULT_PER_PEER, seed)
    }

    /// A table holding at most about `capacity` flows, about `per_owner` of them for one peer
    /// (each shard holds its share of both, at least one).
    pub fn with_capacity(capacity: usize, per_owner: usize, seed: u64) -> Self {
        let shard = |n: usize| n.div_ceil(SHARDS).max(1);
        Self {
            filter: RwLock::new(Filter::default()),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FlowTable::new(shard(capacity), shard(per_owner))))
                .collect(),
            hasher: FixedState::with_seed(seed),
        }
    }

    /// The rules in force.
    pub fn filter(&self) -> RwLockReadGuard<'_, Filter> {
        self.filter.read()
    }

    /// The rules, to refresh them in place; call [`Gate::recheck`] after a change.
    pub fn filter_mut(&self) -> RwLockWriteGuard<'_, Filter> {
        self.filter.write()
    }

    /// Puts `filter` in force and cuts the inbound flows it does not allow; returns them,
    /// sorted.
    pub fn set_filter(&self, filter: Filter) -> Vec<CutFlow> {
        *self.filter.write() = filter;
        self.recheck()
    }

    /// Cuts the inbound flows the rules in force do not allow; returns them, sorted.
    pub fn recheck(&self) -> Vec<CutFlow> {
        let mut cut = Vec::new();
        for shard in &self.shards {
            let mut table = shard.lock();
            let filter = self.filter.read();
            cut.extend(table.retain_inbound(|t| filter.evaluate(t).is_accept()));
        }
        cut.sort();
        cut
    }

    /// Records a packet this node sends to `owner`.
    pub fn track_outbound(
        &self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
    ) {
        self.held().track_outbound(now, owner, t, transport);
    }

    /// Whether a packet from peer `owner` is let in: a reply, a further packet of an admitted
    /// flow, an ICMP error about one of the peer's flows, or (unless `only_through_exit`: from
    /// the internet, which never opens flows through the exit node) the first packet of a
    /// flow the rules accept, which is then admitted.
    pub fn inbound(
        &self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
        only_through_exit: bool,
    ) -> bool {
        self.held()
            .inbound(now, owner, t, transport, only_through_exit)
    }

    /// For a run of packets on one thread: see [`Held`].
    pub fn held(&self) -> Held<'_> {
        Held {
            gate: self,
            held: None,
        }
    }

    /// Drops idle flows.
    pub fn sweep(&self, now: Instant) {
        for shard in &self.shards {
            shard.lock().sweep(now);
        }
    }

    /// Removes every flow of peer `owner` and returns the live ones, sorted.
    pub fn take_owner(&self, owner: &NodeKey) -> Vec<CutFlow> {
        let mut taken: Vec<CutFlow> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().take_owner(owner))
            .collect();
        taken.sort();
        taken
    }

    /// Hands `from`'s flows to `to` (a peer that rotated its key keeps its connections).
    pub fn reown(&self, from: &NodeKey, to: NodeKey) {
        for shard in &self.shards {
            shard.lock().reown(from, to);
        }
    }

    /// Flows tracked (cut ones included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no flows are tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows tracked for `owner`.
    pub fn owned_by(&self, owner: &NodeKey) -> usize {
        self.shards.iter().map(|s| s.lock().owned_by(owner)).sum()
    }

    /// Flows evicted to make room so far.
    pub fn evicted(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().evicted()).sum()
    }

    /// The shard of `t`'s flow: the same for both directions.
    fn shard(&self, t: &FiveTuple) -> &Mutex<FlowTable> {
        let a: (IpAddr, u16) = (t.src, t.src_port);
        let b: (IpAddr, u16) = (t.dst, t.dst_port);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = self.hasher.build_hasher();
        t.proto.hash(&mut h);
        lo.hash(&mut h);
        hi.hash(&mut h);
        &self.shards[(h.finish() % SHARDS as u64) as usize]
    }
}

/// The flow-table work of a run of packets on one thread: the shard of the last packet's flow
/// stays locked while the next packets belong to the same flow (a stream's packets come in
/// runs), so a run pays for one hash and one lock instead of one per packet. Let go of it at
/// the end of the run: until it is dropped, other threads wait for that shard.
pub struct Held<'a> {
    gate: &'a Gate,
    held: Option<(FiveTuple, MutexGuard<'a, FlowTable>)>,
}

impl Held<'_> {
    /// Records a packet this node sends to `owner` ([`Gate::track_outbound`]).
    pub fn track_outbound(
        &mut self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
    ) {
        self.table(t).track_outbound(now, owner, t, transport);
    }

    /// Whether a packet from peer `owner` is let in ([`Gate::inbound`]).
    pub fn inbound(
        &mut self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
        only_through_exit: bool,
    ) -> bool {
        let gate = self.gate;
        if let Transport::IcmpError { quoted: Some(q) } = transport {
            // About the quoted flow, which may sit in another shard: one shard at a time, so
            // two threads never wait for each other's.
            self.held = None;
            let known = gate
                .shard(&q)
                .lock()
                .classify_inbound(now, owner, t, transport);
            if known != Known::New {
                return true;
            }
        } else if self.table(t).classify_inbound(now, owner, t, transport) != Known::New {
            return true;
        }
        // The rules are read under the shard's lock (see the module docs).
        let table = self.table(t);
        if only_through_exit || !gate.filter.read().evaluate(t).is_accept() {
            return false;
        }
        table.admit_inbound(now, owner, t, transport);
        true
    }

    /// The table holding `t`'s flow, locked.
    fn table(&mut self, t: &FiveTuple) -> &mut FlowTable {
        if self.held.as_ref().is_none_or(|(last, _)| last != t) {
            // Let go of one shard before taking another.
            self.held = None;
        }
        let gate = self.gate;
        &mut self
            .held
            .get_or_insert_with(|| (*t, gate.shard(t).lock()))
            .1
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use wire::IpProto;
    use wire::filter::{Action, DstPorts, FilterRule, PortRange};

    use super::*;

    const A: NodeKey = NodeKey::from_bytes([2; 32]);
    const B: NodeKey = NodeKey::from_bytes([3; 32]);

    /// UDP from a peer's `port` to this node's 100.64.0.1:`dport`.
    fn udp_in(port: u16, dport: u16) -> FiveTuple {
        FiveTuple {
            proto: IpProto::UDP,
            src: "100.64.0.2".parse().unwrap(),
            dst: "100.64.0.1".parse().unwrap(),
            src_port: port,
            dst_port: dport,
        }
    }

    /// Rules letting UDP in to port `dport` only.
    fn allow_port(dport: u16, now: i64) -> Filter {
        Filter::new(
            vec![FilterRule {
                origin: "test".into(),
                action: Action::Accept,
                src: vec!["0.0.0.0/0".parse().unwrap()],
                dst: vec![DstPorts {
                    net: "100.64.0.1/32".parse().unwrap(),
                    ports: PortRange {
                        first: dport,
                        last: dport,
                    },
                }],
                protocols: vec![IpProto::UDP],
                all_protocols: false,
                valid: None,
                cap_grants: Vec::new(),
            }],
            now,
        )
    }

    /// Flows on every shard: both directions of each meet in one, replies and ICMP errors
    /// about them (whose quoted flow hashes elsewhere) are known without the rules, and the
    /// first packet of an inbound flow is admitted only by the rules (or never, from the
    /// internet through the exit node).
    #[test]
    fn each_flow_is_found_from_both_directions_in_whichever_shard_it_is() {
        let now = crate::test_epoch();
        let gate = Gate::new(7);
        let mut shards = std::collections::BTreeSet::new();
        for port in 1000..1200 {
            let inbound = udp_in(port, 53);
            shards.insert(std::ptr::from_ref(gate.shard(&inbound)));
            assert!(std::ptr::eq(
                gate.shard(&inbound),
                gate.shard(&inbound.reversed())
            ));
            // No rules: nothing new gets in; what this node opened does.
            assert!(!gate.inbound(now, A, &inbound, Transport::Udp, false));
            gate.track_outbound(now, A, &inbound.reversed(), Transport::Udp);
            assert!(
                gate.inbound(now, A, &inbound, Transport::Udp, false),
                "a reply"
            );
            assert!(
                !gate.inbound(now, B, &inbound, Transport::Udp, false),
                "not from B"
            );
            let icmp = FiveTuple {
                proto: IpProto::ICMP,
                src_port: 0,
                dst_port: 0,
                ..inbound
            };
            let about = |q| Transport::IcmpError { quoted: Some(q) };
            assert!(gate.inbound(now, A, &icmp, about(inbound.reversed()), false));
            assert!(!gate.inbound(now, B, &icmp, about(inbound.reversed()), false));
        }
        assert_eq!(shards.len(), SHARDS, "200 flows reach every shard");
        assert_eq!(gate.len(), 200);
        assert_eq!(gate.owned_by(&A), 200);

        *gate.filter_mut() = allow_port(53, 0);
        assert!(gate.recheck().is_empty(), "outbound flows are never cut");
        let new = udp_in(5000, 53);
        assert!(
            !gate.inbound(now, A, &new, Transport::Udp, true),
            "through the exit"
        );
        assert!(
            gate.inbound(now, A, &new, Transport::Udp, false),
            "admitted"
        );
        assert!(!gate.inbound(now, A, &udp_in(5000, 54), Transport::Udp, false));
        assert_eq!(gate.owned_by(&A), 201);
    }

    /// New rules cut the inbound flows they forbid in every shard, and only those; a peer's
    /// flows follow its new key, and go when it does.
    #[test]
    fn new_rules_cut_what_they_forbid_in_every_shard() {
        let now = crate::test_epoch();
        let gate = Gate::new(7);
        *gate.filter_mut() = Filter::new(
            [53, 54]
                .map(|p| allow_port(p, 0).rules()[0].clone())
                .to_vec(),
            0,
        );
        for port in 1000..1100 {
            for dport in [53, 54] {
                assert!(gate.inbound(now, A, &udp_in(port, dport), Transport::Udp, false));
            }
        }
        let cut = gate.set_filter(allow_port(53, 0));
        assert_eq!(cut.len(), 100, "every flow to port 54, from every shard");
        assert!(cut.windows(2).all(|w| w[0] <= w[1]), "sorted");
        for port in 1000..1100 {
            assert!(gate.inbound(now, A, &udp_in(port, 53), Transport::Udp, false));
            assert!(!gate.inbound(now, A, &udp_in(port, 54), Transport::Udp, false));
        }
        gate.reown(&A, B);
        assert_eq!((gate.owned_by(&A), gate.owned_by(&B)), (0, 200));
        assert_eq!(gate.take_owner(&B).len(), 100, "the live ones");
        assert!(gate.is_empty());
    }

    /// The bounds hold for the table as a whole: one peer opening flows without end keeps
    /// about its quota and evicts only its own; the other peer's flows stay.
    #[test]
    fn one_peer_filling_the_table_evicts_only_its_own_flows() {
        let now = crate::test_epoch();
        let gate = Gate::with_capacity(1600, 400, 7);
        *gate.filter_mut() = allow_port(53, 0);
        for port in 0..100 {
            assert!(gate.inbound(now, B, &udp_in(port, 53), Transport::Udp, false));
        }
        let a = |port: u16| FiveTuple {
            src: "100.64.0.3".parse().unwrap(),
            ..udp_in(port, 53)
        };
        for port in 0..5000 {
            assert!(gate.inbound(now, A, &a(port), Transport::Udp, false));
        }
        let held = gate.owned_by(&A);
        assert!((300..=400).contains(&held), "A holds {held}");
        assert_eq!(gate.owned_by(&B), 100);
        assert_eq!(gate.evicted(), 5000 - held as u64);
    }

    /// Rules replaced while other threads admit new flows: once the new rules are in force,
    /// no flow they forbid is left, whichever rules the admitting threads read.
    #[test]
    fn no_flow_the_new_rules_forbid_survives_their_change_under_concurrent_admission() {
        let now = crate::test_epoch();
        for round in 0..20u64 {
            let gate = Gate::new(round);
            *gate.filter_mut() = allow_port(53, 0);
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                for thread in 0..3u16 {
                    let (gate, stop) = (&gate, &stop);
                    s.spawn(move || {
                        let mut port = thread * 20_000;
                        while !stop.load(Ordering::Relaxed) {
                            gate.inbound(now, A, &udp_in(port, 53), Transport::Udp, false);
                            port = port.wrapping_add(1);
                        }
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
                gate.set_filter(Filter::default());
                // Whatever the threads do from here is under the new rules.
                let left = gate.recheck();
                stop.store(true, Ordering::Relaxed);
                assert!(
                    left.is_empty(),
                    "round {round}: {} flows survived",
                    left.len()
                );
            });
            assert!(gate.recheck().is_empty());
        }
    }

    /// Two threads' runs moving between flows in different shards, in opposite orders (each
    /// lets go of one shard before taking the next, so neither waits for the other while
    /// holding one), while a third rechecks every shard: all finish, and the runs find what
    /// they tracked, as separate calls would.
    #[test]
    fn held_runs_move_between_shards_while_another_thread_rechecks() {
        let now = crate::test_epoch();
        let gate = Gate::new(3);
        let flows: Vec<FiveTuple> = (0..64).map(|p| udp_in(2000 + p, 53)).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..200 {
                    gate.recheck();
                }
            });
            for backwards in [false, true] {
                let (gate, flows) = (&gate, &flows);
                s.spawn(move || {
                    for _ in 0..200 {
                        let mut held = gate.held();
                        let mut run = |t: &FiveTuple| {
                            held.track_outbound(now, A, &t.reversed(), Transport::Udp);
                            assert!(held.inbound(now, A, t, Transport::Udp, false));
                            assert!(!held.inbound(now, B, t, Transport::Udp, false));
                        };
                        if backwards {
                            flows.iter().rev().for_each(&mut run);
                        } else {
                            flows.iter().for_each(&mut run);
                        }
                    }
                });
            }
        });
        assert_eq!(gate.len(), 64);
        assert_eq!(gate.owned_by(&A), 64);
    }

    /// What the gate must agree with: one flow table and the rules, without shards or locks.
    struct Plain {
        table: FlowTable,
        filter: Filter,
    }

    impl Plain {
        fn inbound(
            &mut self,
            now: Instant,
            owner: NodeKey,
            t: &FiveTuple,
            transport: Transport,
            only_through_exit: bool,
        ) -> bool {
            if self.table.classify_inbound(now, owner, t, transport) != Known::New {
                return true;
            }
            if only_through_exit || !self.filter.evaluate(t).is_accept() {
                return false;
            }
            self.table.admit_inbound(now, owner, t, transport);
            true
        }

        fn set_filter(&mut self, filter: Filter) -> Vec<CutFlow> {
            self.filter = filter;
            let filter = &self.filter;
            self.table
                .retain_inbound(|t| filter.evaluate(t).is_accept())
        }
    }

    /// One step of the property test below.
    #[derive(Debug, Clone)]
    enum Op {
        /// This node sends on flow `flow` to peer `owner`, with TCP flags `flags` (UDP if 0).
        Out { owner: u8, flow: u8, flags: u8 },
        /// Peer `owner` sends on flow `flow` (reversed: the far end's packet).
        In {
            owner: u8,
            flow: u8,
            flags: u8,
            exit: bool,
        },
        /// Peer `owner` sends an ICMP error about this node's packet on flow `flow`.
        Error { owner: u8, flow: u8 },
        /// New rules: UDP and TCP let in to the ports in `ports` (a bit per port).
        Rules { ports: u8 },
        /// Time passes and idle flows go.
        Sweep { secs: u16 },
        /// Peer `owner` leaves.
        Take { owner: u8 },
        /// Peer `from` rotates its key to `to`'s.
        Reown { from: u8, to: u8 },
    }

    const PORTS: [u16; 4] = [22, 53, 80, 443];

    fn key(owner: u8) -> NodeKey {
        NodeKey::from_bytes([10 + owner % 3; 32])
    }

    /// Flow `flow` as this node opens it: from 100.64.0.1 to a peer's address, a protocol,
    /// a source and a destination port, all from `flow`'s bits.
    fn flow(flow: u8) -> FiveTuple {
        let udp = flow & 1 == 0;
        FiveTuple {
            proto: if udp { IpProto::UDP } else { IpProto::TCP },
            src: "100.64.0.1".parse().unwrap(),
            dst: IpAddr::from([100, 64, 0, 2 + (flow >> 1) % 2]),
            src_port: 40_000 + u16::from(flow >> 2 & 3),
            dst_port: PORTS[usize::from(flow >> 4 & 3)],
        }
    }

    fn transport(t: &FiveTuple, flags: u8) -> Transport {
        if t.proto == IpProto::UDP {
            return Transport::Udp;
        }
        let flags = [
            crate::packet::tcp_flags::SYN,
            crate::packet::tcp_flags::ACK,
            crate::packet::tcp_flags::SYN | crate::packet::tcp_flags::ACK,
            crate::packet::tcp_flags::RST,
        ][usize::from(flags % 4)];
        Transport::Tcp {
            flags,
            seq: 1000,
            ack: 0,
            seg_len: 1,
        }
    }

    fn rules(ports: u8) -> Filter {
        let rules: Vec<FilterRule> = PORTS
            .iter()
            .enumerate()
            .filter(|(i, _)| ports >> i & 1 == 1)
            .map(|(_, p)| FilterRule {
                protocols: vec![IpProto::UDP, IpProto::TCP],
                ..allow_port(*p, 0).rules()[0].clone()
            })
            .collect();
        Filter::new(rules, 0)
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (any::<u8>(), any::<u8>(), any::<u8>())
                .prop_map(|(owner, flow, flags)| Op::Out { owner, flow, flags }),
            6 => (any::<u8>(), any::<u8>(), any::<u8>(), proptest::bool::weighted(0.1))
                .prop_map(|(owner, flow, flags, exit)| Op::In { owner, flow, flags, exit }),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(owner, flow)| Op::Error { owner, flow }),
            1 => any::<u8>().prop_map(|ports| Op::Rules { ports }),
            1 => (0u16..2000).prop_map(|secs| Op::Sweep { secs }),
            1 => any::<u8>().prop_map(|owner| Op::Take { owner }),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(from, to)| Op::Reown { from, to }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The sharded gate agrees with one plain table and the rules, step by step, on
        /// every answer (let in or not, what new rules cut, what a leaving peer takes) and on
        /// what it holds, as long as no shard fills up (eviction is per shard by design).
        #[test]
        fn the_sharded_gate_agrees_with_one_plain_table(
            ops in proptest::collection::vec(op(), 1..300),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut now = crate::test_epoch();
            let gate = Gate::new(seed);
            let mut plain = Plain { table: FlowTable::default(), filter: Filter::default() };
            for op in ops {
                match op {
                    Op::Out { owner, flow: f, flags } => {
                        let t = flow(f);
                        let tr = transport(&t, flags);
                        gate.track_outbound(now, key(owner), &t, tr);
                        plain.table.track_outbound(now, key(owner), &t, tr);
                    }
                    Op::In { owner, flow: f, flags, exit } => {
                        let t = flow(f).reversed();
                        let tr = transport(&t, flags);
                        proptest::prop_assert_eq!(
                            gate.inbound(now, key(owner), &t, tr, exit),
                            plain.inbound(now, key(owner), &t, tr, exit),
                            "{:?}", op
                        );
                    }
                    Op::Error { owner, flow: f } => {
                        let q = flow(f);
                        let t = FiveTuple { proto: IpProto::ICMP, src_port: 0, dst_port: 0, ..q.reversed() };
                        let tr = Transport::IcmpError { quoted: Some(q) };
                        proptest::prop_assert_eq!(
                            gate.inbound(now, key(owner), &t, tr, false),
                            plain.inbound(now, key(owner), &t, tr, false),
                            "{:?}", op
                        );
                    }
                    Op::Rules { ports } => {
                        proptest::prop_assert_eq!(gate.set_filter(rules(ports)), plain.set_filter(rules(ports)));
                    }
                    Op::Sweep { secs } => {
                        now += std::time::Duration::from_secs(u64::from(secs));
                        gate.sweep(now);
                        plain.table.sweep(now);
                    }
                    Op::Take { owner } => {
                        proptest::prop_assert_eq!(gate.take_owner(&key(owner)), plain.table.take_owner(&key(owner)));
                    }
                    Op::Reown { from, to } => {
                        gate.reown(&key(from), key(to));
                        plain.table.reown(&key(from), key(to));
                    }
                }
                proptest::prop_assert_eq!(gate.len(), plain.table.len());
                for owner in 0..3 {
                    proptest::prop_assert_eq!(gate.owned_by(&key(owner)), plain.table.owned_by(&key(owner)));
                }
            }
            proptest::prop_assert_eq!(gate.evicted(), 0);
        }
    }
}
