"""vLLM 0.33.0's real fused-MoE layer on a GPU, with the plugin (tests/device/vllm_moe_layer.py).

Runs only where there is a GPU and the harness bundle (vLLM's Python sources,
its small wheels and ``vllm_shim``; see tests/device/run_vllm_layer.sh) sits
in ``.vllm_gpu/`` or ``$VLLM_GPU_BUNDLE``; skips cleanly elsewhere, as in CI.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUNDLE = pathlib.Path(os.environ.get("VLLM_GPU_BUNDLE", ROOT / ".vllm_gpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not (BUNDLE / "vllm-0.33.0-py.tgz").is_file() or not (BUNDLE / "harness" / "vllm_shim.py").is_file(),
                    reason="needs the vLLM GPU harness bundle in .vllm_gpu/ or $VLLM_GPU_BUNDLE")
def test_real_vllm_moe_layer_on_gpu_with_the_plugin(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), VLLM_GPU_BUNDLE=str(BUNDLE))
    done = subprocess.run(["bash", "tests/device/run_vllm_layer.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = "checks: 144 forwards compared (72 graph replays, 0 layers traced by Dynamo on the GPU), 0 failures"
    assert summary in done.stdout, done.stdout[-2000:]
