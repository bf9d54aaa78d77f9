//! What the control endpoint admits before a node has authenticated: anyone on the internet
//! can open `/control`, and the handshake costs the coordinator an X25519 exchange and an
//! ML-KEM encapsulation plus two more, so this is where a stranger could make it burn CPU or
//! hold memory. Bounds, cheapest first:
//!
//! - a rate per source address (token bucket) for new control sessions;
//! - sessions not yet past their `Hello`, at most [`MAX_PRE_AUTH_PER_IP`] per address and
//!   [`MAX_PRE_AUTH`] in all (each also has a deadline, see `api::control`);
//! - a message 1 seen before is refused without any public-key work (a recorded message 1
//!   replayed forever would otherwise cost a full handshake each time);
//! - handshakes run on the blocking pool, at most [`max_handshakes`] at once.
//!
//! Messages a node sends after its handshake are bounded separately (`api::control`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use tokio::sync::Semaphore;

use crate::bucket::Bucket;

/// New control sessions from one address: one per this interval (20 a second), after a
/// burst (a NAT with many nodes behind it reconnecting at once after a coordinator restart).
const INTERVAL_PER_IP: Duration = Duration::from_millis(50);
const BURST_PER_IP: u32 = 200;
/// Sessions before `Hello`, per address and in all.
pub const MAX_PRE_AUTH_PER_IP: usize = 32;
/// See [`MAX_PRE_AUTH_PER_IP`].
pub const MAX_PRE_AUTH: usize = 1024;
/// Message 1 hashes remembered to refuse replays (about 3 MiB).
const REPLAY_MEMORY: usize = 100_000;
/// Addresses whose buckets are tracked at once (buckets that are full again are forgotten).
const MAX_TRACKED: usize = 65_536;

/// Handshakes computed at once: the machine's cores (a handshake is pure CPU).
pub fn max_handshakes() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Why a session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The source opened sessions faster than its rate.
    #[error("too many control sessions from this address; retry later")]
    Rate,
    /// Too many unauthenticated sessions (from the source, or in all).
    #[error("too many unauthenticated control sessions; retry later")]
    Busy,
    /// The message 1 was seen before.
    #[error("replayed handshake")]
    Replay,
}

#[derive(Default)]
struct Inner {
    buckets: HashMap<IpAddr, Bucket>,
    pre_auth: HashMap<IpAddr, usize>,
    pre_auth_total: usize,
    seen: HashSet<[u8; 32]>,
    seen_order: VecDeque<[u8; 32]>,
}

/// See the module docs.
pub struct ControlAdmission {
    inner: Mutex<Inner>,
    handshakes: Arc<Semaphore>,
}

impl Default for ControlAdmission {
    fn default() -> Self {
        Self::new(max_handshakes())
    }
}

impl ControlAdmission {
    /// Admission allowing `handshakes` concurrent handshakes.
    pub fn new(handshakes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            handshakes: Arc::new(Semaphore::new(handshakes.max(1))),
        }
    }

    /// A new session from `ip`: spends its rate and takes an unauthenticated slot, released
    /// when the returned guard is dropped (at `Hello`, or when the session ends).
    pub fn begin(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<PreAuth, Refusal> {
        let mut g = self.lock();
        if g.buckets.len() >= MAX_TRACKED && !g.buckets.contains_key(&ip) {
            g.buckets.retain(|_, b| !b.is_full(now));
        }
        if g.buckets.len() >= MAX_TRACKED && !g.buckets.contains_key(&ip) {
            return Err(Refusal::Busy);
        }
        let b = g
            .buckets
            .entry(ip)
            .or_insert_with(|| Bucket::new(BURST_PER_IP, INTERVAL_PER_IP, now));
        if !b.has_token(now) {
            return Err(Refusal::Rate);
        }
        let mine = g.pre_auth.get(&ip).copied().unwrap_or(0);
        if mine >= MAX_PRE_AUTH_PER_IP || g.pre_auth_total >= MAX_PRE_AUTH {
            return Err(Refusal::Busy);
        }
        if let Some(b) = g.buckets.get_mut(&ip) {
            b.try_take(now);
        }
        *g.pre_auth.entry(ip).or_insert(0) += 1;
        g.pre_auth_total += 1;
        Ok(PreAuth {
            admission: Arc::clone(self),
            ip,
            released: false,
        })
    }

    /// Records a message 1; refuses one seen before.
    pub fn first_sight(&self, msg1: &[u8]) -> Result<(), Refusal> {
        let h: [u8; 32] = Blake2s256::digest(msg1).into();
        let mut g = self.lock();
        if !g.seen.insert(h) {
            return Err(Refusal::Replay);
        }
        g.seen_order.push_back(h);
        if g.seen_order.len() > REPLAY_MEMORY
            && let Some(old) = g.seen_order.pop_front()
        {
            g.seen.remove(&old);
        }
        Ok(())
    }

    /// Waits up to `wait` for a handshake slot.
    pub async fn handshake_slot(
        &self,
        wait: Duration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(wait, Arc::clone(&self.handshakes).acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Unauthenticated sessions open now.
    pub fn pre_auth(&self) -> usize {
        self.lock().pre_auth_total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counts inconsistent in a way that
        // matters more than refusing service, so keep going with the data.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An unauthenticated session's slot.
pub struct PreAuth {
    admission: Arc<ControlAdmission>,
    ip: IpAddr,
    released: bool,
}

impl PreAuth {
    /// The session authenticated: give the slot back now.
    pub fn release(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut g = self.admission.lock();
        g.pre_auth_total = g.pre_auth_total.saturating_sub(1);
        if let Some(n) = g.pre_auth.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.pre_auth.remove(&self.ip);
            }
        }
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_sessions_are_bounded_per_address_and_released() {
        let a = Arc::new(ControlAdmission::new(2));
        let now = Instant::now();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let held: Vec<PreAuth> = (0..MAX_PRE_AUTH_PER_IP)
            .map(|_| a.begin(ip, now).unwrap())
            .collect();
        assert_eq!(a.begin(ip, now).err(), Some(Refusal::Busy));
        // Another address is not affected.
        let other = a.begin("198.51.100.1".parse().unwrap(), now).unwrap();
        drop(held);
        assert_eq!(a.pre_auth(), 1);
        other.release();
        assert_eq!(a.pre_auth(), 0);
        assert!(a.begin(ip, now).is_ok());
    }

    #[test]
    fn an_address_opening_sessions_too_fast_is_refused_until_its_rate_allows() {
        let a = Arc::new(ControlAdmission::new(2));
        let now = Instant::now();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        for _ in 0..BURST_PER_IP {
            a.begin(ip, now).unwrap().release();
        }
        assert_eq!(a.begin(ip, now).err(), Some(Refusal::Rate));
        assert!(a.begin(ip, now + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn a_message_1_is_accepted_once() {
        let a = ControlAdmission::new(2);
        assert!(a.first_sight(b"msg1").is_ok());
        assert_eq!(a.first_sight(b"msg1"), Err(Refusal::Replay));
        assert!(a.first_sight(b"another").is_ok());
    }
}
