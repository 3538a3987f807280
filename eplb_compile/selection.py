"""Choosing the lowering of the load update for one MoE layer.

The count path costs a map-only kernel plus a count kernel; the topk path one
fused kernel. So exact backend counts are necessary but not sufficient: below
a measured token count the fused kernel is cheaper. The crossover comes from
``eplb-compile bench`` (README, Performance) and can be overridden per call or
with the ``EPLB_COMPILE_COUNT_PATH_MIN_TOKENS`` environment variable.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import torch

# Tokens per rank at or above which the count path wins, measured by
# `eplb-compile bench` (see README, Performance). On an H100 the fused topk
# kernel stayed faster than map-only + count kernel at every measured size up
# to 32768 tokens/rank, so the default lies past that range. Re-measure on
# other cards and kernels; override with the environment variable.
DEFAULT_COUNT_PATH_MIN_TOKENS = 65536
MIN_TOKENS_ENV = "EPLB_COMPILE_COUNT_PATH_MIN_TOKENS"


class Lowering(str, enum.Enum):
    """How a layer's expert load is recorded."""

    TOPK = "topk"  # map_and_record: map + count from topk_ids, one kernel
    COUNTS = "counts"  # map_only + record_counts of the backend's counts


@dataclass(frozen=True)
class LoweringChoice:
    lowering: Lowering
    reason: str


def count_path_min_tokens() -> int:
    """The crossover in force: the environment variable, else the default."""
    value = os.environ.get(MIN_TOKENS_ENV)
    if value is None:
        return DEFAULT_COUNT_PATH_MIN_TOKENS
    try:
        threshold = int(value)
    except ValueError:
        raise ValueError(f"{MIN_TOKENS_ENV} must be a non-negative integer, got {value!r}") from None
    if threshold < 0:
        raise ValueError(f"{MIN_TOKENS_ENV} must be a non-negative integer, got {value!r}")
    return threshold


def select_lowering(
    expert_num_tokens: torch.Tensor | bool | None, num_tokens: int, *, min_tokens: int | None = None
) -> LoweringChoice:
    """Pick the lowering for a layer from what is known at launch.

    Args:
        expert_num_tokens: the prepare/finalize backend's exact, unaligned
            per-local-physical-expert counts, or None when it has none. A
            router that must choose before ``prepare`` runs passes True
            ("this backend will provide them") or False/None.
        num_tokens: tokens on this rank in this forward (a shape, never a
            device value, so choosing costs no sync).
        min_tokens: crossover override; defaults to :func:`count_path_min_tokens`.
    """
    if expert_num_tokens is None or expert_num_tokens is False:
        return LoweringChoice(Lowering.TOPK, "backend provides no exact per-expert counts")
    threshold = count_path_min_tokens() if min_tokens is None else min_tokens
    if torch.compiler.is_compiling():
        return _select_while_compiling(threshold)
    if num_tokens < threshold:
        return LoweringChoice(
            Lowering.TOPK, f"{num_tokens} tokens < crossover {threshold}: one fused kernel is cheaper"
        )
    return LoweringChoice(
        Lowering.COUNTS, f"exact backend counts and {num_tokens} tokens >= crossover {threshold}"
    )


def _select_while_compiling(threshold: int) -> LoweringChoice:
    """Under torch.compile: one choice per graph, never from the token count.

    Comparing a dynamic token count with the crossover would guard on it, and
    vLLM's compiled mode drops guards, so one traced choice serves every size
    (and every EP rank must make the same one). So the count path is taken
    only when the crossover is 0, which every size meets.
    """
    if threshold == 0:
        return LoweringChoice(Lowering.COUNTS, "exact backend counts and crossover 0 (compiled graph)")
    return LoweringChoice(
        Lowering.TOPK, f"compiled graph serves token counts below crossover {threshold}: one fused kernel"
    )
