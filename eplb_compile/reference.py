"""The plain-Python semantics every implementation is checked against.

Written element by element, straight from vLLM 0.33.0's
``_eplb_map_and_record_i32_kernel`` (``fused_moe/router/base_router.py``), so
that it shares no code with the vectorised CPU lowering in ``ops.py``.
"""

from __future__ import annotations

import torch

# floor(2**32 / golden ratio): the Knuth multiplicative hash vLLM uses to pick
# a replica from the token index.
KNUTH_MULTIPLIER = 2654435769


def _as_int32(value: int) -> int:
    """vLLM casts ``topk_ids`` to int32 before reading them; mirror the wrap."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def map_to_physical_reference(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
) -> list[int]:
    """Physical expert id (as a Python int, -1 if invalid) for each flat slot."""
    num_logical, slots = logical_to_physical_map.shape
    k = topk_ids.shape[1]
    ids = [_as_int32(int(v)) for v in topk_ids.reshape(-1).tolist()]
    l2p = logical_to_physical_map.tolist()
    replicas = logical_replica_count.tolist()
    physical = []
    for flat, expert in enumerate(ids):
        if not 0 <= expert < num_logical:
            physical.append(-1)
            continue
        replica = ((flat // k) * KNUTH_MULTIPLIER & 0xFFFFFFFF) % max(int(replicas[expert]), 1)
        # Our one deviation from vLLM: a replica index past the map's slots is
        # invalid, where vLLM would read the next row or past the map's end.
        physical.append(int(l2p[expert][replica]) if replica < slots else -1)
    return physical


def map_and_record_reference(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: bool,
    num_unpadded_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(physical_ids, new_load)``; the inputs are left untouched."""
    physical = map_to_physical_reference(topk_ids, logical_to_physical_map, logical_replica_count)
    k = topk_ids.shape[1]
    load = expert_load_view.tolist()
    if record_enabled:
        for flat, p in enumerate(physical):
            if num_unpadded_tokens is not None and flat >= num_unpadded_tokens * k:
                continue
            if 0 <= p < len(load):
                load[p] += 1
    ids = torch.tensor(physical, dtype=torch.int64).to(topk_ids.dtype).reshape(topk_ids.shape)
    return ids, torch.tensor(load, dtype=torch.int32)


def record_counts_reference(
    expert_load_view: torch.Tensor, counts: torch.Tensor, start: int, record_enabled: bool
) -> torch.Tensor:
    """Return the new load after ``load[start:start+n] += counts`` (when enabled)."""
    load = expert_load_view.tolist()
    if record_enabled:
        for i, c in enumerate(counts.tolist()):
            load[start + i] += int(c)
    return torch.tensor(load, dtype=torch.int32)


# Past this many elements the element-wise reference is slow; callers that
# check large inputs use the CPU operator, itself checked against it.
ELEMENTWISE_LIMIT = 20_000


def expected_map_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: bool,
    num_unpadded_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(physical_ids, new_load)`` on the CPU for inputs on any device."""
    cpu = [t.cpu() for t in (topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view)]
    if topk_ids.numel() <= ELEMENTWISE_LIMIT:
        return map_and_record_reference(*cpu, record_enabled, num_unpadded_tokens)
    unpadded = None if num_unpadded_tokens is None else torch.tensor(num_unpadded_tokens, dtype=torch.int32)
    load = cpu[3].clone()
    ids = torch.ops.eplb_compile.map_and_record(cpu[0], cpu[1], cpu[2], load, torch.tensor(record_enabled), unpadded)
    return ids, load
