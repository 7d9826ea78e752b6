#!/usr/bin/env bash
# Build the npm package: the vidllm-web crate for wasm32, then wasm-bindgen's JS glue
# into web/pkg/. Needs the wasm32-unknown-unknown target and wasm-bindgen-cli 0.2.130.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --target wasm32-unknown-unknown -p vidllm-web
wasm-bindgen --target web --out-dir web/pkg "$TARGET_DIR/wasm32-unknown-unknown/release/vidllm_web.wasm"
gzip -9 -c web/pkg/vidllm_web_bg.wasm | wc -c | awk '{printf "vidllm_web_bg.wasm: %.1f MiB gzipped\n", $1 / 1048576}'
