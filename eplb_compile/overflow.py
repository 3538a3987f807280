"""How far the int32 expert load can count, and a cheap check on the window sum.

vLLM 0.33.0 keeps the load in int32 (``EplbState.add_model``):
``expert_load_pass`` ``[layers, physical]`` gets one pass (one engine step) of
counts, then is copied into ``expert_load_window`` ``[window, layers,
physical]`` and zeroed. At a rearrangement vLLM scatter-adds each window slot
from physical to logical experts in int32, sums the window with
``.sum(dim=0)`` (torch promotes an int32 sum to int64) and all-reduces the
int64 result over the EP group. So there are two limits:

1. **Per pass, int32.** One physical expert's counter may reach at most
   ``2**31 - 1`` within one pass; past that the atomic adds wrap silently (to
   negative values first). The worst case in one pass is ``R * T * k`` for
   ``R`` EP ranks, ``T`` tokens per rank per step and top-``k``:
   - the topk path counts a rank's own ``T * k`` routed slots into its view,
     so ``T * k`` bounds any one counter (``T`` when a token's k ids are
     distinct);
   - the count path adds the backend's ``expert_num_tokens``: every rank can
     send all of its ``T * k`` slots to one local expert, so ``R * T * k``.
   The same ``R * T * k`` bounds the sum of all counters of one pass on one
   rank, so vLLM's int32 scatter-add of replicas into logical experts stays
   exact under the same limit.
2. **Per window, int64.** Once no pass wrapped, each window entry lies in
   ``[0, 2**31 - 1]`` and the int64 sum over ``W`` slots and ``R`` ranks is at
   most ``W * R * (2**31 - 1)``: exact unless ``W * R >= 2**32``. Summing the
   window in int32 instead (``sum(dtype=torch.int32)``) is *not* safe: it
   overflows once the total passes ``2**31 - 1``, e.g. 1000 steps of 8192
   tokens x top-8 on 64 ranks.
"""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def max_count_per_pass(tokens_per_rank: int, top_k: int, ep_size: int) -> int:
    """Worst-case count of one physical expert after one pass: ``R * T * k``.

    Covers both lowerings (the count path is the larger; see the module
    docstring). ``tokens_per_rank`` is every token one rank records in one
    engine step (``max_num_batched_tokens``, both micro-batches under DBO).
    """
    if tokens_per_rank < 0 or top_k < 1 or ep_size < 1:
        raise ValueError(
            f"expected tokens_per_rank >= 0, top_k >= 1 and ep_size >= 1, got "
            f"{tokens_per_rank}, {top_k}, {ep_size}"
        )
    return ep_size * tokens_per_rank * top_k


def max_tokens_per_pass(top_k: int, ep_size: int) -> int:
    """The most tokens per rank per pass for which no int32 counter can wrap.

    ``(2**31 - 1) // (R * k)``: 4 194 303 tokens for top-8 on 64 ranks, far
    above any ``max_num_batched_tokens`` in use.
    """
    return INT32_MAX // max_count_per_pass(1, top_k, ep_size)


def pass_fits_int32(tokens_per_rank: int, top_k: int, ep_size: int) -> bool:
    """Whether no physical expert's int32 counter can wrap within one pass."""
    return max_count_per_pass(tokens_per_rank, top_k, ep_size) <= INT32_MAX


def window_sum_fits_int64(window: torch.Tensor, ep_size: int = 1) -> bool:
    """Whether ``window.sum(dim=0)`` in int64, all-reduced over ``ep_size``
    ranks, can never overflow. Reads only metadata: no sync, no kernel.

    ``window`` is ``[window_size, ...]`` of non-negative counts; each entry is
    bounded by its dtype's maximum (int32 for vLLM, where any window below
    ``2**32 // ep_size`` slots fits).
    """
    if window.dtype.is_floating_point or window.dtype.is_complex or window.dtype == torch.bool:
        raise TypeError(f"window must be an integer tensor, got {window.dtype}")
    if window.dim() < 1:
        raise ValueError(f"window must be at least 1-D [window_size, ...], got shape {tuple(window.shape)}")
    entry_max = torch.iinfo(window.dtype).max
    return window.shape[0] * ep_size * entry_max <= INT64_MAX


def window_is_exact(window: torch.Tensor) -> torch.Tensor:
    """A device-side bool: True when no pass in the window wrapped past int32.

    A pass only ever grows from zero, so a negative entry is a wrapped
    counter. (A counter wrapping all the way round to positive needs ``2**32``
    counts in one pass, which ``pass_fits_int32`` rules out.) One reduction,
    no sync: read it where vLLM syncs anyway, e.g. at rearrangement.
    """
    return (window >= 0).all()
