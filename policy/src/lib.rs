//! Lattice access policy.
//!
//! An admin writes one HuJSON file; this crate parses it with line:column diagnostics (all of
//! them, not just the first), checks every reference, runs its `tests`, and compiles it
//! against the coordinator's inventory into what each node enforces: inbound
//! [`wire::FilterRule`]s and the set of peers it may see. Pure functions: no I/O, no clock (the
//! caller passes the time), and the IANA time-zone database compiled in.
//!
//! The language keeps Tailscale's meaning for `groups`, `tagOwners`, `hosts`, `acls`, `tests`
//! and `postures` (so such a Tailscale file works unchanged) and adds:
//! - `"action": "deny"` rules: a connection is allowed when at least one accept rule matches
//!   and no deny rule does (deny wins; rule order does not matter);
//! - postures over `node:` facts the node reports, `fact:` facts from the node's posture
//!   command and `custom:` attributes set by admins, chosen per rule with `srcPosture` (the
//!   source must satisfy one of the listed postures; each posture is a list of conditions
//!   that must all hold);
//! - `"when": {"days", "hours", "timezone"}` windows and `notBefore` / `expires` times;
//! - tests that state the source's attributes (`srcAttrs`) and the time (`at`).
//!
//! Until an admin sets a file, the coordinator uses [`Policy::allow_all`], a named default
//! under which every node may reach every node on every protocol, compiled like any policy.
#![warn(missing_docs)]

mod access;
mod ast;
mod compile;
pub mod conformance;
mod diff;
mod error;
mod eval;
pub mod hujson;
mod inventory;
mod parse;
mod schedule;

use std::sync::Arc;

use jiff::Timestamp;

pub use access::Grant;
pub use ast::Attrs;
pub use compile::{Compiled, CompiledPolicy, HORIZON};
pub use diff::{Access, Change, PolicyDiff, diff, diff_policies};
pub use error::{Diagnostic, PolicyError};
pub use eval::{ROLE_ADMIN, ROLE_OWNER, idp_group_attr};
pub use inventory::{Inventory, InventoryNode};
pub use parse::check_attr_name;

use ast::{Action, Dst, PolicyFile, Ports, Proto, Rule, Selector};

/// Origin string of the built-in default.
pub const ALLOW_ALL: &str = "default:allow-all";

/// An access policy (cheap to clone).
#[derive(Debug, Clone)]
pub struct Policy {
    file: Arc<PolicyFile>,
}

impl Policy {
    /// The built-in default: every node may reach every node, any protocol and port.
    pub fn allow_all() -> Self {
        Self {
            file: Arc::new(PolicyFile {
                file: ALLOW_ALL.to_owned(),
                groups: Default::default(),
                tag_owners: Default::default(),
                hosts: Default::default(),
                postures: Default::default(),
                default_src_posture: Vec::new(),
                rules: vec![allow_all_rule(ALLOW_ALL.to_owned())],
                tests: Vec::new(),
                access_rules: Vec::new(),
                auto_approvers: Default::default(),
                open_by_default: true,
                node_attrs: Vec::new(),
                ssh_rules: Vec::new(),
                ssh_tests: Vec::new(),
            }),
        }
    }

