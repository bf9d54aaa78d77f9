//! Issue 11, people signing in through OpenID Connect with the real binaries and a real
//! provider (`oidc-provider-mock`, started in the coordinator's namespace): a device joins by
//! `lattice up` without an auth key and a sign-in in the "browser" (the sign-in page, the
//! provider's login form, the redirect back); a rule on the provider's group lets it reach a
//! server, and one that demands a second factor keeps out a password-only sign-in; a replayed
//! callback is refused; an expired node is cut off and comes back with the same address when
//! its user signs in again; and a user removed from the group loses access at
//! `lattice login`.

use std::path::PathBuf;
use std::time::Duration;

use e2e::lab::wait_for;
use e2e::{Lab, MeshNode, Proc};

use crate::support::{Flat, ipv4_of, text};

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": []},
  "postures": {"posture:mfa": ["user:mfa == true"]},
  "acls": [
    {"action": "accept", "src": ["idp:group:sre"], "dst": ["tag:web:*"], "srcPosture": ["posture:mfa"]},
  ],
  "accessRequests": [{"dst": ["tag:web"], "approvers": ["alice@example.com"], "maxDuration": "1h"}],
}"#;

const ISSUER: &str = "http://127.0.0.1:8445";
const PUBLIC_URL: &str = "http://198.51.100.1:8080";

fn mock() -> Option<PathBuf> {
    let bin = std::env::var_os("LATTICE_OIDC_MOCK").map_or_else(
        || PathBuf::from("/opt/lattice-test/oidc/bin/oidc-provider-mock"),
        PathBuf::from,
    );
    if bin.exists() {
        return Some(bin);
    }
    assert!(
        std::env::var("LATTICE_OIDC_REQUIRED").as_deref() != Ok("1"),
        "LATTICE_OIDC_REQUIRED=1 but {} is missing (scripts/setup installs it)",
        bin.display()
    );
    eprintln!("SKIPPED: no OpenID provider at {}", bin.display());
    None
}

/// The sign-in link a process printed (after `skip` earlier ones), once it has.
fn wait_prompt(lab: &Lab, p: Proc, skip: usize) -> (String, String) {
    let mut found = None;
    let ok = wait_for(Duration::from_secs(30), || {
        // `lattice` prints it on stdout, `lattice-coordinator login` on stderr.
        let out = lab.stdout(p) + &lab.log(p);
        let n = out.matches("To authenticate, visit: ").count();
        if n > skip {
            found = e2e::browser::prompt(&out);
        }
        found.is_some()
    });
    assert!(ok, "no sign-in link:\n{}\n{}", lab.stdout(p), lab.log(p));
    found.unwrap()
}

