//! `lattice up`: resolves the coordinator pin, loads the identity, binds the sockets, restores
//! the cached netmap and runs the event loop with the control client and local API beside it.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use node_proto::pq::PqConfig;
use node_proto::{NodeConfig, NodeState};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use wire::{AuthKey, CapabilityVersion, Hello, NodeKey};

use crate::cli::UpArgs;
use crate::io::api;
use crate::io::control::{self, ControlConfig};
use crate::io::dns::DnsTable;
use crate::io::event_loop::{EventLoop, Exit, Routing};
use crate::io::idtoken::IdTokenSource;
use crate::io::posture::{self, PostureConfig};
use crate::io::udp::Sockets;
use crate::io::workers::{Modes, Runtimes};
use crate::statedir::{Pin, StateDir, check_url};

/// The UDP port a node uses unless told otherwise.
const DEFAULT_PORT: u16 = 41641;
/// The node attribute that asks for a random UDP port instead.
const RANDOMIZE_PORT: &str = "randomize-client-port";

/// Runs `lattice up` until the node is stopped.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let dir = StateDir::open(&args.state.state_dir)?;
    let auth_key: Option<AuthKey> = args
        .auth_key
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--auth-key")?;
    let id_token = match (&args.id_token_file, &args.id_token_env) {
        (Some(p), _) => Some(IdTokenSource::File(p.clone())),
        (None, Some(v)) => Some(IdTokenSource::Env(v.clone())),
        (None, None) => None,
    };
    if let Some(src) = &id_token {
        // Fail now, not on the first connection, if the token cannot be read at all.
        src.read()?;
    }
    let fingerprint = match (&args.coordinator_fingerprint, &auth_key) {
        (Some(fp), _) => Some(
            wire::keys::parse_hex::<{ hybrid::FINGERPRINT_LEN }>(fp.trim())
                .context("--coordinator-fingerprint must be 32 hex digits")?,
        ),
        (None, Some(k)) => Some(*k.fingerprint()),
        (None, None) => None,
    };
    // While internet traffic goes through an exit node, the node's own sockets are marked so
    // that they keep to the main routing table.
    let exit_node = args
        .exit_node
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let dialer = if exit_node.is_some() {
        relay::dial::Dialer::marked(crate::io::routes::SOCKET_MARK)
    } else {
        relay::dial::Dialer::PLAIN
    };
    let pin = resolve_pin(dialer, &dir, &args.coordinator, fingerprint.as_ref()).await?;
    let identity = dir.identity()?;
    let node_key = NodeKey::from_bytes(identity.node.public());

    // The policy may give this node a random port (nodeAttrs randomize-client-port, as the
    // last netmap says; a change takes effect at the next start), unless --port names one.
    let cached = dir.netmap();
    let randomize = cached
        .as_ref()
        .and_then(|m| m.node_caps.as_ref())
        .is_some_and(|c| c.contains_key(RANDOMIZE_PORT));
    let port = match args.port {
        Some(p) => p,
        None if randomize => {
            info!("the policy gives this node a random UDP port (nodeAttrs {RANDOMIZE_PORT})");
            0
        }
        None => DEFAULT_PORT,
    };
    let workers = crate::io::workers::count(args.workers.map(usize::from));
    let runtimes = Runtimes::new(workers).context("starting the data-plane workers' runtimes")?;
    let sockets = Sockets::bind_group_on(port, dialer, &runtimes.handles()).map_err(|e| {
        if exit_node.is_some() && is_permission_error(&e) {
            e.context("--exit-node marks the node's sockets (SO_MARK), which needs CAP_NET_ADMIN")
        } else {
            e
        }
    })?;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let wall_clock_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut state = NodeState::new(
        NodeConfig {
            private_key: zeroize::Zeroizing::new(*identity.node.secret_bytes()),
            tun_mtu: args.mtu,
            pq: PqConfig {
                rotation: args.pq_rotation,
            },
            wall_clock_ms,
        },
        seed,
        Instant::now(),
    );
    state.set_exit_node(exit_node.clone());
    if let Some(cached) = cached {
        if cached.node.as_ref().is_some_and(|n| n.node_key == node_key) {
            info!("restoring the cached netmap until the coordinator answers");
            state.handle_netmap(Instant::now(), cached);
        } else {
            warn!("ignoring a netmap cache that belongs to another key");
            dir.forget_netmap();
        }
    }

    let hostname = args.hostname.clone().unwrap_or_else(os_hostname);
    let advertised_routes = advertised_routes(&args)?;
    let (control_tx, control_rx) = mpsc::channel(64);
    let (out_tx, out_rx) = mpsc::channel(16);
    let (endpoints_tx, endpoints_rx) = watch::channel(Vec::new());
    let (api_tx, api_rx) = mpsc::channel(16);
    let (dns_tx, _) = watch::channel(Arc::new(DnsTable::default()));

    let socket_path = dir.socket();
    let api_socket = socket_path.clone();
    let metrics_tx = api_tx.clone();
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(async move {
        api::serve(&api_socket, api_tx, async {
            let _ = api_stopped.await;
        })
        .await
    });
    if let Some(addr) = args.metrics_listen {
        let listener = relay::metrics::listen(Some(relay::metrics::Listen(Some(addr))), None)
            .await?
            .context("--metrics-listen")?;
        let render: relay::metrics::Render = Arc::new(move || {
            let api = metrics_tx.clone();
            Box::pin(async move { crate::io::metrics::scrape(&api).await })
        });
        tokio::spawn(relay::metrics::serve(listener, render));
        info!(%addr, "metrics at /metrics");
    }
    // Fail fast if the API cannot start (e.g. another daemon holds the state dir).
    tokio::task::yield_now().await;
    if api_task.is_finished() {
        return match api_task.await {
            Ok(Err(e)) => Err(e),
            _ => bail!("the local API stopped"),
        };
    }

    info!(coordinator = %pin.url, node_key = %node_key, port = sockets[0].port, workers, "starting");
    let cfg = ControlConfig {
        urls: pin.urls(),
        control_key: pin.control_key,
        machine: identity.machine,
        node: identity.node.clone(),
        hello: Hello {
            capability: CapabilityVersion::CURRENT,
            node_key,
            hostname,
            auth_key,
            endpoints: Vec::new(),
            os: std::env::consts::OS.to_owned(),
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
            node_key_proof: None,
            id_token: None,
            advertised_routes,
        },
        id_token,
        id_token_refresh: args.id_token_refresh,
        dialer,
    };
    let (posture_tx, posture_rx) = watch::channel(None);
    let (replicas_tx, replicas_rx) = watch::channel(pin.urls());
    let posture_task = tokio::spawn(posture::run(
        PostureConfig {
            interval: args.posture_interval,
            command: args.posture_command.clone(),
        },
        posture_tx,
    ));
    let control_task = tokio::spawn(control::run(
        cfg,
        control_tx,
        out_rx,
        endpoints_rx,
        posture_rx,
        replicas_rx,
    ));

    let ev = EventLoop::new(
        state,
        sockets,
        args.tun_name.clone(),
        args.mtu,
        dir,
        control_rx,
        out_tx,
        api_rx,
        dns_tx,
        endpoints_tx,
        pin,
        replicas_tx,
        args.accept_dns,
        identity.node.clone(),
        !args.no_port_mapping,
        Routing {
            snat_subnet_routes: args.snat_subnet_routes,
            exit_node,
            dialer,
        },
        Modes {
            io_helpers: args.io_helpers,
            steering: args.steering,
            aead_helpers: args.aead_helpers,
        },
        runtimes,
    );
    let result = match ev {
        Ok(ev) => ev.run().await,
        Err(e) => Err(e),
    };
    control_task.abort();
    posture_task.abort();
    // Let the API finish answering (the `down` or `logout` that ended the loop), briefly.
    let _ = api_stop.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), api_task).await;
    let _ = std::fs::remove_file(&socket_path);
    match result? {
        Exit::Stopped | Exit::LoggedOut => Ok(()),
    }
}

