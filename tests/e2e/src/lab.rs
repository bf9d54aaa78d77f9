//! Namespaces, links and processes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running process inside the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc(usize);

impl Proc {
    pub(crate) fn from_index(i: usize) -> Self {
        Self(i)
    }
}

struct Running {
    name: String,
    child: Option<Child>,
    /// One of the Lattice daemons (its logs are searched for secrets).
    ours: bool,
}

/// The external address of a [`Lab::port_mapping_gateway`]: not a reserved range, because
/// miniupnpd will not map ports on one. It is assigned inside a lab namespace only, and no lab
/// namespace has a way out, so nothing is ever sent to the real holder of the address.
pub const GATEWAY_EXT_IP: &str = "192.0.31.1";

/// How a lab router treats the UDP of the host behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: endpoint-independent mapping (keeps the port), filtering by remote
    /// address and port, like most home routers.
    Easy,
    /// `masquerade random`: a random public port per destination (symmetric, "hard").
    Hard,
    /// Masquerade, and every forwarded UDP packet dropped (TCP works).
    UdpBlocked,
    /// `masquerade`, and unsolicited packets from the WAN reach the router itself (a Docker
    /// host or a cloud VM without a host firewall, masquerading for its containers): each
    /// leaves a conntrack entry that makes the router pick another public port for its host's
    /// own flow toward that sender.
    WanInput,
}

impl Nat {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Easy => "easy",
            Self::Hard => "hard",
            Self::UdpBlocked => "udp-blocked",
            Self::WanInput => "wan-input",
        }
    }

    fn ruleset(self) -> String {
        let masq = match self {
            Self::Hard => "masquerade random",
            Self::Easy | Self::UdpBlocked | Self::WanInput => "masquerade",
        };
        let mut script = format!(
            "nft add table ip lab && \
             nft 'add chain ip lab post {{ type nat hook postrouting priority 100; }}' && \
             nft add rule ip lab post oifname wan {masq} && \
             nft 'add chain ip lab forward {{ type filter hook forward priority 0; policy accept; }}'"
        );
        // Like any home router: nothing unsolicited from the WAN reaches the router itself.
        // (Without this, an unsolicited packet to the router's address leaves a conntrack
        // entry that makes the router pick another port for its host's own outbound flow.)
        script.push_str(
            " && nft 'add chain ip lab input { type filter hook input priority 0; policy accept; }'",
        );
        if self != Self::WanInput {
            script.push_str(" && nft add rule ip lab input iifname wan ct state new drop");
        }
        if self == Self::UdpBlocked {
            script.push_str(" && nft add rule ip lab forward meta l4proto udp drop");
        }
        script
    }
}

/// A set of namespaces and processes that disappear with it.
pub struct Lab {
    id: String,
    namespaces: Vec<String>,
    procs: Vec<Running>,
    dir: PathBuf,
    bin_dir: PathBuf,
    veth_counter: u32,
    keep_logs: bool,
    /// Search the daemons' logs for secrets when the lab ends (and log at debug level).
    scan_secrets: bool,
    secrets: std::sync::Mutex<Vec<crate::secrets::Secret>>,
}

