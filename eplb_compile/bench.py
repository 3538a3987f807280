"""``eplb-compile bench``: the load update's kernels, timed per MoE layer.

Conditions (issue 3, DESIGN §4): 256 logical + 32 redundant experts (288
physical), top-8, 8 EP ranks (36 local experts), Zipf-skewed routing with a
per-layer EPLB placement that replicates the hottest experts, vLLM's map shape
``[256, 1024]``. Each implementation runs once per layer for 58 layers with
58 independent inputs, maps and loads, captured in ONE CUDA graph; a sample is
a run of graph replays timed with CUDA events, divided by replays x layers; the
figure is the median of >= 5 samples, the implementations interleaved within
each repeat so drift hits them alike.

Every implementation is first checked bit-identical (ids and load, gate on,
gate off, padded) against the element-wise reference (or, for large inputs,
the CPU operator); a wrong one is reported and never timed.

Host overhead: per-call CPU time of eager calls, measured while the GPU is
kept busy by a long sleep kernel, so the launches queue without ever waiting
for the device and the host clock sees only Python, dispatch and launch cost.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from eplb_compile.reference import expected_map_and_record

DEFAULT_TOKENS = (1, 16, 128, 512, 2048, 8192, 16384, 32768)
QUICK_TOKENS = (1, 128, 2048, 32768)

# Issue 3's goals. They live here, never in unit tests.
TOPK_VS_MAP_ONLY_MAX = 1.15
SPEEDUP_VS_VLLM_MIN = 10.0
SPEEDUP_AT_TOKENS = 32768
COUNT_VS_FLOOR_MAX = 1.10
SELECTION_SLACK = 1.05
# Plan derivation keeps the current variant while it is within this of the fastest.
PLAN_TIE = 1.02

ID_DTYPES = {"int32": torch.int32, "int64": torch.int64, "int16": torch.int16}
POISON = 0x5B


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="only cuda can be timed")
    parser.add_argument("--tokens", default=None, help="comma-separated tokens per rank (default: issue 3's list)")
    parser.add_argument("--layers", type=int, default=58, help="MoE layers captured in one CUDA graph")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per figure (median; at least 5)")
    parser.add_argument("--replays", type=int, default=20, help="graph replays per timed sample")
    parser.add_argument("--vllm-src", default=os.environ.get("EPLB_VLLM_SRC", ".vllm_src"),
                        help="folder holding vLLM's sources, for its kernel (env EPLB_VLLM_SRC)")
    parser.add_argument("--out", default="graphs", help="folder for bench_results.{csv,png,md}")
    parser.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, fewer replays")
    parser.add_argument("--topk-plan", default="module", choices=["module", "auto"],
                        help="module: time eplb_compile.kernels.TOPK_PLAN as shipped; "
                             "auto: derive the plan from this run's variant timings and time that")
    parser.add_argument("--num-logical", type=int, default=256)
    parser.add_argument("--num-redundant", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ep-size", type=int, default=8)
    parser.add_argument("--map-slots", type=int, default=1024, help="map columns; vLLM allocates 1024")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    parser.add_argument("--id-dtype", default="int32", choices=sorted(ID_DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-calls", type=int, default=100, help="eager calls per host-overhead sample")
    parser.add_argument("--host-rounds", type=int, default=15, help="host-overhead samples (median)")


# ---------------------------------------------------------------------------
# Workload.
# ---------------------------------------------------------------------------


@dataclass
class Setup:
    """What every token count shares: per-layer maps, counts, gate, floor tensors."""

    layers: int
    k: int
    num_physical: int
    num_local: int
    start: int
    log_popularity: torch.Tensor  # [layers, logical]
    l2p: torch.Tensor  # [layers, logical, slots] int64
    replica_count: torch.Tensor  # [layers, logical] int64
    counts: torch.Tensor  # [layers, local] int32
    gate: torch.Tensor  # bool scalar, on
    floor_cells: torch.Tensor  # [layers, 1] int32


@dataclass
class Workload:
    tokens: int
    ids: torch.Tensor  # [layers, T, k]
    outs: torch.Tensor  # [layers, T, k], for the launchers that take an output
    loads: torch.Tensor  # [layers, P] int32
    unpadded: torch.Tensor  # int32 scalar = T: every token recorded


def _sample_routing(log_popularity: torch.Tensor, tokens: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Top-k experts per token without replacement, by the Gumbel-top-k trick.

    Sorted by score like a router's top-k, so hot experts sit in the first slots.
    """
    uniform = torch.rand((tokens, log_popularity.shape[0]), device=log_popularity.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
    return torch.topk(log_popularity + gumbel, k, dim=1).indices


def _eplb_placement(load: torch.Tensor, num_redundant: int, ep_size: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate the hottest experts, then pack replicas onto ranks by load, as EPLB does."""
    num_logical = load.shape[0]
    replicas = torch.ones(num_logical, dtype=torch.int64)
    for _ in range(num_redundant):
        replicas[torch.argmax(load / replicas)] += 1
    per_rank = (num_logical + num_redundant) // ep_size
    items = sorted(((float(load[e] / replicas[e]), e) for e in range(num_logical) for _ in range(int(replicas[e]))),
                   reverse=True)
    rank_load, rank_used = [0.0] * ep_size, [0] * ep_size
    l2p = torch.full((num_logical, slots), -1, dtype=torch.int64)
    placed = [0] * num_logical
    for share, e in items:
        rank = min((r for r in range(ep_size) if rank_used[r] < per_rank), key=lambda r: rank_load[r])
        l2p[e, placed[e]] = rank * per_rank + rank_used[rank]
        rank_load[rank] += share
        rank_used[rank] += 1
        placed[e] += 1
    return l2p, replicas


def build_setup(args, device: torch.device) -> Setup:
    num_physical = args.num_logical + args.num_redundant
    if num_physical % args.ep_size:
        raise ValueError(f"{num_physical} physical experts do not split over {args.ep_size} ranks")
    num_local = num_physical // args.ep_size
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cpu_generator = torch.Generator().manual_seed(args.seed)
    ranks = torch.arange(1, args.num_logical + 1, dtype=torch.float64)
    zipf = ranks.pow(-args.zipf)
    log_pop, l2ps, counts_per_layer = [], [], []
    for _ in range(args.layers):
        popularity = zipf[torch.randperm(args.num_logical, generator=cpu_generator)]
        log_p = (popularity / popularity.sum()).log().float().to(device)
        # What EPLB would have measured: routed load over a large sample.
        sample = _sample_routing(log_p, 4096, args.top_k, generator)
        load = torch.bincount(sample.reshape(-1), minlength=args.num_logical).double().cpu()
        l2p, replicas = _eplb_placement(load, args.num_redundant, args.ep_size, args.map_slots)
        log_pop.append(log_p)
        l2ps.append(l2p)
        counts_per_layer.append(replicas)
    return Setup(
        layers=args.layers,
        k=args.top_k,
        num_physical=num_physical,
        num_local=num_local,
        start=3 * num_local,  # a middle rank: a non-zero offset
        log_popularity=torch.stack(log_pop),
        l2p=torch.stack(l2ps).to(device),
        replica_count=torch.stack(counts_per_layer).to(device),
        counts=torch.randint(0, 4096, (args.layers, num_local), generator=cpu_generator, dtype=torch.int32).to(device),
        gate=torch.tensor(True, device=device),
        floor_cells=torch.zeros(args.layers, 1, dtype=torch.int32, device=device),
    )


def build_workload(setup: Setup, tokens: int, id_dtype: torch.dtype, seed: int) -> Workload:
    device = setup.l2p.device
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + tokens)
    ids = torch.stack([_sample_routing(setup.log_popularity[layer], tokens, setup.k, generator)
                       for layer in range(setup.layers)]).to(id_dtype)
    return Workload(
        tokens=tokens,
        ids=ids,
        outs=torch.full_like(ids, POISON),
        loads=torch.zeros(setup.layers, setup.num_physical, dtype=torch.int32, device=device),
        unpadded=torch.tensor(tokens, dtype=torch.int32, device=device),
    )


# ---------------------------------------------------------------------------
# Implementations: one call per layer, plus its correctness check.
# ---------------------------------------------------------------------------

@dataclass
class Impl:
    name: str
    kind: str  # "map_record", "map_only", "counts", "count_path", "floor"
    fn: Callable


@dataclass
class Expected:
    """One checked call: its inputs and the reference's answer."""

    layer: int
    record: bool
    num_unpadded: int | None
    initial_load: torch.Tensor  # on the device
    ids: torch.Tensor  # CPU
    load: torch.Tensor  # CPU, after map+record
    mapped_ids: torch.Tensor  # CPU, the mapping alone (same ids: the gate never changes them)


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
            want_ids, want_load = expected_map_and_record(ids, l2p, rc, initial, record, num_unpadded)
            result.append(Expected(layer, record, num_unpadded, initial.to(ids.device), want_ids, want_load, want_ids))
    return result


def check_impl(impl: Impl, setup: Setup, work: Workload, expected: list[Expected]) -> str | None:
    """None if ``impl`` matches the reference in every expected case, else what differs."""
    device = work.ids.device
    for case in expected:
        layer = case.layer
        ids, l2p, rc = work.ids[layer], setup.l2p[layer], setup.replica_count[layer]
        gate = torch.tensor(case.record, device=device)
        unpadded = (None if case.num_unpadded is None
                    else torch.tensor(case.num_unpadded, dtype=torch.int32, device=device))
        load = case.initial_load.clone()
        out = torch.full_like(ids, POISON)
        counts = setup.counts[layer]
        want_ids, want_load = case.ids, case.load
        if impl.kind == "map_record":
            got = impl.fn(ids, l2p, rc, load, gate, unpadded, out)
        elif impl.kind == "map_only":
            got = impl.fn(ids, l2p, rc)
            want_load = case.initial_load.cpu().clone()
        elif impl.kind in ("counts", "count_path"):
            got = impl.fn(ids, l2p, rc, load, counts, setup.start, gate)
            want_ids = case.mapped_ids if impl.kind == "count_path" else None
            want_load = case.initial_load.cpu().clone()
            if case.record:
                want_load[setup.start:setup.start + setup.num_local] += counts.cpu()
        else:
            return None
        torch.cuda.synchronize()
        where = f"layer {layer}, gate {case.record}, num_unpadded {case.num_unpadded}"
        if want_ids is not None and not torch.equal(got.cpu(), want_ids):
            return f"{(got.cpu() != want_ids).sum().item()} physical ids differ ({where})"
        if not torch.equal(load.cpu(), want_load):
            return f"load differs in {(load.cpu() != want_load).sum().item()} experts ({where})"
    return None


def build_impls(vllm_fn, plan_variants: list[str], include_topk: bool) -> list[Impl]:
    from eplb_compile.kernels import cuda_histogram, launch_map

    ops = torch.ops.eplb_compile

    def baseline(ids, l2p, rc, load, gate, unpadded, out):
        launch_map(ids, l2p, rc, out, load, gate, unpadded)
        return out

    def count_path(ids, l2p, rc, load, counts, start, gate):
        physical = ops.map_only(ids, l2p, rc)
        ops.record_counts(load, counts, start, gate)
        return physical

    impls = []
    if vllm_fn is not None:
        impls.append(Impl("vllm", "map_record", lambda ids, l2p, rc, load, gate, unpadded, out: vllm_fn(
            topk_ids=ids, logical_to_physical_map=l2p, logical_replica_count=rc, expert_load_view=load,
            record_enabled=gate, num_unpadded_tokens=unpadded)))
    impls.append(Impl("baseline", "map_record", baseline))
    if include_topk:
        impls.append(Impl("topk", "map_record", lambda ids, l2p, rc, load, gate, unpadded, out:
                          ops.map_and_record(ids, l2p, rc, load, gate, unpadded)))
    impls.append(Impl("map_only", "map_only", lambda ids, l2p, rc: ops.map_only(ids, l2p, rc)))
    impls.append(Impl("count_kernel", "counts", lambda ids, l2p, rc, load, counts, start, gate:
                      ops.record_counts(load, counts, start, gate)))
    impls.append(Impl("count_path", "count_path", count_path))
    impls.append(Impl("floor", "floor", None))
    for name in plan_variants:
        variant = cuda_histogram.VARIANTS[name]
        impls.append(Impl(f"cuda:{name}", "map_record",
                          lambda *args, variant=variant: variant(*args, fallback=False)))
    return impls


def _layer_call(impl: Impl, setup: Setup, work: Workload) -> Callable[[int], object]:
    gate, unpadded = setup.gate, work.unpadded
    if impl.kind == "map_record":
        return lambda l: impl.fn(work.ids[l], setup.l2p[l], setup.replica_count[l], work.loads[l], gate, unpadded,
                                 work.outs[l])
    if impl.kind == "map_only":
        return lambda l: impl.fn(work.ids[l], setup.l2p[l], setup.replica_count[l])
    if impl.kind in ("counts", "count_path"):
        return lambda l: impl.fn(work.ids[l], setup.l2p[l], setup.replica_count[l], work.loads[l], setup.counts[l],
                                 setup.start, gate)
    return lambda l: setup.floor_cells[l].add_(1)  # the one-kernel floor


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def capture(call: Callable[[int], object], layers: int) -> torch.cuda.CUDAGraph:
    for layer in range(layers):  # eager first: Triton and NVRTC build outside the capture
        call(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            call(layer)
    torch.cuda.synchronize()
    return graph


def time_graphs(graphs: dict[str, torch.cuda.CUDAGraph], layers: int, replays: int, repeats: int) -> dict[str, list[float]]:
    """Microseconds per layer: samples per graph, interleaved across graphs."""
    for graph in graphs.values():
        for _ in range(3):
            graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(repeats):
        for name, graph in graphs.items():
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / (replays * layers))
    return samples


def host_overhead_us(call: Callable[[], object], calls: int, rounds: int) -> float:
    """Median per-call host time of eager calls while the GPU is busy.

    A sleep kernel keeps the device occupied for longer than the timed calls
    take to issue, so launches only queue (far below the queue's depth) and
    no call waits on the GPU: what the host clock sees is Python, dispatch and
    launch cost. The device is synchronized between rounds, outside the clock.
    """
    call()
    torch.cuda.synchronize()
    clock_hz = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "clock_rate", 2_000_000) * 1e3
    cycles = int(clock_hz * calls * 200e-6)  # 200 us of device time per call: far more than any call takes
    samples = []
    for _ in range(rounds):
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


# ---------------------------------------------------------------------------
# Plan, crossover, goals.
# ---------------------------------------------------------------------------


def derive_plan(medians: dict[int, dict[str, float]], k: int, names: list[str]) -> tuple[tuple[int, str], ...]:
    """TOPK_PLAN rows from measured medians: the fastest kernel at each T.

    A switch is placed at the geometric middle of the two measured token counts
    around it; the current kernel is kept while it is within PLAN_TIE of the best.
    """
    plan: list[tuple[int, str]] = []
    previous_tokens = None
    for tokens in sorted(medians):
        times = {n: medians[tokens][n] for n in names if n in medians[tokens]}
        if not times:
            continue
        best = min(times, key=times.get)
        if plan and plan[-1][1] in times and times[plan[-1][1]] <= PLAN_TIE * times[best]:
            best = plan[-1][1]
        if not plan:
            plan.append((0, best))
        elif best != plan[-1][1]:
            boundary = math.ceil(math.sqrt(previous_tokens * tokens))
            plan.append((boundary * k, best))
        previous_tokens = tokens
    return tuple(plan) or ((0, "triton"),)


def count_path_crossover(medians: dict[int, dict[str, float]]) -> int | None:
    """Smallest measured T from which the count path beats the topk path at every larger T."""
    crossover = None
    for tokens in sorted(medians, reverse=True):
        row = medians[tokens]
        if "count_path" not in row or "topk" not in row or row["count_path"] >= row["topk"]:
            break
        crossover = tokens
    return crossover


def selection_check(medians, threshold: int | None) -> list[tuple[int, str, float, bool]]:
    """Per T: the path a crossover of ``threshold`` picks, its cost over the best, within slack."""
    rows = []
    for tokens in sorted(medians):
        row = medians[tokens]
        if "count_path" not in row or "topk" not in row:
            continue
        pick = "count_path" if threshold is not None and tokens >= threshold else "topk"
        ratio = row[pick] / min(row["count_path"], row["topk"])
        rows.append((tokens, pick, ratio, ratio <= SELECTION_SLACK))
    return rows


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _gpu_conditions() -> str:
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10,
        )
        return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "nvidia-smi: n/a"
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi: n/a"


