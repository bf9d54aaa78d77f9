//! How often a control session acts on what its node reports about itself (sans-IO: the
//! time is passed in).
//!
//! Every report a node sends (its endpoints, its home relay and NAT, its paths, its posture,
//! a fresh id token) costs a database write, and most of them a change in the feed that wakes
//! the session of every peer that can see the node and sends each a netmap. A node's own
//! reports come when something changes, a few a minute; an admitted node that sent them as
//! fast as its socket allows made the coordinator write a thousand times a second and send a
//! thousand netmaps a second to each of its peers. A session now acts on a few reports of a
//! kind at once ([`Pacer`]'s burst), then on one a second; a report that comes sooner waits,
//! and one that comes while another of its kind waits takes that one's place: each report
//! says all there is about its kind, so the latest is never lost, only applied later.
//! Access requests, which are answered one by one, are refused instead when they come faster
//! ([`Bucket`], [`crate::bucket`]).

use std::time::{Duration, Instant};

use crate::bucket::Bucket;

/// The kinds of report a node sends about itself; each replaces the last of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// The UDP endpoints it can be reached on.
    Endpoints,
    /// Its home relay and NAT.
    NetInfo,
    /// The paths to its peers.
    Paths,
    /// Its posture facts.
    Posture,
    /// A fresh id token.
    IdToken,
}

const KINDS: usize = 5;

impl ReportKind {
    fn index(self) -> usize {
        match self {
            Self::Endpoints => 0,
            Self::NetInfo => 1,
            Self::Paths => 2,
            Self::Posture => 3,
            Self::IdToken => 4,
        }
    }
}

/// What became of an offered report.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Act on it now.
    Apply(T),
    /// It waits for its time ([`Pacer::next_due`]); `superseded` when it took the place of
    /// one that was waiting (which will never be applied).
    Held {
        /// Whether an earlier report of its kind was waiting and is dropped.
        superseded: bool,
    },
}

/// One session's reports: applied at once while its kind's bucket has tokens, else held.
#[derive(Debug)]
pub struct Pacer<T> {
    slots: [(Bucket, Option<T>); KINDS],
}

impl<T> Pacer<T> {
    /// `burst` reports of each kind at once, then one per `interval`.
    pub fn new(burst: u32, interval: Duration, now: Instant) -> Self {
        Self {
            slots: std::array::from_fn(|_| (Bucket::new(burst, interval, now), None)),
        }
    }

    /// A report of `kind` came in at `now`.
    pub fn offer(&mut self, kind: ReportKind, report: T, now: Instant) -> Offer<T> {
        let (bucket, waiting) = &mut self.slots[kind.index()];
        // A waiting report goes first (it never does: one waits only while there are no
        // tokens, and `take_due` applies it as soon as one comes), so a report that comes
        // while one waits takes its place.
        if waiting.is_none() && bucket.try_take(now) {
            return Offer::Apply(report);
        }
        let superseded = waiting.replace(report).is_some();
        Offer::Held { superseded }
    }

    /// Puts back a report that could not be applied (the database was away), to be tried
    /// again at the pace, unless a newer one of its kind already waits (that one says more).
    pub fn retry(&mut self, kind: ReportKind, report: T) {
        let (_, waiting) = &mut self.slots[kind.index()];
        if waiting.is_none() {
            *waiting = Some(report);
        }
    }

