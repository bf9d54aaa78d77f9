use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::Timestamp;
use proptest::prelude::*;
use wire::filter::Action as WireAction;
use wire::{AttrValue, NodeId};

use super::*;

fn now() -> Timestamp {
    "2026-11-23T10:00:00Z".parse().unwrap()
}

fn errors(text: &str) -> Vec<String> {
    match Policy::check("p.hujson", text, now(), None) {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

fn node(
    id: u64,
    name: &str,
    user: Option<&str>,
    tags: &[&str],
    attrs: &[(&str, AttrValue)],
) -> InventoryNode {
    InventoryNode {
        routes: Vec::new(),
        id: NodeId(id),
        name: name.into(),
        addresses: vec![
            format!("100.64.0.{id}").parse().unwrap(),
            format!("fd00::{id}").parse().unwrap(),
        ],
        user: user.map(Into::into),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        attrs: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

#[test]
fn every_kind_of_mistake_is_reported_with_its_position_and_all_at_once() {
    let text = r#"{
  "groups": {"group:eng": ["alice@example.com", "group:ops"], "eng": []},
  "tagOwners": {"tag:db": ["group:nope"], "tag:web": ["group:eng"]},
  "hosts": {"bad host": "10.0.0.1", "db": "not-an-ip"},
  "postures": {"posture:ok": ["node:os == 'linux'", "node:color == 'blue'", "fact:x ~= 1"]},
  "acls": [
    {"action": "allow", "src": ["group:missing"], "dst": ["tag:db:99999"]},
    {"action": "accept", "src": ["tag:unowned"], "dst": ["tag:web"], "srcPosture": ["posture:nope"]},
    {"action": "accept", "src": ["autogroup:self"], "dst": ["somehost:22"], "color": 1},
    {"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"},
    {"action": "accept", "src": ["*"], "dst": ["*:*"], "when": {"days": ["funday"], "hours": "9-17", "timezone": "Mars/Olympus"}},
    {"action": "accept", "src": ["*"], "dst": ["*:*"], "expires": "tomorrow"},
  ],
  "tests": [{"src": "*", "accept": ["tag:web:80"], "sneaky": true}],
  "derpMap": [],
}"#;
    let got = errors(text);
    let expected = [
        "p.hujson:2:49: group member \"group:ops\" must be a user (name@domain); groups do not nest",
        "p.hujson:2:63: bad group name \"eng\": groups look like group:name",
        "p.hujson:3:28: unknown group \"group:nope\"",
        "p.hujson:4:13: bad host alias \"bad host\": use letters, digits, - . and _",
        "p.hujson:4:43: bad address \"not-an-ip\" for host \"db\": expected an IP or CIDR",
        "p.hujson:5:54: unknown attribute \"node:color\" (node attributes: os, osVersion, kernelVersion, clientVersion, tsVersion, diskEncrypted, firewall, hostname)",
        "p.hujson:5:85: expected an operator (==, !=, <, <=, >, >=, IN, NOT IN, IS SET, NOT SET) in \"fact:x ~= 1\"",
        "p.hujson:7:16: bad action \"allow\": expected \"accept\" or \"deny\"",
        "p.hujson:7:33: unknown group \"group:missing\"",
        "p.hujson:7:59: bad port \"99999\" in \"tag:db:99999\": expected *, a port, a list (22,80) or a range (8000-8099) within 0-65535",
        "p.hujson:8:34: tag \"tag:unowned\" has no owner in tagOwners",
        "p.hujson:8:58: destination \"tag:web\" has no port: write tag:web:22, tag:web:80,443 or tag:web:*",
        "p.hujson:8:85: unknown posture \"posture:nope\"",
        "p.hujson:9:34: autogroup:self can only be a destination",
        "p.hujson:9:61: unknown host or selector \"somehost\": expected *, a user (name@domain), group:, idp:group:, tag:, autogroup:, a hosts alias or an IP/CIDR",
        "p.hujson:9:77: unknown field \"color\" in an acl rule (fields: action, src, dst, proto, srcPosture, when, notBefore, expires)",
        "p.hujson:10:48: this protocol has no ports: write the destination with :*",
        "p.hujson:11:74: bad day \"funday\": use mon..sun, a range like mon-fri, weekdays or weekend",
        "p.hujson:11:94: bad hours \"9-17\": expected HH:MM-HH:MM, like 09:00-17:30",
        "p.hujson:11:114: unknown time zone \"Mars/Olympus\": use an IANA name like Europe/Berlin or UTC",
        "p.hujson:12:67: bad time \"tomorrow\" in expires: expected RFC 3339, like 2026-12-01T18:00:00Z",
        "p.hujson:14:21: a test names one user, tag, group, host or IP, not *",
        "p.hujson:14:52: unknown field \"sneaky\" in a test (fields: src, srcAttrs, at, proto, accept, deny)",
        "p.hujson:15:3: unknown section \"derpMap\" (supported: acls, grants, groups, hosts, postures, defaultSrcPosture, tagOwners, tests, autoApprovers, accessRequests, nodeAttrs, randomizeClientPort, ssh, sshTests)",
    ];
    for e in &expected {
        assert!(
            got.contains(&e.to_string()),
            "missing: {e}\n\ngot:\n{}",
            got.join("\n")
        );
    }
    assert_eq!(got.len(), expected.len(), "got:\n{}", got.join("\n"));
}

#[test]
fn syntax_errors_point_at_the_spot() {
    assert_eq!(
        errors("{\n  \"acls\": [\n    {\"action\": \"accept\",,}\n  ]\n}"),
        ["p.hujson:3:25: expected a quoted key or }"]
    );
}

const TAILSCALE: &str = r#"
// A policy in Tailscale's syntax, using only the sections Lattice shares with it.
{
  "groups": {
    "group:eng": ["alice@example.com", "bob@example.com"],
    "group:ops": ["carol@example.com"],
  },
  "tagOwners": {
    "tag:prod": ["group:ops"],
    "tag:db": ["group:ops", "tag:prod"],
  },
  "hosts": {
    "legacy-db": "100.64.10.20",
    "office": "192.0.2.0/24",
  },
  "postures": {
    "posture:linuxUpToDate": ["node:os == 'linux'", "node:tsVersion >= '0.1'"],
  },
  "acls": [
    // Everyone reaches their own devices.
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    // Engineers reach production web and ssh, from up-to-date Linux machines only.
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:prod:80,443,22"], "srcPosture": ["posture:linuxUpToDate"]},
    // Ops reach everything tagged, and the legacy database.
    {"action": "accept", "src": ["group:ops"], "dst": ["autogroup:tagged:*", "legacy-db:5432"]},
    // Production talks to its databases.
    {"action": "accept", "src": ["tag:prod"], "proto": "tcp", "dst": ["tag:db:5432"]},
    // The legacy fields still work.
    {"action": "accept", "users": ["office"], "ports": ["tag:prod:443"]},
  ],
  "tests": [
    {"src": "alice@example.com", "srcAttrs": {"node:os": "linux", "node:tsVersion": "1.2"}, "accept": ["tag:prod:22", "tag:prod:443"], "deny": ["tag:prod:8080", "tag:db:5432"]},
    {"src": "alice@example.com", "srcAttrs": {"node:os": "windows"}, "deny": ["tag:prod:22"]},
    {"src": "carol@example.com", "accept": ["tag:db:5432", "tag:prod:9000", "legacy-db:5432"]},
    {"src": "tag:prod", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]},
    {"src": "group:eng", "deny": ["legacy-db:5432"]},
  ],
}
"#;

#[test]
fn a_tailscale_style_policy_checks_and_its_tests_pass() {
    let p = Policy::check("ts.hujson", TAILSCALE, now(), None).unwrap();
    assert_eq!(p.rule_count(), 5);
    assert_eq!(p.test_count(), 5);
    assert!(p.declares_tag("tag:db"));
    assert!(!p.declares_tag("tag:other"));
}

#[test]
fn failed_tests_name_the_rule_that_decided() {
    let text = r#"{
  "tagOwners": {"tag:db": []},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:db:*"]},
    {"action": "deny", "src": ["alice@example.com"], "dst": ["tag:db:22"]},
  ],
  "tests": [
    {"src": "alice@example.com", "accept": ["tag:db:22"], "deny": ["tag:db:5432"]},
    {"src": "bob@example.com", "proto": "udp", "accept": ["tag:db:53"], "deny": ["tag:db:123"]},
  ],
}"#;
    let got = errors(text);
    assert_eq!(
        got,
        [
            "p.hujson:8:45: test failed: alice@example.com -> tag:db:22 (tcp) should be accepted, but the deny rule at p.hujson:5:5 denies it",
            "p.hujson:8:68: test failed: alice@example.com -> tag:db:5432 (tcp) should be denied, but the rule at p.hujson:4:5 accepts it",
            "p.hujson:9:82: test failed: bob@example.com -> tag:db:123 (udp) should be denied, but the rule at p.hujson:4:5 accepts it",
        ]
    );
}

