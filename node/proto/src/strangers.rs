//! Nodes that are not peers but send to this one through relays (sans-IO: time is passed in).
//!
//! A relay forwards between any two nodes the coordinator vouches for; it does not know the
//! policy. A node that is not this one's peer (the coordinator never listed it here) and
//! floods it through a relay fills the relay's queue to this node, and this node's peers'
//! relayed packets are lost with its own. So once a stranger has sent [`REFUSE_AFTER`]
//! packets within [`WINDOW`], it is refused: the shell tells every relay to forward nothing
//! from it ([`Strangers::refused`], the whole list, at most [`MAX_REFUSED`]). A peer never
//! sends that many before the coordinator lists it here (a handshake initiation every few
//! seconds, a few discovery frames), so a node that has just joined is not refused while the
//! netmap that names it is on its way; one that is refused and then listed is let through
//! again at once ([`Strangers::lift`]). A refusal lapses [`REFUSE_FOR`] after the stranger
//! was last heard from.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use wire::NodeKey;

/// Packets from one stranger within [`WINDOW`] that get it refused.
pub const REFUSE_AFTER: u32 = 64;
/// See [`REFUSE_AFTER`].
pub const WINDOW: Duration = Duration::from_secs(10);
/// How long a refusal lasts after the stranger was last heard from.
pub const REFUSE_FOR: Duration = Duration::from_secs(300);
/// Most strangers refused at once (what one relay frame holds); past this the one heard from
/// longest ago is let through again.
pub const MAX_REFUSED: usize = 128;
/// Strangers counted at once; past this the counts start over.
const MAX_COUNTED: usize = 1024;

/// The strangers heard from through relays.
#[derive(Debug, Default)]
pub struct Strangers {
    /// Strangers not refused yet: when their window began and their packets in it.
    counting: HashMap<NodeKey, (Instant, u32)>,
    /// Refused strangers and when each was last heard from.
    refused: BTreeMap<NodeKey, Instant>,
}

impl Strangers {
    /// A packet from `key`, not a peer, came through a relay at `now`; true when that makes
    /// the list of refused strangers change.
    pub fn packet(&mut self, now: Instant, key: NodeKey) -> bool {
        if let Some(heard) = self.refused.get_mut(&key) {
            // Still coming: through a relay that has not applied the list yet.
            *heard = now;
            return false;
        }
        if self.counting.len() >= MAX_COUNTED && !self.counting.contains_key(&key) {
            self.counting.clear();
        }
        let (start, count) = self.counting.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(*start) >= WINDOW {
            (*start, *count) = (now, 0);
        }
        *count += 1;
        if *count < REFUSE_AFTER {
            return false;
        }
        self.counting.remove(&key);
        if self.refused.len() >= MAX_REFUSED
            && let Some(oldest) = self
                .refused
                .iter()
                .min_by_key(|(_, heard)| **heard)
                .map(|(k, _)| *k)
        {
            self.refused.remove(&oldest);
        }
        self.refused.insert(key, now);
        true
    }

    /// Forgets every stranger `is_peer` now says is a peer; true when the refused list
    /// changed.
    pub fn lift(&mut self, is_peer: impl Fn(&NodeKey) -> bool) -> bool {
        self.counting.retain(|k, _| !is_peer(k));
        let before = self.refused.len();
        self.refused.retain(|k, _| !is_peer(k));
        self.refused.len() != before
    }

    /// Drops counts whose window is over and refusals that lapsed at `now`; true when the
    /// refused list changed.
    pub fn sweep(&mut self, now: Instant) -> bool {
        self.counting
            .retain(|_, (start, _)| now.saturating_duration_since(*start) < WINDOW);
        let before = self.refused.len();
        self.refused
            .retain(|_, heard| now.saturating_duration_since(*heard) < REFUSE_FOR);
        self.refused.len() != before
    }

    /// The refused strangers, in key order.
    pub fn refused(&self) -> Vec<NodeKey> {
        self.refused.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> NodeKey {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        NodeKey::from_bytes(b)
    }

    #[test]
    fn a_stranger_is_refused_after_a_flood_not_after_a_trickle() {
        let t0 = crate::test_epoch();
        let mut s = Strangers::default();
        // A joining peer's handshakes and discovery frames, a few a second for a minute.
        for i in 0..120u32 {
            let now = t0 + Duration::from_millis(500) * i;
            assert!(!s.packet(now, key(1)), "refused after {i} packets");
        }
        assert!(s.refused().is_empty());
        // A flood: refused at the 64th packet of one window, then only heard from.
        let t = t0 + Duration::from_secs(100);
        for i in 1..REFUSE_AFTER {
            assert!(!s.packet(t, key(2)), "packet {i}");
        }
        assert!(s.packet(t, key(2)));
        assert_eq!(s.refused(), vec![key(2)]);
        for _ in 0..1000 {
            assert!(!s.packet(t, key(2)));
        }
        // Heard from a minute later: the refusal runs REFUSE_FOR from then.
        let heard = t + Duration::from_secs(60);
        assert!(!s.packet(heard, key(2)));
        assert!(!s.sweep(heard + REFUSE_FOR - Duration::from_secs(1)));
        assert!(s.sweep(heard + REFUSE_FOR));
        assert!(s.refused().is_empty());
    }

    #[test]
    fn a_refused_stranger_listed_as_a_peer_is_let_through_at_once() {
        let t0 = crate::test_epoch();
        let mut s = Strangers::default();
        for k in [3, 4] {
            for _ in 0..REFUSE_AFTER {
                s.packet(t0, key(k));
            }
        }
        s.packet(t0, key(5));
        assert_eq!(s.refused(), vec![key(3), key(4)]);
        assert!(!s.lift(|k| *k == key(9)));
        assert!(s.lift(|k| *k == key(4) || *k == key(5)));
        assert_eq!(s.refused(), vec![key(3)]);
        // Its count is gone too: it starts again from nothing if it is dropped later.
        for _ in 1..REFUSE_AFTER {
            assert!(!s.packet(t0, key(5)));
        }
    }

    #[test]
    fn the_lists_stay_bounded_and_the_longest_quiet_refusal_goes_first() {
        let t0 = crate::test_epoch();
        let mut s = Strangers::default();
        for k in 0..MAX_REFUSED as u32 + 10 {
            let now = t0 + Duration::from_millis(u64::from(k));
            for _ in 0..REFUSE_AFTER {
                s.packet(now, key(k));
            }
            // The first one keeps being heard from.
            s.packet(now, key(0));
        }
        let refused = s.refused();
        assert_eq!(refused.len(), MAX_REFUSED);
        assert!(refused.contains(&key(0)));
        assert!(!refused.contains(&key(1)), "the quietest went first");
        assert!(refused.contains(&(key(MAX_REFUSED as u32 + 9))));
        // Strangers that each send a little: the counts never grow past their bound.
        for k in 0..10 * MAX_COUNTED as u32 {
            s.packet(t0, key(1_000_000 + k));
        }
        assert!(s.counting.len() <= MAX_COUNTED);
        assert!(!s.sweep(t0 + WINDOW));
        assert!(s.counting.is_empty());
    }
}
