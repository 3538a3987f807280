"""The two load lowerings side by side on a real expert-parallel process group.

Each rank routes its own tokens (Zipf-skewed), maps them to physical experts
with replicas, and records the load twice:

- topk path: ``map_and_record`` over the rank's own tokens, all physical experts;
- count path: ``map_only``, a real ``all_to_all_single`` dispatch to the owning
  ranks, ``expert_num_tokens`` derived from what arrived, then
  ``record_counts`` into the rank's own slice.

After the EP all-reduce both must give the same ``[layers, physical]`` load.
The same code runs on gloo (CPU, the tests) and NCCL (CUDA,
``tests/device/nccl_equivalence.py``). Routing is drawn on the CPU from seeds
keyed by (rank, step), so every backend and the reference see the same tokens.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from eplb_compile.metrics import balancedness, imbalance_max_over_mean
from eplb_compile.ops import map_and_record, map_only, record_counts
from eplb_compile.reference import map_and_record_reference
from eplb_compile.workloads import Placement, eplb_placement, zipf_topk_ids


@dataclass(frozen=True)
class SimConfig:
    num_layers: int = 3
    num_logical: int = 12
    num_redundant: int = 4  # num_logical + num_redundant must split over the EP size
    top_k: int = 4
    max_tokens: int = 48  # tokens per rank per step, drawn from [max_tokens // 2, max_tokens]
    steps: int = 12
    window_size: int = 4
    gate_off_steps: tuple[int, ...] = (2, 3, 9)  # record gate off, as outside vLLM's recording window
    zipf_exponent: float = 1.2
    seed: int = 0

    @property
    def num_physical(self) -> int:
        return self.num_logical + self.num_redundant


# The run behind the example figures in graphs/ (``eplb-compile examples``).
EXAMPLE_CONFIG = SimConfig(steps=40, gate_off_steps=tuple(range(10, 14)), max_tokens=256, window_size=8)


def example_title(cfg: SimConfig, ranks: int) -> str:
    """The title of ``eplb-compile examples``' imbalance figure."""
    gate_off = f"{min(cfg.gate_off_steps)}-{max(cfg.gate_off_steps)}"
    return f"Window imbalance per layer, {ranks} gloo ranks (record gate off at steps {gate_off})"


