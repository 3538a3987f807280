#!/usr/bin/env bash
# The topk-path kernels on the device machine, in one call (about 4 minutes, 9 at most):
#   1. their GPU tests (tests/test_kernel_variants.py);
#   2. compute-sanitizer memcheck and racecheck on a small fuzz of every variant;
#   3. ptxas resource usage of the NVRTC source (nvcc -Xptxas -v, same source);
#   4. the benchmark, deriving the topk kernel plan from its own timings.
# From the repository root:  bash tests/device/run_perf.sh
# (carry .vllm_src for the vLLM column; SKIP_TESTS=1 skips step 1 when
# tests/device/run_all.sh, which runs the whole suite, shares the call).
# Logs and results go to $OUT (or a temporary folder), the results also to
# graphs/. Exit status: non-zero if a test, a sanitizer or a check failed.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
status=0
step() { echo; echo "===== $* ====="; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "1. kernel variant tests"
  timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_variants.py >"$OUT/kernel_tests.log" 2>&1
  rc=$?; tail -n 25 "$OUT/kernel_tests.log"; echo "pytest exit $rc"; [ $rc -eq 0 ] || status=1
fi

step "2. compute-sanitizer (memcheck, racecheck) on tests/device/fuzz_kernels.py"
: >"$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  timeout 75 "$SANITIZER" --tool "$tool" --error-exitcode 9 \
    python3 tests/device/fuzz_kernels.py --cases 14 >>"$OUT/sanitizer.log" 2>&1
  rc=$?; echo "$tool exit $rc"; [ $rc -eq 0 ] || status=1
done
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|fuzz:|MISMATCH|Error" "$OUT/sanitizer.log" | head -n 20

step "3. ptxas resource usage (nvcc, the same source NVRTC builds; int32 ids, k=8)"
python3 -c "import torch; from eplb_compile.kernels.cuda_variants import kernel_source; print(kernel_source(torch.int32, 8))" >/tmp/eplb_kernels.cu
"$NVCC" -arch=sm_90 -cubin -Xptxas -v -o /tmp/eplb_kernels.cubin /tmp/eplb_kernels.cu >"$OUT/ptxas.log" 2>&1
grep -E "Compiling entry|registers|spill" "$OUT/ptxas.log"

step "4. benchmark"
timeout 240 python3 -m eplb_compile bench --out graphs --topk-plan auto --vllm-src "${EPLB_VLLM_SRC:-.vllm_src}" \
  >"$OUT/bench.log" 2>&1
rc=$?; cat "$OUT/bench.log"; echo "bench exit $rc"; [ $rc -eq 0 ] || status=1
cp graphs/bench_results.csv graphs/bench_results.png graphs/bench_results.md "$OUT/" 2>/dev/null

echo; echo "run_perf.sh exit $status (files in $OUT)"
exit $status
