#!/usr/bin/env bash
# Issue-23/18 device call: the kernel check against vLLM 0.33.0's and 0.34.0's
# kernels, then the MoE-layer cost run, on one card (about 5 minutes).
#   bash tests/device/make_vllm_bundle.sh    # where pip works; carry .vllm_src
#   bash tests/device/run_layer_cost.sh      # on the GPU machine; results in $OUT
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
echo "== kernel check vs vLLM 0.33.0 and 0.34.0"
timeout 200 python3 tests/device/vllm_kernel_check.py --vllm-src .vllm_src --vllm-src .vllm_src/v0.34.0 \
  --budget-s "${FUZZ_BUDGET_S:-45}" >"$OUT/vllm_kernel_check.log" 2>&1 || status=1
grep -A 30 "^check " "$OUT/vllm_kernel_check.log" || tail -n 30 "$OUT/vllm_kernel_check.log"
echo "== MoE layer cost"
timeout 330 python3 tests/device/moe_layer_cost.py --out "$OUT" "$@" >"$OUT/moe_layer_cost.log" 2>&1 || status=1
grep -v '^{"T"' "$OUT/moe_layer_cost.log" | tail -n 40
exit $status
