//! The local API: HTTP on a Unix socket in the state dir (mode 0600, so only the owner and
//! root can use it). `lattice status|whois|down|login|logout` are clients of it.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

/// `lattice status --json`. The fields named in the design are a contract for scripts: keep
/// them, add freely.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusJson {
    /// `starting`, `running` or `stopped`.
    pub backend_state: String,
    /// This node.
    #[serde(rename = "self")]
    pub self_node: SelfJson,
    /// The coordinator connection.
    pub coordinator: CoordinatorJson,
    /// The mesh DNS domain.
    pub domain: Option<String>,
    /// How the mesh keys tunnels: `post_quantum` or `classical_only` (an admin setting).
    pub tunnel_security: wire::TunnelSecurity,
    /// Peers, by name.
    pub peers: Vec<PeerJson>,
    /// Dropped/handled packet counters.
    pub counters: serde_json::Value,
    /// Relay connections.
    #[serde(default)]
    pub relays: Vec<RelayJson>,
    /// Nodes that are not peers but sent through relays enough to be refused there (their
    /// node keys; see `node_proto::strangers`).
    #[serde(default)]
    pub relay_refused: Vec<String>,
    /// This node's NAT, as its last netcheck measured it.
    #[serde(default)]
    pub nat: Option<wire::NatInfo>,
    /// A sign-in the node waits for: its user must open this page.
    #[serde(default)]
    pub login: Option<LoginJson>,
    /// How the last sign-in ended.
    #[serde(default)]
    pub login_result: Option<LoginResultJson>,
    /// The exit node this node sends internet traffic through (`--exit-node`).
    #[serde(default)]
    pub exit_node: Option<ExitNodeJson>,
    /// What the mesh DNS resolver answered since the node started.
    #[serde(default)]
    pub dns: DnsJson,
    /// Data-plane workers (each with its own TUN queue and UDP socket).
    #[serde(default)]
    pub workers: usize,
    /// Whether the workers run as pipelines: a finishing thread each for the crypto, helper
    /// tasks for the system calls (`--io-helpers`).
    #[serde(default)]
    pub io_helpers: bool,
    /// Threads that share the pipelines' encryption and decryption (`--aead-helpers`).
    #[serde(default)]
    pub aead_helpers: usize,
    /// Parts of batches they were handed so far.
    #[serde(default)]
    pub aead_parts: u64,
    /// How the workers share the peers that send WireGuard data.
    #[serde(default)]
    pub steering: SteeringJson,
    /// The workers' read buffers handed on as packets (no copy), and how many were used
    /// again once their packets were gone.
    #[serde(default)]
    pub buffers: BuffersJson,
}

/// Read buffers handed on as packets ([`crate::io::recycle`]), in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuffersJson {
    /// Receive slots (GRO runs) and TUN packet buffers handed on.
    pub handed_on: u64,
    /// Buffers read into again after their packets were gone (the rest were allocated).
    pub reused: u64,
}

/// Which worker handles each sender's data (`crate::io::steer`), in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringJson {
    /// Whether peers are spread over the workers (`--steering`).
    pub on: bool,
    /// Addresses each worker handles the data of now (those that sent in the last 15 s).
    pub senders: Vec<usize>,
    /// Datagrams handed from the worker whose socket received them to the one that owns
    /// their sender.
    pub handed_over: u64,
    /// Datagrams dropped because their owner's queue was full.
    pub dropped: u64,
}

/// The mesh DNS resolver's answers in `status`, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsJson {
    /// Mesh names and reverse lookups answered from the netmap.
    pub answered: u64,
    /// Mesh names that do not exist.
    pub nxdomain: u64,
    /// Other names, answered by an upstream server.
    pub forwarded: u64,
    /// Other names no upstream answered.
    pub failed: u64,
}

/// `--exit-node` in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitNodeJson {
    /// What `--exit-node` named.
    pub wanted: String,
    /// The peer it names, if one is visible.
    pub name: Option<String>,
    /// Whether internet traffic goes through it now.
    pub active: bool,
    /// Whether that peer is connected to the coordinator.
    pub online: bool,
    /// Why traffic does not go through it (internet traffic is dropped meanwhile).
    pub problem: Option<String>,
}

