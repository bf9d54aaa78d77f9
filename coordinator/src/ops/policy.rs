//! Policy operations: check, set (versioned and audited), get, diff; node attributes and
//! posture intake.

use std::collections::BTreeMap;

use jiff::Timestamp;
use policy::{Policy, PolicyDiff, PolicyError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use wire::{AttrValue, NodeId};

use crate::audit::NewEntry;
use crate::db;
use crate::db::changes::Kind;
use crate::db::policy::{PolicyVersion, StoredPolicy};
use crate::error::ApiError;
use crate::feed;
use crate::model::Attrs;
use crate::state::{AppState, unix_now, unix_now_ms};

/// Largest policy file accepted (bytes).
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most facts one posture report may carry.
pub const MAX_FACTS: usize = 64;
/// Longest string value of a fact or attribute.
pub const MAX_VALUE_LEN: usize = 256;

/// A policy file as submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyText {
    /// The name used in messages (the CLI sends the path it read).
    pub file_name: String,
    /// HuJSON text.
    pub text: String,
}

/// The policy in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    /// The stored version; `None` while the built-in default (everyone reaches everyone) is
    /// in force.
    pub stored: Option<StoredPolicy>,
    /// Number of rules.
    pub rules: usize,
    /// Number of tests.
    pub tests: usize,
}

/// One line of a diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessChange {
    /// Source node.
    pub src: String,
    /// Destination node.
    pub dst: String,
    /// Protocols and ports, e.g. `tcp 22,443; icmp`.
    pub access: String,
}

/// Who gains and who loses access.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffView {
    /// New access.
    pub gained: Vec<AccessChange>,
    /// Access taken away.
    pub lost: Vec<AccessChange>,
    /// Pairs that gain access (more than `gained` lists when the list was cut short).
    #[serde(default)]
    pub gained_total: usize,
    /// Pairs that lose access.
    #[serde(default)]
    pub lost_total: usize,
}

impl DiffView {
    /// Keeps the first `n` lines of each list (the totals stay).
    pub fn truncated(mut self, n: usize) -> Self {
        self.gained.truncate(n);
        self.lost.truncate(n);
        self
    }
}

/// Lines of each list `policy set` returns; `policy diff` lists every pair.
pub const SET_DIFF_LINES: usize = 50;

impl From<PolicyDiff> for DiffView {
    fn from(d: PolicyDiff) -> Self {
        let conv = |c: policy::Change| AccessChange {
            src: c.src,
            dst: c.dst,
            access: c.access.to_string(),
        };
        Self {
            gained_total: d.gained.len(),
            lost_total: d.lost.len(),
            gained: d.gained.into_iter().map(conv).collect(),
            lost: d.lost.into_iter().map(conv).collect(),
        }
    }
}

/// What `policy set` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetOutcome {
    /// The version now in force.
    pub version: i64,
    /// The text was identical to the version in force; nothing was stored.
    pub unchanged: bool,
    /// Rules and tests in the file.
    pub rules: usize,
    /// Tests that ran and passed.
    pub tests: usize,
    /// Effect on the current nodes.
    pub diff: DiffView,
}

fn rejected(e: &PolicyError) -> ApiError {
    let n = e.diagnostics.len();
    ApiError::Rejected {
        message: format!(
            "policy rejected: {n} problem{} (the policy in force is unchanged)",
            if n == 1 { "" } else { "s" }
        ),
        details: e.lines(),
    }
}

fn parse_submitted(req: &PolicyText) -> Result<(), ApiError> {
    if req.text.len() > MAX_POLICY_BYTES {
        return Err(ApiError::BadRequest(format!(
            "policy file is {} bytes; the limit is {MAX_POLICY_BYTES}",
            req.text.len()
        )));
    }
    if req.file_name.is_empty() || req.file_name.len() > 256 || req.file_name.contains('\n') {
        return Err(ApiError::BadRequest("bad policy file name".into()));
    }
    Ok(())
}

/// Checks a policy (syntax, references, tests) against the current nodes at `now`.
fn check(st: &AppState, req: &PolicyText, now: Timestamp) -> Result<Policy, ApiError> {
    parse_submitted(req)?;
    let inventory = st.hub.read().inventory().clone();
    Policy::check(&req.file_name, &req.text, now, Some(&inventory)).map_err(|e| rejected(&e))
}

