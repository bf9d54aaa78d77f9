//! Disco inside [`NodeState`]: sealing and opening messages, answering pings, sending probes
//! and call-me-maybes for [`crate::path::PathState`], and reporting path changes.

use std::net::SocketAddr;
use std::time::Instant;

use gotatun::packet::Packet;
use tracing::{debug, info, trace};
use wire::NodeKey;

use super::{Event, NodeState, Transmit};
use crate::addr::Addr;
use crate::disco::{self, FLAG_HARD_NAT, Message};
use crate::path::{Current, PathAction};

/// Disco answers (pongs) per peer per second, and the burst allowed.
const DISCO_RATE: f64 = 50.0;
pub(super) const DISCO_BURST: f64 = 200.0;

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
            Message::Ping { tx } => {
                if !self.take_disco_token(now, sender) {
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
                if peer.path.on_pong(now, &tx, from) == Some(true) {
                    self.path_changed(now, sender);
                }
            }
            Message::CallMeMaybe {
                flags,
                public_ip,
                endpoints,
            } => {
                let Some(peer) = self.peers.get(&sender) else {
                    return;
                };
                let relay = self.relay_for(&peer.node);
                let relays_known = !self.relays.is_empty();
                let Some(peer) = self.peers.get_mut(&sender) else {
                    return;
                };
                trace!(peer = %peer.node.name, n = endpoints.len(), hard = flags & FLAG_HARD_NAT != 0, "call-me-maybe");
                let local = crate::path::Local {
                    relay,
                    relays_known,
                    nat: self.nat.as_ref(),
                };
                let actions = peer.path.on_call_me_maybe(
                    now,
                    &mut self.rng,
                    local,
                    &endpoints,
                    flags & FLAG_HARD_NAT != 0,
                    public_ip,
                );
                self.apply_path(now, sender, actions);
            }
        }
    }

    /// Path timers for one peer.
    pub(super) fn path_timers(&mut self, now: Instant, key: NodeKey) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let before = peer.path.current(now, self.local_for(&peer.node));
        let relay = self.relay_for(&peer.node);
        let relays_known = !self.relays.is_empty();
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let local = crate::path::Local {
            relay,
            relays_known,
            nat: self.nat.as_ref(),
        };
        let actions = peer.path.poll(now, &mut self.rng, local);
        self.apply_path(now, key, actions);
        if let Some(peer) = self.peers.get(&key)
            && peer.path.current(now, self.local_for(&peer.node)) != before
        {
            self.path_changed(now, key);
        }
    }

    fn apply_path(&mut self, _now: Instant, key: NodeKey, actions: Vec<PathAction>) {
        for a in actions {
            match a {
                PathAction::Ping { to, tx } => self.send_disco(key, to, &Message::Ping { tx }),
                PathAction::CallMeMaybe { relay, hard } => {
                    let endpoints = self.my_endpoints();
                    let public_ip = self.nat.as_ref().and_then(|n| n.public_ip);
                    self.send_disco(
                        key,
                        Addr::Relay(relay, key),
                        &Message::CallMeMaybe {
                            flags: if hard { FLAG_HARD_NAT } else { 0 },
                            public_ip,
                            endpoints,
                        },
                    );
                }
            }
        }
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

    fn send_disco(&mut self, peer: NodeKey, to: Addr, msg: &Message) {
        let Some(key) = self.peers.get(&peer).and_then(|p| p.disco_key.as_deref()) else {
            return;
        };
        let header = disco::header(self.node_key.as_bytes());
        let sealed = hybrid::seal::seal(&mut self.rng, key, &header, &msg.encode());
        let frame = disco::frame(self.node_key.as_bytes(), &sealed);
        self.transmits.push_back(Transmit {
            dst: to,
            payload: Packet::copy_from(&frame),
        });
    }

    fn take_disco_token(&mut self, now: Instant, key: NodeKey) -> bool {
        let Some(p) = self.peers.get_mut(&key) else {
            return false;
        };
        let elapsed = now
            .saturating_duration_since(p.disco_tokens_at)
            .as_secs_f64();
        p.disco_tokens_at = now;
        p.disco_tokens = (p.disco_tokens + elapsed * DISCO_RATE).min(DISCO_BURST);
        if p.disco_tokens >= 1.0 {
            p.disco_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Reports a peer's new path.
    pub(super) fn path_changed(&mut self, now: Instant, key: NodeKey) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
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
    }
}
