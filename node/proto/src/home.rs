//! Which relay is this node's home (the one peers reach it through first, reported to the
//! coordinator): the first relay to connect; then the connected relay with the lowest
//! smoothed round trip, but a new one only when it is at least a fifth faster than the home,
//! so two relays of about the same latency do not trade places on every measurement; and the
//! best one left when the home goes down or leaves the relay list.
//!
//! Sans-IO: the shell reports connections and round trips; every call that changes the home
//! returns the new one (the shell tells the coordinator).

use std::collections::BTreeMap;
use std::time::Duration;

use wire::RelayId;

/// A new home must have a round trip below this share of the home's.
const SWITCH_RATIO: f64 = 0.8;

/// The relays connected now, their round trips, and the home among them.
#[derive(Debug, Default, Clone)]
pub struct HomeRelay {
    /// Connected relays and their smoothed round trips (none measured yet: `None`).
    up: BTreeMap<RelayId, Option<Duration>>,
    home: Option<RelayId>,
}

/// A change of home: the new one (`None`: no relay is connected).
pub type Change = Option<Option<RelayId>>;

impl HomeRelay {
    /// The home relay, if any relay is connected.
    pub fn home(&self) -> Option<RelayId> {
        self.home
    }

    /// Whether the connection to `relay` is up.
    pub fn is_up(&self, relay: RelayId) -> bool {
        self.up.contains_key(&relay)
    }

    /// The connected relays, in id order.
    pub fn connected(&self) -> impl Iterator<Item = RelayId> + '_ {
        self.up.keys().copied()
    }

    /// The smoothed round trip to `relay`, once measured while connected.
    pub fn rtt(&self, relay: RelayId) -> Option<Duration> {
        self.up.get(&relay).copied().flatten()
    }

    /// The connection to `relay` came up: the first one up becomes the home.
    pub fn connected_to(&mut self, relay: RelayId) -> Change {
        self.up.entry(relay).or_insert(None);
        if self.home.is_none() {
            return self.set(Some(relay));
        }
        None
    }

    /// The connection to `relay` went down (its round trip is forgotten): a home that went
    /// down gives way to the best relay still connected.
    pub fn disconnected(&mut self, relay: RelayId) -> Change {
        self.up.remove(&relay);
        if self.home == Some(relay) {
            return self.set(self.best());
        }
        None
    }

    /// Keeps only the relays `listed` still names; a home no longer listed gives way to the
    /// best one left.
    pub fn retain(&mut self, listed: impl Fn(RelayId) -> bool) -> Change {
        self.up.retain(|id, _| listed(*id));
        if self.home.is_some_and(|h| !listed(h)) {
            return self.set(self.best());
        }
        None
    }

    /// A round trip to `relay` was measured (smoothed, a quarter weight to each new one);
    /// the fastest relay becomes the home when it is at least a fifth faster than the home,
    /// or the home has no measurement yet.
    pub fn measured(&mut self, relay: RelayId, rtt: Duration) -> Change {
        let Some(slot) = self.up.get_mut(&relay) else {
            // Measured on a connection reported down since: nothing to go by.
            return None;
        };
        *slot = Some(match *slot {
            Some(old) => (old * 3 + rtt) / 4,
            None => rtt,
        });
        let best = self.best()?;
        let switch = match self.home {
            Some(home) if home != best => match (self.rtt(home), self.rtt(best)) {
                (Some(h), Some(b)) => b.as_secs_f64() < h.as_secs_f64() * SWITCH_RATIO,
                (None, _) => true,
                (Some(_), None) => false,
            },
            Some(_) => false,
            None => true,
        };
        if switch { self.set(Some(best)) } else { None }
    }

    /// The connected relay with the lowest round trip (unmeasured ones last, then by id).
    fn best(&self) -> Option<RelayId> {
        self.up
            .iter()
            .min_by_key(|(id, rtt)| (rtt.unwrap_or(Duration::MAX), **id))
            .map(|(id, _)| *id)
    }

    fn set(&mut self, home: Option<RelayId>) -> Change {
        if self.home == home {
            return None;
        }
        self.home = home;
        Some(home)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RelayId = RelayId(1);
    const B: RelayId = RelayId(2);
    const C: RelayId = RelayId(3);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_relay_up_is_home_until_another_is_a_fifth_faster() {
        let mut h = HomeRelay::default();
        assert_eq!(h.connected_to(B), Some(Some(B)));
        assert_eq!(h.connected_to(A), None, "the home stays");
        assert_eq!(h.measured(B, ms(50)), None);
        // 45 ms is faster, but not by a fifth.
        assert_eq!(h.measured(A, ms(45)), None);
        assert_eq!(h.home(), Some(B));
        // Smoothed: A's 45, then 30 and 30, come to about 41 and then 38 ms: below 40.
        assert_eq!(h.measured(A, ms(30)), None, "{:?}", h.rtt(A));
        assert_eq!(h.measured(A, ms(30)), Some(Some(A)), "{:?}", h.rtt(A));
        assert_eq!(h.home(), Some(A));
        // Measured once more at the same speed: no change.
        assert_eq!(h.measured(B, ms(50)), None);
    }

    #[test]
    fn a_home_without_a_measurement_gives_way_to_a_measured_one() {
        let mut h = HomeRelay::default();
        h.connected_to(A);
        h.connected_to(B);
        assert_eq!(h.measured(B, ms(80)), Some(Some(B)));
    }

    #[test]
    fn a_home_that_goes_down_or_leaves_the_list_gives_way_to_the_best_left() {
        let mut h = HomeRelay::default();
        for r in [A, B, C] {
            h.connected_to(r);
        }
        h.measured(A, ms(10));
        h.measured(B, ms(30));
        h.measured(C, ms(20));
        assert_eq!(h.home(), Some(A));
        assert_eq!(h.disconnected(B), None, "not the home");
        assert_eq!(h.disconnected(A), Some(Some(C)));
        assert_eq!(h.rtt(A), None, "forgotten while down");
        h.connected_to(A);
        h.connected_to(B);
        assert_eq!(h.retain(|r| r != C), Some(Some(A)), "unmeasured, lowest id");
        assert!(!h.is_up(C));
        assert_eq!(h.measured(C, ms(1)), None, "C is not connected");
        assert_eq!(h.disconnected(A), Some(Some(B)));
        assert_eq!(h.disconnected(B), Some(None), "no relay left");
        assert_eq!(h.disconnected(B), None);
        assert_eq!(h.connected().count(), 0);
    }
}
