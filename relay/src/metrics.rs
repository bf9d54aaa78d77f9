//! Prometheus metrics: the text exposition format (version 0.0.4), and the small HTTP server
//! every Lattice binary runs at `--metrics-listen` (`GET /metrics`).
//!
//! A scrape asks the binary for a fresh snapshot and renders it; nothing is kept between
//! scrapes, so there is nothing to lock on the hot paths.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use tokio::net::TcpListener;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (its name ends in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// A sum and a count of observations (no quantiles).
    Summary,
}

/// A page of metrics being written. Families are declared once (`# HELP`, `# TYPE`), then
/// samples follow; a family's samples must come together, as the format requires.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
    declared: BTreeSet<String>,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sample of family `name` with `labels`, declaring the family first if it is new.
    pub fn sample(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        if self.declared.insert(name.to_owned()) {
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Summary => "summary",
            };
            let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", render(value));
    }

    /// One family with one label, a sample per `(label value, value)`.
    pub fn by_label(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        for (v, n) in values {
            self.sample(name, kind, help, &[(label, v)], *n as f64);
        }
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.sample(name, Kind::Counter, help, &[], value as f64);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.sample(name, Kind::Gauge, help, &[], value);
    }

    /// A summary without quantiles: the sum of the observations and their count.
    pub fn summary(&mut self, name: &str, help: &str, sum: f64, count: u64) {
        if self.declared.insert(name.to_owned()) {
            let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(self.text, "# TYPE {name} summary");
        }
        let _ = writeln!(self.text, "{name}_sum {}", render(sum));
        let _ = writeln!(self.text, "{name}_count {count}");
    }

    /// The page.
    pub fn finish(self) -> String {
        self.text
    }
}

/// Writes a relay's numbers (`lattice_relay_*`).
pub fn relay(e: &mut Exposition, s: &crate::StatsSnapshot, stun: &crate::stun::StunStats) {
    use std::sync::atomic::Ordering::Relaxed;
    e.gauge(
        "lattice_relay_sessions",
        "Node sessions open on this relay.",
        s.sessions as f64,
    );
    e.gauge(
        "lattice_relay_sessions_past_ticket",
        "Sessions whose ticket has run out, served through a coordinator outage (--outage-grace).",
        s.sessions_past_ticket as f64,
    );
    e.gauge(
        "lattice_relay_queued_bytes",
        "Bytes of frames waiting in the sessions' queues to their nodes.",
        s.queued_bytes as f64,
    );
    e.by_label(
        "lattice_relay_sessions_total",
        Kind::Counter,
        "Sessions opened, by whether the node was admitted.",
        "result",
        &[("accepted", s.accepted), ("rejected", s.rejected)],
    );
    e.counter(
        "lattice_relay_sessions_kicked_total",
        "Sessions closed because the ticket expired or the node was revoked.",
        s.kicked,
    );
    e.counter(
        "lattice_relay_forwarded_frames_total",
        "Frames forwarded between nodes.",
        s.forwarded,
    );
    e.counter(
        "lattice_relay_forwarded_bytes_total",
        "Payload bytes forwarded between nodes.",
        s.forwarded_bytes,
    );
    e.counter(
        "lattice_relay_forwarded_across_threads_total",
        "Frames for a QUIC client whose connection runs on another of the relay's QUIC threads, handed to its session's outbox.",
        s.across_threads,
    );
    e.by_label(
        "lattice_relay_dropped_frames_total",
        Kind::Counter,
        "Frames dropped, by reason.",
        "reason",
        &[
            ("no_peer", s.dropped_no_peer),
            ("queue_full", s.dropped_queue_full),
            ("unvouched", s.dropped_unvouched),
            ("before_auth", s.dropped_before_auth),
            ("ticket_too_soon", s.dropped_ticket_too_soon),
            ("refused", s.dropped_refused),
            ("refuse_too_soon", s.dropped_refuse_too_soon),
            ("rate_limited", s.dropped_rate_limited),
            ("malformed", s.malformed),
        ],
    );
    e.by_label(
        "lattice_relay_quic_handshakes_turned_away_total",
        Kind::Counter,
        "QUIC handshakes not taken, by reason: answered with a Retry while busy with others, refused over a connection limit or because their address started too many, or not finished in time.",
        "reason",
        &[
            ("retried", s.quic_retried),
            ("refused", s.quic_refused),
            ("too_often", s.quic_too_often),
            ("timed_out", s.quic_timed_out),
        ],
    );
    e.counter(
        "lattice_relay_tls_handshakes_too_often_total",
        "TLS connections closed before their handshake: their address had started too many (this process's HTTPS listeners together).",
        crate::http::tls_handshakes_too_often(),
    );
    e.by_label(
        "lattice_relay_stun_datagrams_total",
        Kind::Counter,
        "STUN datagrams, by whether they were answered Binding requests (limited: their source had its answers for the second).",
        "result",
        &[
            ("answered", stun.answered.load(Relaxed)),
            ("ignored", stun.ignored.load(Relaxed)),
            ("limited", stun.limited.load(Relaxed)),
        ],
    );
}

