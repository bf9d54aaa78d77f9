//! Just-in-time access. A policy's `accessRequests` section says which destinations people may
//! ask for, who may approve, and for how long:
//!
//! ```text
//! "accessRequests": [
//!   {"dst": ["tag:prod"], "approvers": ["group:sre", "idp:group:oncall"], "maxDuration": "4h"},
//! ]
//! ```
//!
//! An approved request becomes a [`Grant`]: an accept rule from the requesting node's
//! addresses to the destination's ports, valid from approval to expiry. Grants are compiled
//! with the policy's own rules ([`Policy::with_grants`]), so they are enforced like any rule,
//! `deny` rules and the default source posture included, and nodes drop them the moment they
//! expire.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use jiff::Timestamp;
use wire::AttrValue;

use crate::Policy;
use crate::ast::{Action, Attrs, Proto, Rule, Selector};
use crate::eval::{Subject, idp_group_attr};
use crate::hujson::Pos;
use crate::parse::{Checker, Side};

/// An approved access request, as a time-limited rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The request's id (the rule's origin names it).
    pub id: i64,
    /// The requesting node's addresses.
    pub src: Vec<IpAddr>,
    /// The destination as requested (`tag:prod`).
    pub dst: String,
    /// The ports (`22,5432`, `8000-8099`, `*`).
    pub ports: String,
    /// Valid from (the approval)...
    pub from: Timestamp,
    /// ...until.
    pub until: Timestamp,
}

impl Policy {
    /// Checks a request for `ports` on `dst` lasting `secs`: an `accessRequests` entry must
    /// name the destination, the ports must parse, and the duration must be within the
    /// entry's `maxDuration`. The error says what is wrong.
    pub fn check_request(&self, dst: &str, ports: &str, secs: u64) -> Result<(), String> {
        let rules: Vec<_> = self.access_rules_for(dst).collect();
        if rules.is_empty() {
            return Err(format!(
                "no one may approve access to {dst:?}: the policy's accessRequests section does \
                 not name it"
            ));
        }
        self.grant_rule(0, &[], dst, ports, Timestamp::UNIX_EPOCH, Timestamp::MAX)?;
        let max = rules.iter().map(|r| r.max_secs).max().unwrap_or(0);
        if secs == 0 || secs > max {
            return Err(format!(
                "access to {dst} may be granted for at most {} (asked for {secs} s)",
                span(max)
            ));
        }
        Ok(())
    }

    /// Whether a person (`user`, with these identity provider groups) may approve a request
    /// for `dst`: the `file:line:col` of the `accessRequests` entry that lets them, if one
    /// does.
    pub fn approver_rule(&self, dst: &str, user: &str, idp_groups: &[String]) -> Option<String> {
        let attrs: Attrs = idp_groups
            .iter()
            .map(|g| (idp_group_attr(g), AttrValue::Bool(true)))
            .collect();
        let subject = Subject {
            user: Some(user),
            tags: &[],
            ips: &[],
            attrs: &attrs,
        };
        self.access_rules_for(dst)
            .find(|r| {
                r.approvers
                    .iter()
                    .any(|a| self.file().selector_matches(a, &subject))
            })
            .map(|r| r.origin.clone())
    }

    /// This policy with `grants` added as accept rules (each valid only in its window). A
    /// grant that no longer fits the policy (its destination was removed, say) is left out.
    pub fn with_grants(&self, grants: &[Grant]) -> Self {
        if grants.is_empty() {
            return self.clone();
        }
        let mut file = self.file().clone();
        for g in grants {
            if let Ok(rule) = self.grant_rule(g.id, &g.src, &g.dst, &g.ports, g.from, g.until) {
                file.rules.push(rule);
            }
        }
        Self {
            file: Arc::new(file),
        }
    }

    fn access_rules_for<'a>(
        &'a self,
        dst: &'a str,
    ) -> impl Iterator<Item = &'a crate::ast::AccessRule> + 'a {
        self.file()
            .access_rules
            .iter()
            .filter(move |r| r.dst.iter().any(|d| d == dst))
    }

    fn grant_rule(
        &self,
        id: i64,
        src: &[IpAddr],
        dst: &str,
        ports: &str,
        from: Timestamp,
        until: Timestamp,
    ) -> Result<Rule, String> {
        if crate::parse::parse_ports(ports).is_err() {
            return Err(format!(
                "bad ports {ports:?}: expected *, a port, a list (22,5432) or a range (8000-8099)"
            ));
        }
        let mut c = Checker::for_file(self.file());
        let d = c.dst(
            Pos { line: 1, col: 1 },
            &format!("{dst}:{ports}"),
            Side::Dst,
        );
        match (d, c.first_error()) {
            (Some(d), None) => Ok(Rule {
                origin: format!("access-request:{id}"),
                action: Action::Accept,
                src: src
                    .iter()
                    .map(|ip| Selector::Prefix(IpNet::from(*ip)))
                    .collect(),
                dst: vec![d],
                proto: Proto::Default,
                src_posture: Vec::new(),
                when: None,
                not_before: Some(from),
                expires: Some(until),
                caps: None,
                via: Vec::new(),
            }),
            (_, e) => Err(e.unwrap_or_else(|| format!("bad destination {dst}:{ports}"))),
        }
    }
}

/// `4h`, `30m`, `2d` for messages.
pub(crate) fn span(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
