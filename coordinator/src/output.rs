//! Everything the CLI prints on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::audit::Entry;
use crate::db::policy::PolicyVersion;
use crate::model::AuthKeyInfo;
use crate::ops::NodeView;
use crate::ops::policy::DiffView;

pub(crate) fn line(s: &str) {
    println!("{s}");
}

/// One line on stderr (diagnostics).
pub(crate) fn error_line(s: &str) {
    eprintln!("{s}");
}

/// Text exactly as given (no newline added).
pub(crate) fn raw(s: &str) {
    print!("{s}");
}

/// `+ src -> dst: access` for gained, `- ...` for lost.
pub(crate) fn diff(d: &DiffView) {
    for c in &d.gained {
        println!("+ {} -> {}: {}", c.src, c.dst, c.access);
    }
    for c in &d.lost {
        println!("- {} -> {}: {}", c.src, c.dst, c.access);
    }
    let left = (d.gained_total + d.lost_total).saturating_sub(d.gained.len() + d.lost.len());
    if left > 0 {
        println!("... and {left} more pairs (`policy diff FILE` lists every one)");
    }
}

pub(crate) fn federation(rules: &[crate::federation::TrustRule]) {
    println!(
        "{:<4} {:<40} {:<16} {:<20} {:<9} {:<9} MATCH",
        "ID", "ISSUER", "AUDIENCE", "TAGS", "EPHEMERAL", "MAX LIFE"
    );
    for r in rules {
        let matches: Vec<String> = r.matches.iter().map(ToString::to_string).collect();
        println!(
            "{:<4} {:<40} {:<16} {:<20} {:<9} {:<9} {}",
            r.id,
            r.issuer,
            r.audience,
            r.tags.join(","),
            if r.ephemeral { "yes" } else { "no" },
            r.max_lifetime_s.map_or_else(
                || "token".into(),
                |s| humantime::format_duration(Duration::from_secs(s)).to_string()
            ),
            matches.join(" ")
        );
    }
}

pub(crate) fn access_requests(list: &[crate::db::access::AccessRequest]) {
    if list.is_empty() {
        println!("no access requests waiting or in force");
        return;
    }
    println!(
        "{:<5} {:<9} {:<16} {:<28} {:<14} {:<8} {:<20} REASON",
        "ID", "STATUS", "NODE", "USER", "TO", "PORTS", "UNTIL"
    );
    for r in list {
        let until = match (r.status.as_str(), r.expires_at) {
            ("pending", _) => format!("asks {}s", r.duration_s),
            (_, Some(t)) => time(t),
            _ => "-".into(),
        };
        println!(
            "{:<5} {:<9} {:<16} {:<28} {:<14} {:<8} {:<20} {}",
            r.id,
            r.status,
            r.node_name,
            r.user_name.as_deref().unwrap_or("-"),
            r.dst,
            r.ports,
            until,
            r.reason
        );
    }
}

pub(crate) fn conformance(r: &crate::conformance::Report) {
    for c in &r.cases {
        println!("{} {} ({})", c.verdict.to_uppercase(), c.id, c.category);
        for d in c.details.iter().take(6) {
            println!("    {d}");
        }
        if c.details.len() > 6 {
            println!("    ... and {} more", c.details.len() - 6);
        }
    }
    println!();
    println!(
        "{:<12} {:>5} {:>5} {:>14} {:>6}",
        "CATEGORY", "PASS", "FAIL", "NOT SUPPORTED", "CASES"
    );
    for (name, t) in &r.categories {
        println!(
            "{:<12} {:>5} {:>5} {:>14} {:>6}",
            name,
            t.pass,
            t.fail,
            t.unsupported,
            t.pass + t.fail + t.unsupported
        );
    }
    println!("conformance: {}/{} passed", r.passed, r.total);
}

pub(crate) fn users(users: &[crate::ops::people::UserView]) {
    if users.is_empty() {
        println!("no users (people appear once they sign in)");
        return;
    }
    println!(
        "{:<32} {:<20} {:<30} LAST SIGN-IN",
        "USER", "NAME", "GROUPS"
    );
    for u in users {
        let when = UNIX_EPOCH + Duration::from_secs(u.last_login_unix.max(0).unsigned_abs());
        println!(
            "{:<32} {:<20} {:<30} {}",
            u.login_name,
            u.display_name.as_deref().unwrap_or("-"),
            if u.groups.is_empty() {
                "-".to_owned()
            } else {
                u.groups.join(",")
            },
            humantime::format_rfc3339_seconds(when)
        );
    }
}

