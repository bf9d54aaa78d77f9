//! The policy compiler against the cases recorded from the real Tailscale service
//! (tests/conformance): no category may pass fewer cases than tests/conformance/baseline.txt
//! says. The table is printed either way.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::Path;

#[test]
fn no_category_passes_fewer_cases_than_the_baseline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let report = coordinator::conformance::run(&root.join("tailscale-acl/dev")).unwrap();
    let baseline = std::fs::read_to_string(root.join("baseline.txt")).unwrap();
    println!(
        "{:<12} {:>5} {:>5} {:>14} {:>9}",
        "category", "pass", "fail", "not supported", "baseline"
    );
    let mut below = Vec::new();
    for line in baseline.lines().filter(|l| !l.trim().is_empty()) {
        let (cat, want) = line.split_once(' ').unwrap();
        let want: usize = want.trim().parse().unwrap();
        let t = report.categories.get(cat).copied().unwrap_or_default();
        println!(
            "{cat:<12} {:>5} {:>5} {:>14} {want:>9}",
            t.pass, t.fail, t.unsupported
        );
        if t.pass < want {
            below.push(format!("{cat}: {} passed, the baseline is {want}", t.pass));
        }
    }
    println!("conformance: {}/{} passed", report.passed, report.total);
    assert!(
        below.is_empty(),
        "conformance fell below the baseline:\n{}",
        below.join("\n")
    );
    assert_eq!(report.total, 666, "the dev set has 666 cases");
}
