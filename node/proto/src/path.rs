//! Path selection for one peer (sans-IO): which way its packets go right now, and which disco
//! probes to send to find a better way.
//!
//! - Traffic starts on a relay (when one is up) and moves to a direct path the moment a pong
//!   comes back on one (or an authenticated WireGuard packet arrives on one).
//! - A direct path is *trusted* while a pong to one of our pings came back on it within
//!   [`TRUST`] (a round trip: receiving the peer's packets alone says nothing about whether
//!   ours get through); while the peer is active it is heartbeated every [`HEARTBEAT`]. An
//!   untrusted path carries traffic together with the relay until nothing authenticated has
//!   arrived on it for [`STALE`], then only the relay does.
//! - A heartbeat whose pong is overdue ([`PONG_WAIT`], or three round trips) makes the path
//!   *suspect*: traffic goes through the relay as well at once, and the heartbeat is repeated.
//!   A second overdue pong means the path went quiet (a NAT rebound and moved its port, or
//!   the network changed): it is no longer trusted, a probe round starts, and the node is
//!   told ([`PathAction::Quiet`]) so it re-learns its own endpoints and tells the peer. While
//!   the peer's packets still arrive on the path, only a fourth ([`QUIET_HEARD`]) does: two
//!   lost pongs on a lossy but working link are no rebinding.
//! - Without a trusted direct path, probe rounds repeat every [`PROBE_FAST`] for the first
//!   rounds, then every [`PROBE_SLOW`] while traffic flows. No packet of ours may reach the
//!   peer's router before that router has a mapping toward our endpoint: a router that
//!   accepts unsolicited packets on its WAN side (a Docker host, a cloud VM without a
//!   firewall) keeps a conntrack entry for them and gives its host's own flow toward us
//!   another port, for as long as we keep sending. So:
//!   - a round sends *primers* to every candidate (pings with an IP TTL of [`PRIMER_TTL`],
//!     which open this node's own NAT mapping toward the candidate and die on the way, before
//!     the peer's router), then a call-me-maybe through the relay naming our endpoints (once
//!     our first netcheck has found our public one);
//!   - the peer answers a call by priming its own NAT toward them and replying with a
//!     call-me-maybe of its own marked as a reply;
//!   - a reply means the peer's NAT is primed toward us: prime toward what it names, and ping.
//!
//!   Without a relay the pings go at once. A call that no reply answers within
//!   [`CALL_TIMEOUT`] means the relay may be down without our knowing yet (a coordinator
//!   outage takes its embedded relay along): the round's pings go anyway, and handshakes also
//!   go to every candidate, until something from the peer comes through the relay again.
//! - Hard NAT (endpoint-dependent mapping) on one side only: the hard side pings the easy
//!   side's public endpoints from [`AUX_SOCKETS`] extra sockets (each gets its own NAT
//!   mapping) and says so in its call-me-maybe; the easy side then sprays [`SPRAY_PROBES`]
//!   pings at random ports of the hard side's public IP. With 256 open mappings, 2,048
//!   probes hit one with probability above 99.9%.
//! - The best path wins by latency, with hysteresis ([`SWITCH_RATIO`]), so two working paths
//!   do not flap.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};
use wire::{NatInfo, RelayId};

use crate::addr::{Addr, SockId};

/// A direct path is trusted this long after something authenticated arrived on it.
pub const TRUST: Duration = Duration::from_secs(3);
/// An untrusted direct path is dropped this long after its last authenticated packet.
pub const STALE: Duration = Duration::from_secs(10);
/// Heartbeat interval on the direct path while the peer is active.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A heartbeat's pong is overdue after this long, or after three round trips if longer.
pub const PONG_WAIT: Duration = Duration::from_millis(200);
/// Overdue heartbeats in a row that make a path quiet although the peer's packets still
/// arrive on it (a path that works only inward); two make it quiet otherwise.
pub const QUIET_HEARD: u8 = 4;
/// A peer is active this long after we sent it something.
pub const ACTIVE: Duration = Duration::from_secs(5);
/// Probe interval for the first [`FAST_ROUNDS`] rounds without a direct path.
pub const PROBE_FAST: Duration = Duration::from_secs(2);
/// Probe interval after that, while traffic flows.
pub const PROBE_SLOW: Duration = Duration::from_secs(15);
/// Rounds without a direct path probed every [`PROBE_FAST`] before [`PROBE_SLOW`].
pub const FAST_ROUNDS: u32 = 5;
/// The IP TTL of a primer: past this node's own router, and no further.
pub const PRIMER_TTL: u8 = 2;
/// A call-me-maybe without a reply after this long: the relay may be down.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Extra sockets a hard-NAT side opens towards an easy-NAT peer.
pub const AUX_SOCKETS: u16 = 256;
/// Pings an easy-NAT side sprays at a hard-NAT peer's public IP per attempt.
pub const SPRAY_PROBES: u32 = 2048;
/// Spray pings per timer tick (250 ms): an attempt takes about two seconds.
const SPRAY_PER_TICK: u32 = 256;
/// At most one spray per peer per this interval.
const SPRAY_INTERVAL: Duration = Duration::from_secs(10);
/// A new path must be this much faster to replace a trusted one.
pub const SWITCH_RATIO: f64 = 0.8;
/// Outstanding probes remembered (a spray's worth and a little more).
const MAX_PROBES: usize = 4096;
/// Probes older than this are forgotten.
const PROBE_TTL: Duration = Duration::from_secs(10);
/// Endpoints learned from call-me-maybes, most recent kept.
const MAX_EXTRA: usize = 16;

