//! A deterministic network simulator for the sans-IO core: virtual time, NAT boxes, a relay,
//! STUN servers, and links with delay, jitter (reordering) and loss. It plays the coordinator
//! too: when a node's netcheck reports a public endpoint and NAT behaviour, its peers' netmaps
//! are updated, as the real coordinator does from `Endpoints` and `NetInfo` messages.

mod nat;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use gotatun::packet::Packet;
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};
use wire::netmap::{MapResponse, Node};
use wire::{NatInfo, RelayId, RelayInfo, RelayKey};

use crate::addr::{Addr, SockId};
use crate::state::tests::{allow_all, config, node, public_key};
use crate::{Event, NodeState};

pub(crate) use nat::{NatBox, NatKind};

/// The relay's id in simulations.
pub(crate) const RELAY: RelayId = RelayId(0);
const MAIN_PORT: u16 = 41641;
const AUX_BASE: u16 = 50000;

/// Link behaviour (every hop through the internet).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    pub(crate) latency: Duration,
    pub(crate) jitter: Duration,
    pub(crate) loss: f64,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }
}

/// One simulated node and the network around it.
pub(crate) struct Host {
    pub(crate) node: NodeState,
    /// Private (or, without a NAT, public) IP.
    pub(crate) ip: IpAddr,
    pub(crate) nat: Option<NatBox>,
    /// Packets written to its TUN device.
    pub(crate) received: Vec<Vec<u8>>,
    /// Whether its relay connection is up.
    pub(crate) relay_up: bool,
    /// The netmap's view of it (endpoints, NAT).
    pub(crate) wire_node: Node,
    /// The paths it last reported to the coordinator.
    pub(crate) reported_paths: Vec<wire::PeerPath>,
}

#[derive(Debug)]
enum Delivery {
    /// A UDP datagram arriving at a public address.
    Udp {
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// A packet the relay delivers to a host.
    Relay {
        to: usize,
        src: usize,
        bytes: Vec<u8>,
    },
    /// The relay says a destination is not connected.
    Gone { to: usize, missing: usize },
}

/// The simulated world.
pub(crate) struct Sim {
    pub(crate) now: Instant,
    pub(crate) rng: StdRng,
    pub(crate) hosts: Vec<Host>,
    pub(crate) link: Link,
    pub(crate) stun: Vec<SocketAddr>,
    /// Whether the relay forwards at all.
    pub(crate) relay_enabled: bool,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    pending: BTreeMap<usize, Delivery>,
    seq: u64,
    next_id: usize,
    /// Datagrams that crossed the internet (for assertions), by kind.
    pub(crate) udp_sent: u64,
    pub(crate) relayed: u64,
    /// Every UDP datagram delivered: (from, to, bytes).
    pub(crate) tap: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

impl Sim {
    /// A world with `kinds.len()` nodes, node `i` behind `kinds[i]` (or on a public address).
    pub(crate) fn new(seed: u64, kinds: &[Option<NatKind>], link: Link) -> Self {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(seed);
        let stun = vec![
            "192.0.2.1:3478".parse().unwrap(),
            "192.0.2.2:3478".parse().unwrap(),
        ];
        let relay = RelayInfo {
            id: RELAY,
            name: "sim-relay".into(),
            key: RelayKey::from_bytes([9; 32]),
            quic: None,
            cert_sha256: None,
            websocket: None,
            stun: stun.clone(),
        };
        let mut hosts = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let (ip, nat) = match kind {
                None => (IpAddr::V4(Ipv4Addr::new(198, 51, 100, i as u8 + 10)), None),
                Some(k) => (
                    IpAddr::V4(Ipv4Addr::new(10, i as u8 + 1, 0, 2)),
                    Some(NatBox::new(
                        *k,
                        IpAddr::V4(Ipv4Addr::new(203, 0, 113, i as u8 + 10)),
                    )),
                ),
            };
            let mut seed_bytes = [0u8; 32];
            rng.fill_bytes(&mut seed_bytes);
            let node_state = NodeState::new(config(i, 0), seed_bytes, now);
            let wn = node(i, vec![SocketAddr::new(ip, MAIN_PORT)]);
            hosts.push(Host {
                node: node_state,
                ip,
                nat,
                received: Vec::new(),
                relay_up: true,
                wire_node: wn,
                reported_paths: Vec::new(),
            });
        }
        let mut sim = Self {
            now,
            rng,
            hosts,
            link,
            stun,
            relay_enabled: true,
            queue: BinaryHeap::new(),
            pending: BTreeMap::new(),
            seq: 0,
            next_id: 0,
            udp_sent: 0,
            relayed: 0,
            tap: Vec::new(),
        };
        let n = sim.hosts.len();
        for i in 0..n {
            let peers: Vec<Node> = (0..n)
                .filter(|j| *j != i)
                .map(|j| sim.hosts[j].wire_node.clone())
                .collect();
            let me = sim.hosts[i].wire_node.clone();
            let now = sim.now;
            let h = &mut sim.hosts[i];
            h.node.handle_netmap(
                now,
                MapResponse {
                    seq: 1,
                    node: Some(me),
                    peers: Some(peers),
                    packet_filter: Some(allow_all(i)),
                    relays: Some(vec![relay.clone()]),
                    relay_ticket: Some("00".into()),
                    ..Default::default()
                },
            );
            h.node.relay_state(now, RELAY, true);
        }
        sim.drain_all();
        sim
    }

