#!/usr/bin/env bash
# Everything that needs a GPU except the benchmark, in one device call:
#   bash tests/device/run_all.sh      (carry .whl and .vllm_src; 2 GPUs for NCCL)
# Logs go to $OUT; a short table is printed last. Exit status non-zero on any failure.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
declare -A RESULT
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "===== $name ====="
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  RESULT[$name]=$rc
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

run gpu_tests 330 python3 -m pytest -q -p no:cacheprovider -rs tests \
  --ignore=tests/integration --ignore=tests/test_distributed.py --ignore=tests/test_demo.py
run sanitize 150 "$SANITIZER" --tool memcheck --error-exitcode 1 python3 tests/device/sanitize.py --cases 200
run vllm_kernel 120 python3 tests/device/vllm_kernel_check.py --vllm-src .vllm_src
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run nccl 120 python3 tests/device/nccl_equivalence.py --nproc 2
fi
run demo_cuda 120 python3 -m eplb_compile demo --device cuda

echo; echo "step            exit"
for name in "${!RESULT[@]}"; do printf "%-15s %s\n" "$name" "${RESULT[$name]}"; done | sort
grep -hE "passed|failed" "$OUT/gpu_tests.log" | tail -n 1
status=0; for rc in "${RESULT[@]}"; do [ "$rc" -eq 0 ] || status=1; done
exit $status
