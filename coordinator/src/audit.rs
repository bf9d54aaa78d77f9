//! The audit log's hash chain and its signatures (pure; the SQL lives in `db::audit`, the key
//! and checkpoint files in `audit_store`).
//!
//! Each entry's hash is BLAKE2s-256 over a length-prefixed encoding of its fields and the
//! previous entry's hash, and each entry is signed (Ed25519) under the coordinator's audit key,
//! which is kept in the state dir, never in the database. `audit_head` stores the last
//! `(seq, hash)`, also signed. A checkpoint file in the state dir records the first signed
//! entry and the newest entry the coordinator has seen committed.
//!
//! What [`verify`] detects, for someone who can write the database but not read the audit key
//! (a database administrator, a stolen backup restored elsewhere, an attacker with SQL
//! access):
//! - a modified entry (its hash and signature no longer match), even one re-hashed and re-linked
//!   consistently (it cannot be re-signed);
//! - inserted, reordered or deleted entries anywhere in the chain (links and sequence numbers);
//! - entries removed from the end, as far as the checkpoint reaches (the checkpoint is written
//!   at most a second after each change), and a replaced or rolled-back head;
//! - stripped signatures (every entry from the checkpoint's first signed one on must carry one).
//!
//! What it does not detect: changes by someone holding the audit key (root on the coordinator
//! host can rewrite the log and the checkpoint consistently); removal of the entries of the
//! last second before the checkpoint caught up; entries a compromised coordinator never wrote.
//! Entries written before audit signing existed are covered only by the hash chain and by the
//! first signed entry that links to them.

use blake2::{Blake2s256, Digest};
use hybrid::sign::Signer;
use serde::{Deserialize, Serialize};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const ENTRY_CONTEXT: &[u8] = b"lattice audit entry v1";
const HEAD_CONTEXT: &[u8] = b"lattice audit head v1";

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// Who did it (`local:uid=0`, `token:1a2b..`, `authkey:..`, `system`).
    pub actor: String,
    /// What was done (`node.register`, `node.remove`, `authkey.create`, ...).
    pub action: String,
    /// What it was done to (a node name, a key id).
    pub target: String,
    /// JSON object with details (never secrets).
    pub detail: String,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
    /// Ed25519 signature over the hash under the audit key (hex; empty for entries written
    /// before audit signing).
    #[serde(default)]
    pub sig: String,
}

/// The recorded end of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Last entry's seq.
    pub seq: i64,
    /// Last entry's hash.
    pub hash: String,
    /// Signature over both (hex; empty before audit signing).
    pub sig: String,
}

/// What the coordinator keeps outside the database about the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Entries from this seq on must be signed.
    pub signed_from: i64,
    /// The newest entry seen committed.
    pub seq: i64,
    /// Its hash.
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

/// The content of an entry before it is chained.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// Who did it.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// Details as a JSON value.
    pub detail: serde_json::Value,
}

impl NewEntry {
    /// Builds a new entry.
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
        detail: serde_json::Value,
    ) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            detail,
        }
    }

    /// Chains the entry after `(prev_seq, prev_hash)` and signs it.
    pub fn chain(self, prev_seq: i64, prev_hash: &str, at_ms: i64, key: &Signer) -> Entry {
        let mut e = Entry {
            seq: prev_seq + 1,
            at_ms,
            actor: self.actor,
            action: self.action,
            target: self.target,
            detail: self.detail.to_string(),
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
            sig: String::new(),
        };
        e.hash = entry_hash(&e);
        e.sig = hex(&key.sign(ENTRY_CONTEXT, e.hash.as_bytes()));
        e
    }
}

/// The signature of the head `(seq, hash)`.
pub fn sign_head(key: &Signer, seq: i64, hash: &str) -> String {
    hex(&key.sign(HEAD_CONTEXT, &head_message(seq, hash)))
}

fn head_message(seq: i64, hash: &str) -> Vec<u8> {
    [&seq.to_be_bytes()[..], hash.as_bytes()].concat()
}

fn signed(public: &[u8; 32], context: &[u8], message: &[u8], sig_hex: &str) -> bool {
    wire::keys::parse_hex::<64>(sig_hex)
        .is_some_and(|sig| hybrid::sign::verify(public, context, message, &sig))
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    wire::keys::push_hex(&mut s, b);
    s
}

