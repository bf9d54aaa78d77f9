//! From parsed HuJSON to a checked [`PolicyFile`], collecting every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use wire::AttrValue;

use crate::ast::{
    AccessRule, Action, Attrs, AutoApprovers, Condition, Dst, NodeAttrs, Op, PolicyFile, Ports,
    Proto, Rule, Schedule, Selector, SshRule, SshTest, SshUser, Test,
};
use crate::error::{Diagnostic, PolicyError};
use crate::hujson::{self, Json, Pos, Spanned};

/// Built-in attributes nodes report (`node:` namespace). `tsVersion` is Tailscale's name for
/// the client version.
/// Attributes of the node's user that the coordinator sets from their sign-in: `user:mfa`
/// (the sign-in used a second factor).
pub(crate) const USER_ATTRS: &[&str] = &["mfa"];

pub(crate) const NODE_ATTRS: &[&str] = &[
    "os",
    "osVersion",
    "kernelVersion",
    "clientVersion",
    "tsVersion",
    "diskEncrypted",
    "firewall",
    "hostname",
];

const SECTIONS: &str = "acls, grants, groups, hosts, postures, defaultSrcPosture, tagOwners, \
     tests, autoApprovers, accessRequests, nodeAttrs, randomizeClientPort, ssh, sshTests";

/// Node attributes Lattice acts on (`randomize-client-port`: a node started without `--port`
/// binds a random UDP port); the others are kept, sent to their nodes and reported by `policy
/// check` as not acted on.
pub(crate) const HONOURED_NODE_ATTRS: &[&str] = &["randomize-client-port"];

/// The longest grant an `accessRequests` entry allows without `maxDuration`, and the most
/// one may set.
pub(crate) const DEFAULT_MAX_GRANT_S: u64 = 8 * 3600;
pub(crate) const MAX_GRANT_S: u64 = 30 * 86_400;

