//! A token bucket: `rate` tokens a second up to `burst`, on the caller's clock.

use std::time::Instant;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket holding `burst` tokens at `now`.
    pub(crate) fn full(now: Instant, burst: f64) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The tokens there would be at `now`.
    pub(crate) fn peek(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let mut b = *self;
        b.refill(now, rate, burst);
        b.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let now = crate::test_epoch();
        let mut b = Bucket::full(now, 3.0);
        assert!((0..3).all(|_| b.take(now, 2.0, 3.0)));
        assert!(!b.take(now, 2.0, 3.0));
        assert!(b.take(now + Duration::from_millis(500), 2.0, 3.0));
        assert!(!b.take(now + Duration::from_millis(500), 2.0, 3.0));
        assert!((b.peek(now + Duration::from_secs(60), 2.0, 3.0) - 3.0).abs() < 1e-9);
        // A clock that goes back neither adds nor loses tokens.
        assert!(!b.take(now, 2.0, 3.0));
    }
}
