//! The flow table: the stateful half of the packet filter.
//!
//! A flow is keyed by its 5-tuple as the initiator sent it, and belongs to the peer on its far
//! end (its *owner*, the peer the caller routed it to or received it from). Outbound flows
//! (this node opened them) let their replies in without consulting the rules; inbound flows (a
//! peer opened them, the rules admitted the first packet) can be re-checked when the rules
//! change. A flow the rules no longer allow is *cut*: it stays in the table as a tombstone so
//! that the local side answering it cannot turn it into an outbound flow whose "replies" would
//! pass, and further packets from the peer go to the rules again. For TCP the table follows
//! the next sequence number in each direction, so a cut flow can be reset on both ends. An ICMP
//! error is related to a flow only when it comes from the flow's own peer: nobody else can
//! reset or shrink it.
//!
//! Entries expire after a protocol-dependent idle time. The table is bounded, and so is each
//! peer's share of it: a peer at its quota loses its own oldest flow for a new one, and when
//! the whole table is full the peer holding the most flows loses its oldest. Eviction is O(1)
//! amortized: each peer's flows sit in a queue in the order they were opened, and a flow used
//! since it was queued gets a second chance at the back (the CLOCK approximation of LRU).

use std::collections::{BTreeSet, VecDeque};

use crate::FastMap;
use std::time::{Duration, Instant};

use wire::{IpProto, NodeKey};

use crate::packet::{FiveTuple, Transport, seq_after, tcp_flags};

/// Who opened a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This node.
    Outbound,
    /// A peer.
    Inbound,
    /// A peer, and the rules no longer allow it.
    Cut,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    owner: NodeKey,
    direction: Direction,
    last_seen: Instant,
    idle_timeout: Duration,
    /// TCP: the next sequence number expected from the initiator and from the responder.
    next_seq: [Option<u32>; 2],
    /// Its entry in the owner's queue.
    queued: u64,
    /// Used since it was queued (second chance).
    used: bool,
}

impl Flow {
    /// Records a TCP segment sent by the initiator (`from_initiator`) or the responder.
    fn saw(&mut self, from_initiator: bool, transport: Transport) {
        if let Transport::Tcp {
            flags,
            seq,
            seg_len,
            ..
        } = transport
        {
            if flags & tcp_flags::RST != 0 {
                return;
            }
            let end = seq.wrapping_add(seg_len);
            let slot = &mut self.next_seq[usize::from(!from_initiator)];
            if slot.is_none_or(|cur| seq_after(end, cur)) {
                *slot = Some(end);
            }
        }
    }
}

/// A flow that was cut, seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CutFlow {
    /// Transport protocol.
    pub proto: IpProto,
    /// The peer's address and port.
    pub peer: (std::net::IpAddr, u16),
    /// This node's address and port.
    pub local: (std::net::IpAddr, u16),
    /// TCP: the next sequence numbers of the peer and of this node, when both are known.
    pub tcp_next: Option<(u32, u32)>,
}

impl CutFlow {
    fn new(t: &FiveTuple, f: &Flow) -> Self {
        // Flows are keyed as their initiator sent them.
        let local_initiated = f.direction == Direction::Outbound;
        let (local, peer) = if local_initiated {
            ((t.src, t.src_port), (t.dst, t.dst_port))
        } else {
            ((t.dst, t.dst_port), (t.src, t.src_port))
        };
        let tcp_next = match f.next_seq {
            [Some(init), Some(resp)] if t.proto == IpProto::TCP => Some(if local_initiated {
                (resp, init)
            } else {
                (init, resp)
            }),
            _ => None,
        };
        Self {
            proto: t.proto,
            peer,
            local,
            tcp_next,
        }
    }
}

/// How an inbound packet relates to known flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// A reply within a flow this node opened.
    Reply,
    /// A further packet of a flow a peer opened and the rules admitted.
    Established,
    /// An ICMP error, from the flow's own peer, about a known flow.
    Related,
    /// Not part of any live flow: the rules decide.
    New,
}

