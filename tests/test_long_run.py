"""10 000 engine steps of EPLB bookkeeping, eagerly and as CUDA-graph replays.

Each step records one forward pass into ``pass`` with both lowerings (topk:
map_and_record; counts: map_only, a simulated backend's expert_num_tokens,
then record_counts per EP rank), copies the pass into the window slot picked by
a device-side index, zeroes the pass, and moves the slot on. The record gate
(a device bool) follows a pattern plus random flips. The window total must
equal, exactly, the tokens routed while the gate was on in the last W steps,
and what was evicted from the window plus the window must equal all of them:
nothing lost, nothing counted twice. The expectation is built independently on
the CPU, from the element-wise reference and ``scatter_add`` over all steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import eplb_compile
from eplb_compile.reference import map_to_physical_reference

from tests.cases import requires_cuda

STEPS = 10_000
WINDOW = 7  # does not divide STEPS: the slot index wraps mid-run
LOWERINGS = ("topk", "counts")


@dataclass(frozen=True)
class Shape:
    layers: int
    tokens: int
    top_k: int
    num_logical: int
    replicas: int  # redundant experts on top of num_logical
    ranks: int

    @property
    def num_physical(self) -> int:
        return self.num_logical + self.replicas


CPU_SHAPE = Shape(layers=2, tokens=8, top_k=3, num_logical=6, replicas=2, ranks=2)
CUDA_SHAPE = Shape(layers=4, tokens=96, top_k=8, num_logical=28, replicas=4, ranks=4)


def placement(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A map with replicas and -1 padding: logical e lives at physical e, and
    the first ``replicas`` experts also at num_logical + e."""
    l2p = torch.full((shape.num_logical, 2), -1, dtype=torch.int64)
    l2p[:, 0] = torch.arange(shape.num_logical)
    l2p[: shape.replicas, 1] = shape.num_logical + torch.arange(shape.replicas)
    replica_count = (l2p >= 0).sum(dim=1)
    return l2p, replica_count


@dataclass
class Routing:
    ids: torch.Tensor  # [steps, layers, T, k] int32, with invalid ids
    num_unpadded: torch.Tensor  # [steps] int32
    gates: torch.Tensor  # [steps] bool


def make_routing(shape: Shape, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    # -1 and num_logical are invalid ids: they must never be counted.
    ids = torch.randint(
        -1, shape.num_logical + 1, (STEPS, shape.layers, shape.tokens, shape.top_k), generator=g, dtype=torch.int32
    )
    num_unpadded = torch.randint(0, shape.tokens + 1, (STEPS,), generator=g, dtype=torch.int32)
    pattern = torch.arange(STEPS) % 13 < 9
    flips = torch.rand(STEPS, generator=g) < 0.1
    return Routing(ids, num_unpadded, pattern ^ flips)


def expected_step_loads(shape: Shape, routing: Routing) -> torch.Tensor:
    """int64 ``[steps, layers, P]``: what each step must add to the window."""
    l2p, replica_count = placement(shape)
    # The replica depends only on the token's index, so one reference call per
    # logical expert gives the whole (token, expert) -> physical table.
    table = torch.full((shape.tokens, shape.num_logical + 2), -1, dtype=torch.int64)
    for expert in range(shape.num_logical):
        same_expert = torch.full((shape.tokens, shape.top_k), expert, dtype=torch.int32)
        physical = map_to_physical_reference(same_expert, l2p, replica_count)
        table[:, expert] = torch.tensor(physical[:: shape.top_k])
    token = torch.arange(shape.tokens).view(1, 1, -1, 1)
    column = torch.where(routing.ids < 0, shape.num_logical + 1, routing.ids).long()  # -1 -> an invalid column
    physical = table[token, column]
    counted = (
        (physical >= 0)
        & (token < routing.num_unpadded.view(-1, 1, 1, 1))
        & routing.gates.view(-1, 1, 1, 1)
    )
    bins = torch.where(counted, physical, shape.num_physical).reshape(STEPS, shape.layers, -1)
    loads = torch.zeros((STEPS, shape.layers, shape.num_physical + 1), dtype=torch.int64)
    loads.scatter_add_(2, bins, torch.ones_like(bins))
    return loads[..., :-1]


class Recorder:
    """vLLM's per-step EPLB bookkeeping, for both lowerings, on one device."""

    def __init__(self, shape: Shape, device: str):
        self.shape = shape
        self.l2p, self.replica_count = (t.to(device) for t in placement(shape))
        layers, physical = shape.layers, shape.num_physical
        # Static inputs, refreshed before every step (the graph reads them).
        self.ids = torch.zeros((layers, shape.tokens, shape.top_k), dtype=torch.int32, device=device)
        self.num_unpadded = torch.zeros((), dtype=torch.int32, device=device)
        self.gate = torch.zeros((), dtype=torch.bool, device=device)
        self.passes = {n: torch.zeros((layers, physical), dtype=torch.int32, device=device) for n in LOWERINGS}
        self.windows = {n: torch.zeros((WINDOW, layers, physical), dtype=torch.int32, device=device) for n in LOWERINGS}
        self.evicted = {n: torch.zeros((layers, physical), dtype=torch.int64, device=device) for n in LOWERINGS}
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)

    def set_inputs(self, ids: torch.Tensor, num_unpadded: torch.Tensor, gate: torch.Tensor) -> None:
        self.ids.copy_(ids, non_blocking=True)
        self.num_unpadded.copy_(num_unpadded, non_blocking=True)
        self.gate.copy_(gate, non_blocking=True)

    def backend_counts(self, physical: torch.Tensor) -> torch.Tensor:
        """What a dispatch backend reports: unpadded tokens per physical expert."""
        k, num_physical = self.shape.top_k, self.shape.num_physical
        flat = physical.reshape(-1).long()
        position = torch.arange(flat.shape[0], device=flat.device)
        sent = (flat >= 0) & (flat < num_physical) & (position < self.num_unpadded.long() * k)
        # Graph-safe histogram: unsent slots go to an extra bin.
        counts = torch.zeros(num_physical + 1, dtype=torch.int32, device=flat.device)
        counts.index_add_(0, torch.where(sent, flat, num_physical), torch.ones_like(flat, dtype=torch.int32))
        return counts[:-1]

    def forward(self) -> None:
        local = self.shape.num_physical // self.shape.ranks
        for layer in range(self.shape.layers):
            ids = self.ids[layer]
            eplb_compile.map_and_record(
                ids, self.l2p, self.replica_count, self.passes["topk"][layer], self.gate, self.num_unpadded
            )
            counts = self.backend_counts(eplb_compile.map_only(ids, self.l2p, self.replica_count))
            for rank in range(self.shape.ranks):  # each rank adds its local experts' counts
                start = rank * local
                eplb_compile.record_counts(
                    self.passes["counts"][layer], counts[start : start + local], start, self.gate
                )

    def end_step(self) -> None:
        for name in LOWERINGS:
            self.evicted[name] += self.windows[name].index_select(0, self.slot)[0]
            self.windows[name].index_copy_(0, self.slot, self.passes[name].unsqueeze(0))
            self.passes[name].zero_()
        self.slot.add_(1).remainder_(WINDOW)

    def step(self) -> None:
        self.forward()
        self.end_step()

    def reset(self) -> None:
        for name in LOWERINGS:
            self.passes[name].zero_()
            self.windows[name].zero_()
            self.evicted[name].zero_()
        self.slot.zero_()


