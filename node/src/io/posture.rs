//! Posture collection: what this node tells the coordinator about itself, so policies can
//! require it (`node:os`, `node:osVersion`, `node:kernelVersion`, `node:clientVersion`,
//! `node:diskEncrypted`, `node:firewall`, and `fact:NAME` from an admin-configured command).
//!
//! The collector runs every `interval` and publishes the facts on a watch channel; the control
//! client sends them after every (re)connect and whenever they change. A fact that cannot be
//! determined is left out, so a posture that requires it fails (closed) rather than passing on
//! a guess.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};
use wire::AttrValue;

/// Posture facts by attribute name.
pub type Facts = BTreeMap<String, AttrValue>;

/// How long the posture command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most facts taken from the command (the coordinator keeps at most 64 in all).
const MAX_COMMAND_FACTS: usize = 48;

/// Collector settings.
#[derive(Debug, Clone)]
pub struct PostureConfig {
    /// How often facts are collected.
    pub interval: Duration,
    /// `sh -c` command printing `NAME=VALUE` lines, reported as `fact:NAME`.
    pub command: Option<String>,
}

/// Collects facts forever, publishing them when they change.
pub async fn run(cfg: PostureConfig, tx: watch::Sender<Option<Facts>>) {
    let mut warned = false;
    loop {
        let facts = collect(&cfg, &mut warned).await;
        tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&facts) {
                false
            } else {
                debug!(facts = facts.len(), "posture changed");
                *cur = Some(facts);
                true
            }
        });
        tokio::time::sleep(cfg.interval).await;
    }
}

async fn collect(cfg: &PostureConfig, warned: &mut bool) -> Facts {
    let mut f = Facts::new();
    let s = |v: &str| AttrValue::String(v.to_owned());
    f.insert("node:os".into(), s(std::env::consts::OS));
    f.insert("node:clientVersion".into(), s(env!("CARGO_PKG_VERSION")));
    if let Some(v) = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| os_release_field(&t, "VERSION_ID"))
    {
        f.insert("node:osVersion".into(), AttrValue::String(v));
    }
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        f.insert("node:kernelVersion".into(), s(k.trim()));
    }
    if let Some(enc) = root_encrypted(Path::new("/proc/self/mountinfo"), Path::new("/sys")) {
        f.insert("node:diskEncrypted".into(), AttrValue::Bool(enc));
    }
    if let Some(fw) = firewall_active().await {
        f.insert("node:firewall".into(), AttrValue::Bool(fw));
    }
    if let Some(cmd) = &cfg.command {
        match run_command(cmd).await {
            Ok(out) => {
                let (facts, bad) = parse_command_output(&out);
                if !bad.is_empty() && !*warned {
                    warn!(lines = ?bad, "posture command printed lines that are not NAME=VALUE; ignored");
                    *warned = true;
                }
                f.extend(facts);
            }
            Err(e) => warn!(error = %e, "posture command failed; reporting no fact: values"),
        }
    }
    f
}

/// A field of /etc/os-release, unquoted.
fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_owned())
    })
}

/// Whether the root filesystem sits on dm-crypt (directly or below LVM/RAID device-mapper
/// layers). `None` when it cannot be told.
fn root_encrypted(mountinfo: &Path, sys: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(mountinfo).ok()?;
    // Fields: id parent major:minor root mountpoint ... - fstype source options
    // The last mount on / is the one in effect.
    let root = text
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some("/"))?;
    let dev = root.split(' ').nth(2)?;
    let (major, minor) = dev.split_once(':')?;
    let block = sys.join("dev/block").join(format!("{major}:{minor}"));
    if !block.exists() {
        // Not a block device (overlay, tmpfs, a network filesystem): not disk-encrypted here.
        return Some(false);
    }
    Some(dm_crypt_below(&block, 0))
}

fn dm_crypt_below(dev: &Path, depth: u8) -> bool {
    if depth > 8 {
        return false;
    }
    if std::fs::read_to_string(dev.join("dm/uuid")).is_ok_and(|u| u.starts_with("CRYPT-")) {
        return true;
    }
    let Ok(slaves) = std::fs::read_dir(dev.join("slaves")) else {
        return false;
    };
    slaves
        .flatten()
        .any(|s| dm_crypt_below(&s.path(), depth + 1))
}

