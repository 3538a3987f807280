#!/usr/bin/env bash
# Build .vllm_src/ (git-ignored) in the repo root: the few vLLM 0.33.0 files the
# GPU scripts read, taken from the PyPI wheel; vLLM is never installed or committed.
#
#   bash tests/device/make_vllm_bundle.sh [path/to/vllm-0.33.0-*.whl]
#
# Without an argument it runs `pip download vllm==0.33.0 --no-deps`. Carry
# .vllm_src to the GPU machine and pass --vllm-src .vllm_src (or set EPLB_VLLM_SRC).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out="$repo/.vllm_src"
wheel=${1:-}
if [[ -z $wheel ]]; then
  download=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --dest "$download" vllm==0.33.0
  wheel=$(ls "$download"/vllm-0.33.0-*.whl)
fi

rm -rf "$out"
python3 - "$wheel" "$out" <<'EOF'
import sys, zipfile

wheel, out = sys.argv[1:]
keep = [
    "vllm/model_executor/layers/fused_moe/router/base_router.py",  # the EPLB router kernel
    "vllm-0.33.0.dist-info/METADATA",  # which vLLM this is
    "vllm-0.33.0.dist-info/licenses/LICENSE",  # Apache-2.0, travels with the copy
]
with zipfile.ZipFile(wheel) as archive:
    for name in keep:
        archive.extract(name, out)
EOF
grep -qxF '.vllm_src/' "$repo/.gitignore" 2>/dev/null || echo '.vllm_src/' >>"$repo/.gitignore"
du -sh "$out"
