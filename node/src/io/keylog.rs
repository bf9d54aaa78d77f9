//! `LATTICE_PSK_KEYLOG=FILE`: appends every post-quantum preshared key the node installs to
//! FILE (`psk <peer node key> <hex key>` per line, mode 0600), like `SSLKEYLOGFILE` for TLS.
//! For debugging captures and for the test that no key ever reaches a log; never set it in
//! production (anyone who reads the file can decrypt recorded traffic). The node warns at
//! start when it is set.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use tracing::warn;
use zeroize::Zeroizing;

/// The environment variable.
pub const ENV: &str = "LATTICE_PSK_KEYLOG";

/// See the module docs.
pub struct KeyLog {
    path: PathBuf,
}

impl KeyLog {
    /// The key log named by [`ENV`], if set.
    pub fn from_env() -> Option<Self> {
        let path = PathBuf::from(std::env::var_os(ENV)?);
        warn!(path = %path.display(), "{ENV} is set: post-quantum keys are written to a file");
        Some(Self { path })
    }

    /// Appends one key.
    pub fn record(&self, peer: &wire::NodeKey, psk: &hybrid::Psk) {
        let mut line = Zeroizing::new(format!("psk {} ", peer.to_text()));
        wire::keys::push_hex(&mut line, psk.as_bytes());
        line.push('\n');
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            warn!(path = %self.path.display(), error = %e, "cannot write the key log");
        }
    }
}
