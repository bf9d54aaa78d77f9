//! [`NodeState`]: the node's sans-IO state machine.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{TunnResult, errors::WireGuardError};
use gotatun::packet::{Packet, WgKind};
use gotatun::x25519::{PublicKey, StaticSecret};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tracing::{debug, trace};
use wire::netmap::{DnsConfig, MapResponse, Node};
use wire::{NodeId, NodeKey};

use crate::conntrack::{FlowTable, Known};
use crate::filter::Filter;
use crate::magicsock::{self, DatagramKind, Path, PathState};
use crate::packet::{self, PacketInfo, Transport};
use crate::status::{Counters, PathKind, PathStatus, PeerStatus, Status};
use crate::tunnel::Tunnel;

/// How often WireGuard's timers run.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often idle flows and stale session indices are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Handshake initiations accepted per second before cookies are required.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Smallest fragment offset (8-byte units) let through without a transport header: anything
/// lower could overlap the first fragment's ports and flags (RFC 1858).
const MIN_FRAGMENT_OFFSET: u16 = 3;

/// Static settings of the core.
#[derive(Clone)]
pub struct NodeConfig {
    /// The node's WireGuard private key.
    pub private_key: [u8; 32],
    /// MTU of the TUN device (inner packets are padded up to it, never beyond).
    pub tun_mtu: u16,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("private_key", &"<redacted>")
            .field("tun_mtu", &self.tun_mtu)
            .finish()
    }
}

/// A datagram to send from the node's UDP port.
#[derive(Debug)]
pub struct Transmit {
    /// Destination.
    pub dst: SocketAddr,
    /// Bytes to send.
    pub payload: Packet,
}

/// Something the shell may want to react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Peers, names or addresses changed (DNS and status readers should refresh).
    NetmapChanged,
    /// This node's overlay addresses changed (the shell configures the TUN device).
    AddressesChanged(Vec<IpAddr>),
    /// A peer's path changed.
    PathChanged {
        /// The peer.
        peer: NodeId,
        /// Its new direct address.
        addr: SocketAddr,
    },
}

struct Peer {
    node: Node,
    tunnel: Tunnel,
    path: PathState,
    /// When we last started a handshake because the peer used a session we do not have.
    last_stale_hint: Option<Instant>,
}

/// At most one handshake per peer per this interval is started because of stale sessions.
const STALE_HINT_INTERVAL: Duration = Duration::from_secs(2);

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
    private: StaticSecret,
    public: PublicKey,
    node_key: NodeKey,
    tun_mtu: u16,
    rng: StdRng,
    index_table: IndexTable<rand_09::rngs::StdRng>,
    rate_limiter: Arc<RateLimiter>,

    self_node: Option<Node>,
    dns: Option<DnsConfig>,
    local_addrs: Vec<IpAddr>,
    peers: BTreeMap<NodeKey, Peer>,
    by_id: BTreeMap<NodeId, NodeKey>,
    by_ip: HashMap<IpAddr, NodeKey>,
    by_index: HashMap<u32, NodeKey>,
    filter: Filter,
    flows: FlowTable,

    transmits: VecDeque<Transmit>,
    tun_writes: VecDeque<Packet>,
    events: VecDeque<Event>,
    next_tick: Instant,
    next_sweep: Instant,
    counters: Counters,
}