def _generator(cfg: SimConfig, *key) -> torch.Generator:
    # A hash of the key, not seed + rank + step, so nearby keys share no stream.
    digest = hashlib.sha256(repr((cfg.seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _popularity_order(cfg: SimConfig, layer: int) -> torch.Tensor:
    """Logical experts of one layer, hottest first (each layer has its own hot set)."""
    return torch.randperm(cfg.num_logical, generator=_generator(cfg, "popularity", layer))


def _route_layer(cfg: SimConfig, layer: int, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    return zipf_topk_ids(num_tokens, cfg.top_k, cfg.num_logical, alpha=cfg.zipf_exponent,
                         order=_popularity_order(cfg, layer), generator=generator, dtype=torch.int32)


def placement(cfg: SimConfig, layer: int, ep_size: int) -> Placement:
    """EPLB's placement of one layer over ``ep_size`` ranks, from the load it measured.

    The load is a routed sample, not the Zipf weights: with k of few experts
    drawn without replacement, the hottest expert's share saturates.
    """
    sample = _route_layer(cfg, layer, 4096, _generator(cfg, "placement", layer))
    load = torch.bincount(sample.reshape(-1).long(), minlength=cfg.num_logical)
    return eplb_placement(cfg.num_logical, cfg.num_redundant, ep_size, load=load)


def route_step(cfg: SimConfig, rank: int, step: int) -> tuple[torch.Tensor, int]:
    """One forward of one rank: ``(topk_ids [layers, T, k] int32, num_unpadded_tokens)``.

    Rows at or past ``num_unpadded_tokens`` are padding (as vLLM pads to a
    CUDA-graph size); they still hold valid-looking ids, so only the padding
    handling keeps them out of the load.
    """
    g = _generator(cfg, "route", rank, step)
    num_tokens = int(torch.randint(cfg.max_tokens // 2, cfg.max_tokens + 1, (), generator=g))
    num_unpadded = num_tokens - int(torch.randint(0, num_tokens // 4 + 1, (), generator=g))
    return torch.stack([_route_layer(cfg, layer, num_tokens, g) for layer in range(cfg.num_layers)]), num_unpadded


def dispatch_and_count(physical: torch.Tensor, num_local: int, group=None) -> torch.Tensor:
    """Send each (token, expert) pair to the rank owning the expert; count arrivals.

    Returns ``expert_num_tokens``: int32 ``[num_local]``, what a dispatch backend
    (DeepEP low-latency, Mori, ...) reports for this rank's local experts.
    The payload is the physical id alone: counting needs nothing else.
    """
    rank, ep_size = dist.get_rank(group), dist.get_world_size(group)
    flat = physical.reshape(-1).to(torch.int64)
    # -1 (invalid or padding) is never dispatched, as DeepEP skips id -1.
    flat = flat[flat >= 0]
    owner = flat // num_local  # linear placement: rank r owns [r*L, (r+1)*L)
    send = flat[torch.argsort(owner, stable=True)]
    send_counts = torch.bincount(owner, minlength=ep_size)
    # Split sizes first, as a real dispatch does, then the variable-size payload.
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv = send.new_empty(int(recv_counts.sum()))
    dist.all_to_all_single(
        recv, send, output_split_sizes=recv_counts.tolist(), input_split_sizes=send_counts.tolist(), group=group
    )
    local = recv - rank * num_local
    if local.numel() and not bool(((local >= 0) & (local < num_local)).all()):
        raise AssertionError(f"rank {rank} received experts it does not own: {recv.tolist()}")
    return torch.bincount(local, minlength=num_local).to(torch.int32)


def run_rank(cfg: SimConfig, device: torch.device, group=None) -> dict[str, torch.Tensor]:
    """Run the simulation on this rank; return the global (all-reduced) loads.

    Keys ``{topk,counts}_passes`` hold each step's all-reduced pass and
    ``{topk,counts}_windows`` the all-reduced window total after each step,
    all int64 ``[steps, layers, physical]`` on the CPU.
    """
    rank, ep_size = dist.get_rank(group), dist.get_world_size(group)
    if cfg.num_physical % ep_size:
        raise ValueError(f"{cfg.num_physical} physical experts do not split over {ep_size} ranks")
    num_local = cfg.num_physical // ep_size
    shape = (cfg.num_layers, cfg.num_physical)
    maps = [
        (p.logical_to_physical_map.to(device), p.logical_replica_count.to(device))
        for p in (placement(cfg, layer, ep_size) for layer in range(cfg.num_layers))
    ]
    passes = {name: torch.zeros(shape, dtype=torch.int32, device=device) for name in ("topk", "counts")}
    windows = {name: torch.zeros((cfg.window_size, *shape), dtype=torch.int32, device=device) for name in passes}
    # One device flag, flipped in place, like vLLM's should_record_tensor.
    record_enabled = torch.zeros((), dtype=torch.bool, device=device)
    out: dict[str, list[torch.Tensor]] = {f"{n}_{kind}": [] for n in passes for kind in ("passes", "windows")}

    for step in range(cfg.steps):
        record_enabled.fill_(step not in cfg.gate_off_steps)
        topk_ids, num_unpadded = route_step(cfg, rank, step)
        topk_ids = topk_ids.to(device)
        num_unpadded_tokens = torch.tensor(num_unpadded, dtype=torch.int32, device=device)
        is_padding = torch.arange(topk_ids.shape[1], device=device) >= num_unpadded_tokens
        for layer, (l2p, replica_count) in enumerate(maps):
            ids = topk_ids[layer]
            mapped = map_and_record(ids, l2p, replica_count, passes["topk"][layer], record_enabled, num_unpadded_tokens)
            physical = map_only(ids, l2p, replica_count)
            if not torch.equal(mapped, physical):
                raise AssertionError(f"rank {rank} step {step} layer {layer}: map_only != map_and_record ids")
            # Padded rows get id -1 and are never dispatched, as vLLM's
            # DeepGEMM mega-MoE path does (torch.where(is_padding, -1, topk_ids)),
            # so the backend's counts exclude them.
            physical = torch.where(is_padding[:, None], -1, physical)
            expert_num_tokens = dispatch_and_count(physical, num_local, group)
            record_counts(passes["counts"][layer], expert_num_tokens, rank * num_local, record_enabled)
        for name, load_pass in passes.items():
            global_pass = load_pass.to(torch.int64)
            dist.all_reduce(global_pass, group=group)
            # Slot step % W takes the pass, then the pass is zeroed, every step,
            # so the window is exactly the last W steps (a gate-off step adds a
            # zero pass). vLLM's EplbState.step copies and advances only on
            # recorded steps; that changes which steps a slot holds, not the
            # counting that is compared here.
            windows[name][step % cfg.window_size].copy_(load_pass)
            load_pass.zero_()
            global_window = windows[name].sum(dim=0, dtype=torch.int64)
            dist.all_reduce(global_window, group=group)
            out[f"{name}_passes"].append(global_pass.cpu())
            out[f"{name}_windows"].append(global_window.cpu())
    return {key: torch.stack(values) for key, values in out.items()}


def reference_passes(cfg: SimConfig, ep_size: int) -> torch.Tensor:
    """Global per-step load from the element-wise reference: int64 ``[steps, layers, P]``.

    Counts every unpadded (token, k) of every rank while the gate is on,
    sharing no code with the operators or the dispatch.
    """
    out = torch.zeros((cfg.steps, cfg.num_layers, cfg.num_physical), dtype=torch.int64)
    maps = [placement(cfg, layer, ep_size) for layer in range(cfg.num_layers)]
    empty = torch.zeros(cfg.num_physical, dtype=torch.int32)
    for step in range(cfg.steps):
        if step in cfg.gate_off_steps:
            continue
        for rank in range(ep_size):
            topk_ids, num_unpadded = route_step(cfg, rank, step)
            for layer, p in enumerate(maps):
                _, load = map_and_record_reference(
                    topk_ids[layer], p.logical_to_physical_map, p.logical_replica_count, empty, True, num_unpadded
                )
                out[step, layer] += load.to(torch.int64)
    return out


def reference_windows(passes: torch.Tensor, window_size: int) -> torch.Tensor:
    """Window total after each step: the sum of the last ``window_size`` passes."""
    return torch.stack([passes[max(0, s - window_size + 1) : s + 1].sum(dim=0) for s in range(passes.shape[0])])


def verify(cfg: SimConfig, ep_size: int, results: list[dict[str, torch.Tensor]]) -> list[str]:
    """Failures (empty when all holds) of the equivalence proof over all ranks' results."""
    failures = []
    expected_passes = reference_passes(cfg, ep_size)
    expected = {"passes": expected_passes, "windows": reference_windows(expected_passes, cfg.window_size)}
    for rank, result in enumerate(results):
        for kind in ("passes", "windows"):
            topk, counts = result[f"topk_{kind}"], result[f"counts_{kind}"]
            if not torch.equal(topk, counts):
                failures.append(f"rank {rank}: topk and count {kind} differ at steps "
                                f"{sorted(set((topk != counts).nonzero()[:, 0].tolist()))}")
            if not torch.equal(topk, expected[kind]):
                failures.append(f"rank {rank}: topk {kind} differ from the reference")
        for step in range(cfg.steps):
            window = result["counts_windows"][step], result["topk_windows"][step]
            if balancedness(window[0], ep_size) != balancedness(window[1], ep_size) or not torch.equal(
                imbalance_max_over_mean(window[0], ep_size), imbalance_max_over_mean(window[1], ep_size)
            ):
                failures.append(f"rank {rank} step {step}: metrics differ")
    return failures


def _spawn_entry(rank: int, world_size: int, cfg: SimConfig, backend: str, workdir: str) -> None:
    # Two cores run up to four ranks: one intra-op thread each avoids thrashing.
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    # A FileStore needs no free TCP port, so parallel CI jobs cannot collide.
    store = dist.FileStore(os.path.join(workdir, "store"), world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.save(run_rank(cfg, device), os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_spawned(cfg: SimConfig, world_size: int, backend: str = "gloo") -> list[dict[str, torch.Tensor]]:
    """Run :func:`run_rank` on ``world_size`` spawned processes; return each rank's result.

    If a rank fails, ``torch.multiprocessing`` stops the others and raises,
    and the 60 s collective timeout bounds any hang.
    """
    import torch.multiprocessing as mp

    if cfg.num_physical % world_size:
        raise ValueError(f"{cfg.num_physical} physical experts do not split over {world_size} ranks")
    # A forkserver imports torch once and forks every rank from it: fresh
    # processes like spawn's (no inherited threads or CUDA state), without
    # paying torch's import per rank, which dominates on a 2-core CI box.
    mp.set_forkserver_preload(["eplb_compile.ep_simulation"])
    with tempfile.TemporaryDirectory(prefix="eplb_sim_") as workdir:
        mp.start_processes(
            _spawn_entry, args=(world_size, cfg, backend, workdir), nprocs=world_size, start_method="forkserver"
        )
        return [torch.load(os.path.join(workdir, f"rank{r}.pt")) for r in range(world_size)]

