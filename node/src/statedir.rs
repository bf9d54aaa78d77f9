//! The node's state directory: identity keys, the pinned coordinator, the netmap cache and the
//! local API socket. Files are written atomically (temp file + rename) with mode 0600 so a
//! crash never leaves half a key behind, and a corrupt identity file stops the daemon with a
//! clear message instead of silently re-joining as a new node.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hybrid::StaticKeypair;
use serde::{Deserialize, Serialize};
use tracing::warn;
use wire::ControlKey;
use wire::netmap::MapResponse;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

const KEYS: &str = "keys.json";
const PIN: &str = "coordinator.json";
const NETMAP: &str = "netmap.json";
/// Name of the local API socket.
pub const SOCKET: &str = "lattice.sock";

/// The node's private keys. Never leave this machine.
pub struct Identity {
    /// Proves the node to the coordinator.
    pub machine: StaticKeypair,
    /// The WireGuard key.
    pub node: StaticKeypair,
}

/// The keys file's contents (hex private keys, wiped when dropped).
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct KeysFile {
    machine_private: String,
    node_private: String,
}

/// The coordinator this node joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// Its URL.
    pub url: String,
    /// Its control key (verified against an auth key's fingerprint when first pinned).
    pub control_key: ControlKey,
    /// Other replicas serving the mesh (from `--coordinator` and netmaps), tried when `url`
    /// does not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

impl Pin {
    /// Every replica URL, `url` first.
    pub fn urls(&self) -> Vec<String> {
        let mut all = vec![self.url.clone()];
        for u in &self.replicas {
            if !all.contains(u) {
                all.push(u.clone());
            }
        }
        all
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens the directory: created with mode 0700 if missing; an existing one must be this
    /// user's alone (see [`statefs::prepare_dir`]: `/tmp` or a home directory is refused).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        statefs::prepare_dir(path, &[KEYS, PIN, NETMAP, SOCKET])
            .context("the state dir cannot hold the node's keys")?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// A state dir that must already exist (for CLI commands talking to the daemon).
    pub fn existing(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The local API socket path.
    pub fn socket(&self) -> PathBuf {
        self.path.join(SOCKET)
    }

    /// Loads the node's keys, generating them on first start.
    pub fn identity(&self) -> anyhow::Result<Identity> {
        let path = self.path.join(KEYS);
        match std::fs::read(&path).map(Zeroizing::new) {
            Ok(bytes) => {
                let f: KeysFile = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is corrupt; refusing to start (move it away to join as a new node)",
                        path.display()
                    )
                })?;
                let parse = |s: &str, what: &str| {
                    wire::keys::parse_hex::<32>(s).with_context(|| {
                        format!("{}: bad {what}; refusing to start", path.display())
                    })
                };
                Ok(Identity {
                    machine: StaticKeypair::from_secret(parse(&f.machine_private, "machine key")?),
                    node: StaticKeypair::from_secret(parse(&f.node_private, "node key")?),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut rng = rand::rng();
                let id = Identity {
                    machine: StaticKeypair::generate(&mut rng),
                    node: StaticKeypair::generate(&mut rng),
                };
                let f = KeysFile {
                    machine_private: hex(id.machine.secret_bytes()).to_string(),
                    node_private: hex(id.node.secret_bytes()).to_string(),
                };
                let text = Zeroizing::new(serde_json::to_vec_pretty(&f)?);
                write_private(&path, &text)?;
                Ok(id)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The pinned coordinator, if the node joined one.
    pub fn pin(&self) -> anyhow::Result<Option<Pin>> {
        let path = self.path.join(PIN);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Records the coordinator.
    pub fn save_pin(&self, pin: &Pin) -> anyhow::Result<()> {
        write_private(&self.path.join(PIN), &serde_json::to_vec_pretty(pin)?)
    }

    /// The last netmap, if one was saved and is readable (a corrupt cache is discarded).
    pub fn netmap(&self) -> Option<MapResponse> {
        let path = self.path.join(NETMAP);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "discarding a corrupt netmap cache");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Saves the netmap cache.
    pub fn save_netmap(&self, map: &MapResponse) -> anyhow::Result<()> {
        write_private(&self.path.join(NETMAP), &serde_json::to_vec(map)?)
    }

    /// Forgets the node's membership: keys, pin and cache (after a logout or removal).
    pub fn forget_membership(&self) -> anyhow::Result<()> {
        for f in [KEYS, PIN, NETMAP] {
            match std::fs::remove_file(self.path.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {f}")),
            }
        }
        Ok(())
    }

    /// Forgets only the netmap cache and pin (the keys stay, so a re-join keeps the machine).
    pub fn forget_netmap(&self) {
        let _ = std::fs::remove_file(self.path.join(NETMAP));
    }
}

/// Writes `contents` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    Ok(statefs::write_private(path, contents)?)
}

fn hex(b: &[u8]) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::new());
    wire::keys::push_hex(&mut s, b);
    s
}

/// Checks that `url` looks like an http(s) URL.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("coordinator URL must start with http:// or https:// (got {url:?})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_once_with_mode_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let a = sd.identity().unwrap();
        let b = sd.identity().unwrap();
        assert_eq!(a.machine.public(), b.machine.public());
        assert_eq!(a.node.public(), b.node.public());
        assert_ne!(a.machine.public(), a.node.public());
        let mode = std::fs::metadata(dir.path().join(KEYS))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_shared_directory_is_refused_and_left_as_it_was() {
        let err = StateDir::open(Path::new("/tmp")).err().unwrap();
        assert!(
            format!("{err:#}").contains("shared with other users"),
            "{err:#}"
        );
        let mode = std::fs::metadata("/tmp").unwrap().permissions().mode();
        assert_ne!(mode & 0o777, 0o700, "/tmp was locked down");
    }

    #[test]
    fn corrupt_identity_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEYS), b"{not json").unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let err = sd.identity().err().unwrap().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn corrupt_netmap_cache_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NETMAP), b"garbage").unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert!(sd.netmap().is_none());
        assert!(!dir.path().join(NETMAP).exists());
    }
}
