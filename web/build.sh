#!/usr/bin/env bash
# Build the npm package: the vidllm-web crate for wasm32, then wasm-bindgen's JS glue
# into web/pkg/. Needs the wasm32-unknown-unknown target. The glue generator is the
# workspace's own `vidllm-wasm-bindgen` (wasm-bindgen-cli-support at the version
# vidllm-web links, pinned by Cargo.lock): nothing to install.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --target wasm32-unknown-unknown -p vidllm-web
# tests/scripts/test.sh builds the generator with the workspace; build it here only when
# missing (a `-p` build resolves other features and would recompile shared crates).
BINDGEN="$TARGET_DIR/release/vidllm-wasm-bindgen"
[ -x "$BINDGEN" ] || cargo build --release -p vidllm-wasm-bindgen
"$BINDGEN" --out-dir web/pkg "$TARGET_DIR/wasm32-unknown-unknown/release/vidllm_web.wasm"
gzip -9 -c web/pkg/vidllm_web_bg.wasm | wc -c | awk '{printf "vidllm_web_bg.wasm: %.1f MiB gzipped\n", $1 / 1048576}'