#[test]
fn deny_wins_whatever_the_order() {
    for order in [false, true] {
        let (a, d) = (
            r#"{"action": "accept", "src": ["*"], "dst": ["*:*"]}"#,
            r#"{"action": "deny", "src": ["bob@example.com"], "dst": ["*:22"]}"#,
        );
        let rules = if order {
            format!("{a}, {d}")
        } else {
            format!("{d}, {a}")
        };
        let text = format!(
            r#"{{"acls": [{rules}], "tests": [{{"src": "bob@example.com", "accept": ["10.0.0.1:80"], "deny": ["10.0.0.1:22"]}}]}}"#
        );
        assert!(errors(&text).is_empty(), "{:?}", errors(&text));
    }
}

#[test]
fn time_windows_and_expiry_are_testable() {
    let text = r#"{
  "acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["10.0.0.1:22"],
     "when": {"days": ["mon-fri"], "hours": "09:00-17:00", "timezone": "Europe/Berlin"}},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["10.0.0.1:22"], "expires": "2026-11-23T12:00:00Z"},
  ],
  "tests": [
    {"src": "alice@example.com", "at": "2026-11-23T10:00:00+01:00", "accept": ["10.0.0.1:22"]},
    {"src": "alice@example.com", "at": "2026-11-23T18:00:00+01:00", "deny": ["10.0.0.1:22"]},
    {"src": "alice@example.com", "at": "2026-11-28T10:00:00+01:00", "deny": ["10.0.0.1:22"]},
    {"src": "bob@example.com", "at": "2026-11-23T11:59:59Z", "accept": ["10.0.0.1:22"]},
    {"src": "bob@example.com", "at": "2026-11-23T12:00:00Z", "deny": ["10.0.0.1:22"]},
  ],
}"#;
    assert!(errors(text).is_empty(), "{:?}", errors(text));
}

fn inventory() -> Inventory {
    vec![
        node(
            1,
            "alice-laptop",
            Some("alice@example.com"),
            &[],
            &[
                ("node:os", AttrValue::String("linux".into())),
                ("node:clientVersion", AttrValue::String("0.1.0".into())),
            ],
        ),
        node(
            2,
            "alice-phone",
            Some("alice@example.com"),
            &[],
            &[("node:os", AttrValue::String("android".into()))],
        ),
        node(3, "carol-laptop", Some("carol@example.com"), &[], &[]),
        node(4, "web-1", None, &["tag:prod"], &[]),
        node(5, "db-1", None, &["tag:db"], &[]),
    ]
    .into_iter()
    .collect()
}

fn names(inv: &Inventory, ids: &std::collections::BTreeSet<NodeId>) -> Vec<String> {
    ids.iter()
        .map(|id| inv.get(*id).unwrap().name.clone())
        .collect()
}

#[test]
fn compilation_gives_each_node_only_what_it_needs() {
    let inv = inventory();
    let p = Policy::check("ts.hujson", TAILSCALE, now(), Some(&inv)).unwrap();
    let c = p.compile(&inv, now());
    // db-1 is reached by web-1 (tcp 5432) and by ops; it reaches nobody.
    let db = c.for_node(NodeId(5));
    assert_eq!(names(&inv, &db.visible_peers), ["carol-laptop", "web-1"]);
    let web_rule = db
        .rules
        .iter()
        .find(|r| r.origin == "ts.hujson:27:5")
        .unwrap();
    assert_eq!(
        web_rule
            .src
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["100.64.0.4/32", "fd00::4/128"]
    );
    assert_eq!(web_rule.protocols, vec![wire::IpProto::TCP]);
    assert!(
        web_rule
            .dst
            .iter()
            .all(|d| d.ports.first == 5432 && d.ports.last == 5432)
    );
    // alice's phone fails the posture: web-1's ssh rule only admits the laptop.
    let web = c.for_node(NodeId(4));
    let eng = web
        .rules
        .iter()
        .find(|r| r.origin == "ts.hujson:23:5")
        .unwrap();
    assert_eq!(
        eng.src.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["100.64.0.1/32", "fd00::1/128"]
    );
    // autogroup:self: alice's devices see each other, not carol's.
    let laptop = c.for_node(NodeId(1));
    assert_eq!(names(&inv, &laptop.visible_peers), ["alice-phone", "web-1"]);
    let phone = c.for_node(NodeId(2));
    assert_eq!(
        names(&inv, &phone.visible_peers),
        ["alice-laptop"],
        "the phone fails the posture for web-1"
    );
    assert!(c.for_node(NodeId(99)).rules.is_empty());
}

