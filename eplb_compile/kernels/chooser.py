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

from eplb_compile.kernels import cuda_variants, plans
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
        cuda_variants.compiled_functions(call)
    except RuntimeError as error:
        _cuda_failure = error
        warnings.warn(f"eplb_compile: CUDA topk kernels unavailable, using Triton: {error}", stacklevel=3)
        return launch_map
    return variant.launch_supported


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
            cuda_variants.launch_record_counts(function, load, counts, start, gate)
            return
    load[start : start + counts.shape[0]].addcmul_(counts, gate)
