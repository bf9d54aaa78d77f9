//! Issue 14, packaging: the systemd units in `dist/systemd` pass `systemd-analyze verify`
//! (with their binaries at the paths the units name), and their sandboxing keeps the
//! exposure `systemd-analyze security` reports low; the Debian packages `scripts/package-deb`
//! builds install into a throwaway root with their users, state directories and files.

use std::path::Path;
use std::process::Command;

use crate::support::text;

const UNITS: [&str; 3] = [
    "lattice.service",
    "lattice-coordinator.service",
    "lattice-relay.service",
];

#[test]
fn the_systemd_units_verify_and_are_sandboxed() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("LATTICE_E2E_REQUIRED").is_some() {
            panic!("systemd-analyze is required (Debian's systemd package)");
        }
        eprintln!("SKIPPED packaging: no systemd-analyze");
        return;
    }
    let bins = e2e::lab::bin_dir().expect("the binaries");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        // The units name the installed binaries; verify them against the ones just built.
        let here = text.replace("/usr/bin/", &format!("{}/", bins.display()));
        assert_ne!(here, text, "{unit} names its binary under /usr/bin");
        let p = dir.path().join(unit);
        std::fs::write(&p, here).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    for p in &paths {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(p)
            .output()
            .unwrap();
        let report = text(&out);
        let level: f64 = report
            .lines()
            .find_map(|l| l.split("exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level: {report}"));
        // The node needs CAP_NET_ADMIN and the TUN device; the others need nothing.
        let limit = if p.ends_with("lattice.service") {
            3.0
        } else {
            2.0
        };
        assert!(
            level <= limit,
            "{}: exposure {level}\n{report}",
            p.display()
        );
    }
}

