//! The WireGuard data path: packets from the TUN device out to peers, datagrams from peers
//! in through cryptokey routing and the packet filter.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::addr::Addr;

use gotatun::packet::{Packet, WgKind};
use tracing::{debug, trace};
use wire::NodeKey;

use super::crypto::CryptoJob;
use super::peers::MAX_WAITING;
use super::routes::Routes;
use super::{NodeState, Transmit};
use crate::gate::Held;
use crate::magicsock;
use crate::packet::{self, PacketInfo, Transport};
use crate::tunnel::Tunnel;
use crate::wg;
use crate::wg::cookie::{Sender, Verdict};

/// Smallest fragment offset (8-byte units) let through without a transport header: anything
/// lower could overlap the first fragment's ports and flags (RFC 1858).
const MIN_FRAGMENT_OFFSET: u16 = 3;
/// At most one reaction per peer per this interval to it using a session we do not have.
const STALE_HINT_INTERVAL: Duration = Duration::from_secs(2);

impl NodeState {
    /// A packet from the TUN device: hand it to a job for the peer owning its destination
    /// (which checks its source, tracks its flow and seals it: [`CryptoJob::run_all`]), or
    /// check it and hold it while that peer's tunnel is being keyed. `last` is what the
    /// packet before it in the same batch found, if it found a tunnel; returns what this one
    /// found, for the next.
    ///
    /// Within a batch nothing a packet does changes which peer owns an address or replaces
    /// a tunnel, and marking the peer's path active a second time at the same `now` changes
    /// nothing: a packet for the last one's destination goes straight to its tunnel.
    pub(super) fn outbound(
        &mut self,
        now: Instant,
        packet: Packet,
        last: Option<Found>,
    ) -> Option<Found> {
        let Some(dst) = packet::destination(&packet) else {
            self.counters.tun_malformed += 1;
            return last;
        };
        let last = last.filter(|f| f.dst == dst);
        let key = match &last {
            Some(f) => f.key,
            None => {
                let Some(key) = self.routes.owner_of(dst) else {
                    self.counters.tun_no_route += 1;
                    trace!(%dst, "no peer owns this address");
                    return None;
                };
                key
            }
        };
        // The job that seals it checks its source and tracks its flow, without the core.
        if let Some(f) = last {
            let job = CryptoJob::seal(key, f.tunnel.clone(), now, packet, true);
            self.crypto_job(now, job);
            return Some(f);
        }
        let peer = self.peers.get_mut(&key)?;
        // As `encapsulate` does, with the peer already found.
        let Some(tunnel) = peer.tunnel.clone() else {
            // It waits for the tunnel: checked and tracked now.
            let checked = track(&self.routes, &mut self.gate.held(), now, key, &packet);
            match checked {
                Err(Refusal::Malformed) => self.counters.tun_malformed += 1,
                Err(Refusal::BadSource) => self.counters.tun_bad_source += 1,
                Ok(()) => {
                    peer.path.on_send(now);
                    if peer.waiting.len() < MAX_WAITING {
                        peer.waiting.push_back(packet);
                    } else {
                        self.counters.tun_no_tunnel += 1;
                    }
                    self.pq_want(now, key);
                }
            }
            return None;
        };
        peer.path.on_send(now);
        self.crypto_job(now, CryptoJob::seal(key, tunnel.clone(), now, packet, true));
        Some(Found { dst, key, tunnel })
    }

