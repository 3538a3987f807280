"""What the EPLB load recorder adds to an EPLB step on the GPU, and proof it adds no host sync.

    python3 tests/device/recorder_cost.py [--steps 2000] [--layers 58] [--physical 288] [--window 1000]

Needs torch with CUDA and this repository; vLLM is not imported (vLLM's
``EplbState.step`` needs its EP group, so one GPU without a distributed
start-up cannot run it). Instead the plugin's real step hook
(``eplb_step_hook._wrap_step``) wraps a stand-in whose ``step`` does what
vLLM's step does on the device at a recorded step (``eplb_state.py:646-655``:
copy the pass ``[layers, physical]`` int32 into the window, zero it), with
the recorder of a real ``record_dir`` behind it. Measured, per step:

- host time of the stand-in step alone, and wrapped (recorder on): the
  difference is the recorder's host cost;
- device time of the step, recorder off and on (CUDA events around it);
- the exporter is fed by the writer thread, as in a server;
- ``torch.cuda.set_sync_debug_mode("error")`` around every forward (a
  routing + ``eplb_compile.map_and_record`` on the pass) and the wrapped
  step: any synchronizing call raises. The writer thread is running then
  and files are written.

Then the writer thread's side, which shares the GIL with the server and so
is host work added per step too: per recorded pass at the given shape and
EPLB window (DeepSeek-V3: 58 layers, 288 physical, 256 logical, window
1000, EP 8), the exporter's update (running sums; with and without
per-expert series), the whole writer thread per pass (take, exporter, and
the file writes amortized over ``flush_every_steps``), and one scrape. These
run on the host alone, so ``--device cpu`` measures them faithfully.

Prints a table (medians in µs); exits 1 if a sync was flagged, a recorded
step is missing from the files, or the writer's work per pass is 1 ms or more. ``--device cpu`` checks the script's logic
only: there every copy is synchronous and the writer thread competes with
the CPU kernels' threads for the cores, so its timings mean nothing.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time

import torch


class StandInEplbState:
    """The attributes the step hook reads, and vLLM's device work of a recorded step."""

    def __init__(self, layers: int, physical: int, window: int, device: torch.device):
        model_state = type("ModelState", (), {})()
        model_state.expert_load_pass = torch.zeros((layers, physical), dtype=torch.int32, device=device)
        model_state.expert_load_window = torch.zeros((window, layers, physical), dtype=torch.int32, device=device)
        model_state.physical_to_logical_map = torch.arange(physical, device=device).remainder(256).expand(layers, -1)
        model_state.rebalanced = False
        self.model_states = {"model": model_state}
        self.is_async = False
        self.expert_rearrangement_step = 1  # never 0: no rearrangement in this measurement
        self.window_step = 0

    def _should_record_current_step(self, log_stats: bool = False) -> bool:
        return True

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        model_state = self.model_states["model"]
        model_state.expert_load_window[self.window_step].copy_(model_state.expert_load_pass)
        model_state.expert_load_pass.zero_()
        self.window_step = (self.window_step + 1) % model_state.expert_load_window.shape[0]
        self.expert_rearrangement_step = 1


