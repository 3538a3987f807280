"""The semantics every implementation is checked against, stated twice.

``map_to_physical_reference`` and friends are plain Python, element by
element, straight from vLLM 0.33.0's ``_eplb_map_and_record_i32_kernel``
(``fused_moe/router/base_router.py``). ``expected_map_and_record`` answers
for inputs of any size: element by element up to ``ELEMENTWISE_LIMIT``
elements, past it with a NumPy version of the same rules (the tests check the
two against each other). Neither calls the operators or shares code with them.
"""

from __future__ import annotations

import numpy as np
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
    num_unpadded_tokens: int | None = None,
) -> list[int]:
    """Physical expert id (as a Python int, -1 if invalid) for each flat slot.

    With ``num_unpadded_tokens`` (map_only's padding), every slot of a row at
    or past it is -1.
    """
    num_logical, slots = logical_to_physical_map.shape
    k = topk_ids.shape[1]
    ids = [_as_int32(int(v)) for v in topk_ids.reshape(-1).tolist()]
    l2p = logical_to_physical_map.tolist()
    replicas = logical_replica_count.tolist()
    physical = []
    for flat, expert in enumerate(ids):
        token = flat // k
        if not 0 <= expert < num_logical or (num_unpadded_tokens is not None and token >= num_unpadded_tokens):
            physical.append(-1)
            continue
        replica = (token * KNUTH_MULTIPLIER & 0xFFFFFFFF) % max(int(replicas[expert]), 1)
        # Our one deviation from vLLM: a replica index past the map's slots is
        # invalid, where vLLM would read the next row or past the map's end.
        physical.append(int(l2p[expert][replica]) if replica < slots else -1)
    return physical


def _ids_like(physical: list[int], topk_ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor(physical, dtype=torch.int64).to(topk_ids.dtype).reshape(topk_ids.shape)


def map_only_reference(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    num_unpadded_tokens: int | None = None,
) -> torch.Tensor:
    """map_only's result: the physical ids with the shape and dtype of ``topk_ids``;
    an id that dtype cannot hold (int8: 128 and up, int16: 32768 and up) is -1."""
    physical = map_to_physical_reference(topk_ids, logical_to_physical_map, logical_replica_count, num_unpadded_tokens)
    limit = {torch.int8: 2**7, torch.int16: 2**15}.get(topk_ids.dtype)
    if limit is not None:
        physical = [p if p < limit else -1 for p in physical]
    return _ids_like(physical, topk_ids)


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
    return _ids_like(physical, topk_ids), torch.tensor(load, dtype=torch.int32)


def record_counts_reference(
    expert_load_view: torch.Tensor, counts: torch.Tensor, start: int, record_enabled: bool
) -> torch.Tensor:
    """Return the new load after ``load[start:start+n] += counts`` (when enabled)."""
    load = expert_load_view.tolist()
    if record_enabled:
        for i, c in enumerate(counts.tolist()):
            load[start + i] += int(c)
    return torch.tensor(load, dtype=torch.int32)


# Past this many elements the element-wise reference is slow and the NumPy one answers.
ELEMENTWISE_LIMIT = 20_000


def map_and_record_numpy(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: bool,
    num_unpadded_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`map_and_record_reference` in NumPy, for large inputs (CPU tensors)."""
    num_logical, slots = logical_to_physical_map.shape
    k = topk_ids.shape[1]
    raw = topk_ids.reshape(-1).to(torch.int64).numpy()
    experts = ((raw & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000  # the int32 wrap, in int64
    tokens = np.arange(raw.size, dtype=np.int64) // k
    valid = (experts >= 0) & (experts < num_logical)
    row = np.where(valid, experts, 0)
    counts = np.maximum(logical_replica_count.to(torch.int64).numpy()[row] if num_logical else 1, 1)
    # uint64 keeps counts up to 2**63 exact; the hash is below 2**32.
    replica = ((tokens * KNUTH_MULTIPLIER) & 0xFFFFFFFF).astype(np.uint64) % counts.astype(np.uint64)
    valid &= replica < slots
    table = logical_to_physical_map.numpy()
    physical = np.full(raw.size, -1, dtype=np.int64)
    physical[valid] = table[row[valid], replica[valid].astype(np.int64)]
    load = expert_load_view.numpy().astype(np.int64)
    if record_enabled:
        counted = (physical >= 0) & (physical < load.size)
        if num_unpadded_tokens is not None:
            counted &= np.arange(raw.size) < num_unpadded_tokens * k
        load += np.bincount(physical[counted], minlength=load.size)[: load.size]
    ids = torch.from_numpy(physical).to(topk_ids.dtype).reshape(topk_ids.shape)
    return ids, torch.from_numpy(load.astype(np.int32))


def expected_map_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: bool,
    num_unpadded_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(physical_ids, new_load)`` on the CPU for inputs on any device and of any size."""
    cpu = [t.cpu() for t in (topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view)]
    implementation = map_and_record_reference if topk_ids.numel() <= ELEMENTWISE_LIMIT else map_and_record_numpy
    return implementation(*cpu, record_enabled, num_unpadded_tokens)
