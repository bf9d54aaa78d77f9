//! Disco inside [`NodeState`]: sealing and opening messages, checking their freshness,
//! answering pings, sending probes and call-me-maybes for [`crate::path::PathState`], handing
//! key-schedule messages to [`crate::pq`], and reporting path changes.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gotatun::packet::Packet;
use rand::RngExt;
use tracing::{debug, info, trace};
use wire::{NodeId, NodeKey};

use super::{Event, NodeState, QUIET_NETCHECK, Transmit};
use crate::addr::Addr;
use crate::disco::{self, FLAG_HARD_NAT, FLAG_REPLY, Message};
use crate::path::{Current, PathAction};

/// Disco answers (pongs) per peer per second, and the burst allowed.
const DISCO_RATE: f64 = 50.0;
pub(super) const DISCO_BURST: f64 = 200.0;
/// How far a ping may lag behind the newest one seen from its sender (reordering across
/// paths) and still be answered.
const PING_REORDER: Duration = Duration::from_secs(10);
/// Transaction ids remembered per peer to refuse a ping twice.
const MAX_RECENT_PINGS: usize = 1024;
/// A call-me-maybe further than this from our clock is refused.
const CALL_ME_MAYBE_WINDOW: Duration = Duration::from_secs(300);

/// What a peer's disco messages must beat to be fresh: its own clock, as its earlier
/// messages showed it (so no clock agreement is needed for pings).
#[derive(Debug, Default)]
pub(super) struct DiscoFreshness {
    ping_high: u64,
    recent: VecDeque<([u8; 12], u64)>,
    recent_set: HashSet<[u8; 12]>,
    call_me_maybe_high: u64,
}

impl DiscoFreshness {
    /// A ping with `tx` sent at the peer's `time`: new, and not far behind the newest.
    fn ping(&mut self, tx: [u8; 12], time: u64) -> bool {
        let reorder = u64::try_from(PING_REORDER.as_millis()).unwrap_or(u64::MAX);
        if time.saturating_add(reorder) < self.ping_high || self.recent_set.contains(&tx) {
            return false;
        }
        self.ping_high = self.ping_high.max(time);
        // Older ids can go: the window refuses their pings anyway.
        while let Some((old, t)) = self.recent.front().copied() {
            if t.saturating_add(reorder) >= self.ping_high && self.recent.len() < MAX_RECENT_PINGS {
                break;
            }
            self.recent.pop_front();
            self.recent_set.remove(&old);
        }
        self.recent.push_back((tx, time));
        self.recent_set.insert(tx);
        true
    }

    /// A call-me-maybe sent at the peer's `time`, received at our `epoch`.
    fn call_me_maybe(&mut self, time: u64, epoch: u64) -> bool {
        let window = u64::try_from(CALL_ME_MAYBE_WINDOW.as_millis()).unwrap_or(u64::MAX);
        if time <= self.call_me_maybe_high || time.abs_diff(epoch) > window {
            return false;
        }
        self.call_me_maybe_high = time;
        true
    }
}