pub(crate) fn relays(list: &[wire::RelayInfo]) {
    println!(
        "{:<4} {:<16} {:<24} {:<10} STUN",
        "ID", "NAME", "QUIC", "WEBSOCKET"
    );
    for r in list {
        let stun: Vec<String> = r.stun.iter().map(ToString::to_string).collect();
        println!(
            "{:<4} {:<16} {:<24} {:<10} {}",
            r.id.0,
            r.name,
            r.quic.map(|q| q.to_string()).unwrap_or_else(|| "-".into()),
            if r.websocket.is_some() { "yes" } else { "no" },
            stun.join(",")
        );
    }
}

pub(crate) fn policy_versions(v: &[PolicyVersion]) {
    println!(
        "{:<8} {:<22} {:<24} {:<14} FILE",
        "VERSION", "SET AT", "SET BY", "SHA256"
    );
    for p in v {
        println!(
            "{:<8} {:<22} {:<24} {:<14} {}",
            p.version,
            time(p.set_at_ms / 1000),
            p.set_by,
            &p.sha256[..p.sha256.len().min(12)],
            p.file_name
        );
    }
}

pub(crate) fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cannot encode output: {e}"),
    }
}

/// A Unix time as RFC 3339 (UTC, seconds).
pub(crate) fn time(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn nodes(nodes: &[NodeView]) {
    println!(
        "{:<20} {:<16} {:<40} {:<8} {:<20} LAST SEEN",
        "NAME", "IPV4", "IPV6", "STATUS", "OWNER"
    );
    for n in nodes {
        let v4 = n
            .addresses
            .iter()
            .find(|a| a.is_ipv4())
            .map(ToString::to_string)
            .unwrap_or_default();
        let v6 = n
            .addresses
            .iter()
            .find(|a| a.is_ipv6())
            .map(ToString::to_string)
            .unwrap_or_default();
        let status = if n.expired {
            "expired"
        } else if n.online {
            "online"
        } else {
            "offline"
        };
        let owner = if n.tags.is_empty() {
            n.user.clone().unwrap_or_else(|| "-".into())
        } else {
            n.tags.join(",")
        };
        let seen = n.last_seen_unix.map_or_else(|| "-".into(), time);
        println!(
            "{:<20} {v4:<16} {v6:<40} {status:<8} {owner:<20} {seen}",
            n.name
        );
    }
}

pub(crate) fn auth_keys(keys: &[AuthKeyInfo]) {
    println!(
        "{:<14} {:<9} {:<9} {:<6} {:<24} {:<22} STATE",
        "ID", "REUSABLE", "EPHEMERAL", "USED", "TAGS/USER", "EXPIRES"
    );
    for k in keys {
        let who = if k.tags.is_empty() {
            k.user.clone().unwrap_or_else(|| "-".into())
        } else {
            k.tags.join(",")
        };
        let state = if k.revoked_at.is_some() {
            "revoked"
        } else if !k.reusable && k.used_count > 0 {
            "used"
        } else {
            "valid"
        };
        println!(
            "{:<14} {:<9} {:<9} {:<6} {who:<24} {:<22} {state}",
            k.id,
            k.reusable,
            k.ephemeral,
            k.used_count,
            time(k.expires_at)
        );
    }
}

pub(crate) fn tokens(tokens: &[crate::db::keys::TokenInfo]) {
    let now = crate::state::unix_now();
    println!(
        "{:<14} {:<6} {:<24} {:<22} {:<22} STATE",
        "ID", "SCOPE", "CREATED BY", "CREATED", "EXPIRES"
    );
    for t in tokens {
        let state = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at.is_none_or(|e| e <= now) {
            "expired"
        } else {
            "valid"
        };
        println!(
            "{:<14} {:<6} {:<24} {:<22} {:<22} {state}",
            t.id,
            t.scope,
            t.created_by,
            time(t.created_at),
            t.expires_at.map_or_else(|| "-".into(), time),
        );
    }
}

pub(crate) fn audit(entries: &[Entry]) {
    for e in entries {
        let t = time(e.at_ms / 1000);
        println!(
            "{:>6} {t} {:<20} {:<16} {:<20} {}",
            e.seq, e.actor, e.action, e.target, e.detail
        );
    }
}
