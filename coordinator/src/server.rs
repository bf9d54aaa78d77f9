//! `lattice-coordinator serve`: opens the state, binds the listeners, runs until a signal.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::Request;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use hybrid::StaticKeypair;
use rand::{SeedableRng, rngs::StdRng};
use tokio::net::{TcpListener, UnixListener};
use tracing::{error, info, warn};

use crate::api::{self, Actor};
use crate::audit_store::AuditStore;
use crate::db;
use crate::feed::{self, ReplicaInfo};
use crate::hub::Hub;
use crate::state::{AppState, Inner, unix_now};
use crate::{addr, ops, relays};

/// Settings for `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// State directory (key, database, admin socket).
    pub state_dir: PathBuf,
    /// Database URL; default is SQLite in the state dir.
    pub db: Option<String>,
    /// URL nodes use to reach this coordinator (for the join example).
    pub public_url: Option<String>,
    /// Mesh DNS domain (used when the mesh is created).
    pub domain: String,
    /// How long an ephemeral node may stay away.
    pub ephemeral_timeout: Duration,
    /// Policy file to put in force at start.
    pub policy: Option<PathBuf>,
    /// Run the embedded relay and STUN server.
    pub embedded_relay: bool,
    /// QUIC address of the embedded relay (default: `listen`).
    pub relay_listen: Option<SocketAddr>,
    /// Threads serving the embedded relay's QUIC.
    pub relay_quic_threads: usize,
    /// What the embedded relay forwards for each node at most (`None`: no limit).
    pub relay_client_rate: Option<relay::ClientRate>,
    /// STUN addresses of the embedded relay.
    pub stun_listen: Vec<SocketAddr>,
    /// HTTPS address of the admin API for admin tokens (off without it: only the Unix
    /// socket).
    pub admin_listen: Option<SocketAddr>,
    /// `--metrics-listen` (default 127.0.0.1:9430).
    pub metrics_listen: Option<relay::metrics::Listen>,
    /// Extra CA certificates (PEM) for fetching federation issuers' keys.
    pub federation_ca_file: Option<PathBuf>,
    /// The OpenID Connect provider people sign in through, if any.
    pub oidc: Option<OidcServeConfig>,
}

/// `serve --oidc-*`.
#[derive(Debug, Clone)]
pub struct OidcServeConfig {
    /// The provider and what to read from its tokens.
    pub cfg: crate::oidc::OidcConfig,
    /// The file holding the client secret.
    pub client_secret_file: PathBuf,
    /// People who may sign in as admins.
    pub admins: Vec<String>,
    /// Provider groups whose members may.
    pub admin_groups: Vec<String>,
}

/// Where metrics are served unless `--metrics-listen` says otherwise.
const DEFAULT_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9430);

/// Name of the admin socket inside the state dir.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// The admin listener's self-signed TLS certificate and key, in the state dir.
pub(crate) const ADMIN_CERT_FILE: &str = "admin-cert.der";
pub(crate) const ADMIN_CERT_KEY_FILE: &str = "admin-cert-key.der";
pub(crate) const CONTROL_KEY_FILE: &str = "control.key";
/// Every file the coordinator (and its embedded relay) keeps in its state dir.
const STATE_FILES: &[&str] = &[
    ADMIN_SOCKET,
    ADMIN_CERT_FILE,
    ADMIN_CERT_KEY_FILE,
    CONTROL_KEY_FILE,
    "coordinator.db",
    "coordinator.db-wal",
    "coordinator.db-shm",
    crate::audit_store::KEY_FILE,
    crate::audit_store::CHECKPOINT_FILE,
    relays::TICKET_KEY_FILE,
    // The embedded relay's key and certificate.
    "relay",
];

