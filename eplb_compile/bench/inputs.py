"""The bench's inputs: per-layer placements and routing, and the checked cases.

Conditions: ``num_logical + num_redundant`` physical experts over ``ep_size``
ranks, top-k Zipf routing whose hot experts differ per layer, and per layer an
EPLB placement built from the load EPLB would have measured on that routing.
Each of the ``layers`` MoE layers gets its own ids, map, replica counts and
load, so a CUDA graph of all layers never re-reads one layer's cache lines.
Generators come from ``eplb_compile.workloads`` (shared with the demo and the
tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb_compile.reference import expected_map_and_record
from eplb_compile.workloads import eplb_placement, zipf_topk_ids

# Written into every output buffer before a checked call: fits every id dtype
# and is never a right answer (ids come back as -1 or a map entry >= 0).
POISON = -77
# Tokens EPLB "measured" per layer to build its placement.
PLACEMENT_SAMPLE_TOKENS = 4096


@dataclass
class Setup:
    """What every token count shares: per-layer maps, counts, gate, floor cells."""

    layers: int
    k: int
    num_logical: int
    num_physical: int
    num_local: int
    start: int  # first physical expert of the rank whose counts are recorded
    zipf: float
    orders: list[torch.Tensor]  # per layer: experts, hottest first (CPU)
    l2p: torch.Tensor  # [layers, logical, slots] int64
    replica_count: torch.Tensor  # [layers, logical] int64
    counts: torch.Tensor  # [layers, local] int32, the backend's per-expert counts
    gate: torch.Tensor  # bool scalar, on
    floor_cells: torch.Tensor  # [layers, 1] int32, for the one-kernel floor


@dataclass
class Workload:
    tokens: int
    ids: torch.Tensor  # [layers, T, k]
    outs: torch.Tensor  # [layers, T, k], for the launchers that take an output
    loads: torch.Tensor  # [layers, P] int32
    unpadded: torch.Tensor  # int32 scalar = T: every token recorded


@dataclass
class Expected:
    """One checked call: its inputs and the reference's answer (CPU)."""

    layer: int
    record: bool
    num_unpadded: int | None
    initial_load: torch.Tensor  # on the device
    mapped: torch.Tensor  # the physical ids map_and_record returns (every row mapped)
    load: torch.Tensor  # after map_and_record


def build_setup(args, device: torch.device) -> Setup:
    num_physical = args.num_logical + args.num_redundant
    if num_physical % args.ep_size:
        raise ValueError(f"{num_physical} physical experts do not split over --ep-size {args.ep_size} ranks")
    num_local = num_physical // args.ep_size
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cpu_generator = torch.Generator().manual_seed(args.seed)
    orders, l2ps, replica_counts = [], [], []
    for _ in range(args.layers):
        # Expert e has popularity rank perm[e]: the hottest expert is perm.argsort()[0].
        order = torch.randperm(args.num_logical, generator=cpu_generator).argsort()
        sample = zipf_topk_ids(PLACEMENT_SAMPLE_TOKENS, args.top_k, args.num_logical, alpha=args.zipf,
                               order=order, generator=generator)
        load = torch.bincount(sample.reshape(-1).cpu(), minlength=args.num_logical).double()
        placement = eplb_placement(args.num_logical, args.num_redundant, args.ep_size, load=load,
                                   slots=args.map_slots)
        orders.append(order)
        l2ps.append(placement.logical_to_physical_map)
        replica_counts.append(placement.logical_replica_count)
    return Setup(
        layers=args.layers,
        k=args.top_k,
        num_logical=args.num_logical,
        num_physical=num_physical,
        num_local=num_local,
        start=min(3, args.ep_size - 1) * num_local,  # a middle rank: a non-zero offset
        zipf=args.zipf,
        orders=orders,
        l2p=torch.stack(l2ps).to(device),
        replica_count=torch.stack(replica_counts).to(device),
        counts=torch.randint(0, 4096, (args.layers, num_local), generator=cpu_generator, dtype=torch.int32).to(device),
        gate=torch.tensor(True, device=device),
        floor_cells=torch.zeros(args.layers, 1, dtype=torch.int32, device=device),
    )


def build_workload(setup: Setup, tokens: int, id_dtype: torch.dtype, seed: int) -> Workload:
    device = setup.l2p.device
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + tokens)
    ids = torch.stack([
        zipf_topk_ids(tokens, setup.k, setup.num_logical, alpha=setup.zipf, order=order, generator=generator,
                      dtype=id_dtype, device=device)
        for order in setup.orders
    ])
    return Workload(
        tokens=tokens,
        ids=ids,
        outs=torch.full_like(ids, POISON),
        loads=torch.zeros(setup.layers, setup.num_physical, dtype=torch.int32, device=device),
        unpadded=torch.tensor(tokens, dtype=torch.int32, device=device),
    )


def expectations(setup: Setup, work: Workload) -> list[Expected]:
    """Gate on, gate off, no padding tensor, half padded; on layers 0 and 1."""
    configs = [(True, work.tokens), (False, work.tokens), (True, None)]
    if work.tokens > 1:
        configs.append((True, work.tokens // 2))
    generator = torch.Generator().manual_seed(work.tokens)
    result = []
    for layer in range(min(2, setup.layers)):
        initial = torch.randint(0, 100, (setup.num_physical,), dtype=torch.int32, generator=generator)
        ids, l2p, rc = work.ids[layer], setup.l2p[layer], setup.replica_count[layer]
        for record, num_unpadded in configs:
            mapped, load = expected_map_and_record(ids, l2p, rc, initial, record, num_unpadded)
            result.append(Expected(layer, record, num_unpadded, initial.to(ids.device), mapped, load))
    return result


def padded(mapped: torch.Tensor, num_unpadded: int | None) -> torch.Tensor:
    """map_only's answer with padding: the rows at or past ``num_unpadded`` are -1."""
    if num_unpadded is None:
        return mapped
    result = mapped.clone()
    result[num_unpadded:] = -1
    return result