    /// Encrypts a packet for `key` (whose tunnel exists) and sends it.
    pub(super) fn encapsulate(&mut self, now: Instant, key: NodeKey, packet: Packet) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.path.on_send(now);
        let Some(tunnel) = peer.tunnel.clone() else {
            return;
        };
        self.crypto_job(now, CryptoJob::seal(key, tunnel, now, packet, false));
    }

    /// A WireGuard message from `from`. `last` is what the datagram before it in the same
    /// batch found, if it was a data message handed out to be opened; returns what this one
    /// found, for the next. Only data messages in a row share a look-up: any other message
    /// (a handshake, a key exchange) may change the peer's tunnel, and nothing but data
    /// follows it with a look-up it made.
    pub(super) fn handle_wireguard(
        &mut self,
        now: Instant,
        from: Addr,
        datagram: Packet,
        last: Option<Opening>,
    ) -> Option<Opening> {
        // The usual case: a further data message of the same session from the same address.
        // Its header is read in place; the job parses it (a data message passes the cookie
        // check untouched), so nothing more is done for it under the core's lock.
        if let Some(o) = &last
            && o.from == from
            && magicsock::data_receiver(&datagram) == Some(o.idx)
        {
            let job = CryptoJob::open_raw(o.key, o.tunnel.clone(), now, from, datagram);
            self.crypto_job(now, job);
            return last;
        }
        // Relayed packets have no source address: each relayed sender counts as its own source
        // (the relay authenticated it), so one sender's handshake flood cannot put every other
        // relayed one under cookie load. Cookies for them go back through the relay. A peer's
        // handshake (from an address it is known at, or relayed in its name) is counted in the
        // peers' budget, which strangers cannot spend.
        let src = match from {
            Addr::Udp(_, a) => a,
            Addr::Relay(_, k) => relayed_source(&k),
        };
        let sender = self
            .claimed_peer(from)
            .map_or(Sender::Stranger, |k| Sender::Peer {
                key: *k.as_bytes(),
                relayed: matches!(from, Addr::Relay(..)),
            });
        match self.cookies.check(now, src, sender, &datagram) {
            Verdict::Pass => {}
            Verdict::CookieReply(reply) => {
                self.counters.wg_cookies_sent += 1;
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: Packet::from_bytes(reply),
                    ttl: None,
                });
                return None;
            }
            Verdict::Invalid => {
                self.counters.wg_invalid += 1;
                return None;
            }
            Verdict::Shed => {
                self.counters.wg_shed += 1;
                return None;
            }
        }
        // An initiation is read here (it names its sender only once opened), after the cookie
        // check passed its mac1, and the tunnel answers what was read.
        // (Anything but an initiation is refused by its type and length, without key work.)
        let received = wg::peer::read_initiation(&self.identity, &datagram);
        let Ok(wg) = datagram.try_into_wg() else {
            self.counters.wg_invalid += 1;
            return None;
        };
        let idx = match &wg {
            WgKind::Data(p) => Some(p.header.receiver_idx.get()),
            _ => None,
        };
        if let Some(o) = last.filter(|o| Some(o.idx) == idx && o.from == from) {
            self.crypto_job(now, CryptoJob::open(o.key, o.tunnel.clone(), now, from, wg));
            return Some(o);
        }
        let key = match &wg {
            WgKind::HandshakeInit(_) => received.as_ref().map(|r| NodeKey::from_bytes(r.peer)),
            WgKind::HandshakeResp(p) => self.by_index.get(&p.receiver_idx.get()).copied(),
            WgKind::CookieReply(p) => self.by_index.get(&p.receiver_idx.get()).copied(),
            WgKind::Data(p) => self.by_index.get(&p.header.receiver_idx.get()).copied(),
        };
        let Some((key, peer)) = key.and_then(|k| self.peers.get_mut(&k).map(|p| (k, p))) else {
            if matches!(wg, WgKind::Data(_)) {
                self.hint_stale_session(now, from);
            }
            self.counters.wg_unknown_peer += 1;
            trace!(%from, "wireguard message from no current peer");
            return None;
        };
        if matches!(wg, WgKind::HandshakeInit(_)) && peer.pq.awaiting_confirmation(now) {
            // We answered a post-quantum exchange whose confirmation has not arrived yet; this
            // handshake most likely uses its key. Hold it until the key is confirmed.
            peer.held_handshake = Some((now, from, wg.into()));
            return None;
        }
        let Some(tunnel) = peer.tunnel.clone() else {
            // The peer has a key with us that we do not (we restarted): get a new one. This
            // signal is not authenticated, so it only ever asks for a key we lack.
            self.counters.tun_no_tunnel += 1;
            self.pq_want(now, key);
            return None;
        };
        match idx {
            // Inline, opening finishes the packet at once, which may change the peer's state:
            // only jobs handed out share a look-up.
            Some(idx) if self.crypto_outside => {
                self.crypto_job(now, CryptoJob::open(key, tunnel.clone(), now, from, wg));
                Some(Opening {
                    from,
                    idx,
                    key,
                    tunnel,
                })
            }
            Some(_) => {
                self.crypto_job(now, CryptoJob::open(key, tunnel, now, from, wg));
                None
            }
            None => {
                // Handshakes run here, in order with the state they change.
                let result = match received {
                    Some(r) => tunnel.answer(now, r),
                    None => tunnel.receive(now, wg),
                };
                self.opened(now, key, from, result, None);
                None
            }
        }
    }

    /// Queues a decrypted packet from peer `key` for the TUN device if the checks let it in
    /// (`delivery`, when a crypto job ran them already; otherwise they run here) and counts
    /// what became of it.
    pub(super) fn deliver(
        &mut self,
        now: Instant,
        key: NodeKey,
        mut inner: Packet,
        delivery: Option<Delivery>,
    ) {
        let delivery = delivery
            .unwrap_or_else(|| admit(&self.routes, &mut self.gate.held(), now, key, &mut inner));
        let c = &mut self.counters;
        match delivery {
            Delivery::Deliver => {
                c.in_delivered += 1;
                self.tun_writes.push_back(inner);
            }
            Delivery::Malformed => c.in_malformed += 1,
            Delivery::Spoofed => c.in_spoofed += 1,
            Delivery::NotForUs => c.in_not_for_us += 1,
            Delivery::Filtered => c.in_filtered += 1,
        }
    }

    pub(super) fn send_to_peer(&mut self, now: Instant, key: NodeKey, wg: WgKind) {
        self.register_index(key, &wg);
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let control = !matches!(wg, WgKind::Data(_));
        let local = self.local_for(&peer.node);
        if let Some(dst) = peer.path.sole_target(now, local) {
            // The usual case, without building a list of targets for each packet.
            self.transmits.push_back(Transmit {
                dst,
                payload: wg.into(),
                ttl: None,
            });
            self.counters.out_sent += 1;
            return;
        }
        let targets = peer.path.targets(now, key, local, control);
        let payload: Packet = wg.into();
        let Some((last, rest)) = targets.split_last() else {
            return;
        };
        for dst in rest {
            self.transmits.push_back(Transmit {
                dst: *dst,
                payload: Packet::copy_from(&payload[..]),
                ttl: None,
            });
        }
        self.transmits.push_back(Transmit {
            dst: *last,
            payload,
            ttl: None,
        });
        self.counters.out_sent += 1;
    }

    /// The peer a datagram from `from` is counted against before anything authenticates it:
    /// the one known at that address, or the one a relay delivered it for (the relay
    /// authenticated that).
    pub(super) fn claimed_peer(&self, from: Addr) -> Option<NodeKey> {
        match from {
            Addr::Udp(_, a) => self.by_addr.get(&a).copied(),
            Addr::Relay(_, k) => self.peers.contains_key(&k).then_some(k),
        }
    }

    /// A data packet for a session we do not have arrived from `from`. If `from` is a known
    /// peer's address, that peer still holds a session we lost (we restarted, or it rotated
    /// past us): start a handshake (or, without a tunnel, a new post-quantum key) so it
    /// switches now instead of after WireGuard's 15 s silence timer. The reaction goes to the
    /// peer's known path, never to `from` alone, so this cannot reflect traffic at a third
    /// party.
    fn hint_stale_session(&mut self, now: Instant, from: Addr) {
        let key = match from {
            Addr::Udp(_, a) => self.by_addr.get(&a).copied(),
            Addr::Relay(_, k) => Some(k),
        };
        let Some(key) = key else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if let Addr::Udp(_, a) = from
            && !peer.path.knows(a)
        {
            return;
        }
        if peer
            .last_stale_hint
            .is_some_and(|t| now.saturating_duration_since(t) < STALE_HINT_INTERVAL)
        {
            return;
        }
        peer.last_stale_hint = Some(now);
        match peer.tunnel.as_mut() {
            Some(tunnel) => {
                if let Some(init) = tunnel.initiate_unless_recent(now) {
                    debug!(peer = %key, %from, "peer uses a session we lost; re-handshaking");
                    self.send_to_peer(now, key, init);
                }
            }
            None => self.pq_want(now, key),
        }
    }

    pub(super) fn register_index(&mut self, key: NodeKey, wg: &WgKind) {
        let idx = match wg {
            WgKind::HandshakeInit(p) => p.sender_idx.get(),
            WgKind::HandshakeResp(p) => p.sender_idx.get(),
            _ => return,
        };
        self.by_index.insert(idx, key);
    }

    /// An authenticated message from peer `key` came from `from`, carrying `packets` data
    /// packets (counted for the peer here, with the one lookup of the peer).
    pub(super) fn learn_path(&mut self, now: Instant, key: NodeKey, from: Addr, packets: u64) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.traffic.rx_packets += packets;
        if let Addr::Udp(_, a) = from {
            self.by_addr.insert(a, key);
        }
        if peer.path.on_auth_rx(now, from) {
            self.path_changed(now, key);
        }
    }
}

