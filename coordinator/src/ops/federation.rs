//! Federation rule operations: add (checked and audited), list, remove.

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::NewEntry;
use crate::db;
use crate::error::ApiError;
use crate::federation::{Admission, ClaimMatch, TrustRule};
use crate::jwt::{self, Expect};
use crate::ops::check_tags;

use crate::state::{AppState, unix_now, unix_now_ms};

/// Shortest and longest `--max-lifetime`.
pub const MIN_LIFETIME_S: u64 = 60;
/// 365 days.
pub const MAX_LIFETIME_S: u64 = 365 * 86_400;

/// `federation add` as submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddRule {
    /// The exact `iss` of the tokens.
    pub issuer: String,
    /// The audience they must carry.
    pub audience: String,
    /// `CLAIM=GLOB` conditions.
    #[serde(default)]
    pub matches: Vec<String>,
    /// Tags for the nodes.
    pub tags: Vec<String>,
    /// Whether nodes are removed when they go offline (the default).
    #[serde(default = "yes")]
    pub ephemeral: bool,
    /// The longest access one token grants, in seconds.
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Whether `url` may be an issuer: https, or http on this host only (a test issuer, or one
/// behind a local proxy); no credentials, query or fragment.
pub fn check_issuer(url: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::BadRequest(format!(
            "issuer {url:?} {why} (it must be exactly the tokens' `iss`)"
        )))
    };
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        let authority = r.split('/').next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.split(':').next().unwrap_or(""),
        };
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !local {
            return bad("is not https:// (plain http is accepted only on this host)");
        }
        r
    } else {
        return bad("is not an https:// URL");
    };
    if rest.is_empty()
        || url.len() > 512
        || rest.contains(['?', '#', '@'])
        || rest.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return bad("is not a plain URL");
    }
    Ok(())
}

/// Adds a rule.
pub async fn add(st: &AppState, req: AddRule, actor: &str) -> Result<TrustRule, ApiError> {
    check_issuer(&req.issuer)?;
    if req.audience.is_empty()
        || req.audience.len() > 256
        || req.audience.chars().any(char::is_control)
    {
        return Err(ApiError::BadRequest(format!(
            "invalid audience {:?}",
            req.audience
        )));
    }
    let matches = req
        .matches
        .iter()
        .map(|m| m.parse::<ClaimMatch>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if matches.len() > 16 {
        return Err(ApiError::BadRequest("at most 16 --match conditions".into()));
    }
    if req.tags.is_empty() {
        return Err(ApiError::BadRequest(
            "a federation rule needs at least one --tag (workloads join as tagged nodes)".into(),
        ));
    }
    check_tags(st, &req.tags)?;
    if let Some(s) = req.max_lifetime_s
        && !(MIN_LIFETIME_S..=MAX_LIFETIME_S).contains(&s)
    {
        return Err(ApiError::BadRequest(
            "--max-lifetime must be between 1 minute and 365 days".into(),
        ));
    }
    let mut tags = req.tags.clone();
    tags.sort();
    tags.dedup();
    let rule = TrustRule {
        id: 0,
        issuer: req.issuer,
        audience: req.audience,
        matches,
        tags,
        ephemeral: req.ephemeral,
        max_lifetime_s: req.max_lifetime_s,
    };
    let mut tx = db::begin_write(&st.db).await?;
    let stored = db::federation::insert(&mut tx, &rule, actor, unix_now()).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "federation.add",
            stored.id.to_string(),
            json!(stored),
        ),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    Ok(stored)
}

/// Every rule.
pub async fn list(st: &AppState) -> Result<Vec<TrustRule>, ApiError> {
    let mut c = st.db.acquire().await.map_err(db::DbError::from)?;
    Ok(db::federation::all(&mut c).await?)
}

/// Removes a rule. Nodes that joined through it keep their access until it ends (their
/// token's lifetime); they cannot renew it.
pub async fn remove(st: &AppState, id: i64, actor: &str) -> Result<TrustRule, ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    let Some(gone) = db::federation::remove(&mut tx, id).await? else {
        return Err(ApiError::NotFound(format!("no federation rule {id}")));
    };
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(actor, "federation.remove", id.to_string(), json!(gone)),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    Ok(gone)
}

/// Why a token did not admit a node (shown to the node, and logged).
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// The token, the rules or the issuer's keys say no; the message names the check.
    #[error("{0}")]
    Refused(String),
    /// Our side failed (the database, or fetching the issuer's keys).
    #[error("{0}")]
    Unavailable(String),
}

/// What a token from an outside issuer grants at `now`: the first rule for its issuer whose
/// audience, signature checks and claim conditions it meets. The refusal names the check
/// that failed (for the last rule tried).
pub async fn admit_token(st: &AppState, token: &str, now: i64) -> Result<Admission, TokenRefusal> {
    let refused =
        |e: &dyn std::fmt::Display| TokenRefusal::Refused(format!("id token refused: {e}"));
    let issuer = jwt::unverified_issuer(token).map_err(|e| refused(&e))?;
    let rules = {
        let mut c = st
            .db
            .acquire()
            .await
            .map_err(|e| TokenRefusal::Unavailable(e.to_string()))?;
        db::federation::for_issuer(&mut c, &issuer)
            .await
            .map_err(|e| TokenRefusal::Unavailable(e.to_string()))?
    };
    let rules = crate::federation::rules_for(&rules, &issuer).map_err(|e| refused(&e))?;
    let keys = st
        .keys
        .keys_for(&issuer, token)
        .await
        .map_err(|e| TokenRefusal::Unavailable(format!("{e:#}")))?;
    let mut last = String::new();
    for rule in rules {
        let expect = Expect {
            issuer: &rule.issuer,
            audience: &rule.audience,
        };
        match jwt::verify(token, &keys, expect, now) {
            Ok(v) => match rule.admit(&v, now) {
                Ok(a) => return Ok(a),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(refused(&last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_https_or_local_http_and_plain() {
        for ok in [
            "https://token.actions.githubusercontent.com",
            "https://kubernetes.default.svc.cluster.local",
            "https://login.example.com/realms/main",
            "http://127.0.0.1:8444",
            "http://localhost:9000/issuer",
            "http://[::1]:8444",
        ] {
            assert!(check_issuer(ok).is_ok(), "{ok}");
        }
        for bad in [
            "token.actions.githubusercontent.com",
            "http://issuer.example.com",
            "http://localhost.evil.com",
            "ftp://x",
            "https://",
            "https://user:pw@issuer.example.com",
            "https://issuer.example.com/?a=b",
            "https://issuer.example.com/#x",
            "https://issuer example.com",
            "http://[::2]:8444",
            "http://10.0.0.1",
        ] {
            assert!(check_issuer(bad).is_err(), "{bad}");
        }
    }
}
