//! Revocations a standalone relay learns from the coordinator, so it stops serving a removed
//! node within seconds instead of when the node's ticket runs out (up to two minutes).
//!
//! The coordinator publishes the node keys that left the mesh at `GET /relay/revocations`,
//! signed with its relay-ticket key (the key the relay already trusts for tickets). The relay
//! polls it every [`POLL_EVERY`]; a list that does not verify is ignored. Lists only ever add
//! revocations here (each expires on its own), so replaying an old list can withhold news but
//! never lift a revocation.
//!
//! The lists also tell the relay whether the coordinator is there. Nodes renew their tickets
//! (two minutes long) through the coordinator, so without more a coordinator outage of two
//! minutes (or an attack that keeps it down) would cut every relayed tunnel a standalone relay
//! carries. With an outage grace ([`RevocationSet::with_outage_grace`]), once no fresh list
//! came for [`SILENCE`] the relay keeps serving the nodes it served: a session whose ticket
//! runs out is kept, and such a node may connect again with its last ticket, up to the grace
//! past that ticket's end, unless a list revoked it. When lists come again, nodes have
//! [`RECOVERY`] to bring fresh tickets. A replayed old list is not news from the coordinator
//! (its `issued_at` must be recent), so it cannot end a grace; cutting the relay off from the
//! coordinator starts one, for nodes it already served and no others.
//!
//! What a relay heard and whom it served is kept in its state directory ([`KEPT_FILE`], written
//! by [`poll`] at most every [`KEEP_EVERY`] when it changed), so a relay restarted during an
//! outage still serves the nodes it served before, and no others.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::unix_now;
use wire::{NodeKey, Revocation, RevocationList, SignedRevocations, TicketKey};

/// How often the relay asks.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer accepted.
const MAX_ANSWER: usize = 4 << 20;

/// The coordinator counts as gone once no list issued within this long has come (the relay
/// asks every [`POLL_EVERY`]; a node's ticket runs out at the earliest a minute after its last
/// renewal).
pub const SILENCE: Duration = Duration::from_secs(30);
/// After an outage, how long nodes whose tickets ran out meanwhile have to bring fresh ones (a
/// node is back with the coordinator within its backoff, at most 45 s, and gets a ticket
/// every minute).
pub const RECOVERY: Duration = Duration::from_secs(120);
/// The file in a relay's state directory that keeps what it heard and whom it served.
pub const KEPT_FILE: &str = "relay-outage.json";
/// How often at most [`poll`] writes [`KEPT_FILE`] (when something changed).
pub const KEEP_EVERY: Duration = Duration::from_secs(10);

/// Revoked node keys, until when (Unix seconds), and what the relay needs to ride out a
/// coordinator outage (see the module's docs).
#[derive(Debug, Default)]
pub struct RevocationSet {
    keys: RwLock<HashMap<[u8; 32], i64>>,
    /// How long past its ticket's end a node is served during an outage (0: never).
    grace: i64,
    word: std::sync::Mutex<Word>,
    /// Whether the revocations or the nodes served changed since [`RevocationSet::kept`].
    changed: AtomicBool,
}

/// What a relay keeps across restarts ([`KEPT_FILE`]): when it last heard from the
/// coordinator, whom it served with tickets valid until when, and the revocations in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// When the newest fresh news was made (Unix seconds).
    heard: Option<i64>,
    /// When news came again after a silence.
    recovered: Option<i64>,
    /// Nodes served, each until the end of its latest ticket.
    served: Vec<Revocation>,
    /// Nodes revoked, each until when.
    revoked: Vec<Revocation>,
}

/// What the relay heard from the coordinator, and whom it served.
#[derive(Debug, Default)]
struct Word {
    /// Whether the coordinator is there.
    outage: Outage,
    /// Nodes served with a ticket that was valid then, and the latest end of their tickets.
    served: HashMap<[u8; 32], i64>,
    /// How many `served` held after it was last pruned.
    pruned_at: usize,
}

