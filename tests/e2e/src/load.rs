//! `lattice-lab load`: many simulated nodes against real coordinators, and how long changes
//! take to reach them.
//!
//! Each simulated node speaks the real control protocol over loopback: a WebSocket, the hybrid
//! Noise + ML-KEM handshake, a hello with a node-key proof, then the netmap stream, whose full
//! maps and deltas it applies like a node would. There is no TUN and no data plane. The nodes
//! are split into teams by tag (each team reaches itself; `--team-size 0` puts everyone in one
//! team) and the run measures, against an oracle compiled from the same policy file:
//!
//! - registering and connecting all N;
//! - a policy change (every team also reaches the next one) reaching every node it changes;
//! - a node removal reaching every node that saw it;
//! - a new node's arrival reaching every node that should see it;
//! - after a restart of the coordinator (or killing one of R replicas), how long until every
//!   node is connected again and up to date.
//!
//! After each step every node must hold exactly the peers and rules the oracle computes, or
//! the run fails. Timings are printed; nothing asserts them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hybrid::{InitiatorHandshake, Psk, Purpose, StaticKeypair};
use policy::{Inventory, InventoryNode, Policy};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use wire::filter::FilterRule;
use wire::netmap::MapResponse;
use wire::{
    AttrValue, CapabilityVersion, ClientMessage, ControlKey, ErrorCode, Hello, NodeId, NodeKey,
    ServerMessage,
};

/// What `lattice-lab load` was asked to do.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Simulated nodes.
    pub nodes: usize,
    /// Coordinator replicas to start (own coordinators only).
    pub replicas: usize,
    /// `sqlite` or a PostgreSQL server URL (a fresh database is made on it and dropped after).
    pub db: String,
    /// Coordinators someone else started (instead of starting our own).
    pub coordinators: Vec<String>,
    /// Admin access to those: their state dir...
    pub state_dir: Option<PathBuf>,
    /// ...or an admin API URL and token.
    pub server: Option<(String, String)>,
    /// Nodes per team (0: one team).
    pub team_size: usize,
    /// Registrations in flight at once.
    pub concurrency: usize,
    /// How long any one step may take before the run fails.
    pub step_timeout: Duration,
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Spread {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
    /// How many nodes were affected.
    pub n: usize,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
            n: v.len(),
        }
    }
}

/// The figures of one run (`--json` prints this object).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Simulated nodes.
    pub nodes: usize,
    /// Coordinator replicas.
    pub replicas: usize,
    /// `sqlite`, `postgres` or `external`.
    pub db: String,
    /// Seconds to register and connect every node (and hand each its first full map).
    pub connect_s: f64,
    /// CPU seconds the coordinators used over the run (own coordinators only).
    pub coordinator_cpu_s: Option<f64>,
    /// Peak resident memory of the largest coordinator, MB (own coordinators only).
    pub coordinator_rss_mb: Option<f64>,
    /// A policy change reaching every node it changes.
    pub policy_change_ms: Spread,
    /// CPU seconds the coordinators spent from `policy set` until every node had the change
    /// (own coordinators only).
    pub policy_change_cpu_s: Option<f64>,
    /// A removal reaching every node that saw the removed one.
    pub removal_ms: Spread,
    /// A new node reaching every node that should see it.
    pub arrival_ms: Spread,
    /// Seconds until every node was connected and up to date again after the restart (or
    /// the loss of a replica); `None` with external coordinators.
    pub reconnect_s: Option<f64>,
    /// Netmap messages the simulated nodes received.
    pub maps_received: u64,
    /// Control sessions that ended (and were resumed) before the restart step: 0 when every
    /// node kept its first session through registration and the changes.
    pub dropped_sessions: u64,
}

// ---------------------------------------------------------------------------------------------
// Coordinators.

struct OwnReplica {
    dir: PathBuf,
    url: String,
    listen: SocketAddr,
    child: Option<Child>,
    /// CPU seconds and peak RSS of processes of this replica that already exited.
    spent: (f64, f64),
}

struct Coordinators {
    urls: Vec<String>,
    own: Vec<OwnReplica>,
    /// Admin access: (state dir) or (server, token).
    admin_dir: Option<PathBuf>,
    admin_server: Option<(String, String)>,
    db_url: Option<String>,
    pg_cleanup: Option<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = crate::lab::bin_dir()?.join(name);
    if !p.exists() {
        bail!("{} not found (build the workspace's binaries)", p.display());
    }
    Ok(p)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds and peak RSS (MB) of a live process.
fn usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the command name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks / hz.max(1.0), hwm_kb / 1024.0))
}

