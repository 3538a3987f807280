#!/usr/bin/env bash
# Build .vllm_src/ (git-ignored) in the repo root: the few vLLM files the GPU
# scripts read, taken from the PyPI wheels; vLLM is never installed or committed.
#   .vllm_src/            vLLM 0.33.0's router/base_router.py (+ METADATA, LICENSE)
#   .vllm_src/v0.34.0/    vLLM 0.34.0's router/base_router.py and fused_moe/eplb_triton.py
#
#   bash tests/device/make_vllm_bundle.sh [vllm-0.33.0-*.whl [vllm-0.34.0-*.whl]]
#
# A wheel not given is fetched with `pip download --no-deps`. Carry .vllm_src to
# the GPU machine and pass --vllm-src .vllm_src --vllm-src .vllm_src/v0.34.0.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out="$repo/.vllm_src"
rm -rf "$out"
for release in 0.33.0 0.34.0; do
  wheel=${1:-}
  [[ $# -gt 0 ]] && shift
  if [[ -z $wheel ]]; then
    download=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --dest "$download" "vllm==$release"
    wheel=$(ls "$download"/vllm-$release-*.whl)
  fi
  dest="$out"
  [[ $release == 0.33.0 ]] || dest="$out/v$release"
  python3 - "$wheel" "$dest" "$release" <<'PY'
import sys, zipfile

wheel, out, release = sys.argv[1:]
fused_moe = "vllm/model_executor/layers/fused_moe/"
keep = [
    fused_moe + "router/base_router.py",  # the EPLB router kernel and its launcher
    f"vllm-{release}.dist-info/METADATA",  # which vLLM this is
    f"vllm-{release}.dist-info/licenses/LICENSE",  # Apache-2.0, travels with the copy
]
if release != "0.33.0":
    keep.append(fused_moe + "eplb_triton.py")  # 0.34.0: the kernel's body, a shared @triton.jit helper
with zipfile.ZipFile(wheel) as archive:
    for name in keep:
        archive.extract(name, out)
PY
done
grep -qxF '.vllm_src/' "$repo/.gitignore" 2>/dev/null || echo '.vllm_src/' >>"$repo/.gitignore"
du -sh "$out"
