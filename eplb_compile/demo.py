"""A toy MoE block over a simulated EP group, recorded through both lowerings.

Every rank's tokens go through ``ep_size`` copies of the routing, as the ranks
of a real EP group would; the "all-reduce" is a sum over the rank axis of the
load pass. The topk path counts each rank's own tokens over all physical
experts; the count path maps only, then adds the per-local-expert counts that a
dispatch backend such as DeepEP low-latency would return. It runs a little
past 300 lines: the simulated group, its check against the reference and the
report it prints stay together, as the one story the main job tells.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from eplb_compile import metrics
from eplb_compile.ops import map_and_record, map_only, record_counts
from eplb_compile.reference import map_and_record_reference
from eplb_compile.selection import Lowering, select_lowering
from eplb_compile.workloads import eplb_placement, linear_placement, zipf_popularity

# Even layers use a backend with exact counts, odd ones one without, so the
# demo shows the selector taking both branches.
BACKENDS = ("deepep_ll", "allgather")


@dataclass
class DemoConfig:
    layers: int = 4
    ep_size: int = 4
    num_logical: int = 16
    num_redundant: int = 4
    top_k: int = 2
    hidden: int = 32
    tokens_per_rank: int = 512
    steps: int = 8
    zipf_s: float = 1.2
    seed: int = 0
    device: str = "cpu"
    count_path_min_tokens: int | None = None
    placement: str = "eplb"  # "eplb": EPLB's from the routing prior; "linear": vLLM's before any rearrangement

    def __post_init__(self) -> None:
        for name in ("layers", "ep_size", "num_logical", "top_k", "hidden", "tokens_per_rank", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be an int >= 1, got {value!r}")
        if self.num_redundant < 0 or self.top_k > self.num_logical:
            raise ValueError(f"DemoConfig needs num_redundant >= 0 and top_k <= num_logical, got {self}")
        if self.num_physical % self.ep_size:
            raise ValueError(f"DemoConfig.ep_size={self.ep_size} must divide the {self.num_physical} physical experts")
        if self.placement not in ("eplb", "linear"):
            raise ValueError(f"DemoConfig.placement must be 'eplb' or 'linear', got {self.placement!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"DemoConfig.device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def num_physical(self) -> int:
        return self.num_logical + self.num_redundant

    @property
    def num_local(self) -> int:
        return self.num_physical // self.ep_size


class ToyMoELayer(nn.Module):
    """One MoE layer over a simulated EP group, recording through both lowerings.

    Both lowerings sit in one compiled graph, so they see the very same
    routing: ``load_pass_topk`` is filled by ``map_and_record``,
    ``load_pass_counts`` by ``map_only`` plus the dispatched counts. Rows are
    EP ranks: ``[ep_size, num_physical]``, summed over ranks by the "all-reduce".
    """

    def __init__(self, cfg: DemoConfig, g: torch.Generator):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Parameter(torch.randn(cfg.hidden, cfg.num_logical, generator=g) * 0.3)
        self.expert_scale = nn.Parameter(torch.randn(cfg.num_physical, generator=g))
        self.mix = nn.Parameter(torch.randn(cfg.hidden, cfg.hidden, generator=g) / math.sqrt(cfg.hidden))
        # A Zipf prior over logical experts, hot set shuffled per layer, skews
        # the routing; EPLB's placement replicates the experts it makes hot.
        prior = zipf_popularity(cfg.num_logical, alpha=cfg.zipf_s, order=torch.randperm(cfg.num_logical, generator=g))
        self.register_buffer("router_bias", prior.log().float())
        if cfg.placement == "linear":
            placement = linear_placement(cfg.num_logical, cfg.num_redundant, cfg.ep_size)
        else:
            placement = eplb_placement(cfg.num_logical, cfg.num_redundant, cfg.ep_size, load=prior)
        self.register_buffer("logical_to_physical_map", placement.logical_to_physical_map)
        self.register_buffer("logical_replica_count", placement.logical_replica_count)
        self.register_buffer("physical_to_logical_map", placement.physical_to_logical_map)
        # Buffers, not inputs: cudagraph trees treat them as static addresses.
        for lowering in Lowering:
            self.register_buffer(
                f"load_pass_{lowering.value}",
                torch.zeros(cfg.ep_size, cfg.num_physical, dtype=torch.int32),
            )

    def forward(
        self, x: torch.Tensor, record_enabled: torch.Tensor, num_unpadded_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[ep_size, tokens_per_rank, hidden]``, one slice per rank.

        Returns the layer output and the routed logical ids ``[ep_size, tokens_per_rank, top_k]``.
        """
        cfg = self.cfg
        logits = x @ self.router + self.router_bias
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), cfg.top_k, dim=-1)
        l2p, replica_count = self.logical_to_physical_map, self.logical_replica_count
        physical, mapped_only = [], []
        for rank in range(cfg.ep_size):
            physical.append(
                map_and_record(
                    ids[rank], l2p, replica_count, self.load_pass_topk[rank],
                    record_enabled, num_unpadded_tokens[rank],
                )
            )
            mapped_only.append(map_only(ids[rank], l2p, replica_count))
        self._record_dispatched_counts(mapped_only, record_enabled, num_unpadded_tokens)
        phys = torch.stack(physical)
        scale = (weights * self.expert_scale[phys.clamp_min(0)]).sum(-1, keepdim=True)
        return x + scale * torch.tanh(x @ self.mix), ids

    def _record_dispatched_counts(
        self, physical: list[torch.Tensor], record_enabled: torch.Tensor, num_unpadded_tokens: torch.Tensor
    ) -> None:
        """What a dispatch backend does: count, per local expert, what each rank receives.

        Padded rows are never dispatched (their ids are dropped), which is how
        they stay out of the backend's counts.
        """
        cfg = self.cfg
        rows = torch.arange(cfg.tokens_per_rank, device=physical[0].device)
        dispatched = torch.cat(
            [
                torch.where((rows < num_unpadded_tokens[rank]).unsqueeze(-1), phys, -1).reshape(-1)
                for rank, phys in enumerate(physical)
            ]
        )
        valid = dispatched >= 0
        received = torch.zeros(cfg.num_physical, dtype=torch.int32, device=dispatched.device)
        received.scatter_add_(0, torch.where(valid, dispatched, 0), valid.to(torch.int32))
        for rank in range(cfg.ep_size):
            start = rank * cfg.num_local
            record_counts(self.load_pass_counts[rank], received[start : start + cfg.num_local], start, record_enabled)


