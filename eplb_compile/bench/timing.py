"""Timing: CUDA graphs of all layers on the device, eager calls on the host.

Device time: each implementation runs once per layer for every layer, with
each layer's own inputs, captured in ONE CUDA graph; a sample is a run of
graph replays timed with CUDA events, divided by replays x layers; the figure
is the median of the samples, the implementations interleaved within each
repeat so clock drift hits them alike, and the order rotated from repeat to
repeat so that none is always first after the host's sync. (Rotation did not
explain the one oddity seen: in the layer-cost run on an H200, the grouped-GEMM
layer at one token times 2-4 µs slower without a step than with an empty
kernel, whichever graph goes first.)

Host time: the per-call CPU time of eager calls, measured while the GPU is
kept busy by a long sleep kernel, so launches queue without ever waiting for
the device and the host clock sees only Python, dispatch and launch cost.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from eplb_compile.bench.inputs import Setup, Workload
from eplb_compile.kernels.call import KernelCall


def capture_cuda_graph(call: Callable[[int], object], layers: int) -> torch.cuda.CUDAGraph:
    for layer in range(layers):  # eager first: Triton and NVRTC build outside the capture
        call(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            call(layer)
    torch.cuda.synchronize()
    return graph


def time_graphs(graphs: dict[str, torch.cuda.CUDAGraph], layers: int, replays: int,
                repeats: int) -> dict[str, list[float]]:
    """Microseconds per layer: ``repeats`` samples per graph, interleaved across graphs."""
    for graph in graphs.values():
        for _ in range(3):
            graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    for order in rotations(list(graphs), repeats):
        for name in order:
            graph = graphs[name]
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / (replays * layers))
    return samples


def rotations(names: list[str], repeats: int) -> list[list[str]]:
    """``repeats`` orders of ``names``, each starting one further along: the lead passes round."""
    return [names[r % len(names):] + names[: r % len(names)] for r in range(repeats)] if names else []


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """The card's device-to-device copy bandwidth (GB/s, read + write bytes), on
    a buffer far larger than L2: what "achieved bandwidth" is compared with."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(2 * nbytes / (start.elapsed_time(end) * 1e-3) / 1e9)
    del src, dst
    return statistics.median(samples)


def host_overheads_us(calls_by_name: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median per-call host time (µs) of eager calls while the GPU is busy, per name.

    A sleep kernel keeps the device occupied for longer than the timed calls
    take to issue, so launches only queue (far below the queue's depth) and
    no call waits on the GPU. The device is synchronized between samples,
    outside the clock. The candidates are interleaved within each round, so
    a drift of the host's speed (frequency, neighbours) hits them alike and
    their ratios stay meaningful.
    """
    for fn in calls_by_name.values():
        fn()
    torch.cuda.synchronize()
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_hz = getattr(properties, "clock_rate", 2_000_000) * 1e3  # clock_rate is in kHz
    cycles = int(clock_hz * calls * 200e-6)  # 200 µs of device time per call: far more than any call takes
    samples: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(rounds):
        for name, fn in calls_by_name.items():
            torch.cuda._sleep(cycles)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class HostRow:
    call: str
    tokens: int
    us: float
    is_op: bool  # one of our operators: what the host goal is about


def host_overheads(setup: Setup, work: dict[int, Workload], vllm_fn, calls: int, rounds: int) -> list[HostRow]:
    """Per-call host cost at the smallest and largest T: our public operators
    (what the vLLM plugin calls: the type check, the dispatcher, then the C++
    eager launcher), the same through ``torch.ops`` without the wrappers' type
    check, the Python path alone (what runs where the C++ eager launcher is not
    built), vLLM's launcher, the bare Triton launch and a plain torch slice add
    (the cheapest one-op update)."""
    import eplb_compile
    from eplb_compile.kernels import chooser
    from eplb_compile.ops import _library
    from eplb_compile.kernels.triton_kernels import launch_map

    ops = torch.ops.eplb_compile
    start, n = setup.start, setup.num_local
    rows = []
    for tokens in sorted({min(work), max(work)}):
        w = work[tokens]
        ids, l2p, rc, load = w.ids[0], setup.l2p[0], setup.replica_count[0], w.loads[0]
        gate, unpadded, out, counts = setup.gate, w.unpadded, w.outs[0], setup.counts[0]
        call = KernelCall(ids, l2p, rc, out, load=load, gate=gate, num_unpadded=unpadded)
        candidates = [
            (f"map_and_record (runs {chooser.variant_name(call)})", True,
             lambda: eplb_compile.map_and_record(ids, l2p, rc, load, gate, unpadded)),
            ("map_only", True, lambda: eplb_compile.map_only(ids, l2p, rc)),
            ("map_only with num_unpadded", True, lambda: eplb_compile.map_only(ids, l2p, rc, unpadded)),
            ("record_counts", True, lambda: eplb_compile.record_counts(load, counts, start, gate)),
            ("map_and_record, Python path", False,
             lambda: _library.map_and_record_python(ids, l2p, rc, load, gate, unpadded)),
            ("map_only, Python path", False, lambda: _library.map_only_python(ids, l2p, rc)),
            ("record_counts, Python path", False, lambda: _library.record_counts_python(load, counts, start, gate)),
            ("torch.ops map_and_record (dispatcher)", False,
             lambda: ops.map_and_record(ids, l2p, rc, load, gate, unpadded)),
            ("torch.ops record_counts (dispatcher)", False, lambda: ops.record_counts(load, counts, start, gate)),
            ("in-repo Triton launch_map (no op)", False, lambda: launch_map(call)),
            ("plain torch slice add", False, lambda: load[start:start + n].add_(counts)),
        ]
        if vllm_fn is not None:
            candidates.append(("vLLM _eplb_map_and_record_triton", False, lambda: vllm_fn(
                topk_ids=ids, logical_to_physical_map=l2p, logical_replica_count=rc, expert_load_view=load,
                record_enabled=gate, num_unpadded_tokens=unpadded)))
        medians = host_overheads_us({name: fn for name, _, fn in candidates}, calls, rounds)
        rows += [HostRow(name, tokens, medians[name], is_op) for name, is_op, _ in candidates]
    return rows