/// The hash an entry must carry.
pub fn entry_hash(e: &Entry) -> String {
    let mut h = Blake2s256::new();
    h.update(b"lattice audit v1");
    h.update(e.seq.to_be_bytes());
    h.update(e.at_ms.to_be_bytes());
    for field in [&e.actor, &e.action, &e.target, &e.detail, &e.prev_hash] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        h.update(len.to_be_bytes());
        h.update(field.as_bytes());
    }
    hex(&h.finalize())
}

/// The outcome of verifying a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Entries checked.
    pub entries: usize,
    /// Entries with a valid signature.
    #[serde(default)]
    pub signed: usize,
    /// Every problem found, in chain order. Empty means the log is intact.
    pub problems: Vec<String>,
}

impl Verification {
    /// Whether the chain is intact.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies `entries` (in `seq` order) against the stored head, the audit key's public half
/// and the checkpoint kept outside the database.
pub fn verify(
    entries: &[Entry],
    head: Option<&Head>,
    public: &[u8; 32],
    checkpoint: Option<&Checkpoint>,
) -> Verification {
    let mut v = Verification {
        entries: entries.len(),
        ..Verification::default()
    };
    let signed_from = checkpoint.map_or(1, |c| c.signed_from);
    let mut prev_seq = 0;
    let mut prev_hash = GENESIS.to_owned();
    for e in entries {
        if e.seq != prev_seq + 1 {
            v.problems.push(format!(
                "entry {}: expected seq {} (entries {}..{} are missing)",
                e.seq,
                prev_seq + 1,
                prev_seq + 1,
                e.seq - 1
            ));
        }
        if e.prev_hash != prev_hash {
            v.problems.push(format!(
                "entry {}: prev_hash does not match the hash of the entry before it",
                e.seq
            ));
        }
        if entry_hash(e) != e.hash {
            v.problems.push(format!(
                "entry {}: content does not match its hash (modified)",
                e.seq
            ));
        }
        if signed(public, ENTRY_CONTEXT, e.hash.as_bytes(), &e.sig) {
            v.signed += 1;
        } else if e.seq >= signed_from {
            v.problems.push(format!(
                "entry {}: signature missing or not made with the audit key (written or \
                 rewritten outside the coordinator)",
                e.seq
            ));
        }
        prev_seq = e.seq;
        prev_hash = e.hash.clone();
    }
    match head {
        None if !entries.is_empty() => v.problems.push("audit head is missing".to_owned()),
        None => {}
        Some(h) if h.seq != prev_seq || h.hash != prev_hash => {
            v.problems.push(format!(
                "chain ends at entry {prev_seq} but the head records entry {} \
                 (entries were deleted from the end or the head was altered)",
                h.seq
            ));
        }
        Some(h)
            if h.seq >= signed_from
                && !signed(public, HEAD_CONTEXT, &head_message(h.seq, &h.hash), &h.sig) =>
        {
            v.problems.push(
                "the audit head's signature is missing or not made with the audit key".to_owned(),
            );
        }
        Some(_) => {}
    }
    if let Some(c) = checkpoint
        && c.seq > 0
    {
        match entries.iter().find(|e| e.seq == c.seq) {
            None => v.problems.push(format!(
                "the checkpoint kept outside the database records entry {} but the chain ends \
                 at entry {prev_seq} (entries were deleted from the end)",
                c.seq
            )),
            Some(e) if e.hash != hex(&c.hash) => v.problems.push(format!(
                "entry {}: differs from the one the checkpoint outside the database records \
                 (the log was rewritten)",
                c.seq
            )),
            Some(_) => {}
        }
    }
    v
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        wire::keys::parse_hex::<32>(&text)
            .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Signer {
        Signer::from_seed([4; 32])
    }

    fn chain(n: usize) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for i in 0..n {
            let (seq, hash) = out
                .last()
                .map_or((0, GENESIS.to_owned()), |e| (e.seq, e.hash.clone()));
            out.push(
                NewEntry::new(
                    "local:uid=0",
                    "node.remove",
                    format!("n{i}"),
                    serde_json::json!({"i": i}),
                )
                .chain(seq, &hash, 1000 + i as i64, &key()),
            );
        }
        out
    }