impl Coordinators {
    async fn start(cfg: &LoadConfig) -> anyhow::Result<Self> {
        if !cfg.coordinators.is_empty() {
            if cfg.state_dir.is_none() && cfg.server.is_none() {
                bail!(
                    "with --coordinator, give admin access: --state-dir DIR or --server URL --token T"
                );
            }
            return Ok(Self {
                urls: cfg.coordinators.clone(),
                own: Vec::new(),
                admin_dir: cfg.state_dir.clone(),
                admin_server: cfg.server.clone(),
                db_url: None,
                pg_cleanup: None,
                _tmp: None,
            });
        }
        let tmp = tempfile::Builder::new().prefix("lattice-load.").tempdir()?;
        let (db_url, pg_cleanup) = if cfg.db == "sqlite" {
            if cfg.replicas > 1 {
                bail!("several replicas need a shared database: --db postgres://...");
            }
            (None, None)
        } else if cfg.db.starts_with("postgres://") || cfg.db.starts_with("postgresql://") {
            let name = format!("lattice_load_{:016x}", rand::random::<u64>());
            let url = coordinator::db::create_postgres_database(&cfg.db, &name)
                .await
                .context("creating a database for the run")?;
            (Some(url), Some((cfg.db.clone(), name)))
        } else {
            bail!("--db takes sqlite or postgres://...");
        };
        let mut c = Self {
            urls: Vec::new(),
            own: Vec::new(),
            admin_dir: None,
            admin_server: None,
            db_url,
            pg_cleanup,
            _tmp: None,
        };
        for i in 0..cfg.replicas.max(1) {
            let dir = tmp.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            if i > 0 {
                // Replicas share the mesh's keys.
                for f in ["control.key", "ticket.key", "audit.key"] {
                    std::fs::copy(c.own[0].dir.join(f), dir.join(f))
                        .with_context(|| format!("copying {f} to replica {i}"))?;
                }
            }
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            let mut r = OwnReplica {
                dir,
                url: format!("http://{listen}"),
                listen,
                child: None,
                spent: (0.0, 0.0),
            };
            r.child = Some(c.spawn(&r).await?);
            c.urls.push(r.url.clone());
            c.own.push(r);
        }
        c.admin_dir = Some(c.own[0].dir.clone());
        if std::env::var("LATTICE_KEEP_LOGS").as_deref() == Ok("1") {
            eprintln!("load: coordinator logs kept in {}", tmp.keep().display());
        } else {
            c._tmp = Some(tmp);
        }
        Ok(c)
    }