    fn schedule(&mut self, at: Instant, d: Delivery) {
        let id = self.next_id;
        self.next_id += 1;
        self.seq += 1;
        self.pending.insert(id, d);
        self.queue.push(Reverse((at, self.seq, id)));
    }

    fn hop_delay(&mut self) -> Duration {
        let j = self.link.jitter.as_micros() as u64;
        let extra = if j == 0 {
            0
        } else {
            self.rng.random_range(0..=j)
        };
        self.link.latency + Duration::from_micros(extra)
    }

    fn lost(&mut self) -> bool {
        self.link.loss > 0.0 && self.rng.random_bool(self.link.loss)
    }

    /// The internal address of host `i`'s socket `sock`.
    fn internal(&self, i: usize, sock: SockId) -> SocketAddr {
        let port = match sock {
            SockId::Main => MAIN_PORT,
            SockId::Aux(n) => AUX_BASE + n,
        };
        SocketAddr::new(self.hosts[i].ip, port)
    }

    /// Sends what node `i` has queued and handles its events.
    fn drain(&mut self, i: usize) {
        while let Some(t) = self.hosts[i].node.poll_transmit() {
            match t.dst {
                Addr::Udp(sock, dst) => {
                    let internal = self.internal(i, sock);
                    let public = match &mut self.hosts[i].nat {
                        None => Some(internal),
                        Some(nat) => nat.outbound(internal, dst, &mut self.rng),
                    };
                    let Some(from) = public else { continue };
                    // Every two sites are at least one router apart: a primer opens its
                    // sender's NAT (above) and dies there.
                    if t.ttl.is_some_and(|ttl| ttl <= 2) {
                        continue;
                    }
                    self.udp_sent += 1;
                    if self.lost() {
                        continue;
                    }
                    let at = self.now + self.hop_delay();
                    self.schedule(
                        at,
                        Delivery::Udp {
                            from,
                            to: dst,
                            bytes: t.payload.to_vec(),
                        },
                    );
                }
                Addr::Relay(_, key) => {
                    if !self.relay_enabled || !self.hosts[i].relay_up {
                        continue;
                    }
                    let Some(to) = self.hosts.iter().position(|h| h.node.node_key() == key) else {
                        continue;
                    };
                    self.relayed += 1;
                    // Relay traffic rides TCP/QUIC: no loss, two hops of delay.
                    let at = self.now + self.link.latency * 2;
                    if self.hosts[to].relay_up {
                        self.schedule(
                            at,
                            Delivery::Relay {
                                to,
                                src: i,
                                bytes: t.payload.to_vec(),
                            },
                        );
                    } else {
                        self.schedule(at, Delivery::Gone { to: i, missing: to });
                    }
                }
            }
        }
        while let Some(tw) = self.hosts[i].node.poll_tun_write() {
            self.hosts[i].received.push(tw.to_vec());
        }
        while let Some(ev) = self.hosts[i].node.poll_event() {
            match ev {
                Event::NetInfo(report) => self.publish_netinfo(i, report.nat.clone()),
                Event::PathReport(paths) => self.hosts[i].reported_paths = paths,
                _ => {}
            }
        }
    }

    fn drain_all(&mut self) {
        for i in 0..self.hosts.len() {
            self.drain(i);
        }
    }

    /// What the coordinator does with a node's netcheck: new endpoints and NAT info for its
    /// peers.
    fn publish_netinfo(&mut self, i: usize, nat: NatInfo) {
        let local = vec![self.internal(i, SockId::Main)];
        let endpoints = self.hosts[i].node.advertised_endpoints(local);
        let wn = &mut self.hosts[i].wire_node;
        if wn.endpoints == endpoints && wn.nat.as_ref() == Some(&nat) {
            return;
        }
        wn.endpoints = endpoints;
        wn.nat = Some(nat);
        let changed = wn.clone();
        for j in 0..self.hosts.len() {
            let now = self.now;
            let m = if j == i {
                MapResponse {
                    seq: 2,
                    node: Some(changed.clone()),
                    ..Default::default()
                }
            } else {
                MapResponse {
                    seq: 2,
                    peers_changed: vec![changed.clone()],
                    ..Default::default()
                }
            };
            self.hosts[j].node.handle_netmap(now, m);
        }
    }

