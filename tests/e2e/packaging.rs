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
