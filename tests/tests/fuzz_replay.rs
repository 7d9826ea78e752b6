//! The fuzzers' kept inputs, replayed on stable: every file under
//! `tests/fixtures/fuzz/<target>/` (the crashers the fuzzers found, since fixed, and a
//! minimised corpus of what reached new code) goes through the target's body in
//! `vidllm_tests::fuzz`, the same function libFuzzer drives in `fuzz/`. A panic in any is
//! a failure naming the file; a crasher that aborts (out of memory, stack overflow) ends
//! the test binary, which fails the run as loudly.

use std::panic::{AssertUnwindSafe, catch_unwind};

use vidllm_tests::fixture;
use vidllm_tests::fuzz::TARGETS;

#[test]
fn fuzz_corpus_replays_cleanly() {
    let mut failed = Vec::new();
    let mut replayed = 0;
    for (name, body) in TARGETS {
        let dir = fixture("fuzz").join(name);
        let mut files: Vec<_> =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.expect("corpus entry").path()).collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no corpus", dir.display());
        for path in files {
            let data = std::fs::read(&path).expect("corpus file");
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failed.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} fuzz inputs");
    assert!(failed.is_empty(), "fuzz inputs that panic: {failed:#?}");
}
