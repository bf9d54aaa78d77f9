//! The responder's side of WireGuard's cookies (whitepaper section 5.4.7), on the caller's
//! clock and randomness: every handshake message must carry a valid mac1 (it proves the
//! sender knows our public key); a source that sends more than `limit` handshakes in a
//! second must also carry a valid mac2, made with a cookie bound to its address, and gets a
//! cookie reply instead of an answer until it does.
//!
//! The cookie secret changes every two minutes (a cookie is good until then); the counts per
//! source restart each second. The counts are bounded: past [`MAX_SOURCES`] sources in one
//! second, every further source must show a cookie too, so a flood from made-up addresses
//! costs memory only up to the bound.

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
}

/// See the module docs.
pub struct Checker {
    me: PublicKeyInfo,
    limit: u32,
    rng: ErasingRng,
    secret: Zeroizing<[u8; 32]>,
    secret_born: Instant,
    counts: HashMap<IpAddr, u32>,
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
        if !self.over_limit(now, src.ip()) {
            return Verdict::Pass;
        }
        let cookie = self.cookie(now, src);
        let mac2 = &msg[mac1_at + 16..mac1_at + 32];
        if mac(&cookie, &msg[..mac1_at + 16]).ct_eq(mac2).unwrap_u8() == 1 {
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

    /// Counts a handshake from `ip`: whether the source is over its limit this second.
    fn over_limit(&mut self, now: Instant, ip: IpAddr) -> bool {
        if now.saturating_duration_since(self.counted_since) >= PERIOD {
            self.counts.clear();
            self.counted_since = now;
        }
        let full = self.counts.len() >= MAX_SOURCES;
        match self.counts.get_mut(&ip) {
            Some(n) => {
                *n = n.saturating_add(1);
                *n > self.limit
            }
            // Past the bound a new source is not counted: it must show a cookie.
            None if full => true,
            None => {
                self.counts.insert(ip, 1);
                1 > self.limit
            }
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
