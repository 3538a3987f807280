"""The public operators: typed wrappers over ``torch.ops.eplb_compile``.

Each wrapper checks the Python types of its arguments (a TypeError naming the
argument, where the dispatcher would say less), then calls the operator
through the dispatcher, which validates the tensors' metadata
(``_validation.py``) and runs the kernel (``_library.py``). Under
``torch.compile`` the wrappers trace to the operator. ``eager_route`` (in
``route.py``) says which implementation an eager call takes, and why.
"""

from __future__ import annotations

import torch

from eplb_compile.ops import _library  # noqa: F401 - registers torch.ops.eplb_compile
from eplb_compile.ops._validation import MAP_AND_RECORD, MAP_ONLY, RECORD_COUNTS
from eplb_compile.ops.route import EagerRoute, Implementation, eager_route

_OPS = torch.ops.eplb_compile


def map_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map logical expert ids to physical ones and count them, in one kernel.

    Bit-identical to vLLM 0.33.0's ``eplb_map_to_physical_and_record``, except
    that a replica index past the map's slots is treated as invalid (-1)
    instead of being read out of bounds.

    Args:
        topk_ids: ``[T, k]`` logical expert ids, int8, int16, int32 or int64
            (read as int32, like vLLM). The dtype must hold every physical id:
            int8 up to 128 physical experts, int16 up to 32768.
        logical_to_physical_map: ``[num_logical, slots]`` int64, padded with -1.
        logical_replica_count: ``[num_logical]`` int32 or int64.
        expert_load_view: ``[num_physical]`` int32, contiguous; incremented in place.
        record_enabled: bool scalar tensor; nothing is recorded when it is False.
        num_unpadded_tokens: optional int32 scalar tensor; rows at or past it
            are mapped but not counted.

    Returns:
        Physical expert ids with the shape and dtype of ``topk_ids``; -1 for
        invalid ids.
    """
    MAP_AND_RECORD.check_types(topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view,
                               record_enabled, num_unpadded_tokens)
    return _OPS.map_and_record.default(
        topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled, num_unpadded_tokens
    )


def map_only(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mapping of :func:`map_and_record`, without recording.

    Used when the load comes from the dispatch backend's counts instead. With
    ``num_unpadded_tokens`` (an int32 scalar tensor, read on the device) every
    row at or past it comes back as -1 in every column, in the same kernel:
    padded rows are never dispatched. ``topk_ids``' dtype must hold every id
    the map can name: int8 up to 128 map entries (``num_logical * slots``),
    int16 up to 32768. The rule counts entries, as the map's values live on
    the device: it bounds every id of an EPLB map (each physical id below the
    entry count, named once; vLLM's maps are never sparse). An id that the
    dtype cannot hold, which only a sparse map can name, comes back -1.
    """
    MAP_ONLY.check_types(topk_ids, logical_to_physical_map, logical_replica_count, num_unpadded_tokens)
    return _OPS.map_only.default(topk_ids, logical_to_physical_map, logical_replica_count, num_unpadded_tokens)


def record_counts(
    expert_load_view: torch.Tensor, counts: torch.Tensor, start: int, record_enabled: torch.Tensor
) -> None:
    """``expert_load_view[start:start+n] += counts`` when ``record_enabled``.

    One kernel (gate included), no host sync. ``counts`` is the backend's
    int32 ``expert_num_tokens`` for this rank's ``n`` local physical experts,
    and ``start = ep_rank * n`` under EPLB's linear placement.
    """
    RECORD_COUNTS.check_types(expert_load_view, counts, start, record_enabled)
    _OPS.record_counts.default(expert_load_view, counts, start, record_enabled)


__all__ = ["EagerRoute", "Implementation", "eager_route", "map_and_record", "map_only", "record_counts"]
