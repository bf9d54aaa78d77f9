//! Admission control for post-quantum handshake messages, checked before any public-key work.
//!
//! A message 1 costs its receiver an X25519 exchange to read and an ML-KEM encapsulation plus
//! two more to answer, so it is the cheapest way to make a node burn CPU. The checks run from
//! cheapest to dearest, and each stops what the previous one lets through:
//!
//! 1. `mac1` ([`crate::frame`]): one keyed hash. Only senders who know this node's public key
//!    get past it.
//! 2. Cookies: while the node is under load (its global budget half spent, or its reassembly
//!    table filling up), or a source has spent its budget for unproven senders, chunks must
//!    carry a `mac2` made with a cookie bound to the source address. Others get a cookie reply
//!    and are dropped. A spoofed source never sees its cookie, so floods from forged addresses
//!    stop here and cannot spend the budget of the address they forge.
//! 3. Budgets per source, separate for proven (valid `mac2` or relayed) and unproven senders,
//!    then a node-wide budget. There are two of those: one for peers (a message from an
//!    address a peer is known at, or through a relay in a peer's name: counted per peer) and
//!    one for strangers (anyone else: counted per IPv4 address, IPv6 /64, or relayed sender),
//!    so strangers, however many addresses they hold, cannot spend what peers need.
//! 4. After decryption the sender's key is known; the node applies a per-peer budget before
//!    it answers (see `state::keys`).
//!
//! Everything here is sans-IO: time comes in as `now`, the cookie secret from the caller's RNG.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use rand::Rng;
use wire::NodeKey;

use crate::addr::Addr;
use crate::budget::Bucket;
use crate::frame::{self, COOKIE_SECRET_LIFETIME, Chunk, MAC_LEN, Mac1Key, Source};

/// Messages per second (and burst) the whole node decrypts, in each of its two budgets
/// (peers', strangers').
const GLOBAL_RATE: f64 = 50.0;
const GLOBAL_BURST: f64 = 100.0;
/// Per source without proof of address.
const UNPROVEN_RATE: f64 = 5.0;
const UNPROVEN_BURST: f64 = 10.0;
/// Per source with proof of address (a cookie, or a relay that authenticated the sender).
const PROVEN_RATE: f64 = 20.0;
const PROVEN_BURST: f64 = 40.0;
/// Sources tracked at once; beyond this, new sources must prove their address.
const MAX_SOURCES: usize = 4096;

struct SourceBudget {
    unproven: Bucket,
    proven: Bucket,
}

/// Whose budgets a message spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A peer: the message came from an address it is known at, or through a relay in its
    /// name. Counted per peer, in the peers' node-wide budget.
    Peer(NodeKey),
    /// Anyone else, counted per source in the strangers' node-wide budget.
    Stranger,
}

impl Sender {
    /// The source `from` counts as.
    fn source(self, from: Addr) -> Source {
        match self {
            Self::Peer(k) => Source::Peer(k),
            Self::Stranger => Source::from(from),
        }
    }
}

/// One node-wide budget (peers' or strangers') and the budgets of the sources it counts, in
/// a table of its own, so strangers cannot fill the peers' with sources of theirs.
struct Pool {
    global: Bucket,
    sources: HashMap<Source, SourceBudget>,
}

impl Pool {
    fn new(now: Instant) -> Self {
        Self {
            global: Bucket::full(now, GLOBAL_BURST),
            sources: HashMap::new(),
        }
    }

    /// Whether the node-wide budget is half spent: then every sender it counts must prove
    /// its address.
    fn under_load(&self, now: Instant) -> bool {
        self.global.peek(now, GLOBAL_RATE, GLOBAL_BURST) < GLOBAL_BURST / 2.0
    }

    /// Whether `source` is new and there is no room for it.
    fn full_for(&self, source: &Source) -> bool {
        !self.sources.contains_key(source) && self.sources.len() >= MAX_SOURCES
    }
}

/// What to do with a handshake chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkVerdict {
    /// Process it; `proven` when the sender proved its address.
    Accept {
        /// Valid `mac2`, or a relayed source.
        proven: bool,
    },
    /// Send this cookie reply to the sender and drop the chunk.
    Cookie(Vec<u8>),
    /// Drop it.
    Drop(DropReason),
}

/// Why a chunk or message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `mac1` was wrong: the sender does not know this node's key.
    BadMac,
    /// The source, or the node, spent its budget.
    RateLimited,
}

/// See the module docs.
pub struct Admission {
    mac1: Mac1Key,
    cookie_seal: [u8; 32],
    secret: [u8; 32],
    epoch_start: Instant,
    peers: Pool,
    strangers: Pool,
}

