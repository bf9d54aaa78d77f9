//! [`NodeState`]: the node's sans-IO state machine.
//!
//! Split by concern: this file holds the inputs, outputs and queries; `peers` the peer table
//! built from netmaps; `data` the WireGuard data path and packet filter; `keys` the
//! post-quantum key schedule and tunnel creation.

mod crypto;
mod data;
mod discovery;
mod keys;
mod peers;

pub use crypto::{Checks, CryptoDone, CryptoJob};
pub use peers::Traffic;
mod routes;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gotatun::noise::index_table::IndexTable;
use gotatun::packet::Packet;
use hybrid::StaticKeypair;
use rand::{Rng, SeedableRng};
use tracing::{debug, info};
use wire::netmap::{DnsConfig, MapResponse, Node, TunnelSecurity};
use wire::{NatInfo, NodeId, NodeKey, RelayId, RelayInfo};

use crate::FastMap;
use crate::addr::{Addr, SockId};
use crate::admission::Admission;
use crate::conntrack::CutFlow;
use crate::filter::Filter;
use crate::frame::Reassembly;
use crate::gate::Gate;
use crate::home::HomeRelay;
use crate::magicsock::{self, DatagramKind};
use crate::netcheck::{Netcheck, Report};
use crate::packet;
use crate::path::{Current, Local};
use crate::pq::PqConfig;
use crate::status::{Counters, PathKind, PathStatus, PeerStatus, Status};
use crate::strangers::Strangers;
use crate::wg;
use hybrid::ErasingRng;

use peers::Peer;

/// How often WireGuard's timers run.
const TIMER_TICK: Duration = wg::TIMER_GRANULARITY;
/// How often idle flows and stale session indices are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// At most one netcheck per this interval because a direct path went quiet.
const QUIET_NETCHECK: Duration = Duration::from_secs(2);
/// Handshake messages accepted per second from one source before it must show a cookie.
const HANDSHAKE_RATE_LIMIT: u32 = 100;

/// Static settings of the core.
#[derive(Clone)]
pub struct NodeConfig {
    /// The node's WireGuard private key (wiped when the config is dropped).
    pub private_key: zeroize::Zeroizing<[u8; 32]>,
    /// MTU of the TUN device (inner packets are padded up to it, never beyond).
    pub tun_mtu: u16,
    /// The post-quantum key schedule.
    pub pq: PqConfig,
    /// Wall-clock time (Unix milliseconds) at the `now` given to [`NodeState::new`]; the core
    /// derives its handshake epochs from it.
    pub wall_clock_ms: u64,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("private_key", &"<redacted>")
            .field("tun_mtu", &self.tun_mtu)
            .field("pq", &self.pq)
            .finish_non_exhaustive()
    }
}

/// A datagram to send: from one of the node's UDP sockets, or to a peer through a relay.
#[derive(Debug)]
pub struct Transmit {
    /// Destination.
    pub dst: Addr,
    /// Bytes to send.
    pub payload: Packet,
    /// An IP TTL (hop limit) other than the system's: a primer, which opens this node's own
    /// NAT mapping toward `dst` and dies on the way, before it reaches the peer's router.
    pub ttl: Option<u8>,
}