/// Signs in at `url` as `sub` from the coordinator's namespace (where the provider is);
/// returns the callback URL the provider sent the browser to.
fn sign_in(f: &Flat, url: &str, code: &str, sub: &str) -> String {
    let tool = f.lab.bin("lattice-testtool");
    let out = f
        .lab
        .output(
            &f.coord.ns,
            &[
                tool.to_str().unwrap(),
                "sign-in",
                "--url",
                url,
                "--code",
                code,
                "--sub",
                sub,
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sign-in as {sub} failed: {}",
        text(&out)
    );
    let callback = stdout
        .lines()
        .find_map(|l| l.strip_prefix("callback "))
        .unwrap()
        .to_owned();
    // The authorization code and state are bearer secrets: no daemon may log them.
    for part in callback.split(['?', '&']) {
        if let Some(v) = part
            .strip_prefix("code=")
            .or_else(|| part.strip_prefix("state="))
        {
            f.lab.secret("an OpenID callback parameter", v);
        }
    }
    callback
}

fn http(f: &Flat, method: &str, url: &str, json: Option<&str>) -> String {
    let tool = f.lab.bin("lattice-testtool");
    let mut args = vec![
        tool.to_str().unwrap(),
        "http",
        "--method",
        method,
        "--url",
        url,
    ];
    if let Some(j) = json {
        args.extend(["--json", j]);
    }
    let out = f.lab.output(&f.coord.ns, &args).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sees(f: &Flat, i: usize, peer: &str) -> bool {
    f.nodes[i].status(&f.lab).is_some_and(|s| {
        s["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["name"] == peer))
    })
}

#[test]
fn people_join_by_signing_in_and_the_provider_group_decides_their_access() {
    let Some(bin) = mock() else { return };
    let Some(lab) = crate::support::lab("people") else {
        return;
    };
    let secret_file = lab.dir().join("oidc-client-secret");
    let client_secret = "s3cret-for-the-lattice-client";
    std::fs::write(&secret_file, client_secret).unwrap();
    lab.secret("the OpenID client secret", client_secret);
    let mut f = Flat::new(
        lab,
        3,
        &[
            "--public-url",
            PUBLIC_URL,
            "--oidc-issuer",
            ISSUER,
            "--oidc-client-id",
            "lattice",
            "--oidc-client-secret-file",
            secret_file.to_str().unwrap(),
            "--oidc-allowed-domain",
            "example.com",
            "--oidc-admin",
            "alice@example.com",
            "--admin-listen",
            "198.51.100.1:8443",
        ],
    );
    let coord_ns = f.coord.ns.clone();
    f.lab
        .spawn(
            "oidc-provider",
            &coord_ns,
            &[
                bin.to_str().unwrap(),
                "--host",
                "127.0.0.1",
                "--port",
                "8445",
                "--require-nonce",
                "true",
                "--user-claims",
                r#"{"sub": "alice", "email": "alice@example.com", "name": "Alice",
                    "groups": ["sre"], "amr": ["pwd", "otp"]}"#,
                "--user-claims",
                r#"{"sub": "bob", "email": "bob@example.com", "groups": ["sre"], "amr": ["pwd"]}"#,
            ],
            &[],
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || http(
            &f,
            "GET",
            &format!("{ISSUER}/.well-known/openid-configuration"),
            None
        )
        .starts_with("status 200")),
        "the provider did not start"
    );
    f.set_policy(POLICY);
    let web_key = f.coord.authkey(&f.lab, &["--tag", "tag:web"]).unwrap();
    let web = f.join(0, "web", &web_key, &[]);
    let fingerprint = f
        .lab
        .stdout(f.coord.proc)
        .lines()
        .find_map(|l| l.strip_prefix("control key fingerprint: "))
        .unwrap()
        .trim()
        .to_owned();

    // Alice runs `lattice up` with no auth key: it prints a sign-in link and waits; she signs
    // in with a second factor, and the device joins as hers.
    let url = f.coord.url.clone();
    let ns = f.node_ns[1].clone();
    let laptop = MeshNode::start_with(
        &mut f.lab,
        &ns,
        "laptop",
        &url,
        &["--coordinator-fingerprint", &fingerprint],
    )
    .unwrap();
    f.nodes.push(laptop);
    let laptop = f.nodes.len() - 1;
    let (link, code) = wait_prompt(&f.lab, f.nodes[laptop].proc, 0);
    assert!(
        link.starts_with(&format!("{PUBLIC_URL}/login?code=")),
        "{link}"
    );
    let callback = sign_in(&f, &link, &code, "alice");
    let status = f.nodes[laptop]
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .unwrap();
    assert_eq!(status["self"]["user"], "alice@example.com", "{status}");
    let expiry = status["self"]["key_expiry_unix"].as_i64().unwrap();
    let now = crate::federation::unix_now();
    assert!(
        (expiry - (now + 180 * 86_400)).abs() < 120,
        "a person's node key lasts 180 days by default: {expiry}"
    );
    assert!(
        f.nodes[laptop].ping(&f.lab, "web", "-4", 3),
        "alice cannot reach web"
    );
    let laptop_ip = ipv4_of(&status);

    // The same callback again (a replayed or stolen redirect) is refused.
    let replay = http(&f, "GET", &callback, None);
    assert!(
        replay.starts_with("status 403") && replay.contains("unknown or already used"),
        "{replay}"
    );
    let users = f.coord.admin(&f.lab, &["users", "list", "--json"]).unwrap();
    let users: serde_json::Value = serde_json::from_slice(&users.stdout).unwrap();
    assert_eq!(users[0]["login_name"], "alice@example.com", "{users}");
    assert_eq!(users[0]["groups"], serde_json::json!(["sre"]), "{users}");

    // Bob is in sre too, but signed in with a password only: the rule demands a second
    // factor, so web is out of his reach.
    let ns = f.node_ns[2].clone();
    let desk = MeshNode::start_with(
        &mut f.lab,
        &ns,
        "desk",
        &url,
        &["--coordinator-fingerprint", &fingerprint],
    )
    .unwrap();
    f.nodes.push(desk);
    let desk = f.nodes.len() - 1;
    let (link, code) = wait_prompt(&f.lab, f.nodes[desk].proc, 0);
    sign_in(&f, &link, &code, "bob");
    assert!(
        wait_for(Duration::from_secs(30), || f.nodes[desk]
            .status(&f.lab)
            .is_some_and(|s| s["self"]["user"] == "bob@example.com")),
        "bob's device did not join"
    );
    assert!(!sees(&f, web, "desk"), "web admits a password-only sign-in");
    assert!(!f.nodes[desk].ping(&f.lab, "web", "-4", 2));

    // An admin expires the laptop's key: it is cut off, and shows a new sign-in link.
    let out = f
        .coord
        .admin(&f.lab, &["nodes", "expire", "laptop"])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_for(Duration::from_secs(10), || !sees(&f, web, "laptop")),
        "web still sees the expired laptop"
    );
    let (link, code) = wait_prompt(&f.lab, f.nodes[laptop].proc, 1);
    // Alice signs in again: same node, same address, access back.
    sign_in(&f, &link, &code, "alice");
    assert!(
        wait_for(Duration::from_secs(30), || sees(&f, web, "laptop")),
        "the laptop did not come back after its user signed in:\n{}",
        f.lab.log(f.nodes[laptop].proc)
    );
    assert_eq!(ipv4_of(&f.nodes[laptop].status(&f.lab).unwrap()), laptop_ip);
    assert!(
        wait_for(Duration::from_secs(20), || f.nodes[laptop]
            .ping(&f.lab, "web", "-4", 2)),
        "alice cannot reach web after signing in again"
    );

    // Alice leaves sre at the provider. Her access lasts until she signs in again; then the
    // group is gone and so is web.
    let set = http(
        &f,
        "PUT",
        &format!("{ISSUER}/users/alice"),
        Some(r#"{"email": "alice@example.com", "groups": ["eng"], "amr": ["pwd", "otp"]}"#),
    );
    assert!(set.starts_with("status 204"), "{set}");
    let bin = f.lab.bin("lattice");
    let state = f.nodes[laptop].state_dir.display().to_string();
    let ns = f.node_ns[1].clone();
    let login = f
        .lab
        .spawn(
            "lattice-login",
            &ns,
            &[bin.to_str().unwrap(), "login", "--state-dir", &state],
            &[],
        )
        .unwrap();
    let (link, code) = wait_prompt(&f.lab, login, 0);
    sign_in(&f, &link, &code, "alice");
    assert!(
        f.lab
            .wait_exit(login, Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "lattice login did not finish:\n{}\n{}",
        f.lab.stdout(login),
        f.lab.log(login)
    );
    assert!(
        f.lab
            .stdout(login)
            .contains("signed in as alice@example.com")
    );
    assert!(
        wait_for(Duration::from_secs(10), || !sees(&f, web, "laptop")),
        "web still admits alice after she left sre"
    );
    assert!(!f.nodes[laptop].ping(&f.lab, "web", "-4", 2));

    // Alice is an admin: she signs in to the admin API over the network and acts as herself.
    let pin = f
        .lab
        .stdout(f.coord.proc)
        .lines()
        .find_map(|l| l.split("certificate sha256 ").nth(1))
        .unwrap()
        .trim()
        .to_owned();
    let coord_bin = f.lab.bin("lattice-coordinator");
    let coord_ns = f.coord.ns.clone();
    let admin = f
        .lab
        .spawn(
            "admin-login",
            &coord_ns,
            &[
                coord_bin.to_str().unwrap(),
                "login",
                "--server",
                "https://198.51.100.1:8443",
                "--cert-sha256",
                &pin,
            ],
            &[],
        )
        .unwrap();
    let (link, code) = wait_prompt(&f.lab, admin, 0);
    sign_in(&f, &link, &code, "alice");
    assert!(
        f.lab
            .wait_exit(admin, Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "lattice-coordinator login failed:\n{}",
        f.lab.log(admin)
    );
    let token = f.lab.stdout(admin).trim().to_owned();
    // The token is the command's output (a terminal, for a person): it must appear nowhere
    // else, so its capture goes before the lab looks for it in every log.
    std::fs::write(f.lab.dir().join("admin-login.out"), "").unwrap();
    f.lab.secret("an admin session token", &token);

    // She signs in to the web console the same way: the console shows the link and code,
    // and once she has signed in at the provider its page moves on as her.
    let script: PathBuf = [env!("CARGO_MANIFEST_DIR"), "console", "sso_sign_in.py"]
        .iter()
        .collect();
    let console = f
        .lab
        .spawn(
            "console-sso",
            &coord_ns,
            &["/usr/bin/python3", script.to_str().unwrap()],
            &[("LATTICE_CONSOLE_URL", "https://198.51.100.1:8443")],
        )
        .unwrap();
    let mut prompt = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            prompt = f.lab.stdout(console).lines().find_map(|l| {
                let mut w = l.strip_prefix("link ")?.split(' ');
                Some((w.next()?.to_owned(), w.next()?.to_owned()))
            });
            prompt.is_some()
        }),
        "the console showed no sign-in link:\n{}{}",
        f.lab.stdout(console),
        f.lab.log(console)
    );
    let (link, code) = prompt.unwrap();
    sign_in(&f, &link, &code, "alice");
    assert!(
        f.lab
            .wait_exit(console, Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "the console sign-in failed:\n{}{}",
        f.lab.stdout(console),
        f.lab.log(console)
    );
    assert!(
        f.lab
            .stdout(console)
            .lines()
            .any(|l| l.starts_with("actor user:alice@example.com (session ")),
        "{}",
        f.lab.stdout(console)
    );

    let as_alice = |args: &[&str]| {
        let mut full = vec![coord_bin.to_str().unwrap()];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--server", "https://198.51.100.1:8443", "--token", &token]);
        f.lab.output(&coord_ns, &full).unwrap()
    };

    // Bob asks for web for 20 seconds; alice, the approver the policy names, approves over
    // the network as herself. He reaches web until the grant ends, then not.
    let asked = f.nodes[desk]
        .cli(
            &f.lab,
            &[
                "request-access",
                "--to",
                "tag:web",
                "--ports",
                "*",
                "--for",
                "20s",
                "--reason",
                "incident 42: read the web logs",
                "--json",
            ],
        )
        .unwrap();
    assert!(asked.status.success(), "{}", text(&asked));
    let id = serde_json::from_slice::<serde_json::Value>(&asked.stdout).unwrap()["id"]
        .as_i64()
        .unwrap();
    let refused = f.nodes[desk]
        .cli(
            &f.lab,
            &[
                "request-access",
                "--to",
                "tag:web",
                "--ports",
                "22",
                "--for",
                "2h",
                "--reason",
                "x",
            ],
        )
        .unwrap();
    assert!(
        !refused.status.success() && text(&refused).contains("at most 1h"),
        "{}",
        text(&refused)
    );
    let pending = as_alice(&["access", "list", "--json"]);
    assert!(text(&pending).contains("incident 42"), "{}", text(&pending));
    let approved = as_alice(&["access", "approve", &id.to_string()]);
    assert!(approved.status.success(), "{}", text(&approved));
    let granted_at = crate::federation::unix_now();
    assert!(
        wait_for(Duration::from_secs(15), || f.nodes[desk]
            .ping(&f.lab, "web", "-4", 1)),
        "the approved request did not let bob reach web"
    );
    assert!(
        wait_for(Duration::from_secs(30), || !f.nodes[desk]
            .ping(&f.lab, "web", "-4", 1)),
        "bob still reaches web after the grant ended"
    );
    let ended = crate::federation::unix_now() - granted_at;
    eprintln!("people: the 20 s grant was cut after {ended} s");
    assert!(ended >= 19, "cut after {ended} s, before the grant's end");

    let expired = as_alice(&["nodes", "expire", "desk"]);
    assert!(expired.status.success(), "{}", text(&expired));

    let out = f.coord.admin(&f.lab, &["audit", "verify"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let audit = f.coord.admin(&f.lab, &["audit", "list", "--json"]).unwrap();
    let audit: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let entries = audit.as_array().unwrap();
    let logins = entries
        .iter()
        .filter(|e| e["action"] == "user.login")
        .count();
    assert_eq!(logins, 6, "{audit}");
    assert!(
        entries.iter().any(|e| e["action"] == "user.login"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("admin sign-in (web console)"))),
        "{audit}"
    );
    for action in ["access.request", "access.approve", "access.expire"] {
        assert!(
            entries.iter().any(|e| e["action"] == action),
            "no {action}: {audit}"
        );
    }
    let expire = entries
        .iter()
        .find(|e| e["action"] == "node.expire" && e["target"] == "desk")
        .unwrap();
    assert!(
        expire["actor"]
            .as_str()
            .unwrap()
            .starts_with("user:alice@example.com (session "),
        "{expire}"
    );
}
