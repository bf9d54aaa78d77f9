//! Issue 14, packaging: the systemd units in `dist/systemd` pass `systemd-analyze verify`
//! (with their binaries at the paths the units name), and their sandboxing keeps the
//! exposure `systemd-analyze security` reports low.

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