/// Something the shell may want to react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Peers, names or addresses changed (DNS and status readers should refresh).
    NetmapChanged,
    /// This node's overlay addresses changed (the shell configures the TUN device).
    AddressesChanged(Vec<IpAddr>),
    /// The subnets peers route for the mesh changed (the shell routes them into the TUN
    /// device), or the ones this node routes (the shell forwards them).
    RoutesChanged {
        /// Subnets reached through peers (their primary routes; no exit routes).
        via_peers: Vec<ipnet::IpNet>,
        /// Subnets this node serves (its approved routes; no exit routes).
        served: Vec<ipnet::IpNet>,
        /// Whether this node is an approved exit node.
        exit: bool,
    },
    /// A peer's path changed.
    PathChanged {
        /// The peer.
        peer: NodeId,
        /// Its new path.
        path: Current,
    },
    /// The relay list changed (the shell connects to every relay listed).
    RelaysChanged,
    /// This node's home relay changed (`None`: no relay is connected; logged by the shell).
    HomeRelay(Option<RelayId>),
    /// What the coordinator should know of this node changed: its home relay and its NAT
    /// (with the gateway port mapping). The shell sends it, or calls
    /// [`NodeState::netinfo_undelivered`] when it could not.
    ReportNetInfo {
        /// The home relay.
        home_relay: Option<RelayId>,
        /// The NAT as netcheck saw it (the default until a netcheck ran).
        nat: NatInfo,
    },
    /// How this node reaches each peer it has a tunnel with or is trying to reach, every
    /// few seconds (the shell reports it to the coordinator when it changed).
    PathReport(Vec<wire::PeerPath>),
    /// A pong answered a ping the user asked for ([`NodeState::ping`]).
    PingReply {
        /// The peer.
        peer: NodeId,
        /// Its name.
        name: String,
        /// Its IPv4 overlay address, if it has one.
        ipv4: Option<IpAddr>,
        /// The path the pong came back on: a direct address, or through a relay.
        from: Addr,
        /// The round trip.
        rtt: Duration,
    },
    /// A fresh relay ticket arrived (the shell hands it to its relay connections).
    RelayTicket(String),
    /// The nodes, not peers, that every relay should forward nothing from to this one
    /// changed: the whole list ([`crate::strangers`]; the shell sends it to its relays).
    RelayRefusals(Vec<NodeKey>),
    /// A netcheck finished with a different result (the shell advertises the public endpoint;
    /// what the coordinator is told follows as [`Event::ReportNetInfo`]).
    NetInfo(Report),
    /// The mesh's tunnel security changed (logged by the shell).
    TunnelSecurityChanged(TunnelSecurity),
    /// A post-quantum preshared key was installed for `peer` (a shell may record it in a
    /// debugging key log; its `Debug` never shows the key).
    PskInstalled {
        /// The peer.
        peer: NodeKey,
        /// The key.
        psk: hybrid::Psk,
    },
}

/// The node's data-plane state machine.
///
/// Call order (as quinn documents for `Connection`):
/// - feed inputs with `handle_netmap`, `handle_tun_packet`, `handle_datagram` and, when the
///   deadline from `poll_timeout` passes, `handle_timeout`;
/// - after any input, drain `poll_transmit` (UDP out), `poll_tun_write` (TUN out) and
///   `poll_event` until each returns `None`, then sleep until `poll_timeout`.
///
/// Every input takes `now`; the core never reads a clock.
pub struct NodeState {
    /// This node's WireGuard static key.
    identity: Arc<wg::Identity>,
    keypair: StaticKeypair,
    node_key: NodeKey,
    tun_mtu: u16,
    pq_config: PqConfig,
    started: Instant,
    wall_clock_ms: u64,
    /// Every random choice the core makes (erasing its key as it goes: [`ErasingRng`]).
    rng: ErasingRng,
    index_table: IndexTable<rand_09::rngs::StdRng>,
    /// mac1 on every handshake, cookies for sources over their limit.
    cookies: wg::cookie::Checker,

    self_node: Option<Node>,
    /// What the policy's `nodeAttrs` give this node.
    node_caps: BTreeMap<String, Vec<serde_json::Value>>,
    /// Subnets the policy steers through chosen routers (grants with `via`).
    via_routes: BTreeMap<ipnet::IpNet, Vec<NodeId>>,
    dns: Option<DnsConfig>,
    security: TunnelSecurity,
    /// Where addresses lead (copy-on-write: crypto jobs in flight may hold the old tables).
    routes: Arc<routes::Routes>,
    /// The exit node asked for with `--exit-node` (a name, FQDN or overlay address).
    exit_wanted: Option<String>,
    peers: BTreeMap<NodeKey, Peer>,
    by_id: BTreeMap<NodeId, NodeKey>,
    by_index: FastMap<u32, NodeKey>,
    /// Peers by the UDP addresses they are known at (checked against the peer's path on
    /// lookup, pruned by the sweep), so a packet from an address finds its peer in O(1).
    by_addr: FastMap<SocketAddr, NodeKey>,
    /// The packet filter and the flow table (crypto jobs check deliveries against them).
    gate: Arc<Gate>,
    reassembly: Reassembly,
    admission: Admission,
    /// The exchange in flight per session id (message 2s and cookies name it).
    pq_sessions: HashMap<u32, NodeKey>,
    relays: Vec<RelayInfo>,
    /// The relays connected and the home among them.
    home: HomeRelay,
    relay_ticket: Option<String>,
    /// (relay, peer) pairs a relay said it cannot deliver to, until when.
    relay_misses: FastMap<(RelayId, NodeKey), Instant>,
    /// Nodes that are not peers sending through relays, and those the relays are told to
    /// refuse.
    strangers: Strangers,
    netcheck: Netcheck,
    nat: Option<NatInfo>,
    /// The gateway port mapping the shell holds, if any.
    port_mapped: Option<SocketAddr>,
    /// What the coordinator was last told ([`Event::ReportNetInfo`]).
    netinfo_reported: Option<(Option<RelayId>, NatInfo)>,
    /// When a quiet direct path last asked for a netcheck.
    quiet_netcheck: Option<Instant>,

