#!/usr/bin/env bash
# Issues 23/18 in one device call (under 10 minutes), on one card:
#   1. the kernel check against vLLM 0.33.0's and 0.34.0's kernels (KERNEL_CHECK=0 skips it);
#   2. the MoE-layer cost run (writes vllm_layer_cost.json), with vLLM 0.33.0's own layer as a
#      denominator where .vllm_gpu/ holds its bundle (the harness's wheels, vllm-0.33.0-py.tgz,
#      harness/vllm_shim.py) and the ops from make_vllm_moe_ops.sh;
#   3. `eplb-compile bench --topk-plan auto` in the time left (skipped with BENCH=0).
#   bash tests/device/make_vllm_bundle.sh    # where pip works; carry .vllm_src
#   bash tests/device/run_layer_cost.sh      # on the GPU machine; everything lands in $OUT
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
if [ "${KERNEL_CHECK:-1}" = 1 ]; then
  echo "== 1. kernel check vs vLLM 0.33.0 and 0.34.0"
  timeout 130 python3 tests/device/vllm_kernel_check.py --vllm-src .vllm_src --vllm-src .vllm_src/v0.34.0 \
    --budget-s "${FUZZ_BUDGET_S:-30}" >"$OUT/vllm_kernel_check.log" 2>&1 || status=1
  grep -E "zero replicas|MISMATCH" "$OUT/vllm_kernel_check.log" | cut -c1-400
  grep -A 30 "^check " "$OUT/vllm_kernel_check.log" || tail -n 30 "$OUT/vllm_kernel_check.log"
fi
echo "== 2. MoE layer cost"
vllm_layer=()
if [ -f .vllm_gpu/moe_C_0.26.0_sm90.so.gz ] && [ -f .vllm_gpu/vllm-0.33.0-py.tgz ]; then
  site=/tmp/vllm_site vsrc=/tmp/vllm_src
  mkdir -p "$site" "$vsrc"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .vllm_gpu/.whl/*.whl \
    && { [ -d "$vsrc/vllm" ] || tar xzf .vllm_gpu/vllm-0.33.0-py.tgz -C "$vsrc"; } \
    && gunzip -c .vllm_gpu/moe_C_0.26.0_sm90.so.gz >/tmp/moe_C_0.26.0.so \
    && vllm_layer=(--vllm-moe-ops /tmp/moe_C_0.26.0.so) || echo "vLLM layer bundle did not install: grouped-GEMM only"
fi
PYTHONPATH="${vllm_layer:+$site:$vsrc:$PWD/.vllm_gpu/harness:$PWD/tests/device:}$PYTHONPATH" VLLM_TARGET_DEVICE=cuda \
  timeout "${LAYER_S:-400}" python3 tests/device/moe_layer_cost.py --out "$OUT" "${vllm_layer[@]}" ${LAYER_ARGS:-} \
  >"$OUT/moe_layer_cost.log" 2>&1 || status=1
grep -v '^{"T"' "$OUT/moe_layer_cost.log" | tail -n 25
left=$((${TOTAL_S:-560} - SECONDS))
if [ "${BENCH:-1}" = 1 ] && [ $left -gt 120 ]; then
  echo "== 3. eplb-compile bench --topk-plan auto (${left}s left)"
  mkdir -p "$OUT/bench"
  timeout $left python3 -m eplb_compile bench --out "$OUT/bench" --topk-plan auto --vllm-src .vllm_src \
    >"$OUT/bench/bench.log" 2>&1 || status=1
  for plan in "$OUT"/bench/device_name=*.json; do [ -f "$plan" ] && mv "$plan" "$OUT/bench/derived_plan.json"; done
  sed -n '/^## Results/,/^## Topk-path/p;/^## Goals/,/^## Eager/p' "$OUT/bench/bench_results.md" | cut -c1-300
else
  echo "== 3. bench skipped (${left}s left)"
fi
echo "exit $status"
exit $status
