//! Outside issuers' signing keys, fetched and cached: OpenID discovery
//! (`{issuer}/.well-known/openid-configuration`, whose `issuer` must be exactly the issuer)
//! names the `jwks_uri`, which holds the key set.
//!
//! Issuers rotate keys: a token naming a key the cached set lacks makes the cache fetch again,
//! at most once per [`REFETCH_EVERY`] per issuer (the first fetch included), so a stream of tokens with made-up key ids
//! cannot make the coordinator hammer the issuer. A cached set is used for [`FRESH_FOR`]. TLS
//! uses the system's roots, plus a CA file for private issuers (a Kubernetes cluster's CA);
//! plain http is accepted only for issuers on this host (see `ops::federation::check_issuer`).
//! Answers are size-limited and time-limited.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::BodyExt;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use tokio_rustls::rustls;

use crate::jwt;

/// How long a fetched key set is used before fetching it again.
pub const FRESH_FOR: Duration = Duration::from_secs(600);
/// The least time between two fetches for one issuer.
pub const REFETCH_EVERY: Duration = Duration::from_secs(30);
/// Largest discovery document and key set accepted.
pub const MAX_BODY: usize = 256 << 10;
/// Time allowed for one fetch (connect, TLS, request, body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What an issuer's discovery document says (the parts we use).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Provider {
    /// Its `issuer`, equal to the issuer asked about.
    pub issuer: String,
    /// Where its key set is.
    pub jwks_uri: String,
    /// Where a person's browser is sent to sign in (OpenID providers).
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// Where an authorization code is exchanged for tokens (OpenID providers).
    #[serde(default)]
    pub token_endpoint: Option<String>,
}

struct Entry {
    provider: Option<Arc<Provider>>,
    keys: Option<Arc<JwkSet>>,
    fetched: Option<Instant>,
    tried: Instant,
    error: Option<String>,
}