def _plot(path: Path, medians: dict[int, dict[str, float]], lines: dict[str, str], variant_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    tokens = sorted(medians)
    for name, label in lines.items():
        points = [(t, medians[t][name]) for t in tokens if name in medians[t]]
        if points:
            ax.plot(*zip(*points), marker="o", linewidth=2, label=label)
    for name in variant_names:
        points = [(t, medians[t][name]) for t in tokens if name in medians[t]]
        if points:
            ax.plot(*zip(*points), linestyle="--", linewidth=1, marker=".", alpha=0.7, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("µs per MoE layer (inside one CUDA graph)")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------


def _load_vllm(src_dir: str):
    try:
        from eplb_compile._vllm_kernel_loader import load_vllm_router_kernel
    except ImportError as error:
        return None, f"unavailable (loader missing: {error})"
    try:
        module = load_vllm_router_kernel(src_dir)
    except Exception as error:  # noqa: BLE001 - any failure means: run without vLLM, say why
        return None, f"unavailable ({type(error).__name__}: {error})"
    launcher = getattr(module, "_eplb_map_and_record_triton", module)
    version = "0.33.0" if getattr(module, "matches_vllm_0_33_0", False) else "NOT 0.33.0 (source differs)"
    return launcher, f"vLLM {version} _eplb_map_and_record_triton, loaded from {src_dir}"


def run_bench(args: argparse.Namespace) -> int:
    if args.device != "cuda" or not torch.cuda.is_available():
        print("error: eplb-compile bench times CUDA kernels and needs a CUDA GPU "
              f"(--device {args.device}, torch.cuda.is_available() = {torch.cuda.is_available()})", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    return _run(args, device, torch.cuda.get_device_name(device))


def _run(args: argparse.Namespace, device: torch.device, gpu: str) -> int:
    import triton

    import eplb_compile.ops  # noqa: F401 - registers torch.ops.eplb_compile
    from eplb_compile import kernels, selection
    from eplb_compile.kernels import cuda_histogram

    tokens_list = QUICK_TOKENS if args.quick else DEFAULT_TOKENS
    if args.tokens:
        tokens_list = tuple(int(t) for t in args.tokens.split(","))
    replays = max(5, args.replays // 2) if args.quick else args.replays
    repeats = max(5, args.repeats)
    host_rounds = max(5, args.host_rounds // 2) if args.quick else args.host_rounds
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    id_dtype = ID_DTYPES[args.id_dtype]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    vllm_fn, vllm_status = _load_vllm(args.vllm_src)
    reference_name = "vllm" if vllm_fn is not None else "baseline"
    reference_label = "vLLM" if vllm_fn is not None else "in-repo baseline (one atomic per element, vLLM's algorithm)"
    print(f"# eplb-compile bench on {gpu}; torch {torch.__version__}, Triton {triton.__version__}; {stamp}")
    print(f"# vLLM: {vllm_status}; ratios use: {reference_label}")
    setup = build_setup(args, device)
    work = {t: build_workload(setup, t, id_dtype, args.seed) for t in tokens_list}
    variant_names = list(cuda_histogram.VARIANTS)
    failures: list[str] = []
    failed: set[str] = set()  # a kernel wrong at any T is never planned
    samples: dict[int, dict[str, list[float]]] = {t: {} for t in tokens_list}

    expected = {t: expectations(setup, work[t]) for t in tokens_list}

    def measure(impls: list[Impl], tokens: int, rename: dict[str, str]) -> None:
        w = work[tokens]
        graphs = {}
        for impl in impls:
            try:
                problem = check_impl(impl, setup, w, expected[tokens])
            except Exception as error:  # noqa: BLE001 - a crash is a failed check, reported
                problem = f"{type(error).__name__}: {error}"
            if problem:
                failed.add(impl.name)
                failures.append(f"T={tokens} {impl.name}: {problem}")
                print(f"  WRONG, not timed: T={tokens} {impl.name}: {problem}")
                continue
            w.loads.zero_()
            try:
                graphs[rename.get(impl.name, impl.name)] = capture(_layer_call(impl, setup, w), setup.layers)
            except Exception as error:  # noqa: BLE001 - report it, time the others
                failed.add(impl.name)
                failures.append(f"T={tokens} {impl.name}: CUDA graph capture failed: {type(error).__name__}: {error}")
                print(f"  capture failed, not timed: T={tokens} {impl.name}: {error}")
        samples[tokens].update(time_graphs(graphs, setup.layers, replays, repeats))
        del graphs

    # Phase 1: everything but the topk path, whose plan may come from these numbers.
    phase1 = build_impls(vllm_fn, variant_names, include_topk=False)
    for tokens in tokens_list:
        print(f"  T={tokens}: checking and timing {len(phase1)} implementations")
        measure(phase1, tokens, {})
    medians = {t: {n: statistics.median(v) for n, v in samples[t].items()} for t in tokens_list}
    plan_names = [n for n in ["baseline"] + [f"cuda:{n}" for n in variant_names] if n not in failed]
    if args.topk_plan == "auto":
        derived = derive_plan(medians, setup.k, plan_names)
        kernels.TOPK_PLAN = tuple((m, "triton" if n == "baseline" else n.removeprefix("cuda:")) for m, n in derived)
    plan_note = f"TOPK_PLAN = {kernels.TOPK_PLAN!r} ({'derived in this run' if args.topk_plan == 'auto' else 'as shipped'})"
    print(f"# {plan_note}")

    # Phase 2: the topk path through the operator, beside map-only timed again
    # (the same kernel twice: their difference is this run's noise).
    phase2 = [i for i in build_impls(vllm_fn, [], include_topk=True) if i.name in ("topk", "map_only")]
    for tokens in tokens_list:
        print(f"  T={tokens}: checking and timing the topk path")
        measure(phase2, tokens, {"map_only": "map_only@2"})
    medians = {t: {n: statistics.median(v) for n, v in samples[t].items()} for t in tokens_list}

    try:
        host = host_overheads(setup, work, vllm_fn, args.host_calls, host_rounds)
    except Exception as error:  # noqa: BLE001 - keep the timings; say what failed
        failures.append(f"host overhead: {type(error).__name__}: {error}")
        host = []

    report = summarize(medians, tokens_list, reference_name, reference_label, host, plan_note, variant_names,
                       selection, work[tokens_list[0]].ids.element_size() * setup.k)
    header = (f"{gpu}; torch {torch.__version__}; Triton {triton.__version__}; {stamp}; {_gpu_conditions()}; "
              f"{args.layers} layers in one CUDA graph, median of {repeats} x {replays} replays; "
              f"{args.num_logical}+{args.num_redundant} experts, top-{args.top_k}, EP {args.ep_size}, "
              f"Zipf s={args.zipf}, ids {args.id_dtype}, map slots {args.map_slots}")
    write_outputs(out_dir, header, gpu, stamp, samples, medians, report, vllm_status, variant_names, host)
    print(report)
    if failures:
        print("\nFAILED (a kernel that failed a check or its capture was not timed):", *failures, sep="\n  ")
        return 1
    return 0


@dataclass
class HostRow:
    call: str
    tokens: int
    us: float
    is_op: bool


def host_overheads(setup: Setup, work: dict[int, Workload], vllm_fn, calls: int, rounds: int) -> list[HostRow]:
    """Per-call host cost of each operator, vLLM's launcher and the bare Triton launch, at the smallest and largest T."""
    from eplb_compile import kernels
    from eplb_compile.kernels import launch_map

    ops = torch.ops.eplb_compile
    rows = []
    for tokens in sorted({min(work), max(work)}):
        w = work[tokens]
        ids, l2p, rc, load = w.ids[0], setup.l2p[0], setup.replica_count[0], w.loads[0]
        gate, unpadded, out, counts = setup.gate, w.unpadded, w.outs[0], setup.counts[0]
        candidates = [
            (f"map_and_record op (runs {kernels.topk_variant(ids.numel())})", True,
             lambda: ops.map_and_record(ids, l2p, rc, load, gate, unpadded)),
            ("map_only op", True, lambda: ops.map_only(ids, l2p, rc)),
            ("record_counts op", True, lambda: ops.record_counts(load, counts, setup.start, gate)),
            ("in-repo Triton launch_map (no op)", False, lambda: launch_map(ids, l2p, rc, out, load, gate, unpadded)),
        ]
        if vllm_fn is not None:
            candidates.append(("vLLM _eplb_map_and_record_triton", False, lambda: vllm_fn(
                topk_ids=ids, logical_to_physical_map=l2p, logical_replica_count=rc, expert_load_view=load,
                record_enabled=gate, num_unpadded_tokens=unpadded)))
        for name, is_op, call in candidates:
            rows.append(HostRow(name, tokens, host_overhead_us(call, calls, rounds), is_op))
    return rows


def summarize(medians, tokens_list, reference_name, reference_label, host, plan_note, variant_names, selection,
              id_bytes_per_token: int) -> str:
    """The report: results, variants, plan, goals met or missed, host overhead."""
    lines = []
    ref_col = "vLLM" if reference_name == "vllm" else "baseline*"
    header = ["T", ref_col, "baseline" if reference_name == "vllm" else "", "topk (ours)", "map-only", "map-only again",
              "count kernel", "count path (map-only + count)", "count path measured", "floor",
              "topk / map-only", f"{ref_col} / topk", "count kernel / floor", "topk GB/s (ids in + out)"]
    header = [h for h in header if h]
    rows, goal_rows = [], []
    for t in tokens_list:
        m = medians[t]
        get = m.get
        count_sum = get("map_only") + get("count_kernel") if "map_only" in m and "count_kernel" in m else None
        topk = get("topk")
        ref = get(reference_name)
        cells = [str(t), _fmt(ref)]
        if reference_name == "vllm":
            cells.append(_fmt(get("baseline")))
        cells += [_fmt(topk), _fmt(get("map_only")), _fmt(get("map_only@2")), _fmt(get("count_kernel")),
                  _fmt(count_sum), _fmt(get("count_path")), _fmt(get("floor")),
                  _fmt(topk / get("map_only@2", get("map_only")) if topk and get("map_only") else None),
                  _fmt(ref / topk if ref and topk else None, ".1f"),
                  _fmt(get("count_kernel") / get("floor") if get("count_kernel") and get("floor") else None),
                  _fmt(2 * t * id_bytes_per_token / (topk * 1e3) if topk else None, ".0f")]
        rows.append(cells)
        goal_rows.append((t, m))
    lines.append(f"## Results (µs per MoE layer){'' if reference_name == 'vllm' else '  * baseline = ' + reference_label}")
    lines.append(_markdown_table(header, rows))

    lines.append("\n## Topk-path variants (µs per layer; 'triton' = the in-repo baseline kernel)")
    vheader = ["T", "triton"] + variant_names + ["fastest"]
    vrows = []
    for t in tokens_list:
        m = medians[t]
        names = ["baseline"] + [f"cuda:{n}" for n in variant_names]
        present = {n: m[n] for n in names if n in m}
        best = min(present, key=present.get) if present else None
        vrows.append([str(t)] + [_fmt(m.get(n)) for n in names] +
                     [("triton" if best == "baseline" else best.removeprefix("cuda:")) if best else "-"])
    lines.append(_markdown_table(vheader, vrows))
    lines.append(f"\n{plan_note}")

    # Goals.
    lines.append("\n## Goals (issue 3)")
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    g1a = [(t, m["topk"] / m.get("map_only@2", m.get("map_only"))) for t, m in goal_rows
           if "topk" in m and ("map_only@2" in m or "map_only" in m)]
    lines.append(f"1a. topk <= {TOPK_VS_MAP_ONLY_MAX}x map-only at every T: "
                 f"{met(all(r <= TOPK_VS_MAP_ONLY_MAX for _, r in g1a) and len(g1a) == len(tokens_list))} "
                 f"(worst {max((r for _, r in g1a), default=float('nan')):.2f}x)")
    g1b = [(t, m["topk"] / m[reference_name]) for t, m in goal_rows if "topk" in m and reference_name in m]
    lines.append(f"1b. topk never slower than {reference_label}: "
                 f"{met(all(r <= 1.0 for _, r in g1b) and len(g1b) == len(tokens_list))} "
                 f"(worst {max((r for _, r in g1b), default=float('nan')):.2f}x)")
    at = medians.get(SPEEDUP_AT_TOKENS, {})
    if "topk" in at and reference_name in at:
        speedup = at[reference_name] / at["topk"]
        lines.append(f"1c. >= {SPEEDUP_VS_VLLM_MIN}x faster than {reference_label} at T={SPEEDUP_AT_TOKENS}: "
                     f"{met(speedup >= SPEEDUP_VS_VLLM_MIN)} ({speedup:.1f}x)")
    else:
        lines.append(f"1c. T={SPEEDUP_AT_TOKENS} not measured")
    g2 = [(t, m["count_kernel"] / m["floor"]) for t, m in goal_rows if "count_kernel" in m and "floor" in m]
    lines.append(f"2.  count kernel <= {COUNT_VS_FLOOR_MAX}x the one-kernel floor at every T: "
                 f"{met(all(r <= COUNT_VS_FLOOR_MAX for _, r in g2) and len(g2) == len(tokens_list))} "
                 f"(worst {max((r for _, r in g2), default=float('nan')):.2f}x)")
    crossover = count_path_crossover(medians)
    configured = selection.count_path_min_tokens()
    lines.append(f"3.  count-path crossover measured: {crossover if crossover is not None else 'none in range'} "
                 f"tokens/rank (count path measured < topk at it and every larger T); configured: {configured} "
                 f"(selection.DEFAULT_COUNT_PATH_MIN_TOKENS or ${selection.MIN_TOKENS_ENV})")
    for label, threshold in (("configured", configured), ("measured", crossover)):
        checks = selection_check(medians, threshold)
        worst = max((r for _, _, r, _ in checks), default=float("nan"))
        lines.append(f"    with the {label} crossover: {met(all(ok for *_, ok in checks))} "
                     f"(worst pick {worst:.3f}x the faster path; picks: "
                     + ", ".join(f"{t}:{'counts' if p == 'count_path' else 'topk'}" for t, p, _, _ in checks) + ")")
    vllm_host = {row.tokens: row.us for row in host if row.call.startswith("vLLM")}
    lines.append("4.  host overhead per eager call (µs; GPU kept busy so launches never wait; median of rounds):")
    host_rows = [[row.call, str(row.tokens), _fmt(row.us, ".1f"),
                  _fmt(row.us / vllm_host[row.tokens] if row.tokens in vllm_host else None)] for row in host]
    lines.append(_markdown_table(["call", "T", "µs/call", "vs vLLM (same T)"], host_rows))
    if vllm_host:
        ops_ok = all(row.us <= vllm_host[row.tokens] for row in host if row.is_op and row.tokens in vllm_host)
        lines.append(f"    every operator <= vLLM's call: {met(ops_ok)}")
    else:
        lines.append("    vLLM unavailable: compare the operators with the bare Triton launch, which is what vLLM's "
                     "wrapper does (contiguous, int32 view, empty, launch)")
    spread = [abs(m["map_only@2"] / m["map_only"] - 1) for m in medians.values() if "map_only@2" in m and "map_only" in m]
    if spread:
        lines.append(f"\nNoise: map-only timed twice, phases apart: max difference {100 * max(spread):.1f}%.")
    return "\n".join(lines)


def write_outputs(out_dir, header, gpu, stamp, samples, medians, report, vllm_status, variant_names, host):
    import triton

    csv_path = out_dir / "bench_results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gpu", "torch", "triton", "timestamp", "metric", "tokens", "impl", "median_us", "min_us",
                         "max_us", "samples"])
        for tokens, by_impl in samples.items():
            for impl, values in by_impl.items():
                writer.writerow([gpu, torch.__version__, triton.__version__, stamp, "graph_us_per_layer", tokens,
                                 impl, f"{statistics.median(values):.4f}", f"{min(values):.4f}", f"{max(values):.4f}",
                                 len(values)])
        for row in host:
            writer.writerow([gpu, torch.__version__, triton.__version__, stamp, "host_us_per_call", row.tokens,
                             row.call, f"{row.us:.3f}", "", "", ""])
    png_path = out_dir / "bench_results.png"
    lines = {"vllm": "vLLM 0.33 map+record", "baseline": "in-repo baseline (atomic per element)",
             "topk": "topk path (ours)", "map_only": "map only", "count_path": "count path (map-only + count kernel)",
             "count_kernel": "count kernel", "floor": "one-kernel floor"}
    try:
        _plot(png_path, medians, lines, [f"cuda:{n}" for n in variant_names], header)
    except Exception as error:  # noqa: BLE001 - the numbers matter more than the figure
        print(f"# plot failed: {type(error).__name__}: {error}")
    md_path = out_dir / "bench_results.md"
    md_path.write_text(
        "# `eplb-compile bench` results\n\n"
        f"{header}\n\nvLLM: {vllm_status}\n\n"
        "Re-measure with `python -m eplb_compile bench --out graphs` (add `--topk-plan auto` to derive the "
        "topk kernel plan, `--quick` for a short run). Method: see the `eplb_compile/bench.py` docstring.\n\n"
        f"![µs per layer vs tokens per rank]({png_path.name})\n\n{report}\n"
    )
    print(f"# wrote {csv_path}, {png_path}, {md_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m eplb_compile.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    sys.exit(run_bench(parser.parse_args()))
