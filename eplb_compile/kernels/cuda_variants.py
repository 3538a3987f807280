"""The topk path's CUDA kernel variants (the kernels are in ``eplb_topk.cu``).

A variant is a kernel plus its launch shape. ``supports(call)`` says whether
it takes a call; ``launch(call)`` runs it, or raises ValueError when it does
not take the call: a variant never falls back by itself (the chooser,
``kernels/chooser.py``, decides what runs instead). Only the variants a
kernel plan can select live here; retired ones are described in NOTES.md.

- ``direct``: one thread per element, one relaxed global atomic per recorded
  element, no shared memory: no set-up cost, for small T. Also map_only.
- ``hist*``: a block-private histogram in shared memory, flushed with one
  global atomic per non-zero bin per block, so a hot expert sees about one
  global atomic per block instead of one per token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import torch

from eplb_compile.kernels import nvrtc
from eplb_compile.kernels.call import KernelCall

_ID_C_TYPES = {torch.int8: "signed char", torch.int16: "short", torch.int32: "int", torch.int64: "long long"}
_MAX_INT32 = 2**31 - 1
_KERNEL_NAMES = ("eplb_map_record_direct", "eplb_map_record_hist_e1", "eplb_map_record_hist_e4")


@functools.cache
def kernel_source(id_dtype: torch.dtype, k: int) -> str:
    """What NVRTC compiles for one (id dtype, k): the two defines, then eplb_topk.cu."""
    body = resources.files("eplb_compile.kernels").joinpath("eplb_topk.cu").read_text()
    return f"#define ID_T {_ID_C_TYPES[id_dtype]}\n#define K {int(k)}\n{body}"


def compiled_functions(call: KernelCall) -> dict[str, int]:
    """The kernels' handles for this call's device, id dtype and k (compiled on first use).

    Raises RuntimeError if NVRTC or the driver fails.
    """
    ids = call.ids
    return nvrtc.compile_functions(ids.get_device(), kernel_source(ids.dtype, ids.shape[1]), _KERNEL_NAMES)


COUNT_KERNEL = "eplb_record_counts"
COUNT_THREADS = 256  # the count kernel's block size (the C++ launcher gets it at build time)
HIST_BYTES_PER_EXPERT = 4  # dynamic shared memory a hist kernel needs per physical expert: one int bin
# The count kernel's parameters, in eplb_counts.cu's order (a CPU test compares them with the source).
COUNT_PARAMS = ("load", "counts", "counts_stride", "record_enabled", "n")


def count_function(device_index: int) -> int:
    """The count kernel's handle on this device (``eplb_counts.cu``, compiled on first use).

    Raises RuntimeError if NVRTC or the driver fails.
    """
    return nvrtc.compile_functions(device_index, _count_source(), (COUNT_KERNEL,))[COUNT_KERNEL]


@functools.cache
def _count_source() -> str:
    return resources.files("eplb_compile.kernels").joinpath("eplb_counts.cu").read_text()


def launch_counts(load: torch.Tensor, counts: torch.Tensor, start: int, gate: torch.Tensor) -> None:
    """``load[start:start+n] += counts`` when ``gate``, on validated tensors (int32 load and counts, bool gate)."""
    n = counts.shape[0]
    if n == 0:
        return
    device_index = load.get_device()
    params = [load.data_ptr() + 4 * start, counts.data_ptr(), counts.stride(0), gate.data_ptr(), n]
    nvrtc.launch(device_index, count_function(device_index), -(-n // COUNT_THREADS), COUNT_THREADS, 0, params)


def _takes(call: KernelCall, validated: bool) -> bool:
    """The limits every CUDA kernel shares: contiguous 2-D ids, 32-bit flat indices.

    ``validated``: the call comes from an operator, whose spec (``ops/_validation.py``)
    already checked the dtypes, the ranks and the gate, and which allocated
    ``out`` contiguous with the ids' dtype; only the layout limits remain.
    """
    ids, load = call.ids, call.load
    layout = (
        ids.is_contiguous()
        and ids.numel() <= _MAX_INT32
        and call.l2p.shape[0] <= _MAX_INT32
        and (load is None or load.shape[0] <= _MAX_INT32)
    )
    if validated or not layout:
        return layout
    out = call.out
    return (
        ids.dtype in _ID_C_TYPES
        and ids.dim() == 2
        and out.is_contiguous()
        and out.dtype == ids.dtype
        and call.replica_count.dtype in (torch.int32, torch.int64)
        and (load is None or call.gate is not None)
        and (call.gate is None or call.gate.dtype in (torch.bool, torch.uint8))
        and (call.num_unpadded is None or call.num_unpadded.dtype == torch.int32)
    )


@dataclass(frozen=True)
class CudaVariant:
    """A launch shape of one kernel of eplb_topk.cu."""

    name: str
    kernel: str
    threads: int
    elements_per_thread: int
    blocks_per_sm: float | None  # grid cap = SMs * this; None: one element per thread, no cap
    histogram: bool  # needs num_physical ints of shared memory, and a load to count into

    def shared_bytes(self, call: KernelCall) -> int:
        return HIST_BYTES_PER_EXPERT * call.load.shape[0] if self.histogram else 0

    def supports(self, call: KernelCall, validated: bool = False) -> bool:
        """Whether this kernel takes ``call`` (``validated``: see ``_takes``)."""
        if not _takes(call, validated):
            return False
        if not self.histogram:
            return True
        return call.records and self.shared_bytes(call) <= nvrtc.device_limits(call.ids.get_device())[1]

    def launch(self, call: KernelCall) -> None:
        """Run on ``call``; ValueError, launching nothing, where ``supports(call)`` is False."""
        if not self.supports(call):
            raise ValueError(f"the {self.name} CUDA kernel does not take this call")
        self.launch_supported(call)

    def launch_supported(self, call: KernelCall) -> None:
        """Run on a call that ``supports`` has accepted (the chooser's path: one check per call)."""
        numel = call.ids.numel()
        if numel == 0:
            return  # a grid of zero blocks is not a valid launch
        device_index = call.ids.get_device()
        function = compiled_functions(call)[self.kernel]
        shared = self.shared_bytes(call)
        nvrtc.allow_dynamic_shared_memory(function, shared)
        blocks = -(-numel // (self.threads * self.elements_per_thread))
        if self.blocks_per_sm is not None:
            blocks = min(blocks, max(1, int(nvrtc.device_limits(device_index)[0] * self.blocks_per_sm)))
        nvrtc.launch(device_index, function, blocks, self.threads, shared, call.cuda_params())


VARIANTS: dict[str, CudaVariant] = {
    v.name: v
    for v in (
        CudaVariant("direct", "eplb_map_record_direct", 256, 1, None, histogram=False),
        CudaVariant("hist_e1", "eplb_map_record_hist_e1", 256, 1, 2.0, histogram=True),
        CudaVariant("hist_e4", "eplb_map_record_hist_e4", 256, 4, 2.0, histogram=True),
        CudaVariant("hist_e4_wide", "eplb_map_record_hist_e4", 512, 4, 1.0, histogram=True),
    )
}
