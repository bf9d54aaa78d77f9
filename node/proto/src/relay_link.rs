//! What a node's connection to one relay decides, sans-IO (time is passed in): how long to
//! wait before dialling again after a failure ([`Redial`]), and, while connected, when to
//! probe the relay, when to give the connection up as dead, and when to send the relay the
//! list of refused strangers ([`Link`]). The shell (`node::io::relays`) dials, moves frames
//! and sleeps until [`Link::next_timeout`].

use std::time::{Duration, Instant};

/// A latency probe goes out this often...
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// ...and a connection nothing came from for this long at a probe's time is given up (two
/// probes in a row unanswered), so a restarted relay is found again within seconds rather
/// than after QUIC's idle timeout.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// The wait before dialling again after the first failure; it doubles with each failure...
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// ...up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The list of refused strangers goes to a relay at most this often (a relay applies one a
/// second and drops the others).
pub const REFUSE_EVERY: Duration = Duration::from_secs(2);

/// The waits between dialling attempts.
#[derive(Debug, Clone)]
pub struct Redial {
    next: Duration,
}

impl Default for Redial {
    fn default() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
}

impl Redial {
    /// A dial failed: how long to wait before the next.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }

    /// A dial succeeded: the next failure waits the least again.
    pub fn connected(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

/// What a connected link asks the shell to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a latency probe.
    Ping,
    /// Send the relay the current list of refused strangers, then tell
    /// [`Link::refusals_sent`] whether it was queued.
    SendRefusals,
    /// Nothing came from the relay for [`DEAD_AFTER`]: close the connection and dial again.
    Dead,
}

/// One live connection to a relay.
#[derive(Debug, Clone)]
pub struct Link {
    last_heard: Instant,
    next_ping: Instant,
    /// Whether the relay lacks the latest list of refused strangers.
    refusals_unsent: bool,
    refusals_sent: Option<Instant>,
}

impl Link {
    /// A connection that came up at `now`, when the node refuses some strangers or none
    /// (`refusing`): the first probe, and the list if there is one, go out at once (the relay
    /// refuses nothing for a new connection).
    pub fn new(now: Instant, refusing: bool) -> Self {
        Self {
            last_heard: now,
            next_ping: now,
            refusals_unsent: refusing,
            refusals_sent: None,
        }
    }

    /// Something came from the relay at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The list of refused strangers changed.
    pub fn refusals_changed(&mut self) {
        self.refusals_unsent = true;
    }

    /// The list was handed to the connection at `now`; `queued` false if its queue was full
    /// (tried again after [`REFUSE_EVERY`]).
    pub fn refusals_sent(&mut self, now: Instant, queued: bool) {
        self.refusals_unsent = !queued;
        self.refusals_sent = Some(now);
    }

    fn refusals_due(&self) -> Option<Instant> {
        self.refusals_unsent.then(|| {
            self.refusals_sent
                .map_or(self.last_heard, |t| t + REFUSE_EVERY)
        })
    }