    async fn spawn(&self, r: &OwnReplica) -> anyhow::Result<Child> {
        let mut cmd = Command::new(bin("lattice-coordinator")?);
        cmd.args(["serve", "--no-embedded-relay", "--listen"])
            .arg(r.listen.to_string())
            .arg("--state-dir")
            .arg(&r.dir)
            .args(["--public-url", &r.url])
            .env(
                "LATTICE_LOG",
                std::env::var("LATTICE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(r.dir.join("serve.out"))?)
            .stderr(std::fs::File::create(r.dir.join("serve.log"))?);
        if let Some(db) = &self.db_url {
            cmd.args(["--db", db]);
        }
        // The coordinators die with the run, however it ends. (The signal follows the
        // spawning thread: a runtime worker, alive as long as the run.)
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting lattice-coordinator")?;
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(r.listen).await.is_ok() {
                return Ok(child);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the coordinator at {} did not start:\n{}",
                    r.url,
                    std::fs::read_to_string(r.dir.join("serve.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs an admin command; returns its stdout.
    fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(bin("lattice-coordinator")?);
        cmd.args(args);
        let live_dir = self
            .own
            .iter()
            .find(|r| r.child.is_some())
            .map(|r| r.dir.clone())
            .or_else(|| self.admin_dir.clone());
        match (&live_dir, &self.admin_server) {
            (Some(d), _) => {
                cmd.arg("--state-dir").arg(d);
            }
            (None, Some((server, token))) => {
                cmd.args(["--server", server, "--token", token]);
            }
            (None, None) => bail!("no admin access"),
        }
        let out = cmd.output().context("running lattice-coordinator")?;
        if !out.status.success() {
            bail!(
                "lattice-coordinator {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CPU seconds used and the largest peak RSS, over every process of every own replica.
    fn usage(&self) -> Option<(f64, f64)> {
        if self.own.is_empty() {
            return None;
        }
        let mut cpu = 0.0;
        let mut rss: f64 = 0.0;
        for r in &self.own {
            cpu += r.spent.0;
            rss = rss.max(r.spent.1);
            if let Some(c) = &r.child
                && let Some((c, m)) = usage(c.id())
            {
                cpu += c;
                rss = rss.max(m);
            }
        }
        Some((cpu, rss))
    }

    /// Kills replica `i` hard, keeping what it used.
    fn kill(&mut self, i: usize) {
        let r = &mut self.own[i];
        if let Some(mut c) = r.child.take() {
            if let Some((cpu, rss)) = usage(c.id()) {
                r.spent.0 += cpu;
                r.spent.1 = r.spent.1.max(rss);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.spawn(&self.own[i]).await?;
        self.own[i].child = Some(child);
        Ok(())
    }

    async fn shutdown(&mut self) {
        for i in 0..self.own.len() {
            self.kill(i);
        }
        if let Some((server, name)) = self.pg_cleanup.take()
            && let Err(e) = coordinator::db::drop_postgres_database(&server, &name).await
        {
            eprintln!("load: could not drop the run's database {name}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated nodes.

/// What one simulated node currently holds.
#[derive(Default)]
struct SimState {
    id: Option<NodeId>,
    name: String,
    addresses: Vec<std::net::IpAddr>,
    tags: Vec<String>,
    connected: bool,
    /// The coordinator of the current (or last) session.
    url: String,
    /// When the last session's first (full) map arrived.
    synced_at: Option<Instant>,
    peers: BTreeMap<NodeId, wire::netmap::Node>,
    rules: Vec<FilterRule>,
    /// Set when the coordinator refused it for good.
    refused: Option<(ErrorCode, String)>,
    /// The first time the current watch held.
    hit: Option<(u64, Instant)>,
    maps: u64,
    /// Control sessions that completed their handshake.
    sessions: u64,
}

/// What the run is waiting for; each node records when it first holds for it.
#[derive(Clone)]
enum Watch {
    None,
    /// Exactly these peers and rules (by node).
    Exact(Arc<HashMap<NodeId, Expect>>),
    /// This node no longer among the peers.
    Gone(NodeId),
    /// A peer with this name present.
    Seen(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Expect {
    peers: BTreeSet<NodeId>,
    rules: Vec<FilterRule>,
}

struct Shared {
    watch: Mutex<(u64, Watch)>,
    urls: Mutex<Vec<String>>,
    control_key: ControlKey,
}

struct Sim {
    idx: usize,
    hostname: String,
    machine: StaticKeypair,
    node: StaticKeypair,
    auth: String,
    src: Ipv4Addr,
    state: Mutex<SimState>,
}

impl Sim {
    fn check(&self, st: &mut SimState, shared: &Shared) {
        let (epoch, watch) = shared
            .watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if st.hit.is_some_and(|(e, _)| e == epoch) {
            return;
        }
        let holds = match &watch {
            Watch::None => false,
            Watch::Exact(all) => st.id.and_then(|id| all.get(&id)).is_some_and(|e| {
                st.peers.len() == e.peers.len()
                    && st.peers.keys().all(|k| e.peers.contains(k))
                    && st.rules == e.rules
            }),
            Watch::Gone(id) => st.synced_at.is_some() && !st.peers.contains_key(id),
            Watch::Seen(name) => st.peers.values().any(|p| &p.name == name),
        };
        if holds {
            st.hit = Some((epoch, Instant::now()));
        }
    }

    fn apply(&self, m: &MapResponse, shared: &Shared) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.maps += 1;
        if let Some(peers) = &m.peers {
            st.peers = peers.iter().map(|p| (p.id, p.clone())).collect();
            st.synced_at = Some(Instant::now());
        }
        for p in &m.peers_changed {
            st.peers.insert(p.id, p.clone());
        }
        for id in &m.peers_removed {
            st.peers.remove(id);
        }
        if let Some(rules) = &m.packet_filter {
            st.rules = rules.clone();
        }
        if let Some(urls) = &m.coordinators
            && !urls.is_empty()
        {
            let mut known = shared.urls.lock().unwrap_or_else(|e| e.into_inner());
            for u in urls {
                if !known.contains(u) {
                    known.push(u.clone());
                }
            }
        }
        self.check(&mut st, shared);
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn send(ws: &mut Ws, ch: &mut hybrid::Channel, msg: &ClientMessage) -> anyhow::Result<()> {
    for f in ch.seal(&serde_json::to_vec(msg)?)? {
        ws.send(Message::Binary(f.into())).await?;
    }
    Ok(())
}

/// One control session of `sim` with the coordinator at `url`; returns when it ends.
async fn session(
    sim: &Sim,
    url: &str,
    shared: &Shared,
    first: bool,
    joined: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<()> {
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .context("http:// coordinator URLs only")?
        .trim_end_matches('/')
        .parse()
        .context("the load generator needs ip:port coordinator URLs")?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((sim.src, 0)))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
        .await
        .context("connect timed out")??;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(8 << 10);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}/control"),
        stream,
        Some(config),
    )
    .await
    .context("websocket upgrade")?;
    let (ini, msg1) = {
        let mut rng = rand::rng();
        InitiatorHandshake::start(
            &mut rng,
            Purpose::Control,
            &sim.machine,
            shared.control_key.as_bytes(),
            &Psk::zero(),
            &[],
        )?
    };
    ws.send(Message::Binary(msg1.into())).await?;
    let msg2 = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .context("handshake timed out")?
        {
            Some(Ok(Message::Binary(b))) => break b,
            Some(Ok(Message::Close(_))) | None => bail!("closed during the handshake"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    };
    let done = ini.finish(&msg2)?;
    sim.state.lock().unwrap_or_else(|e| e.into_inner()).sessions += 1;
    let session_hash = *done.handshake_hash();
    let mut ch = done.into_channel();
    let proof = sim
        .node
        .possession_proof(
            shared.control_key.as_bytes(),
            &session_hash,
            &sim.machine.public(),
        )
        .context("the coordinator's key is unusable")?;
    let mut proof_hex = String::new();
    wire::keys::push_hex(&mut proof_hex, &proof);
    let hello = Hello {
        capability: CapabilityVersion::CURRENT,
        node_key: NodeKey::from_bytes(sim.node.public()),
        hostname: sim.hostname.clone(),
        auth_key: if first {
            Some(sim.auth.parse().context("auth key")?)
        } else {
            None
        },
        endpoints: vec![SocketAddr::from((
            [192, 0, 2, (sim.idx % 250) as u8 + 1],
            41641,
        ))],
        os: "linux".into(),
        client_version: "load".into(),
        node_key_proof: Some(proof_hex),
        id_token: None,
        advertised_routes: Vec::new(),
    };
    send(&mut ws, &mut ch, &ClientMessage::Hello(hello)).await?;
    let mut joined = joined;
    loop {
        let frame = match ws.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => bail!("{e}"),
            None => bail!("closed"),
        };
        let bytes = match frame {
            Message::Binary(b) => b,
            Message::Close(_) => bail!("closed"),
            _ => continue,
        };
        let Some(plain) = ch.open(&bytes)? else {
            continue;
        };
        match ServerMessage::from_json(&plain)? {
            ServerMessage::Welcome(w) => {
                let mut st = sim.state.lock().unwrap_or_else(|e| e.into_inner());
                st.id = Some(w.node_id);
                st.name = w.name;
                st.addresses = w.addresses;
                st.tags = w.tags;
                st.connected = true;
                st.synced_at = None;
                url.clone_into(&mut st.url);
            }
            ServerMessage::Map(m) => {
                sim.apply(&m, shared);
                if m.is_full()
                    && let Some(tx) = joined.take()
                {
                    let _ = tx.send(());
                }
            }
            ServerMessage::Error { code, message } => {
                if !code.is_retryable() {
                    sim.state.lock().unwrap_or_else(|e| e.into_inner()).refused =
                        Some((code, message.clone()));
                }
                bail!("coordinator error {code:?}: {message}");
            }
            // Simulated nodes join with auth keys; they never sign in.
            ServerMessage::LoginRequired { .. } => bail!("the coordinator asked for a sign-in"),
            ServerMessage::LoginResult { .. }
            | ServerMessage::AccessRequestResult { .. }
            | ServerMessage::Unknown => {}
        }
    }
}

/// Runs `sim` until it is refused for good: a session, and on its end the next replica after
/// a jittered pause of up to a second (what a real node does).
async fn run_sim(sim: Arc<Sim>, shared: Arc<Shared>, joined: tokio::sync::oneshot::Sender<()>) {
    let mut joined = Some(joined);
    let mut first = true;
    let mut next = sim.idx;
    loop {
        let url = {
            let urls = shared.urls.lock().unwrap_or_else(|e| e.into_inner());
            urls[next % urls.len()].clone()
        };
        // Until it has joined, the node stays with one replica (like `lattice up`, which
        // joins through its first --coordinator).
        let r = session(&sim, &url, &shared, first, joined.take()).await;
        {
            let mut st = sim.state.lock().unwrap_or_else(|e| e.into_inner());
            st.connected = false;
            if st.id.is_some() {
                first = false;
            }
            if st.refused.is_some() {
                return;
            }
        }
        if first {
            // Not joined yet (a refused or failed attempt): retry the same way soon.
            if let Err(e) = &r {
                eprintln!("load: {} could not join: {e:#}", sim.hostname);
            }
        } else {
            next += 1;
        }
        let jitter = rand::random::<u64>() % 1000;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Run<'a> {
    cfg: LoadConfig,
    coords: &'a mut Coordinators,
    shared: Arc<Shared>,
    sims: Vec<Arc<Sim>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    teams: usize,
    policy_text: String,
    /// Where policies are written for `policy set`; rules name it as their origin.
    policy_path: PathBuf,
    epoch: u64,
}

fn team_tag(t: usize) -> String {
    format!("tag:team{t}")
}

/// The run's policy: every team reaches itself on 22/tcp; with `ring`, also the next team on
/// 80/tcp.
fn teams_policy(teams: usize, ring: bool) -> String {
    let owners: serde_json::Map<String, serde_json::Value> =
        (0..teams).map(|t| (team_tag(t), json!([]))).collect();
    let mut acls = Vec::new();
    for t in 0..teams {
        acls.push(json!({"action": "accept", "proto": "tcp", "src": [team_tag(t)], "dst": [format!("{}:22", team_tag(t))]}));
        if ring && teams > 1 {
            acls.push(json!({"action": "accept", "proto": "tcp", "src": [team_tag(t)], "dst": [format!("{}:80", team_tag((t + 1) % teams))]}));
        }
    }
    serde_json::to_string_pretty(&json!({"tagOwners": owners, "acls": acls})).expect("json")
}

impl Run<'_> {
    fn team_of(&self, idx: usize) -> usize {
        idx.checked_div(self.cfg.team_size).unwrap_or(0) % self.teams
    }

    fn set_policy(&mut self, text: &str) -> anyhow::Result<()> {
        std::fs::write(&self.policy_path, text)?;
        let path = self.policy_path.to_str().context("utf-8 path")?.to_owned();
        self.coords.admin(&["policy", "set", &path])?;
        self.policy_text = text.to_owned();
        Ok(())
    }

    /// The oracle: every live node's peers and rules under the current policy.
    fn expected(&self) -> anyhow::Result<HashMap<NodeId, Expect>> {
        let mut inv = Inventory::new();
        for s in &self.sims {
            let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(id) = st.id else { continue };
            if st.refused.is_some() {
                continue;
            }
            inv.upsert(InventoryNode {
                routes: Vec::new(),
                id,
                name: st.name.clone(),
                addresses: st.addresses.clone(),
                user: None,
                tags: st.tags.clone(),
                attrs: [
                    ("node:os".to_owned(), AttrValue::String("linux".into())),
                    (
                        "node:clientVersion".to_owned(),
                        AttrValue::String("load".into()),
                    ),
                    (
                        "node:hostname".to_owned(),
                        AttrValue::String(st.name.clone()),
                    ),
                ]
                .into_iter()
                .collect(),
            });
        }
        let p = Policy::parse(&self.policy_path.to_string_lossy(), &self.policy_text)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = jiff::Timestamp::now().as_second();
        let day = jiff::Timestamp::from_second(now - now.rem_euclid(86_400))?;
        let c = p.compile(&inv, day);
        Ok(inv
            .iter()
            .map(|n| {
                let f = c.for_node(n.id);
                (
                    n.id,
                    Expect {
                        peers: f.visible_peers,
                        rules: f.rules,
                    },
                )
            })
            .collect())
    }

    /// Starts watching for `w`; returns its epoch.
    fn watch(&mut self, w: Watch) -> u64 {
        self.epoch += 1;
        *self.shared.watch.lock().unwrap_or_else(|e| e.into_inner()) = (self.epoch, w);
        // Nodes that already hold it (nothing to do for them) are checked now.
        for s in &self.sims {
            let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
            s.check(&mut st, &self.shared);
        }
        self.epoch
    }

    /// Waits until every node in `who` has a hit for `epoch`; returns their latencies from
    /// `t0` (ms).
    async fn wait_hits(
        &self,
        epoch: u64,
        who: &BTreeSet<NodeId>,
        t0: Instant,
        what: &str,
    ) -> anyhow::Result<Vec<f64>> {
        let deadline = Instant::now() + self.cfg.step_timeout;
        loop {
            let mut lat = Vec::new();
            let mut missing = Vec::new();
            for s in &self.sims {
                let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                let Some(id) = st.id else { continue };
                if !who.contains(&id) {
                    continue;
                }
                match st.hit {
                    Some((e, at)) if e == epoch => {
                        lat.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
                    }
                    _ => missing.push(st.name.clone()),
                }
            }
            if missing.is_empty() {
                return Ok(lat);
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: {} of {} nodes never got it (e.g. {:?})",
                    missing.len(),
                    who.len(),
                    &missing[..missing.len().min(5)]
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every live node holds exactly the oracle's peers and rules.
    async fn verify(&mut self, what: &str) -> anyhow::Result<()> {
        let expected = Arc::new(self.expected()?);
        let epoch = self.watch(Watch::Exact(Arc::clone(&expected)));
        let all: BTreeSet<NodeId> = expected.keys().copied().collect();
        if let Err(e) = self.wait_hits(epoch, &all, Instant::now(), what).await {
            let example =
                self.sims.iter().find_map(|s| {
                    let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                    let want = expected.get(&st.id?)?;
                    let have: BTreeSet<NodeId> = st.peers.keys().copied().collect();
                    (have != want.peers || st.rules != want.rules).then(|| {
                    format!(
                        "{} has {} peers ({} missing, {} extra) and {} rules where {} are due{}",
                        st.name,
                        have.len(),
                        want.peers.difference(&have).count(),
                        have.difference(&want.peers).count(),
                        st.rules.len(),
                        want.rules.len(),
                        if st.rules.len() == want.rules.len() {
                            format!(
                                "; first differing rule: has {:?}, due {:?}",
                                st.rules.iter().zip(&want.rules).find(|(a, b)| a != b).map(|p| p.0),
                                st.rules.iter().zip(&want.rules).find(|(a, b)| a != b).map(|p| p.1),
                            )
                        } else {
                            String::new()
                        }
                    )
                })
                });
            return Err(e).with_context(|| {
                format!(
                    "{what}: not every node ends with the right peers and rules ({})",
                    example.unwrap_or_default()
                )
            });
        }
        Ok(())
    }

    fn live_ids(&self) -> BTreeSet<NodeId> {
        self.sims
            .iter()
            .filter_map(|s| {
                let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
                st.id.filter(|_| st.refused.is_none())
            })
            .collect()
    }

    fn new_sim(&self, idx: usize, auth: &str) -> Arc<Sim> {
        new_sim(
            idx,
            auth,
            Ipv4Addr::new(
                127,
                1 + (idx / 62_500) as u8,
                ((idx / 250) % 250) as u8,
                (idx % 250) as u8 + 1,
            ),
        )
    }
}

/// A simulated node with fresh keys, connecting from `src`.
fn new_sim(idx: usize, auth: &str, src: Ipv4Addr) -> Arc<Sim> {
    let mut rng = rand::rng();
    Arc::new(Sim {
        idx,
        hostname: format!("n{idx:05}"),
        machine: StaticKeypair::generate(&mut rng),
        node: StaticKeypair::generate(&mut rng),
        auth: auth.to_owned(),
        src,
        state: Mutex::new(SimState::default()),
    })
}

/// The control key the coordinator at `authority` (`ip:port`) publishes.
async fn control_key(authority: &str) -> anyhow::Result<ControlKey> {
    #[derive(serde::Deserialize)]
    struct KeyInfo {
        control_key: ControlKey,
    }
    let key: KeyInfo = serde_json::from_slice(
        &relay::http::get(authority, "/key", 64 << 10)
            .await
            .context("GET /key")?,
    )?;
    Ok(key.control_key)
}

/// `lattice-lab hold-nodes`: `count` simulated nodes join the coordinator at `url` with
/// `auth_key` and stay connected until the process is killed, so a real node's netmap holds
/// that many more peers (no data plane behind them). Prints `joined N` once every one has had
/// its first netmap.
#[allow(clippy::print_stdout)] // the line bench-memory waits for
pub async fn hold(url: &str, auth_key: &str, count: usize) -> anyhow::Result<()> {
    raise_nofile();
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let shared = Arc::new(Shared {
        watch: Mutex::new((0, Watch::None)),
        urls: Mutex::new(vec![url.to_owned()]),
        control_key: control_key(authority).await?,
    });
    let gate = Arc::new(Semaphore::new(32));
    let mut joins = Vec::new();
    let mut tasks = Vec::new();
    for idx in 0..count {
        let sim = new_sim(idx, auth_key, Ipv4Addr::UNSPECIFIED);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let permit = Arc::clone(&gate).acquire_owned().await?;
        joins.push(tokio::spawn(async move {
            let _ = rx.await;
            drop(permit);
        }));
        tasks.push(tokio::spawn(run_sim(sim, Arc::clone(&shared), tx)));
    }
    tokio::time::timeout(Duration::from_secs(300), async {
        for j in joins {
            let _ = j.await;
        }
    })
    .await
    .context("joining took over 5 minutes")?;
    println!("joined {count}");
    std::future::pending::<()>().await;
    Ok(())
}

/// Raises the open-file limit to its hard maximum (every node is a socket).
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Runs the load test and returns its figures.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    raise_nofile();
    let mut coords = Coordinators::start(&cfg).await?;
    let result = run_with(&cfg, &mut coords).await;
    coords.shutdown().await;
    result
}

async fn run_with(cfg: &LoadConfig, coords: &mut Coordinators) -> anyhow::Result<LoadReport> {
    let tmp = tempfile::tempdir()?;
    let authority = coords.urls[0]
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let shared = Arc::new(Shared {
        watch: Mutex::new((0, Watch::None)),
        urls: Mutex::new(coords.urls.clone()),
        control_key: control_key(authority).await?,
    });
    let teams = if cfg.team_size == 0 {
        1
    } else {
        cfg.nodes.div_ceil(cfg.team_size).max(1)
    };
    let mut run = Run {
        cfg: cfg.clone(),
        coords,
        shared,
        sims: Vec::new(),
        tasks: Vec::new(),
        teams,
        policy_text: String::new(),
        policy_path: tmp.path().join("policy.hujson"),
        epoch: 0,
    };
    let r = drive(&mut run).await;
    for t in &run.tasks {
        t.abort();
    }
    r
}

async fn drive(run: &mut Run<'_>) -> anyhow::Result<LoadReport> {
    let cfg = run.cfg.clone();
    let v1 = teams_policy(run.teams, false);
    run.set_policy(&v1)?;
    let keys: Vec<String> = (0..run.teams)
        .map(|t| {
            run.coords
                .admin(&[
                    "authkey",
                    "create",
                    "--reusable",
                    "--expiry",
                    "24h",
                    "--tag",
                    &team_tag(t),
                ])
                .map(|s| s.trim().to_owned())
        })
        .collect::<Result<_, _>>()?;

    // Register and connect everyone.
    eprintln!(
        "load: {} nodes, {} teams, {} replica(s)",
        cfg.nodes,
        run.teams,
        run.coords.urls.len()
    );
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut joins = Vec::new();
    let deadline = Instant::now() + cfg.step_timeout.max(Duration::from_secs(60));
    for idx in 0..cfg.nodes {
        let sim = run.new_sim(idx, &keys[run.team_of(idx)]);
        run.sims.push(Arc::clone(&sim));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&run.shared);
        let permit = tokio::time::timeout_at(deadline.into(), Arc::clone(&gate).acquire_owned())
            .await
            .context("registering every node took too long")??;
        joins.push(tokio::spawn(async move {
            let _ = rx.await;
            drop(permit);
        }));
        run.tasks.push(tokio::spawn(run_sim(sim, shared, tx)));
    }
    for j in joins {
        tokio::time::timeout_at(deadline.into(), j)
            .await
            .context("registering every node took too long")??;
    }
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "load: all {} nodes registered and connected in {connect_s:.2} s",
        cfg.nodes
    );
    run.verify("after registration").await?;

    // (a) A policy change.
    let before = run.expected()?;
    let v2 = teams_policy(run.teams, true);
    run.policy_text = v2.clone();
    let after = Arc::new(run.expected()?);
    let affected: BTreeSet<NodeId> = after
        .iter()
        .filter(|(id, e)| before.get(id) != Some(e))
        .map(|(id, _)| *id)
        .collect();
    let epoch = run.watch(Watch::Exact(Arc::clone(&after)));
    let cpu0 = run.coords.usage().map(|u| u.0);
    let t0 = Instant::now();
    run.set_policy(&v2)?;
    eprintln!(
        "load: `policy set` returned after {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let policy_change = Spread::of(
        run.wait_hits(epoch, &affected, t0, "the policy change")
            .await?,
    );
    let policy_change_cpu_s = cpu0.zip(run.coords.usage()).map(|(a, b)| b.0 - a);
    eprintln!(
        "load: policy change reached {} nodes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms{}",
        policy_change.n,
        policy_change.p50,
        policy_change.p99,
        policy_change.max,
        policy_change_cpu_s
            .map(|c| format!(" ({c:.2} coordinator CPU seconds)"))
            .unwrap_or_default()
    );

    // (b) A removal.
    let victim = Arc::clone(&run.sims[0]);
    let (victim_id, victim_name) = {
        let st = victim.state.lock().unwrap_or_else(|e| e.into_inner());
        (st.id.context("node 0 has no id")?, st.name.clone())
    };
    let saw: BTreeSet<NodeId> = after
        .iter()
        .filter(|(_, e)| e.peers.contains(&victim_id))
        .map(|(id, _)| *id)
        .collect();
    let epoch = run.watch(Watch::Gone(victim_id));
    let t0 = Instant::now();
    run.coords.admin(&["nodes", "remove", &victim_name])?;
    let removal = Spread::of(run.wait_hits(epoch, &saw, t0, "the removal").await?);
    eprintln!(
        "load: removal reached {} nodes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        removal.n, removal.p50, removal.p99, removal.max
    );
    let refused = wait_until(cfg.step_timeout, || {
        victim
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused
            .is_some()
    })
    .await;
    if !refused {
        bail!("the removed node was not told it was removed");
    }
    run.verify("after the removal").await?;

    // (c) A new node's arrival.
    let idx = cfg.nodes;
    let newcomer = run.new_sim(idx, &keys[run.team_of(1)]);
    run.sims.push(Arc::clone(&newcomer));
    let epoch = run.watch(Watch::Seen(newcomer.hostname.clone()));
    let t0 = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    run.tasks.push(tokio::spawn(run_sim(
        Arc::clone(&newcomer),
        Arc::clone(&run.shared),
        tx,
    )));
    tokio::time::timeout(cfg.step_timeout, rx)
        .await
        .context("the new node did not join")??;
    let new_id = newcomer
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .id
        .context("the new node has no id")?;
    let expect = run.expected()?;
    let should_see: BTreeSet<NodeId> = expect
        .iter()
        .filter(|(id, e)| **id != new_id && e.peers.contains(&new_id))
        .map(|(id, _)| *id)
        .collect();
    let arrival = Spread::of(run.wait_hits(epoch, &should_see, t0, "the arrival").await?);
    eprintln!(
        "load: arrival reached {} nodes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        arrival.n, arrival.p50, arrival.p99, arrival.max
    );
    run.verify("after the arrival").await?;

    // Every node kept its first session through all of that.
    let sessions: u64 = run
        .sims
        .iter()
        .map(|s| s.state.lock().unwrap_or_else(|e| e.into_inner()).sessions)
        .sum();
    let dropped_sessions = sessions.saturating_sub(run.sims.len() as u64);
    if dropped_sessions > 0 {
        eprintln!(
            "load: {dropped_sessions} control sessions ended and were resumed before the restart"
        );
    }

    // (d) A restart, or the loss of one replica.
    let reconnect_s = if run.coords.own.is_empty() {
        None
    } else {
        let t0 = Instant::now();
        let single = run.coords.own.len() == 1;
        let killed = run.coords.own[0].url.clone();
        run.coords.kill(0);
        if single {
            run.coords.restart(0).await?;
            eprintln!(
                "load: coordinator restarted in {:.2} s",
                t0.elapsed().as_secs_f64()
            );
        } else {
            eprintln!("load: replica 0 killed");
        }
        // Back: connected and synced since the kill (or, with several replicas, on one that
        // did not die).
        let back = |s: &Arc<Sim>| {
            let st = s.state.lock().unwrap_or_else(|e| e.into_inner());
            st.refused.is_some()
                || (st.connected
                    && st
                        .synced_at
                        .is_some_and(|t| t > t0 || (!single && st.url != killed)))
        };
        let ok = wait_until(cfg.step_timeout.max(Duration::from_secs(60)), || {
            run.sims.iter().all(back)
        })
        .await;
        if !ok {
            let behind = run.sims.iter().filter(|s| !back(s)).count();
            bail!("{behind} nodes did not reconnect after the restart");
        }
        run.verify("after the restart").await?;
        let s = t0.elapsed().as_secs_f64();
        eprintln!("load: every node connected and up to date again {s:.2} s after the kill");
        Some(s)
    };
    let live = run.live_ids().len();
    eprintln!("load: {live} nodes hold exactly the peers and rules the policy gives them");

    let usage = run.coords.usage();
    let maps = run
        .sims
        .iter()
        .map(|s| s.state.lock().unwrap_or_else(|e| e.into_inner()).maps)
        .sum();
    Ok(LoadReport {
        nodes: cfg.nodes,
        replicas: run.coords.urls.len(),
        db: if !cfg.coordinators.is_empty() {
            "external".into()
        } else if cfg.db == "sqlite" {
            "sqlite".into()
        } else {
            "postgres".into()
        },
        connect_s,
        coordinator_cpu_s: usage.map(|u| u.0),
        coordinator_rss_mb: usage.map(|u| u.1),
        policy_change_ms: policy_change,
        policy_change_cpu_s,
        removal_ms: removal,
        arrival_ms: arrival,
        reconnect_s,
        maps_received: maps,
        dropped_sessions,
    })
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// The human-readable table.
pub fn table(r: &LoadReport) -> String {
    let opt = |v: Option<f64>, unit: &str| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2} {unit}"))
    };
    let spread = |s: &Spread| {
        format!(
            "p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  ({} nodes)",
            s.p50, s.p99, s.max, s.n
        )
    };
    format!(
        "nodes              {}\n\
         replicas           {}\n\
         database           {}\n\
         register+connect   {:.2} s\n\
         coordinator CPU    {}\n\
         coordinator RSS    {}\n\
         policy change      {}\n\
         ...its CPU         {}\n\
         node removal       {}\n\
         node arrival       {}\n\
         reconnect          {}\n\
         netmaps received   {}\n\
         dropped sessions   {}\n",
        r.nodes,
        r.replicas,
        r.db,
        r.connect_s,
        opt(r.coordinator_cpu_s, "s"),
        opt(r.coordinator_rss_mb, "MB"),
        spread(&r.policy_change_ms),
        opt(r.policy_change_cpu_s, "s"),
        spread(&r.removal_ms),
        spread(&r.arrival_ms),
        opt(r.reconnect_s, "s"),
        r.maps_received,
        r.dropped_sessions,
    )
}