class ToyMoEBlock(nn.Module):
    """``layers`` identical-shaped MoE layers; compiled per layer, one compile reused."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.layers = nn.ModuleList(ToyMoELayer(cfg, g) for _ in range(cfg.layers))
        self.register_buffer("record_enabled", torch.ones((), dtype=torch.bool))
        self.register_buffer("num_unpadded_tokens", torch.full((cfg.ep_size,), cfg.tokens_per_rank, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the routed ids ``[layers, ep_size, tokens, top_k]``."""
        routed = []
        for layer in self.layers:
            x, ids = layer(x, self.record_enabled, self.num_unpadded_tokens)
            routed.append(ids)
        return x, torch.stack(routed)

    def load_pass(self, lowering: Lowering) -> torch.Tensor:
        """``[layers, ep_size, num_physical]`` as recorded through ``lowering``."""
        return torch.stack([getattr(layer, f"load_pass_{lowering.value}") for layer in self.layers])

    def zero_load_pass(self) -> None:
        for layer in self.layers:
            layer.load_pass_topk.zero_()
            layer.load_pass_counts.zero_()


def choose_lowerings(cfg: DemoConfig) -> list[tuple[str, Lowering, str]]:
    """(backend, lowering, reason) per layer, from the selector."""
    choices = []
    for layer in range(cfg.layers):
        backend = BACKENDS[layer % len(BACKENDS)]
        # Chosen before dispatch: what matters is whether the backend will count.
        choice = select_lowering(
            backend == "deepep_ll", cfg.tokens_per_rank, min_tokens=cfg.count_path_min_tokens,
            device=torch.device(cfg.device),
        )
        choices.append((backend, choice.lowering, choice.reason))
    return choices


@dataclass
class DemoResult:
    choices: list[tuple[str, Lowering, str]]
    loads: dict[str, torch.Tensor]  # lowering set -> [steps, layers, physical] global loads
    reference: torch.Tensor  # [steps, layers, physical], counted independently
    gate: list[bool]
    compile_seconds: float
    run_seconds: float
    rank_loads: torch.Tensor  # [steps, layers, ep_size, physical]: each rank's pass, topk lowering
    physical_to_logical: torch.Tensor  # [layers, physical]: the placement the block routes by


