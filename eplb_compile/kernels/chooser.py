"""Which kernel runs an eager CUDA call: the one place that decides, and only decides.

``choose(call)`` reads the card's plan (``plans.py``, once per device), asks
the planned CUDA variant whether it takes the call, and otherwise picks the
Triton launcher; map_only calls run the ``direct`` kernel (its launch costs
less host time than Triton's). ``choose_counts(device)`` picks the count
kernel. Each answer is a ``Choice``: the launcher, the kernel's name and why.
If the CUDA kernels cannot be built (no NVRTC, a driver error), the process
warns once and stays on Triton (topk) and one torch op (counts): that is the
one failure latch; variants themselves never fall back. Nothing here builds
or registers anything for the C++ eager launcher: ``eager_extension.py`` owns
its tables.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch

from eplb_compile.kernels import cuda_variants, plans
from eplb_compile.kernels.call import KernelCall
from eplb_compile.kernels.triton_kernels import launch_map

_plans: dict[int, plans.KernelPlan] = {}
_cuda_failure: RuntimeError | None = None


class Choice(NamedTuple):
    """What runs a call: ``launch(call)`` (topk) or ``launch(load, counts, start, gate)`` (counts)."""

    launch: Callable
    kernel: str  # a CUDA variant's name, "triton", "eplb_record_counts" or "torch"
    reason: str

    @property
    def is_cuda_kernel(self) -> bool:
        """An NVRTC kernel of this package (not Triton, not a torch op)."""
        return self.kernel not in ("triton", "torch")


# Built once: choosing allocates nothing per call.
_TRITON_PLANNED = Choice(launch_map, "triton", "the card's kernel plan names Triton for this size")
_TRITON_LATCHED = Choice(launch_map, "triton", "the CUDA kernels could not be built in this process")
_TRITON_REFUSED = {
    name: Choice(launch_map, "triton", f"the planned CUDA variant {name!r} does not take this call "
                                       "(strided ids, a size past 32 bits, or a histogram past shared memory)")
    for name in cuda_variants.VARIANTS
}
_CUDA = {name: Choice(v.launch_supported, name, f"the card's kernel plan names the CUDA variant {name!r}")
         for name, v in cuda_variants.VARIANTS.items()}
_CUDA["direct"] = Choice(cuda_variants.VARIANTS["direct"].launch_supported, "direct",
                         "the card's kernel plan names the CUDA variant 'direct' (every map_only call runs it)")


def _count_fallback(load, counts, start: int, gate) -> None:
    load[start : start + counts.shape[0]].addcmul_(counts, gate)  # one torch kernel, gate read on the device


_COUNTS_CUDA = Choice(cuda_variants.launch_counts, cuda_variants.COUNT_KERNEL, "the NVRTC count kernel")
_COUNTS_LATCHED = Choice(_count_fallback, "torch", "the CUDA kernels could not be built in this process")


def cuda_failure() -> RuntimeError | None:
    """Why the CUDA kernels could not be built in this process, or None."""
    return _cuda_failure


def plan_for_index(device_index: int) -> plans.KernelPlan:
    plan = _plans.get(device_index)
    if plan is None:
        plan = _plans[device_index] = plans.plan_for_device(torch.device("cuda", device_index))
    return plan


def clear_cache() -> None:
    """Re-read the plans on the next call (``kernels.reload_plans`` also clears the C++ launcher's tables)."""
    _plans.clear()
    plans.clear_cache()


def variant_name(call: KernelCall) -> str:
    """The variant the plan names for this call (before the support check)."""
    if not call.records:
        return "direct"
    return plan_for_index(call.ids.get_device()).topk_variant(call.ids.numel())


def _latch(error: RuntimeError, fallback: str) -> None:
    global _cuda_failure
    _cuda_failure = error
    warnings.warn(f"eplb_compile: CUDA kernels unavailable, using {fallback}: {error}", stacklevel=4)


def choose(call: KernelCall, validated: bool = False) -> Choice:
    """What runs ``call``: the planned CUDA variant if it takes the call, else Triton.

    ``validated=True`` from the operators, whose validation already checked
    what the variants would re-check but the layout limits. Compiles the
    CUDA kernels on first use (that is how a build failure is found).
    """
    name = variant_name(call)
    if name == "triton":
        return _TRITON_PLANNED
    if _cuda_failure is not None:
        return _TRITON_LATCHED
    if not cuda_variants.VARIANTS[name].supports(call, validated):
        return _TRITON_REFUSED[name]
    try:
        cuda_variants.compiled_functions(call)
    except RuntimeError as error:
        _latch(error, "Triton")
        return _TRITON_LATCHED
    return _CUDA[name]


def choose_counts(device_index: int) -> Choice:
    """What runs an eager CUDA ``record_counts`` on validated tensors: the NVRTC
    count kernel, or behind the failure latch one torch op."""
    if _cuda_failure is None:
        try:
            cuda_variants.count_function(device_index)
        except RuntimeError as error:
            _latch(error, "torch")
        else:
            return _COUNTS_CUDA
    return _COUNTS_LATCHED
