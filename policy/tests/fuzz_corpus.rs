//! Replays the committed fuzz corpus (`fuzz/corpus/policy/*`) through the fuzz target's body,
//! so every input the fuzzer kept (seeds, and any crash it found) is checked by the normal
//! test suite.
#![allow(clippy::unwrap_used)]

#[path = "../fuzz/harness.rs"]
mod harness;

#[test]
fn the_committed_fuzz_corpus_replays_without_a_panic() {
    for target in harness::TARGETS {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            harness::run(target, &std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n > 0, "no corpus for {target}");
    }
}