/// Whether what renews tickets is there (sans-IO; Unix seconds passed in): an outage is
/// [`SILENCE`] without news; [`RECOVERY`] after news comes again still excuses a ticket that ran
/// out, so nodes have time to bring fresh ones. Also used by the coordinator's embedded relay,
/// whose news is the database answering.
#[derive(Debug, Default)]
pub struct Outage {
    /// The newest time of news that was fresh when it came.
    heard: Option<i64>,
    /// When news came again after a silence.
    recovered: Option<i64>,
}

impl Outage {
    /// News made at `at` came at `now` (news older than [`SILENCE`] is not news: a replayed
    /// old list cannot end an outage).
    pub fn heard(&mut self, at: i64, now: i64) {
        let silence = i64::try_from(SILENCE.as_secs()).unwrap_or(30);
        if now - at > silence {
            return;
        }
        if self.is_silent(now) {
            self.recovered = Some(now);
        }
        self.heard = Some(self.heard.map_or(at, |h| h.max(at)));
    }

    /// Whether no news came for [`SILENCE`] (or ever).
    fn is_silent(&self, now: i64) -> bool {
        let silence = i64::try_from(SILENCE.as_secs()).unwrap_or(30);
        self.heard.is_none_or(|h| now - h > silence)
    }

    /// Whether a ticket that ran out is excused at `now`: during an outage or the recovery
    /// after it.
    pub fn excuses_expiry(&self, now: i64) -> bool {
        let recovery = i64::try_from(RECOVERY.as_secs()).unwrap_or(120);
        self.is_silent(now) || self.recovered.is_some_and(|r| now <= r + recovery)
    }
}

impl RevocationSet {
    /// A set whose relay serves the nodes it served for up to `grace` past their tickets'
    /// end while the coordinator is gone (see the module's docs). [`Default`] has none.
    pub fn with_outage_grace(grace: Duration) -> Self {
        Self {
            grace: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            ..Self::default()
        }
    }

    /// Whether `key` is revoked at `now`.
    pub fn is_revoked(&self, key: &[u8; 32], now: i64) -> bool {
        self.read().get(key).is_some_and(|until| *until >= now)
    }

    /// Notes that the relay serves `key` at `now` with a ticket valid until `not_after`.
    pub fn served(&self, key: &[u8; 32], not_after: i64, now: i64) {
        if self.grace == 0 {
            return;
        }
        let mut w = self.word();
        let e = w.served.entry(*key).or_insert(i64::MIN);
        if *e < not_after {
            *e = not_after;
            self.changed.store(true, Ordering::Relaxed);
        }
        // Let go of those past any grace, whenever the map has doubled since.
        if w.served.len() >= w.pruned_at.max(1024) * 2 {
            let grace = self.grace;
            w.served
                .retain(|_, until| until.saturating_add(grace) >= now);
            w.pruned_at = w.served.len();
        }
    }

    /// Whether a node whose ticket ran out at `not_after` is still served at `now`: only
    /// during an outage or the recovery after it, only a node the relay served and no list
    /// revoked since, and only up to the grace past the end of the latest ticket it showed.
    pub fn serves_expired(&self, key: &[u8; 32], not_after: i64, now: i64) -> bool {
        if self.grace == 0 || self.is_revoked(key, now) {
            return false;
        }
        let w = self.word();
        let grace = self.grace;
        w.outage.excuses_expiry(now)
            && w.served
                .get(key)
                .is_some_and(|until| (*until).max(not_after).saturating_add(grace) >= now)
    }

    fn word(&self) -> std::sync::MutexGuard<'_, Word> {
        self.word
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Verifies `signed` under the coordinator's ticket key and adds its revocations;
    /// returns how many keys are revoked now. Expired entries are dropped.
    pub fn apply(
        &self,
        coordinator: &TicketKey,
        signed: &SignedRevocations,
        now: i64,
    ) -> anyhow::Result<usize> {
        let sig = wire::keys::parse_hex::<64>(&signed.sig).context("malformed signature")?;
        if !hybrid::sign::verify(
            coordinator.as_bytes(),
            wire::REVOCATIONS_CONTEXT,
            signed.list.as_bytes(),
            &sig,
        ) {
            bail!("the revocation list is not signed by this mesh's coordinator");
        }
        let list: RevocationList =
            serde_json::from_str(&signed.list).context("decoding the revocation list")?;
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.retain(|_, until| *until >= now);
        let mut w = self.word();
        for r in &list.revoked {
            let e = keys.entry(*r.node_key.as_bytes()).or_insert(i64::MIN);
            if *e < r.until {
                *e = r.until;
                self.changed.store(true, Ordering::Relaxed);
            }
            // Revoked once, never served in an outage again (until a fresh ticket shows it
            // back).
            w.served.remove(r.node_key.as_bytes());
        }
        // News only if the coordinator issued it lately (an old list replayed is not).
        w.outage.heard(list.issued_at, now);
        Ok(keys.len())
    }