impl Lab {
    /// A new, empty lab. Fails when namespaces cannot be created (not root, no netns).
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        reap_stale_labs();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("lt{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{id}-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let lab = Self {
            id,
            namespaces: Vec::new(),
            procs: Vec::new(),
            dir,
            bin_dir: bin_dir()?,
            veth_counter: 0,
            keep_logs: std::env::var_os("LATTICE_KEEP_LOGS").is_some(),
            scan_secrets: false,
            secrets: std::sync::Mutex::new(Vec::new()),
        };
        Ok(lab)
    }

    /// Whether this machine can run labs (root with working network namespaces). Probed
    /// once per process.
    pub fn available() -> Result<(), String> {
        static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        PROBE
            .get_or_init(|| {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } != 0 {
                    return Err("not running as root".into());
                }
                let probe = format!("ltprobe{}", std::process::id());
                let ok = Command::new("ip")
                    .args(["netns", "add", &probe])
                    .status()
                    .is_ok_and(|s| s.success());
                let _ = Command::new("ip").args(["netns", "del", &probe]).status();
                if ok {
                    Ok(())
                } else {
                    Err("cannot create network namespaces (is iproute2 installed?)".into())
                }
            })
            .clone()
    }

    /// The directory holding this lab's logs and state dirs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a binary built from this workspace (`lattice`, `lattice-coordinator`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Creates a namespace `<lab id>-<role>` with loopback up and a mesh-DNS resolv.conf.
    pub fn ns(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("{}-{role}", self.id);
        cmd("ip", &["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        self.run(&name, &["ip", "link", "set", "lo", "up"])?;
        let etc = Path::new("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("resolv.conf"),
            "nameserver 100.100.100.100\nsearch mesh.internal\noptions timeout:2 attempts:2\n",
        )?;
        Ok(name)
    }

    /// Creates a namespace holding a bridge `br0` with address `gateway/prefix`.
    pub fn lan(&mut self, role: &str, gateway_cidr: &str) -> anyhow::Result<String> {
        let ns = self.ns(role)?;
        self.sh(
            &ns,
            &format!(
                "ip link add br0 type bridge && ip link set br0 up && ip addr add {gateway_cidr} dev br0 \
                 && sysctl -qw net.ipv4.ip_forward=1"
            ),
        )?;
        Ok(ns)
    }

    /// Connects `host` to the bridge in `lan` with a veth pair; the host side is `dev` with
    /// `cidr` (and, if given, a default route via `gateway`).
    pub fn attach(
        &mut self,
        lan: &str,
        host: &str,
        dev: &str,
        cidr: &str,
        gateway: Option<&str>,
    ) -> anyhow::Result<()> {
        self.veth_counter += 1;
        let v = format!("v{}", self.veth_counter);
        self.run(
            lan,
            &[
                "ip", "link", "add", &v, "type", "veth", "peer", "name", dev, "netns", host,
            ],
        )?;
        self.run(lan, &["ip", "link", "set", &v, "master", "br0", "up"])?;
        self.run(host, &["ip", "link", "set", dev, "up"])?;
        self.run(host, &["ip", "addr", "add", cidr, "dev", dev])?;
        if let Some(gw) = gateway {
            self.run(host, &["ip", "route", "add", "default", "via", gw])?;
        }
        Ok(())
    }

    /// A host behind a NAT router. The router namespace has `wan` on `wan_lan` with
    /// `wan_cidr` and a private link `lan` (10.`net`.0.1/24) to the host namespace, whose
    /// `eth0` is 10.`net`.0.2/24 with a default route through the router. Returns (router,
    /// host).
    pub fn natted_host(
        &mut self,
        wan_lan: &str,
        role: &str,
        wan_cidr: &str,
        net: u8,
        nat: Nat,
    ) -> anyhow::Result<(String, String)> {
        let router = self.ns(&format!("{role}r"))?;
        let host = self.ns(role)?;
        self.attach(wan_lan, &router, "wan", wan_cidr, None)?;
        self.run(
            &router,
            &[
                "ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &host,
            ],
        )?;
        self.sh(
            &router,
            &format!("ip addr add 10.{net}.0.1/24 dev lan && ip link set lan up && sysctl -qw net.ipv4.ip_forward=1"),
        )?;
        self.sh(
            &host,
            &format!("ip addr add 10.{net}.0.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.{net}.0.1"),
        )?;
        self.sh(&router, &nat.ruleset())?;
        Ok((router, host))
    }

    /// Starts coturn's `turnserver` in `ns` as a STUN server for NAT behaviour discovery
    /// (RFC 5780: it answers from `ip` and `other_ip`, ports 3478 and 3479, both of which
    /// must be addresses in `ns`), for `turnutils_natdiscovery` to classify the lab's routers.
    pub fn rfc5780_stun(&mut self, ns: &str, ip: &str, other_ip: &str) -> anyhow::Result<Proc> {
        let log = self.dir.join("turnserver-internal.log");
        let log = log.display().to_string();
        self.spawn(
            "turnserver",
            ns,
            &[
                "turnserver",
                "-c",
                "/dev/null",
                "--listening-ip",
                ip,
                "--listening-ip",
                other_ip,
                "--no-tls",
                "--no-dtls",
                "--no-tcp-relay",
                "--no-auth",
                "--no-cli",
                "--log-file",
                &log,
            ],
            &[],
        )
    }

    /// Makes `router` (a [`Lab::natted_host`] router whose host is 10.`net`.0.2) a gateway
    /// that offers port mappings: Debian's `miniupnpd` (nftables backend) with UPnP-IGD and
    /// NAT-PMP/PCP on its LAN side, allowed to map only ports of its own host. Mapped ports
    /// are forwarded; everything else is NATed as the router's kind says. miniupnpd refuses
    /// every reserved range as its external address (the lab's "internet" uses documentation
    /// ranges), so the router also gets [`GATEWAY_EXT_IP`], an address that exists only
    /// inside this namespace; the other hosts need a route to it through the router's WAN
    /// address.
    pub fn port_mapping_gateway(&mut self, router: &str, net: u8) -> anyhow::Result<Proc> {
        // The chains miniupnpd fills, at priorities just before the lab's own NAT chain, so a
        // mapped port is translated by miniupnpd's rules and not by the router's masquerade.
        self.sh(router, &format!("ip addr add {GATEWAY_EXT_IP}/32 dev wan"))?;
        self.sh(
            router,
            "nft add table inet filter && \
             nft 'add chain inet filter forward { type filter hook forward priority 0; policy accept; }' && \
             nft add chain inet filter miniupnpd && \
             nft add rule inet filter forward jump miniupnpd && \
             nft 'add chain inet filter prerouting { type nat hook prerouting priority -100; policy accept; }' && \
             nft 'add chain inet filter postrouting { type nat hook postrouting priority 99; policy accept; }' && \
             nft add chain inet filter prerouting_miniupnpd && \
             nft add chain inet filter postrouting_miniupnpd && \
             nft add rule inet filter prerouting jump prerouting_miniupnpd && \
             nft add rule inet filter postrouting jump postrouting_miniupnpd",
        )?;
        let conf = self.dir.join(format!("miniupnpd-{router}.conf"));
        std::fs::write(
            &conf,
            format!(
                "ext_ifname=wan\next_ip={GATEWAY_EXT_IP}\n\
                 listening_ip=lan\nhttp_port=0\nenable_natpmp=yes\n\
                 enable_upnp=yes\nsecure_mode=yes\nsystem_uptime=yes\n\
                 uuid=3c1e0e50-6a5a-4f0e-9d55-5a4c1a7e0001\n\
                 upnp_table_name=filter\nupnp_nat_table_name=filter\n\
                 upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
                 upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
                 allow 1024-65535 10.{net}.0.2/32 1024-65535\n\
                 deny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )?;
        let pid = self.dir.join(format!("miniupnpd-{router}.pid"));
        self.spawn(
            &format!("miniupnpd-{router}"),
            router,
            &[
                "/usr/sbin/miniupnpd",
                "-f",
                &conf.display().to_string(),
                "-P",
                &pid.display().to_string(),
                "-d",
            ],
            &[],
        )
    }

    /// Makes a lab NAT router (from [`Lab::natted_host`]) map its host's flows to public ports
    /// in `ports` (`20000-29999`) from now on, and forgets every mapping it had: a real
    /// rebinding, as when a home router reboots, where the host's public port moves.
    pub fn move_nat_ports(&self, router: &str, ports: &str) -> anyhow::Result<()> {
        self.sh(
            router,
            &format!(
                "nft flush chain ip lab post && \
                 nft add rule ip lab post oifname wan meta l4proto udp masquerade to :{ports} && \
                 nft add rule ip lab post oifname wan masquerade && conntrack -F 2>/dev/null; true"
            ),
        )?;
        Ok(())
    }

    /// Runs a command in `ns` and fails unless it exits 0.
    pub fn run(&self, ns: &str, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.output(ns, args)?;
        if !out.status.success() {
            bail!(
                "`{}` in {ns} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Runs a command in `ns` and returns its output whatever the exit status.
    pub fn output(&self, ns: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .env("LATTICE_LOG", "warn")
            .output()
            .with_context(|| format!("running {}", args.join(" ")))
    }

    /// Runs a shell snippet in `ns` and fails unless it exits 0.
    pub fn sh(&self, ns: &str, script: &str) -> anyhow::Result<Output> {
        self.run(ns, &["sh", "-c", script])
    }

    /// Starts a long-running process in `ns`; its stdout and stderr go to `<name>.out` and
    /// `<name>.log` in the lab dir.
    pub fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let out = File::create(self.dir.join(format!("{name}.out")))?;
        let err = File::create(self.dir.join(format!("{name}.log")))?;
        let program = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = matches!(
            program.as_str(),
            "lattice" | "lattice-coordinator" | "lattice-relay"
        );
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "LATTICE_LOG",
                if self.scan_secrets && ours {
                    "debug"
                } else {
                    "info"
                },
            );
        if self.scan_secrets && program == "lattice" {
            c.env(
                "LATTICE_PSK_KEYLOG",
                self.dir.join(format!("{name}.keylog")),
            );
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", args.join(" ")))?;
        self.procs.push(Running {
            name: name.to_owned(),
            child: Some(child),
            ours,
        });
        Ok(Proc(self.procs.len() - 1))
    }

    /// Sends `signal` to a process.
    pub fn signal(&self, p: Proc, signal: i32) {
        if let Some(c) = self.procs.get(p.0).and_then(|r| r.child.as_ref()) {
            // SAFETY: kill on a pid we spawned.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Kills a process hard and reaps it.
    pub fn kill(&mut self, p: Proc) {
        if let Some(mut c) = self.procs.get_mut(p.0).and_then(|r| r.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops a process with SIGTERM (SIGKILL after `grace`); returns its exit status.
    pub fn stop(&mut self, p: Proc, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.procs.get_mut(p.0).and_then(|r| r.child.take())?;
        // SAFETY: kill on a pid we spawned.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// The exit status of a process, if it has exited.
    pub fn exited(&mut self, p: Proc) -> Option<std::process::ExitStatus> {
        self.procs
            .get_mut(p.0)
            .and_then(|r| r.child.as_mut())
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for a process to exit (up to `timeout`).
    pub fn wait_exit(&mut self, p: Proc, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited(p) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The stderr log of a process so far.
    pub fn log(&self, p: Proc) -> String {
        let name = &self.procs[p.0].name;
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A running process's PID (`ip netns exec` execs the program, so it is the program's).
    pub fn pid(&self, p: Proc) -> Option<u32> {
        self.procs[p.0].child.as_ref().map(Child::id)
    }

    /// The stdout of a process so far.
    pub fn stdout(&self, p: Proc) -> String {
        let name = &self.procs[p.0].name;
        std::fs::read_to_string(self.dir.join(format!("{name}.out"))).unwrap_or_default()
    }

    /// Keeps the lab dir (logs) after the lab is dropped.
    pub fn keep_logs(&mut self) {
        self.keep_logs = true;
    }

    /// Makes the lab hunt for secrets: processes started from now on log at debug level and
    /// nodes write their post-quantum keys to a key log; when the lab ends, every key, token
    /// and PSK it saw (on disk, or handed over with [`Lab::secret`]) is looked for in every
    /// log of the Lattice daemons, and a find fails the test (naming the secret and the log,
    /// never showing the secret).
    pub fn scan_for_secrets(&mut self) {
        self.scan_secrets = true;
    }

    /// A secret a test handled (an auth key, an admin token, or the secret part of one), for
    /// [`Lab::scan_for_secrets`].
    pub fn secret(&self, label: &str, value: &str) {
        self.secrets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(crate::secrets::Secret::text(label, value));
    }

    fn leaked_secrets(&self) -> Vec<String> {
        let mut secrets = crate::secrets::on_disk(&self.dir);
        secrets.append(
            &mut self
                .secrets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let logs: Vec<PathBuf> = self
            .procs
            .iter()
            .filter(|r| r.ours)
            .flat_map(|r| {
                [
                    self.dir.join(format!("{}.log", r.name)),
                    self.dir.join(format!("{}.out", r.name)),
                ]
            })
            .collect();
        crate::secrets::find(&secrets, &logs)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for r in &mut self.procs {
            if let Some(c) = &r.child {
                // SAFETY: kill on a pid we spawned.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for r in &mut self.procs {
            if let Some(mut c) = r.child.take() {
                loop {
                    if matches!(c.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            delete_namespace(ns);
        }
        if self.scan_secrets && !std::thread::panicking() {
            let leaked = self.leaked_secrets();
            if !leaked.is_empty() {
                eprintln!("lab logs kept in {}", self.dir.display());
                panic!("secrets reached the logs:\n  {}", leaked.join("\n  "));
            }
        }
        if std::thread::panicking() || self.keep_logs {
            eprintln!("lab logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn delete_namespace(ns: &str) {
    // Kill anything still running inside (e.g. a daemonized wireguard-go), then delete.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill on a pid that lives in a namespace we own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Deletes namespaces of labs whose process is gone.
fn reap_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("lt") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(name);
        }
    }
}

fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where the workspace's binaries are: `LATTICE_BIN_DIR`, or the target dir this program was
/// built into.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("LATTICE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for b in ["lattice", "lattice-coordinator", "lattice-testtool"] {
        if !dir.join(b).exists() {
            bail!(
                "{} not found in {} (build the binaries first: cargo build --bins)",
                b,
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
