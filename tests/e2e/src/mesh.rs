//! Starting and driving the real Lattice binaries inside a [`Lab`].

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::lab::{Lab, Proc, wait_for};

/// A running `lattice-coordinator serve`.
pub struct Coordinator {
    /// Namespace it runs in.
    pub ns: String,
    /// `http://ip:port`.
    pub url: String,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// The process.
    pub proc: Proc,
    listen: String,
    extra: Vec<String>,
}

impl Coordinator {
    /// Starts a coordinator listening on `ip:8080` in `ns`.
    pub fn start(lab: &mut Lab, ns: &str, ip: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_named(lab, "coordinator", ns, ip, extra)
    }

    /// Starts a coordinator listening on `ip:8080` in `ns` with state dir `name` in the lab
    /// (for several replicas in one lab). Key files already in that dir are used.
    pub fn start_named(
        lab: &mut Lab,
        name: &str,
        ns: &str,
        ip: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let state_dir = lab.dir().join(name);
        let listen = format!("{ip}:8080");
        let mut c = Self {
            ns: ns.to_owned(),
            url: format!("http://{listen}"),
            state_dir,
            proc: Proc::placeholder(),
            listen,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        c.proc = c.spawn(lab)?;
        Ok(c)
    }

    fn spawn(&self, lab: &mut Lab) -> anyhow::Result<Proc> {
        let bin = lab.bin("lattice-coordinator");
        let state = self.state_dir.display().to_string();
        let mut args = vec![
            bin.to_str().context("utf-8 path")?,
            "serve",
            "--listen",
            &self.listen,
            "--state-dir",
            &state,
        ];
        args.extend(self.extra.iter().map(String::as_str));
        let role = self
            .state_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("coordinator")
            .to_owned();
        let p = lab.spawn(&role, &self.ns, &args, &[])?;
        let up = wait_for(Duration::from_secs(20), || {
            lab.stdout(p).contains("control key fingerprint") || lab.exited_quietly(p)
        });
        if !up || lab.exited_quietly(p) {
            bail!("coordinator did not start:\n{}", lab.log(p));
        }
        Ok(p)
    }

    /// Kills the coordinator hard (no graceful shutdown).
    pub fn kill(&self, lab: &mut Lab) {
        lab.kill(self.proc);
    }

    /// Starts it again from the same state dir.
    pub fn restart(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        self.proc = self.spawn(lab)?;
        Ok(())
    }

    /// Runs an admin command (`nodes list`, ...) against this coordinator.
    pub fn admin(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<Output> {
        let bin = lab.bin("lattice-coordinator");
        let state = self.state_dir.display().to_string();
        let mut full = vec![bin.to_str().context("utf-8 path")?];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--state-dir", &state]);
        lab.output(&self.ns, &full)
    }

    /// Creates an auth key with extra flags and returns it.
    pub fn authkey(&self, lab: &Lab, flags: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["authkey", "create"];
        args.extend_from_slice(flags);
        let out = self.admin(lab, &args)?;
        if !out.status.success() {
            bail!(
                "authkey create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let key = String::from_utf8(out.stdout)?.trim().to_owned();
        lab.secret("an auth key", &key);
        // `lk1-<fingerprint>-<id>-<secret>`: the secret part alone, too.
        lab.secret(
            "an auth key's secret part",
            key.rsplit('-').next().unwrap_or_default(),
        );
        Ok(key)
    }

    /// `nodes list --json`.
    pub fn nodes(&self, lab: &Lab) -> anyhow::Result<Vec<Value>> {
        let out = self.admin(lab, &["nodes", "list", "--json"])?;
        if !out.status.success() {
            bail!(
                "nodes list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// A running `lattice up`.
pub struct MeshNode {
    /// Namespace it runs in.
    pub ns: String,
    /// The hostname it asked for.
    pub hostname: String,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// The process.
    pub proc: Proc,
    args: Vec<String>,
}

impl MeshNode {
    /// Starts `lattice up --coordinator URL --auth-key KEY --hostname NAME` in `ns`.
    pub fn start(
        lab: &mut Lab,
        ns: &str,
        hostname: &str,
        coordinator: &str,
        key: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<&str> = vec!["--auth-key", key];
        args.extend(extra);
        Self::start_with(lab, ns, hostname, coordinator, &args)
    }

    /// Starts `lattice up --coordinator URL --hostname NAME --state-dir DIR ARGS...` in `ns`
    /// (ARGS say how it joins).
    pub fn start_with(
        lab: &mut Lab,
        ns: &str,
        hostname: &str,
        coordinator: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let state_dir = lab.dir().join(format!("node-{hostname}"));
        let mut args: Vec<String> = vec![
            "up".into(),
            "--coordinator".into(),
            coordinator.into(),
            "--hostname".into(),
            hostname.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut n = Self {
            ns: ns.to_owned(),
            hostname: hostname.to_owned(),
            state_dir,
            proc: Proc::placeholder(),
            args,
        };
        n.proc = n.spawn(lab)?;
        Ok(n)
    }

    fn spawn(&self, lab: &mut Lab) -> anyhow::Result<Proc> {
        let bin = lab.bin("lattice");
        let mut full = vec![bin.to_str().context("utf-8 path")?];
        full.extend(self.args.iter().map(String::as_str));
        lab.spawn(&format!("node-{}", self.hostname), &self.ns, &full, &[])
    }

    /// Starts the same command again (after a stop or crash).
    pub fn restart(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        self.proc = self.spawn(lab)?;
        Ok(())
    }

    /// Runs a `lattice` CLI command against this node's daemon.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<Output> {
        let bin = lab.bin("lattice");
        let state = self.state_dir.display().to_string();
        let mut full = vec![bin.to_str().context("utf-8 path")?];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--state-dir", &state]);
        lab.output(&self.ns, &full)
    }

    /// `lattice status --json`, if the daemon answers.
    pub fn status(&self, lab: &Lab) -> Option<Value> {
        let out = self.cli(lab, &["status", "--json"]).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the daemon runs, is connected and sees `peers` peers.
    pub fn wait_ready(&self, lab: &Lab, peers: usize, timeout: Duration) -> anyhow::Result<Value> {
        let mut last = None;
        let ok = wait_for(timeout, || {
            last = self.status(lab);
            last.as_ref().is_some_and(|s| {
                s["backend_state"] == "running"
                    && s["coordinator"]["connected"] == true
                    && s["peers"].as_array().is_some_and(|p| p.len() == peers)
            })
        });
        if !ok {
            bail!(
                "node {} not ready with {peers} peers; last status: {last:?}\nlog:\n{}",
                self.hostname,
                lab.log(self.proc)
            );
        }
        Ok(last.expect("set when ready"))
    }

    /// Pings `target` from this node (`-4`/`-6` for the family); true if any reply came.
    pub fn ping(&self, lab: &Lab, target: &str, family: &str, count: u32) -> bool {
        let c = count.to_string();
        lab.output(
            &self.ns,
            &["ping", family, "-c", &c, "-i", "0.2", "-W", "2", target],
        )
        .is_ok_and(|o| o.status.success())
    }
}

impl Proc {
    fn placeholder() -> Self {
        Self::from_index(usize::MAX)
    }
}

impl Lab {
    /// Whether a process has exited (without reaping errors).
    pub fn exited_quietly(&mut self, p: Proc) -> bool {
        self.exited(p).is_some()
    }
}
