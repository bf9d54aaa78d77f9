//! Everything the CLI prints on stdout.
#![allow(clippy::print_stdout)]

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::io::api::{NetcheckJson, StatusJson, WhoisJson};

pub(crate) fn line(s: &str) {
    println!("{s}");
}

pub(crate) fn json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cannot encode output: {e}"),
    }
}

fn ago(unix: Option<i64>) -> String {
    let Some(t) = unix else { return "-".into() };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format!("{}s ago", (now - t).max(0))
}

fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

pub(crate) fn status(st: &StatusJson) {
    let me = &st.self_node;
    let ips: Vec<String> = me.ips.iter().map(ToString::to_string).collect();
    println!("{} ({})  {}", me.name, me.fqdn, ips.join(", "));
    let coord = if st.coordinator.connected {
        "connected".to_owned()
    } else {
        format!(
            "disconnected ({})",
            st.coordinator.last_error.as_deref().unwrap_or("connecting")
        )
    };
    println!("coordinator {}: {coord}", st.coordinator.url);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let person = me.user.is_some() && me.tags.is_empty();
    if let Some(notice) = me
        .key_expiry_unix
        .and_then(|t| expiry_notice(t, now, person))
    {
        println!("{notice}");
    }
    let r = &me.routes;
    if !r.advertised.is_empty() {
        let list = |v: &[ipnet::IpNet]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        println!(
            "routes: advertised {}; approved {}; primary {}",
            list(&r.advertised),
            list(&r.approved),
            list(&r.primary)
        );
    }
    if !me.attrs.is_empty() {
        let names: Vec<&str> = me.attrs.keys().map(String::as_str).collect();
        println!("node attributes: {}", names.join(", "));
    }
    if let Some(e) = &st.exit_node {
        match (&e.problem, &e.name) {
            (None, Some(name)) => println!("exit node: {name} (internet traffic goes through it)"),
            (Some(p), _) => println!(
                "exit node {}: not in use, internet traffic is dropped: {p}",
                e.wanted
            ),
            (None, None) => {}
        }
    }
    if let Some(l) = &st.login {
        println!(
            "waiting for a sign-in: to authenticate, visit: {} (code {})",
            l.url, l.user_code
        );
    }
    if let Some(e) = st.login_result.as_ref().and_then(|r| r.error.as_deref()) {
        println!("the last sign-in failed: {e}");
    }
    if st.tunnel_security == wire::TunnelSecurity::ClassicalOnly {
        println!("WARNING: the mesh admin set tunnels to classical-only (no post-quantum keys)");
    }
    if !st.relay_refused.is_empty() {
        println!(
            "refused at the relays: {} node(s) that are not peers sent here through them \
             (`lattice status --json`: relay_refused)",
            st.relay_refused.len()
        );
    }
    if st.peers.is_empty() {
        println!("no peers");
        return;
    }
    println!();
    println!(
        "{:<20} {:<16} {:<8} {:<28} {:<4} {:<12} {:>10} {:>10}",
        "PEER", "IPV4", "ONLINE", "PATH", "PQ", "HANDSHAKE", "RX", "TX"
    );
    for p in &st.peers {
        let v4 = p
            .ips
            .iter()
            .find(|a| a.is_ipv4())
            .map(ToString::to_string)
            .unwrap_or_default();
        let path = match (p.path.kind.as_str(), &p.path.addr, &p.path.relay) {
            ("direct", Some(a), _) => format!("direct {a}"),
            ("relay", _, Some(r)) => format!("relay {r}"),
            _ if p.handshakes == 0 => "idle".to_owned(),
            _ => "none".to_owned(),
        };
        println!(
            "{:<20} {v4:<16} {:<8} {path:<28} {:<4} {:<12} {:>10} {:>10}",
            p.name,
            if p.online { "yes" } else { "no" },
            if p.pq { "yes" } else { "no" },
            ago(p.last_handshake_unix),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        );
    }
    let relayed: Vec<_> = st
        .peers
        .iter()
        .filter(|p| p.path.kind == "relay")
        .filter_map(|p| p.path.reason.as_ref().map(|r| (&p.name, r)))
        .collect();
    if !relayed.is_empty() {
        println!();
        for (name, why) in relayed {
            println!("{name} is relayed: {why}");
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |m| format!("{m:.1} ms"))
}

pub(crate) fn netcheck(n: &NetcheckJson) {
    println!(
        "UDP:            {}",
        if n.udp {
            "yes"
        } else {
            "blocked (relays over WebSocket only)"
        }
    );
    println!(
        "public address: {}",
        n.public_ip
            .map_or_else(|| "unknown".into(), |ip| ip.to_string())
    );
    let mapping = match n.mapping_varies_by_destination {
        Some(true) => "varies by destination (hard NAT: direct paths need port probing)",
        Some(false) => "endpoint-independent (easy NAT)",
        None => "unknown (fewer than two STUN answers)",
    };
    println!("NAT mapping:    {mapping}");
    println!(
        "port mapping:   {}",
        n.port_mapping.map_or_else(
            || "none (no UPnP, NAT-PMP or PCP gateway)".into(),
            |m| m.to_string()
        )
    );
    if let Some(g) = n.gateway {
        let offered: Vec<&str> = [(g.upnp, "UPnP-IGD"), (g.nat_pmp, "NAT-PMP"), (g.pcp, "PCP")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        println!(
            "gateway offers: {}",
            if offered.is_empty() {
                "no port mapping protocol".into()
            } else {
                offered.join(", ")
            }
        );
    }
    println!(
        "advertised:     {}",
        n.local_endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("{:<28} {:<24} {:>10}", "STUN SERVER", "SAW US AT", "RTT");
    for s in &n.stun {
        println!(
            "{:<28} {:<24} {:>10}",
            s.server.to_string(),
            s.mapped
                .map_or_else(|| "no answer".into(), |m| m.to_string()),
            ms(s.rtt_ms)
        );
    }
    println!();
    println!(
        "{:<20} {:<10} {:<10} {:>10}  HOME",
        "RELAY", "CONNECTED", "TRANSPORT", "RTT"
    );
    for r in &n.relays {
        println!(
            "{:<20} {:<10} {:<10} {:>10}  {}",
            r.name,
            if r.connected { "yes" } else { "no" },
            r.transport.as_deref().unwrap_or("-"),
            ms(r.rtt_ms),
            if r.home { "*" } else { "" }
        );
        if let Some(e) = &r.error
            && !r.connected
        {
            println!("    {e}");
        }
    }
}

pub(crate) fn whois(w: &WhoisJson) {
    let ips: Vec<String> = w.ips.iter().map(ToString::to_string).collect();
    println!(
        "name:     {}{}",
        w.fqdn,
        if w.is_self { " (this node)" } else { "" }
    );
    println!("ips:      {}", ips.join(", "));
    println!("owner:    {}", w.user.as_deref().unwrap_or("-"));
    println!(
        "tags:     {}",
        if w.tags.is_empty() {
            "-".into()
        } else {
            w.tags.join(", ")
        }
    );
    println!("os:       {}", w.os);
    println!("node key: {}", w.node_key);
    if !w.routes.is_empty() {
        let routes: Vec<String> = w.routes.iter().map(ToString::to_string).collect();
        println!("routes:   {}", routes.join(", "));
    }
    for (name, values) in &w.capabilities {
        println!(
            "capability {name}: {}",
            serde_json::to_string(values).unwrap_or_default()
        );
    }
}

/// What `status` says about the node's key expiry: a warning from a week before, a plain line
/// before that (so the date is visible), and how to renew (a person's node: sign in again).
pub(crate) fn expiry_notice(expiry: i64, now: i64, person: bool) -> Option<String> {
    const DAY: i64 = 86_400;
    let renew = if person {
        "sign in again with `lattice login`"
    } else {
        "renew it with a fresh --id-token-file token, or `lattice up --auth-key NEW_KEY`"
    };
    let left = expiry - now;
    let span = |s: i64| {
        humantime::format_duration(std::time::Duration::from_secs(
            u64::try_from(s.max(0) / 60 * 60).unwrap_or(0),
        ))
        .to_string()
    };
    Some(if left <= 0 {
        format!(
            "WARNING: this node's key expired {} ago: it has no peers until you {renew}",
            span(-left)
        )
    } else if left <= DAY {
        format!(
            "WARNING: this node's key expires in {} (less than a day): {renew}",
            span(left)
        )
    } else if left <= 7 * DAY {
        format!(
            "WARNING: this node's key expires in {} (less than a week): {renew}",
            span(left)
        )
    } else {
        format!("key expires in {}", span(left))
    })
}

/// One `lattice ping` reply: `pong from db-1 (100.64.0.3) via 198.51.100.12:41641 in 0.4 ms`.
pub(crate) fn ping(p: &crate::io::api::PingJson) {
    let via = match (&p.addr, &p.relay) {
        (Some(a), _) => a.to_string(),
        (None, Some(r)) => format!("relay {r}"),
        (None, None) => p.path.clone(),
    };
    let ip = p.ip.map(|i| format!(" ({i})")).unwrap_or_default();
    println!("pong from {}{ip} via {via} in {:.1} ms", p.peer, p.rtt_ms);
}

#[cfg(test)]
mod tests {
    use super::expiry_notice;

    #[test]
    fn status_warns_a_week_and_a_day_before_the_key_expires_and_says_how_to_renew() {
        let now = 1_800_000_000;
        let day = 86_400;
        let plain = expiry_notice(now + 30 * day, now, false).unwrap();
        assert_eq!(plain, "key expires in 30days");
        let week = expiry_notice(now + 6 * day, now, false).unwrap();
        assert!(
            week.starts_with("WARNING") && week.contains("less than a week"),
            "{week}"
        );
        assert!(
            week.contains("--id-token-file") && week.contains("--auth-key"),
            "{week}"
        );
        let person = expiry_notice(now + 6 * day, now, true).unwrap();
        assert!(person.contains("`lattice login`"), "{person}");
        let today = expiry_notice(now + 3600, now, false).unwrap();
        assert!(
            today.contains("expires in 1h") && today.contains("less than a day"),
            "{today}"
        );
        let gone = expiry_notice(now - 120, now, false).unwrap();
        assert!(
            gone.contains("expired 2m ago") && gone.contains("no peers"),
            "{gone}"
        );
    }
}