fn render(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders a fresh page on every scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("expected ADDR:PORT or off, not {s:?}"))
    }
}

/// The listener for `/metrics`: at the address `--metrics-listen` names (failing if it cannot
/// be bound), none for `off`, or without the flag at `default` when there is one (skipped
/// with a warning if that port is taken: another daemon's metrics are no reason not to run).
pub async fn listen(
    flag: Option<Listen>,
    default: Option<SocketAddr>,
) -> anyhow::Result<Option<TcpListener>> {
    use anyhow::Context as _;
    match (flag, default) {
        (Some(Listen(Some(addr))), _) => {
            Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                format!("binding --metrics-listen {addr}")
            })?))
        }
        (Some(Listen(None)), _) | (None, None) => Ok(None),
        (None, Some(addr)) => match TcpListener::bind(addr).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "no metrics: the default port is taken (set --metrics-listen)");
                Ok(None)
            }
        },
    }
}

/// Serves `GET /metrics` on `listener` until the process ends, rendering with `render`.
pub async fn serve(listener: TcpListener, render: Render) {
    let app = Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = Arc::clone(&render);
            async move {
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, CONTENT_TYPE)],
                    render().await,
                )
                    .into_response()
            }
        }),
    );
    let limits = crate::http::HttpLimits {
        max_connections: 64,
        per_ip: 16,
        ..Default::default()
    };
    crate::http::serve(listener, app, limits, std::future::pending()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_declared_once_and_labels_escaped() {
        let mut e = Exposition::new();
        e.sample(
            "lattice_x_total",
            Kind::Counter,
            "Things.\nMany.",
            &[("peer", "a\"b\\c")],
            3.0,
        );
        e.sample(
            "lattice_x_total",
            Kind::Counter,
            "Things.",
            &[("peer", "d")],
            4.0,
        );
        e.gauge("lattice_up", "Up.", 1.5);
        assert_eq!(
            e.finish(),
            "# HELP lattice_x_total Things.\\nMany.\n# TYPE lattice_x_total counter\n\
             lattice_x_total{peer=\"a\\\"b\\\\c\"} 3\nlattice_x_total{peer=\"d\"} 4\n\
             # HELP lattice_up Up.\n# TYPE lattice_up gauge\nlattice_up 1.5\n"
        );
    }

    #[tokio::test]
    async fn the_server_answers_a_scrape_with_a_fresh_page() {
        let listener = listen(Some("127.0.0.1:0".parse().unwrap()), None)
            .await
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&n);
        let render: Render = Arc::new(move || {
            let v = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                let mut e = Exposition::new();
                e.counter("lattice_scrapes_total", "Scrapes.", v);
                e.finish()
            })
        });
        tokio::spawn(serve(listener, render));
        for want in ["lattice_scrapes_total 0", "lattice_scrapes_total 1"] {
            let body = crate::http::get(&addr.to_string(), "/metrics", 1 << 16)
                .await
                .unwrap();
            let body = String::from_utf8(body.to_vec()).unwrap();
            assert!(body.contains(want), "{body}");
        }
    }

    #[tokio::test]
    async fn a_taken_default_port_is_skipped_but_a_named_one_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(listen(None, Some(addr)).await.unwrap().is_none());
        let named: Listen = addr.to_string().parse().unwrap();
        let err = listen(Some(named), None).await.unwrap_err();
        assert!(format!("{err:#}").contains("--metrics-listen"), "{err:#}");
        let off: Listen = "off".parse().unwrap();
        assert!(listen(Some(off), Some(addr)).await.unwrap().is_none());
        assert!("nonsense".parse::<Listen>().is_err());
        assert!(listen(None, None).await.unwrap().is_none());
    }
}
