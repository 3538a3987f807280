"""Test-only stand-ins that let vLLM 0.33.0's EPLB loop run on a CPU-only host.

vLLM's PyPI wheel is a CUDA build, and its EPLB code assumes an accelerator
in three places that the loop reaches on CPU. Each stand-in below names the
vLLM line it works around. None of them changes what EPLB computes: the load
window, the policy, the weight transfer over gloo and the map commit all stay
vLLM's own code. They are installed only in the rank processes of
``test_eplb_loop.py`` (never by the package), and only when no accelerator
is present.
"""

from __future__ import annotations

import time

import torch


class _CpuStream:
    """``torch.accelerator.current_stream()`` without a device.

    ``distributed/eplb/eplb_communicator.py:232`` (gloo staging) calls
    ``torch.accelerator.current_stream().synchronize()`` before the gloo
    send/recv; on CPU every copy has finished already, so there is nothing to
    wait for. vLLM's batched experts also ask ``is_capturing()`` (False on a
    CPU). Without a device, torch raises on the device-index lookup.
    """

    def synchronize(self) -> None:
        pass

    def is_capturing(self) -> bool:
        return False


class _CpuTimingEvent:
    """``torch.Event(enable_timing=True)`` on a host without an accelerator.

    ``distributed/eplb/eplb_state.py:783-784`` creates two timing events on
    EP rank 0 and records them around the rearrangement, then
    ``eplb_state.py:957`` calls ``elapsed_time``; on a CUDA build with no
    GPU, ``record()`` raises. This one times with the host clock.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._time: float | None = None

    def record(self, stream=None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuTimingEvent) -> float:
        return (end._time - self._time) * 1000.0  # milliseconds, as torch.Event


def install() -> None:
    """Install the stand-ins (only where no accelerator exists)."""
    if torch.accelerator.is_available():
        return
    torch.accelerator.current_stream = lambda *args: _CpuStream()
    torch.Event = _CpuTimingEvent


def vllm_config_with_eplb(*, tp_size: int, window_size: int, step_interval: int, **vllm_config_kwargs):
    """A ``VllmConfig`` with EPLB on, built past the CPU refusal.

    ``config/parallel.py:563-568`` raises "Expert parallelism load balancing
    is only supported on CUDA devices ..." on CPU, in ``ParallelConfig`` and
    again when ``VllmConfig`` validates it. The config is built with EPLB off
    and switched on afterwards; everything else is validated as usual.
    ``use_async`` is off because the async worker thread needs a device
    stream (``distributed/eplb/async_worker.py:32``); ``torch_gloo`` is the
    communicator vLLM itself picks for CPU tensors.
    """
    from vllm.config import EPLBConfig, ParallelConfig, VllmConfig

    parallel = ParallelConfig(
        tensor_parallel_size=tp_size,
        enable_expert_parallel=True,
        eplb_config=EPLBConfig(
            window_size=window_size, step_interval=step_interval, use_async=False, communicator="torch_gloo"
        ),
    )
    config = VllmConfig(parallel_config=parallel, **vllm_config_kwargs)
    config.parallel_config.enable_eplb = True
    return config