impl NodeState {
    /// A node with no peers yet. `seed` drives every random choice the core makes.
    pub fn new(config: NodeConfig, seed: [u8; 32], now: Instant) -> Self {
        let private = StaticSecret::from(config.private_key);
        let public = PublicKey::from(&private);
        let mut rng = StdRng::from_seed(seed);
        let index_table = IndexTable::from_rng(rand_09_rng(&mut rng));
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Self {
            node_key: NodeKey::from_bytes(public.to_bytes()),
            private,
            public,
            tun_mtu: config.tun_mtu,
            rng,
            index_table,
            rate_limiter,
            self_node: None,
            dns: None,
            local_addrs: Vec::new(),
            peers: BTreeMap::new(),
            by_id: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_index: HashMap::new(),
            filter: Filter::default(),
            flows: FlowTable::default(),
            transmits: VecDeque::new(),
            tun_writes: VecDeque::new(),
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
        if let Some(me) = map.node {
            if me.addresses != self.local_addrs {
                self.local_addrs = me.addresses.clone();
                self.events
                    .push_back(Event::AddressesChanged(self.local_addrs.clone()));
            }
            self.self_node = Some(me);
        }
        if let Some(peers) = map.peers {
            let keep: Vec<NodeId> = peers.iter().map(|p| p.id).collect();
            let gone: Vec<NodeId> = self
                .by_id
                .keys()
                .filter(|id| !keep.contains(id))
                .copied()
                .collect();
            for id in gone {
                self.remove_peer(id);
            }
            for p in peers {
                self.upsert_peer(now, p);
            }
        }
        for p in map.peers_changed {
            self.upsert_peer(now, p);
        }
        for id in map.peers_removed {
            self.remove_peer(id);
        }
        if let Some(rules) = map.packet_filter {
            self.filter = Filter::new(rules);
            let filter = &self.filter;
            let cut = self
                .flows
                .retain_inbound(|t| filter.evaluate(t).is_accept());
            if !cut.is_empty() {
                debug!(flows = cut.len(), "new filter rules cut established flows");
            }
        }
        if let Some(dns) = map.dns {
            self.dns = Some(dns);
        }
        self.events.push_back(Event::NetmapChanged);
    }

    /// A packet the operating system wrote to the TUN device.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: Packet) {
        let Some(dst) = packet::destination(&packet) else {
            self.counters.tun_malformed += 1;
            return;
        };
        let Some(key) = self.by_ip.get(&dst).copied() else {
            self.counters.tun_no_route += 1;
            trace!(%dst, "no peer owns this address");
            return;
        };
        match PacketInfo::parse(&packet) {
            Ok(info) => {
                if !self.local_addrs.contains(&info.tuple.src) {
                    self.counters.tun_bad_source += 1;
                    return;
                }
                if !matches!(info.transport, Transport::Fragment { .. }) {
                    self.flows.track_outbound(now, &info.tuple, info.transport);
                }
            }
            Err(_) => {
                self.counters.tun_malformed += 1;
                return;
            }
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if let Some(wg) = peer.tunnel.encapsulate(packet) {
            self.send_to_peer(now, key, wg);
        }
    }

    /// A datagram that arrived on the node's UDP port.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: Packet) {
        match magicsock::classify(&datagram) {
            DatagramKind::WireGuard => self.handle_wireguard(now, from, datagram),
            DatagramKind::Stun | DatagramKind::Frame | DatagramKind::Unknown => {
                self.counters.udp_unknown += 1;
            }
        }
    }

    /// Runs timers whose deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_tick {
            self.next_tick = now + TIMER_TICK;
            let keys: Vec<NodeKey> = self.peers.keys().copied().collect();
            for key in keys {
                let Some(peer) = self.peers.get_mut(&key) else {
                    continue;
                };
                match peer.tunnel.update_timers() {
                    Ok(Some(wg)) => self.send_to_peer(now, key, wg),
                    Ok(None) | Err(WireGuardError::ConnectionExpired) => {}
                    Err(e) => debug!(peer = %key, error = ?e, "wireguard timer error"),
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.flows.sweep(now);
            let table = &self.index_table;
            self.by_index.retain(|idx, _| table.in_use(*idx));
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

    /// When `handle_timeout` must next be called, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        if self.peers.is_empty() {
            Some((self.next_sweep, "sweep"))
        } else if self.next_tick <= self.next_sweep {
            Some((self.next_tick, "wireguard timers"))
        } else {
            Some((self.next_sweep, "sweep"))
        }
    }

    // ---------------------------------------------------------------- queries

