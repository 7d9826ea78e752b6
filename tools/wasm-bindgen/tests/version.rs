//! The glue generator and the wasm module must come from one wasm-bindgen version: the
//! module's custom section carries a schema the generator refuses when they differ. This
//! integration test also makes `cargo test` build the binary the browser script runs.

use std::process::Command;

/// The version `Cargo.lock` resolves for package `name` (one entry expected).
fn locked(lock: &str, name: &str) -> String {
    let entry = format!("name = \"{name}\"\nversion = \"");
    let mut found = lock.match_indices(&entry).map(|(i, _)| {
        let rest = &lock[i + entry.len()..];
        rest[..rest.find('"').unwrap()].to_string()
    });
    let v = found.next().unwrap_or_else(|| panic!("{name} is not in Cargo.lock"));
    assert!(found.next().is_none(), "{name} is locked at more than one version");
    v
}

#[test]
fn generator_matches_the_linked_wasm_bindgen() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock")).unwrap();
    let runtime = locked(&lock, "wasm-bindgen");
    let generator = locked(&lock, "wasm-bindgen-cli-support");
    println!("wasm-bindgen {runtime}, wasm-bindgen-cli-support {generator}");
    assert_eq!(runtime, generator);
}

#[test]
fn binary_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_vidllm-wasm-bindgen")).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--out-dir"));
}
