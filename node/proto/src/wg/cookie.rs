//! The responder's side of WireGuard's cookies (whitepaper section 5.4.7), on the caller's
//! clock and randomness: every handshake message must carry a valid mac1 (it proves the
//! sender knows our public key, which any peer does). Each handshake that passes costs the
//! node key work (X25519), so what passes is bounded, per second, in two budgets: one for
//! peers (a message from an address a peer is known at, or through a relay in a peer's name,
//! counted per peer and path) and one for strangers (anyone else, counted per source: an
//! IPv4 address, or an IPv6 /64, which one host may hold whole). Strangers cannot spend the
//! peers' budget, so however many addresses a flood comes from, a peer's handshakes still
//! pass. In each:
//!
//! - a peer or source may send `limit` handshakes; past that it must also carry a valid mac2,
//!   made with a cookie bound to its address and port, and gets a cookie reply instead of an
//!   answer until it does;
//! - past the budget's "under load" count ([`PEERS_UNDER_LOAD`], [`STRANGERS_UNDER_LOAD`])
//!   every sender must show a cookie: a flood from made-up addresses, which never receive
//!   their cookies, is answered with cookie replies only (cheap);
//! - cookies lift neither bound for good: a peer or source passes at most [`PER_SOURCE`]
//!   handshakes with cookies a second, whatever its ports, and past the budget's most
//!   ([`PEERS_MAX`], [`STRANGERS_MAX`]) the rest are dropped ([`Verdict::Shed`]), so even
//!   senders that receive their cookies cost the node at most both bounds' key work a second,
//!   and the tunnels it carries keep their core.
//!
//! The cookie secret changes every two minutes (a cookie is good until then). The counts are
//! bounded: past [`MAX_SOURCES`] peers or sources (or cookies) in one second in a budget, every
//! further one must show a cookie (or is shed), so a flood from made-up addresses costs memory
//! only up to the bound, and fills only the strangers' counts: peers are counted apart.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::Rng;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use super::COOKIE_REFRESH_TIME;
use super::crypto::{mac, xseal};
use super::handshake::PublicKeyInfo;
use super::message::{
    self, COOKIE_REPLY, COOKIE_REPLY_LEN, Kind, cookie_reply, initiation, response,
};
use crate::addr::counted_ip;
use hybrid::ErasingRng;

/// The most peers, and the most sources, counted in one second.
pub const MAX_SOURCES: usize = 65_536;
/// Peers' handshakes passed in one second past which every peer must show a cookie (about
/// 40 ms of key work on one core).
pub const PEERS_UNDER_LOAD: u32 = 1_000;
/// The most peers' handshakes passed in one second, cookie or not (about 110 ms).
pub const PEERS_MAX: u32 = 3_000;
/// Strangers' handshakes passed in one second past which every stranger must show a cookie.
pub const STRANGERS_UNDER_LOAD: u32 = 500;
/// The most strangers' handshakes passed in one second, cookie or not (about 40 ms).
pub const STRANGERS_MAX: u32 = 1_000;
/// The most handshakes with cookies one peer, or one source, passes in one second.
pub const PER_SOURCE: u32 = 100;
const PERIOD: Duration = Duration::from_secs(1);

/// Whom a handshake is counted against ([`Checker::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A peer (by its public key): the message came from an address the peer is known at
    /// (`relayed` false), or through a relay in its name. Counted in the peers' budget, per
    /// peer and path (a peer sends its handshakes both ways at once while it looks for a
    /// direct path).
    Peer {
        /// The peer's public key.
        key: [u8; 32],
        /// Whether it came through a relay.
        relayed: bool,
    },
    /// Anyone else: counted by source address, in the strangers' budget.
    Stranger,
}

/// What a handshake is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Counted {
    Peer([u8; 32], bool),
    Source(IpAddr),
}

/// One budget (peers' or strangers') for the current second: its bounds (past `under_load`
/// passed, every sender needs a cookie; `max` passed in all) and its counts.
struct Pool {
    under_load: u32,
    max: u32,
    /// Handshakes seen from each peer or source.
    counts: HashMap<Counted, u32>,
    /// Handshakes with cookies passed for each peer or source.
    cookied: HashMap<Counted, u32>,
    /// Handshakes passed.
    passed: u32,
}

impl Pool {
    fn new(under_load: u32, max: u32) -> Self {
        Self {
            under_load,
            max,
            counts: HashMap::new(),
            cookied: HashMap::new(),
            passed: 0,
        }
    }

    fn clear(&mut self) {
        self.counts.clear();
        self.cookied.clear();
        self.passed = 0;
    }
}

/// What became of a message ([`Checker::check`]).
#[derive(Debug)]
pub enum Verdict {
    /// Not a handshake, or a handshake that passed: go on with it.
    Pass,
    /// Send this cookie reply back instead of handling the handshake.
    CookieReply(BytesMut),
    /// No WireGuard message, or a handshake whose mac1 (or required mac2) is wrong: drop it.
    Invalid,
    /// A handshake with a valid cookie, past its sender's or its budget's bound for this
    /// second: drop it (its sender retries).
    Shed,
}