/// Idle timeouts.
const TCP_IDLE: Duration = Duration::from_secs(30 * 60);
const UDP_IDLE: Duration = Duration::from_secs(120);
const ICMP_IDLE: Duration = Duration::from_secs(30);
const OTHER_IDLE: Duration = Duration::from_secs(120);
/// Default bound on tracked flows.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Default bound on one peer's flows (a quarter of the table).
pub const DEFAULT_PER_PEER: usize = DEFAULT_CAPACITY / 4;

fn idle_timeout(proto: IpProto) -> Duration {
    match proto {
        IpProto::TCP => TCP_IDLE,
        IpProto::UDP => UDP_IDLE,
        IpProto::ICMP | IpProto::ICMPV6 => ICMP_IDLE,
        _ => OTHER_IDLE,
    }
}

/// One peer's flows, oldest first (with stale entries skipped lazily).
#[derive(Debug, Default)]
struct Owned {
    count: usize,
    queue: VecDeque<(FiveTuple, u64)>,
}

/// See the module docs.
#[derive(Debug)]
pub struct FlowTable {
    // The hasher's per-process random keys only affect iteration order, which never reaches
    // any output: lookups are by key, eviction follows the queues and cut flows are sorted.
    flows: FastMap<FiveTuple, Flow>,
    owners: FastMap<NodeKey, Owned>,
    /// (flows held, owner), to find the peer holding the most.
    by_count: BTreeSet<(usize, NodeKey)>,
    capacity: usize,
    per_owner: usize,
    next_queued: u64,
    evicted: u64,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY, DEFAULT_PER_PEER)
    }
}