impl Admission {
    /// Admission for the node whose public key is `me`.
    pub fn new(me: &NodeKey, rng: &mut impl Rng, now: Instant) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            mac1: Mac1Key::new(me),
            cookie_seal: frame::cookie_seal_key(me),
            secret,
            epoch_start: now,
            peers: Pool::new(now),
            strangers: Pool::new(now),
        }
    }

    /// Whether `chunk` carries this node's `mac1` (for message 2s, which need no cookie: only
    /// the exchange in flight with their session id is answered).
    pub fn mac1_ok(&self, chunk: &Chunk<'_>) -> bool {
        chunk.mac1_ok(&self.mac1)
    }

    /// The budgets `sender` is counted in.
    fn pool(&mut self, sender: Sender) -> &mut Pool {
        match sender {
            Sender::Peer(_) => &mut self.peers,
            Sender::Stranger => &mut self.strangers,
        }
    }

    /// The stateless checks on one chunk of message 1 from `from`, counted as `sender`:
    /// `mac1`, then `mac2` when its node-wide budget is under load, `pressure` says so (the
    /// reassembly table is filling up), or its source has spent its unproven budget.
    pub fn check_chunk(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        from: Addr,
        sender: Sender,
        chunk: &Chunk<'_>,
        pressure: bool,
    ) -> ChunkVerdict {
        if !chunk.mac1_ok(&self.mac1) {
            return ChunkVerdict::Drop(DropReason::BadMac);
        }
        let ip = match from {
            // The relay authenticated the sender: its address is proven.
            Addr::Relay(..) => return ChunkVerdict::Accept { proven: true },
            Addr::Udp(_, a) => a.ip(),
        };
        if self.cookie_ok(now, ip, chunk) {
            return ChunkVerdict::Accept { proven: true };
        }
        let source = sender.source(from);
        let pool = self.pool(sender);
        let source_spent = match pool.sources.get(&source) {
            Some(b) => b.unproven.peek(now, UNPROVEN_RATE, UNPROVEN_BURST) < 1.0,
            None => pool.sources.len() >= MAX_SOURCES,
        };
        if pressure || source_spent || pool.under_load(now) {
            // Not rate limited: a reply is a twentieth of the chunk it answers, so answering a
            // spoofed flood reflects less than the flood itself, and cheap (one MAC, one seal).
            let cookie = self.cookie(now, ip, 0);
            let sealed = hybrid::seal::seal(rng, &self.cookie_seal, &chunk.mac1, &cookie);
            return ChunkVerdict::Cookie(frame::encode_cookie(chunk.session, chunk.index, &sealed));
        }
        ChunkVerdict::Accept { proven: false }
    }

    /// A whole message 1 from `from`, counted as `sender`, is about to be decrypted: spends
    /// its source's budget and its node-wide one. Returns whether it may go ahead.
    pub fn take_message(&mut self, now: Instant, from: Addr, sender: Sender, proven: bool) -> bool {
        let source = sender.source(from);
        if self.pool(sender).full_for(&source) {
            self.sweep(now);
        }
        let pool = self.pool(sender);
        if pool.full_for(&source) && !proven {
            return false;
        }
        let b = pool.sources.entry(source).or_insert_with(|| SourceBudget {
            unproven: Bucket::full(now, UNPROVEN_BURST),
            proven: Bucket::full(now, PROVEN_BURST),
        });
        let ok = if proven {
            b.proven.take(now, PROVEN_RATE, PROVEN_BURST)
        } else {
            b.unproven.take(now, UNPROVEN_RATE, UNPROVEN_BURST)
        };
        ok && pool.global.take(now, GLOBAL_RATE, GLOBAL_BURST)
    }

    /// Forgets sources whose budgets are full again (they are the same as new ones).
    pub fn sweep(&mut self, now: Instant) {
        for pool in [&mut self.peers, &mut self.strangers] {
            pool.sources.retain(|_, b| {
                b.unproven.peek(now, UNPROVEN_RATE, UNPROVEN_BURST) < UNPROVEN_BURST
                    || b.proven.peek(now, PROVEN_RATE, PROVEN_BURST) < PROVEN_BURST
            });
        }
    }

    /// Sources tracked (peers' and strangers').
    pub fn sources(&self) -> usize {
        self.peers.sources.len() + self.strangers.sources.len()
    }

    fn cookie_ok(&self, now: Instant, ip: IpAddr, chunk: &Chunk<'_>) -> bool {
        if chunk.mac2 == [0; MAC_LEN] {
            return false;
        }
        // The cookie of the current secret, or of the one before (a cookie handed out just
        // before the secret changed is still good).
        (0..2).any(|back| chunk.mac2_ok(&self.cookie(now, ip, back)))
    }

    /// The cookie for `ip` under the secret `back` lifetimes ago.
    fn cookie(&self, now: Instant, ip: IpAddr, back: u64) -> [u8; MAC_LEN] {
        let lifetime = COOKIE_SECRET_LIFETIME.as_secs().max(1);
        let epoch = (now.saturating_duration_since(self.epoch_start).as_secs() / lifetime)
            .saturating_sub(back);
        let addr = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let full = hybrid::mac(
            &self.secret,
            &[b"lattice pq cookie", &epoch.to_be_bytes(), &addr],
        );
        let mut c = [0u8; MAC_LEN];
        c.copy_from_slice(&full[..MAC_LEN]);
        c
    }
}

