//! The flow table: the stateful half of the packet filter.
//!
//! A flow is keyed by its 5-tuple as the initiator sent it. Outbound flows (this node opened
//! them) let their replies in without consulting the rules; inbound flows (a peer opened them,
//! the rules admitted the first packet) can be re-checked when the rules change. A flow the
//! rules no longer allow is *cut*: it stays in the table as a tombstone so that the local side
//! answering it cannot turn it into an outbound flow whose "replies" would pass, and further
//! packets from the peer go to the rules again. For TCP the table follows the next sequence
//! number in each direction, so a cut flow can be reset on both ends.
//!
//! Entries expire after a protocol-dependent idle time; the table is bounded and evicts the
//! least recently used entry when full.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wire::IpProto;

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
    direction: Direction,
    last_seen: Instant,
    idle_timeout: Duration,
    /// TCP: the next sequence number expected from the initiator and from the responder.
    next_seq: [Option<u32>; 2],
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
    /// An ICMP error about a known flow.
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

fn idle_timeout(proto: IpProto) -> Duration {
    match proto {
        IpProto::TCP => TCP_IDLE,
        IpProto::UDP => UDP_IDLE,
        IpProto::ICMP | IpProto::ICMPV6 => ICMP_IDLE,
        _ => OTHER_IDLE,
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct FlowTable {
    // The hasher's per-process random keys only affect iteration order, which never reaches
    // any output: lookups are by key, eviction breaks ties on the key and cut flows are sorted.
    flows: HashMap<FiveTuple, Flow>,
    capacity: usize,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl FlowTable {
    /// A table holding at most `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        Self {
            flows: HashMap::new(),
            capacity: capacity.max(1),
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

    /// Records a packet this node sends.
    pub fn track_outbound(&mut self, now: Instant, t: &FiveTuple, transport: Transport) {
        let closing = is_reset(transport);
        // A reply within a flow a peer opened refreshes that flow; a reply within a cut flow
        // keeps the tombstone alive and opens nothing.
        let rev = t.reversed();
        if let Some(f) = self.flows.get_mut(&rev)
            && f.direction != Direction::Outbound
        {
            f.last_seen = now;
            f.saw(false, transport);
            if closing && f.direction == Direction::Inbound {
                self.flows.remove(&rev);
            }
            return;
        }
        if closing {
            self.flows.remove(t);
            return;
        }
        let f = self.upsert(now, *t, Direction::Outbound);
        f.saw(true, transport);
    }

    /// Classifies a packet arriving from a peer, refreshing the flow it belongs to.
    pub fn classify_inbound(&mut self, now: Instant, t: &FiveTuple, transport: Transport) -> Known {
        if let Transport::IcmpError { quoted: Some(q) } = transport {
            // The quoted packet is one this node sent: either it opened the flow (the quote is
            // the flow key) or it was replying in a flow the peer opened (the reversed quote).
            let known = self
                .flows
                .get(&q)
                .is_some_and(|f| f.direction == Direction::Outbound)
                || self
                    .flows
                    .get(&q.reversed())
                    .is_some_and(|f| f.direction == Direction::Inbound);
            return if known { Known::Related } else { Known::New };
        }
        let closing = is_reset(transport);
        let rev = t.reversed();
        if let Some(f) = self.flows.get_mut(&rev)
            && f.direction == Direction::Outbound
        {
            f.last_seen = now;
            f.saw(false, transport);
            if closing {
                self.flows.remove(&rev);
            }
            return Known::Reply;
        }
        if let Some(f) = self.flows.get_mut(t) {
            match f.direction {
                Direction::Inbound => {
                    f.last_seen = now;
                    f.saw(true, transport);
                    if closing {
                        self.flows.remove(t);
                    }
                    return Known::Established;
                }
                Direction::Cut => {
                    f.last_seen = now;
                    f.saw(true, transport);
                }
                Direction::Outbound => {}
            }
        }
        Known::New
    }

    /// Records a new inbound flow the rules admitted (replacing a cut one).
    pub fn admit_inbound(&mut self, now: Instant, t: &FiveTuple, transport: Transport) {
        if is_reset(transport) || matches!(transport, Transport::IcmpEcho { request: false }) {
            return;
        }
        let f = self.upsert(now, *t, Direction::Inbound);
        f.saw(true, transport);
    }

    /// Drops idle flows.
    pub fn sweep(&mut self, now: Instant) {
        self.flows
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < f.idle_timeout);
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

    /// Removes every flow involving `ip` (a peer that left the mesh or this node's view) and
    /// returns the live ones, sorted.
    pub fn take_address(&mut self, ip: std::net::IpAddr) -> Vec<CutFlow> {
        let mut taken = Vec::new();
        self.flows.retain(|t, f| {
            if t.src != ip && t.dst != ip {
                return true;
            }
            if f.direction != Direction::Cut {
                taken.push(CutFlow::new(t, f));
            }
            false
        });
        taken.sort();
        taken
    }

    fn upsert(&mut self, now: Instant, t: FiveTuple, direction: Direction) -> &mut Flow {
        if !self.flows.contains_key(&t) && self.flows.len() >= self.capacity {
            self.sweep(now);
            if self.flows.len() >= self.capacity {
                let oldest = self
                    .flows
                    .iter()
                    .min_by_key(|(k, f)| (f.last_seen, **k))
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.flows.remove(&k);
                }
            }
        }
        let f = self.flows.entry(t).or_insert(Flow {
            direction,
            last_seen: now,
            idle_timeout: idle_timeout(t.proto),
            next_seq: [None, None],
        });
        if f.direction != direction {
            *f = Flow {
                direction,
                last_seen: now,
                idle_timeout: idle_timeout(t.proto),
                next_seq: [None, None],
            };
        }
        f.last_seen = now;
        f
    }
}

fn is_reset(transport: Transport) -> bool {
    matches!(transport, Transport::Tcp { flags, .. } if flags & tcp_flags::RST != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ft.track_outbound(now, &out, SYN);
        assert_eq!(ft.classify_inbound(now, &out.reversed(), ACK), Known::Reply);
        // a different source port is not a reply
        let other = t(IpProto::TCP, "100.64.0.2", 23, "100.64.0.1", 40000);
        assert_eq!(ft.classify_inbound(now, &other, ACK), Known::New);
    }

    #[test]
    fn admitted_inbound_flows_are_established_and_our_replies_do_not_open_new_flows() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::TCP, "100.64.0.2", 50000, "100.64.0.1", 22);
        assert_eq!(ft.classify_inbound(now, &inb, SYN), Known::New);
        ft.admit_inbound(now, &inb, SYN);
        ft.track_outbound(now, &inb.reversed(), ACK);
        assert_eq!(ft.len(), 1);
        assert_eq!(ft.classify_inbound(now, &inb, ACK), Known::Established);
    }

    #[test]
    fn idle_flows_expire_per_protocol() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let udp = t(IpProto::UDP, "100.64.0.1", 1, "100.64.0.2", 53);
        let tcp = t(IpProto::TCP, "100.64.0.1", 2, "100.64.0.2", 22);
        ft.track_outbound(now, &udp, Transport::Udp);
        ft.track_outbound(now, &tcp, SYN);
        ft.sweep(now + Duration::from_secs(121));
        assert_eq!(
            ft.classify_inbound(now, &udp.reversed(), Transport::Udp),
            Known::New
        );
        assert_eq!(ft.classify_inbound(now, &tcp.reversed(), ACK), Known::Reply);
    }

    #[test]
    fn rst_closes_the_flow() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 22);
        ft.track_outbound(now, &out, SYN);
        assert_eq!(ft.classify_inbound(now, &out.reversed(), RST), Known::Reply);
        assert_eq!(ft.classify_inbound(now, &out.reversed(), ACK), Known::New);
    }

    #[test]
    fn icmp_errors_about_our_flows_are_related() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::UDP, "100.64.0.1", 1000, "100.64.0.2", 2000);
        ft.track_outbound(now, &out, Transport::Udp);
        let err = t(IpProto::ICMP, "100.64.0.2", 0, "100.64.0.1", 0);
        assert_eq!(
            ft.classify_inbound(now, &err, Transport::IcmpError { quoted: Some(out) }),
            Known::Related
        );
        let stranger = t(IpProto::UDP, "100.64.0.1", 1001, "100.64.0.2", 2000);
        assert_eq!(
            ft.classify_inbound(
                now,
                &err,
                Transport::IcmpError {
                    quoted: Some(stranger)
                }
            ),
            Known::New
        );
        assert_eq!(
            ft.classify_inbound(now, &err, Transport::IcmpError { quoted: None }),
            Known::New
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::new(3);
        for p in 0..10u16 {
            let f = t(IpProto::UDP, "100.64.0.1", p, "100.64.0.2", 53);
            ft.track_outbound(
                now + Duration::from_millis(u64::from(p)),
                &f,
                Transport::Udp,
            );
        }
        assert_eq!(ft.len(), 3);
        let newest = t(IpProto::UDP, "100.64.0.1", 9, "100.64.0.2", 53);
        assert_eq!(
            ft.classify_inbound(now, &newest.reversed(), Transport::Udp),
            Known::Reply
        );
        let oldest = t(IpProto::UDP, "100.64.0.1", 0, "100.64.0.2", 53);
        assert_eq!(
            ft.classify_inbound(now, &oldest.reversed(), Transport::Udp),
            Known::New
        );
    }

    #[test]
    fn retain_inbound_cuts_only_inbound_flows() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::TCP, "100.64.0.2", 50000, "100.64.0.1", 22);
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 80);
        ft.admit_inbound(now, &inb, SYN);
        ft.track_outbound(now, &out, SYN);
        let cut = ft.retain_inbound(|_| false);
        assert_eq!(cut.len(), 1);
        assert_eq!(
            (cut[0].peer, cut[0].local),
            ((inb.src, 50000), (inb.dst, 22))
        );
        assert_eq!(ft.classify_inbound(now, &inb, ACK), Known::New);
        assert_eq!(ft.classify_inbound(now, &out.reversed(), ACK), Known::Reply);
    }

    #[test]
    fn a_cut_flow_cannot_be_reopened_by_answering_it() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::UDP, "100.64.0.2", 5000, "100.64.0.1", 53);
        ft.admit_inbound(now, &inb, Transport::Udp);
        ft.retain_inbound(|_| false);
        // The local service keeps answering the peer...
        ft.track_outbound(now, &inb.reversed(), Transport::Udp);
        // ...which must not make the peer's packets "replies".
        assert_eq!(ft.classify_inbound(now, &inb, Transport::Udp), Known::New);
        // When the rules allow it again, it is a normal inbound flow.
        ft.admit_inbound(now, &inb, Transport::Udp);
        assert_eq!(
            ft.classify_inbound(now, &inb, Transport::Udp),
            Known::Established
        );
    }

    #[test]
    fn cut_tcp_flows_report_both_next_sequence_numbers() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let inb = t(IpProto::TCP, "100.64.0.2", 50000, "100.64.0.1", 22);
        ft.admit_inbound(now, &inb, tcp(tcp_flags::SYN, u32::MAX - 1, 0));
        // SYN-ACK from us, then data both ways (the peer's sequence wraps).
        ft.track_outbound(
            now,
            &inb.reversed(),
            tcp(tcp_flags::SYN | tcp_flags::ACK, 7000, 0),
        );
        ft.classify_inbound(now, &inb, tcp(tcp_flags::ACK, u32::MAX, 10));
        ft.track_outbound(now, &inb.reversed(), tcp(tcp_flags::ACK, 7001, 100));
        // A retransmission of older data does not move the numbers back.
        ft.classify_inbound(now, &inb, tcp(tcp_flags::ACK, u32::MAX, 5));
        let cut = ft.retain_inbound(|_| false);
        assert_eq!(cut[0].tcp_next, Some((9, 7101)));
    }

    #[test]
    fn taking_a_peers_flows_orients_them_from_this_node() {
        let now = crate::test_epoch();
        let mut ft = FlowTable::default();
        let out = t(IpProto::TCP, "100.64.0.1", 40000, "100.64.0.2", 80);
        ft.track_outbound(now, &out, tcp(tcp_flags::SYN, 100, 0));
        ft.classify_inbound(
            now,
            &out.reversed(),
            tcp(tcp_flags::SYN | tcp_flags::ACK, 900, 0),
        );
        let other = t(IpProto::UDP, "100.64.0.1", 1, "100.64.0.3", 53);
        ft.track_outbound(now, &other, Transport::Udp);
        let taken = ft.take_address("100.64.0.2".parse().unwrap());
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].local, (out.src, 40000));
        assert_eq!(taken[0].peer, (out.dst, 80));
        assert_eq!(taken[0].tcp_next, Some((901, 101)), "(peer's next, ours)");
        assert_eq!(ft.len(), 1);
    }
}
