//! Command-line interface of `lattice`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Lattice: join this device to a mesh and talk to its peers.
#[derive(Debug, Parser)]
#[command(name = "lattice", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LATTICE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the daemon keeps its state (and its local API socket).
#[derive(Debug, Clone, Args)]
pub struct StateDirArg {
    /// State directory: keys, coordinator pin, netmap cache, local API socket.
    #[arg(long, env = "LATTICE_STATE_DIR", default_value = "/var/lib/lattice")]
    pub state_dir: PathBuf,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join the mesh (first time) or resume, and run the node in the foreground.
    Up(Box<UpArgs>),
    /// Show this node and its peers.
    Status {
        /// JSON output (stable fields for scripts).
        #[arg(long)]
        json: bool,
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Tell which node owns an overlay address.
    Whois {
        /// An overlay IPv4 or IPv6 address.
        ip: std::net::IpAddr,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Measure this node's network: UDP, public address, NAT behaviour (hard NAT or not),
    /// port mapping, and the latency to each relay.
    Netcheck {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Ping a peer (its name, FQDN or overlay address) at the discovery level: each reply says
    /// which path it took (a direct address, or a relay) and how long it took. Exits 1 if
    /// no reply came.
    Ping {
        /// The peer.
        target: String,
        /// How many pings, one a second.
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// One JSON object per reply.
        #[arg(long)]
        json: bool,
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Stop the running node (an ephemeral node also leaves the mesh).
    Down {
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Sign this node's user in again at the mesh's identity provider (renews the node's
    /// key and refreshes the user's groups): prints `To authenticate, visit: URL` and waits
    /// until the sign-in is done.
    Login {
        /// How long to wait for the sign-in.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Ask for just-in-time access to a destination the policy's `accessRequests` names; an
    /// approver decides (`lattice-coordinator access approve ID`), and the access then lasts
    /// --for from the approval.
    RequestAccess {
        /// The destination, as the policy names it (tag:prod).
        #[arg(long)]
        to: String,
        /// Ports: 22,5432, 8000-8099 or *.
        #[arg(long)]
        ports: String,
        /// How long, once approved (30m, 4h).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Why (the approvers see it; the audit log keeps it).
        #[arg(long)]
        reason: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Leave the mesh for good: the coordinator forgets this node and its keys are deleted.
    Logout {
        /// Where the daemon is.
        #[command(flatten)]
        state: StateDirArg,
    },
}

/// `up` flags.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Read flags from this TOML file: its keys are the long flags (`port = 41642`,
    /// `accept-dns = true`, lists as arrays); flags on the command line and their environment
    /// variables win over it. An unknown key is an error naming file:line:col.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Coordinator URL, e.g. `http://coord.example:8080` (remembered after the first join).
    /// Repeat it (or separate with commas) for a mesh served by several replicas: the first
    /// is used to join, the others when it does not answer.
    #[arg(long, env = "LATTICE_COORDINATOR", value_delimiter = ',')]
    pub coordinator: Vec<String>,
    /// Auth key from `lattice-coordinator authkey create` (needed to join, not to resume).
    #[arg(long, env = "LATTICE_AUTH_KEY", hide_env_values = true)]
    pub auth_key: Option<String>,
    /// Join (and stay) with a token from an outside issuer the mesh trusts instead of an auth
    /// key (workload identity federation: a Kubernetes service-account token, a CI job's
    /// OIDC token, a SPIFFE JWT-SVID). The file is read on every connection and every 30 s;
    /// a refreshed token renews the node's access, which ends when the token's does.
    #[arg(long, conflicts_with_all = ["auth_key", "id_token_env"])]
    pub id_token_file: Option<PathBuf>,
    /// Like --id-token-file, from this environment variable (read on every connection).
    #[arg(long, value_name = "VAR", conflicts_with = "auth_key")]
    pub id_token_env: Option<String>,
    /// How often the --id-token-file is read for a fresh token (sent when it changed).
    #[arg(long, default_value = "30s", value_parser = parse_id_token_refresh)]
    pub id_token_refresh: std::time::Duration,
    /// The coordinator's key fingerprint (32 hex digits; `lattice-coordinator serve` prints
    /// it), to authenticate the coordinator on the first join with an id token (an auth key
    /// carries it).
    #[arg(long, env = "LATTICE_COORDINATOR_FINGERPRINT")]
    pub coordinator_fingerprint: Option<String>,
    /// Name to ask for (default: the OS hostname); the coordinator makes it unique.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Offer to route these subnets for the mesh (CIDRs, comma-separated); an admin approves
    /// them (`lattice-coordinator nodes routes NAME --approve CIDR`) or the policy's
    /// autoApprovers do.
    #[arg(long, value_delimiter = ',')]
    pub advertise_routes: Vec<ipnet::IpNet>,
    /// Offer to be an exit node (advertises 0.0.0.0/0 and ::/0).
    #[arg(long)]
    pub advertise_exit_node: bool,
    /// Send internet traffic through this peer (its name, FQDN or overlay address), an exit
    /// node an admin approved. The LAN, the coordinator, relays and peers stay reachable as
    /// before; while the exit node is unavailable, internet traffic is dropped, never sent
    /// out by the local network (`lattice status` says why).
    #[arg(long, value_name = "NAME", conflicts_with = "advertise_exit_node")]
    pub exit_node: Option<String>,
    /// Masquerade mesh traffic to the advertised subnets behind this node's own address
    /// (`--snat-subnet-routes=false` keeps the senders' mesh addresses; the LAN then needs a
    /// route back to the mesh through this node).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub snat_subnet_routes: bool,
    /// Where the daemon keeps its state.
    #[command(flatten)]
    pub state: StateDirArg,
    /// UDP port for tunnels [default: 41641, or a random one where the policy's nodeAttrs
    /// give this node `randomize-client-port`]; 0 picks a free one.
    #[arg(long)]
    pub port: Option<u16>,
    /// Point the system resolver at the mesh DNS (through systemd-resolved; never edits
    /// /etc/resolv.conf).
    #[arg(long)]
    pub accept_dns: bool,
    /// Name of the TUN device.
    #[arg(long, default_value = "lattice0")]
    pub tun_name: String,
    /// MTU of the TUN device.
    #[arg(long, default_value_t = 1280)]
    pub mtu: u16,
    /// How often the post-quantum preshared key of each tunnel is replaced (this node rotates
    /// the tunnels it initiates).
    #[arg(long, default_value = "2m", value_parser = parse_rotation)]
    pub pq_rotation: std::time::Duration,
    /// How often this node collects its posture (OS, versions, disk encryption, firewall,
    /// --posture-command facts) and reports changes to the coordinator.
    #[arg(long, default_value = "3s", value_parser = parse_posture_interval)]
    pub posture_interval: std::time::Duration,
    /// Command (run with `sh -c`) printing `NAME=VALUE` lines, reported as `fact:NAME` posture
    /// facts that policies can require. A failing command reports no facts.
    #[arg(long, env = "LATTICE_POSTURE_COMMAND")]
    pub posture_command: Option<String>,
    /// Prometheus metrics at `http://ADDR/metrics` (off unless given; a node's metrics name
    /// its peers).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Do not ask the gateway for a port mapping (UPnP-IGD, NAT-PMP, PCP).
    #[arg(long)]
    pub no_port_mapping: bool,
    /// Data-plane workers: each reads its own TUN queue and UDP socket and encrypts and
    /// decrypts on its own thread [default: one per CPU, at most 8].
    #[arg(long, env = "LATTICE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: Option<u16>,
    /// Whether each data-plane worker runs as a pipeline: a thread of its own encrypts and
    /// decrypts each batch and another finishes it while the worker reads the next, and
    /// helper tasks send its datagrams and write the TUN device (true); or the worker does it
    /// all itself (false) [default: true where there are at least two CPUs per worker].
    #[arg(long, env = "LATTICE_IO_HELPERS", value_name = "BOOL")]
    pub io_helpers: Option<bool>,
    /// Whether each peer sending data gets a data-plane worker of its own, the worker that
    /// receives its datagrams handing them over (true), or stays with the worker the
    /// kernel's hash picks (false) [default: true where there are at least two CPUs per
    /// worker].
    #[arg(long, env = "LATTICE_STEERING", value_name = "BOOL")]
    pub steering: Option<bool>,
    /// Threads that share the encryption and decryption of the pipelined workers' batches
    /// (with --io-helpers): a big batch (one busy stream's) is split between its worker's
    /// crypto thread and these, so one stream is encrypted on several cores [default: half
    /// the CPUs less two, at most 8: six on 16 CPUs, none up to 4].
    #[arg(long, env = "LATTICE_AEAD_HELPERS", value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub aead_helpers: Option<u16>,
}

fn parse_id_token_refresh(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 30s, 1m)"))?;
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(3600) {
        return Err("the id token refresh interval must be between 1s and 1h".into());
    }
    Ok(d)
}

fn parse_posture_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 3s, 1m)"))?;
    if d < std::time::Duration::from_millis(500) || d > std::time::Duration::from_secs(3600) {
        return Err("the posture interval must be between 500ms and 1h".into());
    }
    Ok(d)
}

fn parse_rotation(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 30s, 2m)"))?;
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(3600) {
        return Err("the rotation interval must be between 1s and 1h".into());
    }
    Ok(d)
}