    /// What to keep across a restart ([`Kept`]), and whether the revocations or the nodes
    /// served changed since the last call.
    pub fn kept(&self) -> (Kept, bool) {
        let changed = self.changed.swap(false, Ordering::Relaxed);
        let entries = |m: &HashMap<[u8; 32], i64>| {
            let mut v: Vec<Revocation> = m
                .iter()
                .map(|(k, until)| Revocation {
                    node_key: NodeKey::from_bytes(*k),
                    until: *until,
                })
                .collect();
            v.sort_by_key(|r| *r.node_key.as_bytes());
            v
        };
        let revoked = entries(&self.read());
        let w = self.word();
        let kept = Kept {
            heard: w.outage.heard,
            recovered: w.outage.recovered,
            served: entries(&w.served),
            revoked,
        };
        (kept, changed)
    }

    /// Takes back what a relay kept before it restarted, at `now`: its revocations still in
    /// force, the nodes it served (while within the grace past their tickets), and when it
    /// last heard from the coordinator (so a restart during an outage is still an outage, and
    /// one while the coordinator is there is not).
    pub fn restore(&self, kept: Kept, now: i64) {
        // The revocations' lock, then the word's, in the order `apply` takes them.
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for r in kept.revoked.iter().filter(|r| r.until >= now) {
            let e = keys.entry(*r.node_key.as_bytes()).or_insert(r.until);
            *e = (*e).max(r.until);
        }
        let mut w = self.word();
        if self.grace > 0 {
            let grace = self.grace;
            for r in &kept.served {
                let key = r.node_key.as_bytes();
                let revoked = keys.get(key).is_some_and(|until| *until >= now);
                if r.until.saturating_add(grace) >= now && !revoked {
                    let e = w.served.entry(*key).or_insert(r.until);
                    *e = (*e).max(r.until);
                }
            }
        }
        if w.outage.heard.is_none() {
            w.outage = Outage {
                heard: kept.heard,
                recovered: kept.recovered,
            };
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], i64>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `list` signed with the coordinator's relay-ticket key, as `GET /relay/revocations` serves it.
pub fn sign(signer: &hybrid::ticket::TicketSigner, list: &RevocationList) -> SignedRevocations {
    let list = serde_json::to_string(list).unwrap_or_default();
    let mut sig = String::new();
    wire::keys::push_hex(
        &mut sig,
        &signer.sign(wire::REVOCATIONS_CONTEXT, list.as_bytes()),
    );
    SignedRevocations { list, sig }
}

/// Reads what a relay kept in `path` ([`KEPT_FILE`]); `None` when there is no such file.
pub fn load_kept(path: &Path) -> anyhow::Result<Option<Kept>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("{}: not what a relay keeps", path.display()))
}

/// Writes `kept` to `path` (mode 0600, atomically).
pub fn save_kept(path: &Path, kept: &Kept) -> anyhow::Result<()> {
    let json = serde_json::to_vec(kept).context("encoding what the relay keeps")?;
    statefs::write_private(path, &json).with_context(|| format!("writing {}", path.display()))
}

