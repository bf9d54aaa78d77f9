//! The CLI side of admin commands: HTTP/1.1 to the running coordinator, over its Unix socket
//! (default) or over HTTPS to its admin listener with an admin token. There is no plain-HTTP
//! mode: a token must never cross the network in clear. The listener's certificate is
//! self-signed and pinned by the token itself (its SHA-256 is the token's last part).

use std::path::PathBuf;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long connecting and the TLS handshake may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the admin API is.
#[derive(Debug, Clone)]
pub enum Target {
    /// The admin socket in a state dir.
    Unix(PathBuf),
    /// `https://host:port` with a bearer token (none: only the sign-in routes answer).
    Https {
        /// `host:port`.
        authority: String,
        /// Admin token.
        token: Option<String>,
        /// SHA-256 of the admin listener's certificate (from the token).
        pin: [u8; 32],
    },
}

impl Target {
    /// Builds the target from CLI flags.
    pub fn new(
        state_dir: PathBuf,
        server: Option<String>,
        token: Option<String>,
    ) -> anyhow::Result<Self> {
        match server {
            None => Ok(Self::Unix(state_dir.join(crate::server::ADMIN_SOCKET))),
            Some(url) => {
                let Some(rest) = url.strip_prefix("https://") else {
                    bail!(
                        "--server must be an https:// URL (the admin API is served only over \
                         TLS, on the coordinator's --admin-listen address)"
                    );
                };
                let authority = rest.trim_end_matches('/').to_owned();
                let token = token.context("--server needs --token (or LATTICE_ADMIN_TOKEN)")?;
                let pin = crate::secret::AdminToken::parse(&token)
                    .context("--token is not an admin token (lt2-...)")?
                    .pin
                    .context(
                        "this admin token carries no certificate pin; create a new one with \
                         `lattice-coordinator token create`",
                    )?;
                Ok(Self::Https {
                    authority,
                    token: Some(token),
                    pin,
                })
            }
        }
    }

    /// The admin listener at `https://AUTHORITY` whose certificate has SHA-256 `pin`, with
    /// no token yet (for a person's admin sign-in).
    pub fn pinned(url: &str, pin: [u8; 32]) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("https://") else {
            bail!("--server must be an https:// URL (the coordinator's --admin-listen address)");
        };
        Ok(Self::Https {
            authority: rest.trim_end_matches('/').to_owned(),
            token: None,
            pin,
        })
    }

    /// Calls the API; returns the decoded body of a 2xx response, or fails with the server's
    /// message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        self.call_at(method, &format!("/admin/v1{path}"), body)
            .await
    }

    /// [`Target::call`] with the full path (`/admin/login/...`, outside `/admin/v1`).
    pub async fn call_at<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            let body = serde_json::from_slice::<Value>(&bytes).ok();
            let mut msg = body
                .as_ref()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let details = body
                .as_ref()
                .and_then(|v| v.get("details").and_then(Value::as_array))
                .into_iter()
                .flatten()
                .filter_map(Value::as_str);
            for d in details {
                msg.push('\n');
                msg.push_str(d);
            }
            bail!("{msg}");
        }
        serde_json::from_slice(&bytes).context("decoding the coordinator's answer")
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let body = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        let sender = match self {
            Self::Unix(path_buf) => {
                req = req.header("host", "localhost");
                let stream = tokio::net::UnixStream::connect(path_buf).await.with_context(|| {
                    format!(
                        "cannot reach the coordinator's admin socket {} (is `lattice-coordinator serve` running with this --state-dir?)",
                        path_buf.display()
                    )
                })?;
                handshake(stream).await?
            }
            Self::Https {
                authority,
                token,
                pin,
            } => {
                req = req.header("host", authority.as_str());
                if let Some(token) = token {
                    req = req.header("authorization", format!("Bearer {token}"));
                }
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio::net::TcpStream::connect(authority.as_str()),
                )
                .await
                .with_context(|| format!("connecting to {authority} timed out"))?
                .with_context(|| format!("cannot connect to {authority}"))?;
                let tls = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    relay::tls::connect_pinned(stream, *pin, &[b"http/1.1"]),
                )
                .await
                .with_context(|| format!("TLS to {authority} timed out"))?
                .with_context(|| {
                    format!("{authority} is not the admin listener this token (or pin) names")
                })?;
                handshake(tls).await?
            }
        };
        let mut sender = sender;
        let resp = sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

async fn handshake<S>(
    stream: S,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
