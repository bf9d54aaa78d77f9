//! The event loop (STYLE S4): the control half of the shell. It selects over the control
//! client, the local API, relays, auxiliary sockets and the core's timer; feeds each input to
//! [`NodeState`] with the current time and drains its outputs. It holds no protocol state of
//! its own. The TUN device and the UDP sockets are read by the data-plane workers
//! ([`crate::io::workers`]), which share the core with it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use node_proto::path::Current;
use node_proto::shared::{BatchOutput, run_batch};
use node_proto::{Addr, Event, NodeState, Packet, SockId, Status, Transmit};
use parking_lot::MutexGuard;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use wire::{ClientMessage, ErrorCode, NodeId, RelayId};

use crate::io::aead::AeadHelpers;
use crate::io::api::{
    ApiRequest, BuffersJson, CoordinatorJson, DnsJson, ExitNodeJson, LoginJson, LoginResultJson,
    NetcheckJson, PathJson, PeerJson, PingJson, RelayJson, RoutesJson, SelfJson, StatusJson,
    SteeringJson, StunJson, WhoisJson,
};
use crate::io::aux::{AuxDatagram, AuxSockets};
use crate::io::control::ControlEvent;
use crate::io::dns::DnsTable;
use crate::io::keylog::KeyLog;
use crate::io::portmap::PortMapper;
use crate::io::relays::{RelayEvent, RelayInbox, RelayManager};
use crate::io::tun::Tun;
use crate::io::udp::{Sender, Sockets};
use crate::io::workers::{Modes, Pipelines, Runtimes, Shared, ToControl, Workers};
use crate::io::{dns, ifaddrs};
use crate::statedir::{Pin, StateDir};

/// Relay events handled per wake-up before outputs are flushed.
const BATCH: usize = 64;
const ENDPOINT_REFRESH: Duration = Duration::from_secs(20);
const CACHE_SAVE_DELAY: Duration = Duration::from_secs(1);

/// Why the loop ended.
#[derive(Debug)]
pub enum Exit {
    /// SIGINT/SIGTERM or `lattice down`.
    Stopped,
    /// `lattice logout` completed.
    LoggedOut,
}

/// How the node routes beyond the mesh's own addresses.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Masquerade mesh traffic to the subnets this node routes (`--snat-subnet-routes`).
    pub snat_subnet_routes: bool,
    /// The exit node to send internet traffic through (`--exit-node`).
    pub exit_node: Option<String>,
    /// How the node's own sockets are made (marked while it uses an exit node).
    pub dialer: relay::dial::Dialer,
}

/// Everything the loop drives.
pub struct EventLoop {
    /// The sans-IO core, shared with the workers.
    shared: Arc<Shared>,
    /// The data-plane workers.
    workers: Workers,
    /// The first worker's UDP sockets (all share one port).
    pub sockets: Arc<Sockets>,
    /// Sends the control loop's datagrams on them, from a task of its own.
    sender: Sender,
    /// What the control loop's inputs produced.
    out: BatchOutput,
    /// The TUN device, once addresses are known.
    pub tun: Option<Tun>,
    /// TUN name to create.
    pub tun_name: String,
    /// TUN MTU.
    pub mtu: u16,
    /// State dir (netmap cache).
    pub dir: StateDir,
    /// From the control client.
    pub control_events: mpsc::Receiver<ControlEvent>,
    /// To the control client.
    pub control_out: mpsc::Sender<ClientMessage>,
    /// From the local API.
    pub api: mpsc::Receiver<ApiRequest>,
    /// Mesh DNS table for the resolver.
    pub dns_table: watch::Sender<Arc<DnsTable>>,
    /// Our endpoints for the control client.
    pub endpoints: watch::Sender<Vec<SocketAddr>>,
    /// The coordinator URL in use (for status).
    pub coordinator_url: String,
    /// The pinned coordinator and its replicas (updated from netmaps).
    pin: Pin,
    /// Replica lists for the control client.
    replicas: watch::Sender<Vec<String>>,
    /// Configure the system resolver.
    pub accept_dns: bool,
    /// This node is ephemeral (leaves the mesh on `down`).
    pub ephemeral: bool,
    connected: bool,
    /// Control sessions established since start.
    control_sessions: u64,
    last_error: Option<String>,
    keylog: Option<KeyLog>,
    dns_started: bool,
    cache_due: Option<Instant>,
    pending_logout: Option<(oneshot::Sender<Result<(), String>>, Instant)>,
    /// A sign-in the node waits for, and how the last one ended.
    login: Option<LoginJson>,
    login_result: Option<LoginResultJson>,
    /// Subnets peers route for us (wanted in the kernel's table) and those installed.
    wanted_routes: Vec<ipnet::IpNet>,
    installed_routes: std::collections::BTreeSet<ipnet::IpNet>,
    /// Forwarding and source NAT, while this node routes subnets or is an exit node.
    router: crate::io::routes::RouterSetup,
    routing: Routing,
    /// Policy routing toward the exit node, once the TUN device is up.
    exit_routing: Option<crate::io::routes::ExitRouting>,
    /// Access requests sent and not yet answered, by their number.
    pending_access: BTreeMap<u64, oneshot::Sender<Result<i64, String>>>,
    next_access: u64,
    relays: RelayManager,
    relay_events: mpsc::Receiver<RelayEvent>,
    relay_state: BTreeMap<RelayId, RelayConnState>,
    aux: AuxSockets,
    aux_rx: mpsc::Receiver<AuxDatagram>,
    portmap: Option<PortMapper>,
    portmap_rx: Option<watch::Receiver<Option<std::net::SocketAddrV4>>>,
    /// The last path report the coordinator took.
    paths_sent: Option<Vec<wire::PeerPath>>,
    netcheck_waiters: Vec<(oneshot::Sender<NetcheckJson>, Instant)>,
    /// What the mesh DNS resolver answered.
    dns_counters: Arc<dns::DnsCounters>,
    /// `lattice ping`s awaiting their pong: the peer, the answer, when asked.
    pending_pings: Vec<(NodeId, PingReply, Instant)>,
}