def check_totals(recorder: Recorder, expected: torch.Tensor, steps_done: int) -> None:
    want_window = expected[max(0, steps_done - WINDOW) : steps_done].sum(dim=0)
    want_all = expected[:steps_done].sum(dim=0)
    for name in LOWERINGS:
        window = recorder.windows[name].sum(dim=0).cpu()  # int32 sums to int64
        assert torch.equal(window, want_window), (name, steps_done)
        assert torch.equal(recorder.evicted[name].cpu() + window, want_all), (name, steps_done)
    assert int(recorder.slot) == steps_done % WINDOW


CHECKPOINTS = {1, WINDOW - 1, WINDOW, WINDOW + 1, 2500, 5003, STEPS}


def _sanity(routing: Routing, expected: torch.Tensor) -> None:
    # The run must exercise the gate: steps on and off, with tokens on both.
    off = ~routing.gates
    assert routing.num_unpadded[off].sum() > 0 and expected.sum() > 0


def test_long_run_eager_cpu():
    routing = make_routing(CPU_SHAPE, seed=0)
    expected = expected_step_loads(CPU_SHAPE, routing)
    _sanity(routing, expected)
    recorder = Recorder(CPU_SHAPE, "cpu")
    for step in range(STEPS):
        recorder.set_inputs(routing.ids[step], routing.num_unpadded[step], routing.gates[step])
        recorder.step()
        if step + 1 in CHECKPOINTS:
            check_totals(recorder, expected, step + 1)


@requires_cuda
def test_long_run_cuda_graph_replay():
    routing = make_routing(CUDA_SHAPE, seed=1)
    expected = expected_step_loads(CUDA_SHAPE, routing)
    _sanity(routing, expected)
    ids, num_unpadded, gates = (t.cuda() for t in (routing.ids, routing.num_unpadded, routing.gates))
    recorder = Recorder(CUDA_SHAPE, "cuda")

    # Warm up (Triton compiles) off the capture stream, then undo its effects.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        recorder.step()
    torch.cuda.current_stream().wait_stream(side)
    recorder.reset()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorder.step()
    torch.cuda.synchronize()
    # Capture must not have run the step.
    assert int(recorder.slot) == 0 and all(int(w.abs().sum()) == 0 for w in recorder.windows.values())

    for step in range(STEPS):
        # The gate and the inputs change between replays, with no re-capture.
        recorder.set_inputs(ids[step], num_unpadded[step], gates[step])
        graph.replay()
        if step + 1 in CHECKPOINTS:
            torch.cuda.synchronize()
            check_totals(recorder, expected, step + 1)
