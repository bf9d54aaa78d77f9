//! The audit log's hash chain (pure; the SQL lives in `db::audit`).
//!
//! Each entry's hash is BLAKE2s-256 over a length-prefixed encoding of its fields and the
//! previous entry's hash. `audit_head` stores the last `(seq, hash)`, so verification detects a
//! modified row (its hash no longer matches), a deleted row in the middle (a gap in `seq` and a
//! broken `prev_hash` link) and a deleted tail (the head no longer matches the last row).

use blake2::{Blake2s256, Digest};
use serde::{Deserialize, Serialize};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

    /// Chains the entry after `(prev_seq, prev_hash)`.
    pub fn chain(self, prev_seq: i64, prev_hash: &str, at_ms: i64) -> Entry {
        let mut e = Entry {
            seq: prev_seq + 1,
            at_ms,
            actor: self.actor,
            action: self.action,
            target: self.target,
            detail: self.detail.to_string(),
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        e
    }
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
    let digest = h.finalize();
    let mut out = String::with_capacity(64);
    wire::keys::push_hex(&mut out, &digest);
    out
}

/// The outcome of verifying a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Entries checked.
    pub entries: usize,
    /// Every problem found, in chain order. Empty means the log is intact.
    pub problems: Vec<String>,
}

impl Verification {
    /// Whether the chain is intact.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies `entries` (in `seq` order) against the stored head.
pub fn verify(entries: &[Entry], head: Option<(i64, &str)>) -> Verification {
    let mut v = Verification {
        entries: entries.len(),
        problems: Vec::new(),
    };
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
        prev_seq = e.seq;
        prev_hash = e.hash.clone();
    }
    match head {
        None if !entries.is_empty() => v.problems.push("audit head is missing".to_owned()),
        None => {}
        Some((seq, hash)) if seq != prev_seq || hash != prev_hash => {
            v.problems.push(format!(
                "chain ends at entry {prev_seq} but the head records entry {seq} \
                 (entries were deleted from the end or the head was altered)"
            ));
        }
        Some(_) => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

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
                .chain(seq, &hash, 1000 + i as i64),
            );
        }
        out
    }

    fn head(c: &[Entry]) -> Option<(i64, &str)> {
        c.last().map(|e| (e.seq, e.hash.as_str()))
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        let v = verify(&c, head(&c));
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.entries, 5);
        assert!(verify(&[], None).ok());
    }

    #[test]
    fn modified_row_is_found() {
        let c = chain(5);
        let mut bad = c.clone();
        bad[2].target = "someone-else".into();
        let v = verify(&bad, head(&c));
        assert_eq!(
            v.problems,
            ["entry 3: content does not match its hash (modified)"]
        );
    }

    #[test]
    fn deleted_middle_row_is_found() {
        let c = chain(5);
        let mut bad = c.clone();
        bad.remove(1);
        let v = verify(&bad, head(&c));
        assert!(!v.ok());
        assert!(
            v.problems[0].contains("entries 2..2 are missing"),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn deleted_tail_is_found_through_the_head() {
        let c = chain(5);
        let v = verify(&c[..4], head(&c));
        assert_eq!(v.problems.len(), 1);
        assert!(v.problems[0].contains("chain ends at entry 4"));
    }

    #[test]
    fn rehashing_a_modified_row_still_breaks_the_next_link() {
        let c = chain(3);
        let mut bad = c.clone();
        bad[0].actor = "forged".into();
        bad[0].hash = entry_hash(&bad[0]);
        let v = verify(&bad, head(&c));
        assert!(
            v.problems
                .iter()
                .any(|p| p.starts_with("entry 2: prev_hash"))
        );
    }
}