/// Runs the coordinator until SIGINT or SIGTERM.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    raise_fd_limit();
    statefs::prepare_dir(&cfg.state_dir, STATE_FILES)
        .context("the state dir cannot hold the coordinator's keys")?;
    let control_key = load_or_create_key(&cfg.state_dir.join(CONTROL_KEY_FILE))?;
    let db_url = cfg
        .db
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("coordinator.db").display().to_string());
    let pool = db::open(&db_url)
        .await
        .with_context(|| format!("opening database {}", db::redacted(&db_url)))?;
    let now = unix_now();
    let mesh = {
        let mut conn = pool.acquire().await?;
        let ula = addr::random_ula(&mut StdRng::from_rng(&mut rand::rng()));
        db::mesh::get_or_create(&mut conn, &cfg.domain, ula, now).await?
    };
    let policy_text = match &cfg.policy {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --policy {}", path.display()))?,
        ),
        None => None,
    };
    let policy_name = cfg.policy.as_ref().map(|p| p.display().to_string());
    let audit = Arc::new(
        AuditStore::open(&cfg.state_dir, &pool)
            .await
            .context("opening the audit key and checkpoint")?,
    );
    if let Err(e) = audit.advance(&pool).await {
        error!(error = %e, "the audit log does not extend its checkpoint; run `audit verify`");
    }
    let (policy_version, policy) = ops::policy::load_at_start(
        &pool,
        audit.key(),
        policy_name.as_deref().zip(policy_text.as_deref()),
        &format!("local:uid={}", current_uid()),
    )
    .await?;
    if policy.is_default() {
        info!("no policy set: every node may reach every node (set one with `policy set FILE`)");
    } else {
        info!(
            version = policy_version,
            rules = policy.rule_count(),
            "policy in force"
        );
    }
    let hub = Hub::new(mesh.domain.clone(), policy, policy_version, Vec::new(), now);
    let tickets = Arc::new(relays::load_or_create_signer(&cfg.state_dir)?);
    check_mesh_keys(&pool, &control_key, &tickets, &audit).await?;
    let feed = Arc::new(feed::Feed::default());
    let embedded = if cfg.embedded_relay {
        Some(
            relays::start_embedded(
                &relays::EmbeddedConfig {
                    quic_listen: cfg.relay_listen.unwrap_or(cfg.listen),
                    stun_listen: cfg.stun_listen.clone(),
                    http_listen: cfg.listen,
                    public_url: cfg.public_url.clone(),
                    quic_threads: cfg.relay_quic_threads,
                    client_rate: cfg.relay_client_rate,
                },
                &cfg.state_dir,
                Arc::clone(&hub),
                wire::TicketKey::from_bytes(tickets.public()),
                Arc::clone(&feed),
            )
            .await?,
        )
    } else {
        None
    };
    let admin_cert =
        relay::identity::load_or_create_cert(&cfg.state_dir, ADMIN_CERT_FILE, ADMIN_CERT_KEY_FILE)
            .context("loading the admin listener's certificate")?;
    let sign_in = sign_in(cfg.oidc.as_ref(), cfg.public_url.as_deref())?;
    if let Some(s) = &sign_in {
        hub.set_roles(crate::hub::Roles {
            admins: s.admins.clone(),
            admin_groups: s.admin_groups.clone(),
        });
    }
    let st = AppState::new(Inner {
        db: pool,
        hub,
        fingerprint: hybrid::fingerprint(&control_key.public()),
        control_key,
        mesh,
        ephemeral_timeout: cfg.ephemeral_timeout,
        tickets,
        embedded_relay: embedded.as_ref().map(|e| e.info.clone()),
        relay: embedded.as_ref().map(|e| e.relay.clone()),
        admission: Default::default(),
        admin_pin: admin_cert.pin(),
        audit: Arc::clone(&audit),
        replica: ReplicaInfo::new(
            replica_url(cfg.public_url.as_deref(), cfg.listen),
            embedded.as_ref().map(|e| e.info.clone()),
        ),
        feed,
        presence: Arc::default(),
        keys: Arc::new(
            crate::jwks::KeyCache::new(cfg.federation_ca_file.as_deref())
                .context("--federation-ca-file")?,
        ),
        sign_in,
        code_guesses: Default::default(),
        counters: Default::default(),
        console: Default::default(),
    });
    crate::audit_store::spawn_checkpointer(audit, st.db.clone());
    feed::start(&st)
        .await
        .context("loading the mesh from the database")?;
    if st.hub.read().tunnel_security() == wire::TunnelSecurity::ClassicalOnly {
        warn!("tunnels are classical-only by admin setting: no post-quantum protection");
    }
    let offline_ephemeral: Vec<_> = st
        .hub
        .read()
        .nodes()
        .filter(|n| n.record.ephemeral && !n.online)
        .map(|n| n.record.id)
        .collect();

    let tcp = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local = tcp.local_addr()?;
    let admin_path = cfg.state_dir.join(ADMIN_SOCKET);
    let unix = bind_admin_socket(&admin_path).await?;
    let admin_tcp = match cfg.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin listener {addr}"))?,
        ),
        None => None,
    };
    let admin_local = admin_tcp
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;

    print_banner(&st, local, cfg.public_url.as_deref(), admin_local);
    info!(listen = %local, admin = %admin_path.display(), domain = %st.mesh.domain,
          ula = %st.mesh.ula_prefix, "coordinator started");

    for id in offline_ephemeral {
        api::control::schedule_ephemeral_collection(st.clone(), id);
    }
    if let Some(listener) =
        relay::metrics::listen(cfg.metrics_listen, Some(DEFAULT_METRICS)).await?
    {
        let addr = listener.local_addr()?;
        let (mst, stun) = (st.clone(), embedded.as_ref().map(|e| Arc::clone(&e.stun)));
        let render: relay::metrics::Render = Arc::new(move || {
            let (st, stun) = (mst.clone(), stun.clone());
            Box::pin(async move { crate::metrics::render(&st, stun.as_deref()).await })
        });
        tokio::spawn(relay::metrics::serve(listener, render));
        info!(%addr, "metrics at /metrics");
    }
    let sweeper = st.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
            ops::sweep_expired(&sweeper);
            sweeper.hub.tick(unix_now());
            if let Err(e) = ops::access::sweep(&sweeper, unix_now(), n.is_multiple_of(60)).await {
                warn!(error = %e, "could not end access grants");
            }
        }
    });

    let public = api::router(st.clone());
    let admin: Router = Router::new()
        .nest("/admin/v1", api::admin::router())
        .layer(middleware::from_fn(local_actor))
        .layer(middleware::from_fn(api::log_internal_errors))
        .with_state(st.clone());

    let shutdown = shutdown_signal();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_a = stop_rx.clone();
    let mut stop_b = stop_rx;
    let stop_public = async move {
        let _ = stop_a.changed().await;
    };
    let limits = relay::http::HttpLimits::default();
    let admin_srv = axum::serve(unix, admin.into_make_service_with_connect_info::<UdsPeer>())
        .with_graceful_shutdown(async move {
            let _ = stop_b.changed().await;
        });
    // With the embedded relay, its WebSocket fallback is served over TLS on the same port.
    let public_task = match &embedded {
        Some(e) => tokio::spawn(relay::http::serve_mixed(
            tcp,
            public,
            e.relay.router(),
            limits,
            Arc::clone(&e.ws_tls),
            stop_public,
        )),
        None => tokio::spawn(relay::http::serve(tcp, public, limits, stop_public)),
    };
    let admin_tls_task = match admin_tcp {
        Some(listener) => {
            let tls = relay::tls::server_tls(&admin_cert, &[b"http/1.1"])?;
            let mut stop_c = stop_tx.subscribe();
            Some(tokio::spawn(relay::http::serve_tls(
                listener,
                api::admin_router(st.clone()),
                relay::http::HttpLimits {
                    max_connections: 256,
                    per_ip: 32,
                    ..relay::http::HttpLimits::default()
                },
                Arc::new(tls),
                async move {
                    let _ = stop_c.changed().await;
                },
            )))
        }
        None => None,
    };
    let admin_task = tokio::spawn(async move { admin_srv.await });
    shutdown.await;
    info!("shutting down");
    if let Err(e) = feed::leave(&st).await {
        warn!(error = %e, "could not leave the replicas cleanly; the others will time this one out");
    }
    let _ = stop_tx.send(true);
    // WebSocket sessions do not end on their own; give handlers a moment, then exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = public_task.await;
        let _ = admin_task.await;
        if let Some(t) = admin_tls_task {
            let _ = t.await;
        }
    })
    .await;
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// The URL other nodes reach this replica at: `--public-url`, or the listen address when it
/// is a specific one.
fn replica_url(public_url: Option<&str>, listen: SocketAddr) -> Option<String> {
    match public_url {
        Some(u) => Some(u.trim_end_matches('/').to_owned()),
        None if !listen.ip().is_unspecified() => Some(format!("http://{listen}")),
        None => None,
    }
}

