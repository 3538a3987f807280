"""Make vLLM 0.33.0's MoE classes runnable on a machine without a GPU.

vLLM's PyPI wheel is a CUDA build. On a CPU-only host two things that its
batched reference experts (``NaiveBatchedExperts``) call are missing. Both are
stood in for here, only when missing, and neither touches a vLLM class:

- ``torch.accelerator.current_stream()`` raises without a device (torch looks
  up the device index first); its ``is_capturing()`` is answered False, which
  is the truth on a CPU.
- ``torch.ops._C.silu_and_mul`` ships in vLLM's compiled extension, whose CPU
  build is not on PyPI; a plain-torch kernel with the same semantics is
  registered for CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # else VllmConfig() cannot infer a device

import pytest
import torch
import torch.nn.functional as F


class _NotCapturing:
    def is_capturing(self) -> bool:
        return False


def install_cpu_stand_ins():
    """Install what is missing; return a function that removes it again."""
    patch = pytest.MonkeyPatch()
    if not torch.accelerator.is_available():
        patch.setattr(torch.accelerator, "current_stream", lambda *args: _NotCapturing())
    library = None
    if not hasattr(torch.ops._C, "silu_and_mul"):
        library = torch.library.Library("_C", "FRAGMENT")
        library.define("silu_and_mul(Tensor(a!) result, Tensor input) -> ()")

        def silu_and_mul(result: torch.Tensor, x: torch.Tensor) -> None:
            d = x.shape[-1] // 2
            result.copy_(F.silu(x[..., :d]) * x[..., d:])

        library.impl("silu_and_mul", silu_and_mul, "CPU")

    def remove():
        patch.undo()
        if library is not None:
            library._destroy()

    return remove


@pytest.fixture(scope="module", autouse=True)
def cpu_stand_ins_for_vllm_extensions():
    remove = install_cpu_stand_ins()
    yield
    remove()