    fn deliver(&mut self, d: Delivery) {
        match d {
            Delivery::Udp { from, to, bytes } => {
                if self.tap.len() < 100_000 {
                    self.tap.push((from, to, bytes.clone()));
                }
                if self.stun.contains(&to) {
                    if let Some(resp) = relay::stun::answer(&bytes, from)
                        && !self.lost()
                    {
                        let at = self.now + self.hop_delay();
                        self.schedule(
                            at,
                            Delivery::Udp {
                                from: to,
                                to: from,
                                bytes: resp,
                            },
                        );
                    }
                    return;
                }
                // Which host owns `to`, and which socket inside it?
                for i in 0..self.hosts.len() {
                    let host_ip = self.hosts[i].ip;
                    let internal = match &mut self.hosts[i].nat {
                        Some(nat) if nat.public_ip() == to.ip() => nat.inbound(to.port(), from),
                        None if host_ip == to.ip() => Some(to),
                        _ => continue,
                    };
                    let Some(internal) = internal else { return };
                    let sock = if internal.port() == MAIN_PORT {
                        SockId::Main
                    } else {
                        SockId::Aux(internal.port() - AUX_BASE)
                    };
                    let now = self.now;
                    self.hosts[i]
                        .node
                        .handle_datagram(now, sock, from, Packet::copy_from(&bytes));
                    self.drain(i);
                    return;
                }
            }
            Delivery::Relay { to, src, bytes } => {
                let key = self.hosts[src].node.node_key();
                let now = self.now;
                self.hosts[to]
                    .node
                    .handle_relay_packet(now, RELAY, key, Packet::copy_from(&bytes));
                self.drain(to);
            }
            Delivery::Gone { to, missing } => {
                let key = self.hosts[missing].node.node_key();
                let now = self.now;
                self.hosts[to].node.relay_peer_gone(now, RELAY, key);
            }
        }
    }

    /// Runs the world for `d` of virtual time.
    pub(crate) fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_delivery = self.queue.peek().map(|Reverse((t, _, _))| *t);
            let next_timer = self
                .hosts
                .iter()
                .filter_map(|h| h.node.poll_timeout().map(|(t, _)| t))
                .min();
            let next = match (next_delivery, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(end),
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            while let Some(Reverse((t, _, id))) = self.queue.peek().copied() {
                if t > self.now {
                    break;
                }
                self.queue.pop();
                if let Some(d) = self.pending.remove(&id) {
                    self.deliver(d);
                }
            }
            for i in 0..self.hosts.len() {
                if self.hosts[i]
                    .node
                    .poll_timeout()
                    .is_some_and(|(t, _)| t <= self.now)
                {
                    let now = self.now;
                    self.hosts[i].node.handle_timeout(now);
                    self.drain(i);
                }
            }
        }
    }

    /// Node `from` sends one ICMP echo to node `to` through its TUN device.
    pub(crate) fn ping(&mut self, from: usize, to: usize, id: u16) {
        let p = crate::packet::tests::ipv4(
            v4(from),
            v4(to),
            1,
            &crate::packet::tests::icmp_echo(true, id, false),
        );
        let now = self.now;
        self.hosts[from]
            .node
            .handle_tun_packet(now, Packet::copy_from(&p));
        self.drain(from);
    }

    /// How many of `to`'s received packets are echo requests from `from` with `id`.
    pub(crate) fn got(&self, to: usize, from: usize, id: u16) -> bool {
        let p = crate::packet::tests::ipv4(
            v4(from),
            v4(to),
            1,
            &crate::packet::tests::icmp_echo(true, id, false),
        );
        self.hosts[to].received.contains(&p)
    }

    /// Delivers a datagram to host `i`'s main socket as if from `from`.
    pub(crate) fn inject(&mut self, i: usize, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        self.hosts[i]
            .node
            .handle_datagram(now, SockId::Main, from, Packet::copy_from(bytes));
        self.drain(i);
    }

    /// The direct address node `i` reaches node `j` at, if direct.
    pub(crate) fn path_addr(&self, i: usize, j: usize) -> Option<SocketAddr> {
        let st = self.hosts[i].node.status(self.now);
        st.peers
            .iter()
            .find(|p| p.node_key == public_key(j))
            .and_then(|p| p.path.addr)
    }

    /// How node `i` reaches node `j` now.
    pub(crate) fn path(&self, i: usize, j: usize) -> (crate::status::PathKind, Option<String>) {
        let st = self.hosts[i].node.status(self.now);
        let p = st
            .peers
            .iter()
            .find(|p| p.node_key == public_key(j))
            .expect("peer known");
        (p.path.kind, p.path.reason.clone())
    }

    /// The direct address node `i` uses for node `j`, if any.
    pub(crate) fn direct_addr(&self, i: usize, j: usize) -> Option<SocketAddr> {
        let st = self.hosts[i].node.status(self.now);
        st.peers
            .iter()
            .find(|p| p.node_key == public_key(j))?
            .path
            .addr
    }
}

fn v4(i: usize) -> [u8; 4] {
    [100, 64, 0, i as u8 + 1]
}