    /// When the first waiting report may be applied, if any waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|(_, waiting)| waiting.is_some())
            .map(|(bucket, _)| bucket.next_token())
            .min()
    }

    /// The waiting reports whose time has come at `now`, to act on in this order.
    pub fn take_due(&mut self, now: Instant) -> Vec<T> {
        let mut due = Vec::new();
        for (bucket, waiting) in &mut self.slots {
            if waiting.is_some() && bucket.try_take(now) {
                due.extend(waiting.take());
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn reports_beyond_the_burst_wait_and_only_the_latest_is_applied() {
        let t0 = Instant::now();
        let mut p = Pacer::new(2, S, t0);
        assert_eq!(p.offer(ReportKind::Endpoints, 1, t0), Offer::Apply(1));
        assert_eq!(p.offer(ReportKind::Endpoints, 2, t0), Offer::Apply(2));
        assert_eq!(p.next_due(), None);
        assert_eq!(
            p.offer(ReportKind::Endpoints, 3, t0),
            Offer::Held { superseded: false }
        );
        for r in 4..100 {
            assert_eq!(
                p.offer(ReportKind::Endpoints, r, t0),
                Offer::Held { superseded: true }
            );
        }
        // Other kinds have buckets of their own.
        assert_eq!(p.offer(ReportKind::Paths, 7, t0), Offer::Apply(7));
        assert_eq!(p.next_due(), Some(t0 + S));
        assert!(p.take_due(t0 + S / 2).is_empty());
        assert_eq!(p.take_due(t0 + S), vec![99]);
        assert_eq!(p.next_due(), None);
        assert!(p.take_due(t0 + S * 5).is_empty());
        // A report that comes while its bucket refills waits, even with one token back.
        let t = t0 + S + S / 2;
        assert_eq!(
            p.offer(ReportKind::Endpoints, 100, t),
            Offer::Held { superseded: false }
        );
        assert_eq!(p.next_due(), Some(t0 + S * 2));
        assert_eq!(p.take_due(t0 + S * 2), vec![100]);
        // One that comes when a waiting report's time has come, before the session took it,
        // takes its place: an older report is never acted on after a newer one.
        let t = t0 + S * 2;
        assert_eq!(
            p.offer(ReportKind::Endpoints, 101, t),
            Offer::Held { superseded: false }
        );
        assert_eq!(
            p.offer(ReportKind::Endpoints, 102, t + S),
            Offer::Held { superseded: true }
        );
        assert_eq!(p.take_due(t + S), vec![102]);
    }

    #[test]
    fn a_flood_of_every_kind_is_applied_at_the_pace_whatever_the_order() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let kinds = [
            ReportKind::Endpoints,
            ReportKind::NetInfo,
            ReportKind::Paths,
            ReportKind::Posture,
            ReportKind::IdToken,
        ];
        let t0 = Instant::now();
        let mut p: Pacer<(usize, u32)> = Pacer::new(5, S, t0);
        let mut applied = [0u32; KINDS];
        let mut latest_offered = [None; KINDS];
        let mut latest_applied = [None; KINDS];
        let mut now = t0;
        let mut apply = |k: usize, r: (usize, u32), applied: &mut [u32; KINDS]| {
            assert_eq!(r.0, k);
            applied[k] += 1;
            latest_applied[k] = Some(r.1);
        };
        for i in 0..20_000u32 {
            now += Duration::from_micros(rng.random_range(0..2_000));
            if let Some(due) = p.next_due()
                && due <= now
            {
                for r in p.take_due(now) {
                    apply(r.0, r, &mut applied);
                }
            }
            let k = rng.random_range(0..KINDS);
            latest_offered[k] = Some(i);
            if let Offer::Apply(r) = p.offer(kinds[k], (k, i), now) {
                apply(k, r, &mut applied);
            }
        }
        // Drain what waits.
        while let Some(due) = p.next_due() {
            now = now.max(due);
            for r in p.take_due(now) {
                apply(r.0, r, &mut applied);
            }
        }
        let secs = now.duration_since(t0).as_secs() as u32;
        for k in 0..KINDS {
            assert!(
                applied[k] <= 5 + secs + 1,
                "kind {k}: {} applied in {secs} s",
                applied[k]
            );
            // The last word of each kind is the one acted on last.
            assert_eq!(latest_applied[k], latest_offered[k], "kind {k}");
        }
    }

    #[test]
    fn a_report_put_back_is_tried_again_at_the_pace_unless_a_newer_one_waits() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1, S, t0);
        assert_eq!(p.offer(ReportKind::Endpoints, 1, t0), Offer::Apply(1));
        // It failed: back, and due with the next token.
        p.retry(ReportKind::Endpoints, 1);
        assert_eq!(p.next_due(), Some(t0 + S));
        assert!(p.take_due(t0 + S / 2).is_empty());
        assert_eq!(p.take_due(t0 + S), vec![1]);
        // Failed again, but a newer report came meanwhile: the newer one is tried.
        assert_eq!(
            p.offer(ReportKind::Endpoints, 2, t0 + S),
            Offer::Held { superseded: false }
        );
        p.retry(ReportKind::Endpoints, 1);
        assert_eq!(p.take_due(t0 + 2 * S), vec![2]);
    }
}