/// A pending sign-in in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginJson {
    /// The page to open.
    pub url: String,
    /// The code it shows.
    pub user_code: String,
    /// When the link stops working (Unix seconds).
    pub expires_unix: i64,
}

/// How a sign-in ended, in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginResultJson {
    /// Who signed in.
    pub user: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A relay connection in `status` and `netcheck`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayJson {
    /// Relay id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Connected now.
    pub connected: bool,
    /// `quic` or `websocket`.
    pub transport: Option<String>,
    /// Round-trip time over the relay connection, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Whether it is this node's home relay.
    pub home: bool,
    /// Why the last connection attempt failed.
    pub error: Option<String>,
}

/// One STUN server's answer in `netcheck`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StunJson {
    /// The server.
    pub server: SocketAddr,
    /// Where it saw us.
    pub mapped: Option<SocketAddr>,
    /// Round-trip time, milliseconds.
    pub rtt_ms: Option<f64>,
}

/// The port-mapping protocols a gateway offers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct GatewayJson {
    /// UPnP-IGD.
    pub upnp: bool,
    /// NAT-PMP.
    pub nat_pmp: bool,
    /// PCP.
    pub pcp: bool,
}

/// `lattice netcheck`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetcheckJson {
    /// Whether any STUN server answered.
    pub udp: bool,
    /// Whether the public port depends on the destination (`None`: fewer than two answers).
    pub mapping_varies_by_destination: Option<bool>,
    /// Endpoint-dependent mapping without a port mapping: direct paths need port probing.
    pub hard_nat: bool,
    /// The public IP STUN saw.
    pub public_ip: Option<IpAddr>,
    /// The public endpoint advertised to peers, if the mapping allows one.
    pub public_endpoint: Option<SocketAddr>,
    /// A gateway port mapping (UPnP, NAT-PMP or PCP).
    pub port_mapping: Option<SocketAddr>,
    /// Which mapping protocols the gateway answered, when it was asked.
    #[serde(default)]
    pub gateway: Option<GatewayJson>,
    /// Per STUN server.
    pub stun: Vec<StunJson>,
    /// Relays.
    pub relays: Vec<RelayJson>,
    /// Local endpoints reported to the coordinator.
    pub local_endpoints: Vec<SocketAddr>,
}

/// This node in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfJson {
    /// Short name.
    pub name: String,
    /// FQDN.
    pub fqdn: String,
    /// Overlay addresses.
    pub ips: Vec<IpAddr>,
    /// WireGuard key.
    pub node_key: String,
    /// Reported UDP endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Owner.
    pub user: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// When this node's key expires (Unix seconds); `None`: never.
    #[serde(default)]
    pub key_expiry_unix: Option<i64>,
    /// The routes this node serves for the mesh.
    #[serde(default)]
    pub routes: RoutesJson,
    /// What the policy's `nodeAttrs` give this node (attribute -> values).
    #[serde(default)]
    pub attrs: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
}

/// A node's routes in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesJson {
    /// What it offers (`--advertise-routes`, `--advertise-exit-node`).
    pub advertised: Vec<ipnet::IpNet>,
    /// Those approved.
    pub approved: Vec<ipnet::IpNet>,
    /// Those it is the primary router for.
    pub primary: Vec<ipnet::IpNet>,
}

/// The coordinator connection in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinatorJson {
    /// The URL of the replica in use (or last used).
    pub url: String,
    /// Every coordinator replica known, the pinned one first.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Whether a control session is up.
    pub connected: bool,
    /// Why the last session ended.
    pub last_error: Option<String>,
    /// Control sessions established since the node started (more than one: reconnects).
    #[serde(default)]
    pub sessions: u64,
}

