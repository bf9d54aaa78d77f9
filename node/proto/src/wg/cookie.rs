//! The responder's side of WireGuard's cookies (whitepaper section 5.4.7), on the caller's
//! clock and randomness: every handshake message must carry a valid mac1 (it proves the
//! sender knows our public key, which any peer does). Each handshake that passes costs the
//! node key work (X25519), so what passes is bounded, per second:
//!
//! - a source (an IPv4 address, or an IPv6 /64, which one host may hold whole) may send
//!   `limit` handshakes; past that it must also carry a valid mac2, made with a cookie bound to
//!   its address and port, and gets a cookie reply instead of an answer until it does;
//! - past [`UNDER_LOAD`] handshakes passed in all, every source must show a cookie: a flood
//!   from made-up addresses, which never receive their cookies, is answered with cookie
//!   replies only (cheap), whatever the number of addresses;
//! - a cookie lifts neither bound for good: one cookie (one address and port) passes at most
//!   [`PER_COOKIE`] handshakes a second, and past [`MAX_PASSED`] in all the rest are dropped
//!   ([`Verdict::Shed`]), so even a sender that receives its cookies costs the node at most
//!   [`MAX_PASSED`] handshakes' key work a second, and the tunnels it carries keep their core.
//!
//! The cookie secret changes every two minutes (a cookie is good until then). The counts are
//! bounded: past [`MAX_SOURCES`] sources (or cookies) in one second, every further one must
//! show a cookie (or is shed), so a flood from made-up addresses costs memory only up to the
//! bound.

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
use hybrid::ErasingRng;

/// The most sources counted in one second.
pub const MAX_SOURCES: usize = 65_536;
/// Handshakes passed in one second past which every source must show a cookie (about 40 ms
/// of key work on one core).
pub const UNDER_LOAD: u32 = 1_000;
/// The most handshakes one cookie (one address and port) passes in one second.
pub const PER_COOKIE: u32 = 100;
/// The most handshakes passed in one second, cookie or not (about 160 ms of key work).
pub const MAX_PASSED: u32 = 4_000;
const PERIOD: Duration = Duration::from_secs(1);

/// What became of a message ([`Checker::check`]).
#[derive(Debug)]
pub enum Verdict {
    /// Not a handshake, or a handshake that passed: go on with it.
    Pass,
    /// Send this cookie reply back instead of handling the handshake.
    CookieReply(BytesMut),
    /// No WireGuard message, or a handshake whose mac1 (or required mac2) is wrong: drop it.
    Invalid,
    /// A handshake with a valid cookie, past its cookie's or the node's bound for this second:
    /// drop it (its sender retries).
    Shed,
}

/// See the module docs.
pub struct Checker {
    me: PublicKeyInfo,
    limit: u32,
    rng: ErasingRng,
    secret: Zeroizing<[u8; 32]>,
    secret_born: Instant,
    /// Handshakes seen from each source this second.
    counts: HashMap<IpAddr, u32>,
    /// Handshakes passed with each cookie (its address and port) this second.
    cookied: HashMap<SocketAddr, u32>,
    /// Handshakes passed in all this second.
    passed: u32,
    counted_since: Instant,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("limit", &self.limit)
            .field("sources", &self.counts.len())
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
            counts: HashMap::new(),
            cookied: HashMap::new(),
            passed: 0,
            counted_since: now,
        }
    }

    /// Checks `msg` from `src` at `now`.
    pub fn check(&mut self, now: Instant, src: SocketAddr, msg: &[u8]) -> Verdict {
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
        if !self.over_limit(src.ip()) && self.passed < UNDER_LOAD {
            self.passed += 1;
            return Verdict::Pass;
        }
        let cookie = self.cookie(now, src);
        let mac2 = &msg[mac1_at + 16..mac1_at + 32];
        if mac(&cookie, &msg[..mac1_at + 16]).ct_eq(mac2).unwrap_u8() == 1 {
            if self.passed >= MAX_PASSED || !self.cookie_allows(src) {
                return Verdict::Shed;
            }
            self.passed += 1;
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
            self.counts.clear();
            self.cookied.clear();
            self.passed = 0;
            self.counted_since = now;
        }
    }

    /// Counts a handshake from `ip`: whether its source is over its limit this second.
    fn over_limit(&mut self, ip: IpAddr) -> bool {
        count(&mut self.counts, source(ip), self.limit)
    }

    /// Counts a handshake with a valid cookie from `src`: whether the cookie may pass another.
    fn cookie_allows(&mut self, src: SocketAddr) -> bool {
        !count(&mut self.cookied, src, PER_COOKIE)
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

/// The source `ip` is counted as: the address itself for IPv4 (an IPv4-mapped IPv6 address
/// as its IPv4 address), its /64 for IPv6, which one host may hold whole.
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}
