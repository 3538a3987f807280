"""Which kernel runs an eager CUDA call: the one place that decides.

``choose(call)`` reads the card's plan (``plans.py``, once per device), asks
the planned CUDA variant whether it takes the call, and otherwise returns the
Triton launcher. map_only calls run the ``direct`` kernel (its launch costs
less host time than Triton's). If the CUDA kernels cannot be built (no NVRTC,
a driver error), the process warns once and stays on Triton: that is the one
failure latch; variants themselves never fall back. ``record_counts`` runs
the NVRTC count kernel, or behind the same latch one torch op.
"""

from __future__ import annotations

import warnings
from typing import Callable

from eplb_compile.kernels import cuda_variants, eager_extension, nvrtc, plans
from eplb_compile.kernels.call import KernelCall
from eplb_compile.kernels.triton_kernels import launch_map

Launcher = Callable[[KernelCall], None]

_plans: dict[int, plans.KernelPlan] = {}
_cuda_failure: RuntimeError | None = None


def cuda_failure() -> RuntimeError | None:
    """Why the CUDA kernels could not be built in this process, or None."""
    return _cuda_failure


def plan_for_index(device_index: int) -> plans.KernelPlan:
    plan = _plans.get(device_index)
    if plan is None:
        import torch

        plan = _plans[device_index] = plans.plan_for_device(torch.device("cuda", device_index))
    return plan


def clear_cache() -> None:
    """Re-read the plans on the next call (after EPLB_COMPILE_KERNEL_PLAN changed)."""
    _plans.clear()
    plans.clear_cache()
    eager_extension.clear()


def variant_name(call: KernelCall) -> str:
    """The variant the plan names for this call (before the support check)."""
    if not call.records:
        return "direct"
    return plan_for_index(call.ids.get_device()).topk_variant(call.ids.numel())


def choose(call: KernelCall, validated: bool = False) -> Launcher:
    """The launcher for ``call``: the planned CUDA variant if it takes the call, else Triton.

    ``validated=True`` from the operators, whose validation already checked
    what the variants would re-check but the layout limits.
    """
    global _cuda_failure
    name = variant_name(call)
    if name == "triton" or _cuda_failure is not None:
        return launch_map
    variant = cuda_variants.VARIANTS[name]
    if not variant.supports(call, validated):
        return launch_map
    try:
        functions = cuda_variants.compiled_functions(call)
    except RuntimeError as error:
        _cuda_failure = error
        warnings.warn(f"eplb_compile: CUDA topk kernels unavailable, using Triton: {error}", stacklevel=3)
        return launch_map
    _offer_to_eager_launcher(call, functions)
    return variant.launch_supported


def _offer_to_eager_launcher(call: KernelCall, functions: dict[str, int]) -> None:
    """Start the C++ launcher's build, and once it is built hand it this call's
    table: the plan's rows with their kernel handles (0 for a Triton row)."""
    eager_extension.start()
    ids = call.ids
    device = ids.get_device()
    key = (device, ids.dtype, ids.shape[1], call.records)
    if eager_extension.LAUNCHER.map_ids is eager_extension.not_ready or eager_extension.registered(key):
        return
    sm_count, shared_limit = nvrtc.device_limits(device)
    plan_rows = plan_for_index(device).topk_plan if call.records else ((0, "direct"),)
    rows = []
    for min_numel, name in plan_rows:
        variant = cuda_variants.VARIANTS.get(name)
        if variant is None:  # a Triton row: the Python path runs it
            rows.append((min_numel, 0, 0, 0, 0, False))
            continue
        function = functions[variant.kernel]
        if variant.histogram:
            nvrtc.allow_dynamic_shared_memory(function, shared_limit)
        max_blocks = 0 if variant.blocks_per_sm is None else max(1, int(sm_count * variant.blocks_per_sm))
        rows.append((min_numel, function, variant.threads, variant.elements_per_thread, max_blocks,
                     variant.histogram))
    eager_extension.register_topk(key, rows, shared_limit)


def record_counts(load, counts, start: int, gate) -> None:
    """Eager CUDA ``load[start:start+n] += counts`` when ``gate``, on validated tensors:
    the NVRTC count kernel; where CUDA kernels cannot be built, ``addcmul_`` (one
    torch kernel, gate read on the device)."""
    global _cuda_failure
    if _cuda_failure is None:
        try:
            function = cuda_variants.count_function(load.get_device())
        except RuntimeError as error:
            _cuda_failure = error
            warnings.warn(f"eplb_compile: CUDA kernels unavailable, using torch: {error}", stacklevel=3)
        else:
            eager_extension.start()
            eager_extension.register_count_function(load.get_device(), function)
            cuda_variants.launch_record_counts(function, load, counts, start, gate)
            return
    load[start : start + counts.shape[0]].addcmul_(counts, gate)
