//! A token bucket on the caller's clock: a burst, then one token per interval (report pacing,
//! [`crate::pacer`]; new control sessions per address, [`crate::admission`]).

use std::time::{Duration, Instant};

/// Tokens that refill one per `interval` up to `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    burst: u32,
    interval: Duration,
    tokens: u32,
    /// When the bucket last gained a token (or was full).
    refilled: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(burst: u32, interval: Duration, now: Instant) -> Self {
        Self {
            burst,
            interval,
            tokens: burst,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.tokens >= self.burst {
            self.refilled = now;
            return;
        }
        // A clock that went back gives nothing (Instant does not, but be safe).
        let elapsed = now.saturating_duration_since(self.refilled);
        let gained = elapsed.as_nanos() / self.interval.as_nanos().max(1);
        let gained = u32::try_from(gained).unwrap_or(u32::MAX);
        if gained == 0 {
            return;
        }
        self.tokens = self.tokens.saturating_add(gained).min(self.burst);
        self.refilled = if self.tokens >= self.burst {
            now
        } else {
            self.refilled + self.interval * gained
        };
    }

    /// Takes a token if there is one at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Whether a token is there at `now` (none is taken).
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0
    }

    /// Whether the bucket is full again at `now` (it may then be forgotten: a new one is the
    /// same).
    pub fn is_full(&self, now: Instant) -> bool {
        let mut b = self.clone();
        b.refill(now);
        b.tokens >= b.burst
    }

    /// When the next token comes (`now` or earlier if one is there).
    pub fn next_token(&self) -> Instant {
        if self.tokens > 0 {
            self.refilled
        } else {
            self.refilled + self.interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_bucket_gives_its_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, S, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert_eq!(b.next_token(), t0 + S);
        assert!(!b.try_take(t0 + S - Duration::from_millis(1)));
        assert!(b.try_take(t0 + S));
        assert!(!b.try_take(t0 + S));
        // Two and a half intervals later: two tokens, and the half counts toward the third.
        let t = t0 + S * 3 + S / 2;
        assert!(b.try_take(t) && b.try_take(t));
        assert!(!b.try_take(t));
        assert_eq!(b.next_token(), t0 + S * 4);
        assert!(!b.is_full(t) && !b.has_token(t));
        // Idle for long: never more than the burst.
        let later = t0 + S * 1000;
        assert!(b.is_full(later) && b.has_token(later));
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 3);
    }
}
