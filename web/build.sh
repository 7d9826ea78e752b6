#!/usr/bin/env bash
# Build the npm package: the vidllm-web crate for wasm32, then wasm-bindgen's JS glue
# into web/pkg/. Needs the wasm32-unknown-unknown target. The glue generator is the
# workspace's own `vidllm-wasm-bindgen` (wasm-bindgen-cli-support at the version
# vidllm-web links, pinned by Cargo.lock): nothing to install.
# The profile is the workspace's `wasm-release` (Cargo.toml: size-optimised, with the
# per-token code at opt-level 3), and the glue drops the function names; set
# VIDLLM_WASM_NAMES=1 to keep them for a profile in the browser's devtools.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --profile wasm-release --target wasm32-unknown-unknown -p vidllm-web
# tests/scripts/test.sh builds the generator with the workspace; build it here only when
# missing (a `-p` build resolves other features and would recompile shared crates).
BINDGEN="$TARGET_DIR/release/vidllm-wasm-bindgen"
[ -x "$BINDGEN" ] || cargo build --release -p vidllm-wasm-bindgen
names=()
[ "${VIDLLM_WASM_NAMES:-0}" = 1 ] && names=(--keep-names)
"$BINDGEN" --out-dir web/pkg "${names[@]}" "$TARGET_DIR/wasm32-unknown-unknown/wasm-release/vidllm_web.wasm"
# The demuxer of frame-exact sampling (js/demux.js): Mediabunny's bundle, unmodified, with
# its licence (MPL-2.0), from the npm package web/package.json pins.
MEDIABUNNY=web/node_modules/mediabunny
[ -f "$MEDIABUNNY/dist/bundles/mediabunny.min.mjs" ] || (cd web && npm ci --no-audit --no-fund --silent)
cp "$MEDIABUNNY/dist/bundles/mediabunny.min.mjs" web/pkg/mediabunny.min.mjs
cp "$MEDIABUNNY/LICENSE" web/pkg/mediabunny.LICENSE
gzip -9 -c web/pkg/vidllm_web_bg.wasm | wc -c | awk '{printf "vidllm_web_bg.wasm: %.1f MiB gzipped\n", $1 / 1048576}'