    /// Parses and type-checks a policy file (not its tests). `file` names it in messages.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        Ok(Self {
            file: Arc::new(parse::check(file, text)?),
        })
    }

    /// Parses, type-checks and runs the file's tests at `now` (a test may set its own time).
    /// Everything that is wrong is reported.
    pub fn check(
        file: &str,
        text: &str,
        now: Timestamp,
        inventory: Option<&Inventory>,
    ) -> Result<Self, PolicyError> {
        let policy = Self::parse(file, text)?;
        let failures = policy.file.run_tests(now, inventory);
        if failures.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError {
                file: file.to_owned(),
                diagnostics: failures,
            })
        }
    }

    /// What the file asks for that Lattice keeps but does not act on, one line each with its
    /// place in the file: `nodeAttrs` attributes other than those Lattice honours (they are
    /// still sent to the nodes they target, and shown in `lattice status`), and `ipPool`.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.file.ssh_rules.is_empty() {
            out.push(format!(
                "{}: {} ssh rule(s) checked and {} ssh test(s) passed, but Lattice runs no SSH \
                 server: they let no one in (allow port 22 in acls for the nodes' own sshd)",
                self.file.file,
                self.file.ssh_rules.len(),
                self.file.ssh_tests.len()
            ));
        }
        for e in &self.file.node_attrs {
            let ignored: Vec<String> = e
                .attrs
                .iter()
                .filter(|a| !parse::HONOURED_NODE_ATTRS.contains(&a.as_str()))
                .map(|a| format!("{a:?}"))
                .collect();
            if !ignored.is_empty() {
                out.push(format!(
                    "{}: nodeAttrs {} {} kept and sent to the nodes it targets, but Lattice does not act on {}",
                    e.origin,
                    ignored.join(", "),
                    if ignored.len() == 1 { "is" } else { "are" },
                    if ignored.len() == 1 { "it" } else { "them" },
                ));
            }
            if !e.ip_pool.is_empty() {
                out.push(format!(
                    "{}: nodeAttrs ipPool is kept, but Lattice gives every node an address from \
                     100.64.0.0/10 as before",
                    e.origin
                ));
            }
        }
        out
    }

    /// The name used in messages (the file name, or the default's name).
    pub fn name(&self) -> &str {
        &self.file.file
    }

    /// Whether this is the built-in default.
    pub fn is_default(&self) -> bool {
        self.file.file == ALLOW_ALL
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.file.rules.len()
    }

    /// Whether the file has neither `acls` nor `grants` and so (as in Tailscale) lets every
    /// node reach every node. (The built-in default is open too.)
    pub fn open_by_default(&self) -> bool {
        self.file.open_by_default
    }

    /// Number of tests.
    pub fn test_count(&self) -> usize {
        self.file.tests.len()
    }

    /// Whether nodes may carry `tag` under this policy: the default allows any tag; a policy
    /// file must declare it in `tagOwners`.
    pub fn declares_tag(&self, tag: &str) -> bool {
        self.is_default() || self.file.tag_owners.contains(tag)
    }

    pub(crate) fn file(&self) -> &PolicyFile {
        &self.file
    }

    /// The routes among `advertised` that `autoApprovers` approves for `node`: an exit route
    /// (`0.0.0.0/0`, `::/0`) when the node matches an `exitNode` approver, another route when
    /// it lies inside a `routes` prefix the node matches an approver of (a tag the node has,
    /// its user, or a group of its user).
    pub fn auto_approved(
        &self,
        node: &InventoryNode,
        advertised: &[ipnet::IpNet],
    ) -> Vec<ipnet::IpNet> {
        let aa = &self.file.auto_approvers;
        let matches = |who: &[String]| {
            who.iter().any(|w| {
                if w.starts_with("tag:") {
                    node.tags.iter().any(|t| t == w)
                } else if w.starts_with("group:") {
                    node.tags.is_empty()
                        && node
                            .user
                            .as_ref()
                            .is_some_and(|u| self.file.groups.get(w).is_some_and(|m| m.contains(u)))
                } else {
                    node.tags.is_empty() && node.user.as_deref() == Some(w.as_str())
                }
            })
        };
        advertised
            .iter()
            .filter(|r| {
                if compile::is_exit(r) {
                    matches(&aa.exit_node)
                } else {
                    aa.routes
                        .iter()
                        .any(|(p, who)| p.contains(*r) && matches(who))
                }
            })
            .copied()
            .collect()
    }
}

/// One rule that lets every node reach every node, any protocol.
pub(crate) fn allow_all_rule(origin: String) -> Rule {
    Rule {
        origin,
        action: Action::Accept,
        src: vec![Selector::Any],
        dst: vec![Dst {
            sel: Selector::Any,
            ports: Ports::Any,
        }],
        proto: Proto::All,
        src_posture: Vec::new(),
        when: None,
        not_before: None,
        expires: None,
        caps: None,
        via: Vec::new(),
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::allow_all()
    }
}

#[cfg(test)]
mod tests;