/// Opens a cookie reply from `responder` answering the chunk whose `mac1` was `mac1`.
pub fn open_cookie(
    responder: &NodeKey,
    mac1: &[u8; MAC_LEN],
    sealed: &[u8],
) -> Option<[u8; MAC_LEN]> {
    let key = frame::cookie_seal_key(responder);
    hybrid::seal::open(&key, mac1, sealed)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, Kind, Message};
    use rand::{SeedableRng, rngs::StdRng};
    use std::time::Duration;

    fn me() -> NodeKey {
        NodeKey::from_bytes([7; 32])
    }

    fn frames(cookie: Option<&[u8; MAC_LEN]>, to: &NodeKey) -> Vec<(Vec<u8>, [u8; MAC_LEN])> {
        Message::new(Kind::PqInit, 1, &[0xab; 1300]).frames(&Mac1Key::new(to), cookie)
    }

    fn chunk(f: &[u8]) -> Chunk<'_> {
        match frame::decode(f) {
            Some(Frame::Chunk(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    /// The cookie reply `a` sends the stranger at `from` for the chunk `f` (there must be one).
    fn cookie_reply(
        a: &mut Admission,
        now: Instant,
        rng: &mut StdRng,
        from: Addr,
        f: &[u8],
    ) -> Vec<u8> {
        match a.check_chunk(now, rng, from, Sender::Stranger, &chunk(f), false) {
            ChunkVerdict::Cookie(reply) => reply,
            other => panic!("no cookie reply for {from}: {other:?}"),
        }
    }

    fn udp(s: &str) -> Addr {
        Addr::main(s.parse().unwrap())
    }

    #[test]
    fn chunks_without_the_receivers_key_are_dropped_without_spending_anything() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(1);
        let mut a = Admission::new(&me(), &mut rng, now);
        let stranger = frames(None, &NodeKey::from_bytes([8; 32]));
        for i in 0..10_000u32 {
            let from = udp(&format!("203.0.113.{}:{}", i % 200, 1000 + i % 5000));
            assert_eq!(
                a.check_chunk(
                    now,
                    &mut rng,
                    from,
                    Sender::Stranger,
                    &chunk(&stranger[0].0),
                    false
                ),
                ChunkVerdict::Drop(DropReason::BadMac)
            );
        }
        assert!(!a.strangers.under_load(now));
        assert_eq!(a.sources(), 0);
    }

    #[test]
    fn under_load_only_senders_that_receive_their_cookie_get_through() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(2);
        let mut a = Admission::new(&me(), &mut rng, now);
        // A spoofed flood spends the global budget (each from a fresh address) until the node
        // is under load; from then on even fresh addresses must prove themselves.
        let mut i = 0u32;
        while !a.strangers.under_load(now) {
            i += 1;
            let from = udp(&format!("203.0.{}.{}:1", 113 + i / 250, i % 250));
            let f = frames(None, &me());
            assert_eq!(
                a.check_chunk(
                    now,
                    &mut rng,
                    from,
                    Sender::Stranger,
                    &chunk(&f[0].0),
                    false
                ),
                ChunkVerdict::Accept { proven: false }
            );
            assert!(a.take_message(now, from, Sender::Stranger, false));
        }
        assert_eq!(i, (GLOBAL_BURST / 2.0) as u32 + 1);
        let spoofed = udp("203.0.120.1:1");
        let f = frames(None, &me());
        assert!(matches!(
            a.check_chunk(
                now,
                &mut rng,
                spoofed,
                Sender::Stranger,
                &chunk(&f[0].0),
                false
            ),
            ChunkVerdict::Cookie(_)
        ));
        // An honest sender without a cookie gets one...
        let honest = udp("198.51.100.7:41641");
        let f = frames(None, &me());
        let reply = cookie_reply(&mut a, now, &mut rng, honest, &f[0].0);
        let Some(Frame::Cookie { sealed, index, .. }) = frame::decode(&reply) else {
            panic!("not a cookie reply");
        };
        assert_eq!(index, 0);
        // ...which only it can use: bound to the chunk's mac1 and to its address.
        assert_eq!(open_cookie(&me(), &[0; MAC_LEN], sealed), None);
        let cookie = open_cookie(&me(), &f[0].1, sealed).expect("cookie opens");
        let with = frames(Some(&cookie), &me());
        for (fr, _) in &with {
            assert_eq!(
                a.check_chunk(now, &mut rng, honest, Sender::Stranger, &chunk(fr), false),
                ChunkVerdict::Accept { proven: true }
            );
        }
        assert!(a.take_message(now, honest, Sender::Stranger, true));
        let elsewhere = udp("198.51.100.8:41641");
        assert!(matches!(
            a.check_chunk(
                now,
                &mut rng,
                elsewhere,
                Sender::Stranger,
                &chunk(&with[0].0),
                false
            ),
            ChunkVerdict::Cookie(_)
        ));
        // A cookie outlives one secret rotation, not two.
        let later = now + COOKIE_SECRET_LIFETIME;
        assert!(a.cookie_ok(later, honest.udp().unwrap().ip(), &chunk(&with[0].0)));
        let much_later = now + COOKIE_SECRET_LIFETIME * 2;
        assert!(!a.cookie_ok(much_later, honest.udp().unwrap().ip(), &chunk(&with[0].0)));
    }

    #[test]
    fn a_flood_forging_one_address_cannot_spend_that_addresses_proven_budget() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(3);
        let mut a = Admission::new(&me(), &mut rng, now);
        let victim = udp("198.51.100.7:41641");
        let f = frames(None, &me());
        let mut accepted = 0;
        for _ in 0..1000 {
            if a.check_chunk(
                now,
                &mut rng,
                victim,
                Sender::Stranger,
                &chunk(&f[0].0),
                false,
            ) == (ChunkVerdict::Accept { proven: false })
                && a.take_message(now, victim, Sender::Stranger, false)
            {
                accepted += 1;
            }
        }
        assert_eq!(accepted, UNPROVEN_BURST as usize);
        // The real owner of the address proves it with a cookie and is admitted.
        let reply = cookie_reply(&mut a, now, &mut rng, victim, &f[0].0);
        let Some(Frame::Cookie { sealed, .. }) = frame::decode(&reply) else {
            panic!()
        };
        let cookie = open_cookie(&me(), &f[0].1, sealed).unwrap();
        let with = frames(Some(&cookie), &me());
        assert_eq!(
            a.check_chunk(
                now,
                &mut rng,
                victim,
                Sender::Stranger,
                &chunk(&with[0].0),
                false
            ),
            ChunkVerdict::Accept { proven: true }
        );
        assert!(a.take_message(now, victim, Sender::Stranger, true));
    }

    #[test]
    fn relayed_senders_are_proven_and_budgeted_per_peer() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(4);
        let mut a = Admission::new(&me(), &mut rng, now);
        let peer = Addr::Relay(wire::RelayId(1), NodeKey::from_bytes([3; 32]));
        let f = frames(None, &me());
        assert_eq!(
            a.check_chunk(now, &mut rng, peer, Sender::Stranger, &chunk(&f[0].0), true),
            ChunkVerdict::Accept { proven: true }
        );
        let taken = (0..100)
            .filter(|_| a.take_message(now, peer, Sender::Stranger, true))
            .count();
        assert_eq!(taken, PROVEN_BURST as usize);
        let other = Addr::Relay(wire::RelayId(1), NodeKey::from_bytes([4; 32]));
        assert!(a.take_message(now, other, Sender::Stranger, true));
        // Budgets refill with time and sources at full budget are forgotten.
        let later = now + Duration::from_secs(10);
        a.sweep(later);
        assert_eq!(a.sources(), 0);
    }

    /// Strangers who prove their addresses (one host per /64, each with its cookie) can fill
    /// the sources the node keeps track of; a new source must then show a cookie. They fill
    /// the strangers' table, not the peers': a peer's first message needs none.
    #[test]
    fn strangers_filling_the_source_table_leave_the_peers_alone() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(5);
        let mut a = Admission::new(&me(), &mut rng, now);
        for i in 0..MAX_SOURCES as u32 {
            let ip = std::net::Ipv6Addr::from((u128::from(i) + 1) << 64);
            let from = Addr::main(std::net::SocketAddr::from((ip, 41641)));
            a.take_message(now, from, Sender::Stranger, true);
        }
        assert_eq!(a.sources(), MAX_SOURCES);
        let f = frames(None, &me());
        let late = udp("198.51.100.8:41641");
        assert!(matches!(
            a.check_chunk(
                now,
                &mut rng,
                late,
                Sender::Stranger,
                &chunk(&f[0].0),
                false
            ),
            ChunkVerdict::Cookie(_)
        ));
        let peer = udp("198.51.100.7:41641");
        let known = Sender::Peer(NodeKey::from_bytes([3; 32]));
        assert_eq!(
            a.check_chunk(now, &mut rng, peer, known, &chunk(&f[0].0), false),
            ChunkVerdict::Accept { proven: false }
        );
        assert!(a.take_message(now, peer, known, false));
    }
}