/// Something the node should send for this peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAction {
    /// A disco ping with transaction id `tx` to a UDP address.
    Ping {
        /// Where (and from which socket).
        to: Addr,
        /// Transaction id.
        tx: [u8; 12],
    },
    /// A primer: a disco ping to a UDP address with an IP TTL of [`PRIMER_TTL`] (its pong,
    /// should one come back from a peer only a hop away, is not awaited).
    Prime {
        /// Where.
        to: Addr,
        /// Transaction id.
        tx: [u8; 12],
    },
    /// A call-me-maybe through `relay`.
    CallMeMaybe {
        /// The relay.
        relay: RelayId,
        /// Whether to say we are behind a hard NAT (and have opened extra ports).
        hard: bool,
        /// Whether it answers the peer's call (our NAT is primed toward it).
        reply: bool,
    },
    /// The trusted direct path went quiet: re-learn this node's own endpoints now (the NAT
    /// may have moved its port), so the next call-me-maybes carry the new ones.
    Quiet,
    /// A call-me-maybe went unanswered: the relay may be down, so what went only through it
    /// (a key exchange) should go again, to the candidates too.
    RelayDoubted,
}

/// How a peer is reached, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    /// Directly, at this address from this socket.
    Direct(SockId, SocketAddr),
    /// Through this relay.
    Relay(RelayId),
    /// Not at all yet.
    None,
}

#[derive(Debug, Clone, Copy)]
struct Best {
    sock: SockId,
    addr: SocketAddr,
    latency: Option<Duration>,
    /// Last authenticated packet (WireGuard or disco) that arrived on it.
    last_rx: Instant,
    /// Last pong on it: proof that our packets get through.
    last_pong: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    tx: [u8; 12],
    sock: SockId,
    addr: SocketAddr,
    sent: Instant,
}

/// Facts about this node that path decisions depend on.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    /// The relay to reach this peer through, if any is up.
    pub relay: Option<RelayId>,
    /// Whether any relay is known at all (without relays, paths fall back to endpoints).
    pub relays_known: bool,
    /// This node's NAT, as its netcheck measured it.
    pub nat: Option<&'a NatInfo>,
    /// Whether this node's public endpoint is still being measured (its first netcheck has
    /// not reported): a call-me-maybe now could not name it.
    pub endpoints_pending: bool,
}

impl Local<'_> {
    fn hard(&self) -> bool {
        self.nat.is_some_and(NatInfo::is_hard)
    }
}

/// One peer's path state.
#[derive(Debug, Clone, Default)]
pub struct PathState {
    endpoints: Vec<SocketAddr>,
    extra: VecDeque<SocketAddr>,
    peer_nat: Option<NatInfo>,
    best: Option<Best>,
    probes: VecDeque<Probe>,
    last_auth_rx: Option<Instant>,
    last_relay_rx: Option<Instant>,
    active_until: Option<Instant>,
    next_heartbeat: Option<Instant>,
    next_probe: Option<Instant>,
    rounds: u32,
    spray: Option<(IpAddr, u32)>,
    last_spray: Option<Instant>,
    aux_until: Option<Instant>,
    next_aux: Option<Instant>,
    aux_at: Option<Instant>,
    reprobe: bool,
    probing_since: Option<Instant>,
    /// When the pong to the heartbeat awaited on the trusted path is overdue (any pong on
    /// that path settles it).
    pong_due: Option<Instant>,
    /// Overdue heartbeats in a row (one makes the path suspect, two quiet; four when the
    /// peer's packets still arrive on the path).
    missed: u8,
    /// When the path became suspect (its first overdue heartbeat).
    suspect_since: Option<Instant>,
    /// When our last call-me-maybe went, while its reply is awaited.
    called_at: Option<Instant>,
    /// A call went unanswered: the relay may be down, so do not count on it alone.
    relay_doubted: bool,
}

fn direct(sock: SockId, addr: SocketAddr) -> Addr {
    Addr::Udp(sock, addr)
}

/// A primer to `addr` from the main socket.
fn prime(rng: &mut impl Rng, addr: SocketAddr) -> PathAction {
    PathAction::Prime {
        to: direct(SockId::Main, addr),
        tx: rng.random(),
    }
}

impl PathState {
    /// Replaces the peer's reported endpoints.
    pub fn set_endpoints(&mut self, mut endpoints: Vec<SocketAddr>) {
        endpoints.dedup();
        endpoints.truncate(MAX_EXTRA);
        if endpoints != self.endpoints {
            self.endpoints = endpoints;
            // New candidates: probe them at the next tick if we are still looking.
            self.reprobe = true;
        }
    }

    /// The peer's NAT as it reported it.
    pub fn set_peer_nat(&mut self, nat: Option<NatInfo>) {
        self.peer_nat = nat;
    }