fn now_ts() -> Timestamp {
    Timestamp::from_millisecond(unix_now_ms()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn sha256_hex(text: &str) -> String {
    let mut s = String::new();
    wire::keys::push_hex(&mut s, &Sha256::digest(text.as_bytes()));
    s
}

/// The effect of replacing the policy in force with `new` on the current nodes, now.
fn diff_against_current(st: &AppState, new: &Policy, now: Timestamp) -> DiffView {
    let (old, inventory) = {
        let hub = st.hub.read();
        (hub.policy().1, hub.inventory().clone())
    };
    policy::diff_policies(&old, new, &inventory, now).into()
}

/// The policy in force.
pub async fn get(st: &AppState) -> Result<PolicyView, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    let stored = db::policy::current(&mut conn).await?;
    let p = st.hub.read().policy().1;
    Ok(PolicyView {
        stored,
        rules: p.rule_count(),
        tests: p.test_count(),
    })
}

/// A stored version.
pub async fn version(st: &AppState, v: i64) -> Result<StoredPolicy, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    db::policy::get(&mut conn, v)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no policy version {v}")))
}

/// Every stored version.
pub async fn versions(st: &AppState) -> Result<Vec<PolicyVersion>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    Ok(db::policy::versions(&mut conn).await?)
}

/// What setting `req` would change, without setting it (the file must pass its checks).
pub async fn diff(st: &AppState, req: &PolicyText) -> Result<DiffView, ApiError> {
    let now = now_ts();
    let new = check(st, req, now)?;
    Ok(diff_against_current(st, &new, now))
}

/// Checks `req` and, if everything passes, stores it as a new version, audits it and puts
/// it in force; nodes receive their new rules at once. Any failure leaves everything as it
/// was.
pub async fn set(st: &AppState, req: &PolicyText, actor: &str) -> Result<SetOutcome, ApiError> {
    let now = now_ts();
    let started = std::time::Instant::now();
    let new = check(st, req, now)?;
    let checked = started.elapsed();
    let sha = sha256_hex(&req.text);
    let diff = diff_against_current(st, &new, now);
    let diffed = started.elapsed();
    let mut tx = db::begin_write(&st.db).await?;
    let current = db::policy::current(&mut tx).await?;
    if let Some(cur) = &current
        && cur.sha256 == sha
        && cur.file_name == req.file_name
    {
        return Ok(SetOutcome {
            version: cur.version,
            unchanged: true,
            rules: new.rule_count(),
            tests: new.test_count(),
            diff: DiffView::default(),
        });
    }
    let (version, seq) = store_version(
        &mut tx,
        st.audit.key(),
        (&req.file_name, &req.text, &sha),
        &new,
        current.as_ref(),
        actor,
        json!({"gained": diff.gained_total, "lost": diff.lost_total}),
    )
    .await?;
    feed::commit(st, tx, seq).await?;
    let ms = |d: std::time::Duration| d.as_millis();
    tracing::info!(%actor, version, file = %req.file_name, rules = new.rule_count(),
        gained = diff.gained_total, lost = diff.lost_total, check_ms = ms(checked),
        diff_ms = ms(diffed - checked), commit_ms = ms(started.elapsed() - diffed), "policy set");
    let outcome = SetOutcome {
        version,
        unchanged: false,
        rules: new.rule_count(),
        tests: new.test_count(),
        diff: diff.truncated(SET_DIFF_LINES),
    };
    Ok(outcome)
}

