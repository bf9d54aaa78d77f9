//! Workload identity federation: which outside tokens may join the mesh, and as what.
//!
//! A [`TrustRule`] names an issuer, an audience and claim patterns (`sub=repo:org/app:*`); a
//! token that [`crate::jwt::verify`] accepted for that issuer and audience and whose claims
//! match every pattern joins with the rule's tags, ephemeral by default, and only until the
//! token expires (or the rule's maximum lifetime ends, if sooner). Sans-IO: the time is
//! passed in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::jwt::Verified;

/// One `CLAIM=GLOB` condition: the claim at a dotted path, as text, matches the glob (`*`
/// stands for any run of characters, everything else is literal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimMatch {
    /// Dotted claim path (`sub`, `repository`, `kubernetes.io.namespace`).
    pub claim: String,
    /// The pattern.
    pub pattern: String,
}

/// Why a `CLAIM=GLOB` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not CLAIM=PATTERN (for example sub=repo:org/app:*)")]
pub struct BadMatch(pub String);

impl FromStr for ClaimMatch {
    type Err = BadMatch;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (claim, pattern) = s.split_once('=').ok_or_else(|| BadMatch(s.into()))?;
        let claim = claim.trim();
        let ok_claim = !claim.is_empty()
            && claim.len() <= 128
            && claim
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| !c.is_control()));
        if !ok_claim || pattern.is_empty() || pattern.len() > 512 {
            return Err(BadMatch(s.into()));
        }
        Ok(Self {
            claim: claim.to_owned(),
            pattern: pattern.to_owned(),
        })
    }
}