/// Parses and checks a policy file.
pub(crate) fn check(file: &str, text: &str) -> Result<PolicyFile, PolicyError> {
    let doc = hujson::parse(text).map_err(|e| PolicyError {
        file: file.to_owned(),
        diagnostics: vec![Diagnostic::new(e.pos, e.message)],
    })?;
    let mut c = Checker {
        file: file.to_owned(),
        diags: Vec::new(),
        groups: BTreeMap::new(),
        tag_owners: BTreeSet::new(),
        hosts: BTreeMap::new(),
        postures: BTreeMap::new(),
    };
    let policy = c.document(&doc);
    if c.diags.is_empty() {
        Ok(policy)
    } else {
        c.diags.sort();
        Err(PolicyError {
            file: file.to_owned(),
            diagnostics: c.diags,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Src,
    Dst,
    TestSrc,
    TestDst,
}

pub(crate) struct Checker {
    file: String,
    diags: Vec<Diagnostic>,
    groups: BTreeMap<String, Vec<String>>,
    tag_owners: BTreeSet<String>,
    hosts: BTreeMap<String, IpNet>,
    postures: BTreeMap<String, Vec<Condition>>,
}

impl Checker {
    /// A checker that knows `f`'s groups, tags, hosts and postures (to check a selector
    /// written outside the file, such as an access request's destination).
    pub(crate) fn for_file(f: &PolicyFile) -> Self {
        Self {
            file: f.file.clone(),
            diags: Vec::new(),
            groups: f.groups.clone(),
            tag_owners: f.tag_owners.clone(),
            hosts: f.hosts.clone(),
            postures: f.postures.clone(),
        }
    }

    /// The first problem found, without its position.
    pub(crate) fn first_error(&self) -> Option<String> {
        self.diags.first().map(|d| d.message.clone())
    }

    fn err(&mut self, pos: Pos, msg: impl Into<String>) {
        self.diags.push(Diagnostic::new(pos, msg));
    }

    fn document(&mut self, doc: &Spanned<Json>) -> PolicyFile {
        let mut policy = PolicyFile {
            file: self.file.clone(),
            groups: BTreeMap::new(),
            tag_owners: BTreeSet::new(),
            hosts: BTreeMap::new(),
            postures: BTreeMap::new(),
            default_src_posture: Vec::new(),
            rules: Vec::new(),
            tests: Vec::new(),
            access_rules: Vec::new(),
            auto_approvers: Default::default(),
            open_by_default: false,
            node_attrs: Vec::new(),
            ssh_rules: Vec::new(),
            ssh_tests: Vec::new(),
        };
        let Json::Object(sections) = &doc.value else {
            self.err(
                doc.pos,
                format!("the policy must be an object, not {}", doc.value.kind()),
            );
            return policy;
        };
        let get = |name: &str| {
            sections
                .iter()
                .find(|(k, _)| k.value == name)
                .map(|(_, v)| v)
        };
        for (k, _) in sections {
            if !SECTIONS.split(", ").any(|s| s == k.value) {
                self.err(
                    k.pos,
                    format!("unknown section {:?} (supported: {SECTIONS})", k.value),
                );
            }
        }
        // Definitions first: rules and tests refer to them.
        if let Some(v) = get("tagOwners") {
            self.tag_owners_section(v);
        }
        if let Some(v) = get("groups") {
            self.groups_section(v);
        }
        if let Some(v) = get("tagOwners") {
            self.check_tag_owner_refs(v);
        }
        if let Some(v) = get("hosts") {
            self.hosts_section(v);
        }
        if let Some(v) = get("postures") {
            self.postures_section(v);
        }
        if let Some(v) = get("defaultSrcPosture") {
            policy.default_src_posture = self.posture_refs(v);
        }
        if let Some(v) = get("acls") {
            policy.rules = self.each(v, "acls", Self::rule);
        }
        if let Some(v) = get("grants") {
            for item in self.array(v, "grants") {
                policy.rules.extend(self.grant(item));
            }
        }
        if get("acls").is_none() && get("grants").is_none() {
            // As in Tailscale: a file with neither `acls` nor `grants` (even empty ones) lets
            // every node reach every node.
            let mut rule = crate::allow_all_rule(format!(
                "{}: no acls (every node may reach every node)",
                self.file
            ));
            rule.proto = Proto::Default;
            policy.rules.push(rule);
            policy.open_by_default = true;
        }
        if let Some(v) = get("tests") {
            policy.tests = self.each(v, "tests", Self::test);
        }
        if let Some(v) = get("autoApprovers") {
            policy.auto_approvers = self.auto_approvers_section(v);
        }
        if let Some(v) = get("nodeAttrs") {
            policy.node_attrs = self.each(v, "nodeAttrs", Self::node_attrs);
        }
        if let Some(v) = get("ssh") {
            policy.ssh_rules = self.each(v, "ssh", Self::ssh_rule);
        }
        if let Some(v) = get("sshTests") {
            policy.ssh_tests = self.each(v, "sshTests", Self::ssh_test);
        }
        if let Some(v) = get("randomizeClientPort") {
            match &v.value {
                Json::Bool(true) => policy.node_attrs.push(NodeAttrs {
                    origin: format!("{}:{}:{}", self.file, v.pos.line, v.pos.col),
                    targets: vec![Selector::Any],
                    attrs: vec!["randomize-client-port".into()],
                    ip_pool: Vec::new(),
                    app: BTreeMap::new(),
                }),
                Json::Bool(false) => {}
                other => self.err(
                    v.pos,
                    format!(
                        "randomizeClientPort must be true or false, not {}",
                        other.kind()
                    ),
                ),
            }
        }
        if let Some(v) = get("accessRequests") {
            policy.access_rules = self.each(v, "accessRequests", Self::access_rule);
        }
        policy.groups = self.groups.clone();
        policy.tag_owners = self.tag_owners.clone();
        policy.hosts = self.hosts.clone();
        policy.postures = self.postures.clone();
        policy
    }

    /// Each entry of the array `v` (`what`) read by `f`; the entries `f` refuses are left out
    /// (it reported why).
    fn each<T>(
        &mut self,
        v: &Spanned<Json>,
        what: &str,
        mut f: impl FnMut(&mut Self, &Spanned<Json>) -> Option<T>,
    ) -> Vec<T> {
        self.array(v, what)
            .into_iter()
            .filter_map(|item| f(self, item))
            .collect()
    }

    fn array<'a>(&mut self, v: &'a Spanned<Json>, what: &str) -> Vec<&'a Spanned<Json>> {
        match &v.value {
            Json::Array(items) => items.iter().collect(),
            other => {
                self.err(
                    v.pos,
                    format!("{what} must be an array, not {}", other.kind()),
                );
                Vec::new()
            }
        }
    }

    fn object<'a>(
        &mut self,
        v: &'a Spanned<Json>,
        what: &str,
    ) -> Vec<(&'a Spanned<String>, &'a Spanned<Json>)> {
        match &v.value {
            Json::Object(fields) => fields.iter().map(|(k, v)| (k, v)).collect(),
            other => {
                self.err(
                    v.pos,
                    format!("{what} must be an object, not {}", other.kind()),
                );
                Vec::new()
            }
        }
    }

    fn string<'a>(&mut self, v: &'a Spanned<Json>, what: &str) -> Option<&'a str> {
        match &v.value {
            Json::String(s) => Some(s),
            other => {
                self.err(
                    v.pos,
                    format!("{what} must be a string, not {}", other.kind()),
                );
                None
            }
        }
    }

    fn strings<'a>(&mut self, v: &'a Spanned<Json>, what: &str) -> Vec<(Pos, &'a str)> {
        let mut out = Vec::new();
        for item in self.array(v, what) {
            if let Some(s) = self.string(item, &format!("each entry of {what}")) {
                out.push((item.pos, s));
            }
        }
        out
    }

    // ------------------------------------------------------------ definitions

    fn tag_owners_section(&mut self, v: &Spanned<Json>) {
        for (k, _) in self.object(v, "tagOwners") {
            if valid_name(&k.value, "tag:") {
                self.tag_owners.insert(k.value.clone());
            } else {
                self.err(
                    k.pos,
                    format!("bad tag name {:?}: tags look like tag:name", k.value),
                );
            }
        }
    }

    fn check_tag_owner_refs(&mut self, v: &Spanned<Json>) {
        for (_, owners) in self.object(v, "tagOwners") {
            for (pos, o) in self.strings(owners, "tag owners") {
                self.owner_ref(pos, o, "tag owner");
            }
        }
    }

    /// Checks a tag owner or auto-approver: a user, a known `group:`, a declared `tag:`, or
    /// `autogroup:admin` / `autogroup:owner`.
    fn owner_ref(&mut self, pos: Pos, o: &str, what: &str) -> bool {
        let known = o.contains('@')
            || matches!(o, "autogroup:admin" | "autogroup:owner")
            || (o.starts_with("group:") && self.groups.contains_key(o))
            || (o.starts_with("tag:") && self.tag_owners.contains(o));
        if !known {
            let why = if o.starts_with("group:") {
                format!("unknown group {o:?}")
            } else if o.starts_with("tag:") {
                format!("{what} {o:?} is not a declared tag")
            } else {
                format!("bad {what} {o:?}: expected a user, group:, tag: or autogroup:admin")
            };
            self.err(pos, why);
        }
        known
    }

    /// `{"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:exit"]}`.
    fn auto_approvers_section(&mut self, v: &Spanned<Json>) -> AutoApprovers {
        let mut out = AutoApprovers::default();
        for (k, val) in self.object(v, "autoApprovers") {
            match k.value.as_str() {
                "routes" => {
                    for (prefix, who) in self.object(val, "autoApprovers.routes") {
                        let net = parse_prefix(&prefix.value);
                        if net.is_none() {
                            self.err(
                                prefix.pos,
                                format!(
                                    "bad route {:?} in autoApprovers: expected a CIDR",
                                    prefix.value
                                ),
                            );
                        }
                        let mut approvers = Vec::new();
                        for (pos, o) in self.strings(who, "route approvers") {
                            if self.owner_ref(pos, o, "route approver") {
                                approvers.push(o.to_owned());
                            }
                        }
                        if let Some(net) = net {
                            out.routes.push((net, approvers));
                        }
                    }
                }
                "exitNode" => {
                    for (pos, o) in self.strings(val, "exit node approvers") {
                        if self.owner_ref(pos, o, "exit node approver") {
                            out.exit_node.push(o.to_owned());
                        }
                    }
                }
                other => self.err(
                    k.pos,
                    format!("unknown field {other:?} in autoApprovers (routes, exitNode)"),
                ),
            }
        }
        out
    }

    fn groups_section(&mut self, v: &Spanned<Json>) {
        for (k, members) in self.object(v, "groups") {
            if !valid_name(&k.value, "group:") {
                self.err(
                    k.pos,
                    format!("bad group name {:?}: groups look like group:name", k.value),
                );
                continue;
            }
            let mut users = Vec::new();
            for (pos, m) in self.strings(members, "group members") {
                if m.contains('@') && !m.contains(':') {
                    users.push(m.to_owned());
                } else {
                    self.err(
                        pos,
                        format!(
                            "group member {m:?} must be a user (name@domain); groups do not nest"
                        ),
                    );
                }
            }
            self.groups.insert(k.value.clone(), users);
        }
    }

    fn hosts_section(&mut self, v: &Spanned<Json>) {
        for (k, val) in self.object(v, "hosts") {
            let name_ok = !k.value.is_empty()
                && !k.value.contains(':')
                && k.value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            if !name_ok {
                self.err(
                    k.pos,
                    format!(
                        "bad host alias {:?}: use letters, digits, - . and _",
                        k.value
                    ),
                );
                continue;
            }
            let Some(s) = self.string(val, "a host's address") else {
                continue;
            };
            match parse_prefix(s) {
                Some(net) => {
                    self.hosts.insert(k.value.clone(), net);
                }
                None => self.err(
                    val.pos,
                    format!(
                        "bad address {s:?} for host {:?}: expected an IP or CIDR",
                        k.value
                    ),
                ),
            }
        }
    }

    fn postures_section(&mut self, v: &Spanned<Json>) {
        for (k, conds) in self.object(v, "postures") {
            if !valid_name(&k.value, "posture:") {
                self.err(
                    k.pos,
                    format!(
                        "bad posture name {:?}: postures look like posture:name",
                        k.value
                    ),
                );
                continue;
            }
            let mut parsed = Vec::new();
            for item in self.array(conds, "a posture") {
                let Some(s) = self.string(item, "a posture condition") else {
                    continue;
                };
                match parse_condition(s) {
                    Ok(c) => parsed.push(c),
                    Err((offset, msg)) => self.err(
                        Pos {
                            line: item.pos.line,
                            col: item.pos.col + 1 + offset,
                        },
                        msg,
                    ),
                }
            }
            self.postures.insert(k.value.clone(), parsed);
        }
    }

    fn posture_refs(&mut self, v: &Spanned<Json>) -> Vec<String> {
        let mut out = Vec::new();
        for (pos, name) in self.strings(v, "srcPosture") {
            if self.postures.contains_key(name) {
                out.push(name.to_owned());
            } else {
                self.err(pos, format!("unknown posture {name:?}"));
            }
        }
        out
    }

    // ------------------------------------------------------------ rules

    /// As the Tailscale service: a rule reaching `autogroup:self` must come from people
    /// (users, groups, autogroup:member, and in acls `*`), since "self" means the source's own
    /// user.
    fn check_self_sources(&mut self, pos: Pos, srcs: &[Selector], star_is_person: bool) {
        let person = |s: &Selector| match s {
            Selector::Any => star_is_person,
            Selector::User(_)
            | Selector::UserDomain(_)
            | Selector::Group(_)
            | Selector::IdpGroup(_)
            | Selector::Member
            | Selector::Admin
            | Selector::Owner => true,
            _ => false,
        };
        if !srcs.iter().all(person) {
            self.err(
                pos,
                "autogroup:self can only be used with users, groups, or supported autogroups \
                 (a source here is a tag, a host or an address)",
            );
        }
    }

    /// A network grant: `{"src": [...], "dst": [...], "ip": ["tcp:443", "22", "*"]}`, as
    /// accept rules (one per `ip` entry). Destinations carry no ports; `ip` gives them.
    fn grant(&mut self, v: &Spanned<Json>) -> Vec<Rule> {
        let origin = format!("{}:{}:{}", self.file, v.pos.line, v.pos.col);
        let before = self.diags.len();
        let (mut src, mut dst, mut ip) = (None, None, None);
        let mut app: Option<BTreeMap<String, Vec<serde_json::Value>>> = None;
        let mut src_posture = Vec::new();
        let mut via: Vec<String> = Vec::new();
        for (k, val) in self.object(v, "a grant") {
            match k.value.as_str() {
                "src" => {
                    let mut sels = Vec::new();
                    for (pos, s) in self.strings(val, "src") {
                        if let Some(sel) = self.selector(pos, s, Side::Src) {
                            sels.push(sel);
                        }
                    }
                    src = Some(sels);
                }
                "dst" => {
                    let mut sels = Vec::new();
                    for (pos, s) in self.strings(val, "dst") {
                        if let Some(sel) = self.selector(pos, s, Side::Dst) {
                            if matches!(&sel, Selector::Prefix(p) if p.prefix_len() == 0) {
                                self.err(pos, format!("dst {s:?}: to allow all IP addresses, use \"*\" or \"autogroup:internet\""));
                            }
                            sels.push((pos, sel));
                        }
                    }
                    dst = Some(sels);
                }
                "ip" => {
                    let mut entries = Vec::new();
                    for (pos, s) in self.strings(val, "ip") {
                        match parse_grant_ip(s) {
                            Ok(e) => entries.push(e),
                            Err(why) => self.err(pos, format!("bad ip entry {s:?}: {why}; expected *, ports (22, 80-443) or PROTO:PORTS (tcp:443, udp:*, icmp:*)")),
                        }
                    }
                    ip = Some(entries);
                }
                "srcPosture" => src_posture = self.posture_refs(val),
                "app" => app = Some(self.app_caps(val)),
                "via" => {
                    for (pos, t) in self.strings(val, "via") {
                        if !t.starts_with("tag:") {
                            self.err(pos, format!("via {t:?}: via can only be a tag"));
                        } else if !self.tag_owners.contains(t) {
                            self.err(pos, format!("via {t:?}: tag not found in tagOwners"));
                        } else if !via.iter().any(|v| v == t) {
                            via.push(t.to_owned());
                        }
                    }
                }
                other => self.err(
                    k.pos,
                    format!(
                        "unknown field {other:?} in a grant (fields: src, dst, ip, app, via, srcPosture)"
                    ),
                ),
            }
        }
        if src.is_none() || dst.is_none() {
            self.err(v.pos, "a grant needs src and dst");
        }
        if ip.as_ref().is_none_or(Vec::is_empty)
            && app.as_ref().is_none_or(BTreeMap::is_empty)
            && self.diags.len() == before
        {
            self.err(
                v.pos,
                "ip and app can not both be empty: a grant needs \"ip\" (what traffic it allows) or \"app\" (capabilities)",
            );
        }
        if let (Some(ds), Some(ss)) = (&dst, &src)
            && ds.iter().any(|(_, d)| *d == Selector::SelfNodes)
        {
            // (Unlike in acls, `*` is not a person here.)
            self.check_self_sources(v.pos, ss, false);
        }
        if app.is_some()
            && dst
                .as_ref()
                .is_some_and(|d| d.iter().any(|(_, s)| *s == Selector::Internet))
        {
            self.err(v.pos, "cannot use app grants with autogroup:internet");
        }
        if self.diags.len() > before {
            return Vec::new();
        }
        let (Some(src), Some(dst)) = (src, dst) else {
            return Vec::new();
        };
        // The service's own capabilities come with a companion the other way: a node granted
        // access to another's drive (or to use it as a relay) learns that the other shares
        // (or is a relay target), from the destination to the source.
        let companions: BTreeMap<String, Vec<serde_json::Value>> = app
            .iter()
            .flat_map(BTreeMap::keys)
            .filter_map(|name| match name.as_str() {
                "tailscale.com/cap/drive" => Some("tailscale.com/cap/drive-sharer"),
                "tailscale.com/cap/relay" => Some("tailscale.com/cap/relay-target"),
                _ => None,
            })
            .map(|c| (c.to_owned(), Vec::new()))
            .collect();
        let reverse = (!companions.is_empty()
            && !dst.iter().any(|(_, d)| matches!(d, Selector::SelfNodes)))
        .then(|| Rule {
            origin: origin.clone(),
            action: Action::Accept,
            src: dst.iter().map(|(_, sel)| sel.clone()).collect(),
            dst: src
                .iter()
                .map(|sel| Dst {
                    sel: sel.clone(),
                    ports: Ports::Any,
                })
                .collect(),
            proto: Proto::Default,
            src_posture: Vec::new(),
            when: None,
            not_before: None,
            expires: None,
            caps: Some(companions),
            via: Vec::new(),
        });
        let app_rule = app.map(|caps| Rule {
            origin: origin.clone(),
            action: Action::Accept,
            src: src.clone(),
            dst: dst
                .iter()
                .map(|(_, sel)| Dst {
                    sel: sel.clone(),
                    ports: Ports::Any,
                })
                .collect(),
            proto: Proto::Default,
            src_posture: src_posture.clone(),
            when: None,
            not_before: None,
            expires: None,
            caps: Some(caps),
            via: via.clone(),
        });
        ip.unwrap_or_default()
            .into_iter()
            .map(|(proto, ports)| Rule {
                origin: origin.clone(),
                action: Action::Accept,
                src: src.clone(),
                dst: dst
                    .iter()
                    .map(|(_, sel)| Dst {
                        sel: sel.clone(),
                        ports: ports.clone(),
                    })
                    .collect(),
                proto,
                src_posture: src_posture.clone(),
                when: None,
                not_before: None,
                expires: None,
                caps: None,
                via: via.clone(),
            })
            .chain(app_rule)
            .chain(reverse)
            .collect()
    }

    fn rule(&mut self, v: &Spanned<Json>) -> Option<Rule> {
        let fields = self.object(v, "an acl rule");
        let origin = format!("{}:{}:{}", self.file, v.pos.line, v.pos.col);
        let mut action = None;
        let mut src = None;
        let mut dst: Option<Vec<(Pos, Dst)>> = None;
        let mut proto = Proto::Default;
        let mut proto_pos = v.pos;
        let mut src_posture = Vec::new();
        let mut when = None;
        let mut not_before = None;
        let mut expires = None;
        let before = self.diags.len();
        for (k, val) in fields {
            match k.value.as_str() {
                "action" => match self.string(val, "action") {
                    Some("accept") => action = Some(Action::Accept),
                    Some("deny") => action = Some(Action::Deny),
                    Some(other) => self.err(val.pos, format!("bad action {other:?}: expected \"accept\" or \"deny\"")),
                    None => {}
                },
                "src" | "users" => {
                    let mut sels = Vec::new();
                    for (pos, s) in self.strings(val, &k.value) {
                        if let Some(sel) = self.selector(pos, s, Side::Src) {
                            sels.push(sel);
                        }
                    }
                    src = Some(sels);
                }
                "dst" | "ports" => {
                    let mut ds = Vec::new();
                    for (pos, s) in self.strings(val, &k.value) {
                        if let Some(d) = self.dst(pos, s, Side::Dst) {
                            ds.push((pos, d));
                        }
                    }
                    dst = Some(ds);
                }
                "proto" => {
                    proto_pos = val.pos;
                    if let Some(p) = self.proto(val) {
                        proto = p;
                    }
                }
                "srcPosture" => src_posture = self.posture_refs(val),
                "when" => when = self.schedule(val),
                "notBefore" => not_before = self.timestamp(val, "notBefore"),
                "expires" => expires = self.timestamp(val, "expires"),
                other => self.err(
                    k.pos,
                    format!("unknown field {other:?} in an acl rule (fields: action, src, dst, proto, srcPosture, when, notBefore, expires)"),
                ),
            }
        }
        if action.is_none()
            && !self.diags[before..]
                .iter()
                .any(|d| d.message.contains("action"))
        {
            self.err(v.pos, "acl rule has no \"action\"");
        }
        if src.is_none() {
            self.err(v.pos, "acl rule has no \"src\"");
        }
        if dst.is_none() {
            self.err(v.pos, "acl rule has no \"dst\"");
        }
        if let (Some(a), Some(b)) = (not_before, expires)
            && b <= a
        {
            self.err(v.pos, "\"expires\" must be after \"notBefore\"");
        }
        if let Some(ds) = &dst
            && !ports_allowed(&proto)
        {
            for (pos, d) in ds {
                if d.ports != Ports::Any {
                    self.err(
                        *pos,
                        "this protocol has no ports: write the destination with :*",
                    );
                }
            }
        }
        let _ = proto_pos;
        // As the Tailscale service: a rule reaching `autogroup:self` must come from people
        // (users, groups, `*`, autogroup:member), since "self" means the source's own user.
        if let (Some(ds), Some(ss)) = (&dst, &src)
            && ds.iter().any(|(_, d)| d.sel == Selector::SelfNodes)
        {
            self.check_self_sources(v.pos, ss, true);
        }
        if self.diags.len() > before {
            return None;
        }
        Some(Rule {
            origin,
            action: action?,
            src: src?,
            dst: dst?.into_iter().map(|(_, d)| d).collect(),
            proto,
            src_posture,
            when,
            not_before,
            expires,
            caps: None,
            via: Vec::new(),
        })
    }

    fn selector(&mut self, pos: Pos, s: &str, side: Side) -> Option<Selector> {
        let test = matches!(side, Side::TestSrc | Side::TestDst);
        let sel = if s == "*" {
            if test {
                self.err(pos, "a test names one user, tag, group, host or IP, not *");
                return None;
            }
            Selector::Any
        } else if let Some(rest) = s.strip_prefix("group:") {
            if !self.groups.contains_key(s) {
                self.err(pos, format!("unknown group {s:?}"));
                return None;
            }
            let _ = rest;
            Selector::Group(s.to_owned())
        } else if s.starts_with("tag:") {
            if !self.tag_owners.contains(s) {
                self.err(pos, format!("tag {s:?} has no owner in tagOwners"));
                return None;
            }
            Selector::Tag(s.to_owned())
        } else if let Some(user) = s.strip_prefix("user:") {
            match user.strip_prefix("*@") {
                Some(domain) if !domain.is_empty() && !domain.contains(['@', '*']) => {
                    Selector::UserDomain(domain.to_ascii_lowercase())
                }
                _ if user.contains('@') && !user.contains('*') => Selector::User(user.to_owned()),
                _ => {
                    self.err(
                        pos,
                        format!("bad user {s:?}: expected user:NAME@DOMAIN or user:*@DOMAIN"),
                    );
                    return None;
                }
            }
        } else if let Some(name) = s.strip_prefix("idp:group:") {
            if test {
                self.err(
                    pos,
                    "a test names one user, tag, group, host or IP, not an identity provider group",
                );
                return None;
            }
            if name.is_empty() || name.chars().any(|c| c.is_control()) {
                self.err(
                    pos,
                    format!("bad identity provider group {s:?}: expected idp:group:NAME"),
                );
                return None;
            }
            Selector::IdpGroup(name.to_owned())
        } else if let Some(which) = s.strip_prefix("autogroup:") {
            if test {
                self.err(
                    pos,
                    "a test names one user, tag, group, host or IP, not an autogroup",
                );
                return None;
            }
            match which {
                "member" => Selector::Member,
                // Every address, inside the mesh or not (Tailscale's name says it all).
                "danger-all" if side == Side::Dst => {
                    self.err(pos, "cannot use autogroup:danger-all as a dst");
                    return None;
                }
                "danger-all" => Selector::Any,
                "tagged" => Selector::Tagged,
                "admin" => Selector::Admin,
                "owner" => Selector::Owner,
                "self" if side == Side::Dst => Selector::SelfNodes,
                "internet" if side == Side::Dst => Selector::Internet,
                "internet" => {
                    self.err(pos, "autogroup:internet can only be a destination");
                    return None;
                }
                "self" => {
                    self.err(pos, "autogroup:self can only be a destination");
                    return None;
                }
                _ => {
                    self.err(pos, format!("unsupported autogroup {s:?} (supported: autogroup:member, autogroup:tagged, autogroup:admin, autogroup:owner, autogroup:self, autogroup:internet, autogroup:danger-all)"));
                    return None;
                }
            }
        } else if let Some(net) = self.hosts.get(s) {
            Selector::Prefix(*net)
        } else if let Some(net) = parse_prefix(s) {
            Selector::Prefix(net)
        } else if s.contains('@') && !s.contains(':') {
            Selector::User(s.to_owned())
        } else {
            self.err(
                pos,
                format!("unknown host or selector {s:?}: expected *, a user (name@domain), group:, idp:group:, tag:, autogroup:, a hosts alias or an IP/CIDR"),
            );
            return None;
        };
        Some(sel)
    }

    /// An `app` object: capability name -> array of values, names checked.
    fn app_caps(&mut self, v: &Spanned<Json>) -> BTreeMap<String, Vec<serde_json::Value>> {
        let mut caps = BTreeMap::new();
        for (name, values) in self.object(v, "app") {
            if let Err(why) = check_cap_name(&name.value) {
                self.err(name.pos, format!("capability {:?}: {why}", name.value));
                continue;
            }
            match &values.value {
                Json::Array(items) => {
                    caps.insert(
                        name.value.clone(),
                        items.iter().map(|i| i.value.to_serde()).collect(),
                    );
                }
                other => self.err(
                    values.pos,
                    format!(
                        "the values of {:?} must be an array, not {}",
                        name.value,
                        other.kind()
                    ),
                ),
            }
        }
        caps
    }

    /// `{"target": ["tag:server"], "attr": ["randomize-client-port"], "ipPool": [...],
    /// "app": {...}}`.
    fn node_attrs(&mut self, v: &Spanned<Json>) -> Option<NodeAttrs> {
        let before = self.diags.len();
        let mut entry = NodeAttrs {
            origin: format!("{}:{}:{}", self.file, v.pos.line, v.pos.col),
            targets: Vec::new(),
            attrs: Vec::new(),
            ip_pool: Vec::new(),
            app: BTreeMap::new(),
        };
        let mut has_target = false;
        for (k, val) in self.object(v, "a nodeAttrs entry") {
            match k.value.as_str() {
                "target" => {
                    has_target = true;
                    for (pos, s) in self.strings(val, "target") {
                        if s == "autogroup:self" {
                            self.err(pos, "autogroup:self cannot be a nodeAttrs target (it names a destination relative to a source)");
                            continue;
                        }
                        if let Some(sel) = self.selector(pos, s, Side::Src) {
                            entry.targets.push(sel);
                        }
                    }
                }
                "attr" => {
                    for (pos, s) in self.strings(val, "attr") {
                        if s.is_empty() || s.chars().any(char::is_control) {
                            self.err(pos, format!("bad attribute {s:?}"));
                        } else if !entry.attrs.iter().any(|a| a == s) {
                            entry.attrs.push(s.to_owned());
                        }
                    }
                }
                "ipPool" => {
                    let cgnat: IpNet = "100.64.0.0/10".parse().unwrap_or_default();
                    let reserved: IpNet = "100.100.100.0/24".parse().unwrap_or_default();
                    for (pos, s) in self.strings(val, "ipPool") {
                        match parse_prefix(s) {
                            Some(net) if crate::compile::overlaps(&net, &reserved) => self.err(
                                pos,
                                format!("IPPool({net}): network within reserved range 100.100.100.0/24 (the mesh resolver's)"),
                            ),
                            Some(net) if net.addr().is_ipv4() && !cgnat.contains(&net) => self.err(
                                pos,
                                format!("IPPool({net}): must be inside the mesh's range 100.64.0.0/10"),
                            ),
                            Some(net) => entry.ip_pool.push(net.trunc()),
                            None => self.err(pos, format!("bad ipPool entry {s:?}: expected a CIDR")),
                        }
                    }
                }
                "app" => entry.app = self.app_caps(val),
                other => self.err(
                    k.pos,
                    format!("unknown field {other:?} in a nodeAttrs entry (fields: target, attr, ipPool, app)"),
                ),
            }
        }
        if !has_target {
            self.err(v.pos, "a nodeAttrs entry needs a target");
        }
        (self.diags.len() == before).then_some(entry)
    }

    /// `{"action": "accept", "src": [...], "dst": ["tag:server"], "users": ["root"],
    /// "checkPeriod": "12h", "acceptEnv": ["LANG"]}`, checked as the Tailscale service checks it.
    fn ssh_rule(&mut self, v: &Spanned<Json>) -> Option<SshRule> {
        let before = self.diags.len();
        let mut action_seen = false;
        let (mut src, mut dst, mut users) = (Vec::new(), Vec::new(), Vec::new());
        let mut users_seen = false;
        let mut src_pos = v.pos;
        for (k, val) in self.object(v, "an ssh rule") {
            match k.value.as_str() {
                "action" => match self.string(val, "action").map(str::trim) {
                    Some("accept" | "check") => action_seen = true,
                    Some("") | None => {}
                    Some(other) => {
                        action_seen = true;
                        self.err(val.pos, format!("{other:?} is not a valid action (accept or check)"));
                    }
                },
                "src" => {
                    src_pos = val.pos;
                    for (pos, s) in self.strings(val, "src") {
                        if let Some(sel) = self.selector(pos, s.trim(), Side::Src) {
                            src.push(sel);
                        }
                    }
                }
                "dst" => {
                    for (pos, s) in self.strings(val, "dst") {
                        let s = s.trim();
                        // A node by what it is, never by an address.
                        let named = s.starts_with("tag:")
                            || s.contains('@')
                            || matches!(s, "autogroup:self" | "autogroup:member" | "autogroup:tagged");
                        if !named {
                            self.err(pos, format!("invalid dst {s:?}: ssh destinations are tags, users, autogroup:self, autogroup:member or autogroup:tagged"));
                        } else if let Some(sel) = self.selector(pos, s, Side::Dst) {
                            dst.push(sel);
                        }
                    }
                }
                "users" => {
                    if matches!(val.value, Json::Null) {
                        continue;
                    }
                    users_seen = true;
                    for (pos, u) in self.strings(val, "users") {
                        match ssh_user(u) {
                            Ok(user) => users.push(user),
                            Err(why) => self.err(pos, why),
                        }
                    }
                }
                "checkPeriod" => {
                    if let Some(t) = self.string(val, "checkPeriod")
                        && t != "always"
                    {
                        match parse_go_duration(t) {
                            Ok(secs) if secs < 0.0 => self.err(val.pos, format!("checkPeriod {t} must be a positive duration")),
                            Ok(secs) if secs > 168.0 * 3600.0 => self.err(val.pos, format!("checkPeriod {t} is above the max (168h)")),
                            Ok(_) => {}
                            Err(why) => self.err(val.pos, format!("bad checkPeriod {t:?}: {why}")),
                        }
                    }
                }
                "acceptEnv" if matches!(val.value, Json::Null) => {}
                "acceptEnv" => {
                    for (pos, e) in self.strings(val, "acceptEnv") {
                        if e.is_empty() {
                            self.err(pos, "acceptEnv values cannot be empty");
                        }
                    }
                }
                other => self.err(k.pos, format!("unknown field {other:?} in an ssh rule (fields: action, src, dst, users, checkPeriod, acceptEnv)")),
            }
        }
        if !action_seen {
            self.err(
                v.pos,
                "an ssh rule's action must be specified (accept or check)",
            );
        }
        if !users_seen || (users.is_empty() && self.diags.len() == before) {
            self.err(v.pos, "an ssh rule's users must be specified");
        }
        if dst.contains(&Selector::SelfNodes) {
            self.check_self_sources(src_pos, &src, true);
        }
        (self.diags.len() == before).then_some(SshRule { src, dst, users })
    }

    /// `{"src": "alice@example.com", "dst": ["tag:server"], "accept": ["root"], "deny": [...]}`.
    fn ssh_test(&mut self, v: &Spanned<Json>) -> Option<SshTest> {
        let before = self.diags.len();
        let mut src = None;
        let (mut dst, mut accept, mut deny) = (Vec::new(), Vec::new(), Vec::new());
        for (k, val) in self.object(v, "an ssh test") {
            match k.value.as_str() {
                "src" => {
                    if let Some(s) = self.string(val, "src")
                        && let Some(sel) = self.selector(val.pos, s.trim(), Side::TestSrc)
                    {
                        src = Some((s.trim().to_owned(), sel));
                    }
                }
                "dst" => {
                    for (pos, s) in self.strings(val, "dst") {
                        let s = s.trim();
                        if s.starts_with("tag:") && !self.tag_owners.contains(s) {
                            self.err(pos, format!("ssh test dst names unknown tag {s:?}"));
                        } else if s.parse::<IpAddr>().is_err() && parse_prefix(s).is_some() {
                            self.err(pos, format!("ssh test dst {s:?}: name a node (a tag, a user or an address), not a range"));
                        } else if let Some(sel) = self.selector(pos, s, Side::TestDst) {
                            dst.push((s.to_owned(), sel));
                        }
                    }
                }
                "accept" | "check" => {
                    accept.extend(self.strings(val, "accept").into_iter().map(|(_, u)| u.to_owned()));
                }
                "deny" => {
                    deny.extend(self.strings(val, "deny").into_iter().map(|(_, u)| u.to_owned()));
                }
                other => self.err(k.pos, format!("unknown field {other:?} in an ssh test (fields: src, dst, accept, check, deny)")),
            }
        }
        let Some((src_text, src)) = src else {
            self.err(v.pos, "an ssh test needs a src");
            return None;
        };
        if accept.is_empty() && deny.is_empty() {
            self.err(v.pos, "an ssh test must have accept, check or deny");
        }
        (self.diags.len() == before).then_some(SshTest {
            pos: v.pos,
            src,
            src_text,
            dst,
            accept,
            deny,
        })
    }

    /// `{"dst": ["tag:prod"], "approvers": ["group:sre"], "maxDuration": "4h"}`.
    fn access_rule(&mut self, v: &Spanned<Json>) -> Option<AccessRule> {
        let before = self.diags.len();
        let (mut dst, mut approvers, mut max_secs) = (Vec::new(), Vec::new(), DEFAULT_MAX_GRANT_S);
        let mut seen = (false, false);
        for (k, val) in self.object(v, "an accessRequests entry") {
            match k.value.as_str() {
                "dst" => {
                    seen.0 = true;
                    for (pos, d) in self.strings(val, "dst") {
                        if self.selector(pos, d, Side::Dst).is_some() {
                            dst.push(d.to_owned());
                        }
                    }
                }
                "approvers" => {
                    seen.1 = true;
                    for (pos, a) in self.strings(val, "approvers") {
                        let sel = self.selector(pos, a, Side::Src);
                        match sel {
                            Some(s @ (Selector::User(_) | Selector::Group(_) | Selector::IdpGroup(_))) => approvers.push(s),
                            Some(_) => self.err(pos, format!("approver {a:?} must be a user, group: or idp:group:")),
                            None => {}
                        }
                    }
                }
                "maxDuration" => {
                    if let Some(t) = self.string(val, "maxDuration") {
                        match parse_duration_secs(t) {
                            Some(d) if d > 0 && d <= MAX_GRANT_S => max_secs = d,
                            _ => self.err(val.pos, format!("bad maxDuration {t:?}: expected a duration such as 30m, 4h or 2d, at most 30d")),
                        }
                    }
                }
                other => self.err(k.pos, format!("unknown field {other:?} in an accessRequests entry (dst, approvers, maxDuration)")),
            }
        }
        if !seen.0 || !seen.1 {
            self.err(v.pos, "an accessRequests entry needs dst and approvers");
        }
        (self.diags.len() == before).then(|| AccessRule {
            origin: format!("{}:{}:{}", self.file, v.pos.line, v.pos.col),
            dst,
            approvers,
            max_secs,
        })
    }

    pub(crate) fn dst(&mut self, pos: Pos, s: &str, side: Side) -> Option<Dst> {
        let Some((host, ports)) = split_host_port(s) else {
            self.err(
                pos,
                format!("destination {s:?} has no port: write {s}:22, {s}:80,443 or {s}:*"),
            );
            return None;
        };
        let sel = self.selector(pos, host, side);
        let ports = match parse_ports(ports) {
            Ok(p) => Some(p),
            Err(bad) => {
                self.err(pos, format!("bad port {bad:?} in {s:?}: expected *, a port, a list (22,80) or a range (8000-8099) within 0-65535"));
                None
            }
        };
        Some(Dst {
            sel: sel?,
            ports: ports?,
        })
    }

    fn proto(&mut self, v: &Spanned<Json>) -> Option<Proto> {
        let text = match &v.value {
            Json::String(s) => s.clone(),
            Json::Number(n) => n.clone(),
            other => {
                self.err(
                    v.pos,
                    format!("proto must be a string or number, not {}", other.kind()),
                );
                return None;
            }
        };
        let p = match text.to_ascii_lowercase().as_str() {
            "*" | "all" | "any" => Proto::All,
            n => match protocol_number(n) {
                Some(num) => Proto::List(vec![num]),
                None => {
                    self.err(v.pos, format!("unknown protocol {text:?}: use tcp, udp, icmp, sctp, gre, esp, ah, igmp, ipip, * or a number 0-255"));
                    return None;
                }
            },
        };
        Some(p)
    }

    fn schedule(&mut self, v: &Spanned<Json>) -> Option<Schedule> {
        let mut days = [true; 7];
        let mut hours = None;
        let mut tz = TimeZone::UTC;
        let before = self.diags.len();
        for (k, val) in self.object(v, "when") {
            match k.value.as_str() {
                "days" => {
                    days = [false; 7];
                    for (pos, d) in self.strings(val, "days") {
                        match parse_days(d) {
                            Some(set) => {
                                for (i, on) in set.iter().enumerate() {
                                    days[i] |= on;
                                }
                            }
                            None => self.err(pos, format!("bad day {d:?}: use mon..sun, a range like mon-fri, weekdays or weekend")),
                        }
                    }
                }
                "hours" => {
                    if let Some(h) = self.string(val, "hours") {
                        match parse_hours(h) {
                            Some(r) => hours = Some(r),
                            None => self.err(
                                val.pos,
                                format!("bad hours {h:?}: expected HH:MM-HH:MM, like 09:00-17:30"),
                            ),
                        }
                    }
                }
                "timezone" => {
                    if let Some(name) = self.string(val, "timezone") {
                        match TimeZone::get(name) {
                            Ok(z) => tz = z,
                            Err(_) => self.err(val.pos, format!("unknown time zone {name:?}: use an IANA name like Europe/Berlin or UTC")),
                        }
                    }
                }
                other => self.err(
                    k.pos,
                    format!("unknown field {other:?} in when (fields: days, hours, timezone)"),
                ),
            }
        }
        (self.diags.len() == before).then_some(Schedule { days, hours, tz })
    }

    fn timestamp(&mut self, v: &Spanned<Json>, what: &str) -> Option<Timestamp> {
        let s = self.string(v, what)?;
        match s.parse::<Timestamp>() {
            Ok(t) => Some(t),
            Err(_) => {
                self.err(
                    v.pos,
                    format!(
                        "bad time {s:?} in {what}: expected RFC 3339, like 2026-12-01T18:00:00Z"
                    ),
                );
                None
            }
        }
    }

    // ------------------------------------------------------------ tests

    fn test(&mut self, v: &Spanned<Json>) -> Option<Test> {
        let fields = self.object(v, "a test");
        let before = self.diags.len();
        let mut src = None;
        let mut src_text = String::new();
        let mut src_attrs = Attrs::new();
        let mut at = None;
        let mut proto = None;
        let mut accept = Vec::new();
        let mut deny = Vec::new();
        for (k, val) in fields {
            match k.value.as_str() {
                "src" => {
                    if let Some(s) = self.string(val, "src") {
                        src_text = s.to_owned();
                        src = self.selector(val.pos, s, Side::TestSrc).map(|sel| (val.pos, sel));
                    }
                }
                "srcAttrs" => {
                    for (ak, av) in self.object(val, "srcAttrs") {
                        if let Err(msg) = check_attr_name(&ak.value) {
                            self.err(ak.pos, msg);
                            continue;
                        }
                        let value = match &av.value {
                            Json::String(s) => AttrValue::String(s.clone()),
                            Json::Bool(b) => AttrValue::Bool(*b),
                            Json::Number(n) => AttrValue::Number(n.parse().unwrap_or(0.0)),
                            other => {
                                self.err(av.pos, format!("an attribute value must be a string, number or boolean, not {}", other.kind()));
                                continue;
                            }
                        };
                        src_attrs.insert(ak.value.clone(), value);
                    }
                }
                "at" => at = self.timestamp(val, "at"),
                "proto" => {
                    proto = match self.proto(val) {
                        Some(Proto::List(l)) => Some(l),
                        Some(_) => {
                            self.err(val.pos, "a test checks one protocol");
                            None
                        }
                        None => None,
                    }
                }
                "accept" | "deny" => {
                    let mut out = Vec::new();
                    for (pos, s) in self.strings(val, &k.value) {
                        if let Some(d) = self.dst(pos, s, Side::TestDst) {
                            // A test checks one host: a range would have to hold for every
                            // address in it (the service refuses such tests too).
                            let host = split_host_port(s).map_or(s, |(h, _)| h);
                            let range = match &d.sel {
                                Selector::Prefix(net) => {
                                    host.contains('/') || net.prefix_len() < net.max_prefix_len()
                                }
                                _ => false,
                            };
                            if range {
                                self.err(pos, format!("test destination {s:?} is a range: a test names one host (an IP, a user, a tag or a hosts alias of one address)"));
                                continue;
                            }
                            out.push((pos, s.to_owned(), d));
                        }
                    }
                    if k.value == "accept" {
                        accept = out;
                    } else {
                        deny = out;
                    }
                }
                other => self.err(k.pos, format!("unknown field {other:?} in a test (fields: src, srcAttrs, at, proto, accept, deny)")),
            }
        }
        if src.is_none() && self.diags.len() == before {
            self.err(v.pos, "test has no \"src\"");
        }
        if accept.is_empty() && deny.is_empty() && self.diags.len() == before {
            self.err(
                v.pos,
                "test checks nothing: give it \"accept\" or \"deny\" destinations",
            );
        }
        if self.diags.len() > before {
            return None;
        }
        Some(Test {
            src: src?,
            src_text,
            src_attrs,
            at,
            proto,
            accept,
            deny,
        })
    }
}

