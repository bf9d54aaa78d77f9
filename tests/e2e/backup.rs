//! Issue 14, backup and restore: a backup taken while the coordinator runs brings a lost
//! coordinator back with the same key, nodes and audit log, and the nodes reconnect to it
//! unchanged.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::support::{Flat, text};

#[test]
fn a_backup_taken_while_running_brings_a_lost_coordinator_back_for_the_same_nodes() {
    let Some(mut f) = Flat::mesh("backup", &["a", "b"], &[]) else {
        return;
    };
    let bin = f.lab.bin("lattice-coordinator").display().to_string();
    let state = f.coord.state_dir.display().to_string();
    let out_file = f.lab.dir().join("coordinator.backup");
    let out = out_file.display().to_string();
    let ns = f.coord.ns.clone();
    let run = |f: &Flat, args: &[&str]| {
        let mut full = vec![bin.as_str()];
        full.extend_from_slice(args);
        f.lab.output(&ns, &full).unwrap()
    };

    let backup = run(&f, &["backup", &out, "--state-dir", &state]);
    assert!(backup.status.success(), "{}", text(&backup));
    let said = text(&backup);
    for file in [
        "control.key",
        "audit.checkpoint",
        "ticket.key",
        "coordinator.db",
    ] {
        assert!(said.contains(file), "{file}: {said}");
    }
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "one owner-only file");
    // Not over an existing one.
    assert!(
        !run(&f, &["backup", &out, "--state-dir", &state])
            .status
            .success()
    );
    // Nor into a running coordinator.
    let busy = run(&f, &["restore", &out, "--state-dir", &state]);
    assert!(!busy.status.success());
    assert!(text(&busy).contains("stop it first"), "{}", text(&busy));

    // The coordinator's machine is lost, state dir and all.
    f.coord.kill(&mut f.lab);
    std::fs::remove_dir_all(&f.coord.state_dir).unwrap();
    let restored = run(&f, &["restore", &out, "--state-dir", &state]);
    assert!(restored.status.success(), "{}", text(&restored));
    f.coord.restart(&mut f.lab).unwrap();

    // The nodes reconnect to it as they were (same key pin, same names and addresses).
    for n in &f.nodes {
        n.wait_ready(&f.lab, 1, Duration::from_secs(30)).unwrap();
    }
    let mut names: Vec<String> = f
        .coord
        .nodes(&f.lab)
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    // (The two joined at once: their ids, and so the list's order, may go either way.)
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert!(f.nodes[0].ping(&f.lab, "b", "-4", 2));
    let verify = f.coord.admin(&f.lab, &["audit", "verify"]).unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
}
