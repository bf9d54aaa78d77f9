//! Command-line interface of `lattice-coordinator`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The Lattice coordinator: identities, netmaps, policy and audit for a mesh.
#[derive(Debug, Parser)]
#[command(name = "lattice-coordinator", version, about)]
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

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator.
    Serve(Box<ServeArgs>),
    /// Manage auth keys.
    Authkey {
        /// What to do with auth keys.
        #[command(subcommand)]
        command: AuthkeyCommand,
    },
    /// Manage nodes.
    Nodes {
        /// What to do with nodes.
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Read and check the audit log.
    Audit {
        /// What to do with the audit log.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check, set, show and compare the access policy.
    Policy {
        /// What to do with the policy.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Manage standalone relays (the embedded relay is always listed first).
    Relays {
        /// What to do with relays.
        #[command(subcommand)]
        command: RelaysCommand,
    },
    /// Workload identity federation: which outside issuers' tokens may join, and as what.
    Federation {
        /// What to do with federation rules.
        #[command(subcommand)]
        command: FederationCommand,
    },
    /// Sign in to a coordinator's admin API through the mesh's identity provider (for people
    /// listed with `serve --oidc-admin` or in an `--oidc-admin-group`): prints the sign-in
    /// link on stderr and, once you signed in, an admin token for 12 hours alone on stdout
    /// (use it with --server and --token).
    Login {
        /// The admin listener, `https://HOST:PORT` (serve --admin-listen).
        #[arg(long, env = "LATTICE_COORDINATOR_SERVER")]
        server: String,
        /// The admin listener's certificate SHA-256 (64 hex digits; the coordinator prints it
        /// when it starts).
        #[arg(long)]
        cert_sha256: String,
        /// How long to wait for the sign-in.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Just-in-time access requests: list, approve, deny.
    Access {
        /// What to do with access requests.
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// People who signed in through the mesh's identity provider.
    Users {
        /// What to do with users.
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Mesh-wide settings.
    Settings {
        /// Show or change settings.
        #[command(subcommand)]
        command: SettingsCommand,
    },
    /// Back up the coordinator while it runs: its keys and a consistent copy of its SQLite
    /// database, in one new file (for PostgreSQL, the keys only: use pg_dump for the
    /// database).
    Backup {
        /// The file to create (owner-only).
        out: PathBuf,
        /// The coordinator's state directory.
        #[command(flatten)]
        state: StateDirArg,
        /// The coordinator's database URL, if it is not the state dir's SQLite file.
        #[arg(long, env = "LATTICE_COORDINATOR_DB")]
        db: Option<String>,
    },
    /// Restore a backup into a state directory (the coordinator must be stopped); what the
    /// directory held is kept in `before-restore-UNIXTIME` inside it.
    Restore {
        /// The backup file.
        from: PathBuf,
        /// The coordinator's state directory.
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Manage admin tokens for `--server URL --token TOKEN` access.
    Token {
        /// What to do with admin tokens.
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// `serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read flags from this TOML file: its keys are the long flags (`port = 41642`,
    /// `accept-dns = true`, lists as arrays); flags on the command line and their environment
    /// variables win over it. An unknown key is an error naming file:line:col.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// HTTP listen address (control channel, key, embedded relay's WebSocket).
    #[arg(
        long,
        default_value = "0.0.0.0:8080",
        env = "LATTICE_COORDINATOR_LISTEN"
    )]
    pub listen: SocketAddr,
    /// State directory: control key, database and admin socket.
    #[arg(
        long,
        env = "LATTICE_COORDINATOR_STATE_DIR",
        default_value = "/var/lib/lattice-coordinator"
    )]
    pub state_dir: PathBuf,
    /// Database URL (default: SQLite file in the state dir).
    #[arg(long, env = "LATTICE_COORDINATOR_DB")]
    pub db: Option<String>,
    /// The URL nodes use to reach this coordinator (shown in the join example).
    #[arg(long, env = "LATTICE_COORDINATOR_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// DNS domain of the mesh (only used when the mesh is first created).
    #[arg(long, default_value = "mesh.internal")]
    pub domain: String,
    /// How long an ephemeral node may be disconnected before it is removed.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub ephemeral_timeout: Duration,
    /// Access policy file (HuJSON) to put in force at start. It must pass every check, or the
    /// coordinator does not start. Without it, the last policy set stays in force.
    #[arg(long, env = "LATTICE_COORDINATOR_POLICY")]
    pub policy: Option<PathBuf>,
    /// Do not run the embedded relay and STUN server (nodes then use only registered relays).
    #[arg(long)]
    pub no_embedded_relay: bool,
    /// HTTPS address of the admin API for admin tokens (`--server https://ADDR`). Without
    /// it the admin API is only on the Unix socket in the state dir.
    #[arg(long, env = "LATTICE_COORDINATOR_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus metrics at `http://ADDR/metrics` (`off` turns them off) [default:
    /// 127.0.0.1:9430, skipped with a warning if that port is taken].
    #[arg(long, env = "LATTICE_COORDINATOR_METRICS_LISTEN")]
    pub metrics_listen: Option<relay::metrics::Listen>,
    /// UDP address of the embedded relay's QUIC listener (default: the --listen address).
    #[arg(long)]
    pub relay_listen: Option<SocketAddr>,
    /// Threads serving the embedded relay's QUIC, each with an endpoint of its own on the
    /// --relay-listen port [default: one per four CPUs, 1 to 4; see `lattice-relay serve
    /// --quic-threads`].
    #[arg(long, env = "LATTICE_COORDINATOR_RELAY_QUIC_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub relay_quic_threads: Option<u16>,
    /// The most one node may send through the embedded relay, in megabits a second (a tenth
    /// of a second's worth at once); what is beyond is dropped [default: no limit; see
    /// `lattice-relay serve --client-rate-limit`].
    #[arg(long, env = "LATTICE_COORDINATOR_RELAY_CLIENT_RATE_LIMIT", value_name = "MBIT", value_parser = clap::value_parser!(u32).range(1..))]
    pub relay_client_rate_limit: Option<u32>,
    /// UDP address of the embedded STUN server (repeatable). Nodes compare what two servers
    /// see to detect hard NAT, so the default listens on two ports.
    #[arg(long = "stun-listen", default_values = ["0.0.0.0:3478", "0.0.0.0:3479"])]
    pub stun_listen: Vec<SocketAddr>,
    /// CA certificates (PEM) to trust, besides the system's, when fetching the signing keys
    /// of federation issuers (a Kubernetes cluster's CA, a private IdP).
    #[arg(long, env = "LATTICE_COORDINATOR_FEDERATION_CA_FILE")]
    pub federation_ca_file: Option<PathBuf>,
    /// Let people sign in through this OpenID Connect provider (its issuer URL): a device
    /// that runs `lattice up` without an auth key shows a sign-in link. Needs --public-url
    /// (the provider sends browsers back to PUBLIC_URL/oidc/callback) and the client flags.
    #[arg(long, env = "LATTICE_COORDINATOR_OIDC_ISSUER", requires_all = ["oidc_client_id", "oidc_client_secret_file", "public_url"])]
    pub oidc_issuer: Option<String>,
    /// Our client id at the provider.
    #[arg(long, env = "LATTICE_COORDINATOR_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// A file holding our client secret at the provider (one line).
    #[arg(long, env = "LATTICE_COORDINATOR_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// Where the groups are in the ID token: a claim name, or a dotted path into nested
    /// claims (Keycloak: `realm_access.roles`; Entra ID: `groups`).
    #[arg(long, default_value = "groups")]
    pub oidc_groups_claim: String,
    /// Only people whose verified e-mail is in this domain may sign in (repeatable; default:
    /// anyone the provider vouches for).
    #[arg(long = "oidc-allowed-domain")]
    pub oidc_allowed_domains: Vec<String>,
    /// An `acr` value that means the sign-in used a second factor (repeatable; providers
    /// name them differently). An `amr` listing a second factor always counts.
    #[arg(long = "oidc-mfa-acr")]
    pub oidc_mfa_acr: Vec<String>,
    /// A person (login name, their e-mail) who may sign in to the admin API with
    /// `lattice-coordinator login` (repeatable).
    #[arg(long = "oidc-admin")]
    pub oidc_admins: Vec<String>,
    /// Members of this provider group may sign in to the admin API (repeatable).
    #[arg(long = "oidc-admin-group")]
    pub oidc_admin_groups: Vec<String>,
}

/// Flags shared by admin commands.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// State directory of the running coordinator (its admin socket lives there).
    #[arg(
        long,
        env = "LATTICE_COORDINATOR_STATE_DIR",
        default_value = "/var/lib/lattice-coordinator"
    )]
    pub state_dir: PathBuf,
    /// Reach a coordinator's admin listener (`https://HOST:PORT`, its --admin-listen) instead
    /// of the local socket (needs --token, which carries the listener's certificate pin).
    #[arg(long, env = "LATTICE_COORDINATOR_SERVER")]
    pub server: Option<String>,
    /// Admin token for --server.
    #[arg(long, env = "LATTICE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `--state-dir` for commands that work on the files of a coordinator on this host.
#[derive(Debug, Args)]
pub struct StateDirArg {
    /// The coordinator's state directory.
    #[arg(
        long,
        env = "LATTICE_COORDINATOR_STATE_DIR",
        default_value = "/var/lib/lattice-coordinator"
    )]
    pub state_dir: PathBuf,
}