/// What a data message handed out to be opened found: the session it names (its receiver
/// index), the address it came from, its peer and that peer's tunnel.
pub(super) struct Opening {
    from: Addr,
    idx: u32,
    key: NodeKey,
    tunnel: Tunnel,
}

/// What an outbound packet found: its destination's peer and that peer's tunnel.
pub(super) struct Found {
    dst: IpAddr,
    key: NodeKey,
    tunnel: Tunnel,
}

/// A stand-in source address for WireGuard's per-source handshake limit, one per relayed
/// peer: an address under `100::/16` (the discard-only `100::/64` of RFC 6666 widened; never
/// sent to) made from the peer's key, in its first 64 bits too, since the limit counts an
/// IPv6 source by its /64.
fn relayed_source(key: &NodeKey) -> SocketAddr {
    let k = key.as_bytes();
    let mut ip = [0u8; 16];
    ip[0] = 0x01;
    ip[2..16].copy_from_slice(&k[..14]);
    SocketAddr::from((ip, 0))
}

/// Why a packet from the TUN device was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not a well-formed IP packet.
    Malformed,
    /// Its source is not this node's, nor in a subnet it routes.
    BadSource,
}

/// Checks a packet from the TUN device for peer `key`, read at `now`: its source must be this
/// node's own, or (a router's replies) in a subnet it routes; then tracks its flow. Reads only
/// the route tables and the gate, so a crypto job runs it without the core.
pub(super) fn track(
    routes: &Routes,
    gate: &mut Held<'_>,
    now: Instant,
    key: NodeKey,
    packet: &Packet,
) -> Result<(), Refusal> {
    let info = PacketInfo::parse(packet).map_err(|_| Refusal::Malformed)?;
    if !routes.is_ours(info.tuple.src) {
        return Err(Refusal::BadSource);
    }
    if !matches!(info.transport, Transport::Fragment { .. }) {
        gate.track_outbound(now, key, &info.tuple, info.transport);
    }
    Ok(())
}