/// See the module docs.
pub struct Checker {
    me: PublicKeyInfo,
    limit: u32,
    rng: ErasingRng,
    secret: Zeroizing<[u8; 32]>,
    secret_born: Instant,
    peers: Pool,
    strangers: Pool,
    /// When the counts of this second started.
    counted_since: Instant,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("limit", &self.limit)
            .field(
                "sources",
                &(self.peers.counts.len() + self.strangers.counts.len()),
            )
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// A checker for handshakes to the owner of `public`, letting each source send `limit` a
    /// second without a cookie.
    pub fn new(public: [u8; 32], limit: u32, seed: [u8; 32], now: Instant) -> Self {
        let mut rng: ErasingRng = rand::SeedableRng::from_seed(seed);
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *secret);
        Self {
            me: PublicKeyInfo::new(public),
            limit,
            rng,
            secret,
            secret_born: now,
            peers: Pool::new(PEERS_UNDER_LOAD, PEERS_MAX),
            strangers: Pool::new(STRANGERS_UNDER_LOAD, STRANGERS_MAX),
            counted_since: now,
        }
    }

    /// Checks `msg` from `src` at `now`, counting it against `sender`.
    pub fn check(&mut self, now: Instant, src: SocketAddr, sender: Sender, msg: &[u8]) -> Verdict {
        let Some(kind) = message::kind(msg) else {
            return Verdict::Invalid;
        };
        let (mac1_at, sender_at) = match kind {
            Kind::Initiation => (initiation::MAC1, initiation::SENDER),
            Kind::Response => (response::MAC1, response::SENDER),
            Kind::CookieReply | Kind::Data => return Verdict::Pass,
        };
        let mac1 = &msg[mac1_at..mac1_at + 16];
        if mac(&self.me.mac1_key, &msg[..mac1_at])
            .ct_eq(mac1)
            .unwrap_u8()
            == 0
        {
            return Verdict::Invalid;
        }
        self.new_second(now);
        let counted = match sender {
            Sender::Peer { key, relayed } => Counted::Peer(key, relayed),
            Sender::Stranger => Counted::Source(counted_ip(src.ip())),
        };
        let limit = self.limit;
        let pool = self.pool(sender);
        if !count(&mut pool.counts, counted, limit) && pool.passed < pool.under_load {
            pool.passed += 1;
            return Verdict::Pass;
        }
        let cookie = self.cookie(now, src);
        let mac2 = &msg[mac1_at + 16..mac1_at + 32];
        if mac(&cookie, &msg[..mac1_at + 16]).ct_eq(mac2).unwrap_u8() == 1 {
            let pool = self.pool(sender);
            if pool.passed >= pool.max || count(&mut pool.cookied, counted, PER_SOURCE) {
                return Verdict::Shed;
            }
            pool.passed += 1;
            return Verdict::Pass;
        }
        let mut nonce = [0u8; 24];
        self.rng.fill_bytes(&mut nonce);
        let mut reply = BytesMut::zeroed(COOKIE_REPLY_LEN);
        reply[0] = COOKIE_REPLY;
        reply[cookie_reply::RECEIVER..cookie_reply::NONCE]
            .copy_from_slice(&msg[sender_at..sender_at + 4]);
        reply[cookie_reply::NONCE..cookie_reply::COOKIE].copy_from_slice(&nonce);
        reply[cookie_reply::COOKIE..].copy_from_slice(&xseal(
            &self.me.cookie_key,
            &nonce,
            mac1,
            &cookie,
        ));
        Verdict::CookieReply(reply)
    }

    /// Restarts the counts when a second has passed since they started.
    fn new_second(&mut self, now: Instant) {
        if now.saturating_duration_since(self.counted_since) >= PERIOD {
            self.peers.clear();
            self.strangers.clear();
            self.counted_since = now;
        }
    }

    /// The budget `sender` is counted in.
    fn pool(&mut self, sender: Sender) -> &mut Pool {
        match sender {
            Sender::Peer { .. } => &mut self.peers,
            Sender::Stranger => &mut self.strangers,
        }
    }

    /// The cookie for `src` now: `MAC(secret, address and port)`, the secret renewed every
    /// two minutes.
    fn cookie(&mut self, now: Instant, src: SocketAddr) -> [u8; 16] {
        if now.saturating_duration_since(self.secret_born) >= COOKIE_REFRESH_TIME {
            self.rng.fill_bytes(&mut *self.secret);
            self.secret_born = now;
        }
        // The family, the address, the port.
        let mut addr = [0u8; 19];
        match src.ip() {
            IpAddr::V4(a) => {
                addr[0] = 4;
                addr[1..5].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                addr[0] = 6;
                addr[1..17].copy_from_slice(&a.octets());
            }
        }
        addr[17..].copy_from_slice(&src.port().to_be_bytes());
        mac(&*self.secret, &addr)
    }
}

/// Counts one more for `key` in `counts`: whether it is over `limit` (a new key past
/// [`MAX_SOURCES`] is not counted, and is over).
fn count<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K, limit: u32) -> bool {
    let full = counts.len() >= MAX_SOURCES;
    match counts.get_mut(&key) {
        Some(n) => {
            *n = n.saturating_add(1);
            *n > limit
        }
        None if full => true,
        None => {
            counts.insert(key, 1);
            1 > limit
        }
    }
}
