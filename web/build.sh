#!/usr/bin/env bash
# Build the npm package: the vidllm-web crate for wasm32, then wasm-bindgen's JS glue
# into web/pkg/. Needs the wasm32-unknown-unknown target. The glue generator is the
# workspace's own `vidllm-wasm-bindgen` (wasm-bindgen-cli-support at the version
# vidllm-web links, pinned by Cargo.lock): nothing to install.
set -euo pipefail
cd "$(dirname "$0")/.."
#
#   web/build.sh              the package in web/pkg/
#   web/build.sh --wasm-only  only the wasm (tests/scripts/test.sh starts it early)
#
# VIDLLM_WASM_TARGET_DIR puts the wasm build in a target dir of its own (default: the
# cargo target dir), so that it can run while another build holds that one's lock.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
WASM_TARGET_DIR="${VIDLLM_WASM_TARGET_DIR:-$TARGET_DIR}"
CARGO_TARGET_DIR="$WASM_TARGET_DIR" cargo build --release --target wasm32-unknown-unknown -p vidllm-web
[ "${1:-}" = "--wasm-only" ] && exit 0
# tests/scripts/test.sh builds the generator with the workspace; build it here only when
# missing (a `-p` build resolves other features and would recompile shared crates).
BINDGEN="$TARGET_DIR/release/vidllm-wasm-bindgen"
[ -x "$BINDGEN" ] || cargo build --release -p vidllm-wasm-bindgen
"$BINDGEN" --out-dir web/pkg "$WASM_TARGET_DIR/wasm32-unknown-unknown/release/vidllm_web.wasm"
gzip -9 -c web/pkg/vidllm_web_bg.wasm | wc -c | awk '{printf "vidllm_web_bg.wasm: %.1f MiB gzipped\n", $1 / 1048576}'
