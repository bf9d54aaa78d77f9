//! Where a workload's token from an outside issuer comes from (`--id-token-file`,
//! `--id-token-env`). A file is read again on every connection and every
//! `--id-token-refresh` (30 s), so a token refreshed on disk (a projected Kubernetes service-account
//! token, a CI job's token) renews the node's access without a restart.

use std::path::PathBuf;

use anyhow::{Context, bail};
use wire::IdToken;

/// Largest token accepted.
const MAX_LEN: usize = 16 << 10;

/// A source of tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdTokenSource {
    /// A file holding the token (surrounding whitespace ignored).
    File(PathBuf),
    /// An environment variable holding it.
    Env(String),
}

impl IdTokenSource {
    /// The current token.
    pub fn read(&self) -> anyhow::Result<IdToken> {
        let raw = match self {
            Self::File(p) => {
                let meta = std::fs::metadata(p)
                    .with_context(|| format!("reading the id token file {}", p.display()))?;
                if meta.len() > MAX_LEN as u64 {
                    bail!("the id token file {} is over {MAX_LEN} bytes", p.display());
                }
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading the id token file {}", p.display()))?
            }
            Self::Env(v) => {
                std::env::var(v).with_context(|| format!("reading the id token from ${v}"))?
            }
        };
        let t = raw.trim();
        if t.is_empty() {
            bail!("the id token ({self}) is empty");
        }
        if t.len() > MAX_LEN || t.split('.').count() != 3 {
            bail!("the id token ({self}) is not a JWT");
        }
        Ok(IdToken(t.to_owned()))
    }
}

impl std::fmt::Display for IdTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Env(v) => write!(f, "${v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_fresh_each_time_and_nonsense_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let src = IdTokenSource::File(p.clone());
        assert!(src.read().is_err(), "missing file");
        std::fs::write(&p, "aaa.bbb.ccc\n").unwrap();
        assert_eq!(src.read().unwrap(), IdToken("aaa.bbb.ccc".into()));
        std::fs::write(&p, "ddd.eee.fff").unwrap();
        assert_eq!(src.read().unwrap(), IdToken("ddd.eee.fff".into()));
        for bad in ["", "  \n", "not-a-jwt", "a.b"] {
            std::fs::write(&p, bad).unwrap();
            assert!(src.read().is_err(), "{bad:?}");
        }
        std::fs::write(&p, format!("a.{}.c", "b".repeat(MAX_LEN))).unwrap();
        assert!(src.read().unwrap_err().to_string().contains("bytes"));
    }
}