#[test]
fn deny_rules_compile_with_their_action_and_windows_with_their_ranges() {
    let inv = inventory();
    let text = r#"{
  "tagOwners": {"tag:db": []},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:db:*"], "when": {"days": ["mon-fri"], "hours": "09:00-17:00"}},
    {"action": "deny", "src": ["carol@example.com"], "dst": ["tag:db:22"], "expires": "2026-12-01T00:00:00Z"},
    {"action": "accept", "src": ["*"], "dst": ["tag:db:80"], "expires": "2026-11-01T00:00:00Z"},
  ],
}"#;
    let p = Policy::check("w.hujson", text, now(), None).unwrap();
    let db = p.compile(&inv, now()).for_node(NodeId(5));
    assert_eq!(db.rules.len(), 2, "the expired rule is gone");
    let window = db.rules[0].valid.as_ref().unwrap();
    // Ten weekdays in two weeks, plus the start of the Monday where the horizon ends.
    assert_eq!(window.len(), 11);
    assert_eq!(
        window[10].until,
        "2026-12-07T10:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second()
    );
    assert_eq!(
        window[0].from,
        "2026-11-23T10:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second()
    );
    assert_eq!(
        window[0].until,
        "2026-11-23T17:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second()
    );
    assert_eq!(db.rules[1].action, WireAction::Deny);
    assert_eq!(
        db.rules[1].valid.as_ref().unwrap()[0].until,
        "2026-12-01T00:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second()
    );
}

#[test]
fn posture_is_never_bypassed_through_address_sources() {
    let inv = inventory();
    let text = r#"{
  "tagOwners": {"tag:db": []},
  "postures": {"posture:linux": ["node:os == 'linux'"]},
  "acls": [{"action": "accept", "src": ["100.64.0.0/10", "*"], "dst": ["tag:db:*"], "srcPosture": ["posture:linux"]}],
}"#;
    let p = Policy::check("x.hujson", text, now(), None).unwrap();
    let db = p.compile(&inv, now()).for_node(NodeId(5));
    let src: Vec<String> = db.rules[0].src.iter().map(ToString::to_string).collect();
    assert_eq!(
        src,
        ["100.64.0.1/32", "fd00::1/128"],
        "only the linux laptop"
    );
}