/// The cache, shared by every session of a coordinator.
pub struct KeyCache {
    tls: Arc<rustls::ClientConfig>,
    entries: Mutex<HashMap<String, Entry>>,
    fetches: std::sync::atomic::AtomicU64,
    refetch_every_ms: std::sync::atomic::AtomicU64,
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

impl KeyCache {
    /// A cache trusting the system's roots and the certificates in `extra_ca` (PEM).
    pub fn new(extra_ca: Option<&Path>) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if let Some(path) = extra_ca {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let mut n = 0;
            for c in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading CA file {}", path.display()))?
            {
                let c = c.with_context(|| format!("parsing CA file {}", path.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("a certificate in {}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                bail!("{} holds no PEM certificate", path.display());
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: Arc::new(tls),
            entries: Mutex::new(HashMap::new()),
            fetches: std::sync::atomic::AtomicU64::new(0),
            refetch_every_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(REFETCH_EVERY.as_millis()).unwrap_or(u64::MAX),
            ),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Changes the least time between two fetches for one issuer (default
    /// [`REFETCH_EVERY`]).
    pub fn set_refetch_every(&self, d: Duration) {
        self.refetch_every_ms.store(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Fetches made so far (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key set to verify `token` from `issuer` with, fetching it when there is none, it
    /// is stale, or it lacks the token's key (rate-limited).
    pub async fn keys_for(&self, issuer: &str, token: &str) -> anyhow::Result<Arc<JwkSet>> {
        self.ensure(issuer, Some(token)).await
    }

    /// The cached set when it is fresh (and has `token`'s key, if given); else a fetch when
    /// one may be made.
    async fn ensure(&self, issuer: &str, token: Option<&str>) -> anyhow::Result<Arc<JwkSet>> {
        if let Some(answer) = self.cached(issuer, token) {
            return answer;
        }
        // One fetch at a time (they are rare): whoever waited here looks again, since the
        // fetch it waited for may have brought the key, or just failed.
        let _fetching = self.fetching.lock().await;
        if let Some(answer) = self.cached(issuer, token) {
            return answer;
        }
        let now = Instant::now();
        {
            let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let e = map.entry(issuer.to_owned()).or_insert(Entry {
                provider: None,
                keys: None,
                fetched: None,
                tried: now,
                error: None,
            });
            e.tried = now;
        }
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = tokio::time::timeout(FETCH_TIMEOUT * 2, self.fetch(issuer))
            .await
            .map_err(|_| anyhow::anyhow!("fetching the issuer's keys timed out"))
            .and_then(|r| r);
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.get_mut(issuer).expect("inserted above");
        match result {
            Ok((provider, keys)) => {
                let keys = Arc::new(keys);
                e.provider = Some(Arc::new(provider));
                e.keys = Some(Arc::clone(&keys));
                e.fetched = Some(now);
                e.error = None;
                Ok(keys)
            }
            Err(err) => {
                let msg = format!("{err:#}");
                tracing::warn!(%issuer, error = %msg, "cannot fetch an issuer's keys");
                e.error = Some(msg.clone());
                // A stale set still verifies tokens signed with keys it has.
                e.keys
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("the issuer's keys could not be fetched: {msg}"))
            }
        }
    }

    /// The answer the cache can give without fetching, if any: the set when it is fresh and
    /// has the token's key, or (when the issuer was tried too recently to fetch again) what
    /// the last fetch left.
    fn cached(&self, issuer: &str, token: Option<&str>) -> Option<anyhow::Result<Arc<JwkSet>>> {
        let now = Instant::now();
        let every = Duration::from_millis(
            self.refetch_every_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.get(issuer)?;
        let fresh = e.fetched.is_some_and(|t| now.duration_since(t) < FRESH_FOR);
        if let Some(keys) = &e.keys
            && fresh
            && token.is_none_or(|t| jwt::knows_key(keys, t))
        {
            return Some(Ok(Arc::clone(keys)));
        }
        // Due for a fetch, or the first fetch is still under way (wait for it).
        if now.duration_since(e.tried) >= every || (e.keys.is_none() && e.error.is_none()) {
            return None;
        }
        // Tried too recently: the token's key is unknown, or the set is stale but the issuer
        // was unreachable a moment ago (a stale set still verifies the keys it has).
        Some(e.keys.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "the issuer's keys could not be fetched: {}",
                e.error.as_deref().unwrap_or_default()
            )
        }))
    }

    /// The issuer's discovery document (fetched with its keys when there is none or it is
    /// stale; rate-limited like [`Self::keys_for`]).
    pub async fn provider(&self, issuer: &str) -> anyhow::Result<Arc<Provider>> {
        let cached = |this: &Self| {
            let map = this.entries.lock().unwrap_or_else(|e| e.into_inner());
            map.get(issuer).and_then(|e| {
                e.provider
                    .clone()
                    .filter(|_| e.fetched.is_some_and(|t| t.elapsed() < FRESH_FOR))
            })
        };
        if let Some(p) = cached(self) {
            return Ok(p);
        }
        self.ensure(issuer, None).await?;
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.get(issuer)
            .and_then(|e| e.provider.clone())
            .ok_or_else(|| anyhow::anyhow!("no discovery document from {issuer}"))
    }

    async fn fetch(&self, issuer: &str) -> anyhow::Result<(Provider, JwkSet)> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc: Provider = serde_json::from_slice(&self.get(&url).await?)
            .with_context(|| format!("{url} is not an OpenID discovery document"))?;
        if doc.issuer != issuer {
            bail!("{url} names the issuer {:?}, not {issuer:?}", doc.issuer);
        }
        for (what, u) in [
            ("jwks_uri", Some(&doc.jwks_uri)),
            (
                "authorization_endpoint",
                doc.authorization_endpoint.as_ref(),
            ),
            ("token_endpoint", doc.token_endpoint.as_ref()),
        ] {
            if let Some(u) = u {
                crate::ops::federation::check_issuer(u)
                    .map_err(|_| anyhow::anyhow!("{what} {u:?} is not a plain https URL"))?;
            }
        }
        let keys: JwkSet = serde_json::from_slice(&self.get(&doc.jwks_uri).await?)
            .with_context(|| format!("{} is not a JWK set", doc.jwks_uri))?;
        Ok((doc, keys))
    }

    async fn get(&self, url: &str) -> anyhow::Result<bytes::Bytes> {
        tokio::time::timeout(FETCH_TIMEOUT, self.send(url, None))
            .await
            .map_err(|_| anyhow::anyhow!("GET {url} timed out"))?
    }

    /// POSTs a form to `url` (an issuer's token endpoint) with HTTP basic authentication;
    /// returns the body of a success.
    pub async fn post_form(
        &self,
        url: &str,
        basic: (&str, &str),
        form: &[(&str, &str)],
    ) -> anyhow::Result<bytes::Bytes> {
        use base64::Engine as _;
        let enc = |s: &str| crate::oidc::form_encode(s);
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(basic.0),
                enc(basic.1)
            ))
        );
        tokio::time::timeout(FETCH_TIMEOUT, self.send(url, Some((auth, body))))
            .await
            .map_err(|_| anyhow::anyhow!("POST {url} timed out"))?
    }

    async fn send(
        &self,
        url: &str,
        post: Option<(String, String)>,
    ) -> anyhow::Result<bytes::Bytes> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        let host = uri.host().context("URL without a host")?.to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("{url} is neither https nor http"),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let stream = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let authority = uri.authority().context("URL without a host")?.to_string();
        if https {
            let name = rustls::pki_types::ServerName::try_from(bare)
                .with_context(|| format!("bad server name {host}"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, stream)
                .await
                .with_context(|| format!("TLS to {host} (is its certificate trusted?)"))?;
            request(TokioIo::new(tls), &authority, &path, post).await
        } else {
            request(TokioIo::new(stream), &authority, &path, post).await
        }
    }
}

async fn request<T>(
    io: T,
    authority: &str,
    path: &str,
    post: Option<(String, String)>,
) -> anyhow::Result<bytes::Bytes>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let builder = hyper::Request::builder()
        .uri(path)
        .header("host", authority)
        .header("accept", "application/json");
    let method = if post.is_some() { "POST" } else { "GET" };
    let req = match post {
        None => builder.body(http_body_util::Full::new(bytes::Bytes::new()))?,
        Some((auth, body)) => builder
            .method("POST")
            .header("authorization", auth)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?,
    };
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("{authority} answered {} to {method} {path}", resp.status());
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY);
    Ok(body
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading {path} from {authority}: {e}"))?
        .to_bytes())
}
