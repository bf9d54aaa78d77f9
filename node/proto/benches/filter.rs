//! Packet-filter decisions per second on one core (`cargo bench -p node-proto --bench filter`).
//!
//! Three measurements, each over a realistic mix of TCP, UDP and ICMP packets from 1,000
//! source addresses, half of which some rule admits:
//! - rule evaluation (a new flow's first packet) with 10, 100 and 1,000 rules in force;
//! - the flow-table lookup every further packet of an established flow takes;
//! - the whole inbound decision (`PacketInfo::parse` + flow lookup + rules for new flows).
//!
//! Prints numbers; asserts nothing.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    missing_docs
)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use node_proto::conntrack::{FlowTable, Known};
use wire::NodeKey;

/// The peer every benchmarked flow belongs to.
const PEER: NodeKey = NodeKey::from_bytes([2; 32]);
use node_proto::filter::Filter;
use node_proto::packet::{FiveTuple, PacketInfo, Transport, tcp_flags};
use wire::IpProto;
use wire::filter::{Action, DstPorts, FilterRule, PortRange};

const ME: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const SOURCES: u32 = 1000;

/// xorshift64, so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn src(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 4, 0)) + i)
}

/// `n` rules of the shape a compiled policy sends one node: each names a handful of source
/// nodes (/32s) and one or two port ranges; one in ten is a deny rule.
fn rules(n: usize, rng: &mut Rng) -> Vec<FilterRule> {
    (0..n)
        .map(|i| {
            let srcs = (0..1 + rng.below(8))
                .map(|_| IpAddr::V4(src(rng.below(u64::from(SOURCES)) as u32)).into())
                .collect();
            let port = 1 + rng.below(60_000) as u16;
            let mut dst = vec![DstPorts {
                net: IpAddr::V4(ME).into(),
                ports: PortRange {
                    first: port,
                    last: port.saturating_add(rng.below(20) as u16),
                },
            }];
            if rng.below(2) == 0 {
                dst.push(DstPorts {
                    net: IpAddr::V4(ME).into(),
                    ports: PortRange {
                        first: 443,
                        last: 443,
                    },
                });
            }
            FilterRule {
                origin: format!("bench:{i}"),
                action: if i % 10 == 9 {
                    Action::Deny
                } else {
                    Action::Accept
                },
                src: srcs,
                dst,
                protocols: vec![],
                all_protocols: false,
                valid: None,
                cap_grants: Vec::new(),
            }
        })
        .collect()
}

fn tuples(n: usize, rules: &[FilterRule], rng: &mut Rng) -> Vec<FiveTuple> {
    (0..n)
        .map(|_| {
            // Half the packets aim at a port some rule names, from a source it names.
            let (s, port) = if rng.below(2) == 0 {
                let r = &rules[rng.below(rules.len() as u64) as usize];
                let ipnet::IpNet::V4(net) = r.src[0] else {
                    unreachable!()
                };
                (net.addr(), r.dst[0].ports.first)
            } else {
                (
                    src(rng.below(u64::from(SOURCES)) as u32),
                    1 + rng.below(65_000) as u16,
                )
            };
            let proto = match rng.below(10) {
                0..=5 => IpProto::TCP,
                6..=8 => IpProto::UDP,
                _ => IpProto::ICMP,
            };
            FiveTuple {
                proto,
                src: s.into(),
                dst: ME.into(),
                src_port: 30_000 + rng.below(30_000) as u16,
                dst_port: if proto == IpProto::ICMP { 0 } else { port },
            }
        })
        .collect()
}

/// Runs `f` over `items` repeatedly for about `budget`; returns operations per second.
fn rate<T>(items: &[T], budget: Duration, mut f: impl FnMut(&T)) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < budget {
        for it in items {
            f(it);
        }
        done += items.len() as u64;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn packet(t: &FiveTuple) -> Vec<u8> {
    let l4: Vec<u8> = match t.proto {
        IpProto::TCP => {
            let mut b = vec![0u8; 20];
            b[0..2].copy_from_slice(&t.src_port.to_be_bytes());
            b[2..4].copy_from_slice(&t.dst_port.to_be_bytes());
            b[12] = 5 << 4;
            b[13] = tcp_flags::ACK;
            b.extend_from_slice(&[0u8; 100]);
            b
        }
        IpProto::UDP => {
            let mut b = vec![0u8; 8];
            b[0..2].copy_from_slice(&t.src_port.to_be_bytes());
            b[2..4].copy_from_slice(&t.dst_port.to_be_bytes());
            b[4..6].copy_from_slice(&108u16.to_be_bytes());
            b.extend_from_slice(&[0u8; 100]);
            b
        }
        _ => vec![8, 0, 0, 0, 0, 7, 0, 1],
    };
    let (IpAddr::V4(s), IpAddr::V4(d)) = (t.src, t.dst) else {
        unreachable!()
    };
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, t.proto.0, 0, 0]);
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&l4);
    p
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    println!(
        "packet filter, one core, {} per measurement",
        humanize(budget)
    );
    println!(
        "{:<44} {:>14} {:>10}",
        "measurement", "decisions/s", "ns each"
    );
    let mut accepted_share = 0.0;
    for n in [10, 100, 1000] {
        let rs = rules(n, &mut rng);
        let ts = tuples(4096, &rs, &mut rng);
        let f = Filter::new(rs, 0);
        let acc = ts.iter().filter(|t| f.evaluate(t).is_accept()).count();
        if n == 100 {
            accepted_share = acc as f64 / ts.len() as f64;
        }
        let r = rate(&ts, budget, |t| {
            black_box(f.evaluate(black_box(t)));
        });
        report(&format!("rules only, {n} rules (new flows)"), r);
    }

    // Established flows: every packet is a flow-table hit.
    let rs = rules(100, &mut rng);
    let ts = tuples(4096, &rs, &mut rng);
    let now = Instant::now();
    let mut table = FlowTable::default();
    let ack = Transport::Tcp {
        flags: tcp_flags::ACK,
        seq: 1,
        ack: 1,
        seg_len: 100,
    };
    for t in &ts {
        table.admit_inbound(now, PEER, t, ack);
    }
    let r = rate(&ts, budget, |t| {
        let k = table.classify_inbound(now, PEER, black_box(t), ack);
        debug_assert_eq!(k, Known::Established);
        black_box(k);
    });
    report("flow-table hit (established flows)", r);

    // The whole decision for raw packets: parse, flow lookup, rules for new flows.
    let f = Filter::new(rs, 0);
    let packets: Vec<Vec<u8>> = ts.iter().map(packet).collect();
    let mut table = FlowTable::default();
    let r = rate(&packets, budget, |p| {
        let info = PacketInfo::parse(black_box(p)).unwrap();
        let admitted = match table.classify_inbound(now, PEER, &info.tuple, info.transport) {
            Known::New => {
                let v = f.evaluate(&info.tuple).is_accept();
                if v {
                    table.admit_inbound(now, PEER, &info.tuple, info.transport);
                }
                v
            }
            _ => true,
        };
        black_box(admitted);
    });
    report("parse + flows + 100 rules (mixed packets)", r);
    println!(
        "({:.0}% of generated packets are admitted by some rule)",
        accepted_share * 100.0
    );
}

fn report(what: &str, per_sec: f64) {
    println!("{what:<44} {:>14.0} {:>10.1}", per_sec, 1e9 / per_sec);
}

fn humanize(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
