//! Issue 11, workload identity federation with the real binaries: a workload joins with a
//! token from an outside issuer (no auth key), gets the rule's tag, reaches a peer, keeps its
//! access past the first token's end when the file is refreshed in time, is cut off when a
//! token ends unrenewed, and comes back with the same identity and addresses once its token
//! file holds a fresh one.

use std::time::{Duration, Instant};

use e2e::MeshNode;
use e2e::issuer::{IssuerKey, publish};
use e2e::lab::wait_for;
use serde_json::json;

use crate::support::{Flat, ipv4_of};

const POLICY: &str = r#"{
  "tagOwners": {"tag:ci": [], "tag:web": []},
  "acls": [{"action": "accept", "src": ["tag:ci", "tag:web"], "dst": ["tag:ci:*", "tag:web:*"]}],
}"#;

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn a_workload_joins_with_a_token_is_cut_off_when_it_ends_and_returns_with_a_fresh_one() {
    let Some(lab) = crate::support::lab("federation") else {
        return;
    };
    let mut f = Flat::new(lab, 2, &[]);
    f.set_policy(POLICY);

    // The issuer runs beside the coordinator, on its loopback.
    let key = IssuerKey::new("k1").unwrap();
    let jwks = f.lab.dir().join("jwks.json");
    publish(&jwks, &[&key]).unwrap();
    let issuer = "http://127.0.0.1:8444";
    let tool = f.lab.bin("lattice-testtool");
    let coord_ns = f.coord.ns.clone();
    f.lab
        .spawn(
            "issuer",
            &coord_ns,
            &[
                tool.to_str().unwrap(),
                "issuer",
                "--listen",
                "127.0.0.1:8444",
                "--jwks",
                jwks.to_str().unwrap(),
                "--seconds",
                "300",
            ],
            &[],
        )
        .unwrap();
    let out = f
        .coord
        .admin(
            &f.lab,
            &[
                "federation",
                "add",
                "--issuer",
                issuer,
                "--audience",
                "lattice",
                "--match",
                "sub=system:serviceaccount:ci:*",
                "--tag",
                "tag:ci",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let web_key = f.coord.authkey(&f.lab, &["--tag", "tag:web"]).unwrap();
    let web = f.join(0, "web", &web_key, &[]);
    // The auth key carries the coordinator's fingerprint; a workload is given it directly.
    let fingerprint = {
        let k: wire::AuthKey = web_key.parse().unwrap();
        let mut s = String::new();
        wire::keys::push_hex(&mut s, k.fingerprint());
        s
    };

    let token = |ttl: i64| {
        let now = unix_now();
        key.sign(&json!({"iss": issuer, "aud": "lattice",
            "sub": "system:serviceaccount:ci:builder", "iat": now, "exp": now + ttl}))
            .unwrap()
    };
    let first = token(25);
    let first_exp = unix_now() + 25;
    f.lab.secret("an id token", &first);
    let token_file = f.lab.dir().join("token");
    std::fs::write(&token_file, &first).unwrap();
    let url = f.coord.url.clone();
    let job_ns = f.node_ns[1].clone();
    let job = MeshNode::start_with(
        &mut f.lab,
        &job_ns,
        "job",
        &url,
        &[
            "--id-token-file",
            token_file.to_str().unwrap(),
            "--coordinator-fingerprint",
            &fingerprint,
            "--id-token-refresh",
            "1s",
        ],
    )
    .unwrap();
    f.nodes.push(job);
    let job = f.nodes.len() - 1;
    f.nodes[job]
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .unwrap();
    assert!(
        f.nodes[job].ping(&f.lab, "web", "-4", 3),
        "job cannot reach web"
    );
    let nodes = f.coord.nodes(&f.lab).unwrap();
    let j = nodes.iter().find(|n| n["name"] == "job").unwrap();
    assert_eq!(j["tags"], json!(["tag:ci"]), "{j}");
    assert_eq!(j["ephemeral"], true, "{j}");
    let status = f.nodes[job].status(&f.lab).unwrap();
    let job_ip = ipv4_of(&status);
    // The node knows when its access ends (`lattice status` warns before it does).
    let expiry = status["self"]["key_expiry_unix"]
        .as_i64()
        .unwrap_or_default();
    assert!((expiry - first_exp).abs() <= 2, "{}", status["self"]);

    let web_sees_job = |f: &Flat| {
        f.nodes[web].status(&f.lab).is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x["name"] == "job"))
        })
    };

    // A fresh token written to the file while the session runs renews access: the first
    // token's end passes without a cut.
    let second = token(35);
    let second_exp = unix_now() + 35;
    f.lab.secret("an id token", &second);
    std::fs::write(&token_file, &second).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || f.nodes[job]
            .status(&f.lab)
            .is_some_and(|s| s["self"]["key_expiry_unix"].as_i64()
                == Some(second_exp)
                || s["self"]["key_expiry_unix"].as_i64()
                    == Some(second_exp - 1))),
        "the fresh token did not renew the node"
    );
    while unix_now() < first_exp + 3 {
        assert!(
            web_sees_job(&f),
            "job was cut off although its token was renewed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        f.nodes[job].ping(&f.lab, "web", "-4", 2),
        "job lost web after renewal"
    );

    // When the token ends, so does the workload's access.
    assert!(
        wait_for(Duration::from_secs(45), || !web_sees_job(&f)),
        "web still sees job after its token ended"
    );
    let cut = unix_now();
    assert!(
        cut >= second_exp - 1,
        "cut off at {cut}, before the token ended at {second_exp}"
    );
    eprintln!(
        "federation: cut off {} s after the token's end",
        cut - second_exp
    );
    assert!(!f.nodes[web].ping(&f.lab, &job_ip, "-4", 2));

    // A fresh token in the file brings it back, same node, same address.
    let fresh = token(300);
    f.lab.secret("an id token", &fresh);
    std::fs::write(&token_file, &fresh).unwrap();
    let t0 = Instant::now();
    assert!(
        wait_for(Duration::from_secs(60), || web_sees_job(&f)),
        "the workload did not come back with a fresh token:\n{}",
        f.lab.log(f.nodes[job].proc)
    );
    eprintln!("federation: back {:?} after the fresh token", t0.elapsed());
    assert_eq!(ipv4_of(&f.nodes[job].status(&f.lab).unwrap()), job_ip);
    assert!(
        wait_for(Duration::from_secs(20), || f.nodes[job]
            .ping(&f.lab, "web", "-4", 2)),
        "job cannot reach web again"
    );
    let out = f.coord.admin(&f.lab, &["audit", "verify"]).unwrap();
    assert!(out.status.success(), "{out:?}");
}