def run_demo(cfg: DemoConfig, *, compile: bool = True) -> DemoResult:
    torch.manual_seed(cfg.seed)
    model = ToyMoEBlock(cfg).to(cfg.device)
    if compile:
        # Regional compilation: the layers share code and shapes, so Dynamo
        # compiles the first and reuses it for the rest.
        for layer in model.layers:
            layer.compile(fullgraph=True)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    loads = {lowering.value: [] for lowering in Lowering}
    reference, gate, rank_loads = [], [], []
    compile_seconds = run_seconds = 0.0
    for step in range(cfg.steps):
        x = torch.randn(cfg.ep_size, cfg.tokens_per_rank, cfg.hidden, generator=g).to(cfg.device)
        record = step % 4 != 3  # the gate is off one step in four
        padding = torch.randint(0, cfg.tokens_per_rank // 8 + 1, (cfg.ep_size,), generator=g)
        unpadded = (cfg.tokens_per_rank - padding).to(torch.int32)
        gate.append(record)
        model.zero_load_pass()
        model.record_enabled.fill_(record)
        model.num_unpadded_tokens.copy_(unpadded)
        t0 = time.perf_counter()
        with torch.no_grad():
            _, logical_ids = model(x)
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if step == 0:
            compile_seconds = elapsed
        else:
            run_seconds += elapsed
        for name in loads:
            # Summing the rank axis is the EP all-reduce.
            loads[name].append(model.load_pass(Lowering(name)).sum(dim=1).cpu())
        rank_loads.append(model.load_pass(Lowering.TOPK).cpu())
        reference.append(_reference_load(model, logical_ids, unpadded, record))
    return DemoResult(
        choose_lowerings(cfg),
        {name: torch.stack(v) for name, v in loads.items()},
        torch.stack(reference),
        gate,
        compile_seconds,
        run_seconds,
        torch.stack(rank_loads),
        torch.stack([layer.physical_to_logical_map.cpu() for layer in model.layers]),
    )


def _reference_load(
    model: ToyMoEBlock, logical_ids: torch.Tensor, unpadded: torch.Tensor, record: bool
) -> torch.Tensor:
    """Global load from the routed logical ids, counted by the element-wise reference."""
    cfg = model.cfg
    load = torch.zeros(cfg.layers, cfg.num_physical, dtype=torch.int32)
    for layer in range(cfg.layers):
        for rank in range(cfg.ep_size):
            ids = logical_ids[layer, rank].cpu()
            _, load[layer] = map_and_record_reference(
                ids,
                model.layers[layer].logical_to_physical_map.cpu(),
                model.layers[layer].logical_replica_count.cpu(),
                load[layer],
                record,
                int(unpadded[rank]),
            )
    return load


def format_report(cfg: DemoConfig, result: DemoResult) -> str:
    totals = result.loads[Lowering.TOPK.value].sum(dim=0)  # [layers, physical]
    imbalance = metrics.imbalance_max_over_mean(totals, cfg.ep_size)
    lines = [
        f"EP group: {cfg.ep_size} ranks x {cfg.num_local} local experts "
        f"({cfg.num_logical} logical + {cfg.num_redundant} redundant), top-{cfg.top_k}, "
        f"{cfg.tokens_per_rank} tokens/rank, {cfg.steps} steps (gate off in steps "
        f"{[s for s, g in enumerate(result.gate) if not g]}), device {cfg.device}",
        "",
        f"{'layer':>5}  {'backend':<10} {'lowering':<8} {'tokens':>8} {'imbalance':>9}  reason",
    ]
    for layer, (backend, lowering, reason) in enumerate(result.choices):
        tokens = int(totals[layer].sum()) // cfg.top_k
        lines.append(
            f"{layer:>5}  {backend:<10} {lowering.value:<8} {tokens:>8} {float(imbalance[layer]):>9.3f}  {reason}"
        )
    lines.append("")
    lines.append(
        f"balancedness (vLLM): {metrics.balancedness(totals, cfg.ep_size):.4f}; "
        f"compile {result.compile_seconds:.1f}s, steady steps {result.run_seconds:.2f}s"
    )
    return "\n".join(lines)


def lowering_mismatches(result: DemoResult) -> list[str]:
    """Mismatches between the lowerings and the independent reference (empty: all equal)."""
    problems = []
    for name, loads in result.loads.items():
        for step in range(loads.shape[0]):
            if not torch.equal(loads[step], result.reference[step]):
                diff = int((loads[step] - result.reference[step]).abs().sum())
                problems.append(f"{name}: step {step} differs from the reference by {diff} counts")
    return problems
