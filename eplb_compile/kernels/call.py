"""One topk-path kernel call: the seven tensors, by name, built once per call.

Every launcher (Triton or CUDA) takes a ``KernelCall``; none takes loose
tensors, so ``out`` and ``load`` (both integer tensors) cannot be swapped by
position. A ``NamedTuple``: building one costs a fifth of a frozen
dataclass's ``__init__``, which matters on the eager path. Plain torch:
importing this needs neither Triton nor CUDA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


# The CUDA topk kernels' parameters, in order: eplb_topk.cu's EPLB_KERNEL_PARAMS
# and cuda_params() below follow it, the C++ launcher gets each slot's index
# at build time, and a CPU test compares all three.
TOPK_PARAMS = ("ids", "out", "rc", "rc_is_int64", "rc_stride", "l2p", "l2p_stride_e", "l2p_stride_s",
               "num_logical", "slots", "load", "num_physical", "record_enabled", "num_unpadded", "numel")


class KernelCall(NamedTuple):
    """Map ``ids`` into ``out``; count into ``load`` when one is given.

    ``load is None`` is map_only: ``gate`` is then None too, and
    ``num_unpadded`` (if given) marks the padded rows, whose ids come back as
    -1. With a load, ``num_unpadded`` limits what is counted instead.
    """

    ids: torch.Tensor  # [T, k] logical expert ids
    l2p: torch.Tensor  # [num_logical, slots] int64, padded with -1
    replica_count: torch.Tensor  # [num_logical] int32 or int64
    out: torch.Tensor  # [T, k] physical ids, dtype of ids
    load: torch.Tensor | None = None  # [num_physical] int32, incremented in place
    gate: torch.Tensor | None = None  # bool scalar: record or not (read on the device)
    num_unpadded: torch.Tensor | None = None  # int32 scalar

    @property
    def records(self) -> bool:
        return self.load is not None

    def cuda_params(self) -> list[int]:
        """The CUDA kernels' parameters, in ``TOPK_PARAMS`` order (positional: this runs per call)."""
        ids, l2p, rc, out, load, gate, num_unpadded = self
        l2p_stride, l2p_shape = l2p.stride(), l2p.shape
        return [
            ids.data_ptr(),
            out.data_ptr(),
            rc.data_ptr(),
            rc.dtype is torch.int64,
            rc.stride(0),
            l2p.data_ptr(),
            l2p_stride[0],
            l2p_stride[1],
            l2p_shape[0],
            l2p_shape[1],
            0 if load is None else load.data_ptr(),
            0 if load is None else load.shape[0],
            0 if gate is None else gate.data_ptr(),
            0 if num_unpadded is None else num_unpadded.data_ptr(),
            ids.numel(),
        ]