    fn head(c: &[Entry]) -> Option<Head> {
        c.last().map(|e| Head {
            seq: e.seq,
            hash: e.hash.clone(),
            sig: sign_head(&key(), e.seq, &e.hash),
        })
    }

    fn checkpoint(c: &[Entry]) -> Checkpoint {
        let last = c.last().unwrap();
        Checkpoint {
            signed_from: 1,
            seq: last.seq,
            hash: wire::keys::parse_hex(&last.hash).unwrap(),
        }
    }

    fn check(c: &[Entry], h: Option<&Head>, cp: Option<&Checkpoint>) -> Vec<String> {
        verify(c, h, &key().public(), cp).problems
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        let v = verify(
            &c,
            head(&c).as_ref(),
            &key().public(),
            Some(&checkpoint(&c)),
        );
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!((v.entries, v.signed), (5, 5));
        assert!(check(&[], None, None).is_empty());
    }

    #[test]
    fn modified_row_is_found() {
        let c = chain(5);
        let mut bad = c.clone();
        bad[2].target = "someone-else".into();
        assert_eq!(
            check(&bad, head(&c).as_ref(), None),
            ["entry 3: content does not match its hash (modified)"]
        );
    }

    #[test]
    fn deleted_middle_row_is_found() {
        let c = chain(5);
        let mut bad = c.clone();
        bad.remove(1);
        let p = check(&bad, head(&c).as_ref(), None);
        assert!(p[0].contains("entries 2..2 are missing"), "{p:?}");
    }

    #[test]
    fn deleted_tail_is_found_through_the_head() {
        let c = chain(5);
        let p = check(&c[..4], head(&c).as_ref(), None);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("chain ends at entry 4"));
    }

    #[test]
    fn a_history_rewritten_consistently_without_the_key_is_found() {
        // The attacker rewrites entry 2 and re-hashes and re-links everything after it, and
        // moves the head: the hash chain alone would pass.
        let c = chain(4);
        let mut bad = c.clone();
        bad[1].actor = "forged".into();
        for i in 1..bad.len() {
            bad[i].prev_hash = bad[i - 1].hash.clone();
            bad[i].hash = entry_hash(&bad[i]);
        }
        let forged_head = Head {
            seq: 4,
            hash: bad[3].hash.clone(),
            sig: String::new(),
        };
        let p = check(&bad, Some(&forged_head), None);
        assert!(
            p.iter().any(|p| p.starts_with("entry 2: signature")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.contains("head's signature")), "{p:?}");
        // Signing with another key does not help either.
        let other = Signer::from_seed([9; 32]);
        bad[1].sig = hex(&other.sign(ENTRY_CONTEXT, bad[1].hash.as_bytes()));
        assert!(!check(&bad, Some(&forged_head), None).is_empty());
    }

    #[test]
    fn a_truncated_log_with_a_rolled_back_head_is_found_through_the_checkpoint() {
        // Entries 4 and 5 are removed and the head set back to entry 3 (with the signature it
        // had then): only the checkpoint outside the database remembers entry 5.
        let c = chain(5);
        let old_head = head(&c[..3]);
        assert!(check(&c[..3], old_head.as_ref(), None).is_empty());
        let p = check(&c[..3], old_head.as_ref(), Some(&checkpoint(&c)));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("records entry 5"), "{p:?}");
    }

    #[test]
    fn stripped_signatures_are_found_but_entries_from_before_signing_are_accepted() {
        let mut c = chain(3);
        for e in &mut c[..2] {
            e.sig.clear();
        }
        let cp = Checkpoint {
            signed_from: 3,
            ..checkpoint(&c)
        };
        let v = verify(&c, head(&c).as_ref(), &key().public(), Some(&cp));
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.signed, 1);
        let strict = Checkpoint {
            signed_from: 1,
            ..cp
        };
        let p = check(&c, head(&c).as_ref(), Some(&strict));
        assert_eq!(p.len(), 2, "{p:?}");
    }
}
