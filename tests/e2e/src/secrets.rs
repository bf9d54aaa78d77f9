//! Looking for secrets in the logs of a lab's processes: every key, token and post-quantum
//! preshared key the lab's processes and tests used must be absent from every log line the
//! Lattice binaries wrote, in any common encoding.
//!
//! The secrets come from two places: what tests hand the lab ([`crate::Lab::secret`]: auth keys,
//! admin tokens) and what is on disk when the lab ends: node identities (`keys.json`), the
//! coordinator's and relays' keys (`*.key`, `*-key.der`) and the PSK key logs nodes write
//! under `LATTICE_PSK_KEYLOG`.

use std::path::{Path, PathBuf};

use base64::Engine;

/// A secret and what it is (the report names it, never shows it).
pub(crate) struct Secret {
    pub(crate) label: String,
    pub(crate) needles: Vec<String>,
}

impl Secret {
    /// A text secret (an auth key, a token), looked for as it is.
    pub(crate) fn text(label: &str, value: &str) -> Option<Self> {
        (value.len() >= 16).then(|| Self {
            label: label.to_owned(),
            needles: vec![value.to_owned()],
        })
    }

    /// Key bytes, looked for in hex (both cases) and base64 (standard, URL-safe, padded or
    /// not).
    pub(crate) fn bytes(label: &str, b: &[u8]) -> Option<Self> {
        if b.len() < 16 || b.iter().all(|x| *x == 0) {
            return None;
        }
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let mut needles = vec![hex.clone(), hex.to_uppercase()];
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            needles.push(engine.encode(b));
        }
        needles.dedup();
        Some(Self {
            label: label.to_owned(),
            needles,
        })
    }
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Every secret kept on disk under `dir`.
pub(crate) fn on_disk(dir: &Path) -> Vec<Secret> {
    let mut out = Vec::new();
    for path in files(dir) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        if name == "keys.json" {
            let Ok(v) = std::fs::read(&path)
                .map_err(|_| ())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|_| ()))
            else {
                continue;
            };
            for field in ["machine_private", "node_private"] {
                if let Some(b) = v[field].as_str().and_then(hex_bytes) {
                    out.extend(Secret::bytes(&format!("{label} {field}"), &b));
                }
            }
        } else if name.ends_with(".key") {
            if let Some(b) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| hex_bytes(&t))
            {
                out.extend(Secret::bytes(&label, &b));
            }
        } else if name.ends_with("-key.der") {
            if let Ok(b) = std::fs::read(&path) {
                out.extend(Secret::bytes(&label, &b));
            }
        } else if name.ends_with(".keylog") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for (i, line) in text.lines().enumerate() {
                if let Some(b) = line.split_whitespace().nth(2).and_then(hex_bytes) {
                    out.extend(Secret::bytes(&format!("{label} psk #{}", i + 1), &b));
                }
            }
        }
    }
    out
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

/// `label in log` for every secret found in one of `logs`.
pub(crate) fn find(secrets: &[Secret], logs: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for log in logs {
        let Ok(bytes) = std::fs::read(log) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for s in secrets {
            if s.needles.iter().any(|n| text.contains(n.as_str())) {
                found.push(format!("{} appears in {}", s.label, log.display()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_in_any_encoding_and_named_without_being_shown() {
        let d = tempfile::tempdir().unwrap();
        let key = [0x5au8; 32];
        let hex: String = key.iter().map(|x| format!("{x:02x}")).collect();
        std::fs::create_dir(d.path().join("node-a")).unwrap();
        std::fs::write(
            d.path().join("node-a/keys.json"),
            format!(
                r#"{{"machine_private": "{hex}", "node_private": "{}"}}"#,
                "11".repeat(32)
            ),
        )
        .unwrap();
        std::fs::write(
            d.path().join("n.keylog"),
            format!("psk nodekey:aa {}\n", "33".repeat(32)),
        )
        .unwrap();
        let secrets = on_disk(d.path());
        assert_eq!(secrets.len(), 3);
        let log = d.path().join("a.log");
        for leak in [
            hex.to_uppercase(),
            base64::engine::general_purpose::STANDARD.encode(key),
            format!("x{}y", "33".repeat(32)),
        ] {
            std::fs::write(&log, format!("INFO something {leak} happened")).unwrap();
            let found = find(&secrets, std::slice::from_ref(&log));
            assert_eq!(found.len(), 1, "{leak}: {found:?}");
            assert!(!found[0].contains(&leak));
        }
        std::fs::write(&log, "INFO clean").unwrap();
        assert!(find(&secrets, &[log]).is_empty());
    }
}