class Forward:
    """The recording part of a MoE forward: route, map, count into the pass.
    Its device tensors are made once, outside the sync-checked region."""

    def __init__(self, state: StandInEplbState, tokens: int, num_logical: int, top_k: int, device):
        physical = state.model_states["model"].expert_load_pass.shape[1]
        self.load = state.model_states["model"].expert_load_pass
        self.logits = torch.randn((tokens, num_logical), device=device)
        self.l2p = torch.arange(num_logical, device=device).remainder(physical).unsqueeze(1)
        self.replicas = torch.ones(num_logical, dtype=torch.int64, device=device)
        self.gate = torch.ones((), dtype=torch.bool, device=device)
        self.unpadded = torch.full((), tokens, dtype=torch.int32, device=device)
        self.top_k = top_k

    def __call__(self) -> None:
        import eplb_compile as ec

        ids = self.logits.topk(self.top_k, dim=-1).indices
        for layer in range(self.load.shape[0]):
            ec.map_and_record(ids, self.l2p, self.replicas, self.load[layer], self.gate, self.unpadded)


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def writer_cost(layers: int, physical: int, window: int, passes: int) -> list[tuple[str, str]]:
    """The writer thread's host work per recorded pass, on the host (the device side is a copy launch)."""
    import prometheus_client

    from eplb_compile.vllm_plugin.exporter import Exporter
    from eplb_compile.vllm_plugin.recorder import ModelInfo, Recorder

    ep_size, num_logical = 8, 256
    info = ModelInfo("cost", [f"model.layers.{i + 3}.mlp.experts" for i in range(layers)], num_logical, physical,
                     window)
    mapping = torch.arange(physical).remainder(num_logical).expand(layers, -1).clone()
    generator = torch.Generator().manual_seed(0)
    loads = [torch.randint(0, 4000, (layers, physical), generator=generator, dtype=torch.int32) for _ in range(8)]
    rank_loads = [load.reshape(layers, ep_size, -1).sum(dim=-1, dtype=torch.int64) for load in loads]
    rows = [("writer: shape, window", f"[{layers}, {physical}], {num_logical} logical, window {window}, EP {ep_size}")]
    for per_expert in (False, True):
        exporter = Exporter(host="127.0.0.1", port=0, ep_rank=0, ep_size=ep_size, per_expert=per_expert)
        exporter.add_model(info)
        exporter.on_map(0, mapping)
        samples = []
        for i in range(passes):
            start = time.perf_counter()
            exporter.on_pass(0, loads[i % 8], rank_loads[i % 8])
            samples.append(time.perf_counter() - start)
        start = time.perf_counter()
        scraped = prometheus_client.generate_latest(exporter.registry)
        scrape_ms = (time.perf_counter() - start) * 1e3
        exporter.close()
        series = sum(1 for line in scraped.decode().splitlines() if line and not line.startswith("#"))
        label = "per-expert on" if per_expert else "default"
        rows.append((f"writer: exporter update per pass, {label}, µs (median, window full)",
                     f"{median_us(samples[window:]):.1f}"))
        rows.append((f"writer: one scrape, {label}: ms / samples", f"{scrape_ms:.1f} / {series}"))
    record_dir = tempfile.mkdtemp(prefix="recorder_cost_writer_")
    exporter = Exporter(host="127.0.0.1", port=0, ep_rank=0, ep_size=ep_size)
    exporter.add_model(info)
    recorder = Recorder(record_dir=record_dir, flush_every_steps=100, ring_steps=passes + 1, ep_rank=0,
                        ep_size=ep_size, versions={"vllm_version": "none", "eplb_compile_version": "dev"},
                        exporter=exporter)
    recorder.add_model(info)
    recorder.on_map(0, -1, mapping)
    recorder.wait_idle()
    for i in range(passes):  # queued first, so the timing below is the writer thread's work alone
        recorder.on_pass(0, i, loads[i % 8], rank_loads[i % 8])
    start = time.perf_counter()
    recorder.close()  # the thread drains the queue: takes, feeds the exporter, writes every 100 passes
    per_pass = (time.perf_counter() - start) / passes
    exporter.close()
    rows.append(("writer: whole thread per pass incl. file writes, µs (mean)", f"{per_pass * 1e6:.1f}"))
    return rows


