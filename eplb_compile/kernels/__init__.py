"""GPU kernels (Triton, and NVRTC-compiled CUDA) and the eager variant choice.

Importing this package needs Triton; ``eplb_compile.ops`` imports it lazily
and only registers CUDA implementations when Triton is present. The CUDA
kernels are compiled on their first launch, never at import.
"""

from __future__ import annotations

import warnings

import torch

from eplb_compile.kernels import cuda_histogram
from eplb_compile.kernels.triton_kernels import launch_map, launch_record_counts

# Which kernel the eager topk path runs, by flat element count T * k: rows of
# (min_numel, variant) in ascending order, the last row with min_numel <= numel
# wins. "triton" is the one-atomic-per-element kernel of triton_kernels.py; the
# other names are cuda_histogram.VARIANTS. The benchmark (`eplb-compile bench
# --topk-plan auto`) measures every variant and prints the plan to put here.
# Measured on an H100 (torch 2.11, Triton 3.6): graphs/bench_results.md.
TOPK_PLAN: tuple[tuple[int, str], ...] = ((0, "direct"), (8192, "hist_e1"), (32768, "hist"), (92688, "hist_wide"))

_cuda_failure: Exception | None = None


def topk_variant(numel: int) -> str:
    """The variant TOPK_PLAN picks for ``numel`` elements (a shape: no sync)."""
    chosen = "triton"
    for min_numel, variant in TOPK_PLAN:
        if numel < min_numel:
            break
        chosen = variant
    return chosen


def _try_cuda(launch, *args) -> bool:
    """Run a CUDA-kernel launch; False where it does not apply or NVRTC failed.

    A RuntimeError here comes from NVRTC or the driver before anything was
    launched: a missing toolchain must not take the forward pass down, so
    the process warns once and stays on Triton.
    """
    global _cuda_failure
    if _cuda_failure is not None:
        return False
    try:
        return launch(*args)
    except RuntimeError as error:
        _cuda_failure = error
        warnings.warn(f"eplb_compile: CUDA topk kernels unavailable, using Triton: {error}", stacklevel=3)
        return False


def _launch_variant(variant: str, *args) -> bool:
    # The variant falls back to the Triton kernel by itself where it does not apply.
    cuda_histogram.VARIANTS[variant](*args)
    return True


def map_and_record_cuda(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Eager CUDA map+record into ``out``: picks the kernel variant from the shape alone."""
    args = (topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view,
            record_enabled, num_unpadded_tokens, out)
    variant = topk_variant(topk_ids.numel())
    if variant != "triton" and _try_cuda(_launch_variant, variant, *args):
        return
    launch_map(topk_ids, logical_to_physical_map, logical_replica_count, out,
               expert_load_view, record_enabled, num_unpadded_tokens)


def map_only_cuda(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Eager CUDA map-only into ``out``: the direct kernel (cheaper to launch), else Triton."""
    if _try_cuda(cuda_histogram.map_only_direct, topk_ids, logical_to_physical_map, logical_replica_count, out):
        return
    launch_map(topk_ids, logical_to_physical_map, logical_replica_count, out)


__all__ = ["TOPK_PLAN", "launch_map", "launch_record_counts", "map_and_record_cuda", "map_only_cuda", "topk_variant"]
