#!/usr/bin/env bash
# Build the npm package: the vidllm-web crate for wasm32, then wasm-bindgen's JS glue.
# Three packages (js/vidllm.js fetches only the one a model needs):
# - web/pkg/: WebGPU alone (stable Rust; needs the wasm32-unknown-unknown target);
# - web/pkg-cpu/: the CPU backend alone, on one thread (stable Rust): device "cpu" where
#   threads cannot run;
# - web/pkg-threads/: the CPU backend alone, its rayon pool on Web Workers over shared
#   memory (what js/vidllm.js loads for device "cpu" in a worker of a cross-origin isolated
#   page). wasm threads need a std built with atomics: nightly Rust's `-Z build-std`, from
#   the pinned toolchain below with its rust-src (installed here through rustup when
#   missing). VIDLLM_WASM_THREADS=0 skips it. The glue generator is the
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
# The same crate with the CPU backend instead (cargo keeps both builds apart by their
# features, and relinks the one asked for).
cargo build --profile wasm-release --target wasm32-unknown-unknown -p vidllm-web --no-default-features --features cpu
rm -rf web/pkg-cpu
"$BINDGEN" --out-dir web/pkg-cpu "${names[@]}" "$TARGET_DIR/wasm32-unknown-unknown/wasm-release/vidllm_web.wasm"
if [ "${VIDLLM_WASM_THREADS:-1}" != 0 ]; then
  NIGHTLY=nightly-2026-05-19
  if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 || ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q rust-src; then
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src >&2
  fi
  # Atomics and bulk memory for the threads; the memory imported and shared (the workers
  # instantiate the module on it), up to wasm32's 4 GiB, with the TLS exports that
  # wasm-bindgen's per-thread start needs. The flags of .cargo/config.toml are repeated:
  # RUSTFLAGS replaces them.
  flags=(--cfg 'getrandom_backend="wasm_js"' -C target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals
    -C link-arg=--shared-memory -C link-arg=--import-memory -C link-arg=--max-memory=4294967296)
  for sym in __wasm_init_tls __tls_size __tls_align __tls_base; do flags+=(-C "link-arg=--export=$sym"); done
  # Its own target folder: other flags, another compiler and std.
  RUSTFLAGS="${flags[*]}" CARGO_TARGET_DIR="$TARGET_DIR/threads" cargo "+$NIGHTLY" build -Z build-std=panic_abort,std \
    --profile wasm-release --target wasm32-unknown-unknown -p vidllm-web --no-default-features --features threads
  rm -rf web/pkg-threads
  "$BINDGEN" --out-dir web/pkg-threads "${names[@]}" "$TARGET_DIR/threads/wasm32-unknown-unknown/wasm-release/vidllm_web.wasm"
  gzip -9 -c web/pkg-threads/vidllm_web_bg.wasm | wc -c | awk '{printf "pkg-threads/vidllm_web_bg.wasm: %.1f MiB gzipped\n", $1 / 1048576}'
fi
# The demuxer of frame-exact sampling (js/demux.js): Mediabunny's bundle, unmodified, with
# its licence (MPL-2.0), from the npm package web/package.json pins.
MEDIABUNNY=web/node_modules/mediabunny
[ -f "$MEDIABUNNY/dist/bundles/mediabunny.min.mjs" ] || (cd web && npm ci --no-audit --no-fund --silent)
cp "$MEDIABUNNY/dist/bundles/mediabunny.min.mjs" web/pkg/mediabunny.min.mjs
cp "$MEDIABUNNY/LICENSE" web/pkg/mediabunny.LICENSE
for p in pkg pkg-cpu; do
  gzip -9 -c web/$p/vidllm_web_bg.wasm | wc -c | awk -v p=$p '{printf "%s/vidllm_web_bg.wasm: %.1f MiB gzipped\n", p, $1 / 1048576}'
done
