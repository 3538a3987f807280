"""Triton kernels for the EPLB load update, and their launchers.

Kernels only: no ``torch.library`` here. Each launcher takes a ``wrap`` flag:
under ``torch.compile`` the operators' functional decomposition launches the
kernel through ``torch.library.wrap_triton`` so that Inductor sees (and can
schedule) the user kernel instead of an opaque call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

MAP_BLOCK_SIZE = 256  # vLLM 0.33.0's choice; the map is latency-bound anyway.
COUNTS_BLOCK_SIZE = 1024


@triton.jit
def _map_and_record_kernel(
    topk_ids_ptr,
    replica_count_ptr,
    l2p_ptr,
    out_ids_ptr,
    load_ptr,
    record_enabled_ptr,
    num_unpadded_ptr,
    num_logical,
    map_slots,
    load_size,
    numel,
    k,
    ids_stride_t,
    ids_stride_k,
    l2p_stride_e,
    l2p_stride_s,
    replica_count_stride,
    RECORD: tl.constexpr,
    HAS_NUM_UNPADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    token = offs // k
    slot = offs - token * k
    # vLLM reads the ids as int32 whatever their dtype; keep that wrap exact.
    expert = (
        tl.load(topk_ids_ptr + token * ids_stride_t + slot * ids_stride_k, mask=mask, other=0)
        .to(tl.int32)
        .to(tl.int64)
    )
    valid = (expert >= 0) & (expert < num_logical)
    safe_expert = tl.where(valid, expert, 0)
    replica_count = tl.load(
        replica_count_ptr + safe_expert * replica_count_stride, mask=mask & valid, other=1
    )
    replica_count = tl.maximum(replica_count, 1)
    hashed = (token.to(tl.int64) * 2654435769) & 0xFFFFFFFF
    replica = hashed % replica_count
    # Deliberate deviation from vLLM: never read past the map's slots.
    valid = valid & (replica < map_slots)
    physical = tl.load(
        l2p_ptr + safe_expert * l2p_stride_e + replica * l2p_stride_s,
        mask=mask & valid,
        other=-1,
    )
    tl.store(out_ids_ptr + offs, physical, mask=mask)
    if RECORD:
        enabled = tl.load(record_enabled_ptr) != 0
        record = mask & enabled & (physical >= 0) & (physical < load_size)
        if HAS_NUM_UNPADDED:
            record = record & (offs < tl.load(num_unpadded_ptr) * k)
        tl.atomic_add(load_ptr + tl.where(record, physical, 0), 1, mask=record, sem="relaxed")


@triton.jit
def _record_counts_kernel(
    load_ptr,
    counts_ptr,
    record_enabled_ptr,
    start,
    n,
    counts_stride,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offs < n
    # The loads do not wait for the gate (one memory round trip, not two);
    # the gate, read on the device so CUDA graphs replay it without
    # re-capture, only masks the store.
    counts = tl.load(counts_ptr + offs * counts_stride, mask=in_range, other=0)
    current = tl.load(load_ptr + start + offs, mask=in_range, other=0)
    enabled = tl.load(record_enabled_ptr) != 0
    # Each element is owned by one thread and the slice is disjoint: a plain
    # read-modify-write is exact and cheaper than atomics.
    tl.store(load_ptr + start + offs, current + counts, mask=in_range & enabled)


def _launch(kernel, wrap: bool):
    return wrap_triton(kernel) if wrap else kernel


def launch_map(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    out: torch.Tensor,
    expert_load_view: torch.Tensor | None = None,
    record_enabled: torch.Tensor | None = None,
    num_unpadded_tokens: torch.Tensor | None = None,
    *,
    wrap: bool = False,
) -> None:
    """Map ``topk_ids`` into ``out``; record into the load when one is given."""
    numel = topk_ids.numel()
    if numel == 0:
        return
    record = expert_load_view is not None
    # Unused pointer arguments get a harmless tensor of the right device.
    load = expert_load_view if record else out
    enabled = record_enabled if record_enabled is not None else out
    unpadded = num_unpadded_tokens if num_unpadded_tokens is not None else out
    grid = (triton.cdiv(numel, MAP_BLOCK_SIZE),)
    _launch(_map_and_record_kernel, wrap)[grid](
        topk_ids,
        logical_replica_count,
        logical_to_physical_map,
        out,
        load,
        enabled,
        unpadded,
        logical_to_physical_map.shape[0],
        logical_to_physical_map.shape[1],
        load.shape[0],
        numel,
        topk_ids.shape[1],
        topk_ids.stride(0),
        topk_ids.stride(1),
        logical_to_physical_map.stride(0),
        logical_to_physical_map.stride(1),
        logical_replica_count.stride(0),
        RECORD=record,
        HAS_NUM_UNPADDED=num_unpadded_tokens is not None,
        BLOCK_SIZE=MAP_BLOCK_SIZE,
    )


def launch_record_counts(
    expert_load_view: torch.Tensor,
    counts: torch.Tensor,
    start: int,
    record_enabled: torch.Tensor,
    *,
    wrap: bool = False,
) -> None:
    """``load[start:start+n] += counts`` when the gate is set: one kernel."""
    n = counts.shape[0]
    if n == 0:
        return
    grid = (triton.cdiv(n, COUNTS_BLOCK_SIZE),)
    _launch(_record_counts_kernel, wrap)[grid](
        expert_load_view,
        counts,
        record_enabled,
        start,
        n,
        counts.stride(0),
        BLOCK_SIZE=COUNTS_BLOCK_SIZE,
    )
