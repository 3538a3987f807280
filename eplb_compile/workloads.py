"""Synthetic MoE workloads: EPLB expert placements and Zipf-skewed routing.

One generator of each for the demo, the multi-rank simulation, the benchmark
and the tests, on plain ints and torch only (no Triton, no vLLM).

- :func:`eplb_placement` places ``num_logical + num_redundant`` physical
  experts over ``ep_size`` ranks as EPLB's rebalance does: each redundant slot
  goes to the expert with the largest load per replica, then replicas are
  packed, heaviest share first, onto the least-loaded rank that has room.
- :func:`zipf_topk_ids` routes each token to ``top_k`` distinct experts drawn
  without replacement from a Zipf popularity, ordered hottest first, as a
  router's top-k orders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """One layer's expert placement, in the layout vLLM's ``EplbState`` keeps.

    Rank r owns physical experts ``[r * num_local, (r + 1) * num_local)``.
    """

    logical_to_physical_map: torch.Tensor  # [num_logical, slots] int64, padded with -1
    logical_replica_count: torch.Tensor  # [num_logical] int64
    physical_to_logical_map: torch.Tensor  # [num_physical] int64
    num_physical: int
    num_local: int


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def zipf_popularity(num_logical: int, *, alpha: float = 1.2, order: torch.Tensor | None = None) -> torch.Tensor:
    """Routing probability per logical expert: float64 ``[num_logical]``, summing to 1.

    The i-th hottest expert, ``order[i]`` (default: expert i), gets weight
    proportional to ``(i + 1) ** -alpha``.
    """
    _check_int("num_logical", num_logical, 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    weights = torch.arange(1, num_logical + 1, dtype=torch.float64).pow(-alpha)
    if order is not None:
        order = order.to("cpu", torch.int64)
        if order.shape != (num_logical,) or not torch.equal(order.sort().values, torch.arange(num_logical)):
            raise ValueError(f"order must be a permutation of range({num_logical}), got {order.tolist()}")
        weights = torch.empty_like(weights).scatter_(0, order, weights)
    return weights / weights.sum()


def zipf_topk_ids(
    num_tokens: int,
    top_k: int,
    num_logical: int,
    *,
    alpha: float = 1.2,
    order: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.int64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Zipf-skewed top-k routing: ``[num_tokens, top_k]`` ids, distinct in every row.

    Draws are made on ``device`` (default: the generator's, else CPU) with the
    Gumbel-top-k trick: perturbing log-probabilities with Gumbel noise and
    taking the top k samples k experts without replacement, in draw order.
    """
    _check_int("num_tokens", num_tokens, 0)
    _check_int("top_k", top_k, 1)
    if top_k > num_logical:
        raise ValueError(f"top_k={top_k} distinct experts cannot be drawn from num_logical={num_logical}")
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"dtype must be an integer dtype, got {dtype}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    log_p = zipf_popularity(num_logical, alpha=alpha, order=order).log().to(device, torch.float32)
    uniform = torch.rand((num_tokens, num_logical), device=device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
    return torch.topk(log_p + gumbel, top_k, dim=1).indices.to(dtype)


def _replicas(load: torch.Tensor, num_redundant: int) -> torch.Tensor:
    """Replica count per expert: each redundant slot to the largest load per replica."""
    replicas = torch.ones(load.shape[0], dtype=torch.int64)
    for _ in range(num_redundant):
        replicas[torch.argmax(load / replicas)] += 1
    return replicas


def eplb_placement(
    num_logical: int,
    num_redundant: int,
    ep_size: int,
    *,
    load: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    slots: int | None = None,
) -> Placement:
    """An EPLB placement of one layer (CPU tensors).

    Args:
        num_logical: logical experts; each gets at least one physical slot.
        num_redundant: extra physical slots; ``num_logical + num_redundant``
            must split evenly over ``ep_size`` ranks.
        load: ``[num_logical]`` non-negative load EPLB measured (e.g.
            :func:`zipf_popularity`, or token counts). Default: uniform random
            from ``generator``, so the hot experts are random.
        slots: columns of the map (default: the most replicas of any expert);
            columns past an expert's replicas hold -1.
    """
    num_physical = _num_physical(num_logical, num_redundant, ep_size)
    if load is None:
        load = torch.rand(num_logical, generator=generator, dtype=torch.float64)
    load = load.detach().to("cpu", torch.float64)
    if load.shape != (num_logical,) or not bool(torch.isfinite(load).all() and (load >= 0).all()):
        raise ValueError(f"load must be [num_logical={num_logical}] finite and >= 0, got {load.tolist()}")

    replicas = _replicas(load, num_redundant)
    max_replicas = int(replicas.max())
    if slots is None:
        slots = max_replicas
    elif not isinstance(slots, int) or isinstance(slots, bool) or slots < max_replicas:
        raise ValueError(f"slots must be an int >= {max_replicas}, the most replicas of any expert; got {slots!r}")
    num_local = num_physical // ep_size
    shares = sorted(
        ((float(load[e] / replicas[e]), e) for e in range(num_logical) for _ in range(int(replicas[e]))),
        reverse=True,
    )
    rank_load, rank_used, placed = [0.0] * ep_size, [0] * ep_size, [0] * num_logical
    l2p = torch.full((num_logical, slots), -1, dtype=torch.int64)
    p2l = torch.empty(num_physical, dtype=torch.int64)
    for share, expert in shares:
        rank = min((r for r in range(ep_size) if rank_used[r] < num_local), key=lambda r: rank_load[r])
        physical = rank * num_local + rank_used[rank]
        l2p[expert, placed[expert]] = physical
        p2l[physical] = expert
        rank_load[rank] += share
        rank_used[rank] += 1
        placed[expert] += 1
    return Placement(l2p, replicas, p2l, num_physical, num_local)


def _num_physical(num_logical: int, num_redundant: int, ep_size: int) -> int:
    """The physical expert count, after checking the shape splits over the EP ranks."""
    _check_int("num_logical", num_logical, 1)
    _check_int("num_redundant", num_redundant, 0)
    _check_int("ep_size", ep_size, 1)
    num_physical = num_logical + num_redundant
    if num_physical % ep_size:
        raise ValueError(f"{num_physical} physical experts do not split over ep_size={ep_size} ranks")
    return num_physical


def linear_placement(num_logical: int, num_redundant: int, ep_size: int) -> Placement:
    """vLLM's default placement before any rearrangement: slot s holds expert ``s % num_logical``."""
    num_physical = _num_physical(num_logical, num_redundant, ep_size)
    p2l = torch.arange(num_physical) % num_logical
    replicas = torch.bincount(p2l, minlength=num_logical)
    l2p = torch.full((num_logical, int(replicas.max())), -1, dtype=torch.int64)
    for expert in range(num_logical):
        slots = (p2l == expert).nonzero().flatten()
        l2p[expert, : slots.numel()] = slots
    return Placement(l2p, replicas, p2l, num_physical, num_physical // ep_size)
