"""Load-imbalance metrics over EP ranks.

All take a load pass ``[layers, num_physical]`` or a window
``[steps, layers, num_physical]`` (summed over steps first) and the EP size.
EPLB's placement is linear, so rank r owns physical experts
``[r * P / ep_size, (r + 1) * P / ep_size)``.
"""

from __future__ import annotations

import torch


def rank_loads(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Tokens per EP rank: ``[layers, ep_size]`` as float64."""
    if load.dim() == 3:
        load = load.sum(dim=0)
    if load.dim() != 2:
        raise ValueError(f"load must be [layers, physical] or [steps, layers, physical], got {tuple(load.shape)}")
    layers, num_physical = load.shape
    if ep_size <= 0:
        raise ValueError(f"ep_size must be positive, got {ep_size}")
    if num_physical % ep_size != 0:
        raise ValueError(f"{num_physical} physical experts do not split evenly over ep_size={ep_size}")
    return load.to(torch.float64).reshape(layers, ep_size, num_physical // ep_size).sum(dim=-1)


def balancedness(load: torch.Tensor, ep_size: int) -> float:
    """vLLM's balancedness: sum over layers of mean, over sum of max (1.0 is perfect).

    As ``EplbState.step`` logs it (``_compute_eplb_load_stats``), including
    its 0.0 for an empty load. vLLM computes it on the pass in float32; this
    uses float64, so the last digits may differ on huge loads.
    """
    per_rank = rank_loads(load, ep_size)
    max_total = per_rank.max(dim=-1).values.sum()
    if max_total == 0:
        return 0.0
    return float(per_rank.mean(dim=-1).sum() / max_total)


def _max_and_mean(load: torch.Tensor, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_rank = rank_loads(load, ep_size)
    return per_rank.max(dim=-1).values, per_rank.mean(dim=-1)


def imbalance_max_over_mean(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Per-layer max/mean over ranks, as in the upstream test plan (1.0 is perfect).

    A layer with no tokens at all counts as balanced (1.0), not NaN.
    """
    max_load, mean = _max_and_mean(load, ep_size)
    return torch.where(mean > 0, max_load / mean.clamp_min(1e-12), torch.ones_like(mean))


def imbalance_trtllm(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Per-layer (max - mean) / mean over ranks, TensorRT-LLM's definition (0.0 is perfect).

    Computed as written rather than as max/mean - 1, which rounds differently.
    A layer with no tokens at all counts as balanced (0.0).
    """
    max_load, mean = _max_and_mean(load, ep_size)
    return torch.where(mean > 0, (max_load - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))


def logical_load(load: torch.Tensor, physical_to_logical: torch.Tensor, num_logical: int) -> torch.Tensor:
    """``[..., layers, physical]`` load summed onto logical experts, as vLLM's rearrange does."""
    index = physical_to_logical.masked_fill(physical_to_logical < 0, num_logical).expand_as(load)
    out = torch.zeros((*load.shape[:-1], num_logical + 1), dtype=torch.int64)
    return out.scatter_add_(-1, index.long(), load.long())[..., :num_logical]