/// A login user of an `ssh` rule.
fn ssh_user(u: &str) -> Result<SshUser, String> {
    match u {
        "" | "*" => Err(format!("user {u:?} is not valid")),
        "autogroup:nonroot" => Ok(SshUser::NonRoot),
        _ => match u.strip_prefix("localpart:*@") {
            Some(domain) if domain.contains('*') => Err(format!(
                "user {u:?}: localpart:*@DOMAIN names one e-mail domain, not a pattern"
            )),
            Some(domain) if !domain.is_empty() => Ok(SshUser::LocalPart(domain.to_owned())),
            _ => Ok(SshUser::Name(u.to_owned())),
        },
    }
}

/// A Go duration (`1h30m`, `90s`, `-1m`), as the Tailscale service reads `checkPeriod`: in
/// seconds.
fn parse_go_duration(s: &str) -> Result<f64, String> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() {
        return Err("expected a duration such as 12h or 90m".into());
    }
    if rest == "0" {
        return Ok(0.0);
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| "expected a duration such as 12h or 90m".to_owned())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err("expected a duration such as 12h or 90m".into()),
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Ok(if neg { -total } else { total })
}

fn valid_name(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|n| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

fn ports_allowed(proto: &Proto) -> bool {
    match proto {
        Proto::Default | Proto::All => true,
        Proto::List(l) => l.iter().any(|p| matches!(p, 6 | 17 | 132)),
    }
}

/// An IP or CIDR.
/// Checks an app capability's name: `DOMAIN/PATH` (as the Tailscale service: no scheme, and
/// the tailscale.com domain only for the capabilities it defines for policies).
fn check_cap_name(name: &str) -> Result<(), String> {
    let (domain, path) = name.split_once('/').unwrap_or((name, ""));
    if domain.is_empty() || !domain.contains('.') || domain.contains(':') || path.is_empty() {
        return Err("capability name must have the form {domain}/{path}".into());
    }
    if domain == "tailscale.com"
        && !matches!(
            name,
            "tailscale.com/cap/drive"
                | "tailscale.com/cap/relay"
                | "tailscale.com/cap/kubernetes"
                | "tailscale.com/cap/webui"
        )
    {
        return Err("capability name must not be in the tailscale.com domain".into());
    }
    Ok(())
}

/// A protocol by name (`tcp`; `icmp` is ICMPv4 as in Tailscale, ICMPv6 is `ipv6-icmp`) or
/// number.
fn protocol_number(name: &str) -> Option<u8> {
    Some(match name {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "igmp" => 2,
        "ipip" | "ipencap" => 4,
        n => return n.parse().ok(),
    })
}

/// A grant's `ip` entry: `*`, ports (`22`, `80-443`, `22,80`), or `PROTO:PORTS` (`tcp:443`,
/// `udp:*`, `icmp:*`, `47:*`). Ports start at 1 (`*` means all).
fn parse_grant_ip(s: &str) -> Result<(Proto, Ports), String> {
    if s == "*" {
        return Ok((Proto::Default, Ports::Any));
    }
    let (proto, ports) = match s.split_once(':') {
        Some((proto, ports)) => {
            let n = proto.to_ascii_lowercase();
            let num = protocol_number(&n).ok_or_else(|| format!("unknown protocol {n:?}"))?;
            (Proto::List(vec![num]), ports)
        }
        None => (Proto::Default, s),
    };
    let ports = parse_ports(ports).map_err(|bad| format!("bad port {bad:?}"))?;
    if let Ports::Ranges(r) = &ports
        && r.iter().any(|(a, _)| *a == 0)
    {
        return Err("the first port must be above 0 (or use *)".into());
    }
    Ok((proto, ports))
}

/// `90s`, `30m`, `4h`, `2d` (one number and unit) in seconds.
pub(crate) fn parse_duration_secs(s: &str) -> Option<u64> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].trim().parse().ok()?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(crate) fn parse_prefix(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// `host:ports`, splitting at the last colon (`[v6]:22` and `fd00::/48:22` work).
pub(crate) fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, ports) = rest.split_once("]:")?;
        return Some((host, ports));
    }
    let (host, ports) = s.rsplit_once(':')?;
    let looks_like_ports = ports == "*" || ports.starts_with(|c: char| c.is_ascii_digit());
    (!host.is_empty() && looks_like_ports).then_some((host, ports))
}