impl NodeState {
    /// A disco frame from `sender` arrived from `from`.
    pub(super) fn handle_disco(
        &mut self,
        now: Instant,
        from: Addr,
        sender: NodeKey,
        sealed: &[u8],
    ) {
        // Through a relay, the relay names the sender: the frame must agree.
        if let Addr::Relay(_, k) = from
            && k != sender
        {
            self.counters.disco_invalid += 1;
            return;
        }
        let Some(peer) = self.peers.get(&sender) else {
            self.counters.disco_invalid += 1;
            return;
        };
        let Some(key) = peer.disco_key.as_deref() else {
            self.counters.disco_invalid += 1;
            return;
        };
        let Some(plain) = hybrid::seal::open(key, &disco::header(sender.as_bytes()), sealed) else {
            self.counters.disco_invalid += 1;
            return;
        };
        let Some(msg) = Message::decode(&plain) else {
            self.counters.disco_invalid += 1;
            return;
        };
        match msg {
            Message::Ping { tx, time } => {
                let Some(peer) = self.peers.get_mut(&sender) else {
                    return;
                };
                if !peer.disco_fresh.ping(tx, time) {
                    self.counters.disco_stale += 1;
                    return;
                }
                if !peer.disco_tokens.take(now, DISCO_RATE, DISCO_BURST) {
                    self.counters.disco_rate_limited += 1;
                    return;
                }
                let observed = from.udp().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                self.send_disco(sender, from, &Message::Pong { tx, observed });
                self.counters.disco_pongs_sent += 1;
                let Some(peer) = self.peers.get_mut(&sender) else {
                    return;
                };
                let actions = peer.path.on_ping(now, &mut self.rng, from);
                self.apply_path(now, sender, actions);
            }
            Message::Pong { tx, .. } => {
                let Some(peer) = self.peers.get_mut(&sender) else {
                    return;
                };
                if let Some(i) = peer.user_pings.iter().position(|(t, _, _)| *t == tx) {
                    let (_, sent, _) = peer.user_pings.swap_remove(i);
                    self.events.push_back(Event::PingReply {
                        peer: peer.node.id,
                        name: peer.node.name.clone(),
                        ipv4: peer.node.addresses.iter().find(|a| a.is_ipv4()).copied(),
                        from,
                        rtt: now.saturating_duration_since(sent),
                    });
                }
                if let Addr::Udp(_, a) = from {
                    self.by_addr.insert(a, sender);
                }
                if peer.path.on_pong(now, &tx, from) == Some(true) {
                    self.path_changed(now, sender);
                }
            }
            Message::CallMeMaybe {
                time,
                flags,
                public_ip,
                endpoints,
            } => {
                let epoch = self.epoch(now);
                let Some(peer) = self.peers.get_mut(&sender) else {
                    return;
                };
                if !peer.disco_fresh.call_me_maybe(time, epoch) {
                    self.counters.disco_stale += 1;
                    return;
                }
                let Some(peer) = self.peers.get(&sender) else {
                    return;
                };
                let relay = self.relay_for(&peer.node);
                let relays_known = !self.relays.is_empty();
                let endpoints_pending = self.endpoints_pending();
                let Some(peer) = self.peers.get_mut(&sender) else {
                    return;
                };
                trace!(peer = %peer.node.name, n = endpoints.len(), hard = flags & FLAG_HARD_NAT != 0, reply = flags & FLAG_REPLY != 0, "call-me-maybe");
                let local = crate::path::Local {
                    relay,
                    relays_known,
                    nat: self.nat.as_ref(),
                    endpoints_pending,
                };
                let actions = peer.path.on_call_me_maybe(
                    now,
                    &mut self.rng,
                    local,
                    &endpoints,
                    flags & FLAG_HARD_NAT != 0,
                    public_ip,
                    flags & FLAG_REPLY != 0,
                );
                for e in &endpoints {
                    self.claim_addr(*e, sender);
                }
                self.apply_path(now, sender, actions);
            }
            Message::PqNudge { time } => self.handle_pq_nudge(now, sender, time),
            Message::PqConfirm { session, tag } => {
                self.handle_pq_confirm(now, from, sender, session, &tag);
            }
            Message::PqConfirmAck { session, tag } => {
                self.handle_pq_confirm_ack(sender, session, &tag);
            }
        }
    }

    /// Pings the peer `target` names (its name, FQDN or overlay address) over its current
    /// path: the direct address in use, or else its relay. The pong comes back as
    /// [`Event::PingReply`]; a ping without an answer within 10 s is forgotten. Fails with why
    /// no ping can be sent.
    pub fn ping(&mut self, now: Instant, target: &str) -> Result<NodeId, String> {
        const MAX_OUTSTANDING: usize = 16;
        let key = self
            .peer_named(target)
            .ok_or_else(|| format!("no peer named {target} is visible to this node"))?;
        let peer = self.peers.get(&key).ok_or("the peer went away")?;
        let to = match peer.path.current(now, self.local_for(&peer.node)) {
            Current::Direct(sock, addr) => Addr::Udp(sock, addr),
            Current::Relay(r) => Addr::Relay(r, key),
            Current::None => match self.relay_for(&peer.node) {
                Some(r) => Addr::Relay(r, key),
                None => {
                    return Err(format!(
                        "no path to {} yet: no direct address answered and no relay is connected",
                        peer.node.name
                    ));
                }
            },
        };
        if peer.disco_key.is_none() {
            return Err(format!("{} has an unusable key", peer.node.name));
        }
        let id = peer.node.id;
        let tx: [u8; 12] = self.rng.random();
        let time = self.epoch(now);
        let Some(peer) = self.peers.get_mut(&key) else {
            return Err("the peer went away".into());
        };
        peer.user_pings
            .retain(|(_, sent, _)| now.saturating_duration_since(*sent) < Duration::from_secs(10));
        if peer.user_pings.len() >= MAX_OUTSTANDING {
            return Err("too many pings in flight".into());
        }
        peer.user_pings.push((tx, now, to));
        self.send_disco(key, to, &Message::Ping { tx, time });
        Ok(id)
    }

