"""The operators in plain torch: the CPU implementation, and on CPU also what
torch.compile traces (Inductor fuses it into generated loops).

Vectorised, so it shares no code with ``eplb_compile.reference``, which states
the same semantics element by element. No branch depends on the token count,
so the token dimension may be symbolic, even unbacked. The branches on the
map's and the load's sizes (an empty one has nothing to index) are traced only
where ``branches_decided`` holds; elsewhere the op stays whole in the graph.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from eplb_compile.ops._validation import id_capacity

# floor(2**32 / golden ratio): the Knuth multiplicative hash vLLM uses to pick
# a replica from the token index.
KNUTH_MULTIPLIER = 2654435769


def branches_decided(*sizes) -> bool:
    """Whether each size is a plain number. A symbolic one is >= 2 only while a
    guard says so (backed), or unknown (unbacked): not enough to index into."""
    return all(is_concrete_int(size) for size in sizes)


def _map(topk_ids: torch.Tensor, logical_to_physical_map: torch.Tensor, logical_replica_count: torch.Tensor):
    """(physical ids as int64, flat; token index of each element); -1 where invalid."""
    num_logical, slots = logical_to_physical_map.shape
    k = topk_ids.shape[1]
    # vLLM reads the ids as int32 whatever their dtype.
    experts = topk_ids.reshape(-1).to(torch.int32).to(torch.int64)
    token = torch.arange(experts.shape[0], device=experts.device, dtype=torch.int64) // k
    if num_logical == 0 or slots == 0:  # the map's shape, never the token count
        return torch.full_like(experts, -1), token
    valid = (experts >= 0) & (experts < num_logical)
    safe_expert = torch.where(valid, experts, 0)
    replica_count = logical_replica_count.to(torch.int64)[safe_expert].clamp_min(1)
    replica = (token * KNUTH_MULTIPLIER).bitwise_and(0xFFFFFFFF) % replica_count
    # Our one deviation from vLLM: a replica past the map's slots is invalid, never read.
    valid = valid & (replica < slots)
    physical = logical_to_physical_map[safe_expert, torch.where(valid, replica, 0)]
    return torch.where(valid, physical, -1), token


def map_and_record(
    topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled, num_unpadded_tokens=None
):
    physical, _ = _map(topk_ids, logical_to_physical_map, logical_replica_count)
    num_physical = expert_load_view.shape[0]
    if num_physical != 0:  # the load's shape: an empty load has nothing to count into
        record = (physical >= 0) & (physical < num_physical) & record_enabled.reshape(())
        if num_unpadded_tokens is not None:
            flat = torch.arange(physical.shape[0], device=physical.device)
            record = record & (flat < num_unpadded_tokens.reshape(()).to(torch.int64) * topk_ids.shape[1])
        # An int32 accumulating index_put_ lowers to a fused loop with atomic adds;
        # scatter_add_ would fall back to aten on CPU, and int64 on every device.
        expert_load_view.index_put_((torch.where(record, physical, 0),), record.to(torch.int32), accumulate=True)
    return physical.to(topk_ids.dtype).reshape(topk_ids.shape)


def fit_ids(physical: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """map_only's physical ids (any integer dtype) in ``dtype``, an id the dtype
    cannot hold made -1. Only a sparse map (an id past num_logical x slots, which
    no EPLB map holds) can name one: the capacity rule bounds the entry count."""
    capacity = id_capacity(dtype)
    if capacity is not None:
        physical = torch.where(physical < capacity, physical, -1)
    return physical.to(dtype)


def map_only(topk_ids, logical_to_physical_map, logical_replica_count, num_unpadded_tokens=None):
    physical, token = _map(topk_ids, logical_to_physical_map, logical_replica_count)
    if num_unpadded_tokens is not None:
        # Padded rows are never dispatched: their ids are -1 (fused into the same loop).
        physical = torch.where(token < num_unpadded_tokens.reshape(()).to(torch.int64), physical, -1)
    return fit_ids(physical, topk_ids.dtype).reshape(topk_ids.shape)


def record_counts(expert_load_view, counts, start, record_enabled):
    n = counts.shape[0]
    # A plain slice add: no arange, no scatter.
    expert_load_view[start : start + n].add_(torch.where(record_enabled.reshape(()), counts, 0))
