#!/usr/bin/env bash
# Issues 23/18 in one device call (under 10 minutes), on one card:
#   1. the kernel check against vLLM 0.33.0's and 0.34.0's kernels;
#   2. the MoE-layer cost run (writes vllm_layer_cost.json);
#   3. `eplb-compile bench --topk-plan auto` in the time left (skipped with BENCH=0).
#   bash tests/device/make_vllm_bundle.sh    # where pip works; carry .vllm_src
#   bash tests/device/run_layer_cost.sh      # on the GPU machine; everything lands in $OUT
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
echo "== 1. kernel check vs vLLM 0.33.0 and 0.34.0"
timeout 130 python3 tests/device/vllm_kernel_check.py --vllm-src .vllm_src --vllm-src .vllm_src/v0.34.0 \
  --budget-s "${FUZZ_BUDGET_S:-30}" >"$OUT/vllm_kernel_check.log" 2>&1 || status=1
grep -E "zero replicas|MISMATCH" "$OUT/vllm_kernel_check.log" | cut -c1-400
grep -A 30 "^check " "$OUT/vllm_kernel_check.log" || tail -n 30 "$OUT/vllm_kernel_check.log"
echo "== 2. MoE layer cost"
timeout 220 python3 tests/device/moe_layer_cost.py --out "$OUT" >"$OUT/moe_layer_cost.log" 2>&1 || status=1
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
