//! A relay's persistent identity: its static X25519 key and its TLS certificate, kept in a
//! state directory (mode 0600 files, written atomically).

use std::path::Path;

use anyhow::Context;
use hybrid::StaticKeypair;
use zeroize::Zeroizing;

use crate::tls::RelayCert;

/// The relay's static key.
pub const KEY_FILE: &str = "relay.key";
/// Its TLS certificate.
pub const CERT_FILE: &str = "relay-cert.der";
/// Its TLS private key.
pub const CERT_KEY_FILE: &str = "relay-cert-key.der";

/// Loads the relay identity from `dir`, creating it on first use.
pub fn load_or_create(dir: &Path) -> anyhow::Result<(StaticKeypair, RelayCert)> {
    statefs::prepare_dir(
        dir,
        &[
            KEY_FILE,
            CERT_FILE,
            CERT_KEY_FILE,
            crate::revocation::KEPT_FILE,
        ],
    )
    .context("the state dir cannot hold the relay's keys")?;
    let (secret, _) = statefs::load_or_create_secret(&dir.join(KEY_FILE), || {
        *StaticKeypair::generate(&mut rand::rng()).secret_bytes()
    })?;
    let key = StaticKeypair::from_secret(*secret);
    let cert = load_or_create_cert(dir, CERT_FILE, CERT_KEY_FILE)?;
    Ok((key, cert))
}

/// Loads the self-signed certificate kept in `dir` as `cert_file` and `key_file`, creating
/// both on first use (mode 0600, written atomically).
pub fn load_or_create_cert(
    dir: &Path,
    cert_file: &str,
    key_file: &str,
) -> anyhow::Result<RelayCert> {
    let (cert_path, cert_key_path) = (dir.join(cert_file), dir.join(key_file));
    Ok(
        match (std::fs::read(&cert_path), std::fs::read(&cert_key_path)) {
            (Ok(cert_der), Ok(key_der)) => RelayCert {
                cert_der,
                key_der: Zeroizing::new(key_der),
            },
            _ => {
                let c = RelayCert::generate()?;
                write_private(&cert_key_path, &c.key_der)?;
                write_private(&cert_path, &c.cert_der)?;
                c
            }
        },
    )
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    Ok(statefs::write_private(path, contents)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_survives_a_restart_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (k1, c1) = load_or_create(dir.path()).unwrap();
        let (k2, c2) = load_or_create(dir.path()).unwrap();
        assert_eq!(k1.public(), k2.public());
        assert_eq!(c1.pin(), c2.pin());
        for f in [KEY_FILE, CERT_FILE, CERT_KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
}