/// `*`, `22`, `80,443`, `8000-8099`, or lists of those.
pub(crate) fn parse_ports(s: &str) -> Result<Ports, String> {
    if s == "*" {
        return Ok(Ports::Any);
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let bad = || part.to_owned();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<u16>().map_err(|_| bad())?,
                b.parse::<u16>().map_err(|_| bad())?,
            ),
            None => {
                let p = part.parse::<u16>().map_err(|_| bad())?;
                (p, p)
            }
        };
        if a > b {
            return Err(bad());
        }
        out.push((a, b));
    }
    Ok(Ports::Ranges(out))
}

fn parse_days(s: &str) -> Option<[bool; 7]> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let lower = s.to_ascii_lowercase();
    let idx = |d: &str| {
        NAMES
            .iter()
            .position(|n| *n == d || d.starts_with(n) && d.len() <= 9)
    };
    let mut out = [false; 7];
    match lower.as_str() {
        "weekdays" => out[..5].fill(true),
        "weekend" | "weekends" => out[5..].fill(true),
        _ => match lower.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (idx(a)?, idx(b)?);
                let mut i = a;
                loop {
                    out[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => out[idx(&lower)?] = true,
        },
    }
    Some(out)
}

fn parse_hours(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let minutes = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
        (h < 24 && m < 60 || h == 24 && m == 0).then_some(h * 60 + m)
    };
    let (a, b) = (minutes(a)?, minutes(b)?);
    (a != b).then_some((a, b))
}

