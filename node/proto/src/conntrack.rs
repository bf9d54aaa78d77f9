//! The flow table: the stateful half of the packet filter.
//!
//! A flow is keyed by its 5-tuple as the initiator sent it. Outbound flows (this node opened
//! them) let their replies in without consulting the rules; inbound flows (a peer opened them,
//! the rules admitted the first packet) remember which rule admitted them so they can be
//! re-checked when rules change. Entries expire after a protocol-dependent idle time; the table
//! is bounded and evicts the least recently used entry when full.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wire::IpProto;

use crate::packet::{FiveTuple, Transport, tcp_flags};

/// Who opened a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This node.
    Outbound,
    /// A peer.
    Inbound,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    direction: Direction,
    last_seen: Instant,
    idle_timeout: Duration,
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
    /// Not part of any known flow: the rules decide.
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
    // any output: lookups are by key and eviction breaks ties on the key.
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

    /// Number of tracked flows.
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
        // A reply within a flow a peer opened refreshes that flow.
        let rev = t.reversed();
        if let Some(f) = self.flows.get_mut(&rev)
            && f.direction == Direction::Inbound
        {
            if closing {
                self.flows.remove(&rev);
            } else {
                f.last_seen = now;
            }
            return;
        }
        if closing {
            self.flows.remove(t);
            return;
        }
        self.upsert(now, *t, Direction::Outbound);
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
            if closing {
                self.flows.remove(&rev);
            }
            return Known::Reply;
        }
        if let Some(f) = self.flows.get_mut(t)
            && f.direction == Direction::Inbound
        {
            f.last_seen = now;
            if closing {
                self.flows.remove(t);
            }
            return Known::Established;
        }
        Known::New
    }

    /// Records a new inbound flow the rules admitted.
    pub fn admit_inbound(&mut self, now: Instant, t: &FiveTuple, transport: Transport) {
        if is_reset(transport) || matches!(transport, Transport::IcmpEcho { request: false }) {
            return;
        }
        self.upsert(now, *t, Direction::Inbound);
    }

    /// Drops idle flows.
    pub fn sweep(&mut self, now: Instant) {
        self.flows
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < f.idle_timeout);
    }

    /// Keeps only the inbound flows for which `keep` holds (outbound flows are untouched);
    /// returns the flows that were cut.
    pub fn retain_inbound(&mut self, mut keep: impl FnMut(&FiveTuple) -> bool) -> Vec<FiveTuple> {
        let mut cut = Vec::new();
        self.flows.retain(|t, f| {
            if f.direction == Direction::Outbound || keep(t) {
                true
            } else {
                cut.push(*t);
                false
            }
        });
        cut.sort();
        cut
    }

    /// Forgets every flow involving `ip` (a peer that went away).
    pub fn forget_address(&mut self, ip: std::net::IpAddr) {
        self.flows.retain(|t, _| t.src != ip && t.dst != ip);
    }

    fn upsert(&mut self, now: Instant, t: FiveTuple, direction: Direction) {
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
        self.flows.insert(
            t,
            Flow {
                direction,
                last_seen: now,
                idle_timeout: idle_timeout(t.proto),
            },
        );
    }
}

fn is_reset(transport: Transport) -> bool {
    matches!(transport, Transport::Tcp { flags } if flags & tcp_flags::RST != 0)
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

    const SYN: Transport = Transport::Tcp {
        flags: tcp_flags::SYN,
    };
    const ACK: Transport = Transport::Tcp {
        flags: tcp_flags::ACK,
    };
    const RST: Transport = Transport::Tcp {
        flags: tcp_flags::RST,
    };

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
        assert_eq!(cut, vec![inb]);
        assert_eq!(ft.len(), 1);
    }
}
