//! Shared setup for the e2e tests.

use std::time::Duration;

use e2e::{Coordinator, Lab, MeshNode};

/// A lab, or `None` (test skipped) when namespaces are unavailable and not required.
pub(crate) fn lab(tag: &str) -> Option<Lab> {
    if let Err(why) = Lab::available() {
        if std::env::var_os("LATTICE_E2E_REQUIRED").is_some() {
            panic!("e2e tests are required but cannot run: {why}");
        }
        eprintln!("SKIPPED {tag}: {why}");
        return None;
    }
    let mut lab = Lab::new(tag).expect("creating a lab");
    // Every e2e test also checks that no key, token or PSK it used reached a daemon's log.
    lab.scan_for_secrets();
    Some(lab)
}

/// Whether every tool in `tools` is on the PATH. A missing one skips the test (`false`,
/// with a SKIPPED line naming it and `why` it is needed), or fails it when
/// `LATTICE_E2E_REQUIRED` is set.
pub(crate) fn tools(tag: &str, tools: &[&str], why: &str) -> bool {
    let missing = tools.iter().find(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map_or(true, |o| !o.status.success())
    });
    let Some(missing) = missing else {
        return true;
    };
    if std::env::var_os("LATTICE_E2E_REQUIRED").is_some() {
        panic!("{tag}: {missing} is required ({why}; scripts/setup installs it)");
    }
    eprintln!("SKIPPED {tag}: no {missing}");
    false
}

/// A flat LAN (198.51.100.0/24) with the coordinator on the bridge namespace (.1) and one
/// namespace per node (.11, .12, ...).
pub(crate) struct Flat {
    pub(crate) lab: Lab,
    /// The LAN's namespace (its bridge).
    pub(crate) lan: String,
    pub(crate) coord: Coordinator,
    pub(crate) nodes: Vec<MeshNode>,
    pub(crate) node_ns: Vec<String>,
}

impl Flat {
    /// Builds the LAN and starts the coordinator; nodes are added with [`Flat::join`].
    pub(crate) fn new(mut lab: Lab, hosts: usize, coord_extra: &[&str]) -> Self {
        let lan = lab.lan("lan", "198.51.100.1/24").expect("lan");
        let coord =
            Coordinator::start(&mut lab, &lan, "198.51.100.1", coord_extra).expect("coordinator");
        let mut node_ns = Vec::new();
        for i in 0..hosts {
            let ns = lab.ns(&format!("h{i}")).expect("namespace");
            lab.attach(
                &lan,
                &ns,
                "eth0",
                &format!("198.51.100.{}/24", 11 + i),
                None,
            )
            .expect("link");
            node_ns.push(ns);
        }
        Self {
            lab,
            lan,
            coord,
            nodes: Vec::new(),
            node_ns,
        }
    }

    /// Starts `lattice up` for host `i` with `name` and `key`.
    pub(crate) fn join(&mut self, i: usize, name: &str, key: &str, extra: &[&str]) -> usize {
        let url = self.coord.url.clone();
        let n =
            MeshNode::start(&mut self.lab, &self.node_ns[i], name, &url, key, extra).expect("node");
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// A flat mesh with every host joined under the given names with one reusable key.
    pub(crate) fn mesh(tag: &str, names: &[&str], coord_extra: &[&str]) -> Option<Self> {
        Self::mesh_with(tag, names, coord_extra, &[])
    }

    /// [`Flat::mesh`] with extra `lattice up` flags for every node.
    pub(crate) fn mesh_with(
        tag: &str,
        names: &[&str],
        coord_extra: &[&str],
        node_extra: &[&str],
    ) -> Option<Self> {
        let nodes: Vec<(&str, &[&str])> = names.iter().map(|n| (*n, node_extra)).collect();
        Self::mesh_each(tag, &nodes, coord_extra)
    }

    /// [`Flat::mesh`] with each node's own extra `lattice up` flags.
    pub(crate) fn mesh_each(
        tag: &str,
        nodes: &[(&str, &[&str])],
        coord_extra: &[&str],
    ) -> Option<Self> {
        let lab = lab(tag)?;
        let mut f = Self::new(lab, nodes.len(), coord_extra);
        let key = f.coord.authkey(&f.lab, &["--reusable"]).expect("auth key");
        for (i, (name, extra)) in nodes.iter().enumerate() {
            f.join(i, name, &key, extra);
        }
        for n in &f.nodes {
            n.wait_ready(&f.lab, nodes.len() - 1, Duration::from_secs(30))
                .expect("ready");
        }
        Some(f)
    }

    /// Writes `hujson` to `policy.hujson` in the lab and puts it in force with `policy set`.
    pub(crate) fn set_policy(&self, hujson: &str) {
        let policy = self.lab.dir().join("policy.hujson");
        std::fs::write(&policy, hujson).expect("writing the policy");
        let out = self
            .coord
            .admin(
                &self.lab,
                &["policy", "set", policy.to_str().expect("a path")],
            )
            .expect("policy set");
        assert!(out.status.success(), "policy set: {}", text(&out));
    }

    /// The node named `name`.
    pub(crate) fn node(&self, name: &str) -> &MeshNode {
        self.nodes
            .iter()
            .find(|n| n.hostname == name)
            .expect("known node")
    }
}

/// Unix time in milliseconds.
/// A command's stdout and stderr, for assertion messages.
pub(crate) fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// A node's overlay IPv4 address, from its `lattice status --json`.
pub(crate) fn ipv4_of(status: &serde_json::Value) -> String {
    status["self"]["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(serde_json::Value::as_str)
        .find(|ip| ip.contains('.'))
        .expect("an IPv4 address")
        .to_owned()
}

/// The first relay the coordinator lists: (WebSocket URL, certificate pin, key).
pub(crate) fn first_relay(lab: &Lab, coord: &Coordinator) -> (String, String, String) {
    let relays: serde_json::Value = serde_json::from_slice(
        &coord
            .admin(lab, &["relays", "list", "--json"])
            .expect("relays list")
            .stdout,
    )
    .expect("relays list --json");
    let field = |k: &str| relays[0][k].as_str().expect(k).to_owned();
    (field("websocket"), field("cert_sha256"), field("key"))
}

/// Connects to a relay's WebSocket from `ns` as the node with private key `secret` (hex),
/// holding a ticket signed with the ticket-key `seed` (hex), like a node would; returns
/// `accepted` or `rejected: <why>`.
pub(crate) fn relay_probe(
    lab: &Lab,
    ns: &str,
    relay: &(String, String, String),
    secret: &str,
    seed: &str,
) -> String {
    let tool = lab.bin("lattice-testtool").display().to_string();
    let (ws, pin, key) = relay;
    let out = lab
        .output(
            ns,
            &[
                &tool,
                "relay-probe",
                "--websocket",
                ws,
                "--cert-sha256",
                pin,
                "--relay-key",
                key,
                "--node-secret",
                secret,
                "--ticket-seed",
                seed.trim(),
            ],
        )
        .expect("relay-probe");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