    transmits: VecDeque<Transmit>,
    tun_writes: VecDeque<Packet>,
    /// Crypto jobs for the shell (only with `crypto_outside`).
    crypto: VecDeque<CryptoJob>,
    crypto_outside: bool,
    events: VecDeque<Event>,
    next_tick: Instant,
    next_sweep: Instant,
    counters: Counters,
}

impl NodeState {
    /// A node with no peers yet. `seed` drives every random choice the core makes.
    pub fn new(config: NodeConfig, seed: [u8; 32], now: Instant) -> Self {
        let identity = Arc::new(wg::Identity::new(&config.private_key));
        let mut rng = ErasingRng::from_seed(seed);
        let index_table = IndexTable::from_rng(rand_09_rng(&mut rng));
        let node_key = NodeKey::from_bytes(identity.public());
        let admission = Admission::new(&node_key, &mut rng, now);
        let gate = Arc::new(Gate::new(rng.next_u64()));
        let cookies = wg::cookie::Checker::new(
            identity.public(),
            HANDSHAKE_RATE_LIMIT,
            rand::RngExt::random(&mut rng),
            now,
        );
        Self {
            node_key,
            keypair: StaticKeypair::from_secret(*config.private_key),
            identity,
            tun_mtu: config.tun_mtu,
            pq_config: config.pq,
            started: now,
            wall_clock_ms: config.wall_clock_ms,
            rng,
            index_table,
            cookies,
            self_node: None,
            node_caps: BTreeMap::new(),
            via_routes: BTreeMap::new(),
            dns: None,
            security: TunnelSecurity::PostQuantum,
            routes: Arc::default(),
            exit_wanted: None,
            peers: BTreeMap::new(),
            by_id: BTreeMap::new(),
            by_index: FastMap::default(),
            by_addr: FastMap::default(),
            gate,
            reassembly: Reassembly::default(),
            admission,
            pq_sessions: HashMap::new(),
            relays: Vec::new(),
            home: HomeRelay::default(),
            relay_ticket: None,
            relay_misses: FastMap::default(),
            strangers: Strangers::default(),
            netcheck: Netcheck::default(),
            nat: None,
            port_mapped: None,
            netinfo_reported: None,
            quiet_netcheck: None,
            transmits: VecDeque::new(),
            tun_writes: VecDeque::new(),
            crypto: VecDeque::new(),
            crypto_outside: false,
            events: VecDeque::new(),
            next_tick: now,
            next_sweep: now + SWEEP_INTERVAL,
            counters: Counters::default(),
        }
    }

    /// This node's WireGuard key.
    pub fn node_key(&self) -> NodeKey {
        self.node_key
    }

    // ---------------------------------------------------------------- inputs

    /// Applies a netmap message (full or delta).
    pub fn handle_netmap(&mut self, now: Instant, map: MapResponse) {
        if let Some(security) = map.tunnel_security
            && security != self.security
        {
            self.set_security(now, security);
        }
        if let Some(me) = map.node {
            if me.addresses != self.routes.local_addrs {
                self.routes_mut().local_addrs = me.addresses.clone();
                self.events
                    .push_back(Event::AddressesChanged(me.addresses.clone()));
            }
            self.self_node = Some(me);
        }
        if let Some(peers) = map.peers {
            let keep: BTreeSet<NodeId> = peers.iter().map(|p| p.id).collect();
            let gone: Vec<NodeId> = self
                .by_id
                .keys()
                .filter(|id| !keep.contains(id))
                .copied()
                .collect();
            for id in gone {
                self.remove_peer(now, id, true);
            }
            for p in peers {
                self.upsert_peer(now, p);
            }
        }
        for p in map.peers_changed {
            self.upsert_peer(now, p);
        }
        for id in map.peers_removed {
            self.remove_peer(now, id, true);
        }
        if let Some(rules) = map.packet_filter {
            let cut = self
                .gate
                .set_filter(Filter::new(rules, self.wall_secs(now)));
            self.cut_flows(now, cut, "new rules");
        }
        if let Some(dns) = map.dns {
            self.dns = Some(dns);
        }
        if let Some(caps) = map.node_caps {
            self.node_caps = caps;
        }
        if let Some(via) = map.via_routes {
            self.via_routes = via;
        }
        self.refresh_routes();
        let peers = &self.peers;
        if self.strangers.lift(|k| peers.contains_key(k)) {
            self.refusals_changed();
        }
        if let Some(relays) = map.relays
            && relays != self.relays
        {
            let stun: Vec<SocketAddr> =
                relays.iter().flat_map(|r| r.stun.iter().copied()).collect();
            self.netcheck.set_servers(now, stun);
            self.relays = relays;
            let listed = &self.relays;
            let change = self.home.retain(|id| listed.iter().any(|r| r.id == id));
            self.home_changed(change);
            self.events.push_back(Event::RelaysChanged);
        }
        if let Some(ticket) = map.relay_ticket
            && self.relay_ticket.as_ref() != Some(&ticket)
        {
            self.relay_ticket = Some(ticket.clone());
            self.events.push_back(Event::RelayTicket(ticket));
        }
        self.events.push_back(Event::NetmapChanged);
    }

