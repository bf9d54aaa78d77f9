//! Issue 4: access policy enforced on every node, continuously — ports, ICMP, stricter
//! policies, posture changes and time windows cut live connections; a failing policy changes
//! nothing.

use std::path::PathBuf;
use std::time::Duration;

use e2e::Lab;
use e2e::lab::{Proc, wait_for};
use serde_json::Value;

use crate::support::{Flat, lab, now_ms, text};

/// Writes a policy file into the lab dir and returns its path.
fn policy_file(lab: &Lab, name: &str, text: &str) -> String {
    let p: PathBuf = lab.dir().join(name);
    std::fs::write(&p, text).expect("writing the policy");
    p.display().to_string()
}

/// A mesh of `client` (tag:client) and `server` (tag:server) under `policy`, set at start
/// with `serve --policy`. `client_extra` gives extra `lattice up` flags for the client.
fn client_server(
    tag: &str,
    policy: &str,
    client_extra: impl FnOnce(&Lab) -> Vec<String>,
) -> Option<Flat> {
    let lab = lab(tag)?;
    let path = policy_file(&lab, "start.hujson", policy);
    let extra = client_extra(&lab);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut f = Flat::new(lab, 2, &["--policy", &path]);
    let ck = f
        .coord
        .authkey(&f.lab, &["--tag", "tag:client"])
        .expect("client key");
    let sk = f
        .coord
        .authkey(&f.lab, &["--tag", "tag:server"])
        .expect("server key");
    f.join(0, "client", &ck, &extra);
    f.join(1, "server", &sk, &[]);
    Some(f)
}

fn ipv4_of(f: &Flat, name: &str) -> String {
    crate::support::ipv4_of(&f.node(name).status(&f.lab).expect("status"))
}

fn tool(f: &Flat) -> String {
    f.lab.bin("lattice-testtool").display().to_string()
}

/// Whether a TCP connection from host 0 (client) to `addr` opens within 2 s.
fn tcp_opens(f: &Flat, addr: &str) -> bool {
    let t = tool(f);
    f.lab
        .output(
            &f.node_ns[0],
            &[&t, "tcp-probe", "--to", addr, "--timeout-ms", "2000"],
        )
        .is_ok_and(|o| o.status.success())
}

/// Starts an echo server on the server host and a held connection from the client; waits
/// until it is up.
fn hold_connection(f: &mut Flat, port: u16, seconds: u64) -> (Proc, Proc) {
    let t = tool(f);
    let server_ip = ipv4_of(f, "server");
    let listen = format!("0.0.0.0:{port}");
    let secs = seconds.to_string();
    let echo = f
        .lab
        .spawn(
            &format!("echo-{port}"),
            &f.node_ns[1],
            &[&t, "tcp-echo", "--listen", &listen, "--seconds", &secs],
            &[],
        )
        .expect("echo server");
    std::thread::sleep(Duration::from_millis(300));
    let to = format!("{server_ip}:{port}");
    let hold = f
        .lab
        .spawn(
            &format!("hold-{port}"),
            &f.node_ns[0],
            &[&t, "tcp-hold", "--to", &to, "--seconds", &secs],
            &[],
        )
        .expect("held connection");
    let lab = &f.lab;
    assert!(
        wait_for(Duration::from_secs(10), || lab
            .stdout(hold)
            .contains("connected")),
        "the held connection did not open: {}",
        lab.stdout(hold)
    );
    (echo, hold)
}

