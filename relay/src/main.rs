//! `lattice-relay serve`: a standalone relay.
#![allow(clippy::print_stdout, clippy::print_stderr)] // the banner and fatal errors go to the terminal

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use relay::{Relay, TicketAuthorizer};
use tracing::info;
use tracing_subscriber::EnvFilter;
use wire::TicketKey;

/// A Lattice relay: forwards encrypted packets between nodes the coordinator vouches for.
#[derive(Debug, Parser)]
#[command(name = "lattice-relay", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LATTICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Read flags from this TOML file: its keys are the long flags (`port = 41642`,
    /// `accept-dns = true`, lists as arrays); flags on the command line and their environment
    /// variables win over it. An unknown key is an error naming file:line:col.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address for QUIC (UDP) and the WebSocket fallback (TCP, `GET /relay`).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// STUN server address (UDP; repeatable: two addresses let nodes detect hard NAT).
    #[arg(long = "stun-listen", default_value = "0.0.0.0:3478")]
    stun_listen: Vec<SocketAddr>,
    /// The coordinator's relay-ticket key (`ticketkey:...`, printed by
    /// `lattice-coordinator serve`). Only nodes with its tickets are served.
    #[arg(long, env = "LATTICE_RELAY_COORDINATOR_KEY")]
    coordinator_key: TicketKey,
    /// State directory (the relay's key and certificate).
    #[arg(
        long,
        env = "LATTICE_RELAY_STATE_DIR",
        default_value = "/var/lib/lattice-relay"
    )]
    state_dir: PathBuf,
    /// Name shown to users (`relay NAME` in `lattice status`).
    #[arg(long, default_value = "relay")]
    name: String,
    /// Address nodes use to reach this relay (for the registration hint); default: --listen.
    #[arg(long)]
    public_addr: Option<SocketAddr>,
    /// The coordinator's URL (`http://HOST:PORT`): the relay follows its revocations and
    /// drops a removed node within seconds. Without it, a removed node is dropped only when
    /// its ticket expires (up to two minutes).
    #[arg(long, env = "LATTICE_RELAY_COORDINATOR_URL")]
    coordinator_url: Option<String>,
    /// Prometheus metrics at `http://ADDR/metrics` (`off` turns them off) [default:
    /// 127.0.0.1:9431, skipped with a warning if that port is taken].
    #[arg(long)]
    metrics_listen: Option<relay::metrics::Listen>,
    /// Threads serving QUIC, each with an endpoint of its own on the --listen port [default:
    /// one per four CPUs, 1 to 4; more carry more nodes at once, and a node's datagrams to a
    /// node served by another thread cross between them].
    #[arg(long, env = "LATTICE_RELAY_QUIC_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    quic_threads: Option<u16>,
    /// The most one node may send through this relay, in megabits a second (a tenth of a
    /// second's worth at once); what is beyond is dropped and counted
    /// (`lattice_relay_dropped_frames_total{reason="rate_limited"}`) [default: no limit].
    #[arg(long, env = "LATTICE_RELAY_CLIENT_RATE_LIMIT", value_name = "MBIT", value_parser = clap::value_parser!(u32).range(1..))]
    client_rate_limit: Option<u32>,
    /// With --coordinator-url: once no fresh revocation list has come for 30 s (the
    /// coordinator is down, or cannot be reached), the nodes this relay served are served this
    /// long past the end of their last ticket instead of being cut when it runs out, unless a
    /// list revoked them; when lists come again they have two minutes to bring fresh tickets.
    /// `0` cuts every node when its ticket runs out.
    #[arg(long, env = "LATTICE_RELAY_OUTAGE_GRACE", value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    outage_grace: std::time::Duration,
}

/// Where metrics are served unless `--metrics-listen` says otherwise.
const DEFAULT_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9431);

