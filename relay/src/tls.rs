//! TLS with pinned self-signed certificates: TLS 1.3 only, the hybrid X25519MLKEM768 key
//! exchange preferred (rustls on aws-lc), the server's certificate checked by its SHA-256
//! instead of a name. Used for the relay's QUIC transport and WebSocket fallback (nodes pin the
//! certificate listed in the netmap) and for the coordinator's admin API (admin tokens carry
//! the pin).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::proto::ALPN;

/// The name clients ask for (any name works: the certificate is pinned, not named).
pub const SERVER_NAME: &str = "lattice-relay";

/// A relay's certificate and private key (PKCS#8 DER; zeroed on drop).
pub struct RelayCert {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for RelayCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCert")
            .field("pin", &wire::CertPin(pin(&self.cert_der)))
            .field("key_der", &"<redacted>")
            .finish()
    }
}

impl RelayCert {
    /// A fresh self-signed certificate (ECDSA P-256).
    pub fn generate() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate().context("generating the relay's TLS key")?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .context("certificate parameters")?;
        let cert = params
            .self_signed(&key)
            .context("self-signing the relay certificate")?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key_der: Zeroizing::new(key.serialize_der()),
        })
    }

    /// The pin nodes check.
    pub fn pin(&self) -> [u8; 32] {
        pin(&self.cert_der)
    }
}

/// SHA-256 of a DER certificate.
pub fn pin(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Bytes a peer may send on the connection's one stream before the reader takes them (quinn's
/// default for a stream, 1.25 MB, now also the whole connection's): the stream carries the
/// authentication, tickets, pings and packets too large for a datagram, read as they come.
const STREAM_WINDOW: u32 = 1_250_000;

/// The QUIC transport of one end of a relay connection: the relay's, whose clients may open no
/// streams of their own (`peer_streams` 0), or a node's, which takes the one the relay opens.
///
/// Streams a peer opens take memory until the application reads them: by quinn's defaults a
/// peer may open 100 of each kind and send 1.25 MB on each before it is blocked, with no limit
/// for the connection as a whole; the relay reads only the stream it opens, so anyone who
/// completed a QUIC handshake (no client certificate is asked for) could have made it keep
/// about 250 MB per connection.
fn transport(keep_alive: Option<Duration>, peer_streams: u8) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(peer_streams.into());
    t.max_concurrent_uni_streams(0u8.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(STREAM_WINDOW.into());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(20)).expect("20 s is a valid timeout"),
    ));
    t.keep_alive_interval(keep_alive);
    // WireGuard packets for a 1280-byte TUN MTU plus the relay header fit in one datagram
    // from the first packet; path MTU discovery may raise it further.
    t.initial_mtu(1400);
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    // Ask the other end to acknowledge every 16th packet (or after its ACK delay) instead of
    // every other one: the datagrams carry WireGuard, which needs no acknowledgements, and
    // each ACK is a packet both ends must encrypt, send and process.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(15));
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

/// A TLS 1.3 server configuration for `cert`, offering `alpn`.
pub fn server_tls(cert: &RelayCert, alpn: &[&[u8]]) -> anyhow::Result<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.to_vec())),
        )
        .context("loading the certificate")?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// A TLS 1.3 client configuration that accepts only the certificate with `pin`, offering
/// `alpn`.
pub fn client_tls(pin: [u8; 32], alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(tls)
}

/// Opens TLS over `stream` to a server that must present the certificate with `pin`.
pub async fn connect_pinned(
    stream: tokio::net::TcpStream,
    pin: [u8; 32],
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pin, alpn)?));
    let name = ServerName::try_from(SERVER_NAME).context("server name")?;
    connector
        .connect(name, stream)
        .await
        .context("TLS handshake (is the certificate the one pinned?)")
}

/// The QUIC server configuration for `cert`.
pub fn server_config(cert: &RelayCert) -> anyhow::Result<quinn::ServerConfig> {
    let tls = server_tls(cert, &[ALPN])?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(tls).context("QUIC server TLS")?,
    ));
    // The relay opens the connection's one stream; its clients open none.
    cfg.transport_config(transport(None, 0));
    Ok(cfg)
}

/// The QUIC client configuration that accepts only the certificate with `pin`.
pub fn client_config(pin: [u8; 32]) -> anyhow::Result<quinn::ClientConfig> {
    let tls = client_tls(pin, &[ALPN])?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).context("QUIC client TLS")?,
    ));
    cfg.transport_config(transport(Some(Duration::from_secs(5)), 1));
    Ok(cfg)
}

/// Accepts exactly one certificate, by hash, and checks the handshake signature with it.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if subtle::ConstantTimeEq::ct_eq(&pin(end_entity)[..], &self.pin[..]).into() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hybrid_post_quantum_key_exchange_is_offered_first() {
        let p = provider();
        assert_eq!(
            p.kx_groups[0].name(),
            rustls::NamedGroup::X25519MLKEM768,
            "{:?}",
            p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_pin_is_the_certificates_sha256() {
        let c = RelayCert::generate().unwrap();
        assert_eq!(c.pin(), <[u8; 32]>::from(Sha256::digest(&c.cert_der)));
        assert_ne!(c.pin(), RelayCert::generate().unwrap().pin());
        assert!(format!("{c:?}").contains("<redacted>"));
    }
}