/// Every replica of a mesh must hold the same control, ticket and audit keys: the first
/// records them in the database, later ones must match.
async fn check_mesh_keys(
    pool: &db::Pool,
    control: &StaticKeypair,
    tickets: &hybrid::ticket::TicketSigner,
    audit: &AuditStore,
) -> anyhow::Result<()> {
    let hex = |b: &[u8]| {
        let mut s = String::new();
        wire::keys::push_hex(&mut s, b);
        s
    };
    let mine = db::mesh::MeshKeys {
        control: hex(&control.public()),
        ticket: hex(&tickets.public()),
        audit: hex(&audit.key().public()),
    };
    let mut tx = db::begin_write(pool).await?;
    let recorded = db::mesh::claim_keys(&mut tx, &mine).await?;
    tx.commit().await?;
    for (what, file, a, b) in [
        (
            "control",
            CONTROL_KEY_FILE,
            &mine.control,
            &recorded.control,
        ),
        (
            "ticket",
            relays::TICKET_KEY_FILE,
            &mine.ticket,
            &recorded.ticket,
        ),
        (
            "audit",
            crate::audit_store::KEY_FILE,
            &mine.audit,
            &recorded.audit,
        ),
    ] {
        if a != b {
            bail!(
                "this state dir's {what} key ({file}) is not the mesh's: every replica sharing \
                 this database needs the same {CONTROL_KEY_FILE}, {}, and {} as the first one \
                 (copy them from its state dir before starting this one)",
                relays::TICKET_KEY_FILE,
                crate::audit_store::KEY_FILE,
            );
        }
    }
    Ok(())
}