/// What the loop knows about one relay connection (its round trip and the home relay are the
/// core's: [`node_proto::home::HomeRelay`]).
#[derive(Debug, Clone, Default)]
struct RelayConnState {
    transport: Option<&'static str>,
    error: Option<String>,
}

/// Where a `lattice ping`'s answer goes.
type PingReply = oneshot::Sender<Result<PingJson, String>>;

/// How long `lattice ping` waits for a pong.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Removes the elements of `v` for which `f` holds and returns them.
fn extract_if<T>(v: &mut Vec<T>, mut f: impl FnMut(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(v).into_iter().partition(|x| f(x));
    *v = keep;
    out
}

/// How long `lattice netcheck` waits for a fresh run.
const NETCHECK_WAIT: Duration = Duration::from_secs(4);

impl EventLoop {
    /// Builds the loop around a core and its channels; fails if the relay connections'
    /// thread cannot start.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut state: NodeState,
        sockets: Vec<Sockets>,
        tun_name: String,
        mtu: u16,
        dir: StateDir,
        control_events: mpsc::Receiver<ControlEvent>,
        control_out: mpsc::Sender<ClientMessage>,
        api: mpsc::Receiver<ApiRequest>,
        dns_table: watch::Sender<Arc<DnsTable>>,
        endpoints: watch::Sender<Vec<SocketAddr>>,
        pin: Pin,
        replicas: watch::Sender<Vec<String>>,
        accept_dns: bool,
        node_keypair: hybrid::StaticKeypair,
        port_mapping: bool,
        routing: Routing,
        modes: Modes,
        runtimes: Runtimes,
    ) -> anyhow::Result<Self> {
        let dialer = routing.dialer;
        let (relay_tx, relay_events) = mpsc::channel(4096);
        let (relay_inbox, relay_packets) = RelayInbox::new(sockets.len());
        let relays = RelayManager::new(node_keypair, dialer, relay_tx, relay_inbox)
            .context("starting the relay connections' thread")?;
        let (aux_tx, aux_rx) = mpsc::channel(1024);
        let sockets: Vec<Arc<Sockets>> = sockets.into_iter().map(Arc::new).collect();
        let first = Arc::clone(&sockets[0]);
        let portmap = port_mapping.then(|| PortMapper::start(first.port));
        let portmap_rx = portmap.as_ref().map(PortMapper::watch);
        state.set_crypto_outside(true);
        let helpers = modes.helpers(sockets.len());
        let aead = match modes.aead_helpers(sockets.len()) {
            0 => None,
            n => Some(Arc::new(
                AeadHelpers::start(n).context("starting the AEAD helper threads")?,
            )),
        };
        let shared = Shared::new(state, sockets.len(), modes.steering(sockets.len()));
        let workers = Workers::start(
            &shared,
            &sockets,
            Pipelines { helpers, aead },
            mtu,
            relays.senders(),
            relay_packets,
            runtimes,
        );
        info!(
            workers = workers.len(),
            helpers,
            aead_helpers = workers.aead_helpers().0,
            steering = shared.steering.is_on(),
            "data plane workers"
        );
        Ok(Self {
            shared,
            workers,
            sender: Sender::start(Arc::clone(&first), true),
            sockets: first,
            out: BatchOutput::default(),
            tun: None,
            tun_name,
            mtu,
            dir,
            control_events,
            control_out,
            api,
            dns_table,
            endpoints,
            coordinator_url: pin.url.clone(),
            pin,
            replicas,
            accept_dns,
            ephemeral: false,
            connected: false,
            control_sessions: 0,
            last_error: None,
            keylog: KeyLog::from_env(),
            dns_started: false,
            cache_due: None,
            pending_logout: None,
            login: None,
            login_result: None,
            pending_access: BTreeMap::new(),
            next_access: 1,
            wanted_routes: Vec::new(),
            installed_routes: std::collections::BTreeSet::new(),
            router: crate::io::routes::RouterSetup::default(),
            relays,
            routing,
            exit_routing: None,
            relay_events,
            relay_state: BTreeMap::new(),
            aux: AuxSockets::new(dialer, aux_tx),
            aux_rx,
            portmap,
            portmap_rx,
            paths_sent: None,
            netcheck_waiters: Vec::new(),
            pending_pings: Vec::new(),
            dns_counters: Arc::default(),
        })
    }

    /// Runs until stopped, logged out, or refused by the coordinator (an error).
    pub async fn run(mut self) -> anyhow::Result<Exit> {
        let mut endpoint_tick = tokio::time::interval(ENDPOINT_REFRESH);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        self.flush().await?;
        loop {
            let deadline = self
                .core()
                .poll_timeout()
                .map_or_else(|| Instant::now() + Duration::from_secs(1), |(t, _)| t);
            let deadline = self.cache_due.map_or(deadline, |c| c.min(deadline));
            self.shared.set_control_deadline(deadline);
            let shared = Arc::clone(&self.shared);
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return self.stop().await,
                _ = term.recv() => return self.stop().await,
                () = shared.wake.notified() => {}
                msg = self.workers.from_workers.recv() => match msg {
                    Some(ToControl::Transmits(ts)) => self.send_transmits(ts).await,
                    Some(ToControl::Failed(e)) => return Err(e),
                    None => bail!("the data plane workers stopped"),
                },
                ev = self.relay_events.recv() => {
                    if let Some(ev) = ev {
                        self.handle_relay_event(ev);
                        for _ in 1..BATCH {
                            match self.relay_events.try_recv() {
                                Ok(ev) => self.handle_relay_event(ev),
                                Err(_) => break,
                            }
                        }
                    }
                }
                d = self.aux_rx.recv() => {
                    if let Some(d) = d {
                        self.core().handle_datagram(Instant::now(), SockId::Aux(d.sock), d.from, Packet::copy_from(&d.bytes[..]));
                    }
                }
                changed = changed_portmap(self.portmap_rx.as_mut()) => {
                    if changed {
                        self.update_port_mapping();
                    }
                }
                ev = self.control_events.recv() => {
                    let Some(ev) = ev else { bail!("the control client stopped") };
                    self.handle_control(ev)?;
                }
                req = self.api.recv() => {
                    if let Some(req) = req
                        && let Some(exit) = self.handle_api(req).await
                    {
                        return Ok(exit);
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    {
                        let mut core = self.core();
                        core.sync_wall_clock(now, wall_clock_ms());
                        core.handle_timeout(now);
                    }
                    if self.cache_due.is_some_and(|c| c <= now) {
                        self.cache_due = None;
                        let snapshot = self.core().netmap_snapshot();
                        if let Err(e) = self.dir.save_netmap(&snapshot) {
                            warn!(error = %e, "could not save the netmap cache");
                        }
                    }
                    self.answer_netcheck_waiters(false);
                    for (_, reply, _) in extract_if(&mut self.pending_pings, |(_, _, at)| {
                        at.elapsed() > PING_TIMEOUT
                    }) {
                        let _ = reply.send(Err(format!(
                            "no answer within {} s",
                            PING_TIMEOUT.as_secs()
                        )));
                    }
                    if let Some((_, since)) = &self.pending_logout
                        && since.elapsed() > Duration::from_secs(5)
                        && let Some((reply, _)) = self.pending_logout.take()
                    {
                        let _ = reply.send(Err("the coordinator did not confirm the logout".into()));
                    }
                }
                _ = endpoint_tick.tick() => self.refresh_endpoints(),
            }
            self.flush().await?;
            if !self.connected
                && let Some((reply, _)) = self.pending_logout.take()
            {
                self.dir.forget_membership()?;
                let _ = reply.send(Ok(()));
                return Ok(Exit::LoggedOut);
            }
        }
    }

    async fn stop(&mut self) -> anyhow::Result<Exit> {
        if self.ephemeral && self.connected {
            info!("ephemeral node stopping: leaving the mesh");
            let _ = self.control_out.send(ClientMessage::Logout).await;
            // Give the control client a moment to deliver it.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(ev) = self.control_events.recv().await {
                    if matches!(
                        ev,
                        ControlEvent::Disconnected(_) | ControlEvent::Refused(..)
                    ) {
                        break;
                    }
                }
            })
            .await;
            self.dir.forget_membership()?;
        } else {
            let snapshot = self.core().netmap_snapshot();
            if let Err(e) = self.dir.save_netmap(&snapshot) {
                warn!(error = %e, "could not save the netmap cache");
            }
        }
        info!("stopped");
        Ok(Exit::Stopped)
    }

    /// The core, locked for one call (never hold it across an `.await` or a second lock).
    fn core(&self) -> MutexGuard<'_, NodeState> {
        self.shared.core.lock()
    }

    /// Finishes the crypto the control loop's inputs asked for and sends, writes and handles
    /// what the core has for it.
    async fn flush(&mut self) -> anyhow::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        run_batch(&self.shared.core, Instant::now(), &mut out, |_| {});
        let transmits = std::mem::take(&mut out.transmits);
        self.send_transmits(transmits).await;
        self.workers.write_tun(std::mem::take(&mut out.tun_writes));
        out.clear();
        self.out = out;
        loop {
            let ev = self.core().poll_event();
            let Some(ev) = ev else { break };
            self.handle_event(ev)?;
        }
        Ok(())
    }

    /// Sends datagrams: on the UDP socket, through a relay or on an auxiliary socket.
    async fn send_transmits(&mut self, transmits: Vec<Transmit>) {
        let mut relays = crate::io::relays::RelayBatch::new(self.relays.senders());
        for t in transmits {
            let aux =
                crate::io::workers::send(t, &mut self.sender, &self.sockets, &mut relays).await;
            if let Some(Transmit {
                dst: Addr::Udp(SockId::Aux(n), a),
                payload,
                ..
            }) = aux
            {
                self.aux.send(n, a, &payload);
            }
        }
        relays.flush();
        self.sender.flush().await;
    }

    /// Brings the kernel's routes into the TUN device in line with the subnets peers route.
    fn apply_routes(&mut self) {
        let Some(dev) = self.tun.as_ref().map(|t| t.name().to_owned()) else {
            return;
        };
        let wanted: std::collections::BTreeSet<ipnet::IpNet> =
            self.wanted_routes.iter().copied().collect();
        for r in wanted.difference(&self.installed_routes.clone()) {
            match crate::io::routes::add(&dev, r) {
                Ok(()) => {
                    info!(route = %r, %dev, "routing a subnet through the mesh");
                    self.installed_routes.insert(*r);
                }
                Err(e) => {
                    warn!(route = %r, error = %e, "could not route a subnet through the mesh")
                }
            }
        }
        for r in self.installed_routes.clone().difference(&wanted) {
            if let Err(e) = crate::io::routes::remove(&dev, r) {
                debug!(route = %r, error = %e, "could not remove a subnet route");
            }
            info!(route = %r, "no longer routing a subnet through the mesh");
            self.installed_routes.remove(r);
        }
    }

    fn handle_event(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::RoutesChanged {
                via_peers,
                served,
                exit,
            } => {
                self.wanted_routes = via_peers;
                self.apply_routes();
                if served.is_empty() && !exit {
                    self.router.stop();
                } else {
                    let dev = self
                        .tun
                        .as_ref()
                        .map_or_else(|| self.tun_name.clone(), |t| t.name().to_owned());
                    match self
                        .router
                        .apply(&dev, self.routing.snat_subnet_routes, &served, exit)
                    {
                        Ok(()) => info!(routes = ?served, exit, "routing for the mesh"),
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "cannot route for the mesh")
                        }
                    }
                }
            }
            Event::AddressesChanged(addrs) => {
                match &mut self.tun {
                    Some(tun) => tun.set_addresses(&addrs)?,
                    None => {
                        let (tun, queues) = Tun::create(
                            &self.tun_name,
                            self.mtu,
                            &addrs,
                            self.workers.runtimes(),
                            self.workers.helpers(),
                            &self.shared.tun_write_failed,
                        )?;
                        info!(device = tun.name(), addresses = ?addrs, queues = queues.len(), "TUN device up");
                        self.workers.attach_tun(queues);
                        if self.routing.exit_node.is_some() {
                            self.exit_routing = Some(
                                crate::io::routes::ExitRouting::start(tun.name())
                                    .context("--exit-node")?,
                            );
                        }
                        self.tun = Some(tun);
                        self.apply_routes();
                    }
                }
                if !self.dns_started {
                    self.dns_started = true;
                    let table = self.dns_table.subscribe();
                    let device = self
                        .tun
                        .as_ref()
                        .map_or_else(|| self.tun_name.clone(), |t| t.name().to_owned());
                    let counters = Arc::clone(&self.dns_counters);
                    tokio::spawn(async move {
                        if let Err(e) = dns::serve(table, &device, counters).await {
                            warn!(error = %format!("{e:#}"), "mesh DNS is not available");
                        }
                    });
                    if self.accept_dns {
                        let domain = self.core().dns_config().map(|d| d.domain.clone());
                        configure_system_dns(&self.tun_name, domain);
                    }
                }
                self.refresh_endpoints();
            }
            Event::NetmapChanged => {
                let table = {
                    let core = self.core();
                    let domain = core
                        .dns_config()
                        .map_or_else(|| "mesh.internal".to_owned(), |d| d.domain.clone());
                    DnsTable::new(&domain, core.dns_records())
                };
                self.dns_table.send_if_modified(|t| {
                    if **t == table {
                        false
                    } else {
                        *t = Arc::new(table);
                        true
                    }
                });
                self.cache_due
                    .get_or_insert(Instant::now() + CACHE_SAVE_DELAY);
            }
            Event::PathChanged { peer, path } => match path {
                Current::Direct(_, addr) => info!(peer = %peer, %addr, "path: direct"),
                Current::Relay(r) => {
                    let relay = self.core().relay_name(r);
                    info!(peer = %peer, %relay, "path: relay");
                }
                Current::None => debug!(peer = %peer, "path: none"),
            },
            Event::PingReply {
                peer,
                name,
                ipv4,
                from,
                rtt,
            } => {
                if let Some(i) = self.pending_pings.iter().position(|(p, _, _)| *p == peer) {
                    let (_, reply, _) = self.pending_pings.remove(i);
                    let (path, addr, relay) = match from {
                        Addr::Udp(_, a) => ("direct", Some(a), None),
                        Addr::Relay(r, _) => ("relay", None, Some(self.core().relay_name(r))),
                    };
                    let _ = reply.send(Ok(PingJson {
                        peer: name,
                        ip: ipv4,
                        path: path.into(),
                        addr,
                        relay,
                        rtt_ms: rtt.as_secs_f64() * 1000.0,
                    }));
                }
            }
            Event::HomeRelay(home) => self.home_relay_changed(home),
            Event::RelaysChanged => {
                let list = self.core().relays().to_vec();
                self.relay_state
                    .retain(|id, _| list.iter().any(|r| r.id == *id));
                self.relays.set_relays(&list);
            }
            Event::RelayTicket(t) => self.relays.set_ticket(&t),
            Event::RelayRefusals(keys) => {
                info!(
                    refused = keys.len(),
                    "nodes that are not peers, refused at the relays"
                );
                self.relays.set_refused(&keys);
            }
            Event::PathReport(paths) => {
                if self.paths_sent.as_ref() != Some(&paths)
                    && self
                        .control_out
                        .try_send(ClientMessage::Paths {
                            paths: paths.clone(),
                        })
                        .is_ok()
                {
                    self.paths_sent = Some(paths);
                }
            }
            Event::PskInstalled { peer, psk } => {
                if let Some(k) = &self.keylog {
                    k.record(&peer, &psk);
                }
            }
            Event::NetInfo(_) => {
                self.refresh_endpoints();
                self.answer_netcheck_waiters(true);
            }
            Event::ReportNetInfo { home_relay, nat } => {
                if self
                    .control_out
                    .try_send(ClientMessage::NetInfo { home_relay, nat })
                    .is_err()
                {
                    self.core().netinfo_undelivered();
                }
            }
            Event::TunnelSecurityChanged(wire::TunnelSecurity::ClassicalOnly) => {
                warn!("the mesh admin set tunnels to classical-only: no post-quantum protection");
            }
            Event::TunnelSecurityChanged(wire::TunnelSecurity::PostQuantum) => {
                info!("tunnels require post-quantum keys");
            }
        }
        Ok(())
    }

    fn handle_control(&mut self, ev: ControlEvent) -> anyhow::Result<()> {
        match ev {
            ControlEvent::Welcome(w, url) => {
                self.connected = true;
                self.control_sessions += 1;
                self.coordinator_url = url;
                self.last_error = None;
                if self.login.take().is_some() {
                    self.login_result = Some(LoginResultJson {
                        user: w.user.clone(),
                        error: None,
                    });
                }
                self.ephemeral = w.ephemeral;
                info!(name = %w.name, fqdn = %w.fqdn, addresses = ?w.addresses,
                      new = w.registered_now, "joined the mesh");
            }
            ControlEvent::Map(m) => {
                if let Some(list) = &m.coordinators {
                    self.learn_replicas(list);
                }
                self.core().handle_netmap(Instant::now(), *m);
            }
            ControlEvent::LoginRequired {
                url,
                user_code,
                expires_unix,
            } => {
                let prompt = LoginJson {
                    url,
                    user_code,
                    expires_unix,
                };
                if self.login.as_ref() != Some(&prompt) {
                    // On its own line, for people and for scripts that watch the output.
                    crate::output::line(&format!("To authenticate, visit: {}", prompt.url));
                    crate::output::line(&format!(
                        "(the page shows the code {}; check it before you sign in)",
                        prompt.user_code
                    ));
                    info!(url = %prompt.url, code = %prompt.user_code, "waiting for the user to sign in");
                }
                self.login = Some(prompt);
            }
            ControlEvent::LoginResult(result) => {
                self.login = None;
                match &result {
                    Ok(user) => info!(%user, "signed in again"),
                    Err(e) => warn!(error = %e, "the sign-in failed"),
                }
                self.login_result = Some(LoginResultJson {
                    user: result.as_ref().ok().cloned(),
                    error: result.err(),
                });
            }
            ControlEvent::AccessRequestResult(req, result) => {
                if let Some(reply) = self.pending_access.remove(&req) {
                    let _ = reply.send(result);
                }
            }
            ControlEvent::Disconnected(reason) => {
                // Requests in flight on the lost session get no answer.
                for (_, reply) in std::mem::take(&mut self.pending_access) {
                    let _ =
                        reply.send(Err("the coordinator connection was lost; try again".into()));
                }
                self.connected = false;
                self.last_error = Some(reason);
            }
            ControlEvent::Refused(code, message) => {
                self.connected = false;
                if let Some((reply, _)) = self.pending_logout.take() {
                    self.dir.forget_membership()?;
                    let _ = reply.send(Ok(()));
                    bail!("logged out");
                }
                if matches!(code, ErrorCode::NodeRemoved | ErrorCode::NodeExpired) {
                    self.dir.forget_netmap();
                }
                bail!("the coordinator refused this node: {message}");
            }
        }
        Ok(())
    }

    /// Remembers the coordinator replicas a netmap lists (in the pin, so a restart knows them
    /// too) and hands them to the control client.
    fn learn_replicas(&mut self, list: &[String]) {
        let mut replicas: Vec<String> = list
            .iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .filter(|u| {
                (u.starts_with("http://") || u.starts_with("https://")) && *u != self.pin.url
            })
            .take(16)
            .collect();
        replicas.dedup();
        if replicas != self.pin.replicas {
            info!(?replicas, "coordinator replicas");
            self.pin.replicas = replicas;
            if let Err(e) = self.dir.save_pin(&self.pin) {
                warn!(error = %e, "could not remember the coordinator replicas");
            }
            let _ = self.replicas.send(self.pin.urls());
        }
    }

    async fn handle_api(&mut self, req: ApiRequest) -> Option<Exit> {
        match req {
            ApiRequest::Status(reply) => {
                let _ = reply.send(self.status_json());
            }
            ApiRequest::Whois(ip, reply) => {
                let core = self.core();
                let me = core.status(Instant::now()).self_node;
                let answer = core.whois(ip).map(|n| WhoisJson {
                    name: n.name.clone(),
                    fqdn: n.fqdn.clone(),
                    ips: n.addresses.clone(),
                    node_key: n.node_key.to_text(),
                    user: n.user.clone(),
                    tags: n.tags.clone(),
                    os: n.os.clone(),
                    is_self: me.as_ref().is_some_and(|m| m.id == n.id),
                    routes: n.primary_routes.clone(),
                    capabilities: core.capabilities_of(ip),
                });
                drop(core);
                let _ = reply.send(answer);
            }
            ApiRequest::Ping(target, reply) => {
                let asked = self.core().ping(Instant::now(), &target);
                match asked {
                    Ok(peer) => self.pending_pings.push((peer, reply, Instant::now())),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ApiRequest::Netcheck(reply) => {
                self.core().start_netcheck(Instant::now());
                self.netcheck_waiters.push((reply, Instant::now()));
            }
            ApiRequest::Down(reply) => {
                let exit = self.stop().await;
                let _ = reply.send(());
                return Some(exit.unwrap_or(Exit::Stopped));
            }
            ApiRequest::RequestAccess(r, reply) => {
                let req = self.next_access;
                self.next_access += 1;
                let msg = ClientMessage::RequestAccess {
                    req,
                    to: r.to,
                    ports: r.ports,
                    for_secs: r.for_secs,
                    reason: r.reason,
                };
                if !self.connected {
                    let _ = reply.send(Err("not connected to the coordinator".into()));
                } else if self.control_out.send(msg).await.is_err() {
                    let _ = reply.send(Err("the control client stopped".into()));
                } else {
                    self.pending_access.insert(req, reply);
                }
            }
            ApiRequest::Login(reply) => {
                self.login_result = None;
                if self.login.is_some() {
                    // Already waiting for a sign-in: the link in status is the one to use.
                    let _ = reply.send(Ok(()));
                } else if !self.connected {
                    let _ = reply.send(Err(
                        "not connected to the coordinator; cannot sign in now".into()
                    ));
                } else if self.control_out.send(ClientMessage::Login).await.is_err() {
                    let _ = reply.send(Err("the control client stopped".into()));
                } else {
                    let _ = reply.send(Ok(()));
                }
            }
            ApiRequest::Logout(reply) => {
                if !self.connected {
                    let _ = reply.send(Err(
                        "not connected to the coordinator; cannot log out now".into()
                    ));
                } else if self.control_out.send(ClientMessage::Logout).await.is_err() {
                    let _ = reply.send(Err("the control client stopped".into()));
                } else {
                    self.pending_logout = Some((reply, Instant::now()));
                }
            }
        }
        None
    }

    fn refresh_endpoints(&mut self) {
        let overlay: Vec<IpAddr> = self
            .core()
            .status(Instant::now())
            .self_node
            .map(|n| n.addresses)
            .unwrap_or_default();
        let local = ifaddrs::endpoints(
            self.sockets.port,
            &self.tun_name,
            &overlay,
            self.sockets.v6.is_some(),
        );
        let eps = self.core().advertised_endpoints(local);
        self.endpoints.send_if_modified(|cur| {
            if *cur == eps {
                false
            } else {
                *cur = eps;
                true
            }
        });
    }

    fn handle_relay_event(&mut self, ev: RelayEvent) {
        let now = Instant::now();
        match ev {
            RelayEvent::Up { id, transport } => {
                let st = self.relay_state.entry(id).or_default();
                st.transport = Some(transport);
                st.error = None;
                self.core().relay_state(now, id, true);
            }
            RelayEvent::Down { id, error } => {
                // Kept even for a relay never reached: status shows why.
                let st = self.relay_state.entry(id).or_default();
                st.error = Some(error);
                let was_up = st.transport.take().is_some();
                if was_up {
                    self.core().relay_state(now, id, false);
                }
            }
            RelayEvent::PeerGone { id, key } => self.core().relay_peer_gone(now, id, key),
            RelayEvent::Rtt { id, rtt } => self.core().relay_rtt(id, rtt),
        }
    }

    /// The core chose a new home relay (it tells the coordinator: [`Event::ReportNetInfo`]).
    fn home_relay_changed(&self, home: Option<RelayId>) {
        match home {
            Some(r) => info!(relay = %self.core().relay_name(r), "home relay"),
            None => warn!("no relay is reachable"),
        }
    }

    fn update_port_mapping(&mut self) {
        let mapped = self.portmap.as_ref().and_then(PortMapper::current);
        match mapped {
            Some(m) => info!(external = %m, "gateway port mapping"),
            None => debug!("no gateway port mapping"),
        }
        self.core().set_port_mapping(mapped);
        self.refresh_endpoints();
    }

    fn netcheck_json(&self) -> NetcheckJson {
        let report = self.core().netcheck_report().cloned();
        let nat = self.core().netinfo().1.unwrap_or_default();
        NetcheckJson {
            udp: nat.udp,
            mapping_varies_by_destination: nat.mapping_varies,
            hard_nat: nat.is_hard(),
            public_ip: nat.public_ip,
            public_endpoint: report.as_ref().and_then(|r| r.public_endpoint),
            port_mapping: nat.port_mapped,
            gateway: self
                .portmap
                .as_ref()
                .and_then(PortMapper::protocols)
                .map(|p| crate::io::api::GatewayJson {
                    upnp: p.upnp,
                    nat_pmp: p.nat_pmp,
                    pcp: p.pcp,
                }),
            stun: report
                .map(|r| {
                    r.servers
                        .iter()
                        .map(|s| StunJson {
                            server: s.server,
                            mapped: s.mapped,
                            rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            relays: self.relays_json(),
            local_endpoints: self.endpoints.borrow().clone(),
        }
    }

    fn relays_json(&self) -> Vec<RelayJson> {
        let core = self.core();
        let home = core.home_relay();
        core.relays()
            .iter()
            .map(|r| {
                let st = self.relay_state.get(&r.id).cloned().unwrap_or_default();
                RelayJson {
                    id: r.id.0,
                    name: r.name.clone(),
                    connected: st.transport.is_some(),
                    transport: st.transport.map(str::to_owned),
                    rtt_ms: home.rtt(r.id).map(|d| d.as_secs_f64() * 1000.0),
                    home: home.home() == Some(r.id),
                    error: st.error,
                }
            })
            .collect()
    }

    /// Answers `lattice netcheck` callers: at once after a fresh run (`fresh`), or with what
    /// is known when they have waited long enough.
    fn answer_netcheck_waiters(&mut self, fresh: bool) {
        if self.netcheck_waiters.is_empty() {
            return;
        }
        let now = Instant::now();
        let json = self.netcheck_json();
        let waiters = std::mem::take(&mut self.netcheck_waiters);
        for (tx, since) in waiters {
            if fresh || now.duration_since(since) >= NETCHECK_WAIT {
                let _ = tx.send(json.clone());
            } else {
                self.netcheck_waiters.push((tx, since));
            }
        }
    }

    fn status_json(&self) -> StatusJson {
        let st: Status = self.core().status(Instant::now());
        // Taken before the literal below: a guard made inside it would be held to its end.
        let nat = self.core().netinfo().1;
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let me = st.self_node.as_ref();
        StatusJson {
            backend_state: if me.is_some() { "running" } else { "starting" }.into(),
            self_node: SelfJson {
                name: me.map(|n| n.name.clone()).unwrap_or_default(),
                fqdn: me.map(|n| n.fqdn.clone()).unwrap_or_default(),
                ips: me.map(|n| n.addresses.clone()).unwrap_or_default(),
                node_key: st.node_key.to_text(),
                endpoints: self.endpoints.borrow().clone(),
                user: me.and_then(|n| n.user.clone()),
                tags: me.map(|n| n.tags.clone()).unwrap_or_default(),
                key_expiry_unix: me.and_then(|n| n.key_expiry_unix),
                routes: me.map_or_else(RoutesJson::default, |n| RoutesJson {
                    advertised: n.advertised_routes.clone(),
                    approved: n.approved_routes.clone(),
                    primary: n.primary_routes.clone(),
                }),
                attrs: st.node_caps.clone(),
            },
            coordinator: CoordinatorJson {
                url: self.coordinator_url.clone(),
                replicas: self.pin.urls(),
                connected: self.connected,
                last_error: self.last_error.clone(),
                sessions: self.control_sessions,
            },
            login: self.login.clone(),
            login_result: self.login_result.clone(),
            domain: st.domain.clone(),
            tunnel_security: st.tunnel_security,
            peers: st
                .peers
                .iter()
                .map(|p| PeerJson {
                    name: p.name.clone(),
                    fqdn: p.fqdn.clone(),
                    ips: p.addresses.clone(),
                    node_key: p.node_key.to_text(),
                    online: p.online,
                    path: PathJson {
                        kind: p.path.kind.as_str().into(),
                        addr: p.path.addr,
                        relay: p.path.relay.clone(),
                        reason: p.path.reason.clone(),
                    },
                    pq: p.pq,
                    pq_psk_age_secs: p.pq_psk_age.map(|d| d.as_secs()),
                    pq_handshakes: p.pq_handshakes,
                    pq_chain_resets: p.pq_chain_resets,
                    tx_packets: p.traffic.tx_packets,
                    rx_packets: p.traffic.rx_packets,
                    path_changes: p.traffic.path_changes,
                    pq_error: p.pq_error.clone(),
                    last_handshake_unix: p.since_handshake.map(|d| now_unix - d.as_secs() as i64),
                    last_rx_secs_ago: p.since_rx.map(|d| d.as_secs()),
                    handshakes: p.handshakes,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    endpoints: p.endpoints.clone(),
                    os: p.os.clone(),
                    user: p.user.clone(),
                    tags: p.tags.clone(),
                    routes: p.routes.clone(),
                    exit_node_option: p.routes.iter().any(|r| r.prefix_len() == 0),
                })
                .collect(),
            counters: {
                let mut c = CountersJson::from(st.counters);
                // TUN reads the offload code could not cut into packets count as malformed.
                c.tun_malformed += self
                    .shared
                    .tun_read_errors
                    .load(std::sync::atomic::Ordering::Relaxed);
                c.tun_write_failed = self
                    .shared
                    .tun_write_failed
                    .load(std::sync::atomic::Ordering::Relaxed);
                serde_json::to_value(c).unwrap_or_default()
            },
            relays: self.relays_json(),
            relay_refused: st
                .relay_refused
                .iter()
                .map(wire::NodeKey::to_text)
                .collect(),
            nat,
            dns: {
                use std::sync::atomic::Ordering::Relaxed;
                let c = &self.dns_counters;
                DnsJson {
                    answered: c.answered.load(Relaxed),
                    nxdomain: c.nxdomain.load(Relaxed),
                    forwarded: c.forwarded.load(Relaxed),
                    failed: c.failed.load(Relaxed),
                }
            },
            exit_node: st.exit_node.map(|e| ExitNodeJson {
                active: e.problem.is_none(),
                wanted: e.wanted,
                name: e.name,
                online: e.online,
                problem: e.problem,
            }),
            workers: self.workers.len(),
            io_helpers: self.workers.helpers(),
            aead_helpers: self.workers.aead_helpers().0,
            aead_parts: self.workers.aead_helpers().1,
            steering: {
                let s = self.shared.steering.stats();
                SteeringJson {
                    on: s.on,
                    senders: s.senders,
                    handed_over: s.handed_over,
                    dropped: s.dropped,
                }
            },
            buffers: BuffersJson {
                handed_on: self
                    .shared
                    .buffers_handed_on
                    .load(std::sync::atomic::Ordering::Relaxed),
                reused: self
                    .shared
                    .buffers_reused
                    .load(std::sync::atomic::Ordering::Relaxed),
            },
        }
    }
}

async fn changed_portmap(rx: Option<&mut watch::Receiver<Option<std::net::SocketAddrV4>>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

#[derive(serde::Serialize)]
struct CountersJson {
    tun_no_route: u64,
    tun_malformed: u64,
    tun_bad_source: u64,
    udp_unknown: u64,
    wg_invalid: u64,
    wg_unknown_peer: u64,
    wg_cookies_sent: u64,
    wg_shed: u64,
    in_malformed: u64,
    in_spoofed: u64,
    in_not_for_us: u64,
    in_filtered: u64,
    flows_cut: u64,
    in_delivered: u64,
    out_sent: u64,
    tun_no_tunnel: u64,
    frames_invalid: u64,
    pq_rejected: u64,
    pq_rate_limited: u64,
    pq_bad_mac: u64,
    pq_cookies_sent: u64,
    relay_unknown_peer: u64,
    relay_strangers_refused: u64,
    disco_invalid: u64,
    disco_pongs_sent: u64,
    disco_rate_limited: u64,
    disco_stale: u64,
    flows_evicted: u64,
    /// Packets in TUN writes the kernel refused (counted by the shell).
    tun_write_failed: u64,
}

impl From<node_proto::Counters> for CountersJson {
    fn from(c: node_proto::Counters) -> Self {
        Self {
            tun_no_route: c.tun_no_route,
            tun_malformed: c.tun_malformed,
            tun_bad_source: c.tun_bad_source,
            udp_unknown: c.udp_unknown,
            wg_invalid: c.wg_invalid,
            wg_unknown_peer: c.wg_unknown_peer,
            wg_cookies_sent: c.wg_cookies_sent,
            wg_shed: c.wg_shed,
            in_malformed: c.in_malformed,
            in_spoofed: c.in_spoofed,
            in_not_for_us: c.in_not_for_us,
            in_filtered: c.in_filtered,
            flows_cut: c.flows_cut,
            in_delivered: c.in_delivered,
            out_sent: c.out_sent,
            tun_no_tunnel: c.tun_no_tunnel,
            frames_invalid: c.frames_invalid,
            pq_rejected: c.pq_rejected,
            pq_rate_limited: c.pq_rate_limited,
            pq_bad_mac: c.pq_bad_mac,
            pq_cookies_sent: c.pq_cookies_sent,
            relay_unknown_peer: c.relay_unknown_peer,
            relay_strangers_refused: c.relay_strangers_refused,
            disco_invalid: c.disco_invalid,
            disco_pongs_sent: c.disco_pongs_sent,
            disco_rate_limited: c.disco_rate_limited,
            disco_stale: c.disco_stale,
            flows_evicted: c.flows_evicted,
            tun_write_failed: 0,
        }
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Points the system resolver at the mesh DNS through systemd-resolved, for this interface
/// only. Never edits /etc/resolv.conf.
fn configure_system_dns(tun: &str, domain: Option<String>) {
    let domain = domain.unwrap_or_else(|| "mesh.internal".into());
    let run = |args: &[&str]| std::process::Command::new("resolvectl").args(args).status();
    match run(&["dns", tun, "100.100.100.100"]) {
        Ok(s) if s.success() => {
            let _ = run(&["domain", tun, &domain]);
            info!(device = tun, %domain, "system DNS configured through systemd-resolved");
        }
        _ => warn!(
            "--accept-dns: systemd-resolved is not available; to resolve mesh names add \
             `nameserver 100.100.100.100` and `search {domain}` to your resolver configuration"
        ),
    }
}