/// Checks an attribute name: `node:` with a built-in name, or `custom:` / `fact:` with letters,
/// digits, `_`, `-` and `.`.
pub fn check_attr_name(name: &str) -> Result<(), String> {
    let Some((ns, key)) = name.split_once(':') else {
        return Err(format!(
            "attribute {name:?} needs a namespace: node:, user:, custom: or fact:"
        ));
    };
    let key_ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    match ns {
        "node" if NODE_ATTRS.contains(&key) => Ok(()),
        "node" => Err(format!(
            "unknown attribute {name:?} (node attributes: {})",
            NODE_ATTRS.join(", ")
        )),
        "user" if USER_ATTRS.contains(&key) => Ok(()),
        "user" => Err(format!(
            "unknown attribute {name:?} (user attributes: {})",
            USER_ATTRS.join(", ")
        )),
        "custom" | "fact" if key_ok => Ok(()),
        "custom" | "fact" => Err(format!("bad attribute name {name:?}")),
        _ => Err(format!(
            "unknown attribute namespace in {name:?}: use node:, user:, custom: or fact:"
        )),
    }
}

/// Parses `node:os == 'linux'`, `node:osVersion >= '13.4'`, `custom:x IN ['a', 'b']`,
/// `fact:y IS SET`. Errors carry the character offset inside the condition.
pub(crate) fn parse_condition(s: &str) -> Result<Condition, (u32, String)> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let skip = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip(&mut i);
    let start = i;
    while i < chars.len() && !chars[i].is_whitespace() && !"=!<>".contains(chars[i]) {
        i += 1;
    }
    let attr: String = chars[start..i].iter().collect();
    check_attr_name(&attr).map_err(|m| (start as u32, m))?;
    skip(&mut i);
    let op_start = i;
    let rest: String = chars[i..].iter().collect();
    let upper = rest.to_ascii_uppercase();
    let (op, len) = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
        ("NOT IN", Op::NotIn),
        ("IN", Op::In),
        ("IS SET", Op::IsSet),
        ("NOT SET", Op::NotSet),
    ]
    .iter()
    .find(|(t, _)| upper.starts_with(t))
    .map(|(t, o)| (*o, t.chars().count()))
    .ok_or_else(|| {
        (
            op_start as u32,
            format!(
                "expected an operator (==, !=, <, <=, >, >=, IN, NOT IN, IS SET, NOT SET) in {s:?}"
            ),
        )
    })?;
    i += len;
    skip(&mut i);
    let value_start = i;
    let tail: String = chars[i..].iter().collect();
    let values = match op {
        Op::IsSet | Op::NotSet => {
            if !tail.trim().is_empty() {
                return Err((
                    value_start as u32,
                    "nothing may follow IS SET / NOT SET".into(),
                ));
            }
            Vec::new()
        }
        Op::In | Op::NotIn => {
            let inner = tail
                .trim()
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .ok_or((
                    value_start as u32,
                    "IN needs a list like ['a', 'b']".to_owned(),
                ))?;
            inner
                .split(',')
                .map(|v| {
                    parse_value(v.trim()).ok_or((
                        value_start as u32,
                        format!("bad value {:?} in the list", v.trim()),
                    ))
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        _ if tail.trim().is_empty() => {
            return Err((
                value_start as u32,
                format!("missing value after the operator in {s:?}"),
            ));
        }
        _ => vec![parse_value(tail.trim()).ok_or((
            value_start as u32,
            format!(
                "bad value {:?}: use 'text', a number, true or false",
                tail.trim()
            ),
        ))?],
    };
    Ok(Condition { attr, op, values })
}

fn parse_value(s: &str) -> Option<AttrValue> {
    if let Some(inner) = s.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Some(AttrValue::String(inner.to_owned()));
    }
    if let Some(inner) = s.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        return Some(AttrValue::String(inner.to_owned()));
    }
    match s {
        "true" => Some(AttrValue::Bool(true)),
        "false" => Some(AttrValue::Bool(false)),
        _ => s
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .map(AttrValue::Number),
    }
}