    /// Path timers for one peer.
    pub(super) fn path_timers(&mut self, now: Instant, key: NodeKey) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let before = peer.path.current(now, self.local_for(&peer.node));
        let relay = self.relay_for(&peer.node);
        let relays_known = !self.relays.is_empty();
        let endpoints_pending = self.endpoints_pending();
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let local = crate::path::Local {
            relay,
            relays_known,
            nat: self.nat.as_ref(),
            endpoints_pending,
        };
        let actions = peer.path.poll(now, &mut self.rng, local);
        self.apply_path(now, key, actions);
        if let Some(peer) = self.peers.get(&key)
            && peer.path.current(now, self.local_for(&peer.node)) != before
        {
            self.path_changed(now, key);
        }
    }

    fn apply_path(&mut self, now: Instant, key: NodeKey, actions: Vec<PathAction>) {
        let time = self.epoch(now);
        for a in actions {
            match a {
                PathAction::Ping { to, tx } => {
                    self.send_disco(key, to, &Message::Ping { tx, time });
                }
                PathAction::Quiet => self.path_went_quiet(now),
                PathAction::RelayDoubted => self.pq_hurry(now, key),
                PathAction::Prime { to, tx } => {
                    self.send_disco_ttl(
                        key,
                        to,
                        &Message::Ping { tx, time },
                        Some(crate::path::PRIMER_TTL),
                    );
                }
                PathAction::CallMeMaybe { relay, hard, reply } => {
                    let endpoints = self.my_endpoints();
                    let public_ip = self.nat.as_ref().and_then(|n| n.public_ip);
                    self.send_disco(
                        key,
                        Addr::Relay(relay, key),
                        &Message::CallMeMaybe {
                            time,
                            flags: if hard { FLAG_HARD_NAT } else { 0 }
                                | if reply { FLAG_REPLY } else { 0 },
                            public_ip,
                            endpoints,
                        },
                    );
                }
            }
        }
    }

    /// A trusted direct path went quiet: our NAT may have moved our public port. Re-learn it
    /// now (at most every [`QUIET_NETCHECK`]) rather than at the next scheduled netcheck; when
    /// it moved, every peer still looking for a path probes again with the new endpoint.
    fn path_went_quiet(&mut self, now: Instant) {
        if self
            .quiet_netcheck
            .is_some_and(|t| now.saturating_duration_since(t) < QUIET_NETCHECK)
        {
            return;
        }
        self.quiet_netcheck = Some(now);
        debug!("a direct path went quiet: checking our public endpoint");
        self.netcheck.trigger(now);
    }

    /// This node's endpoints: what the coordinator has for us, plus the netcheck's public
    /// endpoint.
    fn my_endpoints(&self) -> Vec<SocketAddr> {
        let mut eps: Vec<SocketAddr> = self
            .self_node
            .as_ref()
            .map(|n| n.endpoints.clone())
            .unwrap_or_default();
        if let Some(p) = self.netcheck.last().and_then(|r| r.public_endpoint)
            && !eps.contains(&p)
        {
            eps.push(p);
        }
        eps.truncate(disco::MAX_ENDPOINTS);
        eps
    }

    pub(super) fn send_disco(&mut self, peer: NodeKey, to: Addr, msg: &Message) {
        self.send_disco_ttl(peer, to, msg, None);
    }

    /// [`Self::send_disco`] with an IP TTL of its own (a primer).
    fn send_disco_ttl(&mut self, peer: NodeKey, to: Addr, msg: &Message, ttl: Option<u8>) {
        let Some(key) = self.peers.get(&peer).and_then(|p| p.disco_key.as_deref()) else {
            return;
        };
        let header = disco::header(self.node_key.as_bytes());
        let sealed = hybrid::seal::seal(&mut self.rng, key, &header, &msg.encode());
        let frame = disco::frame(self.node_key.as_bytes(), &sealed);
        self.transmits.push_back(Transmit {
            dst: to,
            payload: Packet::copy_from(&frame),
            ttl,
        });
    }

    /// Reports a peer's new path.
    pub(super) fn path_changed(&mut self, now: Instant, key: NodeKey) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.traffic.path_changes += 1;
        let peer = &self.peers[&key];
        let path = peer.path.current(now, self.local_for(&peer.node));
        match path {
            Current::Direct(sock, addr) => {
                info!(peer = %peer.node.name, %addr, ?sock, latency = ?peer.path.latency(), "direct path");
            }
            Current::Relay(r) => debug!(peer = %peer.node.name, relay = %r, "relayed path"),
            Current::None => {}
        }
        self.events.push_back(Event::PathChanged {
            peer: peer.node.id,
            path,
        });
        if matches!(path, Current::Direct(..)) {
            self.pq_hurry(now, key);
        }
    }
}