/// Finds the coordinator this node belongs to: the pinned one, or (first join) the one the
/// auth key names, verified by fetching its key and checking the fingerprint. `urls` are the
/// `--coordinator` flags: the first is the one to join through (and prefer), the others are
/// replicas of the same mesh.
async fn resolve_pin(
    dialer: relay::dial::Dialer,
    dir: &StateDir,
    urls: &[String],
    fingerprint: Option<&[u8; hybrid::FINGERPRINT_LEN]>,
) -> anyhow::Result<Pin> {
    for u in urls {
        check_url(u)?;
    }
    let urls: Vec<String> = urls
        .iter()
        .map(|u| u.trim_end_matches('/').to_owned())
        .collect();
    if let Some(mut pin) = dir.pin()? {
        if let Some(fp) = fingerprint
            && fp != &hybrid::fingerprint(pin.control_key.as_bytes())
        {
            bail!(
                "this node already belongs to the coordinator at {} and the auth key (or \
                 --coordinator-fingerprint) names a different one; use another --state-dir or \
                 run `lattice logout` first",
                pin.url
            );
        }
        if let Some((first, rest)) = urls.split_first() {
            if *first != pin.url {
                info!(old = %pin.url, new = %first, "coordinator URL changed; keeping the pinned key");
            }
            let mut replicas = rest.to_vec();
            replicas.extend(pin.replicas.iter().filter(|u| !urls.contains(u)).cloned());
            let updated = Pin {
                url: first.clone(),
                control_key: pin.control_key,
                replicas,
            };
            if updated != pin {
                pin = updated;
                dir.save_pin(&pin)?;
            }
        }
        return Ok(pin);
    }
    let (Some((url, rest)), Some(fp)) = (urls.split_first(), fingerprint) else {
        bail!(
            "this node has not joined a mesh yet: run `lattice up --coordinator URL --auth-key KEY`, \
             or, to sign in through the mesh's identity provider (or with --id-token-file), \
             `lattice up --coordinator URL --coordinator-fingerprint FP` (the coordinator prints \
             FP when it starts)"
        );
    };
    let control_key = control::fetch_control_key(dialer, url, fp).await?;
    let pin = Pin {
        url: url.clone(),
        control_key,
        replicas: rest.to_vec(),
    };
    dir.save_pin(&pin)?;
    Ok(pin)
}

/// `--advertise-routes` and `--advertise-exit-node`, checked: prefixes without host bits, and
/// the exit routes only through `--advertise-exit-node`.
fn advertised_routes(args: &UpArgs) -> anyhow::Result<Vec<ipnet::IpNet>> {
    let mut routes = Vec::new();
    for r in &args.advertise_routes {
        if r.trunc() != *r {
            bail!(
                "--advertise-routes {r} has host bits set (did you mean {}?)",
                r.trunc()
            );
        }
        if r.prefix_len() == 0 {
            bail!("--advertise-routes {r}: use --advertise-exit-node to route the internet");
        }
        if !routes.contains(r) {
            routes.push(*r);
        }
    }
    if args.advertise_exit_node {
        routes.extend(
            ["0.0.0.0/0", "::/0"]
                .iter()
                .filter_map(|s| s.parse::<ipnet::IpNet>().ok()),
        );
    }
    Ok(routes)
}

fn is_permission_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    })
}

fn os_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}