/// Polls `url` (the coordinator's `http://host:port`) forever, keeping `set` up to date, and
/// with `keep` writes what it keeps there ([`save_kept`]) at most every [`KEEP_EVERY`]: when
/// the revocations or the nodes served changed, or news came that the file does not have yet.
pub async fn poll(
    url: String,
    coordinator: TicketKey,
    set: Arc<RevocationSet>,
    keep: Option<PathBuf>,
) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    let mut failing = false;
    let mut saved: Option<(std::time::Instant, Option<i64>)> = None;
    let mut unsaved = false;
    loop {
        tick.tick().await;
        if let Some(path) = &keep
            && saved.is_none_or(|(at, _)| at.elapsed() >= KEEP_EVERY)
        {
            let (kept, changed) = set.kept();
            unsaved |= changed || saved.is_none_or(|(_, heard)| heard != kept.heard);
            if unsaved {
                match save_kept(path, &kept) {
                    Ok(()) => unsaved = false,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "cannot keep whom the relay served; a restart during a coordinator outage would cut them")
                    }
                }
                saved = Some((std::time::Instant::now(), kept.heard));
            }
        }
        let now = unix_now();
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, fetch(&url)).await {
            Ok(Ok(signed)) => set.apply(&coordinator, &signed, now),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!(
                "no answer in {}s",
                REQUEST_TIMEOUT.as_secs()
            )),
        };
        match result {
            Ok(n) => {
                if failing {
                    info!(%url, "revocations reachable again");
                }
                failing = false;
                debug!(revoked = n, "revocations updated");
            }
            Err(e) if !failing => {
                warn!(%url, error = %format!("{e:#}"), "cannot fetch revocations; nodes removed meanwhile are not cut, and after 30 s nodes already served are served past their tickets (outage grace)");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

async fn fetch(url: &str) -> anyhow::Result<SignedRevocations> {
    let authority = url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .context("--coordinator-url must be the coordinator's http:// URL")?;
    let body = crate::http::get(authority, "/relay/revocations", MAX_ANSWER).await?;
    serde_json::from_slice(&body).context("decoding the answer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hybrid::ticket::TicketSigner;

    #[test]
    fn only_signed_lists_count_and_an_old_list_cannot_lift_a_revocation() {
        let signer = TicketSigner::from_seed([1; 32]);
        let key = TicketKey::from_bytes(signer.public());
        let set = RevocationSet::default();
        let victim = NodeKey::from_bytes([9; 32]);
        let list = RevocationList {
            issued_at: 100,
            revoked: vec![Revocation {
                node_key: victim,
                until: 220,
            }],
        };
        // Forged: signed by someone else, or altered after signing.
        let other = TicketSigner::from_seed([2; 32]);
        assert!(set.apply(&key, &sign(&other, &list), 100).is_err());
        let mut altered = sign(&signer, &list);
        altered.list = altered.list.replace("220", "999");
        assert!(set.apply(&key, &altered, 100).is_err());
        assert!(!set.is_revoked(victim.as_bytes(), 100));
        // Genuine.
        assert_eq!(set.apply(&key, &sign(&signer, &list), 100).unwrap(), 1);
        assert!(set.is_revoked(victim.as_bytes(), 150));
        // An older, empty list (replayed) changes nothing; expiry does.
        let empty = RevocationList {
            issued_at: 50,
            revoked: vec![],
        };
        set.apply(&key, &sign(&signer, &empty), 150).unwrap();
        assert!(set.is_revoked(victim.as_bytes(), 150));
        assert!(!set.is_revoked(victim.as_bytes(), 221));
    }

    /// What a relay keeps is taken back after a restart: revocations in force, the nodes it
    /// served (within the grace), and when it last heard from the coordinator, so a restart
    /// while the coordinator is there is no outage and one during an outage is.
    #[test]
    fn what_a_relay_kept_is_taken_back_after_a_restart() {
        let signer = TicketSigner::from_seed([1; 32]);
        let key = TicketKey::from_bytes(signer.public());
        let (a, r, y) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let set = RevocationSet::with_outage_grace(Duration::from_secs(600));
        set.served(&a, 1100, 1000);
        let list = RevocationList {
            issued_at: 1000,
            revoked: vec![Revocation {
                node_key: NodeKey::from_bytes(r),
                until: 1300,
            }],
        };
        // Lists every 20 s, until the start's recovery is over.
        for t in (1000..=1140).step_by(20) {
            let list = RevocationList {
                issued_at: t,
                ..list.clone()
            };
            set.apply(&key, &sign(&signer, &list), t).unwrap();
        }
        let (kept, changed) = set.kept();
        assert!(changed);
        assert!(!set.kept().1, "nothing changed since");
        set.served(&a, 1100, 1141);
        assert!(!set.kept().1, "the same ticket again is no change");
        let json = serde_json::to_string(&kept).unwrap();
        let kept: Kept = serde_json::from_str(&json).unwrap();
        let restarted = |now: i64, grace: u64| {
            let s = RevocationSet::with_outage_grace(Duration::from_secs(grace));
            s.restore(kept.clone(), now);
            s
        };
        // Restarted 10 s after the last list: the coordinator is there, no outage.
        let soon = restarted(1150, 600);
        assert!(soon.is_revoked(&r, 1150));
        assert!(!soon.serves_expired(&a, 1100, 1150));
        // Restarted 250 s into the silence: an outage; A served, a node never served not.
        let later = restarted(1400, 600);
        assert!(later.serves_expired(&a, 1100, 1400));
        assert!(!later.serves_expired(&y, 1100, 1400));
        // Past the grace, A is not taken back.
        assert!(!restarted(1701, 600).serves_expired(&a, 1100, 1701));
        // Without a grace only the revocations are.
        let strict = RevocationSet::default();
        strict.restore(kept.clone(), 1160);
        assert!(strict.is_revoked(&r, 1160));
        assert!(!strict.serves_expired(&a, 1100, 1400));
        // A revocation that ran out is not taken back.
        assert!(!restarted(1301, 600).is_revoked(&r, 1301));
    }

    #[test]
    fn an_outage_keeps_the_nodes_served_served_past_their_tickets_and_no_others() {
        let signer = TicketSigner::from_seed([1; 32]);
        let key = TicketKey::from_bytes(signer.public());
        let list = |issued_at: i64, revoked: &[[u8; 32]]| {
            sign(
                &signer,
                &RevocationList {
                    issued_at,
                    revoked: revoked
                        .iter()
                        .map(|k| Revocation {
                            node_key: NodeKey::from_bytes(*k),
                            until: issued_at + 120,
                        })
                        .collect(),
                },
            )
        };
        let (a, x, y) = ([1; 32], [2; 32], [3; 32]);
        let set = RevocationSet::with_outage_grace(Duration::from_secs(3600));
        // Lists every 20 s since 800 (the first one starts two minutes to bring tickets).
        for t in (800..=1000).step_by(20) {
            set.apply(&key, &list(t, &[]), t).unwrap();
        }
        set.served(&a, 1100, 1000);
        set.served(&x, 1100, 1000);
        for t in (1020..=1100).step_by(20) {
            set.apply(&key, &list(t, &[]), t).unwrap();
        }
        set.apply(&key, &list(1101, &[]), 1101).unwrap();
        // Lists keep coming: a ticket that ran out is not served.
        assert!(!set.serves_expired(&a, 1100, 1105));
        // None for more than 30 s: an outage. A node served is, one never served is not.
        assert!(!set.serves_expired(&a, 1100, 1131));
        assert!(set.serves_expired(&a, 1100, 1132));
        assert!(!set.serves_expired(&y, 1100, 1132));
        // Up to the grace past its latest ticket.
        assert!(set.serves_expired(&a, 1100, 4700));
        assert!(!set.serves_expired(&a, 1100, 4701));
        // A replayed old list is no news: still an outage; one revoking X ends X's grace,
        // also once the revocation itself has run out.
        set.apply(&key, &list(1101, &[x]), 2000).unwrap();
        assert!(set.serves_expired(&a, 1100, 2001));
        assert!(!set.serves_expired(&x, 1100, 2001));
        assert!(!set.serves_expired(&x, 1100, 2500));
        // The coordinator is back at 3000: two minutes to bring fresh tickets, lists coming.
        for t in (3000..=3140).step_by(20) {
            set.apply(&key, &list(t, &[]), t).unwrap();
            assert_eq!(set.serves_expired(&a, 1100, t), t <= 3120, "at {t}");
        }
        // A fresh ticket makes a node served again.
        set.served(&x, 3200, 3140);
        set.apply(&key, &list(3150, &[]), 3150).unwrap();
        assert!(set.serves_expired(&x, 3200, 3300), "an outage from 3181");
        // Without a grace, never.
        let strict = RevocationSet::default();
        strict.served(&a, 1100, 1000);
        assert!(!strict.serves_expired(&a, 1100, 1200));
    }
}
