//! The event loop (STYLE S4): selects over the TUN device, the UDP sockets, the control client,
//! the local API and the core's timer; feeds each input to [`NodeState`] with the current time
//! and drains its outputs. It holds no protocol state of its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use node_proto::{Event, NodeState, Packet, PathKind, Status};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use wire::{ClientMessage, ErrorCode};

use crate::io::api::{
    ApiRequest, CoordinatorJson, PathJson, PeerJson, SelfJson, StatusJson, WhoisJson,
};
use crate::io::control::ControlEvent;
use crate::io::dns::DnsTable;
use crate::io::tun::Tun;
use crate::io::udp::Sockets;
use crate::io::{dns, ifaddrs};
use crate::statedir::StateDir;

/// Packets read per wakeup before outputs are flushed.
const BATCH: usize = 64;
const BUF: usize = 65_535;
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

/// Everything the loop drives.
pub struct EventLoop {
    /// The sans-IO core.
    pub state: NodeState,
    /// UDP sockets.
    pub sockets: Sockets,
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
    /// The coordinator URL (for status).
    pub coordinator_url: String,
    /// Configure the system resolver.
    pub accept_dns: bool,
    /// This node is ephemeral (leaves the mesh on `down`).
    pub ephemeral: bool,
    connected: bool,
    last_error: Option<String>,
    dns_started: bool,
    cache_due: Option<Instant>,
    pending_logout: Option<(oneshot::Sender<Result<(), String>>, Instant)>,
}