/// Loads the policy for `serve`: `file` (checked; stored as a new version when it differs
/// from the one in force) or else the stored version, or else the default. A file that fails
/// any check stops the coordinator from starting: it never runs with a policy other than the
/// one asked for.
pub async fn load_at_start(
    pool: &db::Pool,
    audit_key: &hybrid::sign::Signer,
    file: Option<(&str, &str)>,
    actor: &str,
) -> anyhow::Result<(i64, Policy)> {
    let now = now_ts();
    let mut tx = db::begin_write(pool).await?;
    let current = db::policy::current(&mut tx).await?;
    let Some((name, text)) = file else {
        return match current {
            None => Ok((0, Policy::allow_all())),
            Some(cur) => {
                // The stored version passed every check when it was set; its tests may have
                // gone stale since (time-dependent ones), so only parse it here.
                let p = Policy::parse(&cur.file_name, &cur.text).map_err(|e| {
                    anyhow::anyhow!(
                        "the stored policy version {} no longer parses:\n{e}",
                        cur.version
                    )
                })?;
                Ok((cur.version, p))
            }
        };
    };
    let p = Policy::check(name, text, now, None)
        .map_err(|e| anyhow::anyhow!("--policy {name} is invalid; not starting:\n{e}"))?;
    let sha = sha256_hex(text);
    if let Some(cur) = &current
        && cur.sha256 == sha
    {
        return Ok((cur.version, p));
    }
    let (version, _) = store_version(
        &mut tx,
        audit_key,
        (name, text, &sha),
        &p,
        current.as_ref(),
        actor,
        json!({"source": "serve --policy"}),
    )
    .await?;
    tx.commit().await?;
    Ok((version, p))
}

/// Stores `(file name, text, sha256)` as the next version and audits it (in the caller's
/// transaction); `extra` fields join the audit entry's detail.
async fn store_version(
    tx: &mut db::Tx,
    key: &hybrid::sign::Signer,
    (name, text, sha): (&str, &str, &str),
    policy: &Policy,
    previous: Option<&StoredPolicy>,
    actor: &str,
    extra: serde_json::Value,
) -> Result<(i64, i64), db::DbError> {
    let version = db::policy::insert(tx, name, text, sha, actor, unix_now_ms()).await?;
    let mut detail = json!({
        "version": version,
        "previous_version": previous.map(|c| c.version),
        "file": name,
        "sha256": sha,
        "rules": policy.rule_count(),
        "tests": policy.test_count(),
    });
    if let (Some(d), serde_json::Value::Object(more)) = (detail.as_object_mut(), extra) {
        d.extend(more);
    }
    db::audit::append(
        tx,
        key,
        NewEntry::new(actor, "policy.set", format!("policy:v{version}"), detail),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(tx, Kind::Policy, None, None).await?;
    Ok((version, seq))
}

/// Changes to a node's admin-set attributes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttrChange {
    /// Attributes to set (`custom:NAME` -> value).
    #[serde(default)]
    pub set: BTreeMap<String, AttrValue>,
    /// Attributes to remove.
    #[serde(default)]
    pub unset: Vec<String>,
}

fn check_custom(name: &str) -> Result<(), ApiError> {
    if !name.starts_with("custom:") {
        return Err(ApiError::BadRequest(format!(
            "admins set custom: attributes only ({name:?}); node: and fact: come from the node"
        )));
    }
    policy::check_attr_name(name).map_err(ApiError::BadRequest)?;
    if name.len() > 64 {
        return Err(ApiError::BadRequest(format!(
            "attribute name {name:?} is too long"
        )));
    }
    Ok(())
}

fn value_ok(v: &AttrValue) -> bool {
    match v {
        AttrValue::String(s) => s.len() <= MAX_VALUE_LEN,
        AttrValue::Number(n) => n.is_finite(),
        AttrValue::Bool(_) => true,
    }
}

/// Sets and removes `custom:` attributes of node `name`; returns them all. Access that
/// depends on them changes at once.
pub async fn set_attrs(
    st: &AppState,
    name: &str,
    change: &AttrChange,
    actor: &str,
) -> Result<Attrs, ApiError> {
    for (k, v) in &change.set {
        check_custom(k)?;
        if !value_ok(v) {
            return Err(ApiError::BadRequest(format!("bad value for {k}")));
        }
    }
    for k in &change.unset {
        check_custom(k)?;
    }
    let mut tx = db::begin_write(&st.db).await?;
    let Some(node) = db::nodes::by_name(&mut tx, name).await? else {
        return Err(ApiError::NotFound(format!("no node named {name:?}")));
    };
    let mut attrs = node.custom_attrs.clone();
    for k in &change.unset {
        attrs.remove(k);
    }
    attrs.extend(change.set.clone());
    if attrs.len() > MAX_FACTS {
        return Err(ApiError::BadRequest(format!(
            "a node may carry at most {MAX_FACTS} custom attributes"
        )));
    }
    db::nodes::set_custom_attrs(&mut tx, node.id, &attrs).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "node.attrs",
            &node.name,
            json!({"node_id": node.id, "old": node.custom_attrs, "new": attrs}),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(&mut tx, Kind::Node, Some(node.id), None).await?;
    feed::commit(st, tx, seq).await?;
    Ok(attrs)
}