/// What the checks decided about a packet a peer sent, once decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Let in.
    Deliver,
    /// Not a well-formed IP packet.
    Malformed,
    /// Its source address does not belong to the peer.
    Spoofed,
    /// Its destination is not this node's, nor in a subnet it routes.
    NotForUs,
    /// Neither part of a known flow nor admitted by the rules.
    Filtered,
}

/// Checks a decrypted packet from peer `key` (cutting off padding past its IP length): its
/// source must belong to the peer, its destination to this node, and it must belong to a
/// known flow or open one the rules admit (the flow table is updated as for a delivered
/// packet). Reads only the route tables and the gate, so a crypto job runs it without the
/// core.
pub(super) fn admit(
    routes: &Routes,
    gate: &mut Held<'_>,
    now: Instant,
    key: NodeKey,
    inner: &mut Packet,
) -> Delivery {
    let Ok(info) = PacketInfo::parse(inner) else {
        return Delivery::Malformed;
    };
    // A successful parse guarantees the claimed length fits in the buffer.
    if let Some(len) = packet::claimed_len(inner) {
        inner.truncate(len);
    }
    if !routes.peer_may_send_from(&key, info.tuple.src) {
        trace!(src = %info.tuple.src, peer = %key, "source address does not belong to the peer");
        return Delivery::Spoofed;
    }
    if !routes.is_ours(info.tuple.dst) {
        return Delivery::NotForUs;
    }
    let admitted = match info.transport {
        Transport::Fragment { offset } => offset >= MIN_FRAGMENT_OFFSET,
        transport => gate.inbound(
            now,
            key,
            &info.tuple,
            transport,
            // The internet never opens connections through the exit node.
            routes.only_through_exit(&key, info.tuple.src),
        ),
    };
    if !admitted {
        trace!(tuple = ?info.tuple, "dropped by the packet filter");
        return Delivery::Filtered;
    }
    Delivery::Deliver
}