    /// The next thing to do at `now`, if one is due; call until `None`.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        if now >= self.next_ping {
            if now.saturating_duration_since(self.last_heard) > DEAD_AFTER {
                return Some(Action::Dead);
            }
            // Probes keep their schedule (a late wake-up does not push them back).
            while self.next_ping <= now {
                self.next_ping += PING_EVERY;
            }
            return Some(Action::Ping);
        }
        if self.refusals_due().is_some_and(|t| t <= now) {
            // Marked sent until the shell says otherwise, so a poll loop cannot spin on it.
            self.refusals_sent(now, true);
            return Some(Action::SendRefusals);
        }
        None
    }

    /// When [`Link::poll`] next has something to do. It moves only when a probe or the list
    /// goes out or the list changes, not with each frame heard, so a shell's timer is rarely
    /// reset.
    pub fn next_timeout(&self) -> Instant {
        match self.refusals_due() {
            Some(t) => t.min(self.next_ping),
            None => self.next_ping,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a link asks for at `now`, up to a `Dead` (the shell stops there).
    fn drain(link: &mut Link, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = link.poll(now) {
            out.push(a);
            if a == Action::Dead {
                break;
            }
        }
        out
    }

    #[test]
    fn redials_wait_longer_after_each_failure_and_least_after_a_connection() {
        let mut r = Redial::default();
        let waits: Vec<u64> = (0..7).map(|_| r.failed().as_millis() as u64).collect();
        assert_eq!(waits, [250, 500, 1_000, 2_000, 4_000, 4_000, 4_000]);
        r.connected();
        assert_eq!(r.failed(), FIRST_BACKOFF);
    }

    #[test]
    fn a_link_probes_on_schedule_and_is_dead_after_five_silent_seconds() {
        let t0 = crate::test_epoch();
        let mut link = Link::new(t0, false);
        assert_eq!(drain(&mut link, t0), [Action::Ping]);
        assert_eq!(link.next_timeout(), t0 + PING_EVERY);
        // Frames keep coming: probes every two seconds, the timeout moving only with them.
        for s in 1..10u64 {
            link.heard(t0 + Duration::from_millis(s * 1_000 - 500));
            let now = t0 + Duration::from_secs(s);
            let expected: &[Action] = if s % 2 == 0 { &[Action::Ping] } else { &[] };
            assert_eq!(drain(&mut link, now), expected, "second {s}");
        }
        assert_eq!(link.next_timeout(), t0 + Duration::from_secs(10));
        // A late wake-up sends one probe and keeps the schedule.
        link.heard(t0 + Duration::from_secs(12));
        assert_eq!(
            drain(&mut link, t0 + Duration::from_millis(13_500)),
            [Action::Ping]
        );
        assert_eq!(link.next_timeout(), t0 + Duration::from_secs(14));
        // Silent since second 12: still alive at 16, dead at 18 (more than five seconds).
        assert_eq!(
            drain(&mut link, t0 + Duration::from_secs(16)),
            [Action::Ping]
        );
        assert_eq!(
            drain(&mut link, t0 + Duration::from_secs(18)),
            [Action::Dead]
        );
    }

    #[test]
    fn the_refusal_list_goes_out_at_once_then_at_most_every_two_seconds() {
        let t0 = crate::test_epoch();
        // A node refusing strangers when the link comes up: the list goes with the first probe.
        let mut link = Link::new(t0, true);
        assert_eq!(drain(&mut link, t0), [Action::Ping, Action::SendRefusals]);
        assert_eq!(link.next_timeout(), t0 + PING_EVERY);
        // Changed soon after: it waits two seconds from the last one sent.
        let t = t0 + Duration::from_millis(300);
        link.refusals_changed();
        link.refusals_changed();
        assert_eq!(link.next_timeout(), t0 + REFUSE_EVERY);
        assert!(drain(&mut link, t).is_empty());
        link.heard(t0 + Duration::from_secs(1));
        let t = t0 + REFUSE_EVERY;
        assert_eq!(drain(&mut link, t), [Action::Ping, Action::SendRefusals]);
        // The queue was full: tried again two seconds later.
        link.refusals_sent(t, false);
        assert_eq!(link.next_timeout(), t + REFUSE_EVERY);
        link.heard(t + Duration::from_secs(1));
        assert_eq!(
            drain(&mut link, t + REFUSE_EVERY),
            [Action::Ping, Action::SendRefusals]
        );
        assert_eq!(drain(&mut link, t + REFUSE_EVERY * 3), [Action::Ping]);
        // A node refusing nothing never sends a list.
        let mut quiet = Link::new(t0, false);
        assert_eq!(drain(&mut quiet, t0), [Action::Ping]);
        assert_eq!(quiet.next_timeout(), t0 + PING_EVERY);
    }
}