#[test]
fn identity_provider_groups_and_a_second_factor_select_sources() {
    let yes = AttrValue::Bool(true);
    let no = AttrValue::Bool(false);
    let inv: Inventory = [
        // In sre, signed in with a second factor.
        node(
            1,
            "ann",
            Some("ann@example.com"),
            &[],
            &[("idp:group:sre", yes.clone()), ("user:mfa", yes.clone())],
        ),
        // In sre, password only.
        node(
            2,
            "bob",
            Some("bob@example.com"),
            &[],
            &[("idp:group:sre", yes.clone()), ("user:mfa", no.clone())],
        ),
        // Not in sre.
        node(
            3,
            "cat",
            Some("cat@example.com"),
            &[],
            &[("user:mfa", yes.clone())],
        ),
        // A tagged node never counts as a member of a person's group.
        node(
            4,
            "ci",
            None,
            &["tag:ci"],
            &[("idp:group:sre", yes.clone())],
        ),
        node(5, "db", None, &["tag:db"], &[]),
    ]
    .into_iter()
    .fold(Inventory::new(), |mut i, n| {
        i.upsert(n);
        i
    });
    let text = r#"{
  "tagOwners": {"tag:db": [], "tag:ci": []},
  "postures": {"posture:mfa": ["user:mfa == true"]},
  "acls": [
    {"action": "accept", "src": ["idp:group:sre"], "dst": ["tag:db:22"], "srcPosture": ["posture:mfa"]},
    {"action": "accept", "src": ["idp:group:sre"], "dst": ["tag:db:443"]},
  ],
}"#;
    let p = Policy::check("x.hujson", text, now(), Some(&inv)).unwrap();
    let db = p.compile(&inv, now()).for_node(NodeId(5));
    let srcs = |port: u16| -> Vec<String> {
        db.rules
            .iter()
            .filter(|r| r.dst.iter().any(|d| d.ports.first == port))
            .flat_map(|r| r.src.iter().map(ToString::to_string))
            .collect()
    };
    assert_eq!(
        srcs(22),
        ["100.64.0.1/32", "fd00::1/128"],
        "sre with a second factor"
    );
    assert_eq!(
        srcs(443),
        [
            "100.64.0.1/32",
            "100.64.0.2/32",
            "fd00::1/128",
            "fd00::2/128"
        ],
        "all of sre, people only"
    );
    // Unknown user attributes and empty group names are refused where they are written.
    let e = errors(r#"{"postures": {"posture:x": ["user:admin == true"]}}"#);
    assert!(
        e.iter()
            .any(|m| m.contains("unknown attribute \"user:admin\"")),
        "{e:?}"
    );
    let e = errors(r#"{"acls": [{"action": "accept", "src": ["idp:group:"], "dst": ["*:*"]}]}"#);
    assert!(
        e.iter().any(|m| m.contains("bad identity provider group")),
        "{e:?}"
    );
}

#[test]
fn access_requests_name_approvers_and_grants_compile_as_rules_that_expire() {
    let text = r#"{
  "tagOwners": {"tag:prod": [], "tag:dev": []},
  "groups": {"group:sre": ["sam@example.com"]},
  "acls": [],
  "accessRequests": [
    {"dst": ["tag:prod"], "approvers": ["group:sre", "idp:group:oncall"], "maxDuration": "4h"},
  ],
}"#;
    let p = Policy::parse("jit.hujson", text).unwrap();
    // Requests: only for what the section names, within its longest duration.
    assert_eq!(p.check_request("tag:prod", "22,5432", 1800), Ok(()));
    let e = p.check_request("tag:dev", "22", 1800).unwrap_err();
    assert!(
        e.contains("no one may approve access to \"tag:dev\""),
        "{e}"
    );
    let e = p.check_request("tag:prod", "22", 5 * 3600).unwrap_err();
    assert!(e.contains("at most 4h"), "{e}");
    let e = p.check_request("tag:prod", "ssh", 60).unwrap_err();
    assert!(e.contains("bad port"), "{e}");
    // Approvers: the policy's group, or the provider's group.
    assert_eq!(
        p.approver_rule("tag:prod", "sam@example.com", &[])
            .as_deref(),
        Some("jit.hujson:6:5")
    );
    assert!(
        p.approver_rule("tag:prod", "olly@example.com", &["oncall".into()])
            .is_some()
    );
    assert!(
        p.approver_rule("tag:prod", "eve@example.com", &["dev".into()])
            .is_none()
    );
    assert!(p.approver_rule("tag:dev", "sam@example.com", &[]).is_none());

    // A grant from node 1 to the prod node compiles into that node's filter, valid from the
    // approval until its end; nothing else changes.
    let inv: Inventory = [
        node(1, "laptop", Some("eve@example.com"), &[], &[]),
        node(2, "prod", None, &["tag:prod"], &[]),
    ]
    .into_iter()
    .fold(Inventory::new(), |mut i, n| {
        i.upsert(n);
        i
    });
    let from = now();
    let until = from + jiff::SignedDuration::from_secs(1800);
    let g = p.with_grants(&[Grant {
        id: 7,
        src: inv.get(NodeId(1)).unwrap().addresses.clone(),
        dst: "tag:prod".into(),
        ports: "22,5432".into(),
        from,
        until,
    }]);
    let c = g.compile(&inv, now());
    let prod = c.for_node(NodeId(2));
    assert_eq!(prod.rules.len(), 1);
    let r = &prod.rules[0];
    assert_eq!(r.origin, "access-request:7");
    assert_eq!(
        r.src.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["100.64.0.1/32", "fd00::1/128"]
    );
    let mut ports: Vec<_> = r
        .dst
        .iter()
        .map(|d| (d.ports.first, d.ports.last))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports, [(22, 22), (5432, 5432)]);
    let valid = r.valid.as_ref().unwrap();
    assert_eq!(valid.first().unwrap().from, from.as_second());
    assert_eq!(valid.last().unwrap().until, until.as_second());
    assert!(names(&inv, &c.for_node(NodeId(1)).visible_peers).contains(&"prod".to_owned()));
    assert!(p.compile(&inv, now()).for_node(NodeId(2)).rules.is_empty());
    // After its end the grant compiles to nothing.
    let later = until + jiff::SignedDuration::from_secs(1);
    assert!(g.compile(&inv, later).for_node(NodeId(2)).rules.is_empty());

    // The section is checked like the rest of the file.
    let e = errors(
        r#"{"accessRequests": [{"dst": ["tag:nope"], "approvers": ["tag:x"], "maxDuration": "forever", "why": 1}]}"#,
    );
    for want in [
        "tag \"tag:nope\" has no owner",
        "bad maxDuration",
        "unknown field \"why\"",
    ] {
        assert!(e.iter().any(|m| m.contains(want)), "{want}: {e:?}");
    }
    let e = errors(r#"{"accessRequests": [{"dst": ["*"], "approvers": ["*"]}]}"#);
    assert!(
        e.iter()
            .any(|m| m.contains("must be a user, group: or idp:group:")),
        "{e:?}"
    );
}

#[test]
fn network_grants_compile_like_the_acls_they_stand_for() {
    let inv = inventory();
    let as_acls = r#"{"tagOwners": {"tag:db": []}, "groups": {"group:eng": ["alice@example.com"]},
      "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432"], "proto": "tcp"},
               {"action": "accept", "src": ["group:eng"], "dst": ["tag:db:22"]}]}"#;
    let as_grants = r#"{"tagOwners": {"tag:db": []}, "groups": {"group:eng": ["alice@example.com"]},
      "grants": [{"src": ["group:eng"], "dst": ["tag:db"], "ip": ["tcp:5432", "22"]}]}"#;
    let a = Policy::parse("a.hujson", as_acls)
        .unwrap()
        .compile(&inv, now());
    let g = Policy::parse("g.hujson", as_grants)
        .unwrap()
        .compile(&inv, now());
    for n in inv.iter() {
        let strip = |c: Compiled| {
            c.rules
                .into_iter()
                .map(|r| (r.src, r.dst, r.protocols))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(a.for_node(n.id)),
            strip(g.for_node(n.id)),
            "{}",
            n.name
        );
        assert_eq!(
            a.for_node(n.id).visible_peers,
            g.for_node(n.id).visible_peers
        );
    }
    // What the service refuses, refused with the reason.
    for (grant, want) in [
        (
            r#"{"src": ["*"], "dst": ["*"], "ip": ["icmp"]}"#,
            "bad ip entry \"icmp\"",
        ),
        (
            r#"{"src": ["*"], "dst": ["*"], "ip": ["tcp:0"]}"#,
            "above 0",
        ),
        (
            r#"{"src": ["*"], "dst": ["0.0.0.0/0"], "ip": ["*"]}"#,
            "use \"*\" or \"autogroup:internet\"",
        ),
        (
            r#"{"src": ["*"], "dst": ["autogroup:self"], "ip": ["*"]}"#,
            "autogroup:self can only be used",
        ),
        (r#"{"src": ["*"], "dst": ["*"]}"#, "needs \"ip\""),
        (
            r#"{"src": ["*"], "dst": ["*"], "app": {"https://x.com/cap": [{}]}}"#,
            "{domain}/{path}",
        ),
        (
            r#"{"src": ["*"], "dst": ["*"], "app": {}}"#,
            "can not both be empty",
        ),
        (
            r#"{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["tag:r"]}"#,
            "via \"tag:r\": tag not found",
        ),
        (
            r#"{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["autogroup:tagged"]}"#,
            "via can only be a tag",
        ),
    ] {
        let e = errors(&format!(r#"{{"grants": [{grant}]}}"#));
        assert!(e.iter().any(|m| m.contains(want)), "{grant}: {e:?}");
    }
    // Every user of a domain.
    let domain = r#"{"tagOwners": {"tag:db": []},
      "grants": [{"src": ["user:*@example.com"], "dst": ["tag:db"], "ip": ["tcp:22"]}]}"#;
    let c = Policy::parse("d.hujson", domain)
        .unwrap()
        .compile(&inv, now());
    let srcs: Vec<String> = c.for_node(NodeId(5)).rules[0]
        .src
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        !srcs.is_empty()
            && srcs
                .iter()
                .all(|s| s.starts_with("100.64.0.") || s.starts_with("fd00::")),
        "{srcs:?}"
    );
    let e = errors(r#"{"grants": [{"src": ["user:*"], "dst": ["*"], "ip": ["*"]}]}"#);
    assert!(
        e.iter()
            .any(|m| m.contains("expected user:NAME@DOMAIN or user:*@DOMAIN")),
        "{e:?}"
    );
    // An app grant carries its capabilities to the destination (at its own addresses) and
    // admits no packet.
    let app = r#"{"tagOwners": {"tag:db": []}, "groups": {"group:eng": ["alice@example.com"]},
      "grants": [{"src": ["group:eng"], "dst": ["tag:db"], "app": {"example.com/cap/db": [{"role": "ro"}]}}]}"#;
    let c = Policy::parse("app.hujson", app)
        .unwrap()
        .compile(&inv, now());
    let db = c.for_node(NodeId(5));
    assert_eq!(db.rules.len(), 1);
    let r = &db.rules[0];
    assert!(r.dst.is_empty(), "no packet is admitted");
    assert_eq!(r.cap_grants.len(), 1);
    assert_eq!(
        r.cap_grants[0].caps["example.com/cap/db"],
        vec![serde_json::json!({"role": "ro"})]
    );
    assert_eq!(r.cap_grants[0].dsts.len(), 2, "the node's IPv4 and IPv6");
}