/// Keeps the facts of a posture report that a node may state about itself: `node:` built-ins
/// (not `hostname`, which the coordinator assigns) and `fact:` names, with bounded values.
/// Returns the kept facts and the names of dropped ones.
pub fn sanitize_posture(facts: BTreeMap<String, AttrValue>) -> (Attrs, Vec<String>) {
    let mut kept = Attrs::new();
    let mut dropped = Vec::new();
    for (k, v) in facts {
        let ok = kept.len() < MAX_FACTS
            && k.len() <= 64
            && (k.starts_with("node:") || k.starts_with("fact:"))
            && k != "node:hostname"
            && policy::check_attr_name(&k).is_ok()
            && value_ok(&v);
        if ok {
            kept.insert(k, v);
        } else {
            dropped.push(k);
        }
    }
    (kept, dropped)
}

/// Records a posture report from node `id`; when it differs from the last one the policy is
/// re-evaluated and nodes receive new rules.
pub async fn record_posture(
    st: &AppState,
    id: NodeId,
    facts: BTreeMap<String, AttrValue>,
) -> Result<bool, ApiError> {
    let (posture, dropped) = sanitize_posture(facts);
    if !dropped.is_empty() {
        tracing::warn!(node = %id, ?dropped, "ignored posture facts a node may not report");
    }
    let mut tx = db::begin_write(&st.db).await?;
    let Some(node) = db::nodes::by_id(&mut tx, id).await? else {
        return Ok(false);
    };
    if node.posture == posture {
        return Ok(false);
    }
    db::nodes::set_posture(&mut tx, id, &posture, unix_now()).await?;
    let seq = feed::note(&mut tx, Kind::Node, Some(id), None).await?;
    feed::commit(st, tx, seq).await?;
    tracing::info!(node = %node.name, facts = posture.len(), "posture changed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posture_reports_keep_only_what_a_node_may_say() {
        let facts: BTreeMap<String, AttrValue> = [
            ("node:os", AttrValue::String("linux".into())),
            ("node:diskEncrypted", AttrValue::Bool(true)),
            ("fact:edr", AttrValue::String("running".into())),
            ("custom:admin", AttrValue::Bool(true)),
            ("node:hostname", AttrValue::String("db-1".into())),
            ("node:favouriteColour", AttrValue::String("red".into())),
            (
                "fact:huge",
                AttrValue::String("x".repeat(MAX_VALUE_LEN + 1)),
            ),
            ("fact:bad name", AttrValue::Bool(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let (kept, mut dropped) = sanitize_posture(facts);
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            ["fact:edr", "node:diskEncrypted", "node:os"]
        );
        dropped.sort();
        assert_eq!(
            dropped,
            [
                "custom:admin",
                "fact:bad name",
                "fact:huge",
                "node:favouriteColour",
                "node:hostname"
            ]
        );
    }

    #[test]
    fn too_many_facts_are_cut_at_the_limit() {
        let facts: BTreeMap<String, AttrValue> = (0..MAX_FACTS + 10)
            .map(|i| (format!("fact:f{i:03}"), AttrValue::Bool(true)))
            .collect();
        let (kept, dropped) = sanitize_posture(facts);
        assert_eq!(kept.len(), MAX_FACTS);
        assert_eq!(dropped.len(), 10);
    }

    #[test]
    fn admins_set_only_custom_attributes() {
        assert!(check_custom("custom:team").is_ok());
        assert!(check_custom("node:os").is_err());
        assert!(check_custom("fact:edr").is_err());
        assert!(check_custom("custom:").is_err());
    }
}
