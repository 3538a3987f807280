#!/usr/bin/env bash
# vLLM 0.33.0's real fused-MoE layer on the GPU, through the harness, in one device call:
#   bash tests/device/run_vllm_layer.sh [--checks all|traced|none]
# Needs .vllm_gpu/ (git-ignored, carried): .whl/ and vllm-0.33.0-py.tgz from the harness's
# make_bundle.sh, harness/vllm_shim.py beside them. Never commit them.
set -u
OUT=${OUT:-$(mktemp -d)}
B=$(cd "${VLLM_GPU_BUNDLE:-.vllm_gpu}" && pwd) || exit 3
SITE=/tmp/vllm_site VSRC=/tmp/vllm_src
mkdir -p "$SITE" "$VSRC"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$B"/.whl/*.whl || exit 3
[ -d "$VSRC/vllm" ] || tar xzf "$B/vllm-0.33.0-py.tgz" -C "$VSRC" || exit 3
export PYTHONPATH="$SITE:$VSRC:$B/harness:$PWD:$PWD/tests/device" PYTHONUNBUFFERED=1 VLLM_TARGET_DEVICE=cuda
python3 tests/device/vllm_moe_layer.py --out "$OUT" "$@" 2>&1 | tee "$OUT/vllm_moe_layer.log" | grep -v "^W1\|^I1\|Warning\|warn"
exit "${PIPESTATUS[0]}"