#[test]
fn the_example_config_files_are_valid_and_a_config_file_sets_flags() {
    let bins = e2e::lab::bin_dir().expect("the binaries");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/config");
    for (bin, sub) in [
        ("lattice", "up"),
        ("lattice-coordinator", "serve"),
        ("lattice-relay", "serve"),
    ] {
        let file = examples.join(format!("{bin}.toml"));
        // --help stops after the flags are read: it fails only if the file does not fit.
        let out = Command::new(bins.join(bin))
            .args([sub, "--config"])
            .arg(&file)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", file.display(), text(&out));
    }
    // A mistake names its place, and nothing runs.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:0\"\nlisten-on = 1\n").unwrap();
    let out = Command::new(bins.join("lattice-relay"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.starts_with(&format!(
            "lattice-relay: {}:2:1: unknown key \"listen-on\"",
            bad.display()
        )),
        "{said}"
    );
    // The file's values are used: the node takes its state dir from it (and stops, as it has
    // no mesh to join yet), unless the command line names another.
    let state = dir.path().join("from-config");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("state-dir = {:?}\nport = 0\n", state.display().to_string()),
    )
    .unwrap();
    let out = Command::new(bins.join("lattice"))
        .args(["up", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("has not joined a mesh yet"),
        "{}",
        text(&out)
    );
    assert!(state.is_dir(), "the config file's state-dir was used");
    let flag_state = dir.path().join("from-flag");
    let out = Command::new(bins.join("lattice"))
        .args(["up", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&flag_state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(flag_state.is_dir(), "the command line wins over the file");
}

/// The shell script run in the throwaway root: installs the packages, prints what the checks
/// below read, removes and purges them.
const IN_ROOT: &str = r##"set -e
dpkg -i /pkgs/*.deb
echo "user $(getent passwd lattice-coordinator | cut -d: -f1,6,7)"
echo "user $(getent passwd lattice-relay | cut -d: -f1,6,7)"
for d in /var/lib/lattice /var/lib/lattice-coordinator /var/lib/lattice-relay; do
  echo "dir $d $(stat -c '%U %G %a' $d)"
done
for f in /usr/bin/lattice /usr/bin/lattice-coordinator /usr/bin/lattice-relay \
         /etc/lattice/lattice.toml /etc/lattice/lattice-coordinator.toml \
         /etc/lattice/lattice-relay.toml /usr/lib/systemd/system/lattice.service \
         /usr/lib/systemd/system/lattice-coordinator.service \
         /usr/lib/systemd/system/lattice-relay.service; do
  echo "file $f $(stat -c '%U %G %a' $f)"
done
echo "version $(lattice --version)"
echo "version $(lattice-coordinator --version)"
echo "version $(lattice-relay --version)"
lattice-relay serve --config /etc/lattice/lattice-relay.toml --help >/dev/null && echo "config relay ok"
lattice-coordinator serve --config /etc/lattice/lattice-coordinator.toml --help >/dev/null \
  && echo "config coordinator ok"
systemd-analyze verify /usr/lib/systemd/system/lattice*.service && echo "units ok"
echo "# an admin's change" >> /etc/lattice/lattice-relay.toml
dpkg -r lattice-relay >/dev/null
[ -e /etc/lattice/lattice-relay.toml ] && [ -d /var/lib/lattice-relay ] && echo "remove keeps config and state"
dpkg -P lattice-relay >/dev/null
[ ! -e /etc/lattice/lattice-relay.toml ] && [ ! -e /var/lib/lattice-relay ] && echo "purge deletes them"
"##;

#[test]
fn the_deb_packages_install_into_a_throwaway_root_with_users_state_dirs_and_working_binaries() {
    if !crate::support::tools(
        "packages",
        &[
            "dpkg-deb",
            "unshare",
            "chroot",
            "systemd-analyze",
            "objdump",
        ],
        "to build and install the packages",
    ) {
        return;
    }
    if let Err(why) = e2e::Lab::available() {
        if std::env::var_os("LATTICE_E2E_REQUIRED").is_some() {
            panic!("installing packages into a throwaway root needs root: {why}");
        }
        eprintln!("SKIPPED packages: {why}");
        return;
    }
    let bins = e2e::lab::bin_dir().expect("the binaries");
    let dir = tempfile::tempdir().unwrap();
    let debs = dir.path().join("debs");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(repo.join("scripts/package-deb"))
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(&debs)
        .arg("--fast")
        .output()
        .unwrap();
    assert!(out.status.success(), "package-deb: {}", text(&out));
    let built: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(built.len(), 3, "{built:?}");
    for deb in &built {
        let info = Command::new("dpkg-deb")
            .args(["--field", deb])
            .output()
            .unwrap();
        let info = text(&info);
        assert!(info.contains("Depends: libc6 (>= 2."), "{deb}: {info}");
        let conffiles = Command::new("dpkg-deb")
            .args(["--info", deb, "conffiles"])
            .output()
            .unwrap();
        let name = info
            .lines()
            .find_map(|l| l.strip_prefix("Package: "))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&conffiles.stdout).trim(),
            format!("/etc/lattice/{name}.toml"),
            "{deb}"
        );
    }

    // A throwaway root: an overlay of this machine's root with the writes kept in memory, in
    // a mount namespace of its own, so nothing the packages do reaches the host.
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let script = format!(
        "set -e; mount -t tmpfs tmpfs {r}; mkdir {r}/upper {r}/work {r}/merged; \
         mount -t overlay overlay -o lowerdir=/,upperdir={r}/upper,workdir={r}/work {r}/merged; \
         mount --bind /proc {r}/merged/proc; mount --bind /dev {r}/merged/dev; \
         mkdir -p {r}/merged/pkgs; cp {debs}/*.deb {r}/merged/pkgs/; \
         chroot {r}/merged sh -c \"$IN_ROOT\"",
        r = root.display(),
        debs = debs.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--fork", "sh", "-c", &script])
        .env("IN_ROOT", IN_ROOT)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "installing: {said}");
    for line in [
        "user lattice-coordinator:/var/lib/lattice-coordinator:/usr/sbin/nologin",
        "user lattice-relay:/var/lib/lattice-relay:/usr/sbin/nologin",
        "dir /var/lib/lattice root root 700",
        "dir /var/lib/lattice-coordinator lattice-coordinator lattice-coordinator 700",
        "dir /var/lib/lattice-relay lattice-relay lattice-relay 700",
        "file /usr/bin/lattice root root 755",
        "file /usr/bin/lattice-coordinator root root 755",
        "file /etc/lattice/lattice.toml root root 640",
        "file /etc/lattice/lattice-coordinator.toml root lattice-coordinator 640",
        "file /etc/lattice/lattice-relay.toml root lattice-relay 640",
        "file /usr/lib/systemd/system/lattice.service root root 644",
        "config relay ok",
        "config coordinator ok",
        "units ok",
        "remove keeps config and state",
        "purge deletes them",
    ] {
        assert!(said.lines().any(|l| l == line), "no {line:?} in:\n{said}");
    }
    assert_eq!(
        said.lines().filter(|l| l.starts_with("version ")).count(),
        3,
        "{said}"
    );
    // The host never saw any of it.
    assert!(!Path::new("/var/lib/lattice-coordinator").exists());
    let host = Command::new("getent")
        .args(["passwd", "lattice-relay"])
        .output()
        .unwrap();
    assert!(!host.status.success(), "the host got a lattice-relay user");
}