impl fmt::Display for ClaimMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.claim, self.pattern)
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (including none)
/// and every other character only itself. At worst pattern length times text length steps
/// (no exponential backtracking, whatever the pattern).
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in the text it was tried.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` take one more character.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Who may join through an outside issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRule {
    /// Its id (stable; `federation remove ID`).
    pub id: i64,
    /// The exact `iss`; also where its keys are found (OpenID discovery under it).
    pub issuer: String,
    /// The audience tokens must carry.
    pub audience: String,
    /// Conditions every one of which the token's claims must meet (none: any token of that
    /// issuer and audience).
    pub matches: Vec<ClaimMatch>,
    /// Tags the node gets.
    pub tags: Vec<String>,
    /// Whether the node is removed when it goes offline.
    pub ephemeral: bool,
    /// The longest access one token grants, from when it was issued (or presented), in
    /// seconds; `None`: the token's own lifetime.
    pub max_lifetime_s: Option<u64>,
}

/// Why a verified token is not admitted by a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederationError {
    /// No rule names the token's issuer.
    #[error("no federation rule trusts the issuer {0:?}")]
    UnknownIssuer(String),
    /// The access the token grants has already ended (its `exp` passed, within the clock
    /// leeway the signature check allows, or the rule's maximum lifetime did).
    #[error("the access this token grants ended at {until} (unix seconds; now {now})")]
    Ended {
        /// When it ended.
        until: i64,
        /// Our clock.
        now: i64,
    },
    /// A condition of the rule does not hold.
    #[error(
        "claim {claim:?} is {value:?}, which does not match {pattern:?} (federation rule {rule})"
    )]
    ClaimMismatch {
        /// The rule.
        rule: i64,
        /// The claim path.
        claim: String,
        /// The pattern.
        pattern: String,
        /// What the token says (`None`: absent, or not text).
        value: Option<String>,
    },
}

/// What a rule grants a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The rule that admitted it.
    pub rule: i64,
    /// Tags for the node.
    pub tags: Vec<String>,
    /// Ephemeral node.
    pub ephemeral: bool,
    /// Access ends at this unix second unless a fresh token is presented.
    pub until: i64,
    /// The identity, for the audit log and display: `iss` and `sub`.
    pub principal: String,
    /// SHA-256 of the token: one token admits one machine.
    pub token_hash: String,
}

impl TrustRule {
    /// Whether this rule admits `token` (verified for this rule's issuer and audience) at
    /// `now`.
    pub fn admit(&self, token: &Verified, now: i64) -> Result<Admission, FederationError> {
        for m in &self.matches {
            let value = token.claim_text(&m.claim);
            if !value.as_deref().is_some_and(|v| glob(&m.pattern, v)) {
                return Err(FederationError::ClaimMismatch {
                    rule: self.id,
                    claim: m.claim.clone(),
                    pattern: m.pattern.clone(),
                    value,
                });
            }
        }
        let mut until = token.expires_at;
        if let Some(max) = self.max_lifetime_s {
            let from = token.issued_at.unwrap_or(now).min(now);
            until = until.min(from.saturating_add(i64::try_from(max).unwrap_or(i64::MAX)));
        }
        if until <= now {
            return Err(FederationError::Ended { until, now });
        }
        Ok(Admission {
            rule: self.id,
            tags: self.tags.clone(),
            ephemeral: self.ephemeral,
            until,
            principal: format!("{}#{}", token.issuer, token.subject),
            token_hash: token.token_hash.clone(),
        })
    }
}

/// The rules for `issuer` (the token's unverified `iss` picks them; each is then checked
/// with its own audience), in id order.
pub fn rules_for<'a>(
    rules: &'a [TrustRule],
    issuer: &str,
) -> Result<Vec<&'a TrustRule>, FederationError> {
    let mine: Vec<&TrustRule> = rules.iter().filter(|r| r.issuer == issuer).collect();
    if mine.is_empty() {
        return Err(FederationError::UnknownIssuer(issuer.to_owned()));
    }
    Ok(mine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn globs_match_literally_except_stars() {
        assert!(glob("repo:org/app:*", "repo:org/app:ref:refs/heads/main"));
        assert!(glob(
            "repo:org/*:ref:refs/heads/main",
            "repo:org/app:ref:refs/heads/main"
        ));
        assert!(!glob("repo:org/app:*", "repo:org/app2:ref"));
        assert!(!glob("repo:org/app", "repo:org/app:x"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob(
            "system:serviceaccount:ci:*",
            "system:serviceaccount:ci:builder"
        ));
        assert!(!glob(
            "system:serviceaccount:ci:*",
            "system:serviceaccount:cid:builder"
        ));
        // No other metacharacters.
        assert!(!glob("a?c", "abc"));
        assert!(glob("a?c", "a?c"));
        assert!(!glob("[ab]", "a"));
    }

    /// A plain backtracking definition of the same language.
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_its_definition(p in "[ab*]{0,8}", t in "[ab]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(glob(&p, &t), reference(&pc, &tc));
        }
    }

    #[test]
    fn claim_matches_parse_and_refuse_nonsense() {
        let m: ClaimMatch = "sub=repo:org/app:*".parse().unwrap();
        assert_eq!(
            (m.claim.as_str(), m.pattern.as_str()),
            ("sub", "repo:org/app:*")
        );
        // Only the first `=` splits.
        let m: ClaimMatch = "ref=a=b".parse().unwrap();
        assert_eq!(m.pattern, "a=b");
        assert_eq!(m.to_string(), "ref=a=b");
        for bad in ["sub", "=x", "sub=", "a..b=x", ".a=x"] {
            assert!(bad.parse::<ClaimMatch>().is_err(), "{bad}");
        }
    }

    fn token(claims: serde_json::Value, exp: i64, iat: Option<i64>) -> Verified {
        let serde_json::Value::Object(claims) = claims else {
            panic!()
        };
        Verified {
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: claims["sub"].as_str().unwrap().into(),
            expires_at: exp,
            issued_at: iat,
            claims,
            token_hash: "00".into(),
        }
    }

    fn rule() -> TrustRule {
        TrustRule {
            id: 3,
            issuer: "https://token.actions.githubusercontent.com".into(),
            audience: "lattice".into(),
            matches: vec![
                "sub=repo:org/app:*".parse().unwrap(),
                "repository_owner=org".parse().unwrap(),
            ],
            tags: vec!["tag:ci".into()],
            ephemeral: true,
            max_lifetime_s: Some(3600),
        }
    }

    #[test]
    fn a_rule_admits_only_matching_tokens_and_only_for_their_lifetime() {
        let now = 1_000_000;
        let t = token(
            json!({"sub": "repo:org/app:ref:refs/heads/main", "repository_owner": "org"}),
            now + 600,
            Some(now - 5),
        );
        let a = rule().admit(&t, now).unwrap();
        assert_eq!(a.tags, ["tag:ci"]);
        assert!(a.ephemeral);
        assert_eq!(a.until, now + 600, "the token ends first");
        assert_eq!(
            a.principal,
            "https://token.actions.githubusercontent.com#repo:org/app:ref:refs/heads/main"
        );
        // A long-lived token is cut at the rule's maximum, counted from issue.
        let long = token(
            json!({"sub": "repo:org/app:ref:refs/heads/main", "repository_owner": "org"}),
            now + 86_400,
            Some(now - 100),
        );
        assert_eq!(rule().admit(&long, now).unwrap().until, now - 100 + 3600);
        // Without iat, from now.
        let no_iat = token(
            json!({"sub": "repo:org/app:x", "repository_owner": "org"}),
            now + 86_400,
            None,
        );
        assert_eq!(rule().admit(&no_iat, now).unwrap().until, now + 3600);
        // A token past its end (accepted by the signature check's clock leeway) grants
        // nothing; nor does one whose maximum lifetime has run out.
        let late = token(
            json!({"sub": "repo:org/app:x", "repository_owner": "org"}),
            now - 10,
            Some(now - 100),
        );
        assert_eq!(
            rule().admit(&late, now),
            Err(FederationError::Ended {
                until: now - 10,
                now
            })
        );
        let old = token(
            json!({"sub": "repo:org/app:x", "repository_owner": "org"}),
            now + 86_400,
            Some(now - 7200),
        );
        assert!(matches!(
            rule().admit(&old, now),
            Err(FederationError::Ended { .. })
        ));
        // Another repository; a missing claim; a claim that is not text.
        let other = token(
            json!({"sub": "repo:org/other:ref:refs/heads/main", "repository_owner": "org"}),
            now + 600,
            None,
        );
        assert_eq!(
            rule().admit(&other, now),
            Err(FederationError::ClaimMismatch {
                rule: 3,
                claim: "sub".into(),
                pattern: "repo:org/app:*".into(),
                value: Some("repo:org/other:ref:refs/heads/main".into()),
            })
        );
        let missing = token(json!({"sub": "repo:org/app:x"}), now + 600, None);
        assert!(matches!(
            rule().admit(&missing, now),
            Err(FederationError::ClaimMismatch { value: None, .. })
        ));
        let object = token(
            json!({"sub": "repo:org/app:x", "repository_owner": {"login": "org"}}),
            now + 600,
            None,
        );
        assert!(matches!(
            rule().admit(&object, now),
            Err(FederationError::ClaimMismatch { value: None, .. })
        ));
    }

    #[test]
    fn rules_are_found_by_issuer() {
        let rules = [rule()];
        assert_eq!(
            rules_for(&rules, "https://token.actions.githubusercontent.com")
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            rules_for(&rules, "https://evil.test"),
            Err(FederationError::UnknownIssuer("https://evil.test".into()))
        );
    }
}
