"""Triton kernels for the EPLB load update, and their launchers.

Kernels only: no ``torch.library`` here. Each launcher takes ``traced``: under
``torch.compile`` the operators' functional decomposition launches the kernel
through ``torch.library.wrap_triton``, so that Inductor sees (and schedules)
the user kernel instead of an opaque call. Traced launches never branch on a
size, so the token count may be symbolic, even unbacked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from eplb_compile.kernels.call import KernelCall

MAP_BLOCK_SIZE = 256  # vLLM 0.33.0's choice; the map is latency-bound anyway.


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
    if not RECORD and HAS_NUM_UNPADDED:
        # map_only with padding: the padded rows' ids are -1, nothing is read for them.
        valid = valid & (token < tl.load(num_unpadded_ptr))
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


def launch_map(call: KernelCall, *, traced: bool = False) -> None:
    """Map ``call.ids`` into ``call.out``; count into ``call.load`` when the call has one."""
    ids, l2p = call.ids, call.l2p
    numel = ids.numel()
    if not traced and numel == 0:
        return  # eager only: a traced launch must not branch on the (maybe unbacked) size
    record = call.records
    # Unused pointer arguments get a harmless tensor of the right device.
    load = call.load if record else call.out
    kernel = wrap_triton(_map_and_record_kernel) if traced else _map_and_record_kernel
    kernel[(triton.cdiv(numel, MAP_BLOCK_SIZE),)](
        ids,
        call.replica_count,
        l2p,
        call.out,
        load,
        call.gate if call.gate is not None else call.out,
        call.num_unpadded if call.num_unpadded is not None else call.out,
        l2p.shape[0],
        l2p.shape[1],
        load.shape[0],
        numel,
        ids.shape[1],
        ids.stride(0),
        ids.stride(1),
        l2p.stride(0),
        l2p.stride(1),
        call.replica_count.stride(0),
        RECORD=record,
        HAS_NUM_UNPADDED=call.num_unpadded is not None,
        BLOCK_SIZE=MAP_BLOCK_SIZE,
    )
