//! Revocations a standalone relay learns from the coordinator, so it stops serving a removed
//! node within seconds instead of when the node's ticket runs out (up to two minutes).
//!
//! The coordinator publishes the node keys that left the mesh at `GET /relay/revocations`,
//! signed with its relay-ticket key (the key the relay already trusts for tickets). The relay
//! polls it every [`POLL_EVERY`]; a list that does not verify is ignored. Lists only ever add
//! revocations here (each expires on its own), so replaying an old list can withhold news but
//! never lift a revocation.

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

/// Revoked node keys, until when (Unix seconds).
#[derive(Debug, Default)]
pub struct RevocationSet {
    keys: RwLock<HashMap<[u8; 32], i64>>,
}

impl RevocationSet {
    /// Whether `key` is revoked at `now`.
    pub fn is_revoked(&self, key: &[u8; 32], now: i64) -> bool {
        self.read().get(key).is_some_and(|until| *until >= now)
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
        for r in list.revoked {
            let e = keys.entry(*r.node_key.as_bytes()).or_insert(r.until);
            *e = (*e).max(r.until);
        }
        Ok(keys.len())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], i64>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
                warn!(%url, error = %format!("{e:#}"), "cannot fetch revocations; removed nodes are cut only when their tickets expire");
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

    fn signed(signer: &TicketSigner, list: &RevocationList) -> SignedRevocations {
        let list = serde_json::to_string(list).unwrap();
        let mut sig = String::new();
        wire::keys::push_hex(
            &mut sig,
            &signer.sign(wire::REVOCATIONS_CONTEXT, list.as_bytes()),
        );
        SignedRevocations { list, sig }
    }

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
        assert!(set.apply(&key, &signed(&other, &list), 100).is_err());
        let mut altered = signed(&signer, &list);
        altered.list = altered.list.replace("220", "999");
        assert!(set.apply(&key, &altered, 100).is_err());
        assert!(!set.is_revoked(victim.as_bytes(), 100));
        // Genuine.
        assert_eq!(set.apply(&key, &signed(&signer, &list), 100).unwrap(), 1);
        assert!(set.is_revoked(victim.as_bytes(), 150));
        // An older, empty list (replayed) changes nothing; expiry does.
        let empty = RevocationList {
            issued_at: 50,
            revoked: vec![],
        };
        set.apply(&key, &signed(&signer, &empty), 150).unwrap();
        assert!(set.is_revoked(victim.as_bytes(), 150));
        assert!(!set.is_revoked(victim.as_bytes(), 221));
    }
}
