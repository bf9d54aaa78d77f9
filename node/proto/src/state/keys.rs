//! The post-quantum key schedule inside [`NodeState`]: handshake frames, nudges, tunnel
//! creation and key installation.

use std::time::Instant;

use gotatun::packet::Packet;
use hybrid::{Purpose, ResponderHandshake};
use tracing::{debug, info, trace};
use wire::NodeKey;
use wire::netmap::TunnelSecurity;

use super::NodeState;
use crate::addr::Addr;
use crate::frame::{self, Frame, Kind};
use crate::pq::{self, PqAction, PqError};
use crate::tunnel::Tunnel;

/// Message 1s processed per second (each costs an ML-KEM encapsulation and four
/// Diffie-Hellmans), and the burst allowed.
const PQ_RATE: f64 = 50.0;
pub(super) const PQ_BURST: f64 = 100.0;

impl NodeState {
    /// A Lattice frame arrived.
    pub(super) fn handle_frame(&mut self, now: Instant, from: Addr, datagram: &[u8]) {
        if let Some((sender, sealed)) = crate::disco::parse_frame(datagram) {
            self.handle_disco(now, from, NodeKey::from_bytes(sender), sealed);
            return;
        }
        let Some(frame) = frame::decode(datagram) else {
            self.counters.frames_invalid += 1;
            return;
        };
        match frame {
            Frame::Chunk {
                kind,
                session,
                index,
                count,
                bytes,
            } => {
                let Some(msg) = self
                    .reassembly
                    .push(now, from, kind, session, index, count, bytes)
                else {
                    return;
                };
                match kind {
                    Kind::PqInit => self.handle_pq_init(now, from, session, &msg),
                    Kind::PqResp => self.handle_pq_resp(now, from, session, &msg),
                    Kind::PqNudge => {}
                }
            }
            Frame::Nudge { tag } => {
                let key = self
                    .peers
                    .keys()
                    .find(|k| pq::nudge_tag(k, &self.node_key) == tag)
                    .copied();
                let Some(key) = key else {
                    self.counters.pq_rejected += 1;
                    return;
                };
                trace!(peer = %key, "post-quantum nudge");
                self.pq_restart(now, key);
            }
        }
    }

    fn handle_pq_init(&mut self, now: Instant, from: Addr, session: u32, msg1: &[u8]) {
        if !self.take_pq_token(now) {
            self.counters.pq_rate_limited += 1;
            return;
        }
        let hash = pq::message_hash(msg1);
        let read = ResponderHandshake::read_initiation(
            &mut self.rng,
            Purpose::PeerPsk,
            &self.keypair,
            msg1,
        );
        let Ok((responder, init)) = read else {
            self.counters.pq_rejected += 1;
            trace!(%from, "post-quantum message 1 did not decrypt");
            return;
        };
        let key = NodeKey::from_bytes(init.remote_static);
        let Some(peer) = self.peers.get_mut(&key) else {
            self.counters.pq_rejected += 1;
            return;
        };
        match peer.pq.handle_init(
            now,
            &mut self.rng,
            from,
            session,
            hash,
            responder,
            &init.payload,
        ) {
            Ok(actions) => {
                self.learn_path(now, key, from);
                self.apply_pq(now, key, actions);
            }
            Err(PqError::Duplicate) => {
                trace!(peer = %key, %from, "post-quantum message 1 already answered");
            }
            Err(e) => {
                self.counters.pq_rejected += 1;
                debug!(peer = %key, error = %e, "post-quantum message 1 refused");
            }
        }
    }

    fn handle_pq_resp(&mut self, now: Instant, from: Addr, session: u32, msg2: &[u8]) {
        let key = self
            .peers
            .iter()
            .find(|(_, p)| p.pq.pending_session() == Some(session))
            .map(|(k, _)| *k);
        let Some(key) = key else {
            self.counters.pq_rejected += 1;
            return;
        };
        let peer = self.peers.get_mut(&key).expect("found above");
        match peer.pq.handle_resp(now, msg2) {
            Ok(actions) => {
                self.learn_path(now, key, from);
                self.apply_pq(now, key, actions);
            }
            Err(e) => {
                self.counters.pq_rejected += 1;
                debug!(peer = %key, error = %e, "post-quantum message 2 refused");
            }
        }
    }