    /// The peer's endpoints plus those learned from it.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut all = self.endpoints.clone();
        for e in &self.extra {
            if !all.contains(e) {
                all.push(*e);
            }
        }
        all
    }

    fn add_extra(&mut self, a: SocketAddr) {
        if self.endpoints.contains(&a) || self.extra.contains(&a) {
            return;
        }
        if self.extra.len() >= MAX_EXTRA {
            self.extra.pop_front();
        }
        self.extra.push_back(a);
    }

    fn trusted(&self, now: Instant) -> Option<Best> {
        self.best.filter(|b| {
            b.last_pong
                .is_some_and(|t| now.saturating_duration_since(t) < TRUST)
        })
    }

    /// The one place packets for the peer go while it has a trusted direct path (and no
    /// missed answers, or no relay to fall back on): [`PathState::targets`]' first case,
    /// without a list.
    pub fn sole_target(&self, now: Instant, local: Local<'_>) -> Option<Addr> {
        self.trusted(now)
            .filter(|_| self.missed == 0 || local.relay.is_none())
            .map(|b| direct(b.sock, b.addr))
    }

    /// Where packets for the peer go now. `control` marks handshakes and key exchanges,
    /// which without any relay go to every candidate so whichever works can answer.
    pub fn targets(
        &self,
        now: Instant,
        peer: wire::NodeKey,
        local: Local<'_>,
        control: bool,
    ) -> Vec<Addr> {
        if let Some(a) = self.sole_target(now, local) {
            return vec![a];
        }
        let mut out = Vec::new();
        if let Some(b) = self.best {
            out.push(direct(b.sock, b.addr));
        }
        if let Some(r) = local.relay {
            out.push(Addr::Relay(r, peer));
        }
        // Without a relay, control messages (handshakes, key exchanges) go to every
        // candidate, so the first exchange completes over whichever path works, and data
        // without any path tries the first candidate. With a relay nothing goes to a
        // candidate before probing found it: an unprimed packet can spoil the peer's NAT
        // mapping (see the module docs).
        let cands = self.candidates();
        let take = if local.relay.is_some() && !self.relay_doubted {
            0
        } else if control {
            cands.len()
        } else if out.is_empty() {
            1
        } else {
            0
        };
        for c in cands.into_iter().take(take) {
            let a = direct(SockId::Main, c);
            if !out.contains(&a) {
                out.push(a);
            }
        }
        let _ = local.relays_known;
        out
    }

    /// We are sending the peer something: it is active (heartbeats, probing).
    pub fn on_send(&mut self, now: Instant) {
        let was_active = self.active_until.is_some_and(|t| t > now);
        self.active_until = Some(now + ACTIVE);
        if !was_active && self.trusted(now).is_none() {
            // Traffic (re)starts without a trusted direct path: probe now.
            self.next_probe = Some(now);
            self.rounds = 0;
        }
    }

    /// An authenticated packet (WireGuard, or a pong to our ping) arrived from `from`.
    /// Returns whether the path the peer is reached on changed.
    pub fn on_auth_rx(&mut self, now: Instant, from: Addr) -> bool {
        self.last_auth_rx = Some(now);
        match from {
            Addr::Relay(..) => {
                self.last_relay_rx = Some(now);
                self.relay_doubted = false;
                false
            }
            Addr::Udp(sock, addr) => match &mut self.best {
                Some(b) if b.sock == sock && b.addr == addr => {
                    b.last_rx = now;
                    false
                }
                // The best path keeps its place unless it has gone quiet (the peer's NAT
                // rebound, or it moved): then the source that works now takes over, untrusted
                // until a pong confirms it (the heartbeat asks at once).
                Some(b)
                    if now.saturating_duration_since(b.last_rx) < Duration::from_millis(500) =>
                {
                    false
                }
                _ => {
                    self.best = Some(Best {
                        sock,
                        addr,
                        latency: None,
                        last_rx: now,
                        last_pong: None,
                    });
                    self.next_heartbeat = None;
                    true
                }
            },
        }
    }

    /// A pong with `tx` arrived from `from`. Returns `Some(changed)` if it answered one of
    /// our pings.
    pub fn on_pong(&mut self, now: Instant, tx: &[u8; 12], from: Addr) -> Option<bool> {
        let i = self.probes.iter().position(|p| &p.tx == tx)?;
        let p = self.probes.remove(i)?;
        let Addr::Udp(sock, addr) = from else {
            return Some(false);
        };
        // The pong must come back the way the ping went: same socket, same address.
        if sock != p.sock || addr != p.addr {
            return Some(false);
        }
        self.last_auth_rx = Some(now);
        let latency = now.saturating_duration_since(p.sent);
        let better = match self.best {
            None => true,
            Some(b) if b.sock == sock && b.addr == addr => {
                let was_trusted = self.trusted(now).is_some();
                self.missed = 0;
                self.pong_due = None;
                if let Some(best) = &mut self.best {
                    best.last_rx = now;
                    best.last_pong = Some(now);
                    best.latency = Some(latency);
                }
                self.probing_since = None;
                return Some(!was_trusted);
            }
            Some(b) => {
                self.trusted(now).is_none()
                    || self.missed > 0
                    || b.latency.is_none_or(|l| {
                        latency.as_secs_f64() < l.as_secs_f64() * SWITCH_RATIO
                            && latency + Duration::from_millis(1) < l
                    })
            }
        };
        if better {
            self.best = Some(Best {
                sock,
                addr,
                latency: Some(latency),
                last_rx: now,
                last_pong: Some(now),
            });
            self.probing_since = None;
            self.spray = None;
            self.missed = 0;
            self.pong_due = None;
        }
        Some(better)
    }

    /// The peer pinged us from `from` (a UDP address). We answer (the caller sends the pong)
    /// and ping it back; the address becomes a path only if our ping's pong comes back from
    /// it, never from the ping alone (the source of a ping can be forged, and a ping replayed
    /// from anywhere).
    pub fn on_ping(&mut self, now: Instant, rng: &mut impl Rng, from: Addr) -> Vec<PathAction> {
        let Addr::Udp(sock, addr) = from else {
            return Vec::new();
        };
        if self
            .trusted(now)
            .is_some_and(|b| b.sock == sock && b.addr == addr)
        {
            return Vec::new();
        }
        vec![self.ping(now, rng, sock, addr)]
    }

    /// The peer sent a (fresh, authenticated) call-me-maybe: ping its endpoints now; if it is
    /// behind a hard NAT and we are not, spray its public IP, but only an IP the coordinator
    /// reported for it, so a peer cannot aim the spray at anyone else.
    #[allow(clippy::too_many_arguments)]
    pub fn on_call_me_maybe(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        local: Local<'_>,
        endpoints: &[SocketAddr],
        hard: bool,
        public_ip: Option<IpAddr>,
        reply: bool,
    ) -> Vec<PathAction> {
        for e in endpoints {
            self.add_extra(*e);
        }
        // It came through the relay: the relay works.
        self.relay_doubted = false;
        if reply {
            self.called_at = None;
        }
        let trusted = self.trusted(now);
        // Where to open our NAT: every candidate, or while our path works (the peer looks
        // for one anyway: its side may have moved) what it names besides our path.
        let targets: Vec<SocketAddr> = match trusted {
            Some(b) => endpoints.iter().copied().filter(|e| *e != b.addr).collect(),
            None => self.candidates(),
        };
        let mut out: Vec<PathAction> = targets.iter().map(|t| prime(rng, *t)).collect();
        match local.relay {
            // A reply: the peer's NAT is primed toward us. Without a relay to answer through,
            // there is nothing better than pinging now either.
            relay if reply || relay.is_none() => {
                for t in targets {
                    out.push(self.ping(now, rng, SockId::Main, t));
                }
            }
            // A call, before our own endpoints are known: our probe round calls back once
            // they are.
            _ if local.endpoints_pending => self.reprobe = true,
            // A call: answer, primed; the peer pings when the answer arrives.
            Some(relay) => out.push(PathAction::CallMeMaybe {
                relay,
                hard: false,
                reply: true,
            }),
            None => {}
        }
        if trusted.is_some() {
            return out;
        }
        // We are the hard side and the peer is not: unless the plain pings get through within
        // a second, open our extra mappings towards it and ask it to spray (it only sprays for
        // a call-me-maybe that says we are hard).
        if local.hard() && !hard && self.aux_until.is_none() && self.aux_at.is_none() {
            self.aux_at = Some(now + Duration::from_secs(1));
        }
        if hard
            && !local.hard()
            && let Some(ip) = public_ip
            && self.reported_ip(ip)
            && self
                .last_spray
                .is_none_or(|t| now.saturating_duration_since(t) >= SPRAY_INTERVAL)
        {
            self.last_spray = Some(now);
            self.spray = Some((ip, SPRAY_PROBES));
        }
        out
    }

    fn ping(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        sock: SockId,
        addr: SocketAddr,
    ) -> PathAction {
        let tx: [u8; 12] = rng.random();
        if self.probes.len() >= MAX_PROBES {
            self.probes.pop_front();
        }
        self.probes.push_back(Probe {
            tx,
            sock,
            addr,
            sent: now,
        });
        PathAction::Ping {
            to: direct(sock, addr),
            tx,
        }
    }

    /// Timers: heartbeats, probe rounds, spraying, extra-socket pings. Call every tick.
    pub fn poll(&mut self, now: Instant, rng: &mut impl Rng, local: Local<'_>) -> Vec<PathAction> {
        let mut out = Vec::new();
        while self
            .probes
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.sent) > PROBE_TTL)
        {
            self.probes.pop_front();
        }
        if self
            .best
            .is_some_and(|b| now.saturating_duration_since(b.last_rx) >= STALE)
        {
            self.best = None;
        }
        let active = self.active_until.is_some_and(|t| t > now);
        if let Some(due) = self.pong_due
            && due <= now
        {
            self.pong_due = None;
            self.missed = self.missed.saturating_add(1);
            if let Some(b) = self.trusted(now) {
                if self.missed == 1 {
                    self.suspect_since = Some(now);
                }
                // The peer's packets still arriving on the path since it became suspect say
                // it works at least inward (a rebinding on either side would stop them): on a
                // lossy link two lost pongs in a row are no reason to leave it.
                let still_heard = self.suspect_since.is_some_and(|t| b.last_rx > t);
                if self.missed == 1 || (still_heard && self.missed < QUIET_HEARD) {
                    // Suspect: the relay carries traffic too while we ask again at once.
                    let tx = self.heartbeat(now, rng, b);
                    out.push(tx);
                } else {
                    // Quiet: no longer trusted; look for a path and re-learn our endpoints.
                    if let Some(best) = &mut self.best {
                        best.last_pong = None;
                    }
                    self.missed = 0;
                    self.next_probe = Some(now);
                    self.rounds = 0;
                    out.push(PathAction::Quiet);
                }
            }
        }
        if std::mem::take(&mut self.reprobe) && active && self.trusted(now).is_none() {
            self.next_probe = Some(now);
        }
        if let Some(b) = self.trusted(now) {
            if active && self.pong_due.is_none() && self.next_heartbeat.is_none_or(|t| t <= now) {
                out.push(self.heartbeat(now, rng, b));
            }
        } else if let Some(b) = self.best {
            // Untrusted: ask it at once whether it still works.
            if self.next_heartbeat.is_none_or(|t| t <= now) {
                self.next_heartbeat = Some(now + HEARTBEAT);
                out.push(self.ping(now, rng, b.sock, b.addr));
            }
        }
        if self.trusted(now).is_none() && active && self.next_probe.is_none_or(|t| t <= now) {
            self.rounds += 1;
            let wait = if self.rounds <= FAST_ROUNDS {
                PROBE_FAST
            } else {
                PROBE_SLOW
            };
            self.next_probe = Some(now + wait);
            self.probing_since.get_or_insert(now);
            out.extend(self.probe_round(now, rng, local));
        }
        // No reply to our call: the relay may be down. Ping without waiting for the peer,
        // and let handshakes try the candidates too.
        if let Some(at) = self.called_at
            && now.saturating_duration_since(at) >= CALL_TIMEOUT
        {
            self.called_at = None;
            if self.trusted(now).is_none() {
                self.relay_doubted = true;
                for c in self.candidates() {
                    out.push(self.ping(now, rng, SockId::Main, c));
                }
                out.push(PathAction::RelayDoubted);
            }
        }
        if let Some(at) = self.aux_at
            && at <= now
        {
            self.aux_at = None;
            if self.trusted(now).is_none() && self.aux_until.is_none() {
                self.start_aux(now);
                out.extend(self.aux_pings(now, rng));
                if let Some(r) = local.relay {
                    out.push(PathAction::CallMeMaybe {
                        relay: r,
                        hard: true,
                        reply: false,
                    });
                }
            }
        }
        // Keep the hard-NAT side's extra mappings open while it waits for a spray to hit.
        if let Some(until) = self.aux_until {
            if now >= until || self.trusted(now).is_some() {
                self.aux_until = None;
            } else if self.next_aux.is_some_and(|t| t <= now) {
                self.next_aux = Some(now + Duration::from_secs(3));
                out.extend(self.aux_pings(now, rng));
            }
        }
        if let Some((ip, left)) = self.spray {
            let n = left.min(SPRAY_PER_TICK);
            for _ in 0..n {
                let port: u16 = rng.random_range(1024..=u16::MAX);
                out.push(self.ping(now, rng, SockId::Main, SocketAddr::new(ip, port)));
            }
            self.spray = (left > n).then_some((ip, left - n));
        }
        out
    }

    /// A heartbeat ping on the trusted path, whose pong is then awaited.
    fn heartbeat(&mut self, now: Instant, rng: &mut impl Rng, b: Best) -> PathAction {
        self.next_heartbeat = Some(now + HEARTBEAT);
        let wait = b.latency.map_or(PONG_WAIT, |l| (l * 3).max(PONG_WAIT));
        self.pong_due = Some(now + wait);
        self.ping(now, rng, b.sock, b.addr)
    }

    /// Our own endpoints changed (a netcheck saw a new public port): if still looking for a
    /// path, probe again at once so the peer hears of them.
    pub fn own_endpoints_changed(&mut self) {
        self.reprobe = true;
    }

    fn probe_round(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        local: Local<'_>,
    ) -> Vec<PathAction> {
        let cands = self.candidates();
        let mut out: Vec<PathAction> = cands.iter().map(|c| prime(rng, *c)).collect();
        // Without a relay there is no one to call: ping now. With one, our pings wait for the
        // peer's reply (see the module docs).
        if local.relay.is_none() {
            for c in cands {
                out.push(self.ping(now, rng, SockId::Main, c));
            }
        }
        let peer_hard = self.peer_nat.as_ref().is_some_and(NatInfo::is_hard);
        let hard_mode = local.hard() && !peer_hard;
        // The first round tries the main socket alone (enough unless the peer filters);
        // from the second on, the hard side opens its extra mappings.
        if hard_mode && self.rounds >= 2 && self.aux_until.is_none() {
            self.start_aux(now);
            out.extend(self.aux_pings(now, rng));
        }
        if let Some(r) = local.relay
            && !local.endpoints_pending
        {
            // Ask for a spray only once our extra mappings exist for it to hit.
            out.push(PathAction::CallMeMaybe {
                relay: r,
                hard: hard_mode && self.aux_until.is_some(),
                reply: false,
            });
            self.called_at.get_or_insert(now);
        }
        out
    }

    fn start_aux(&mut self, now: Instant) {
        self.aux_until = Some(now + Duration::from_secs(20));
        self.next_aux = Some(now + Duration::from_secs(3));
    }

    /// Whether the coordinator reported `ip` for this peer (its public IP, or the IP of one
    /// of its endpoints).
    fn reported_ip(&self, ip: IpAddr) -> bool {
        self.peer_nat.as_ref().and_then(|n| n.public_ip) == Some(ip)
            || self.endpoints.iter().any(|e| e.ip() == ip)
    }

    /// Pings from every extra socket to the peer's public endpoints (those the coordinator
    /// reported, outside private ranges: never addresses a peer's message named).
    fn aux_pings(&mut self, now: Instant, rng: &mut impl Rng) -> Vec<PathAction> {
        let public: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .copied()
            .filter(|a| match self.peer_nat.as_ref().and_then(|n| n.public_ip) {
                Some(ip) => a.ip() == ip,
                None => !is_private(a.ip()),
            })
            .collect();
        let mut out = Vec::new();
        for i in 0..AUX_SOCKETS {
            for a in &public {
                out.push(self.ping(now, rng, SockId::Aux(i), *a));
            }
        }
        out
    }

    /// Whether `a` is where this peer's packets are known or expected to come from.
    pub fn knows(&self, a: SocketAddr) -> bool {
        self.best.is_some_and(|b| b.addr == a)
            || self.endpoints.contains(&a)
            || self.extra.contains(&a)
    }

    /// The current path.
    pub fn current(&self, now: Instant, local: Local<'_>) -> Current {
        if let Some(b) = self.trusted(now) {
            return Current::Direct(b.sock, b.addr);
        }
        match local.relay {
            Some(r) => Current::Relay(r),
            None => match self.best {
                Some(b) => Current::Direct(b.sock, b.addr),
                None => Current::None,
            },
        }
    }

    /// The measured latency of the direct path.
    pub fn latency(&self) -> Option<Duration> {
        self.best.and_then(|b| b.latency)
    }

    /// When something authenticated last arrived from the peer.
    pub fn last_authenticated(&self) -> Option<Instant> {
        self.last_auth_rx
    }

    /// Why the peer is not reached directly, for status.
    pub fn relay_reason(&self, now: Instant, local: Local<'_>) -> String {
        let peer = self.peer_nat.as_ref();
        if local.endpoints_pending {
            return "finding this node's public address (its first netcheck has not finished)"
                .into();
        }
        if local.nat.is_some_and(|n| !n.udp) {
            return "UDP looks blocked on this network".into();
        }
        if peer.is_some_and(|n| !n.udp) {
            return "UDP looks blocked on the peer's network".into();
        }
        if local.hard() && peer.is_some_and(NatInfo::is_hard) {
            return "both sides are behind hard (endpoint-dependent) NATs".into();
        }
        if self.endpoints.is_empty() && self.extra.is_empty() {
            return "the peer reported no endpoints".into();
        }
        if self
            .probing_since
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(10))
        {
            return "probing for a direct path".into();
        }
        if local.hard() || peer.is_some_and(NatInfo::is_hard) {
            return "one side is behind a hard NAT and port probing has not connected yet".into();
        }
        "no direct path answered (a firewall may drop UDP between the two)".into()
    }
}