fn load_or_create_key(path: &Path) -> anyhow::Result<StaticKeypair> {
    let (secret, created) = statefs::load_or_create_secret(path, || {
        *StaticKeypair::generate(&mut rand::rng()).secret_bytes()
    })?;
    if created {
        info!(path = %path.display(), "generated a new control key");
    }
    Ok(StaticKeypair::from_secret(*secret))
}

/// Writes a 0600 file atomically (temp file + rename), so a crash never leaves half a key.
pub fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    Ok(statefs::write_private(path, contents)?)
}

async fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another coordinator is already running with this state dir ({} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The sign-in settings, checked: the issuer is https (or http on this host), the secret
/// file is readable and not empty, and there is a public URL for the provider to send
/// browsers back to.
fn sign_in(
    oidc: Option<&OidcServeConfig>,
    public_url: Option<&str>,
) -> anyhow::Result<Option<Arc<ops::people::SignIn>>> {
    let Some(o) = oidc else { return Ok(None) };
    ops::federation::check_issuer(&o.cfg.issuer)
        .map_err(|e| anyhow::anyhow!("--oidc-issuer: {e}"))?;
    let public_url = public_url
        .context("--oidc-issuer needs --public-url: the provider sends browsers back to PUBLIC_URL/oidc/callback")?
        .trim_end_matches('/')
        .to_owned();
    let secret = std::fs::read_to_string(&o.client_secret_file).with_context(|| {
        format!(
            "reading --oidc-client-secret-file {}",
            o.client_secret_file.display()
        )
    })?;
    if public_url.starts_with("http://") {
        warn!(%public_url, "people sign in over plain http: put the public listener behind TLS \
               (authorization codes and sign-in pages travel in clear otherwise)");
    }
    let secret = secret.trim().to_owned();
    if secret.is_empty() {
        bail!(
            "--oidc-client-secret-file {} is empty",
            o.client_secret_file.display()
        );
    }
    info!(issuer = %o.cfg.issuer, client_id = %o.cfg.client_id,
          redirect_uri = %format!("{public_url}/oidc/callback"), "people sign in through OpenID Connect");
    Ok(Some(Arc::new(ops::people::SignIn {
        cfg: o.cfg.clone(),
        client_secret: crate::secret::Secret::new(secret),
        public_url,
        admins: o.admins.clone(),
        admin_groups: o.admin_groups.clone(),
    })))
}

fn print_banner(
    st: &AppState,
    local: SocketAddr,
    public_url: Option<&str>,
    admin: Option<SocketAddr>,
) {
    let mut fp = String::new();
    wire::keys::push_hex(&mut fp, &st.fingerprint);
    let url = public_url.map_or_else(
        || {
            if local.ip().is_unspecified() {
                format!("http://<this-host>:{}", local.port())
            } else {
                format!("http://{local}")
            }
        },
        str::to_owned,
    );
    let ticket_key = wire::TicketKey::from_bytes(st.tickets.public()).to_text();
    let banner = format!(
        "lattice-coordinator listening on {local}\n\
         control key fingerprint: {fp}\n\
         relay ticket key (for lattice-relay serve --coordinator-key): {ticket_key}\n\
         mesh domain: {domain}, IPv6 prefix: {ula}\n\
         to join a device:\n  \
           KEY=$(lattice-coordinator authkey create)\n  \
           lattice up --coordinator {url} --auth-key $KEY\n{people}",
        people = if st.sign_in.is_some() {
            format!(
                "or, to sign a person's device in:\n  lattice up --coordinator {url} --coordinator-fingerprint {fp}\n"
            )
        } else {
            String::new()
        },
        domain = st.mesh.domain,
        ula = st.mesh.ula_prefix,
    );
    let mut pin = String::new();
    wire::keys::push_hex(&mut pin, &st.admin_pin);
    let banner = match admin {
        Some(a) => format!(
            "{banner}admin API (HTTPS, admin tokens): https://{a}, certificate sha256 {pin}\n"
        ),
        None => {
            format!("{banner}admin API: local socket only (add --admin-listen ADDR for HTTPS)\n")
        }
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(banner.as_bytes());
    let _ = out.flush();
}

/// Peer credentials of an admin-socket connection.
#[derive(Debug, Clone, Copy)]
pub struct UdsPeer {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for UdsPeer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

async fn local_actor(
    ConnectInfo(peer): ConnectInfo<UdsPeer>,
    mut req: Request,
    next: Next,
) -> Response {
    // The socket is 0600 in a 0700 directory; the peer's credentials are checked as well, so
    // a socket exposed by mistake (a bind mount, a changed mode) still serves only the
    // coordinator's own user and root.
    let me = current_uid();
    let Some(uid) = peer.uid.filter(|u| *u == me || *u == 0) else {
        tracing::warn!(uid = ?peer.uid, "refused an admin socket connection from another user");
        return crate::error::ApiError::Forbidden(
            "the admin socket serves only the coordinator's user and root".into(),
        )
        .into_response();
    };
    req.extensions_mut()
        .insert(Actor(format!("local:uid={uid}")));
    next.run(req).await
}

/// Every node holds one connection: lift the soft open-files limit (often 1,024) to the hard
/// one, as Go's runtime does for every program.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the local struct.
    let (got, set) = unsafe {
        let got = libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0;
        let was = l.rlim_cur;
        l.rlim_cur = l.rlim_max;
        (
            got.then_some(was),
            got && libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0,
        )
    };
    match got {
        Some(was) if set => tracing::debug!(from = was, to = l.rlim_max, "open files limit"),
        _ => tracing::warn!("could not raise the open files limit; each node needs one connection"),
    }
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