impl FlowTable {
    /// A table holding at most `capacity` flows, at most `per_owner` of them for one peer.
    pub fn new(capacity: usize, per_owner: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            flows: FastMap::default(),
            owners: FastMap::default(),
            by_count: BTreeSet::new(),
            capacity,
            per_owner: per_owner.clamp(1, capacity),
            next_queued: 0,
            evicted: 0,
        }
    }

    /// Number of tracked flows (cut ones included).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flows are tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Flows tracked for `owner`.
    pub fn owned_by(&self, owner: &NodeKey) -> usize {
        self.owners.get(owner).map_or(0, |o| o.count)
    }

    /// Flows evicted to make room so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Records a packet this node sends to `owner`.
    pub fn track_outbound(
        &mut self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
    ) {
        let closing = is_reset(transport);
        // A reply within a flow a peer opened refreshes that flow; a reply within a cut flow
        // keeps the tombstone alive and opens nothing.
        let rev = t.reversed();
        if let Some(f) = self.flows.get_mut(&rev)
            && f.direction != Direction::Outbound
        {
            f.last_seen = now;
            f.used = true;
            f.saw(false, transport);
            if closing && f.direction == Direction::Inbound {
                self.remove(&rev);
            }
            return;
        }
        if closing {
            self.remove(t);
            return;
        }
        self.upsert(now, owner, *t, Direction::Outbound, transport);
    }

    /// Classifies a packet arriving from peer `owner`, refreshing the flow it belongs to.
    pub fn classify_inbound(
        &mut self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
    ) -> Known {
        if let Transport::IcmpError { quoted: Some(q) } = transport {
            // The quoted packet is one this node sent: either it opened the flow (the quote is
            // the flow key) or it was replying in a flow the peer opened (the reversed quote).
            // Only the flow's own peer may report errors about it.
            let known = self
                .flows
                .get(&q)
                .is_some_and(|f| f.direction == Direction::Outbound && f.owner == owner)
                || self
                    .flows
                    .get(&q.reversed())
                    .is_some_and(|f| f.direction == Direction::Inbound && f.owner == owner);
            return if known { Known::Related } else { Known::New };
        }
        let closing = is_reset(transport);
        let rev = t.reversed();
        if let Some(f) = self.flows.get_mut(&rev)
            && f.direction == Direction::Outbound
            && f.owner == owner
        {
            f.last_seen = now;
            f.used = true;
            f.saw(false, transport);
            if closing {
                self.remove(&rev);
            }
            return Known::Reply;
        }
        if let Some(f) = self.flows.get_mut(t)
            && f.owner == owner
        {
            match f.direction {
                Direction::Inbound => {
                    f.last_seen = now;
                    f.used = true;
                    f.saw(true, transport);
                    if closing {
                        self.remove(t);
                    }
                    return Known::Established;
                }
                Direction::Cut => {
                    f.last_seen = now;
                    f.used = true;
                    f.saw(true, transport);
                }
                Direction::Outbound => {}
            }
        }
        Known::New
    }

    /// Records a new inbound flow from `owner` the rules admitted (replacing a cut one).
    pub fn admit_inbound(
        &mut self,
        now: Instant,
        owner: NodeKey,
        t: &FiveTuple,
        transport: Transport,
    ) {
        if is_reset(transport) || matches!(transport, Transport::IcmpEcho { request: false }) {
            return;
        }
        self.upsert(now, owner, *t, Direction::Inbound, transport);
    }

    /// Drops idle flows.
    pub fn sweep(&mut self, now: Instant) {
        let idle: Vec<FiveTuple> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last_seen) >= f.idle_timeout)
            .map(|(t, _)| *t)
            .collect();
        for t in idle {
            self.remove(&t);
        }
    }

    /// Cuts the inbound flows for which `keep` is false (outbound flows are untouched);
    /// returns them, sorted.
    pub fn retain_inbound(&mut self, mut keep: impl FnMut(&FiveTuple) -> bool) -> Vec<CutFlow> {
        let mut cut = Vec::new();
        for (t, f) in &mut self.flows {
            if f.direction == Direction::Inbound && !keep(t) {
                cut.push(CutFlow::new(t, f));
                f.direction = Direction::Cut;
            }
        }
        cut.sort();
        cut
    }

    /// Removes every flow of peer `owner` (it left the mesh or this node's view) and returns
    /// the live ones, sorted. Costs O(its flows), not O(the table).
    pub fn take_owner(&mut self, owner: &NodeKey) -> Vec<CutFlow> {
        let Some(o) = self.owners.get(owner) else {
            return Vec::new();
        };
        let tuples: Vec<FiveTuple> = o.queue.iter().map(|(t, _)| *t).collect();
        let mut taken = Vec::new();
        for t in tuples {
            if let Some(f) = self.flows.get(&t).filter(|f| f.owner == *owner).copied() {
                if f.direction != Direction::Cut {
                    taken.push(CutFlow::new(&t, &f));
                }
                self.remove(&t);
            }
        }
        taken.sort();
        taken
    }

    /// Hands `from`'s flows to `to` (a peer that rotated its key keeps its connections).
    pub fn reown(&mut self, from: &NodeKey, to: NodeKey) {
        if *from == to {
            return;
        }
        let Some(o) = self.owners.remove(from) else {
            return;
        };
        self.by_count.remove(&(o.count, *from));
        for (t, q) in o.queue {
            if let Some(f) = self.flows.get_mut(&t).filter(|f| f.queued == q) {
                f.owner = to;
                let n = self.owners.entry(to).or_default();
                self.by_count.remove(&(n.count, to));
                n.count += 1;
                n.queue.push_back((t, q));
                self.by_count.insert((n.count, to));
            }
        }
    }

    /// Records a packet its initiator sent in flow `t` of `owner`, opening the flow (in
    /// `direction`) if it is not there.
    fn upsert(
        &mut self,
        now: Instant,
        owner: NodeKey,
        t: FiveTuple,
        direction: Direction,
        transport: Transport,
    ) {
        if let Some(f) = self.flows.get_mut(&t)
            && f.owner == owner
        {
            // The usual case, a further packet of a known flow: one look-up.
            if f.direction != direction {
                f.direction = direction;
                f.next_seq = [None, None];
                f.idle_timeout = idle_timeout(t.proto);
            }
            f.last_seen = now;
            f.used = true;
            f.saw(true, transport);
            return;
        }
        // The address moved to another peer: the old peer's flow goes.
        self.remove(&t);
        if self.owned_by(&owner) >= self.per_owner {
            self.evict_from(now, owner);
        } else if self.flows.len() >= self.capacity {
            let biggest = self.by_count.last().map(|(_, o)| *o);
            if let Some(o) = biggest {
                self.evict_from(now, o);
            }
        }
        self.insert(now, owner, t, direction);
        if let Some(f) = self.flows.get_mut(&t) {
            f.saw(true, transport);
        }
    }

    fn insert(&mut self, now: Instant, owner: NodeKey, t: FiveTuple, direction: Direction) {
        let queued = self.next_queued;
        self.next_queued += 1;
        self.flows.insert(
            t,
            Flow {
                owner,
                direction,
                last_seen: now,
                idle_timeout: idle_timeout(t.proto),
                next_seq: [None, None],
                queued,
                used: false,
            },
        );
        let o = self.owners.entry(owner).or_default();
        self.by_count.remove(&(o.count, owner));
        o.count += 1;
        o.queue.push_back((t, queued));
        self.by_count.insert((o.count, owner));
        // Entries of flows removed by other means are skipped lazily; compact a queue that
        // has gathered too many of them.
        if o.queue.len() > 2 * o.count + 16 {
            let flows = &self.flows;
            o.queue
                .retain(|(t, q)| flows.get(t).is_some_and(|f| f.queued == *q));
        }
    }

    /// Evicts `owner`'s least recently used flow: an idle one if any has expired, else the
    /// oldest not used since it was queued.
    fn evict_from(&mut self, now: Instant, owner: NodeKey) {
        loop {
            let Some(o) = self.owners.get_mut(&owner) else {
                return;
            };
            let Some((t, q)) = o.queue.pop_front() else {
                return;
            };
            let Some(f) = self.flows.get_mut(&t).filter(|f| f.queued == q) else {
                continue;
            };
            let expired = now.saturating_duration_since(f.last_seen) >= f.idle_timeout;
            if f.used && !expired {
                // Second chance: to the back of the queue.
                f.used = false;
                f.queued = self.next_queued;
                self.next_queued += 1;
                o.queue.push_back((t, f.queued));
                continue;
            }
            self.remove(&t);
            self.evicted += 1;
            return;
        }
    }

    fn remove(&mut self, t: &FiveTuple) -> Option<Flow> {
        let f = self.flows.remove(t)?;
        if let Some(o) = self.owners.get_mut(&f.owner) {
            self.by_count.remove(&(o.count, f.owner));
            o.count -= 1;
            if o.count == 0 {
                self.owners.remove(&f.owner);
            } else {
                self.by_count.insert((o.count, f.owner));
            }
        }
        Some(f)
    }
}