/// `authkey` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuthkeyCommand {
    /// Create an auth key and print it.
    Create {
        /// Allow the key to register any number of nodes.
        #[arg(long)]
        reusable: bool,
        /// Nodes registered with it are removed once they go away.
        #[arg(long)]
        ephemeral: bool,
        /// Tag for nodes registered with it (repeatable), e.g. tag:db.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// User who owns nodes registered with it.
        #[arg(long)]
        user: Option<String>,
        /// How long the key stays valid (e.g. 30m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        expiry: Duration,
        /// Print the key and its metadata as JSON.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List auth keys (never their secrets).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke an auth key by id.
    Revoke {
        /// The key id (the 12 hex digits after the fingerprint).
        id: String,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `nodes` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List nodes.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a node: its peers stop accepting its packets within seconds.
    Remove {
        /// Node name.
        name: String,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Expire a node's key: it drops out of the mesh until it re-joins with an auth key.
    Expire {
        /// Node name.
        name: String,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show or change the routes a node serves for the mesh (subnet routes, exit routes):
    /// what it advertises, what is approved (here or by the policy's autoApprovers) and
    /// what it is the primary router for.
    Routes {
        /// Node name.
        name: String,
        /// Approve an advertised route (CIDR; repeatable; 0.0.0.0/0 and ::/0 make it an exit
        /// node).
        #[arg(long = "approve")]
        approve: Vec<ipnet::IpNet>,
        /// Withdraw an approval (repeatable).
        #[arg(long = "unapprove")]
        unapprove: Vec<ipnet::IpNet>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show or change a node's admin-set attributes (`custom:NAME`), which postures can test.
    Attr {
        /// Node name.
        name: String,
        /// Set an attribute: custom:NAME=VALUE (true/false and numbers are typed; repeatable).
        #[arg(long = "set", value_parser = parse_attr)]
        set: Vec<(String, String)>,
        /// Remove an attribute: custom:NAME (repeatable).
        #[arg(long = "unset")]
        unset: Vec<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `federation` subcommands.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Trust tokens from an issuer (a CI system, a Kubernetes cluster, a SPIFFE trust domain):
    /// those for `--audience` whose claims match every `--match` join with the `--tag`s,
    /// ephemeral unless `--persistent`, until the token (or `--max-lifetime`) ends.
    Add {
        /// The tokens' exact `iss` (https://; http:// only on this host).
        #[arg(long)]
        issuer: String,
        /// The audience tokens must carry (`aud`).
        #[arg(long)]
        audience: String,
        /// CLAIM=GLOB that the token's claims must meet (repeatable; `*` matches anything),
        /// for example `sub=repo:org/app:*`.
        #[arg(long = "match", value_name = "CLAIM=GLOB")]
        matches: Vec<String>,
        /// Tag for the nodes (repeatable; declared in the policy's tagOwners).
        #[arg(long = "tag", required = true)]
        tags: Vec<String>,
        /// Nodes are removed when they go offline (the default).
        #[arg(long, conflicts_with = "persistent")]
        ephemeral: bool,
        /// Nodes stay in the mesh when they go offline.
        #[arg(long)]
        persistent: bool,
        /// The longest access one token grants, from its issue (e.g. 1h).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_lifetime: Option<Duration>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the rules.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a rule. Nodes that joined through it keep access until their token ends, and
    /// cannot renew it.
    Remove {
        /// The rule's id.
        id: i64,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `relays` subcommands.
#[derive(Debug, Subcommand)]
pub enum RelaysCommand {
    /// Register a standalone relay (`lattice-relay serve` prints the command to run).
    Add {
        /// Its name (shown as `relay NAME` in `lattice status`).
        name: String,
        /// Its key (`relaykey:...`).
        #[arg(long)]
        key: wire::RelayKey,
        /// Its QUIC address (UDP).
        #[arg(long)]
        quic: Option<SocketAddr>,
        /// SHA-256 of its certificate (hex), pinned by nodes.
        #[arg(long)]
        cert_sha256: Option<String>,
        /// Its WebSocket URL (http://host:port/relay).
        #[arg(long)]
        websocket: Option<String>,
        /// A STUN server it runs (repeatable).
        #[arg(long)]
        stun: Vec<SocketAddr>,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the relays nodes use.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the embedded relay's sessions and counters.
    Stats {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a registered relay.
    Remove {
        /// Its name.
        name: String,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file offline: syntax, references and its tests. Prints every problem as
    /// file:line:col and exits 1 if there is any.
    Check {
        /// The HuJSON policy file.
        file: PathBuf,
    },
    /// Put a policy file in force. It is checked (against the current nodes, tests included)
    /// first; if anything fails it is rejected and the policy in force stays.
    Set {
        /// The HuJSON policy file.
        file: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the policy in force (or an earlier version).
    Get {
        /// A stored version instead of the one in force.
        #[arg(long)]
        version: Option<i64>,
        /// JSON output (with version metadata).
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show who would gain and who would lose access if FILE were set.
    Diff {
        /// The HuJSON policy file.
        file: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List every stored version.
    Versions {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replay policy cases recorded against the real Tailscale service (a directory in the
    /// format of tests/conformance/tailscale-acl, searched recursively; offline) and compare
    /// per node: the packet filter by meaning, the visible peers, and refusals. Prints a table
    /// per category and, last, `conformance: P/N passed`.
    Conformance {
        /// The directory of cases.
        dir: PathBuf,
        /// JSON output: the tallies and every case that did not pass, with why.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `custom:NAME=VALUE`.
pub fn parse_attr(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected custom:NAME=VALUE"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit entries.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check the hash chain; exits 1 if any entry was modified or deleted.
    Verify {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print every entry as JSON lines (for a SIEM).
    Export {
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `access` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Requests waiting for a decision and grants in force (newest first).
    List {
        /// Every request ever filed, decided and ended ones too.
        #[arg(long)]
        all: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Approve a request: the access starts now and lasts what was asked for. A person
    /// signed in with `login` must be an approver the policy names for the destination, and
    /// not the requester.
    Approve {
        /// The request's id.
        id: i64,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deny a request.
    Deny {
        /// The request's id.
        id: i64,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `users` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// List the users, with the groups their last sign-in carried.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set how long this user's node keys last (from their next sign-in), or `default` for
    /// the mesh's setting.
    SetKeyExpiry {
        /// The user's login name (e-mail).
        user: String,
        /// A duration (30d, 12h) or `default`.
        #[arg(value_parser = parse_user_expiry)]
        expiry: Reauth,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn parse_user_expiry(s: &str) -> Result<Reauth, String> {
    if s == "default" {
        return Ok(Reauth(None));
    }
    humantime::parse_duration(s)
        .map(|d| Reauth(Some(d)))
        .map_err(|e| format!("{e} (expected a duration such as 30d, or default)"))
}

/// `settings` subcommands.
#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Show the settings.
    Get {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set how tunnels are keyed: `post-quantum` (default) or `classical-only` (every tunnel
    /// without a post-quantum key; for interop with stock WireGuard; audited).
    SetTunnelSecurity {
        /// post-quantum or classical-only.
        #[arg(value_enum)]
        value: TunnelSecurityArg,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set how long the key of a node that joined by signing in lasts (default 180d; a
    /// user's own setting, `users set-key-expiry`, wins). Keys issued from now on get it.
    SetKeyExpiry {
        /// A duration: 90d, 12h.
        #[arg(value_parser = humantime::parse_duration)]
        expiry: Duration,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make people sign in again every DURATION (their nodes' keys then last at most that
    /// long), or `off`.
    SetReauthEvery {
        /// A duration (12h) or `off`.
        #[arg(value_parser = parse_reauth)]
        every: Reauth,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// A duration, or none (`off`, `default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reauth(pub Option<Duration>);

fn parse_reauth(s: &str) -> Result<Reauth, String> {
    if s == "off" {
        return Ok(Reauth(None));
    }
    humantime::parse_duration(s)
        .map(|d| Reauth(Some(d)))
        .map_err(|e| format!("{e} (expected a duration such as 12h, or off)"))
}

/// Tunnel security values on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TunnelSecurityArg {
    /// Every tunnel carries a post-quantum preshared key.
    PostQuantum,
    /// Classical WireGuard keys only.
    ClassicalOnly,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an admin token (only over the local socket) and print it.
    Create {
        /// What it may do: `read` (list, get, verify, export) or `write` (also change).
        #[arg(long, value_enum, default_value_t = TokenScopeArg::Write)]
        scope: TokenScopeArg,
        /// How long it lasts (e.g. 12h, 30d; at most 365d).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
        expiry: Duration,
        /// JSON output (id, scope, expiry and the token).
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List admin tokens (never their secrets).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke an admin token by id.
    Revoke {
        /// Token id (the 12 hex digits after `lt2-`).
        id: String,
        /// Where the coordinator is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Scopes of admin tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenScopeArg {
    /// Read only.
    Read,
    /// Read and change.
    Write,
}

/// Parses `30s`, `5m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 30s, 5m, 1h, 7d)"))
}
