"""Choosing the lowering of the load update for one MoE layer.

The count path costs a map-only kernel plus a count kernel; the topk path one
fused kernel. So exact backend counts are necessary but not sufficient: below
a measured token count (the crossover) the fused kernel is cheaper. Every rule
lives in :func:`select_lowering`, which returns the choice with its reason.

The crossover, first match wins: the ``min_tokens`` argument; the
``EPLB_COMPILE_COUNT_PATH_MIN_TOKENS`` environment variable (empty means
unset); the measured kernel plan of the device's card
(``eplb_compile.kernels.plans``, whose ``default.json`` serves every other card).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import torch

from eplb_compile.kernels import plans

MIN_TOKENS_ENV = "EPLB_COMPILE_COUNT_PATH_MIN_TOKENS"


class Lowering(str, enum.Enum):
    """How a layer's expert load is recorded."""

    TOPK = "topk"  # map_and_record: map + count from topk_ids, one kernel
    COUNTS = "counts"  # map_only + record_counts of the backend's counts


@dataclass(frozen=True)
class LoweringChoice:
    lowering: Lowering
    reason: str


def _is_int(value) -> bool:
    # bool is an int subclass, but True tokens is a wiring mistake, not a size.
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _check_count(name: str, value) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if torch.compiler.is_compiling():
        return  # a traced size is never negative, and formatting it would specialise it
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")


# Host state read once per trace: under torch.compile the card's crossover is
# a constant of the graph (Dynamo cannot trace the plan lookup).
@torch.compiler.assume_constant_result
def _card_crossover(device: torch.device | None) -> int:
    return plans.count_path_min_tokens(device)


def count_path_min_tokens(device: torch.device | None = None) -> int:
    """The crossover in force for ``device``: the environment variable, else the card's plan."""
    if device is not None and not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device or None, got {type(device).__name__} {device!r}")
    value = os.environ.get(MIN_TOKENS_ENV, "").strip()
    if not value:
        return _card_crossover(device)
    try:
        threshold = int(value)
    except ValueError:
        raise ValueError(f"{MIN_TOKENS_ENV} must be a non-negative integer, got {value!r}") from None
    if threshold < 0:
        raise ValueError(f"{MIN_TOKENS_ENV} must be a non-negative integer, got {value!r}")
    return threshold


def select_lowering(
    has_exact_counts: bool,
    num_tokens: int,
    *,
    has_padding_mask: bool = True,
    min_tokens: int | None = None,
    device: torch.device | None = None,
) -> LoweringChoice:
    """Pick the lowering for a layer from what is known at launch (no device sync).

    Args:
        has_exact_counts: whether the prepare/finalize backend will report the
            exact, unaligned number of (token, k) pairs per local physical expert.
        num_tokens: tokens on this rank in this forward (a shape). To keep all
            EP ranks on one lowering, pass a count every rank agrees on.
        has_padding_mask: whether padded rows can be masked to -1 before
            dispatch. Without a mask they would reach the backend's counts.
        min_tokens: crossover override; see the module docstring for the default.
        device: the layer's device, whose card's measured crossover applies.
    """
    if not isinstance(has_exact_counts, bool):
        raise TypeError(
            f"has_exact_counts must be a bool, got {type(has_exact_counts).__name__} {has_exact_counts!r}"
        )
    if not isinstance(has_padding_mask, bool):
        raise TypeError(
            f"has_padding_mask must be a bool, got {type(has_padding_mask).__name__} {has_padding_mask!r}"
        )
    _check_count("num_tokens", num_tokens)
    if min_tokens is not None:
        _check_count("min_tokens", min_tokens)
    threshold = count_path_min_tokens(device) if min_tokens is None else min_tokens

    if not has_exact_counts:
        return LoweringChoice(Lowering.TOPK, "backend provides no exact per-expert counts")
    if not has_padding_mask:
        return LoweringChoice(Lowering.TOPK, "no padding mask: padded rows would reach the backend's counts")
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

    Comparing a dynamic token count with the crossover would guard on it (or
    specialise it), and vLLM's compiled mode drops guards, so one traced
    choice serves every size, and every EP rank must make the same one. So a
    compiled graph takes the count path only when the crossover is 0, which
    every size meets. The reasons carry no number: with ``dynamic=True`` Dynamo
    may make the crossover itself symbolic, and formatting a symbol fails.
    """
    if threshold == 0:
        return LoweringChoice(Lowering.COUNTS, "exact backend counts and crossover 0 (compiled graph)")
    return LoweringChoice(
        Lowering.TOPK, "compiled graph serves token counts below the crossover: one fused kernel"
    )