fn is_reset(transport: Transport) -> bool {
    matches!(transport, Transport::Tcp { flags, .. } if flags & tcp_flags::RST != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: NodeKey = NodeKey::from_bytes([2; 32]);

    fn t(proto: IpProto, src: &str, sport: u16, dst: &str, dport: u16) -> FiveTuple {
        FiveTuple {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: sport,
            dst_port: dport,
        }
    }

    const SYN: Transport = tcp(tcp_flags::SYN, 1000, 0);
    const ACK: Transport = tcp(tcp_flags::ACK, 1001, 0);
    const RST: Transport = tcp(tcp_flags::RST, 0, 0);

    const fn tcp(flags: u8, seq: u32, seg_len: u32) -> Transport {
        Transport::Tcp {
            flags,
            seq,
            ack: 0,
            seg_len: if flags & tcp_flags::SYN != 0 {
                seg_len + 1
            } else {
                seg_len
            },
        }
    }

    #[test]
    fn replies_to_outbound_flows_are_known() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 22);
        ft.track_outbound(now, PEER, &out, SYN);
        assert_eq!(
            ft.classify_inbound(now, PEER, &out.reversed(), ACK),
            Known::Reply
        );
        // a different source port is not a reply
        let other = t(IpProto::TCP, "100.64.0.2", 23, "100.64.0.1", 40000);
        assert_eq!(ft.classify_inbound(now, PEER, &other, ACK), Known::New);
    }

    #[test]
    fn admitted_inbound_flows_are_established_and_our_replies_do_not_open_new_flows() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::TCP, "100.64.0.2", 50000, "100.64.0.1", 22);
        assert_eq!(ft.classify_inbound(now, PEER, &inb, SYN), Known::New);
        ft.admit_inbound(now, PEER, &inb, SYN);
        ft.track_outbound(now, PEER, &inb.reversed(), ACK);
        assert_eq!(ft.len(), 1);
        assert_eq!(
            ft.classify_inbound(now, PEER, &inb, ACK),
            Known::Established
        );
    }

    #[test]
    fn idle_flows_expire_per_protocol() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let udp = t(IpProto::UDP, "100.64.0.1", 1, "100.64.0.2", 53);
        let tcp = t(IpProto::TCP, "100.64.0.1", 2, "100.64.0.2", 22);
        ft.track_outbound(now, PEER, &udp, Transport::Udp);
        ft.track_outbound(now, PEER, &tcp, SYN);
        ft.sweep(now + Duration::from_secs(121));
        assert_eq!(
            ft.classify_inbound(now, PEER, &udp.reversed(), Transport::Udp),
            Known::New
        );
        assert_eq!(
            ft.classify_inbound(now, PEER, &tcp.reversed(), ACK),
            Known::Reply
        );
    }

    #[test]
    fn rst_closes_the_flow() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 22);
        ft.track_outbound(now, PEER, &out, SYN);
        assert_eq!(
            ft.classify_inbound(now, PEER, &out.reversed(), RST),
            Known::Reply
        );
        assert_eq!(
            ft.classify_inbound(now, PEER, &out.reversed(), ACK),
            Known::New
        );
    }

    #[test]
    fn icmp_errors_about_our_flows_are_related() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::UDP, "100.64.0.1", 1000, "100.64.0.2", 2000);
        ft.track_outbound(now, PEER, &out, Transport::Udp);
        let err = t(IpProto::ICMP, "100.64.0.2", 0, "100.64.0.1", 0);
        assert_eq!(
            ft.classify_inbound(now, PEER, &err, Transport::IcmpError { quoted: Some(out) }),
            Known::Related
        );
        let stranger = t(IpProto::UDP, "100.64.0.1", 1001, "100.64.0.2", 2000);
        assert_eq!(
            ft.classify_inbound(
                now,
                PEER,
                &err,
                Transport::IcmpError {
                    quoted: Some(stranger)
                }
            ),
            Known::New
        );
        assert_eq!(
            ft.classify_inbound(now, PEER, &err, Transport::IcmpError { quoted: None }),
            Known::New
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::new(3, 3);
        for p in 0..10u16 {
            let f = t(IpProto::UDP, "100.64.0.1", p, "100.64.0.2", 53);
            let at = now + Duration::from_millis(u64::from(p));
            ft.track_outbound(at, PEER, &f, Transport::Udp);
        }
        assert_eq!(ft.len(), 3);
        let newest = t(IpProto::UDP, "100.64.0.1", 9, "100.64.0.2", 53);
        assert_eq!(
            ft.classify_inbound(now, PEER, &newest.reversed(), Transport::Udp),
            Known::Reply
        );
        let oldest = t(IpProto::UDP, "100.64.0.1", 0, "100.64.0.2", 53);
        assert_eq!(
            ft.classify_inbound(now, PEER, &oldest.reversed(), Transport::Udp),
            Known::New
        );
    }

    #[test]
    fn retain_inbound_cuts_only_inbound_flows() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::TCP, "100.64.0.2", 50000, "100.64.0.1", 22);
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 80);
        ft.admit_inbound(now, PEER, &inb, SYN);
        ft.track_outbound(now, PEER, &out, SYN);
        let cut = ft.retain_inbound(|_| false);
        assert_eq!(cut.len(), 1);
        assert_eq!(
            (cut[0].peer, cut[0].local),
            ((inb.src, 50000), (inb.dst, 22))
        );
        assert_eq!(ft.classify_inbound(now, PEER, &inb, ACK), Known::New);
        assert_eq!(
            ft.classify_inbound(now, PEER, &out.reversed(), ACK),
            Known::Reply
        );
    }

    #[test]
    fn a_cut_flow_cannot_be_reopened_by_answering_it() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::UDP, "100.64.0.2", 5000, "100.64.0.1", 53);
        ft.admit_inbound(now, PEER, &inb, Transport::Udp);
        ft.retain_inbound(|_| false);
        // The local service keeps answering the peer...
        ft.track_outbound(now, PEER, &inb.reversed(), Transport::Udp);
        // ...which must not make the peer's packets "replies".
        assert_eq!(
            ft.classify_inbound(now, PEER, &inb, Transport::Udp),
            Known::New
        );
        // When the rules allow it again, it is a normal inbound flow.
        ft.admit_inbound(now, PEER, &inb, Transport::Udp);
        assert_eq!(
            ft.classify_inbound(now, PEER, &inb, Transport::Udp),
            Known::Established
        );
    }

    #[test]
    fn cut_tcp_flows_report_both_next_sequence_numbers() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::TCP, "100.64.0.2", 50000, "100.64.0.1", 22);
        ft.admit_inbound(now, PEER, &inb, tcp(tcp_flags::SYN, u32::MAX - 1, 0));
        // SYN-ACK from us, then data both ways (the peer's sequence wraps).
        ft.track_outbound(
            now,
            PEER,
            &inb.reversed(),
            tcp(tcp_flags::SYN | tcp_flags::ACK, 7000, 0),
        );
        ft.classify_inbound(now, PEER, &inb, tcp(tcp_flags::ACK, u32::MAX, 10));
        ft.track_outbound(now, PEER, &inb.reversed(), tcp(tcp_flags::ACK, 7001, 100));
        // A retransmission of older data does not move the numbers back.
        ft.classify_inbound(now, PEER, &inb, tcp(tcp_flags::ACK, u32::MAX, 5));
        let cut = ft.retain_inbound(|_| false);
        assert_eq!(cut[0].tcp_next, Some((9, 7101)));
    }

    #[test]
    fn taking_a_peers_flows_orients_them_from_this_node() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 80);
        ft.track_outbound(now, PEER, &out, tcp(tcp_flags::SYN, 100, 0));
        ft.classify_inbound(
            now,
            PEER,
            &out.reversed(),
            tcp(tcp_flags::SYN | tcp_flags::ACK, 900, 0),
        );
        let third = NodeKey::from_bytes([3; 32]);
        let other = t(IpProto::UDP, "100.64.0.1", 1, "100.64.0.3", 53);
        ft.track_outbound(now, third, &other, Transport::Udp);
        let taken = ft.take_owner(&PEER);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].local, (out.src, 40000));
        assert_eq!(taken[0].peer, (out.dst, 80));
        assert_eq!(taken[0].tcp_next, Some((901, 101)), "(peer's next, ours)");
        assert_eq!(ft.len(), 1);
    }

    #[test]
    fn icmp_errors_about_a_flow_count_only_from_its_own_peer() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let other = NodeKey::from_bytes([9; 32]);
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 443);
        ft.track_outbound(now, PEER, &out, SYN);
        let inb = t(IpProto::UDP, "100.64.0.2", 5000, "100.64.0.1", 53);
        ft.admit_inbound(now, PEER, &inb, Transport::Udp);
        // Another peer (one the rules would never let in) reports errors about both flows.
        let err = t(IpProto::ICMP, "100.64.0.9", 0, "100.64.0.1", 0);
        for q in [out, inb.reversed()] {
            let e = Transport::IcmpError { quoted: Some(q) };
            assert_eq!(ft.classify_inbound(now, other, &err, e), Known::New);
            assert_eq!(ft.classify_inbound(now, PEER, &err, e), Known::Related);
        }
        // Nor can it pass its packets off as replies within them.
        assert_eq!(
            ft.classify_inbound(now, other, &out.reversed(), ACK),
            Known::New
        );
        assert_eq!(
            ft.classify_inbound(now, other, &inb, Transport::Udp),
            Known::New
        );
    }

    fn udp_flow(peer: u8, port: u16) -> FiveTuple {
        t(
            IpProto::UDP,
            &format!("100.64.0.{peer}"),
            port,
            "100.64.0.1",
            53,
        )
    }

    #[test]
    fn one_peer_filling_the_table_evicts_only_its_own_flows() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::new(1000, 250);
        let peers: Vec<NodeKey> = (10..14).map(|i| NodeKey::from_bytes([i; 32])).collect();
        // Three quiet peers with a few flows each.
        for (i, p) in peers[1..].iter().enumerate() {
            for port in 0..20 {
                ft.admit_inbound(now, *p, &udp_flow(i as u8 + 11, port), Transport::Udp);
            }
        }
        // One peer opens 100,000 flows.
        let flood = peers[0];
        for port in 0..100_000u32 {
            let f = t(
                IpProto::UDP,
                "100.64.0.10",
                (port % 65_536) as u16,
                &format!("100.64.0.{}", 1 + port / 65_536),
                53,
            );
            ft.admit_inbound(now, flood, &f, Transport::Udp);
        }
        assert_eq!(ft.owned_by(&flood), 250, "held to its quota");
        for p in &peers[1..] {
            assert_eq!(ft.owned_by(p), 20, "another peer's flows were evicted");
        }
        for (i, p) in peers[1..].iter().enumerate() {
            assert_eq!(
                ft.classify_inbound(now, *p, &udp_flow(i as u8 + 11, 0), Transport::Udp),
                Known::Established
            );
        }
    }

    #[test]
    fn a_full_table_evicts_from_the_peer_holding_the_most_and_its_least_recently_used_first() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::new(100, 60);
        let (big, small) = (NodeKey::from_bytes([20; 32]), NodeKey::from_bytes([21; 32]));
        for port in 0..60 {
            ft.admit_inbound(now, big, &udp_flow(20, port), Transport::Udp);
        }
        for port in 0..40 {
            ft.admit_inbound(now, small, &udp_flow(21, port), Transport::Udp);
        }
        // The big peer's first flow is in use; its second is not.
        ft.classify_inbound(now, big, &udp_flow(20, 0), Transport::Udp);
        let newcomer = NodeKey::from_bytes([22; 32]);
        ft.admit_inbound(now, newcomer, &udp_flow(22, 1), Transport::Udp);
        assert_eq!(ft.len(), 100);
        assert_eq!((ft.owned_by(&big), ft.owned_by(&small)), (59, 40));
        assert_eq!(ft.evicted(), 1);
        assert_eq!(
            ft.classify_inbound(now, big, &udp_flow(20, 0), Transport::Udp),
            Known::Established,
            "the flow in use survived"
        );
        assert_eq!(
            ft.classify_inbound(now, big, &udp_flow(20, 1), Transport::Udp),
            Known::New,
            "the least recently used went"
        );
        // Taking a peer's flows takes exactly those.
        assert_eq!(ft.take_owner(&big).len(), 59);
        assert_eq!(ft.len(), 41);
    }
}
