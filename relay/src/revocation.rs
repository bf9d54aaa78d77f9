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

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{debug, info, warn};
use wire::{RevocationList, SignedRevocations, TicketKey};

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

/// Revoked node keys, until when (Unix seconds), and what the relay needs to ride out a
/// coordinator outage (see the module's docs).
#[derive(Debug, Default)]
pub struct RevocationSet {
    keys: RwLock<HashMap<[u8; 32], i64>>,
    /// How long past its ticket's end a node is served during an outage (0: never).
    grace: i64,
    word: std::sync::Mutex<Word>,
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
        let e = w.served.entry(*key).or_insert(not_after);
        *e = (*e).max(not_after);
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
            let e = keys.entry(*r.node_key.as_bytes()).or_insert(r.until);
            *e = (*e).max(r.until);
            // Revoked once, never served in an outage again (until a fresh ticket shows it
            // back).
            w.served.remove(r.node_key.as_bytes());
        }
        // News only if the coordinator issued it lately (an old list replayed is not).
        w.outage.heard(list.issued_at, now);
        Ok(keys.len())
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

/// Polls `url` (the coordinator's `http://host:port`) forever, keeping `set` up to date.
pub async fn poll(url: String, coordinator: TicketKey, set: Arc<RevocationSet>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    let mut failing = false;
    loop {
        tick.tick().await;
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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
        let victim = wire::NodeKey::from_bytes([9; 32]);
        let list = RevocationList {
            issued_at: 100,
            revoked: vec![wire::Revocation {
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
                        .map(|k| wire::Revocation {
                            node_key: wire::NodeKey::from_bytes(*k),
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
