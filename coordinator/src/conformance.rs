//! `policy conformance DIR`: replays every case file under DIR (searched recursively; see
//! `policy::conformance`) and tallies the outcomes per category. Offline: no coordinator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use policy::conformance::{CaseResult, Verdict};
use serde::Serialize;

/// Pass, fail and unsupported counts of one category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Same result as the service.
    pub pass: usize,
    /// Different.
    pub fail: usize,
    /// Uses something Lattice does not support.
    pub unsupported: usize,
}

/// Every case's outcome, and the tallies.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// By category.
    pub categories: BTreeMap<String, Tally>,
    /// Cases that passed.
    pub passed: usize,
    /// Cases run.
    pub total: usize,
    /// Every case that did not pass, with why.
    pub cases: Vec<CaseLine>,
}

/// One case that did not pass.
#[derive(Debug, Clone, Serialize)]
pub struct CaseLine {
    /// Case id.
    pub id: String,
    /// Category.
    pub category: String,
    /// `fail` or `unsupported`.
    pub verdict: &'static str,
    /// What differs (fail), or what is not supported.
    pub details: Vec<String>,
}

fn case_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        if path.is_dir() {
            case_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "json")
            && path.file_name().is_some_and(|n| n != "index.json")
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Runs every case under `dir`.
pub fn run(dir: &Path) -> anyhow::Result<Report> {
    let mut files = Vec::new();
    case_files(dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        anyhow::bail!("no case files (*.json) under {}", dir.display());
    }
    let mut categories: BTreeMap<String, Tally> = BTreeMap::new();
    let mut cases = Vec::new();
    let mut passed = 0;
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let CaseResult {
            id,
            category,
            verdict,
        } = policy::conformance::run_case(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let t = categories.entry(category.clone()).or_default();
        match verdict {
            Verdict::Pass => {
                t.pass += 1;
                passed += 1;
            }
            Verdict::Fail(details) => {
                t.fail += 1;
                cases.push(CaseLine {
                    id,
                    category,
                    verdict: "fail",
                    details,
                });
            }
            Verdict::Unsupported(what) => {
                t.unsupported += 1;
                cases.push(CaseLine {
                    id,
                    category,
                    verdict: "unsupported",
                    details: vec![what],
                });
            }
        }
    }
    Ok(Report {
        categories,
        passed,
        total: files.len(),
        cases,
    })
}