fn main() -> std::process::ExitCode {
    // A --config file stands for flags given before the command line's own.
    let cli: Cli = match relay::config::parse("serve", "lattice-relay") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = EnvFilter::try_from_env("LATTICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lattice-relay: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let Command::Serve(args) = cli.command;
    match rt.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (key, cert) = relay::identity::load_or_create(&args.state_dir)?;
    // Riding out an outage needs to know there is one: only while following the coordinator.
    let revoked = Arc::new(match args.coordinator_url {
        Some(_) => relay::revocation::RevocationSet::with_outage_grace(args.outage_grace),
        None => relay::revocation::RevocationSet::default(),
    });
    // What it heard and whom it served before a restart, so one during a coordinator outage
    // goes on serving them; a file it cannot read is left for the next write to replace.
    let kept = args.state_dir.join(relay::revocation::KEPT_FILE);
    if args.coordinator_url.is_some() {
        match relay::revocation::load_kept(&kept) {
            Ok(Some(k)) => revoked.restore(k, relay::unix_now()),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "starting with no record of whom this relay served")
            }
        }
    }
    let relay = Relay::with_client_rate(
        key,
        Arc::new(TicketAuthorizer::with_revocations(
            args.coordinator_key,
            Arc::clone(&revoked),
        )),
        args.client_rate_limit.map(relay::ClientRate::mbit),
    );
    match args.coordinator_url.clone() {
        Some(url) => {
            tokio::spawn(relay::revocation::poll(
                url,
                args.coordinator_key,
                revoked,
                Some(kept),
            ));
        }
        None => tracing::warn!(
            "no --coordinator-url: removed nodes keep their relay sessions until their tickets expire"
        ),
    }
    let threads = args
        .quic_threads
        .map_or_else(relay::quic::default_threads_here, usize::from);
    let quic = relay::QuicListener::start(
        &relay,
        &cert,
        args.listen,
        threads,
        relay::QuicLimits::default(),
    )?;
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {} (TCP)", args.listen))?;
    let mut stun = Vec::new();
    for addr in &args.stun_listen {
        stun.push(
            tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding STUN on {addr}"))?,
        );
    }
    let public = args.public_addr.unwrap_or(args.listen);
    let relay_key = wire::RelayKey::from_bytes(relay.public_key()).to_text();
    let pin = {
        let mut s = String::new();
        wire::keys::push_hex(&mut s, &cert.pin());
        s
    };
    let stun_flags: String = args
        .stun_listen
        .iter()
        .map(|a| format!(" --stun {}:{}", public.ip(), a.port()))
        .collect();
    println!(
        "lattice-relay {name} listening on {listen} (QUIC/UDP and WebSocket/TCP)\n\
         relay key: {relay_key}\ncertificate sha256: {pin}\n\
         register it with the coordinator:\n  \
           lattice-coordinator relays add {name} --key {relay_key} --quic {public} \
         --cert-sha256 {pin} --websocket https://{public}/relay{stun_flags}",
        name = args.name,
        listen = args.listen,
    );
    info!(listen = %args.listen, quic_threads = threads, client_rate_limit_mbit = ?args.client_rate_limit, "relay started");
    let stats = Arc::new(relay::stun::StunStats::default());
    for s in stun {
        tokio::spawn(relay::stun::serve(s, Arc::clone(&stats)));
    }
    let metrics = relay::metrics::listen(args.metrics_listen, Some(DEFAULT_METRICS)).await?;
    if let Some(listener) = metrics {
        let addr = listener.local_addr()?;
        let (r, stun) = (relay.clone(), Arc::clone(&stats));
        let render: relay::metrics::Render = Arc::new(move || {
            let (r, stun) = (r.clone(), Arc::clone(&stun));
            Box::pin(async move {
                let mut e = relay::metrics::Exposition::new();
                relay::metrics::relay(&mut e, &r.stats(), &stun);
                e.finish()
            })
        });
        tokio::spawn(relay::metrics::serve(listener, render));
        info!(%addr, "metrics at /metrics");
    }
    tokio::spawn(relay.clone().run_sweeper());
    // Plain HTTP answers only /healthz; the WebSocket fallback is on TLS with the certificate
    // the QUIC transport uses (nodes pin it), on the same port.
    let healthz = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let ws_tls = Arc::new(relay::tls::server_tls(&cert, &[b"http/1.1"])?);
    relay::http::serve_mixed(
        tcp,
        healthz.clone(),
        relay.router().merge(healthz),
        relay::http::HttpLimits::default(),
        ws_tls,
        shutdown(),
    )
    .await;
    info!("shutting down");
    drop(quic);
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