/// When the held connection reported being closed (unix ms), waiting up to `timeout`.
fn closed_at(f: &Flat, hold: Proc, timeout: Duration) -> Option<u128> {
    let lab = &f.lab;
    wait_for(timeout, || lab.stdout(hold).contains("closed "));
    lab.stdout(hold)
        .lines()
        .find_map(|l| l.strip_prefix("closed "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
}

const BASE: &str = r#"// issue 4 e2e: the client may use ssh and port 5001 on the server
{
  "tagOwners": {"tag:client": [], "tag:server": []},
  "acls": [
    {"action": "accept", "src": ["tag:client"], "dst": ["tag:server:22,5001"]},
  ],
  "tests": [
    {"src": "tag:client", "accept": ["tag:server:5001"], "deny": ["tag:server:5002"]},
  ],
}
"#;

#[test]
fn ports_and_icmp_follow_the_rules_and_a_stricter_policy_cuts_an_open_connection() {
    let Some(mut f) = client_server("pol-ports", BASE, |_| vec![]) else {
        return;
    };
    // The server may not reach the client, but sees it (the client may reach the server).
    f.node("client")
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .expect("client ready");
    f.node("server")
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .expect("server ready");

    let (_echo, hold) = hold_connection(&mut f, 5001, 60);
    let t = tool(&f);
    let server_ip = ipv4_of(&f, "server");
    let _other = f
        .lab
        .spawn(
            "echo-5002",
            &f.node_ns[1],
            &[
                &t,
                "tcp-echo",
                "--listen",
                "0.0.0.0:5002",
                "--seconds",
                "60",
            ],
            &[],
        )
        .expect("echo 5002");
    std::thread::sleep(Duration::from_millis(300));
    // An allowed port connects; a port no rule names is dropped (the listener is there).
    assert!(
        tcp_opens(&f, &format!("{server_ip}:5001")),
        "5001 is allowed"
    );
    let filtered_before = f.node("server").status(&f.lab).unwrap()["counters"]["in_filtered"]
        .as_u64()
        .unwrap();
    assert!(
        !tcp_opens(&f, &format!("{server_ip}:5002")),
        "5002 is not allowed"
    );
    let filtered_after = f.node("server").status(&f.lab).unwrap()["counters"]["in_filtered"]
        .as_u64()
        .unwrap();
    assert!(
        filtered_after > filtered_before,
        "the server counted the dropped SYNs"
    );
    // ICMP follows the rules: the client may reach the server, not the other way round.
    assert!(
        f.node("client").ping(&f.lab, "server", "-4", 2),
        "client -> server ping"
    );
    assert!(
        f.node("client")
            .ping(&f.lab, "server.mesh.internal", "-6", 2),
        "over IPv6 too"
    );
    assert!(
        !f.node("server").ping(&f.lab, "client", "-4", 2),
        "server -> client ping is denied"
    );

    // `policy diff` of a stricter file shows the lost access; `policy set` of it cuts the
    // open connection on port 5001 within 2 s.
    let stricter = BASE.replace("tag:server:22,5001", "tag:server:22").replace(
        r#""accept": ["tag:server:5001"], "deny""#,
        r#""accept": ["tag:server:22"], "deny""#,
    );
    let strict_path = policy_file(&f.lab, "strict.hujson", &stricter);
    let diff = f
        .coord
        .admin(&f.lab, &["policy", "diff", &strict_path])
        .expect("diff");
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    assert!(
        diff_text.contains("- client -> server: tcp 5001"),
        "{diff_text}"
    );
    assert!(!diff_text.contains("+ "), "{diff_text}");
    let t0 = now_ms();
    let set = f
        .coord
        .admin(&f.lab, &["policy", "set", &strict_path])
        .expect("policy set");
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let closed = closed_at(&f, hold, Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "the connection was not cut: {}\n{}",
            f.lab.stdout(hold),
            f.lab.log(f.node("server").proc)
        )
    });
    let took = closed.saturating_sub(t0);
    eprintln!("stricter policy: open connection cut {took} ms after `policy set` started");
    assert!(took < 2000, "cut after {took} ms");
    assert!(
        !tcp_opens(&f, &format!("{server_ip}:5001")),
        "5001 is no longer allowed"
    );
    let st = f.node("server").status(&f.lab).unwrap();
    assert!(
        st["counters"]["flows_cut"].as_u64().unwrap() >= 1,
        "{}",
        st["counters"]
    );

    // A file whose test fails is refused with file:line:col, and nothing changes.
    let failing = stricter.replace(
        r#""deny": ["tag:server:5002"]"#,
        r#""deny": ["tag:server:22"]"#,
    );
    let bad_path = policy_file(&f.lab, "failing.hujson", &failing);
    let out = f
        .coord
        .admin(&f.lab, &["policy", "set", &bad_path])
        .expect("policy set");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failing test must reject the file");
    assert!(err.contains("failing.hujson:8:"), "{err}");
    assert!(
        err.contains("should be denied, but the rule at ")
            && err.contains("failing.hujson:5:5 accepts it"),
        "{err}"
    );
    let got = f
        .coord
        .admin(&f.lab, &["policy", "get"])
        .expect("policy get");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        stricter,
        "the policy in force is unchanged"
    );
    let versions = f
        .coord
        .admin(&f.lab, &["policy", "versions", "--json"])
        .expect("versions");
    let versions: Vec<Value> = serde_json::from_slice(&versions.stdout).expect("json");
    assert_eq!(
        versions.len(),
        2,
        "start file and stricter file: {versions:?}"
    );
    // Both changes are in the audit log with who made them.
    let audit = f
        .coord
        .admin(&f.lab, &["audit", "list", "--json"])
        .expect("audit");
    let entries: Vec<Value> = serde_json::from_slice(&audit.stdout).expect("json");
    let sets: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "policy.set")
        .collect();
    assert_eq!(sets.len(), 2);
    assert!(
        sets.iter()
            .all(|e| e["actor"].as_str().unwrap().starts_with("local:uid="))
    );
}