/// Whether `ip` is a private, loopback or link-local address (not reachable from outside).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn local() -> Local<'static> {
        Local {
            relay: Some(RelayId(0)),
            relays_known: true,
            nat: None,
            endpoints_pending: false,
        }
    }

    /// Pings `addr` and answers the ping after `rtt`.
    fn probe(
        p: &mut PathState,
        now: Instant,
        rng: &mut StdRng,
        addr: SocketAddr,
        rtt: Duration,
    ) -> Option<bool> {
        let PathAction::Ping { tx, .. } = p.ping(now, rng, SockId::Main, addr) else {
            unreachable!()
        };
        p.on_pong(now + rtt, &tx, Addr::main(addr))
    }

    #[test]
    fn a_faster_path_replaces_the_best_only_when_clearly_faster() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(1);
        let mut p = PathState::default();
        let (a, b): (SocketAddr, SocketAddr) = (
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.2:1".parse().unwrap(),
        );
        assert_eq!(
            probe(&mut p, now, &mut rng, a, Duration::from_millis(10)),
            Some(true)
        );
        assert_eq!(p.current(now, local()), Current::Direct(SockId::Main, a));
        // 9 ms is not enough better; 5 ms is.
        assert_eq!(
            probe(&mut p, now, &mut rng, b, Duration::from_millis(9)),
            Some(false)
        );
        assert_eq!(
            probe(&mut p, now, &mut rng, b, Duration::from_millis(5)),
            Some(true)
        );
        assert_eq!(p.current(now, local()), Current::Direct(SockId::Main, b));
        // A pong for an unknown transaction, or from elsewhere, changes nothing.
        assert_eq!(p.on_pong(now, &[0; 12], Addr::main(a)), None);
        let PathAction::Ping { tx, .. } = p.ping(now, &mut rng, SockId::Main, a) else {
            unreachable!()
        };
        assert_eq!(
            p.on_pong(now, &tx, Addr::main("192.0.2.9:9".parse().unwrap())),
            Some(false)
        );
    }

    #[test]
    fn a_ping_alone_never_makes_its_source_a_candidate() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(3);
        let mut p = PathState::default();
        let real: SocketAddr = "198.51.100.2:41641".parse().unwrap();
        p.set_endpoints(vec![real]);
        let forged: SocketAddr = "203.0.113.66:4444".parse().unwrap();
        // We ping back to check the address...
        let out = p.on_ping(now, &mut rng, Addr::main(forged));
        assert!(matches!(&out[..], [PathAction::Ping { to, .. }] if *to == Addr::main(forged)));
        // ...but it is no candidate, and handshakes and key exchanges do not go there.
        assert!(!p.candidates().contains(&forged));
        let key = wire::NodeKey::from_bytes([1; 32]);
        assert!(
            !p.targets(now, key, local(), true)
                .contains(&Addr::main(forged))
        );
        // Only a pong from it makes it a path.
        let PathAction::Ping { tx, .. } = out[0] else {
            unreachable!()
        };
        assert_eq!(p.on_pong(now, &tx, Addr::main(forged)), Some(true));
    }

    #[test]
    fn a_call_me_maybe_sprays_only_at_an_ip_the_coordinator_reported() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(4);
        let public: IpAddr = "198.51.100.2".parse().unwrap();
        let victim: IpAddr = "192.0.2.200".parse().unwrap();
        for (claimed, sprays) in [(victim, false), (public, true)] {
            let mut p = PathState::default();
            p.set_endpoints(vec![SocketAddr::new(public, 41641)]);
            p.set_peer_nat(Some(NatInfo {
                udp: true,
                mapping_varies: Some(true),
                public_ip: Some(public),
                port_mapped: None,
            }));
            p.on_call_me_maybe(now, &mut rng, local(), &[], true, Some(claimed), false);
            let mut at_claimed = 0;
            for i in 0..20 {
                let t = now + Duration::from_millis(250 * i);
                for a in p.poll(t, &mut rng, local()) {
                    if let PathAction::Ping { to, .. } = a
                        && to.udp().is_some_and(|u| u.ip() == claimed)
                    {
                        at_claimed += 1;
                    }
                }
            }
            if sprays {
                assert_eq!(at_claimed, SPRAY_PROBES, "the reported IP is sprayed");
            } else {
                assert_eq!(at_claimed, 0, "a spray was aimed at {claimed}");
            }
        }
    }

    #[test]
    fn trust_lapses_to_relay_plus_direct_then_to_relay_alone() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(2);
        let mut p = PathState::default();
        let key = wire::NodeKey::from_bytes([1; 32]);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(
            p.targets(now, key, local(), false),
            vec![Addr::Relay(RelayId(0), key)]
        );
        probe(&mut p, now, &mut rng, a, Duration::from_millis(3));
        assert_eq!(p.targets(now, key, local(), false), vec![Addr::main(a)]);
        let later = now + TRUST + Duration::from_millis(10);
        assert_eq!(
            p.targets(later, key, local(), false),
            vec![Addr::main(a), Addr::Relay(RelayId(0), key)]
        );
        let gone = now + STALE + Duration::from_millis(10);
        p.poll(gone, &mut rng, local());
        assert_eq!(
            p.targets(gone, key, local(), false),
            vec![Addr::Relay(RelayId(0), key)]
        );
    }

    #[test]
    fn a_path_the_peer_is_still_heard_on_goes_quiet_only_after_four_lost_pongs() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(4);
        let mut p = PathState::default();
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        probe(&mut p, now, &mut rng, a, Duration::from_millis(2));
        p.on_send(now);
        let mut t = now + Duration::from_millis(10);
        // The heartbeat that starts the wait, then four overdue pongs in a row, while the
        // peer's WireGuard packets keep arriving on the path (a lossy link).
        p.poll(t, &mut rng, local());
        for missed in 1..=4 {
            t += PONG_WAIT;
            p.on_auth_rx(t - Duration::from_millis(50), Addr::main(a));
            p.on_send(t);
            let out = p.poll(t, &mut rng, local());
            assert_eq!(
                out.contains(&PathAction::Quiet),
                missed == 4,
                "after {missed} lost pongs: {out:?}"
            );
            if missed < 4 {
                assert!(matches!(p.current(t, local()), Current::Direct(..)));
            }
        }
    }

    #[test]
    fn one_overdue_heartbeat_adds_the_relay_and_two_make_the_path_quiet() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(3);
        let mut p = PathState::default();
        let key = wire::NodeKey::from_bytes([1; 32]);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let relay = Addr::Relay(RelayId(0), key);
        probe(&mut p, now, &mut rng, a, Duration::from_millis(2));
        p.on_send(now);
        let pings = |actions: &[PathAction]| {
            actions
                .iter()
                .filter_map(|x| match x {
                    PathAction::Ping { tx, to } if *to == Addr::main(a) => Some(*tx),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // A heartbeat, answered in time: direct only.
        let t = now + Duration::from_millis(10);
        let hb = pings(&p.poll(t, &mut rng, local()));
        assert_eq!(hb.len(), 1);
        p.on_pong(t + Duration::from_millis(2), &hb[0], Addr::main(a));
        p.on_send(t);
        assert_eq!(p.targets(t, key, local(), false), vec![Addr::main(a)]);
        // The next one goes unanswered: suspect, so the relay carries traffic too and the
        // heartbeat is asked again at once; still direct for status.
        let t = t + HEARTBEAT;
        let hb = pings(&p.poll(t, &mut rng, local()));
        assert_eq!(hb.len(), 1);
        let t = t + PONG_WAIT;
        let again = p.poll(t, &mut rng, local());
        assert_eq!(pings(&again).len(), 1, "{again:?}");
        assert!(!again.contains(&PathAction::Quiet));
        assert_eq!(
            p.targets(t, key, local(), false),
            vec![Addr::main(a), relay]
        );
        assert!(matches!(p.current(t, local()), Current::Direct(..)));
        // The second goes unanswered too: quiet, and a probe round with a call-me-maybe.
        let t = t + PONG_WAIT;
        let quiet = p.poll(t, &mut rng, local());
        assert!(quiet.contains(&PathAction::Quiet), "{quiet:?}");
        assert!(
            quiet
                .iter()
                .any(|x| matches!(x, PathAction::CallMeMaybe { .. })),
            "{quiet:?}"
        );
        assert_eq!(p.current(t, local()), Current::Relay(RelayId(0)));
        // A pong on the path makes it trusted again, direct only.
        let hb = pings(&p.poll(t + HEARTBEAT, &mut rng, local()));
        p.on_pong(t + HEARTBEAT, &hb[0], Addr::main(a));
        assert_eq!(
            p.targets(t + HEARTBEAT, key, local(), false),
            vec![Addr::main(a)]
        );
    }

    #[test]
    fn a_single_lost_heartbeat_answered_on_retry_keeps_the_path() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(4);
        let mut p = PathState::default();
        let key = wire::NodeKey::from_bytes([1; 32]);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        probe(&mut p, now, &mut rng, a, Duration::from_millis(2));
        p.on_send(now);
        let t = now + Duration::from_millis(10);
        assert_eq!(p.poll(t, &mut rng, local()).len(), 1);
        // Lost; the retry is answered.
        let t = t + PONG_WAIT;
        let retry = p.poll(t, &mut rng, local());
        let Some(PathAction::Ping { tx, .. }) = retry.first() else {
            panic!("{retry:?}")
        };
        p.on_pong(t + Duration::from_millis(2), tx, Addr::main(a));
        let t = t + PONG_WAIT * 2;
        let after = p.poll(t, &mut rng, local());
        assert!(!after.contains(&PathAction::Quiet), "{after:?}");
        assert_eq!(p.targets(t, key, local(), false), vec![Addr::main(a)]);
    }

    #[test]
    fn nothing_of_ours_reaches_the_peer_before_it_primed_its_nat() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(5);
        let key = wire::NodeKey::from_bytes([1; 32]);
        let peer: SocketAddr = "203.0.113.32:41641".parse().unwrap();
        let ours: SocketAddr = "198.51.100.31:41641".parse().unwrap();
        let kinds = |actions: &[PathAction]| {
            let primes = actions
                .iter()
                .filter(|a| matches!(a, PathAction::Prime { .. }))
                .count();
            let pings = actions
                .iter()
                .filter(|a| matches!(a, PathAction::Ping { .. }))
                .count();
            let calls: Vec<bool> = actions
                .iter()
                .filter_map(|a| match a {
                    PathAction::CallMeMaybe { reply, .. } => Some(*reply),
                    _ => None,
                })
                .collect();
            (primes, pings, calls)
        };
        // A probe round: primers and a call, no ping.
        let mut a = PathState::default();
        a.set_endpoints(vec![peer]);
        a.on_send(now);
        let round = a.poll(now, &mut rng, local());
        assert_eq!(kinds(&round), (1, 0, vec![false]), "{round:?}");
        assert!(a.targets(now, key, local(), true) == vec![Addr::Relay(RelayId(0), key)]);
        // While our own endpoint is still being measured, not even the call.
        let mut early = PathState::default();
        early.set_endpoints(vec![peer]);
        early.on_send(now);
        let pending = Local {
            endpoints_pending: true,
            ..local()
        };
        assert_eq!(kinds(&early.poll(now, &mut rng, pending)), (1, 0, vec![]));
        // The peer answers a call by priming and replying, without a ping.
        let mut b = PathState::default();
        let answer = b.on_call_me_maybe(now, &mut rng, local(), &[ours], false, None, false);
        assert_eq!(kinds(&answer), (1, 0, vec![true]), "{answer:?}");
        // A reply: the peer is primed toward us; prime toward what it names and ping.
        let t = now + Duration::from_millis(20);
        let pings = a.on_call_me_maybe(t, &mut rng, local(), &[peer], false, None, true);
        assert_eq!(kinds(&pings), (1, 1, vec![]), "{pings:?}");
        // Without a relay there is no one to call: a round pings at once.
        let mut c = PathState::default();
        c.set_endpoints(vec![peer]);
        c.on_send(now);
        let alone = Local {
            relay: None,
            ..local()
        };
        assert_eq!(kinds(&c.poll(now, &mut rng, alone)), (1, 1, vec![]));
    }
}