    /// A packet the operating system wrote to the TUN device.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: Packet) {
        self.outbound(now, packet, None);
    }

    /// Packets the operating system wrote to the TUN device, in order: as
    /// [`NodeState::handle_tun_packet`] for each, except that a packet for the same
    /// destination as the one before it, which found its peer's tunnel, reuses that look-up
    /// (a TCP stream's packets come in runs).
    pub fn handle_tun_packets(&mut self, now: Instant, packets: impl IntoIterator<Item = Packet>) {
        let mut last = None;
        for p in packets {
            last = self.outbound(now, p, last.take());
        }
    }

    /// A datagram that arrived on one of the node's UDP sockets.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        sock: SockId,
        from: SocketAddr,
        datagram: Packet,
    ) {
        self.datagram(now, sock, from, datagram, None);
    }

    /// Datagrams that arrived on one of the node's UDP sockets, in order: as
    /// [`NodeState::handle_datagram`] for each, except that (with crypto outside) a data
    /// message for the same session from the same address as the one before it reuses that
    /// one's look-up of the peer and its tunnel (a stream's datagrams come in runs).
    pub fn handle_datagrams(
        &mut self,
        now: Instant,
        sock: SockId,
        datagrams: impl IntoIterator<Item = (SocketAddr, Packet)>,
    ) {
        let mut last = None;
        for (from, d) in datagrams {
            last = self.datagram(now, sock, from, d, last.take());
        }
    }

    fn datagram(
        &mut self,
        now: Instant,
        sock: SockId,
        from: SocketAddr,
        datagram: Packet,
        last: Option<data::Opening>,
    ) -> Option<data::Opening> {
        let addr = Addr::Udp(sock, from);
        match magicsock::classify(&datagram) {
            DatagramKind::WireGuard => return self.handle_wireguard(now, addr, datagram, last),
            DatagramKind::Frame => self.handle_frame(now, addr, &datagram),
            DatagramKind::Stun => {
                if sock != SockId::Main || !self.netcheck.handle_response(now, from, &datagram) {
                    self.counters.udp_unknown += 1;
                }
            }
            DatagramKind::Unknown => {
                self.counters.udp_unknown += 1;
            }
        }
        None
    }

    /// A packet from peer `src` arrived through relay `relay`.
    pub fn handle_relay_packet(
        &mut self,
        now: Instant,
        relay: RelayId,
        src: NodeKey,
        payload: Packet,
    ) {
        if !self.peers.contains_key(&src) {
            self.counters.relay_unknown_peer += 1;
            if self.strangers.packet(now, src) {
                self.counters.relay_strangers_refused += 1;
                self.refusals_changed();
            }
            return;
        }
        self.relay_misses.remove(&(relay, src));
        let addr = Addr::Relay(relay, src);
        match magicsock::classify(&payload) {
            DatagramKind::WireGuard => {
                self.handle_wireguard(now, addr, payload, None);
            }
            DatagramKind::Frame => self.handle_frame(now, addr, &payload),
            DatagramKind::Stun | DatagramKind::Unknown => {
                self.counters.udp_unknown += 1;
            }
        }
    }

    /// The shell's connection to `relay` came up or went down. The home relay follows
    /// ([`HomeRelay`]; [`Event::HomeRelay`] when it changes).
    pub fn relay_state(&mut self, now: Instant, relay: RelayId, up: bool) {
        let _ = now;
        if self.home.is_up(relay) != up {
            debug!(%relay, up, "relay connection");
        }
        let change = if up {
            self.home.connected_to(relay)
        } else {
            self.home.disconnected(relay)
        };
        self.home_changed(change);
    }

    /// A round trip to `relay` was measured on its connection; the home relay may move to it
    /// ([`HomeRelay::measured`]).
    pub fn relay_rtt(&mut self, relay: RelayId, rtt: Duration) {
        let change = self.home.measured(relay, rtt);
        self.home_changed(change);
    }

    fn home_changed(&mut self, change: crate::home::Change) {
        if let Some(home) = change {
            self.events.push_back(Event::HomeRelay(home));
            self.report_netinfo();
        }
    }

    /// The gateway port mapping the shell holds (NAT-PMP, PCP or UPnP), part of what the
    /// coordinator is told about this node's NAT.
    pub fn set_port_mapping(&mut self, mapped: Option<SocketAddr>) {
        if self.port_mapped != mapped {
            self.port_mapped = mapped;
            self.report_netinfo();
        }
    }

    /// The relays are to be told the new list of refused strangers ([`Event::RelayRefusals`]).
    fn refusals_changed(&mut self) {
        self.events
            .push_back(Event::RelayRefusals(self.strangers.refused()));
    }

    /// The endpoints this node advertises, given its interfaces' candidates `local` (best
    /// first): the gateway's port mapping first (it works for every peer), then `local`, then
    /// the public address the last netcheck saw when it does not depend on the destination.
    pub fn advertised_endpoints(&self, mut local: Vec<SocketAddr>) -> Vec<SocketAddr> {
        if let Some(m) = self.port_mapped
            && !local.contains(&m)
        {
            local.insert(0, m);
        }
        if let Some(p) = self.netcheck.last().and_then(|r| r.public_endpoint)
            && !local.contains(&p)
        {
            local.push(p);
        }
        local
    }

    /// What the coordinator is told of this node: its home relay, and its NAT with the port
    /// mapping (once a netcheck ran).
    pub fn netinfo(&self) -> (Option<RelayId>, Option<NatInfo>) {
        let nat = self.nat.clone().map(|mut n| {
            n.port_mapped = self.port_mapped;
            n
        });
        (self.home.home(), nat)
    }

    /// The shell could not deliver the last [`Event::ReportNetInfo`]: the next change reports
    /// it all again.
    pub fn netinfo_undelivered(&mut self) {
        self.netinfo_reported = None;
    }

    /// Reports [`NodeState::netinfo`] when it changed since it was last reported (and once
    /// there is something to report).
    fn report_netinfo(&mut self) {
        let (home_relay, nat) = self.netinfo();
        if home_relay.is_none() && nat.is_none() {
            return;
        }
        let now = (home_relay, nat.unwrap_or_default());
        if self.netinfo_reported.as_ref() == Some(&now) {
            return;
        }
        self.netinfo_reported = Some(now.clone());
        self.events.push_back(Event::ReportNetInfo {
            home_relay: now.0,
            nat: now.1,
        });
    }

    /// The home relay and the round trip to each connected relay.
    pub fn home_relay(&self) -> &HomeRelay {
        &self.home
    }

    /// Relay `relay` said `peer` is not connected to it: prefer another relay for a while.
    pub fn relay_peer_gone(&mut self, now: Instant, relay: RelayId, peer: NodeKey) {
        self.relay_misses
            .insert((relay, peer), now + Duration::from_secs(5));
    }

    /// Starts a netcheck now (`lattice netcheck`).
    pub fn start_netcheck(&mut self, now: Instant) {
        self.netcheck.trigger(now);
    }

    /// Runs timers whose deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let public_before = self.netcheck.last().and_then(|r| r.public_endpoint);
        let (requests, report) = self.netcheck.poll(now, &mut self.rng);
        for (server, req) in requests {
            self.transmits.push_back(Transmit {
                dst: Addr::main(server),
                payload: Packet::copy_from(&req),
                ttl: None,
            });
        }
        if let Some(r) = report {
            if self.nat.as_ref() != Some(&r.nat) {
                info!(udp = r.nat.udp, hard = r.nat.is_hard(), public = ?r.public_endpoint, "netcheck");
            }
            self.nat = Some(r.nat.clone());
            if r.public_endpoint != public_before {
                for p in self.peers.values_mut() {
                    p.path.own_endpoints_changed();
                }
            }
            self.events.push_back(Event::NetInfo(r));
            self.report_netinfo();
        }
        if now >= self.next_tick {
            self.next_tick = now + TIMER_TICK;
            self.relay_misses.retain(|_, until| *until > now);
            let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
            for key in keys {
                self.path_timers(now, key);
                self.pq_timers(now, key);
                let wall = Duration::from_millis(self.epoch(now));
                let Some(tunnel) = self.peers.get_mut(&key).and_then(|p| p.tunnel.as_mut()) else {
                    continue;
                };
                if let Some(wg) = tunnel.update_timers(now, wall) {
                    self.send_to_peer(now, key, wg);
                }
            }
        }
        let next_change = self.gate.filter().next_change();
        if let Some(change) = next_change {
            let wall = self.wall_secs(now);
            let changed = wall >= change && self.gate.filter_mut().refresh(wall);
            if changed {
                let cut = self.gate.recheck();
                self.cut_flows(now, cut, "a time window changed");
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.gate.sweep(now);
            let (table, peers) = (&self.index_table, &self.peers);
            self.by_index
                .retain(|idx, key| table.in_use(*idx) && peers.contains_key(key));
            self.admission.sweep(now);
            self.by_addr
                .retain(|a, key| peers.get(key).is_some_and(|p| p.path.knows(*a)));
            if self.strangers.sweep(now) {
                self.refusals_changed();
            }
            let report = self.path_report(now);
            self.events.push_back(Event::PathReport(report));
        }
    }

    // ---------------------------------------------------------------- outputs

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next packet to write to the TUN device.
    pub fn poll_tun_write(&mut self) -> Option<Packet> {
        self.tun_writes.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`NodeState::poll_event`] has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// When `handle_timeout` must next be called, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let mut base = if self.peers.is_empty() || self.next_sweep < self.next_tick {
            (self.next_sweep, "sweep")
        } else {
            (self.next_tick, "timers")
        };
        if let Some(t) = self.netcheck.deadline()
            && t < base.0
        {
            base = (t, "netcheck");
        }
        let next_change = self.gate.filter().next_change();
        match next_change.map(|t| self.instant_at(t)) {
            Some(at) if at < base.0 => Some((at, "rules")),
            _ => Some(base),
        }
    }

    // ---------------------------------------------------------------- queries

    /// A snapshot for `lattice status`.
    pub fn status(&self, now: Instant) -> Status {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| self.peer_status(now, p))
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        Status {
            self_node: self.self_node.clone(),
            node_key: self.node_key,
            domain: self.dns.as_ref().map(|d| d.domain.clone()),
            tunnel_security: self.security,
            peers,
            exit_node: self.exit_status(),
            node_caps: self.node_caps.clone(),
            flows: self.gate.len(),
            filter_rules: self.gate.filter().active_count(),
            relay_refused: self.strangers.refused(),
            counters: Counters {
                flows_evicted: self.gate.evicted(),
                ..self.counters
            },
        }
    }

    /// The path to every peer with a tunnel or an attempt at one, by peer id: what admins see.
    pub fn path_report(&self, now: Instant) -> Vec<wire::PeerPath> {
        let mut out: Vec<wire::PeerPath> = self
            .peers
            .values()
            .filter(|p| p.tunnel.is_some() || !p.waiting.is_empty() || p.pq_wanted)
            .map(|p| {
                let path = self.peer_path(now, p);
                wire::PeerPath {
                    peer: p.node.id,
                    kind: path.kind,
                    addr: path.addr,
                    relay: path.relay,
                    reason: path.reason,
                }
            })
            .collect();
        // The ones that are not direct first: they are what an admin looks for.
        out.sort_by_key(|p| (p.kind == PathKind::Direct, p.peer));
        out.truncate(wire::MAX_REPORTED_PATHS);
        out.sort_by_key(|p| p.peer);
        out
    }

    /// How `p` is reached now, and why not directly.
    fn peer_path(&self, now: Instant, p: &Peer) -> PathStatus {
        let pq = p.pq.status(now);
        let local = self.local_for(&p.node);
        let classical = self.security == TunnelSecurity::ClassicalOnly;
        // A tunnel whose first post-quantum key the peer has not confirmed carries nothing yet.
        let usable = p.tunnel.is_some() && (classical || pq.established);
        match (usable, p.path.current(now, local)) {
            (false, _) => PathStatus {
                kind: PathKind::None,
                addr: None,
                relay: None,
                reason: Some(match &pq.error {
                    Some(e) => format!("no tunnel: {e}"),
                    None if p.waiting.is_empty() && !p.pq_wanted => "no tunnel yet (idle)".into(),
                    None => "waiting for the post-quantum handshake".into(),
                }),
            },
            (true, Current::Direct(_, a)) => PathStatus {
                kind: PathKind::Direct,
                addr: Some(a),
                relay: None,
                reason: None,
            },
            (true, Current::Relay(r)) => PathStatus {
                kind: PathKind::Relay,
                addr: None,
                relay: Some(self.relay_name(r)),
                reason: Some(p.path.relay_reason(now, local)),
            },
            (true, Current::None) => PathStatus {
                kind: PathKind::None,
                addr: None,
                relay: None,
                reason: Some(if self.relays.is_empty() {
                    "no endpoint has answered yet and no relay is configured".into()
                } else {
                    "no endpoint has answered yet and no relay is connected".into()
                }),
            },
        }
    }

    fn peer_status(&self, now: Instant, p: &Peer) -> PeerStatus {
        let stats = p.tunnel.as_ref().map(|t| t.stats(now)).unwrap_or_default();
        let pq = p.pq.status(now);
        let classical = self.security == TunnelSecurity::ClassicalOnly;
        let path = self.peer_path(now, p);
        PeerStatus {
            routes: p.node.primary_routes.clone(),
            id: p.node.id,
            name: p.node.name.clone(),
            fqdn: p.node.fqdn.clone(),
            node_key: p.node.node_key,
            addresses: p.node.addresses.clone(),
            endpoints: p.node.endpoints.clone(),
            online: p.node.online,
            user: p.node.user.clone(),
            tags: p.node.tags.clone(),
            os: p.node.os.clone(),
            path,
            pq: !classical && pq.established && p.tunnel.is_some(),
            pq_psk_age: if classical { None } else { pq.psk_age },
            pq_handshakes: pq.handshakes,
            pq_chain_resets: pq.chain_resets,
            traffic: p.traffic,
            pq_error: if classical {
                Some("classical tunnels allowed by the mesh admin (tunnel_security = classical_only)".into())
            } else {
                pq.error
            },
            since_handshake: stats.since_handshake,
            since_rx: p
                .path
                .last_authenticated()
                .map(|t| now.saturating_duration_since(t)),
            handshakes: stats.handshakes,
            rx_bytes: stats.rx_bytes as u64,
            tx_bytes: stats.tx_bytes as u64,
        }
    }

    /// The node (this one or a peer) owning overlay address `ip`.
    pub fn whois(&self, ip: IpAddr) -> Option<&Node> {
        if let Some(me) = &self.self_node
            && me.addresses.contains(&ip)
        {
            return Some(me);
        }
        let key = self.routes.by_ip.get(&ip)?;
        self.peers.get(key).map(|p| &p.node)
    }

    /// What the policy's app grants let the node at `ip` do here (capability -> values).
    pub fn capabilities_of(&self, ip: IpAddr) -> BTreeMap<String, Vec<serde_json::Value>> {
        let peer = self
            .whois(ip)
            .map_or_else(|| vec![ip], |n| n.addresses.clone());
        self.gate
            .filter()
            .capabilities(&peer, &self.routes.local_addrs)
    }

    /// Names and addresses for the DNS resolver: this node and every peer.
    pub fn dns_records(&self) -> Vec<(String, Vec<IpAddr>)> {
        self.self_node
            .iter()
            .chain(self.peers.values().map(|p| &p.node))
            .map(|n| (n.name.clone(), n.addresses.clone()))
            .collect()
    }

    /// The whole netmap as currently applied, as one full message (for the on-disk cache that
    /// lets a restarted node work while the coordinator is unreachable).
    pub fn netmap_snapshot(&self) -> MapResponse {
        MapResponse {
            seq: 0,
            node: self.self_node.clone(),
            peers: Some(self.peers.values().map(|p| p.node.clone()).collect()),
            packet_filter: Some(self.gate.filter().rules().to_vec()),
            dns: self.dns.clone(),
            tunnel_security: Some(self.security),
            node_caps: Some(self.node_caps.clone()),
            via_routes: Some(self.via_routes.clone()),
            // A node restarted while the coordinator is away still reaches its relays, which
            // serve the nodes they served past their tickets during an outage.
            relays: Some(self.relays.clone()),
            relay_ticket: self.relay_ticket.clone(),
            ..MapResponse::default()
        }
    }

    /// The relays the coordinator listed.
    pub fn relays(&self) -> &[RelayInfo] {
        &self.relays
    }

    /// The current relay ticket (hex).
    pub fn relay_ticket(&self) -> Option<&str> {
        self.relay_ticket.as_deref()
    }

    /// The last netcheck.
    pub fn netcheck_report(&self) -> Option<&Report> {
        self.netcheck.last()
    }

    /// A relay's name, for status.
    pub fn relay_name(&self, id: RelayId) -> String {
        self.relays
            .iter()
            .find(|r| r.id == id)
            .map_or_else(|| id.to_string(), |r| r.name.clone())
    }

    /// The relay to reach `node` through: its home relay if connected (and it did not just
    /// say the peer is missing), else ours, else any connected relay.
    fn relay_for(&self, node: &Node) -> Option<RelayId> {
        let ok = |r: &RelayId| {
            self.home.is_up(*r) && !self.relay_misses.contains_key(&(*r, node.node_key))
        };
        node.home_relay
            .filter(ok)
            .or(self.home.home().filter(ok))
            .or_else(|| self.home.connected().find(|r| ok(r)))
            .or_else(|| node.home_relay.filter(|r| self.home.is_up(*r)))
    }

    /// Whether this node's public endpoint is still being measured: its first netcheck has
    /// not reported, and there is a STUN server to report.
    fn endpoints_pending(&self) -> bool {
        self.nat.is_none() && self.netcheck.has_servers()
    }

    fn local_for(&self, node: &Node) -> Local<'_> {
        Local {
            relay: self.relay_for(node),
            relays_known: !self.relays.is_empty(),
            nat: self.nat.as_ref(),
            endpoints_pending: self.endpoints_pending(),
        }
    }

    /// The mesh's DNS settings, once known.
    pub fn dns_config(&self) -> Option<&DnsConfig> {
        self.dns.as_ref()
    }

    /// The handshake epoch for `now`: wall-clock milliseconds, derived from the last clock
    /// reading the shell gave the core, so it only moves forward within a run.
    fn epoch(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started).as_millis();
        self.wall_clock_ms
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    /// Wall-clock Unix seconds at `now` (for rule validity).
    fn wall_secs(&self, now: Instant) -> i64 {
        i64::try_from(self.epoch(now) / 1000).unwrap_or(i64::MAX)
    }

    /// The instant at which the wall clock reads Unix second `t` (now or later).
    fn instant_at(&self, t: i64) -> Instant {
        let target_ms = u64::try_from(t).unwrap_or(0).saturating_mul(1000);
        self.started + Duration::from_millis(target_ms.saturating_sub(self.wall_clock_ms))
    }

    /// Re-anchors the core's wall clock on a fresh reading (the monotonic clock the core runs
    /// on stops while a machine sleeps; the wall clock does not). The clock never moves back,
    /// so handshake epochs stay increasing and an expired rule never comes back to life.
    /// Rules whose validity changed in the meantime take effect at once.
    pub fn sync_wall_clock(&mut self, now: Instant, wall_clock_ms: u64) {
        let current = self.epoch(now);
        if wall_clock_ms > current {
            self.started = now;
            self.wall_clock_ms = wall_clock_ms;
        }
    }

    /// Resets the inbound flows the rules in force no longer allow, which the gate cut.
    fn cut_flows(&mut self, now: Instant, cut: Vec<CutFlow>, why: &'static str) {
        if cut.is_empty() {
            return;
        }
        info!(
            flows = cut.len(),
            reason = why,
            "cut flows the rules no longer allow"
        );
        self.reset_flows(now, &cut);
    }

    /// Resets cut TCP flows on both ends (a RST to the local socket through the TUN, one to
    /// the peer through its tunnel), so neither side hangs on a dead connection. Other
    /// protocols have no such signal; their packets are simply no longer admitted.
    pub(super) fn reset_flows(&mut self, now: Instant, cut: &[CutFlow]) {
        self.counters.flows_cut += cut.len() as u64;
        for c in cut {
            let Some((peer_next, our_next)) = c.tcp_next else {
                continue;
            };
            if let Some(rst) = packet::tcp_reset(c.peer, c.local, peer_next, our_next) {
                self.tun_writes.push_back(Packet::copy_from(&rst));
            }
            if let Some(key) = self.routes.by_ip.get(&c.peer.0).copied()
                && let Some(rst) = packet::tcp_reset(c.local, c.peer, our_next, peer_next)
            {
                self.encapsulate(now, key, Packet::copy_from(&rst));
            }
        }
    }
}

fn rand_09_rng(rng: &mut impl Rng) -> rand_09::rngs::StdRng {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    <rand_09::rngs::StdRng as rand_09::SeedableRng>::from_seed(seed)
}

#[cfg(test)]
pub(crate) mod tests;