#[test]
fn a_failing_posture_fact_revokes_access_within_five_seconds() {
    const POSTURE: &str = r#"{
  "tagOwners": {"tag:client": [], "tag:server": []},
  "postures": {"posture:edr": ["fact:edr == 'running'", "node:os == 'linux'"]},
  "acls": [
    {"action": "accept", "src": ["tag:client"], "dst": ["tag:server:5001"], "srcPosture": ["posture:edr"]},
  ],
  "tests": [
    {"src": "tag:client", "srcAttrs": {"fact:edr": "running", "node:os": "linux"}, "accept": ["tag:server:5001"]},
    {"src": "tag:client", "srcAttrs": {"fact:edr": "stopped", "node:os": "linux"}, "deny": ["tag:server:5001"]},
  ],
}
"#;
    // The client's posture command reads a file the test flips.
    let mut fact_file = PathBuf::new();
    let Some(mut f) = client_server("pol-posture", POSTURE, |lab| {
        fact_file = lab.dir().join("edr");
        std::fs::write(&fact_file, "edr=running\n").unwrap();
        let cmd = format!("cat {}", fact_file.display());
        vec![
            "--posture-command".into(),
            cmd,
            "--posture-interval".into(),
            "1s".into(),
        ]
    }) else {
        return;
    };
    let server = f.node("server");
    assert!(
        wait_for(Duration::from_secs(30), || server
            .status(&f.lab)
            .is_some_and(|s| s["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 1))),
        "the server never saw the client (posture not reported?)"
    );
    let (_echo, hold) = hold_connection(&mut f, 5001, 60);
    let t0 = now_ms();
    std::fs::write(&fact_file, "edr=stopped\n").unwrap();
    let closed = closed_at(&f, hold, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("access was not revoked: {}", f.lab.stdout(hold)));
    let took = closed.saturating_sub(t0);
    eprintln!("posture change: connection cut {took} ms after the fact flipped");
    assert!(took < 5000, "cut after {took} ms");
    let server_ip = ipv4_of(&f, "server");
    assert!(!tcp_opens(&f, &format!("{server_ip}:5001")));
    // The coordinator shows what the node reported.
    let nodes = f.coord.nodes(&f.lab).expect("nodes");
    let client = nodes.iter().find(|n| n["name"] == "client").unwrap();
    assert_eq!(client["posture"]["fact:edr"], "stopped", "{client}");
    assert_eq!(client["posture"]["node:os"], "linux", "{client}");
    assert!(
        client["posture"]["node:kernelVersion"].is_string(),
        "{client}"
    );
    // Flipping it back restores access.
    std::fs::write(&fact_file, "edr=running\n").unwrap();
    assert!(wait_for(Duration::from_secs(10), || tcp_opens(
        &f,
        &format!("{server_ip}:5001")
    )));
}

#[test]
fn a_closing_time_window_cuts_access_when_it_ends() {
    // Access for 12 s from now (just-in-time), then none.
    let expires_unix = (now_ms() / 1000) as i64 + 12;
    let expires = rfc3339(expires_unix);
    let policy = format!(
        r#"{{
  "tagOwners": {{"tag:client": [], "tag:server": []}},
  "acls": [
    {{"action": "accept", "src": ["tag:client"], "dst": ["tag:server:5001"], "expires": "{expires}"}},
  ],
}}
"#
    );
    let Some(mut f) = client_server("pol-time", &policy, |_| vec![]) else {
        return;
    };
    f.node("client")
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .expect("client ready");
    let (_echo, hold) = hold_connection(&mut f, 5001, 60);
    let closed = closed_at(&f, hold, Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "the window closed but the connection lives: {}",
            f.lab.stdout(hold)
        )
    });
    let late = closed as i128 - i128::from(expires_unix) * 1000;
    eprintln!("time window: connection cut {late} ms after the rule expired");
    assert!(late >= 0, "cut {late} ms before the rule expired");
    assert!(late < 1500, "cut {late} ms after the rule expired");
    let server_ip = ipv4_of(&f, "server");
    assert!(!tcp_opens(&f, &format!("{server_ip}:5001")));
}