#[test]
fn a_file_without_acls_or_grants_is_open_and_says_so() {
    let inv = inventory();
    let open = Policy::parse("o.hujson", r#"{"tagOwners": {"tag:db": []}}"#).unwrap();
    assert!(open.open_by_default());
    let c = open.compile(&inv, now());
    assert_eq!(c.for_node(NodeId(5)).visible_peers.len(), inv.len() - 1);
    let closed = Policy::parse("c.hujson", r#"{"tagOwners": {"tag:db": []}, "acls": []}"#).unwrap();
    assert!(!closed.open_by_default());
    assert!(
        closed
            .compile(&inv, now())
            .for_node(NodeId(5))
            .visible_peers
            .is_empty()
    );
    let grants = Policy::parse("g.hujson", r#"{"grants": []}"#).unwrap();
    assert!(!grants.open_by_default());
}

#[test]
fn the_default_lets_everyone_reach_everyone() {
    let inv = inventory();
    let c = Policy::allow_all().compile(&inv, now());
    for id in 1..=5 {
        let n = c.for_node(NodeId(id));
        assert_eq!(n.visible_peers.len(), 4);
        assert_eq!(n.rules.len(), 1);
        assert!(n.rules[0].all_protocols);
        assert_eq!(n.rules[0].origin, ALLOW_ALL);
        let src: Vec<String> = n.rules[0].src.iter().map(ToString::to_string).collect();
        assert_eq!(src, ["0.0.0.0/0", "::/0"]);
    }
}

#[test]
fn diff_lists_who_gains_and_who_loses_access() {
    let inv = inventory();
    let old = Policy::check("ts.hujson", TAILSCALE, now(), Some(&inv)).unwrap();
    let stricter = TAILSCALE.replace(r#""tag:prod:80,443,22""#, r#""tag:prod:443""#);
    // (its own tests would now fail; diff still shows what the change does)
    let new = Policy::parse("ts.hujson", &stricter).unwrap();
    let d = diff(&old.compile(&inv, now()), &new.compile(&inv, now()), now());
    assert!(d.gained.is_empty(), "{:?}", d.gained);
    let lost: Vec<String> = d
        .lost
        .iter()
        .map(|c| format!("{} -> {}: {}", c.src, c.dst, c.access))
        .collect();
    assert_eq!(lost, ["alice-laptop -> web-1: tcp 22,80; udp 22,80"]);
}

#[test]
fn inventory_addresses_let_tests_use_address_rules() {
    let inv = inventory();
    let text = r#"{
  "acls": [{"action": "accept", "src": ["100.64.0.1"], "dst": ["100.64.0.5:22"]}],
  "tests": [{"src": "alice@example.com", "accept": ["100.64.0.5:22"]}],
}"#;
    assert!(
        Policy::check("a.hujson", text, now(), None).is_err(),
        "without an inventory alice has no address"
    );
    assert!(Policy::check("a.hujson", text, now(), Some(&inv)).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_policies_never_panic_the_checker_or_compiler(
        edits in proptest::collection::vec((0usize..2000, any::<char>()), 0..8),
        cut in 0usize..2000,
    ) {
        let mut chars: Vec<char> = TAILSCALE.chars().collect();
        for (i, c) in edits {
            if !chars.is_empty() {
                let n = chars.len();
                chars[i % n] = c;
            }
        }
        chars.truncate(cut.max(1).min(chars.len()));
        let text: String = chars.into_iter().collect();
        if let Ok(p) = Policy::check("f.hujson", &text, now(), None) {
            let inv = inventory();
            let c = p.compile(&inv, now());
            for id in 1..=5 {
                let _ = c.for_node(NodeId(id));
            }
        }
    }

    #[test]
    fn compiled_rules_agree_with_the_evaluator(
        src in 1u64..=5, dst in 1u64..=5, port in prop_oneof![Just(22u16), Just(80), Just(443), Just(5432), any::<u16>()],
    ) {
        // What a node enforces (its compiled rules) must match what tests would say.
        let inv = inventory();
        let p = Policy::check("ts.hujson", TAILSCALE, now(), Some(&inv)).unwrap();
        let c = p.compile(&inv, now());
        let s = inv.get(NodeId(src)).unwrap();
        let d = inv.get(NodeId(dst)).unwrap();
        let rules = c.for_node(NodeId(dst)).rules;
        let ip: IpAddr = s.addresses[0];
        let compiled = {
            let hit = |r: &wire::FilterRule| r.active_at(now().as_second()) && r.matches_protocol(wire::IpProto::TCP)
                && r.src.iter().any(|n| n.contains(&ip))
                && r.dst.iter().any(|x| x.net.contains(&d.addresses[0]) && x.ports.contains(port));
            !rules.iter().any(|r| r.action == WireAction::Deny && hit(r)) && rules.iter().any(|r| r.action == WireAction::Accept && hit(r))
        };
        let evaluated = matches!(p.file().decide(&s.subject(), &d.subject(), 6, port, now()), eval::Decision::Accept(_));
        prop_assert_eq!(compiled, evaluated || (src == dst && compiled), "src {} dst {} port {}", src, dst, port);
    }
}

/// A policy with address prefixes, deny rules and `*` sources next to group rules.
const MIXED: &str = r#"{
  "groups": {"group:eng": ["alice@example.com", "bob@example.com"]},
  "tagOwners": {"tag:prod": [], "tag:db": []},
  "acls": [
    {"action": "deny", "src": ["100.64.0.0/29"], "dst": ["tag:db:*"]},
    {"action": "accept", "src": ["*"], "dst": ["tag:prod:443"]},
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432", "autogroup:self:22"]},
    {"action": "accept", "src": ["100.64.0.9"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["tag:prod"], "dst": ["tag:db:*"]},
  ],
}"#;

fn random_node(id: u64, user: u8, tags: u8, os: bool) -> InventoryNode {
    let users = [
        None,
        Some("alice@example.com"),
        Some("bob@example.com"),
        Some("carol@example.com"),
    ];
    let mut t: Vec<&str> = Vec::new();
    if tags & 1 != 0 {
        t.push("tag:prod");
    }
    if tags & 2 != 0 {
        t.push("tag:db");
    }
    let os = if os { "linux" } else { "windows" };
    node(
        id,
        &format!("n{id}"),
        if t.is_empty() {
            users[usize::from(user % 4)]
        } else {
            None
        },
        &t,
        &[
            ("node:os", AttrValue::String(os.into())),
            ("node:tsVersion", AttrValue::String("1.0".into())),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn incremental_updates_compile_like_a_fresh_compile_and_related_covers_every_change(
        which in 0usize..3,
        ops in proptest::collection::vec((any::<bool>(), 1u64..=12, 0u8..4, 0u8..4, any::<bool>()), 1..40),
    ) {
        let policy = match which {
            0 => Policy::parse("t.hujson", TAILSCALE).unwrap(),
            1 => Policy::parse("m.hujson", MIXED).unwrap(),
            _ => Policy::allow_all(),
        };
        let mut inv = Inventory::new();
        let mut inc = policy.compile(&inv, now());
        for (remove, id, user, tags, os) in ops {
            let before: Vec<Compiled> = (1..=12).map(|i| inc.for_node(NodeId(i))).collect();
            let mut related = inc.related(NodeId(id));
            if remove {
                inv.remove(NodeId(id));
                inc.remove(NodeId(id));
            } else {
                let n = random_node(id, user, tags, os);
                inv.upsert(n.clone());
                inc.upsert(n);
            }
            related.extend(inc.related(NodeId(id)));
            let fresh = policy.compile(&inv, now());
            for i in 1..=12 {
                let got = inc.for_node(NodeId(i));
                prop_assert_eq!(&got, &fresh.for_node(NodeId(i)), "node {} after changing {}", i, id);
                if got != before[usize::try_from(i - 1).unwrap()] {
                    prop_assert!(related.contains(&NodeId(i)),
                        "changing {} altered node {} outside related {:?}", id, i, related);
                }
            }
        }
    }
}

/// What `a` allows for one protocol and port (the port is ignored for protocols without).
fn access_covers(a: &Access, proto: u8, port: u16) -> bool {
    match a.ports.get(&proto) {
        Some(r) => r.iter().any(|&(lo, hi)| (lo..=hi).contains(&port)),
        None => !matches!(proto, 6 | 17 | 132) && a.other.contains(&proto),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn diff_agrees_with_deciding_every_connection_under_both_policies(
        which in (0usize..3, 0usize..3),
        nodes in proptest::collection::vec((0u8..4, 0u8..4, any::<bool>()), 2..10),
        extra_port in any::<u16>(),
    ) {
        let pick = |w: usize| match w {
            0 => Policy::parse("t.hujson", TAILSCALE).unwrap(),
            1 => Policy::parse("m.hujson", MIXED).unwrap(),
            _ => Policy::allow_all(),
        };
        let (old, new) = (pick(which.0), pick(which.1));
        let mut inv = Inventory::new();
        for (i, (user, tags, os)) in nodes.into_iter().enumerate() {
            inv.upsert(random_node(i as u64 + 1, user, tags, os));
        }
        let d = diff_policies(&old, &new, &inv, now());
        // The same answer through compiled policies.
        prop_assert_eq!(&d, &diff(&old.compile(&inv, now()), &new.compile(&inv, now()), now()));
        let accepts = |p: &Policy, s: &InventoryNode, t: &InventoryNode, proto: u8, port: u16| {
            matches!(p.file().decide(&s.subject(), &t.subject(), proto, port, now()), eval::Decision::Accept(_))
        };
        let probes = [(6u8, 22u16), (6, 80), (6, 443), (6, 5432), (6, extra_port), (17, 53), (17, 443), (132, 9), (1, 0), (58, 0), (47, 0)];
        for s in inv.iter() {
            for t in inv.iter() {
                let find = |l: &[Change]| l.iter().find(|c| c.src == s.name && c.dst == t.name).cloned();
                let (g, l) = (find(&d.gained), find(&d.lost));
                if s.id == t.id {
                    prop_assert!(g.is_none() && l.is_none());
                    continue;
                }
                for (proto, port) in probes {
                    let (a, b) = (accepts(&old, s, t, proto, port), accepts(&new, s, t, proto, port));
                    let gained = g.as_ref().is_some_and(|c| access_covers(&c.access, proto, port));
                    let lost = l.as_ref().is_some_and(|c| access_covers(&c.access, proto, port));
                    prop_assert_eq!((gained, lost), (b && !a, a && !b),
                        "{} -> {} proto {} port {}", s.name, t.name, proto, port);
                }
            }
        }
        // Listed source by source, destinations in node order.
        let ids: Vec<String> = inv.iter().map(|n| n.name.clone()).collect();
        let pos = |n: &str| ids.iter().position(|x| x == n).unwrap();
        for l in [&d.gained, &d.lost] {
            prop_assert!(l.windows(2).all(|w| (pos(&w[0].src), pos(&w[0].dst)) < (pos(&w[1].src), pos(&w[1].dst))));
        }
    }
}

#[test]
fn node_attributes_reach_the_nodes_they_target_and_what_lattice_ignores_is_said() {
    let text = r#"{
  "tagOwners": {"tag:server": [], "tag:exit": []},
  "groups": {"group:eng": ["bob@example.com"]},
  "hosts": {"web": "100.64.0.3"},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "nodeAttrs": [
    {"target": ["tag:server", "web"], "attr": ["randomize-client-port", "nextdns:abc"]},
    {"target": ["autogroup:admin"], "attr": ["funnel"], "app": {"example.com/cap/x": [{"a": 1}]}},
    {"target": ["autogroup:owner", "group:eng"], "app": {"example.com/cap/x": [{"a": 1}, 2]}},
    {"target": [], "attr": ["unused"]},
    {"target": ["*"], "ipPool": ["100.80.0.0/16"]},
  ],
  "randomizeClientPort": true,
}"#;
    let p = Policy::check("p.hujson", text, now(), None).unwrap();
    let admin = (ROLE_ADMIN, AttrValue::Bool(true));
    let owner = (ROLE_OWNER, AttrValue::Bool(true));
    let inv: Inventory = [
        node(
            1,
            "alice",
            Some("alice@example.com"),
            &[],
            &[admin.clone(), owner],
        ),
        node(
            2,
            "bob",
            Some("bob@example.com"),
            &[],
            std::slice::from_ref(&admin),
        ),
        node(3, "web", Some("carol@example.com"), &[], &[]),
        node(4, "srv", None, &["tag:server"], &[admin]),
    ]
    .into_iter()
    .collect();
    let c = p.compile(&inv, now());
    let caps = |id: u64| -> Vec<(String, Vec<serde_json::Value>)> {
        c.for_node(NodeId(id)).node_caps.into_iter().collect()
    };
    let x = |v: Vec<serde_json::Value>| ("example.com/cap/x".to_owned(), v);
    let rcp = ("randomize-client-port".to_owned(), vec![]);
    let a1 = serde_json::json!({"a": 1});
    assert_eq!(
        caps(1),
        [
            x(vec![a1.clone(), serde_json::json!(2)]),
            ("funnel".into(), vec![]),
            rcp.clone()
        ],
        "an admin and the owner: values merged in order, without repeats"
    );
    assert_eq!(
        caps(2),
        [
            x(vec![a1, serde_json::json!(2)]),
            ("funnel".into(), vec![]),
            rcp.clone()
        ],
        "bob is an admin and in group:eng"
    );
    assert_eq!(
        caps(3),
        [("nextdns:abc".into(), vec![]), rcp.clone()],
        "targeted through its hosts alias"
    );
    assert_eq!(
        caps(4),
        [("nextdns:abc".into(), vec![]), rcp],
        "a tagged node is nobody's admin, whatever its attributes"
    );
    // What Lattice does not act on is named, with its place.
    let notes = p.notes();
    assert!(
        notes[0].starts_with("p.hujson:7:5: nodeAttrs \"nextdns:abc\" is kept"),
        "randomize-client-port is acted on, nextdns is not: {notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("ipPool is kept")),
        "{notes:?}"
    );
    assert!(
        !notes.iter().any(|n| n.starts_with("p.hujson:13:")),
        "randomizeClientPort is acted on: {notes:?}"
    );

    // Mistakes are refused with their place.
    let bad = errors(
        r#"{"tagOwners": {"tag:a": []}, "nodeAttrs": [
  {"target": ["autogroup:self"], "attr": ["x"]},
  {"target": ["tag:undefined"], "attr": ["x"]},
  {"target": ["*"], "ipPool": ["100.100.100.0/24", "10.0.0.0/8", "nope"]},
  {"attr": ["x"], "color": 1},
  {"target": ["*"], "app": {"tailscale.com/cap/secret": []}},
], "randomizeClientPort": "yes"}"#,
    );
    for want in [
        "p.hujson:2:15: autogroup:self cannot be a nodeAttrs target",
        "p.hujson:3:15: tag \"tag:undefined\" has no owner",
        "p.hujson:4:32: IPPool(100.100.100.0/24): network within reserved range",
        "p.hujson:4:52: IPPool(10.0.0.0/8): must be inside the mesh's range",
        "p.hujson:4:66: bad ipPool entry \"nope\"",
        "p.hujson:5:19: unknown field \"color\" in a nodeAttrs entry",
        "p.hujson:5:3: a nodeAttrs entry needs a target",
        "p.hujson:6:29: capability \"tailscale.com/cap/secret\"",
        "p.hujson:7:27: randomizeClientPort must be true or false",
    ] {
        assert!(bad.iter().any(|e| e.starts_with(want)), "{want}: {bad:#?}");
    }
}

#[test]
fn admins_and_the_owner_are_sources_like_any_group_of_people() {
    let text = r#"{
  "tagOwners": {"tag:db": []},
  "acls": [
    {"action": "accept", "src": ["autogroup:admin"], "dst": ["tag:db:22"]},
    {"action": "accept", "src": ["autogroup:owner"], "dst": ["autogroup:self:*"]},
  ],
}"#;
    let p = Policy::check("p.hujson", text, now(), None).unwrap();
    let inv: Inventory = [
        node(
            1,
            "owner",
            Some("o@example.com"),
            &[],
            &[
                (ROLE_ADMIN, AttrValue::Bool(true)),
                (ROLE_OWNER, AttrValue::Bool(true)),
            ],
        ),
        node(
            2,
            "admin",
            Some("a@example.com"),
            &[],
            &[(ROLE_ADMIN, AttrValue::Bool(true))],
        ),
        node(3, "user", Some("u@example.com"), &[], &[]),
        node(4, "db", None, &["tag:db"], &[]),
    ]
    .into_iter()
    .collect();
    let c = p.compile(&inv, now());
    assert_eq!(
        names(&inv, &c.for_node(NodeId(4)).visible_peers),
        ["owner", "admin"],
        "only admins reach the database"
    );
    assert!(c.for_node(NodeId(3)).visible_peers.is_empty());
}

#[test]
fn ssh_rules_are_checked_as_the_service_checks_them_and_their_tests_run() {
    let bad = errors(
        r#"{"tagOwners": {"tag:server": []}, "hosts": {"srv": "100.64.0.9"}, "ssh": [
  {"dst": ["tag:server"], "src": ["*"], "users": ["root"]},
  {"action": "deny", "dst": ["tag:server"], "src": ["*"], "users": ["root"]},
  {"action": "accept", "dst": ["srv"], "src": ["*"], "users": ["root"]},
  {"action": "accept", "dst": ["tag:server"], "src": ["*"], "users": ["", "*", "localpart:*@*"]},
  {"action": "accept", "dst": ["tag:server"], "src": ["*"], "users": []},
  {"action": "check", "dst": ["tag:server"], "src": ["*"], "users": ["root"], "checkPeriod": "168h0m1s"},
  {"action": "check", "dst": ["tag:server"], "src": ["*"], "users": ["root"], "checkPeriod": "-1m"},
  {"action": "check", "dst": ["tag:server"], "src": ["*"], "users": ["root"], "checkPeriod": "abc"},
  {"action": "accept", "dst": ["tag:server"], "src": ["*"], "users": ["root"], "acceptEnv": [""]},
]}"#,
    );
    for want in [
        "p.hujson:2:3: an ssh rule's action must be specified",
        "p.hujson:3:14: \"deny\" is not a valid action",
        "p.hujson:4:32: invalid dst \"srv\"",
        "p.hujson:5:71: user \"\" is not valid",
        "p.hujson:5:75: user \"*\" is not valid",
        "p.hujson:5:80: user \"localpart:*@*\"",
        "p.hujson:6:3: an ssh rule's users must be specified",
        "p.hujson:7:94: checkPeriod 168h0m1s is above the max (168h)",
        "p.hujson:8:94: checkPeriod -1m must be a positive duration",
        "p.hujson:9:94: bad checkPeriod \"abc\"",
        "p.hujson:10:94: acceptEnv values cannot be empty",
    ] {
        assert!(bad.iter().any(|e| e.starts_with(want)), "{want}: {bad:#?}");
    }

    // What the service accepts: checkPeriod 0s and always, whitespace around names, any
    // other login name; the tests run against the ssh rules, not the acls.
    let text = r#"{
  "tagOwners": {"tag:server": []},
  "groups": {"group:dev": ["thor@example.org"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}],
  "ssh": [
    {"action": " accept", "src": [" group:dev"], "dst": ["tag:server "], "users": ["root", "localpart:*@example.org"]},
    {"action": "check", "src": ["freya@example.com"], "dst": ["tag:server"], "users": ["autogroup:nonroot"], "checkPeriod": "0s"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["ubuntu"], "checkPeriod": "always", "acceptEnv": null},
  ],
  "sshTests": [
    {"src": "thor@example.org", "dst": ["tag:server"], "accept": ["root", "thor"], "deny": ["ubuntu"]},
    {"src": "freya@example.com", "dst": ["tag:server"], "check": ["freya", "ubuntu"], "deny": ["root"]},
    {"src": "freya@example.com", "dst": ["freya@example.com"], "accept": ["ubuntu"]},
  ],
}"#;
    let p = Policy::check("p.hujson", text, now(), None).unwrap();
    assert!(
        p.notes()
            .iter()
            .any(|n| n.contains("Lattice runs no SSH server"))
    );
    // A failing ssh test refuses the policy: an acl for port 22 grants no SSH login.
    for (test, want) in [
        (
            r#"{"src": "freya@example.com", "dst": ["tag:server"], "accept": ["root"]}"#,
            "ssh test failed: freya@example.com -> tag:server as \"root\" should be allowed",
        ),
        (
            r#"{"src": "thor@example.org", "dst": ["tag:server"], "deny": ["thor"]}"#,
            "ssh test failed: thor@example.org -> tag:server as \"thor\" should be refused",
        ),
        (
            r#"{"src": "freya@example.com", "dst": ["thor@example.org"], "accept": ["ubuntu"]}"#,
            "should be allowed",
        ),
    ] {
        let failing = text.replace(r#""sshTests": ["#, &format!(r#""sshTests": [{test},"#));
        let e = errors(&failing);
        assert!(e.iter().any(|m| m.contains(want)), "{test}: {e:#?}");
    }
    // A test destination is one host, never a range.
    let e = errors(
        r#"{"hosts": {"net": "10.0.0.0/8"}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "tests": [{"src": "10.1.2.3", "accept": ["10.0.0.0/8:22", "net:22", "100.64.0.1/32:22", "100.64.0.1:22"]}]}"#,
    );
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(
        e.iter()
            .all(|m| m.contains("is a range: a test names one host")),
        "{e:#?}"
    );
}

#[test]
fn drive_and_relay_grants_come_with_their_companions_the_other_way() {
    let text = r#"{
  "tagOwners": {"tag:db": []},
  "grants": [
    {"src": ["alice@example.com"], "dst": ["tag:db"], "app": {"tailscale.com/cap/drive": [{"shares": ["docs"]}]}},
    {"src": ["alice@example.com"], "dst": ["tag:db"], "app": {"tailscale.com/cap/relay": [{}]}},
  ],
}"#;
    let p = Policy::check("p.hujson", text, now(), None).unwrap();
    let c = p.compile(&inventory(), now());
    let caps_at = |id: u64| -> Vec<(String, String, Vec<String>)> {
        c.for_node(NodeId(id))
            .rules
            .iter()
            .flat_map(|r| {
                r.cap_grants.iter().flat_map(move |g| {
                    g.caps.keys().map(move |k| {
                        (
                            k.clone(),
                            g.dsts[0].to_string(),
                            r.src.iter().map(ToString::to_string).collect(),
                        )
                    })
                })
            })
            .collect()
    };
    let server = caps_at(5);
    assert!(
        server
            .iter()
            .any(|(k, _, _)| k == "tailscale.com/cap/drive"),
        "{server:?}"
    );
    assert!(
        server
            .iter()
            .any(|(k, _, _)| k == "tailscale.com/cap/relay"),
        "{server:?}"
    );
    // At alice's node: the server shares, and is a relay target, for her.
    let alice = caps_at(1);
    for companion in [
        "tailscale.com/cap/drive-sharer",
        "tailscale.com/cap/relay-target",
    ] {
        assert!(
            alice.iter().any(|(k, dst, src)| k == companion
                && dst.starts_with("100.64.0.1/")
                && src.iter().any(|s| s.starts_with("100.64.0.5"))),
            "{companion}: {alice:?}"
        );
    }
}