/// A peer in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerJson {
    /// Short name.
    pub name: String,
    /// FQDN.
    pub fqdn: String,
    /// Overlay addresses.
    pub ips: Vec<IpAddr>,
    /// WireGuard key.
    pub node_key: String,
    /// Connected to the coordinator.
    pub online: bool,
    /// How it is reached.
    pub path: PathJson,
    /// Whether the session key is post-quantum.
    pub pq: bool,
    /// Age of the post-quantum preshared key, in seconds.
    pub pq_psk_age_secs: Option<u64>,
    /// Post-quantum handshakes completed with this peer.
    pub pq_handshakes: u64,
    /// Times the key chain had to restart (a side lost its key).
    pub pq_chain_resets: u64,
    /// WireGuard data messages sent to the peer.
    #[serde(default)]
    pub tx_packets: u64,
    /// Authenticated WireGuard data messages received from the peer.
    #[serde(default)]
    pub rx_packets: u64,
    /// Times the path to the peer changed.
    #[serde(default)]
    pub path_changes: u64,
    /// Why there is no post-quantum key (or the last rotation failed).
    pub pq_error: Option<String>,
    /// Last completed WireGuard handshake, unix seconds.
    pub last_handshake_unix: Option<i64>,
    /// Seconds since the last authenticated packet.
    pub last_rx_secs_ago: Option<u64>,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Reported endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// OS.
    pub os: String,
    /// Owner.
    pub user: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Subnets reached through this peer (its primary routes; `0.0.0.0/0` and `::/0` when
    /// it is an exit node).
    #[serde(default)]
    pub routes: Vec<ipnet::IpNet>,
    /// Whether it offers to be an exit node (`lattice up --exit-node NAME`).
    #[serde(default)]
    pub exit_node_option: bool,
}

/// A peer's path in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathJson {
    /// `direct`, `relay` or `none`.
    pub kind: String,
    /// Direct address.
    pub addr: Option<SocketAddr>,
    /// Relay name.
    pub relay: Option<String>,
    /// Why it is not direct.
    pub reason: Option<String>,
}

/// `lattice whois`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoisJson {
    /// Short name.
    pub name: String,
    /// FQDN.
    pub fqdn: String,
    /// Overlay addresses.
    pub ips: Vec<IpAddr>,
    /// WireGuard key.
    pub node_key: String,
    /// Owner.
    pub user: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// OS.
    pub os: String,
    /// Whether it is this node.
    pub is_self: bool,
    /// Subnets it routes for the mesh (its primary routes).
    #[serde(default)]
    pub routes: Vec<ipnet::IpNet>,
    /// What the policy's app grants let it do on this node (capability -> values).
    #[serde(default)]
    pub capabilities: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
}

/// A request from the API to the event loop.
#[derive(Debug)]
pub enum ApiRequest {
    /// Status snapshot.
    Status(oneshot::Sender<StatusJson>),
    /// Who owns an address.
    Whois(IpAddr, oneshot::Sender<Option<WhoisJson>>),
    /// Run a netcheck and report.
    Netcheck(oneshot::Sender<NetcheckJson>),
    /// Stop the daemon.
    Down(oneshot::Sender<()>),
    /// Leave the mesh and stop.
    Logout(oneshot::Sender<Result<(), String>>),
    /// Sign the node's user in again (`lattice login`).
    Login(oneshot::Sender<Result<(), String>>),
    /// Ask for just-in-time access (`lattice request-access`); answered with the request id.
    RequestAccess(AccessRequestJson, oneshot::Sender<Result<i64, String>>),
    /// Ping a peer over its current path (`lattice ping`).
    Ping(String, oneshot::Sender<Result<PingJson, String>>),
}

/// One answered `lattice ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingJson {
    /// The peer's name.
    pub peer: String,
    /// Its IPv4 overlay address, if it has one.
    pub ip: Option<IpAddr>,
    /// `direct` or `relay`.
    pub path: String,
    /// The direct address the pong came from.
    pub addr: Option<SocketAddr>,
    /// The relay it came through.
    pub relay: Option<String>,
    /// The round trip, milliseconds.
    pub rtt_ms: f64,
}

