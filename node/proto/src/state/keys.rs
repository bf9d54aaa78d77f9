//! The post-quantum key schedule inside [`NodeState`]: handshake frames (admitted by
//! [`crate::admission`] before any public-key work), cookies, nudges and confirmations, tunnel
//! creation and key installation.

use std::time::Instant;

use gotatun::packet::Packet;
use hybrid::{Purpose, ResponderHandshake};
use tracing::{debug, info, trace};
use wire::NodeKey;
use wire::netmap::TunnelSecurity;

use super::NodeState;
use crate::addr::Addr;
use crate::admission::{ChunkVerdict, DropReason, Sender};
use crate::frame::{self, Chunk, Frame, Kind};
use crate::pq::{self, PqAction, PqError};
use crate::tunnel::Tunnel;

/// Message 1s one peer may have answered per second (after decryption), and the burst.
pub(super) const PEER_PQ_RATE: f64 = 2.0;
pub(super) const PEER_PQ_BURST: f64 = 10.0;
/// Partial reassemblies beyond which every sender must prove its address.
const REASSEMBLY_PRESSURE: usize = 32;

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
            Frame::Chunk(c) if c.kind == Kind::PqInit => self.handle_init_chunk(now, from, &c),
            Frame::Chunk(c) => self.handle_resp_chunk(now, from, &c),
            Frame::Cookie {
                session,
                index,
                sealed,
            } => {
                let Some(key) = self.pq_sessions.get(&session).copied() else {
                    self.counters.pq_rejected += 1;
                    return;
                };
                let Some(peer) = self.peers.get_mut(&key) else {
                    return;
                };
                match peer.pq.handle_cookie(now, session, index, sealed) {
                    Ok(actions) => {
                        trace!(peer = %key, "post-quantum cookie received");
                        self.apply_pq(now, key, actions);
                    }
                    Err(_) => self.counters.pq_rejected += 1,
                }
            }
        }
    }

    fn handle_init_chunk(&mut self, now: Instant, from: Addr, c: &Chunk<'_>) {
        let pressure = self.reassembly.len() >= REASSEMBLY_PRESSURE;
        let sender = self
            .claimed_peer(from)
            .map_or(Sender::Stranger, Sender::Peer);
        let proven = match self
            .admission
            .check_chunk(now, &mut self.rng, from, sender, c, pressure)
        {
            ChunkVerdict::Accept { proven } => proven,
            ChunkVerdict::Cookie(reply) => {
                self.counters.pq_cookies_sent += 1;
                self.transmits.push_back(super::Transmit {
                    dst: from,
                    payload: Packet::copy_from(&reply),
                    ttl: None,
                });
                return;
            }
            ChunkVerdict::Drop(DropReason::BadMac) => {
                self.counters.pq_bad_mac += 1;
                return;
            }
            ChunkVerdict::Drop(DropReason::RateLimited) => {
                self.counters.pq_rate_limited += 1;
                return;
            }
        };
        let Some(msg1) = self.reassembly.push(now, from, c) else {
            return;
        };
        if !self.admission.take_message(now, from, sender, proven) {
            self.counters.pq_rate_limited += 1;
            return;
        }
        self.handle_pq_init(now, from, c.session, &msg1);
    }

    fn handle_pq_init(&mut self, now: Instant, from: Addr, session: u32, msg1: &[u8]) {
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
        // Relayed messages name their sender: it must be the key inside.
        if let Addr::Relay(_, k) = from
            && k != key
        {
            self.counters.pq_rejected += 1;
            return;
        }
        if !peer.pq_tokens.take(now, PEER_PQ_RATE, PEER_PQ_BURST) {
            self.counters.pq_rate_limited += 1;
            return;
        }
        match peer.pq.handle_init(
            now,
            &mut self.rng,
            from,
            session,
            hash,
            responder,
            &init.payload,
        ) {
            Ok(actions) => self.apply_pq(now, key, actions),
            Err(PqError::Duplicate) => {
                trace!(peer = %key, %from, "post-quantum message 1 already answered");
            }
            Err(e) => {
                self.counters.pq_rejected += 1;
                debug!(peer = %key, error = %e, "post-quantum message 1 refused");
            }
        }
    }

    fn handle_resp_chunk(&mut self, now: Instant, from: Addr, c: &Chunk<'_>) {
        if !self.admission.mac1_ok(c) {
            self.counters.pq_bad_mac += 1;
            return;
        }
        // Only the exchange in flight with that session id is answered (one lookup).
        let Some(key) = self.pq_sessions.get(&c.session).copied() else {
            self.counters.pq_rejected += 1;
            return;
        };
        if let Addr::Relay(_, k) = from
            && k != key
        {
            self.counters.pq_rejected += 1;
            return;
        }
        let Some(msg2) = self.reassembly.push(now, from, c) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        match peer.pq.handle_resp(now, &msg2) {
            Ok(actions) => {
                self.learn_path(now, key, from, 0);
                self.apply_pq(now, key, actions);
            }
            Err(PqError::Authentication) => {
                // Forged or corrupted: ignored, the exchange stays in flight.
                self.counters.pq_rejected += 1;
                trace!(peer = %key, %from, "post-quantum message 2 did not authenticate");
            }
            Err(e) => {
                self.counters.pq_rejected += 1;
                self.sync_pq_session(key);
                debug!(peer = %key, error = %e, "post-quantum message 2 refused");
            }
        }
    }

    /// An authenticated nudge from `key`, sent at its clock `time`.
    pub(super) fn handle_pq_nudge(&mut self, now: Instant, key: NodeKey, time: u64) {
        if self.security == TunnelSecurity::ClassicalOnly {
            return;
        }
        let epoch = self.epoch(now);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.pq_wanted = true;
        match peer
            .pq
            .handle_nudge(now, &mut self.rng, &self.keypair, epoch, time)
        {
            Ok(actions) => {
                trace!(peer = %key, "post-quantum nudge");
                self.apply_pq(now, key, actions);
            }
            Err(PqError::TooSoon) => {}
            Err(e) => {
                self.counters.disco_stale += 1;
                debug!(peer = %key, error = %e, "post-quantum nudge ignored");
            }
        }
    }

    /// The initiator's key confirmation, from `from`.
    pub(super) fn handle_pq_confirm(
        &mut self,
        now: Instant,
        from: Addr,
        key: NodeKey,
        session: u32,
        tag: &[u8; 16],
    ) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        match peer.pq.handle_confirm(now, from, session, tag) {
            Ok(actions) => self.apply_pq(now, key, actions),
            Err(e) => {
                self.counters.pq_rejected += 1;
                debug!(peer = %key, error = %e, "post-quantum confirmation refused");
            }
        }
    }

    /// The responder's acknowledgement of our key confirmation.
    pub(super) fn handle_pq_confirm_ack(&mut self, key: NodeKey, session: u32, tag: &[u8; 16]) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if let Err(e) = peer.pq.handle_confirm_ack(session, tag) {
            self.counters.pq_rejected += 1;
            trace!(peer = %key, error = %e, "post-quantum confirmation ack refused");
        }
    }

    /// A tunnel to `key` is needed (traffic is waiting, or the peer talks to us with a key we
    /// do not have).
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

    /// A path to the peer just opened: a key exchange that is wanted but has no key yet
    /// retries at once over it (its first messages may have gone to a relay that is down).
    pub(super) fn pq_hurry(&mut self, now: Instant, key: NodeKey) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if !peer.pq_wanted || peer.pq.established() {
            return;
        }
        peer.pq.hurry(now);
        self.pq_want(now, key);
        self.pq_timers(now, key);
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
                        break;
                    };
                    let targets = peer
                        .path
                        .targets(now, key, self.local_for(&peer.node), true);
                    for f in &frames {
                        for dst in &targets {
                            self.transmits.push_back(super::Transmit {
                                dst: *dst,
                                payload: Packet::copy_from(&f[..]),
                                ttl: None,
                            });
                        }
                    }
                }
                PqAction::Reply(dst, frames) => {
                    for f in frames {
                        self.transmits.push_back(super::Transmit {
                            dst,
                            payload: Packet::copy_from(&f[..]),
                            ttl: None,
                        });
                    }
                }
                PqAction::SendDisco(msg) => {
                    let Some(peer) = self.peers.get(&key) else {
                        break;
                    };
                    let targets = peer
                        .path
                        .targets(now, key, self.local_for(&peer.node), true);
                    for dst in targets {
                        self.send_disco(key, dst, &msg);
                    }
                }
                PqAction::ReplyDisco(dst, msg) => self.send_disco(key, dst, &msg),
                PqAction::Install { psk, rekey } => self.install_psk(now, key, psk, rekey),
                PqAction::Confirmed { from } => {
                    self.learn_path(now, key, from, 0);
                    let held = self
                        .peers
                        .get_mut(&key)
                        .and_then(|p| p.held_handshake.take());
                    if let Some((at, held_from, packet)) = held
                        && now.saturating_duration_since(at) < pq::HOLD_FOR_CONFIRM
                    {
                        trace!(peer = %key, "releasing the WireGuard handshake held for the key");
                        self.handle_wireguard(now, held_from, packet, None);
                    }
                }
            }
        }
        self.sync_pq_session(key);
    }

    /// Keeps the session-id index in step with the peer's exchange in flight.
    pub(super) fn sync_pq_session(&mut self, key: NodeKey) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let now_session = peer.pq.pending_session();
        if peer.pq_session == now_session {
            return;
        }
        if let Some(old) = peer.pq_session.take()
            && self.pq_sessions.get(&old) == Some(&key)
        {
            self.pq_sessions.remove(&old);
        }
        if let Some(s) = now_session {
            self.pq_sessions.insert(s, key);
        }
        peer.pq_session = now_session;
    }

    fn install_psk(&mut self, now: Instant, key: NodeKey, psk: hybrid::Psk, rekey: bool) {
        self.events.push_back(super::Event::PskInstalled {
            peer: key,
            psk: psk.clone(),
        });
        let fresh = self.peers.get(&key).is_some_and(|p| p.tunnel.is_none());
        if fresh {
            let tunnel = self.new_tunnel(now, key, Some(*psk.as_bytes()));
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
        if rekey && let Some(init) = tunnel.initiate(now) {
            self.send_to_peer(now, key, init);
        }
    }

    /// A WireGuard tunnel to `key` keyed with `psk`.
    pub(super) fn new_tunnel(
        &mut self,
        now: Instant,
        key: NodeKey,
        psk: Option<[u8; 32]>,
    ) -> Tunnel {
        let mut seed = [0u8; 32];
        rand::Rng::fill_bytes(&mut self.rng, &mut seed);
        Tunnel::new(
            std::sync::Arc::clone(&self.identity),
            *key.as_bytes(),
            psk,
            self.index_table.clone(),
            seed,
            self.tun_mtu,
            now,
            std::time::Duration::from_millis(self.epoch(now)),
        )
    }

    /// Whether this node starts or answers exchanges with `key`.
    #[cfg(test)]
    pub(crate) fn pq_role(&self, key: NodeKey) -> Option<pq::Role> {
        self.peers.get(&key).map(|p| p.pq.role())
    }
}