    /// A tunnel to `key` is needed (traffic is waiting).
    pub(super) fn pq_want(&mut self, now: Instant, key: NodeKey) {
        if self.security == TunnelSecurity::ClassicalOnly {
            return;
        }
        let epoch = self.epoch(now);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.pq_wanted = true;
        let actions = peer.pq.want(now, &mut self.rng, &self.keypair, epoch);
        self.apply_pq(now, key, actions);
    }

    /// The peer has lost its key or we lost ours: start over.
    pub(super) fn pq_restart(&mut self, now: Instant, key: NodeKey) {
        if self.security == TunnelSecurity::ClassicalOnly {
            return;
        }
        let epoch = self.epoch(now);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.pq_wanted = true;
        let actions = peer.pq.restart(now, &mut self.rng, &self.keypair, epoch);
        self.apply_pq(now, key, actions);
    }

    pub(super) fn pq_timers(&mut self, now: Instant, key: NodeKey) {
        if self.security == TunnelSecurity::ClassicalOnly {
            return;
        }
        let epoch = self.epoch(now);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if peer.pq.poll_timeout().is_none_or(|t| t > now) {
            return;
        }
        let actions = peer
            .pq
            .handle_timeout(now, &mut self.rng, &self.keypair, epoch);
        self.apply_pq(now, key, actions);
    }

    fn apply_pq(&mut self, now: Instant, key: NodeKey, actions: Vec<PqAction>) {
        for action in actions {
            match action {
                PqAction::Send(frames) => {
                    let Some(peer) = self.peers.get(&key) else {
                        return;
                    };
                    let targets = peer
                        .path
                        .targets(now, key, self.local_for(&peer.node), true);
                    for f in &frames {
                        for dst in &targets {
                            self.transmits.push_back(super::Transmit {
                                dst: *dst,
                                payload: Packet::copy_from(&f[..]),
                            });
                        }
                    }
                }
                PqAction::Reply(dst, frames) => {
                    for f in frames {
                        self.transmits.push_back(super::Transmit {
                            dst,
                            payload: Packet::copy_from(&f[..]),
                        });
                    }
                }
                PqAction::Install { psk, rekey } => self.install_psk(now, key, psk, rekey),
            }
        }
    }

    fn install_psk(&mut self, now: Instant, key: NodeKey, psk: hybrid::Psk, rekey: bool) {
        let fresh = self.peers.get(&key).is_some_and(|p| p.tunnel.is_none());
        if fresh {
            let tunnel = self.new_tunnel(key, Some(*psk.as_bytes()));
            let Some(peer) = self.peers.get_mut(&key) else {
                return;
            };
            peer.tunnel = Some(tunnel);
            info!(peer = %peer.node.name, role = ?peer.pq.role(), "post-quantum key installed; tunnel up");
            let waiting: Vec<Packet> = peer.waiting.drain(..).collect();
            for p in waiting {
                self.encapsulate(now, key, p);
            }
            return;
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(tunnel) = peer.tunnel.as_mut() else {
            return;
        };
        tunnel.set_psk(*psk.as_bytes());
        debug!(peer = %peer.node.name, "post-quantum key rotated");
        if rekey && let Some(init) = tunnel.initiate() {
            self.send_to_peer(now, key, init);
        }
    }

    /// A WireGuard tunnel to `key` keyed with `psk`.
    pub(super) fn new_tunnel(&mut self, key: NodeKey, psk: Option<[u8; 32]>) -> Tunnel {
        let jitter = super::rand_09_rng(&mut self.rng);
        Tunnel::new(
            &self.private,
            *key.as_bytes(),
            psk,
            self.index_table.clone(),
            std::sync::Arc::clone(&self.rate_limiter),
            jitter,
            self.tun_mtu,
        )
    }

    fn take_pq_token(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.pq_tokens_at)
            .as_secs_f64();
        self.pq_tokens_at = now;
        self.pq_tokens = (self.pq_tokens + elapsed * PQ_RATE).min(PQ_BURST);
        if self.pq_tokens >= 1.0 {
            self.pq_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether this node starts or answers exchanges with `key`.
    #[cfg(test)]
    pub(crate) fn pq_role(&self, key: NodeKey) -> Option<pq::Role> {
        self.peers.get(&key).map(|p| p.pq.role())
    }
}