/// Unix seconds -> `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[test]
fn rfc3339_formatting_is_right() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(1_795_435_200), "2026-11-23T12:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
}

#[test]
fn node_attributes_reach_their_nodes_and_a_random_port_takes_effect_at_the_next_start() {
    const ATTRS: &str = r#"{
  "tagOwners": {"tag:client": [], "tag:server": []},
  "acls": [{"action": "accept", "src": ["tag:client", "tag:server"], "dst": ["tag:client:*", "tag:server:*"]}],
  "nodeAttrs": [
    {"target": ["tag:client"], "attr": ["randomize-client-port", "nextdns:abc123"]},
  ],
}
"#;
    let Some(mut f) = client_server("pol-attrs", ATTRS, |_| Vec::new()) else {
        return;
    };
    for n in &f.nodes {
        n.wait_ready(&f.lab, 1, Duration::from_secs(30)).unwrap();
    }
    let port_of = |s: &Value| -> Vec<u64> {
        s["self"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.as_str()?.rsplit_once(':')?.1.parse().ok())
            .collect()
    };
    // The attributes arrive; the server gets none.
    let client = f.node("client").status(&f.lab).unwrap();
    assert_eq!(
        client["self"]["attrs"],
        serde_json::json!({"nextdns:abc123": [], "randomize-client-port": []}),
        "{client}"
    );
    assert_eq!(
        f.node("server").status(&f.lab).unwrap()["self"]["attrs"],
        serde_json::json!({})
    );
    assert!(port_of(&client).iter().all(|p| *p == 41641), "{client}");
    // `policy set` (and `check`) say which attribute Lattice does not act on.
    let path = policy_file(&f.lab, "attrs.hujson", ATTRS);
    let out = f.coord.admin(&f.lab, &["policy", "set", &path]).unwrap();
    let said = text(&out);
    assert!(
        said.contains("nodeAttrs \"nextdns:abc123\" is kept"),
        "{said}"
    );
    assert!(!said.contains("\"randomize-client-port\""), "{said}");

    // At its next start the client binds a random port, and the mesh works over it.
    let proc = f.node("client").proc;
    assert!(f.lab.stop(proc, Duration::from_secs(10)).is_some());
    let i = f.nodes.iter().position(|n| n.hostname == "client").unwrap();
    f.nodes[i].restart(&mut f.lab).unwrap();
    let client = f.nodes[i]
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .unwrap();
    let ports = port_of(&client);
    assert!(
        !ports.is_empty() && ports.iter().all(|p| *p != 41641),
        "{client}"
    );
    assert!(f.nodes[i].ping(&f.lab, "server", "-4", 2));
}