def writer_ok(rows: list[tuple[str, str]]) -> bool:
    """Under 1 ms of host work per recorded pass, everything the writer does included."""
    return float(dict(rows)["writer: whole thread per pass incl. file writes, µs (mean)"]) < 1000


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--physical", type=int, default=288)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    writer = writer_cost(args.layers, args.physical, args.window, passes=max(args.window + 500, 1500))
    if device.type == "cuda" and not torch.cuda.is_available():
        print_rows(writer)
        print("SKIP: no CUDA device for the step side")
        return 0 if writer_ok(writer) else 1
    from eplb_compile.vllm_plugin.eplb_step_hook import _wrap_step
    from eplb_compile.vllm_plugin.vllm_surface import map_version
    from eplb_compile.vllm_plugin.exporter import Exporter
    from eplb_compile.vllm_plugin.recorder import ModelInfo, Recorder

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    record_dir = tempfile.mkdtemp(prefix="recorder_cost_")
    state = StandInEplbState(args.layers, args.physical, 8, device)
    exporter = Exporter(host="127.0.0.1", port=0, ep_rank=0, ep_size=8)  # the writer feeds it too, as in a server
    recorder = Recorder(record_dir=record_dir, flush_every_steps=100, ring_steps=16, ep_rank=0, ep_size=8,
                        versions={"vllm_version": "none", "eplb_compile_version": "dev"}, exporter=exporter)
    info = ModelInfo("cost", [f"layers.{i}" for i in range(args.layers)], 256, args.physical, 8)
    recorder.add_model(info)
    exporter.add_model(info)
    recorder.on_map(0, -1, state.model_states["model"].physical_to_logical_map)
    recorder.map_versions.append(map_version(state.model_states["model"]))  # as the step hook's add_model does
    state._eplb_compile_recorder = recorder
    wrapped = _wrap_step(StandInEplbState.step)
    forward = Forward(state, args.tokens, 256, 8, device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))] if cuda \
        else None

    host = {"stock": [], "wrapped": []}
    device_ms = {"stock": [], "wrapped": []}
    sync_errors = []
    for step in range(args.steps):
        for kind, step_fn in (("stock", StandInEplbState.step), ("wrapped", wrapped)):
            forward()
            sync()
            if cuda and kind == "wrapped":
                torch.cuda.set_sync_debug_mode("error")
            try:
                forward()  # the forward path; the recorder's writer thread is live
                if cuda:
                    events[0][0].record()
                start = time.perf_counter()
                step_fn(state)
                host[kind].append(time.perf_counter() - start)
                if cuda:
                    events[0][1].record()
            except RuntimeError as error:
                sync_errors.append(f"step {step}: {error}")
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            if cuda:
                events[0][1].synchronize()
                device_ms[kind].append(events[0][0].elapsed_time(events[0][1]))
    recorder.close()
    exporter.close()

    from eplb_compile.recording import concat_chunks, read_chunk

    chunks = [read_chunk(f) for f in sorted(glob.glob(f"{record_dir}/rank0/*.safetensors"))]
    recorded = concat_chunks(chunks, 0).steps
    missing = args.steps - len(recorded) - recorder.dropped
    device_us = {kind: statistics.median(v) * 1e3 if v else float("nan") for kind, v in device_ms.items()}
    rows = [
        ("pass shape", f"[{args.layers}, {args.physical}] int32 on {device}"),
        ("steps", str(args.steps)),
        ("step, recorder off: host µs (median)", f"{median_us(host['stock']):.1f}"),
        ("step, recorder on: host µs (median)", f"{median_us(host['wrapped']):.1f}"),
        ("recorder's added host cost per step, µs", f"{median_us(host['wrapped']) - median_us(host['stock']):.1f}"),
        ("step, recorder off / on: device µs (median)", f"{device_us['stock']:.1f} / {device_us['wrapped']:.1f}"),
        ("host syncs flagged (set_sync_debug_mode error)", str(len(sync_errors))),
        ("steps recorded / dropped (ring full) / missing", f"{len(recorded)} / {recorder.dropped} / {missing}"),
    ]
    print_rows(rows + writer)
    for error in sync_errors[:3]:
        print("SYNC:", error)
    ok = not sync_errors and missing == 0 and writer_ok(writer)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