/// `lattice request-access` as sent to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRequestJson {
    /// Destination (`tag:prod`).
    pub to: String,
    /// Ports (`22,5432`).
    pub ports: String,
    /// Duration, seconds.
    pub for_secs: u64,
    /// Why.
    pub reason: String,
}

/// Serves the local API on `path` until the process ends.
pub async fn serve(
    path: &Path,
    requests: mpsc::Sender<ApiRequest>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another lattice daemon is running with this state dir ({} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/whois/{ip}", get(whois))
        .route("/v1/netcheck", post(netcheck))
        .route("/v1/down", post(down))
        .route("/v1/logout", post(logout))
        .route("/v1/login", post(login))
        .route("/v1/request-access", post(request_access))
        .route("/v1/ping/{target}", post(ping))
        .with_state(requests);
    // On shutdown, answers in flight still go out (`lattice down` waits for its answer).
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

type Req = State<mpsc::Sender<ApiRequest>>;

async fn ask<T>(
    tx: &mpsc::Sender<ApiRequest>,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest,
) -> Result<T, StatusCode> {
    let (otx, orx) = oneshot::channel();
    tx.send(make(otx))
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    orx.await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
}

async fn status(State(tx): Req) -> Result<Json<StatusJson>, StatusCode> {
    Ok(Json(ask(&tx, ApiRequest::Status).await?))
}

async fn whois(
    State(tx): Req,
    UrlPath(ip): UrlPath<IpAddr>,
) -> Result<Json<WhoisJson>, StatusCode> {
    ask(&tx, |o| ApiRequest::Whois(ip, o))
        .await?
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

async fn netcheck(State(tx): Req) -> Result<Json<NetcheckJson>, StatusCode> {
    Ok(Json(ask(&tx, ApiRequest::Netcheck).await?))
}

async fn down(State(tx): Req) -> Result<Json<serde_json::Value>, StatusCode> {
    ask(&tx, ApiRequest::Down).await?;
    Ok(Json(serde_json::json!({"stopping": true})))
}

async fn logout(State(tx): Req) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    match ask(&tx, ApiRequest::Logout).await {
        Ok(Ok(())) => Ok(Json(serde_json::json!({"logged_out": true}))),
        Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, e)),
        Err(code) => Err((code, "the daemon is not answering".into())),
    }
}

async fn login(State(tx): Req) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    match ask(&tx, ApiRequest::Login).await {
        Ok(Ok(())) => Ok(Json(serde_json::json!({"started": true}))),
        Ok(Err(e)) => Err((StatusCode::CONFLICT, e)),
        Err(code) => Err((code, "the daemon is not answering".into())),
    }
}

async fn ping(
    State(tx): Req,
    UrlPath(target): UrlPath<String>,
) -> Result<Json<PingJson>, (StatusCode, String)> {
    match ask(&tx, |o| ApiRequest::Ping(target, o)).await {
        Ok(Ok(p)) => Ok(Json(p)),
        Ok(Err(e)) => Err((StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(code) => Err((code, "the daemon is not answering".into())),
    }
}

async fn request_access(
    State(tx): Req,
    Json(req): Json<AccessRequestJson>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        ask(&tx, |o| ApiRequest::RequestAccess(req, o)),
    )
    .await
    .map_err(|_| {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "the coordinator did not answer".to_owned(),
        )
    })?;
    match answer {
        Ok(Ok(id)) => Ok(Json(serde_json::json!({"id": id}))),
        Ok(Err(e)) => Err((StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(code) => Err((code, "the daemon is not answering".into())),
    }
}

/// Calls the local API of the daemon whose socket is `socket`. Returns the status code and
/// body.
pub async fn call(
    socket: &Path,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<(StatusCode, Bytes)> {
    call_with(socket, method, path, None).await
}

/// [`call`] with a JSON body.
pub async fn call_with(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    json: Option<&serde_json::Value>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
        format!(
            "no lattice daemon is answering on {} (is `lattice up` running with this --state-dir?)",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(
            json.map_or_else(Bytes::new, |j| Bytes::from(j.to_string())),
        ))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