/// Whether this network namespace filters inbound traffic with nftables: some chain on the
/// input hook drops what its rules do not accept. `None` without a working `nft`.
async fn firewall_active() -> Option<bool> {
    let out = tokio::time::timeout(
        COMMAND_TIMEOUT,
        tokio::process::Command::new("nft")
            .args(["-j", "list", "chains"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let chains = v.get("nftables")?.as_array()?;
    Some(chains.iter().filter_map(|c| c.get("chain")).any(|c| {
        c.get("hook").and_then(|h| h.as_str()) == Some("input")
            && c.get("policy").and_then(|p| p.as_str()) == Some("drop")
    }))
}

async fn run_command(cmd: &str) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        COMMAND_TIMEOUT,
        tokio::process::Command::new("sh")
            .args(["-c", cmd])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out after {COMMAND_TIMEOUT:?}"))??;
    if !out.status.success() {
        anyhow::bail!("exited with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `NAME=VALUE` lines -> `fact:NAME` facts (values typed as in the policy: true/false,
/// numbers, else strings). Returns the facts and the lines that were not valid.
fn parse_command_output(out: &str) -> (Facts, Vec<String>) {
    let mut facts = Facts::new();
    let mut bad = Vec::new();
    for line in out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let parsed = line.split_once('=').and_then(|(k, v)| {
            let name = format!("fact:{}", k.trim());
            let v = v.trim();
            (policy_name_ok(&name) && v.len() <= 256).then(|| (name, AttrValue::from_text(v)))
        });
        match parsed {
            Some((k, v)) if facts.len() < MAX_COMMAND_FACTS => {
                facts.insert(k, v);
            }
            _ => bad.push(line.chars().take(80).collect()),
        }
    }
    (facts, bad)
}

fn policy_name_ok(name: &str) -> bool {
    name.len() <= 64
        && name.strip_prefix("fact:").is_some_and(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_output_becomes_typed_facts() {
        let (facts, bad) = parse_command_output(
            "edr=running\n# comment\n\nscore = 7.5\nmanaged=true\nnot a fact\nbad name=1\n",
        );
        assert_eq!(facts["fact:edr"], AttrValue::String("running".into()));
        assert_eq!(facts["fact:score"], AttrValue::Number(7.5));
        assert_eq!(facts["fact:managed"], AttrValue::Bool(true));
        assert_eq!(facts.len(), 3);
        assert_eq!(bad, ["not a fact", "bad name=1"]);
    }

    #[test]
    fn os_release_values_are_unquoted() {
        let t = "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n";
        assert_eq!(os_release_field(t, "VERSION_ID").as_deref(), Some("12"));
        assert_eq!(os_release_field(t, "ID").as_deref(), Some("debian"));
        assert_eq!(os_release_field(t, "VERSION").as_deref(), None);
    }

    /// A fake /sys with root on dm-1 (LVM) on dm-0 (LUKS) on sda2.
    #[test]
    fn dm_crypt_is_found_below_lvm() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        let mk = |p: &str| std::fs::create_dir_all(sys.join(p)).unwrap();
        mk("dev/block/254:1/dm");
        mk("dev/block/254:1/slaves");
        mk("block/dm-0/dm");
        std::fs::write(sys.join("dev/block/254:1/dm/uuid"), "LVM-abc\n").unwrap();
        std::fs::write(sys.join("block/dm-0/dm/uuid"), "CRYPT-LUKS2-0123-root\n").unwrap();
        std::os::unix::fs::symlink(
            sys.join("block/dm-0"),
            sys.join("dev/block/254:1/slaves/dm-0"),
        )
        .unwrap();
        let mountinfo = dir.path().join("mountinfo");
        std::fs::write(
            &mountinfo,
            "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n\
             23 22 0:21 / /proc rw - proc proc rw\n",
        )
        .unwrap();
        assert_eq!(root_encrypted(&mountinfo, sys), Some(true));
        std::fs::write(sys.join("block/dm-0/dm/uuid"), "LVM-plain\n").unwrap();
        assert_eq!(root_encrypted(&mountinfo, sys), Some(false));
        // Root on an overlay (no block device): not encrypted.
        std::fs::write(&mountinfo, "22 1 0:33 / / rw - overlay overlay rw\n").unwrap();
        assert_eq!(root_encrypted(&mountinfo, sys), Some(false));
    }

    #[tokio::test]
    async fn the_command_is_run_and_its_failure_reported() {
        assert_eq!(run_command("echo a=1").await.unwrap(), "a=1\n");
        assert!(run_command("exit 3").await.is_err());
    }
}