impl EventLoop {
    /// Builds the loop around a core and its channels.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: NodeState,
        sockets: Sockets,
        tun_name: String,
        mtu: u16,
        dir: StateDir,
        control_events: mpsc::Receiver<ControlEvent>,
        control_out: mpsc::Sender<ClientMessage>,
        api: mpsc::Receiver<ApiRequest>,
        dns_table: watch::Sender<Arc<DnsTable>>,
        endpoints: watch::Sender<Vec<SocketAddr>>,
        coordinator_url: String,
        accept_dns: bool,
    ) -> Self {
        Self {
            state,
            sockets,
            tun: None,
            tun_name,
            mtu,
            dir,
            control_events,
            control_out,
            api,
            dns_table,
            endpoints,
            coordinator_url,
            accept_dns,
            ephemeral: false,
            connected: false,
            last_error: None,
            dns_started: false,
            cache_due: None,
            pending_logout: None,
        }
    }

    /// Runs until stopped, logged out, or refused by the coordinator (an error).
    pub async fn run(mut self) -> anyhow::Result<Exit> {
        let mut tun_buf = vec![0u8; BUF];
        let mut udp4_buf = vec![0u8; BUF];
        let mut udp6_buf = vec![0u8; BUF];
        let mut endpoint_tick = tokio::time::interval(ENDPOINT_REFRESH);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        self.flush().await?;
        loop {
            let deadline = self
                .state
                .poll_timeout()
                .map_or_else(|| Instant::now() + Duration::from_secs(1), |(t, _)| t);
            let deadline = self.cache_due.map_or(deadline, |c| c.min(deadline));
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return self.stop().await,
                _ = term.recv() => return self.stop().await,
                r = recv_tun(self.tun.as_ref(), &mut tun_buf) => {
                    let n = r.context("reading the TUN device")?;
                    let now = Instant::now();
                    self.state.handle_tun_packet(now, Packet::copy_from(&tun_buf[..n]));
                    if let Some(tun) = &self.tun {
                        for _ in 1..BATCH {
                            match tun.dev.try_recv(&mut tun_buf) {
                                Ok(n) => self.state.handle_tun_packet(now, Packet::copy_from(&tun_buf[..n])),
                                Err(_) => break,
                            }
                        }
                    }
                }
                r = self.sockets.v4.recv_from(&mut udp4_buf) => {
                    let (n, from) = r.context("reading the UDP socket")?;
                    let now = Instant::now();
                    self.state.handle_datagram(now, from, Packet::copy_from(&udp4_buf[..n]));
                    for _ in 1..BATCH {
                        match self.sockets.v4.try_recv_from(&mut udp4_buf) {
                            Ok((n, from)) => self.state.handle_datagram(now, from, Packet::copy_from(&udp4_buf[..n])),
                            Err(_) => break,
                        }
                    }
                }
                r = recv_v6(self.sockets.v6.as_ref(), &mut udp6_buf) => {
                    let (n, from) = r.context("reading the UDP socket")?;
                    self.state.handle_datagram(Instant::now(), from, Packet::copy_from(&udp6_buf[..n]));
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
                    self.state.sync_wall_clock(now, wall_clock_ms());
                    self.state.handle_timeout(now);
                    if self.cache_due.is_some_and(|c| c <= now) {
                        self.cache_due = None;
                        if let Err(e) = self.dir.save_netmap(&self.state.netmap_snapshot()) {
                            warn!(error = %e, "could not save the netmap cache");
                        }
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
        } else if let Err(e) = self.dir.save_netmap(&self.state.netmap_snapshot()) {
            warn!(error = %e, "could not save the netmap cache");
        }
        info!("stopped");
        Ok(Exit::Stopped)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(t) = self.state.poll_transmit() {
            let Some(sock) = self.sockets.for_dst(&t.dst) else {
                continue;
            };
            match sock.try_send_to(&t.payload, t.dst) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Err(e) = sock.send_to(&t.payload, t.dst).await {
                        debug!(dst = %t.dst, error = %e, "udp send failed");
                    }
                }
                Err(e) => debug!(dst = %t.dst, error = %e, "udp send failed"),
            }
        }
        while let Some(p) = self.state.poll_tun_write() {
            if let Some(tun) = &self.tun
                && let Err(e) = tun.dev.send(&p).await
            {
                debug!(error = %e, "tun write failed");
            }
        }
        while let Some(ev) = self.state.poll_event() {
            self.handle_event(ev)?;
        }
        Ok(())
    }

    fn handle_event(&mut self, ev: Event) -> anyhow::Result<()> {
        match ev {
            Event::AddressesChanged(addrs) => {
                match &mut self.tun {
                    Some(tun) => tun.set_addresses(&addrs)?,
                    None => {
                        let tun = Tun::create(&self.tun_name, self.mtu, &addrs)?;
                        info!(device = tun.name(), addresses = ?addrs, "TUN device up");
                        self.tun = Some(tun);
                    }
                }
                if !self.dns_started {
                    self.dns_started = true;
                    let table = self.dns_table.subscribe();
                    tokio::spawn(async move {
                        if let Err(e) = dns::serve(table).await {
                            warn!(error = %format!("{e:#}"), "mesh DNS is not available");
                        }
                    });
                    if self.accept_dns {
                        configure_system_dns(
                            &self.tun_name,
                            self.state.dns_config().map(|d| d.domain.clone()),
                        );
                    }
                }
                self.refresh_endpoints();
            }
            Event::NetmapChanged => {
                let domain = self
                    .state
                    .dns_config()
                    .map_or_else(|| "mesh.internal".to_owned(), |d| d.domain.clone());
                let table = DnsTable::new(&domain, self.state.dns_records());
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
            Event::PathChanged { peer, addr } => {
                info!(peer = %peer, %addr, "direct path");
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
            ControlEvent::Welcome(w) => {
                self.connected = true;
                self.last_error = None;
                self.ephemeral = w.ephemeral;
                info!(name = %w.name, fqdn = %w.fqdn, addresses = ?w.addresses,
                      new = w.registered_now, "joined the mesh");
            }
            ControlEvent::Map(m) => self.state.handle_netmap(Instant::now(), *m),
            ControlEvent::Disconnected(reason) => {
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

    async fn handle_api(&mut self, req: ApiRequest) -> Option<Exit> {
        match req {
            ApiRequest::Status(reply) => {
                let _ = reply.send(self.status_json());
            }
            ApiRequest::Whois(ip, reply) => {
                let me = self.state.status(Instant::now()).self_node;
                let answer = self.state.whois(ip).map(|n| WhoisJson {
                    name: n.name.clone(),
                    fqdn: n.fqdn.clone(),
                    ips: n.addresses.clone(),
                    node_key: n.node_key.to_text(),
                    user: n.user.clone(),
                    tags: n.tags.clone(),
                    os: n.os.clone(),
                    is_self: me.as_ref().is_some_and(|m| m.id == n.id),
                });
                let _ = reply.send(answer);
            }
            ApiRequest::Down(reply) => {
                let exit = self.stop().await;
                let _ = reply.send(());
                return Some(exit.unwrap_or(Exit::Stopped));
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
            .state
            .status(Instant::now())
            .self_node
            .map(|n| n.addresses)
            .unwrap_or_default();
        let eps = ifaddrs::endpoints(
            self.sockets.port,
            &self.tun_name,
            &overlay,
            self.sockets.v6.is_some(),
        );
        self.endpoints.send_if_modified(|cur| {
            if *cur == eps {
                false
            } else {
                *cur = eps;
                true
            }
        });
    }

    fn status_json(&self) -> StatusJson {
        let st: Status = self.state.status(Instant::now());
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
            },
            coordinator: CoordinatorJson {
                url: self.coordinator_url.clone(),
                connected: self.connected,
                last_error: self.last_error.clone(),
            },
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
                        kind: match p.path.kind {
                            PathKind::Direct => "direct",
                            PathKind::Relay => "relay",
                            PathKind::None => "none",
                        }
                        .into(),
                        addr: p.path.addr,
                        relay: p.path.relay.clone(),
                        reason: p.path.reason.clone(),
                    },
                    pq: p.pq,
                    pq_psk_age_secs: p.pq_psk_age.map(|d| d.as_secs()),
                    pq_handshakes: p.pq_handshakes,
                    pq_chain_resets: p.pq_chain_resets,
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
                })
                .collect(),
            counters: serde_json::to_value(CountersJson::from(st.counters)).unwrap_or_default(),
        }
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
        }
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn recv_tun(tun: Option<&Tun>, buf: &mut [u8]) -> std::io::Result<usize> {
    match tun {
        Some(t) => t.dev.recv(buf).await,
        None => std::future::pending().await,
    }
}

async fn recv_v6(
    sock: Option<&tokio::net::UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
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