    /// A snapshot for `lattice status`.
    pub fn status(&self, now: Instant) -> Status {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| {
                let stats = p.tunnel.stats();
                let path = match p.path.current() {
                    Path::Direct(a) => PathStatus {
                        kind: PathKind::Direct,
                        addr: Some(a),
                        relay: None,
                        reason: None,
                    },
                    Path::Probing => PathStatus {
                        kind: PathKind::None,
                        addr: None,
                        relay: None,
                        reason: Some("no endpoint has answered yet".into()),
                    },
                    Path::None => PathStatus {
                        kind: PathKind::None,
                        addr: None,
                        relay: None,
                        reason: Some("peer reported no endpoints".into()),
                    },
                };
                PeerStatus {
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
                    pq: false,
                    since_handshake: stats.since_handshake,
                    since_rx: p
                        .path
                        .last_authenticated()
                        .map(|t| now.saturating_duration_since(t)),
                    handshakes: stats.handshakes,
                    rx_bytes: stats.rx_bytes as u64,
                    tx_bytes: stats.tx_bytes as u64,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        Status {
            self_node: self.self_node.clone(),
            node_key: self.node_key,
            domain: self.dns.as_ref().map(|d| d.domain.clone()),
            peers,
            flows: self.flows.len(),
            filter_rules: self.filter.rules().len(),
            counters: self.counters,
        }
    }

    /// The node (this one or a peer) owning overlay address `ip`.
    pub fn whois(&self, ip: IpAddr) -> Option<&Node> {
        if let Some(me) = &self.self_node
            && me.addresses.contains(&ip)
        {
            return Some(me);
        }
        let key = self.by_ip.get(&ip)?;
        self.peers.get(key).map(|p| &p.node)
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
            packet_filter: Some(self.filter.rules().to_vec()),
            dns: self.dns.clone(),
            ..MapResponse::default()
        }
    }

    /// The mesh's DNS settings, once known.
    pub fn dns_config(&self) -> Option<&DnsConfig> {
        self.dns.as_ref()
    }

    // ---------------------------------------------------------------- internals

    fn upsert_peer(&mut self, _now: Instant, node: Node) {
        if node.node_key == self.node_key {
            return;
        }
        if let Some(old_key) = self.by_id.get(&node.id).copied()
            && old_key != node.node_key
        {
            // The peer rotated its key: a new tunnel.
            self.remove_peer(node.id);
        }
        let key = node.node_key;
        if let Some(peer) = self.peers.get_mut(&key) {
            for a in &peer.node.addresses {
                if self.by_ip.get(a) == Some(&key) {
                    self.by_ip.remove(a);
                }
            }
            peer.path.set_candidates(node.endpoints.clone());
            peer.node = node;
        } else {
            let jitter = rand_09_rng(&mut self.rng);
            let tunnel = Tunnel::new(
                &self.private,
                *key.as_bytes(),
                None,
                self.index_table.clone(),
                Arc::clone(&self.rate_limiter),
                jitter,
                self.tun_mtu,
            );
            let mut path = PathState::default();
            path.set_candidates(node.endpoints.clone());
            debug!(peer = %node.name, key = %key, "peer added");
            self.by_id.insert(node.id, key);
            self.peers.insert(
                key,
                Peer {
                    node,
                    tunnel,
                    path,
                    last_stale_hint: None,
                },
            );
        }
        let peer = self.peers.get(&key).expect("inserted above");
        for a in &peer.node.addresses {
            self.by_ip.insert(*a, key);
        }
    }

    fn remove_peer(&mut self, id: NodeId) {
        let Some(key) = self.by_id.remove(&id) else {
            return;
        };
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        for a in &peer.node.addresses {
            if self.by_ip.get(a) == Some(&key) {
                self.by_ip.remove(a);
            }
            self.flows.forget_address(*a);
        }
        self.by_index.retain(|_, k| *k != key);
        debug!(peer = %peer.node.name, key = %key, "peer removed");
    }

    fn handle_wireguard(&mut self, now: Instant, from: SocketAddr, datagram: Packet) {
        let wg = match self.rate_limiter.verify_packet(from, datagram) {
            Ok(wg) => wg,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.counters.wg_cookies_sent += 1;
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: cookie.into(),
                });
                return;
            }
            Err(_) => {
                self.counters.wg_invalid += 1;
                return;
            }
        };
        let key = match &wg {
            WgKind::HandshakeInit(p) => parse_handshake_anon(&self.private, &self.public, p)
                .ok()
                .map(|h| NodeKey::from_bytes(h.peer_static_public)),
            WgKind::HandshakeResp(p) => self.by_index.get(&p.receiver_idx.get()).copied(),
            WgKind::CookieReply(p) => self.by_index.get(&p.receiver_idx.get()).copied(),
            WgKind::Data(p) => self.by_index.get(&p.header.receiver_idx.get()).copied(),
        };
        let Some(key) = key.filter(|k| self.peers.contains_key(k)) else {
            if matches!(wg, WgKind::Data(_)) {
                self.hint_stale_session(now, from);
            }
            self.counters.wg_unknown_peer += 1;
            trace!(%from, "wireguard message from no current peer");
            return;
        };
        let peer = self.peers.get_mut(&key).expect("checked above");
        match peer.tunnel.decapsulate(wg) {
            TunnResult::WriteToNetwork(reply) => {
                self.learn_path(now, key, from);
                self.register_index(key, &reply);
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: reply.into(),
                });
                let peer = self.peers.get_mut(&key).expect("checked above");
                for queued in peer.tunnel.queued() {
                    self.transmits.push_back(Transmit {
                        dst: from,
                        payload: queued.into(),
                    });
                    self.counters.out_sent += 1;
                }
            }
            TunnResult::WriteToTunnel(inner) => {
                self.learn_path(now, key, from);
                if !inner.is_empty() {
                    self.deliver(now, key, inner);
                }
            }
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                self.counters.wg_invalid += 1;
                trace!(peer = %key, error = ?e, "wireguard message rejected");
            }
        }
    }

    /// Filters a decrypted packet from peer `key` and queues it for the TUN device.
    fn deliver(&mut self, now: Instant, key: NodeKey, mut inner: Packet) {
        let Ok(info) = PacketInfo::parse(&inner) else {
            self.counters.in_malformed += 1;
            return;
        };
        // A successful parse guarantees the claimed length fits in the buffer.
        if let Some(len) = packet::claimed_len(&inner) {
            inner.truncate(len);
        }
        if self.by_ip.get(&info.tuple.src) != Some(&key) {
            self.counters.in_spoofed += 1;
            trace!(src = %info.tuple.src, peer = %key, "source address does not belong to the peer");
            return;
        }
        if !self.local_addrs.contains(&info.tuple.dst) {
            self.counters.in_not_for_us += 1;
            return;
        }
        let admitted = match info.transport {
            Transport::Fragment { offset } => offset >= MIN_FRAGMENT_OFFSET,
            transport => match self.flows.classify_inbound(now, &info.tuple, transport) {
                Known::Reply | Known::Established | Known::Related => true,
                Known::New => {
                    let verdict = self.filter.evaluate(&info.tuple);
                    if verdict.is_accept() {
                        self.flows.admit_inbound(now, &info.tuple, transport);
                    }
                    verdict.is_accept()
                }
            },
        };
        if !admitted {
            self.counters.in_filtered += 1;
            trace!(tuple = ?info.tuple, "dropped by the packet filter");
            return;
        }
        self.counters.in_delivered += 1;
        self.tun_writes.push_back(inner);
    }

    fn send_to_peer(&mut self, now: Instant, key: NodeKey, wg: WgKind) {
        self.register_index(key, &wg);
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let targets = if matches!(wg, WgKind::HandshakeInit(_)) {
            peer.path.handshake_targets(now)
        } else {
            peer.path.data_target().into_iter().collect()
        };
        let payload: Packet = wg.into();
        let Some((last, rest)) = targets.split_last() else {
            return;
        };
        for dst in rest {
            self.transmits.push_back(Transmit {
                dst: *dst,
                payload: Packet::copy_from(&payload[..]),
            });
        }
        self.transmits.push_back(Transmit {
            dst: *last,
            payload,
        });
        self.counters.out_sent += 1;
    }

    /// A data packet for a session we do not have arrived from `from`. If `from` is a known
    /// peer's address, that peer still holds a session we lost (we restarted, or it rotated
    /// past us): start a handshake so it switches now instead of after WireGuard's 15 s
    /// silence timer. The handshake goes to the peer's known path, never to `from` alone, so
    /// this cannot be used to reflect traffic at a third party.
    fn hint_stale_session(&mut self, now: Instant, from: SocketAddr) {
        let Some((key, peer)) = self.peers.iter_mut().find(|(_, p)| p.path.knows(from)) else {
            return;
        };
        if peer
            .last_stale_hint
            .is_some_and(|t| now.saturating_duration_since(t) < STALE_HINT_INTERVAL)
        {
            return;
        }
        peer.last_stale_hint = Some(now);
        let key = *key;
        if let Some(init) = peer.tunnel.initiate() {
            debug!(peer = %key, %from, "peer uses a session we lost; re-handshaking");
            self.send_to_peer(now, key, init);
        }
    }

    fn register_index(&mut self, key: NodeKey, wg: &WgKind) {
        let idx = match wg {
            WgKind::HandshakeInit(p) => p.sender_idx.get(),
            WgKind::HandshakeResp(p) => p.sender_idx.get(),
            _ => return,
        };
        self.by_index.insert(idx, key);
    }

    fn learn_path(&mut self, now: Instant, key: NodeKey, from: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if peer.path.learn(now, from) {
            debug!(peer = %peer.node.name, %from, "direct path confirmed");
            self.events.push_back(Event::PathChanged {
                peer: peer.node.id,
                addr: from,
            });
        }
    }
}

fn rand_09_rng(rng: &mut StdRng) -> rand_09::rngs::StdRng {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    <rand_09::rngs::StdRng as rand_09::SeedableRng>::from_seed(seed)
}

#[cfg(test)]
mod tests;
