"""What EPLB recording costs inside a decode- and prefill-sized MoE layer, on one GPU, in one run.

    bash tests/device/make_vllm_bundle.sh      # where pip works; carry .vllm_src
    python3 tests/device/moe_layer_cost.py --out graphs    # on the GPU machine
    bash tests/device/run_layer_cost.sh        # the same, with vLLM's own layer where .vllm_gpu/ is carried

Two denominators. vLLM 0.33.0's own non-batched layer (``FusedMoEFactory`` ->
``MoERunner`` -> ``TritonExperts``), with ``--vllm-moe-ops``: it needs vLLM's
Python and its compiled ``_moe_C`` ops, which only vLLM 0.26.0's binary gives
for the GPU machine's torch 2.11 (``vllm_fused_layer.py`` says what else stands
in; ``run_layer_cost.sh`` sets it up where ``.vllm_gpu/`` holds the bundle).
And, always, a grouped-GEMM layer (``torch._grouped_mm``) of the same shapes:
gate GEMM, softmax top-8, the recording step, sort by expert, the experts' two
grouped GEMMs with SiLU-and-mul between, un-sort and weighted sum; hidden 2048,
intermediate 1408, 64 logical + 8 redundant experts (72 physical, one rank),
bf16, uniform random routing. Three grouped-GEMM denominators per T: the whole
layer; its experts alone (the two grouped GEMMs and the activation: what a
fully fused layer could approach); and the weight-read floor (bytes of the
experts the batch touches / the card's measured copy bandwidth).

Numerators, side by side: vLLM 0.33.0's recording kernel, vLLM 0.34.0's
(copied from their sources by ``eplb_compile._vllm_kernel_loader``), ours on
the path the plugin picks at that T, ours map-only, one empty kernel (the
launch floor). Each is timed alone in one CUDA graph of 58 layers with each
layer's own ids and load (µs per layer, median of 7), and inside the layer
(4 layers of distinct weights per CUDA graph; the layer with the step minus
the layer without it). Every numerator is checked against vLLM 0.33.0's ids
and load before it is timed.

vLLM's layer is timed four ways on the same inputs (EPLB off; EPLB on with
stock vLLM's recording; with the plugin's; with the harness's plain-torch
stand-ins) after its checks (``vllm_fused_layer.check``).

Writes ``vllm_layer_cost.json`` to ``--out``; ``eplb_compile.bench.layer_cost``
renders it. ``--device cpu`` (with ``TRITON_INTERPRET=1``) runs the build and
the checks at small sizes, no timing: a syntax-and-logic check off the GPU.
(Longer than 300 lines: one standalone script for the GPU machine, where a
device call is scarce, so build, checks and timing travel together.)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, when not installed

import eplb_compile as ec  # noqa: E402
from eplb_compile._vllm_kernel_loader import load_vllm_router_kernel  # noqa: E402
from eplb_compile.bench.timing import capture_cuda_graph, copy_bandwidth_gbs, time_graphs  # noqa: E402
from eplb_compile.kernels import plans  # noqa: E402

HIDDEN, INTER, TOP_K, NUM_LOGICAL, NUM_REDUNDANT = 2048, 1408, 8, 64, 8
NUM_PHYSICAL, SLOTS = NUM_LOGICAL + NUM_REDUNDANT, NUM_REDUNDANT + 1  # 0.34.0's map width
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
REC_LAYERS, LAYER_COPIES = 58, 4
NUMERATORS = ["vllm_0.33.0", "vllm_0.34.0", "ours", "map_only", "empty"]


def placement(device):
    """Experts 0..7 have a second replica at physical 64..71; the rest one."""
    l2p = torch.full((NUM_LOGICAL, SLOTS), -1, dtype=torch.int64)
    l2p[:, 0] = torch.arange(NUM_LOGICAL)
    l2p[:NUM_REDUNDANT, 1] = torch.arange(NUM_LOGICAL, NUM_PHYSICAL)
    replicas = torch.ones(NUM_LOGICAL, dtype=torch.int64)
    replicas[:NUM_REDUNDANT] = 2
    return l2p.to(device), replicas.to(device)


class EplbState:
    def __init__(self, tokens: int, device):
        self.l2p, self.replicas = placement(device)
        self.load = torch.zeros(NUM_PHYSICAL, dtype=torch.int32, device=device)
        self.gate = torch.ones((), dtype=torch.bool, device=device)
        self.unpadded = torch.tensor(tokens, dtype=torch.int32, device=device)


def recording_steps(kernels: dict, tokens: int, device) -> dict:
    """name -> step(ids [T, k] int32, state) -> (physical ids, after(counts) or None)."""
    lowering = ec.select_lowering(True, tokens, device=device).lowering

    def vllm(module):
        return lambda ids, s: (module._eplb_map_and_record_triton(ids, s.l2p, s.replicas, s.load, s.gate, s.unpadded),
                               None)

    def ours(ids, s):
        if lowering is ec.Lowering.COUNTS:  # the plugin maps here and records the dispatch's counts
            return ec.map_only(ids, s.l2p, s.replicas, s.unpadded), lambda counts: ec.record_counts(
                s.load, counts, 0, s.gate)
        return ec.map_and_record(ids, s.l2p, s.replicas, s.load, s.gate, s.unpadded), None

    steps = {f"vllm_{release}": vllm(module) for release, module in kernels.items()}
    steps["ours"] = ours
    steps["map_only"] = lambda ids, s: (ec.map_only(ids, s.l2p, s.replicas, s.unpadded), None)
    steps["empty"] = lambda ids, s: (_empty_kernel(s.load, ids), None)  # in the layer: EPLB off + one launch
    steps["none"] = lambda ids, s: (ids, None)  # the layer without EPLB: logical ids are physical 0..63
    return steps, lowering.value


def _empty_kernel(anything: torch.Tensor, passthrough: torch.Tensor) -> torch.Tensor:
    """One launch that does nothing: the floor under any recording kernel of its own."""
    import triton

    global _EMPTY
    if "_EMPTY" not in globals():
        @triton.jit
        def empty(ptr):
            pass

        _EMPTY = empty
    _EMPTY[(1,)](anything)
    return passthrough


class MoELayer:
    def __init__(self, seed: int, device, hidden=HIDDEN, inter=INTER):
        g = torch.Generator(device=device).manual_seed(seed)
        bf16 = dict(dtype=torch.bfloat16, device=device, generator=g)
        self.inter = inter
        self.gate_w = torch.randn((NUM_LOGICAL, hidden), **bf16) * hidden**-0.5
        # [E, N, K] like vLLM's w13/w2; _grouped_mm takes [E, K, N] (a transposed view: column-major, as it wants)
        self.w13 = (torch.randn((NUM_PHYSICAL, 2 * inter, hidden), **bf16) * hidden**-0.5).transpose(1, 2)
        self.w2 = (torch.randn((NUM_PHYSICAL, hidden, inter), **bf16) * inter**-0.5).transpose(1, 2)
        try:  # the layout _grouped_mm wants can differ between torch releases: fall back to row-major
            torch._grouped_mm(torch.zeros((1, hidden), dtype=torch.bfloat16, device=device), self.w13,
                              offs=torch.ones(NUM_PHYSICAL, dtype=torch.int32, device=device))
        except RuntimeError as error:
            print(f"_grouped_mm refused the column-major weights ({str(error)[:120]}): row-major copies")
            self.w13, self.w2 = self.w13.contiguous(), self.w2.contiguous()

    def experts(self, xs, offs):
        h = torch._grouped_mm(xs, self.w13, offs=offs)
        a = F.silu(h[:, : self.inter]) * h[:, self.inter :]
        return torch._grouped_mm(a, self.w2, offs=offs)

    def forward(self, x, step, state):
        weights, ids = torch.topk(torch.softmax((x @ self.gate_w.T).float(), dim=-1), TOP_K, dim=-1)
        physical, after = step(ids.to(torch.int32), state)
        flat = physical.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(NUM_PHYSICAL, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        if after is not None:
            after(counts)
        offs = counts.cumsum(0).to(torch.int32)
        y = self.experts(x.index_select(0, order // TOP_K), offs)
        out = torch.empty_like(y).index_copy_(0, order, y).view(x.shape[0], TOP_K, -1)
        return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1), counts


def check_numerators(steps, tokens, device) -> list[str]:
    """Every numerator's ids and load against vLLM 0.33.0's on fresh random ids (gate on, all rows real)."""
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, NUM_LOGICAL, (tokens, TOP_K), generator=g, dtype=torch.int32).to(device)
    results = {}
    for name in ("vllm_0.33.0", "vllm_0.34.0", "ours", "map_only"):
        if name not in steps:
            continue
        state = EplbState(tokens, device)
        physical, after = steps[name](ids, state)
        if after is not None:
            after(torch.bincount(physical.reshape(-1).long(), minlength=NUM_PHYSICAL).to(torch.int32))
        results[name] = (physical.cpu(), state.load.cpu())
    ref_ids, ref_load = results["vllm_0.33.0"]
    problems = [f"T={tokens} {n}: ids differ" for n, (i, _) in results.items() if not torch.equal(i, ref_ids)]
    problems += [f"T={tokens} {n}: load differs" for n in ("vllm_0.34.0", "ours")
                 if n in results and not torch.equal(results[n][1], ref_load)]
    if int(ref_load.sum()) != tokens * TOP_K or results["map_only"][1].any():
        problems.append(f"T={tokens}: load sum {int(ref_load.sum())} != T*k, or map_only recorded")
    return problems


def _graph(fn):
    return capture_cuda_graph(lambda _layer: fn(), layers=1)


def _time(graphs: dict, per_graph: int, replays: int, repeats: int) -> dict:
    """µs per unit (graph time / per_graph): (median, spread) of ``repeats`` samples, graphs interleaved."""
    samples = time_graphs(graphs, per_graph, replays, repeats)
    return {n: (statistics.median(s), max(s) - min(s)) for n, s in samples.items()}


def time_tokens(tokens: int, kernels: dict, layers: list, bandwidth_gbs: float, device, repeats: int,
                vllm_layers=None) -> dict:
    steps, path = recording_steps(kernels, tokens, device)
    problems = check_numerators(steps, tokens, device)
    row = {"T": tokens, "ours_path": path, "problems": problems}
    g = torch.Generator().manual_seed(1000 + tokens)

    # 1. Numerators alone: 58 layers, each with its own ids and load, in one graph.
    ids = [torch.randint(0, NUM_LOGICAL, (tokens, TOP_K), generator=g, dtype=torch.int32).to(device)
           for _ in range(REC_LAYERS)]
    states = [EplbState(tokens, device) for _ in range(REC_LAYERS)]
    counts = [torch.randint(0, tokens + 1, (NUM_PHYSICAL,), generator=g, dtype=torch.int32).to(device)
              for _ in range(REC_LAYERS)]

    def all_layers(step):
        def run():
            for i in range(REC_LAYERS):
                _, after = step(ids[i], states[i])
                if after is not None:
                    after(counts[i])
        return run

    if device.type != "cuda":  # the same calls once, no graphs, no timing
        for name in NUMERATORS:
            all_layers(steps[name])()
        xs = torch.randn((tokens, layers[0].gate_w.shape[1]), generator=g).to(torch.bfloat16)
        outs = {name: layers[0].forward(xs, steps[name], EplbState(tokens, device))[0]
                for name in ["none", *NUMERATORS]}
        if not (all(torch.equal(outs["map_only"], outs[n]) for n in ("vllm_0.33.0", "vllm_0.34.0", "ours"))
                and torch.equal(outs["none"], outs["empty"])):
            problems.append(f"T={tokens}: layer outputs differ between recording steps")
        return row
    graphs = {name: _graph(all_layers(steps[name])) for name in NUMERATORS if name in steps}
    alone = _time(graphs, REC_LAYERS, replays=20, repeats=repeats)
    row["alone_us"] = {n: round(m, 3) for n, (m, _) in alone.items()}
    row["alone_spread_us"] = round(max(s for _, s in alone.values()), 3)
    del graphs

    # 2. The layer, with each step inside: LAYER_COPIES layers of distinct weights per graph.
    x = [torch.randn((tokens, HIDDEN), generator=g).to(torch.bfloat16).to(device) for _ in layers]
    lstates = [EplbState(tokens, device) for _ in layers]
    active = []

    def layer_run(step):
        def run():
            for layer, xi, s in zip(layers, x, lstates):
                layer.forward(xi, step, s)
        return run

    for layer, xi, s in zip(layers, x, lstates):
        _, c = layer.forward(xi, steps["map_only"], s)
        active.append(int((c > 0).sum()))
    names = ["none", *[n for n in NUMERATORS if n in steps]]
    graphs = {name: _graph(layer_run(steps[name])) for name in names}
    replays = 10 if tokens <= 512 else 3
    layer = _time(graphs, len(layers), replays=replays, repeats=repeats)
    del graphs
    if vllm_layers is not None:  # vLLM's own layer, same inputs (vllm_fused_layer.py)
        import vllm_fused_layer

        try:
            problems += vllm_fused_layer.check(vllm_layers, tokens, x[0])
            row["vllm_layer_us"] = vllm_fused_layer.time_layers(vllm_layers, x, _graph, _time, replays, repeats)
        except Exception as error:  # keep the grouped-GEMM numbers: a device call is precious
            traceback.print_exc()
            problems.append(f"T={tokens} vLLM layer: {type(error).__name__}: {str(error)[:300]}")

    # 3. The experts alone (two grouped GEMMs + activation) on the layer's dispatched rows.
    experts_in = []
    for layer_, xi in zip(layers, x):
        flat = torch.randint(0, NUM_PHYSICAL, (tokens * TOP_K,), generator=g).to(device)
        order = torch.argsort(flat, stable=True)
        offs = torch.bincount(flat, minlength=NUM_PHYSICAL).cumsum(0).to(torch.int32)
        experts_in.append((layer_.experts, xi.index_select(0, order // TOP_K), offs))
    experts = _time({"experts": _graph(lambda: [f(xs, o) for f, xs, o in experts_in])}, len(layers),
                    replays=replays, repeats=repeats)["experts"]

    expert_bytes = 3 * HIDDEN * INTER * 2
    weight_bytes = statistics.mean(active) * expert_bytes + NUM_LOGICAL * HIDDEN * 2
    row.update({
        "layer_us": round(layer["none"][0], 2),
        "layer_spread_us": round(max(s for _, s in layer.values()), 2),
        "layer_with_us": {n: round(layer[n][0], 2) for n in names if n != "none"},
        "experts_us": round(experts[0], 2),
        "active_experts": round(statistics.mean(active), 1),
        "weight_mb": round(weight_bytes / 1e6, 1),
        "floor_us": round(weight_bytes / (bandwidth_gbs * 1e3), 2),
    })
    return row


def machine() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = smi.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "?"
    else:
        info["device"], info["driver"] = "cpu", "-"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-src", action="append", help="one release's vLLM sources (repeatable; default "
                        ".vllm_src and .vllm_src/v0.34.0)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--vllm-moe-ops", metavar="SO", help="vLLM 0.26.0's _moe_C .so, with vLLM 0.33.0's Python "
                        "and the GPU harness on PYTHONPATH: also time vLLM's own layer (vllm_fused_layer.py)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device(args.device)
    kernels = {}
    for src in args.vllm_src or [".vllm_src", ".vllm_src/v0.34.0"]:
        module = load_vllm_router_kernel(src)
        if module.release is None:
            print(f"error: {src} is not vLLM 0.33.0's or 0.34.0's source (sha256 {module.source_sha256})")
            return 1
        kernels[module.release] = module
    info = machine()
    print(json.dumps(info), flush=True)
    if device.type == "cuda":
        bandwidth = copy_bandwidth_gbs(device, nbytes=2 << 30)
        layers = [MoELayer(seed, device) for seed in range(LAYER_COPIES)]
    else:  # the logic at toy sizes: no timing
        bandwidth, layers = 1.0, [MoELayer(0, device, hidden=64, inter=32)]
    print(f"copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    vllm_layers, vllm_kernel = None, None
    if args.vllm_moe_ops:
        import vllm_fused_layer

        vllm_fused_layer.install(args.vllm_moe_ops)
        from vllm.v1.worker.workspace import init_workspace_manager

        from eplb_compile import vllm_plugin

        init_workspace_manager(device)  # the modular kernel's scratch buffers, as vLLM's GPU worker sets up
        vllm_plugin.register()
        l2p, replicas = placement(device)
        vllm_layers = vllm_fused_layer.VllmLayers(LAYER_COPIES, device, hidden=HIDDEN, inter=INTER, top_k=TOP_K,
                                                  l2p=l2p, replicas=replicas)
        vllm_kernel = vllm_layers.kernel_names()
        print("vLLM layer:", vllm_kernel, flush=True)
    rows = []
    result = {**info, "copy_bandwidth_gbs": round(bandwidth, 1), "layers_per_graph": LAYER_COPIES,
              "recording_layers": REC_LAYERS, "repeats": args.repeats,
              "shape": dict(hidden=HIDDEN, intermediate=INTER, top_k=TOP_K, num_logical=NUM_LOGICAL,
                            num_redundant=NUM_REDUNDANT, map_slots=SLOTS, dtype="bfloat16"),
              "vllm_layer_kernel": vllm_kernel,
              "crossover_tokens": plans.count_path_min_tokens(device) if device.type == "cuda" else None,
              "rows": rows}
    path = pathlib.Path(args.out) / "vllm_layer_cost.json"
    for tokens in map(int, args.tokens.split(",")):
        try:
            row = time_tokens(tokens, kernels, layers, bandwidth, device, args.repeats, vllm_layers)
        except Exception as error:  # report, keep the other sizes: a device call is precious
            traceback.print_exc()
            row = {"T": tokens, "problems": [f"T={tokens}: {type(error).__name__}: {str(error)[:300]}"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":  # after every size: a call cut short by its time limit keeps what it timed
            torch.cuda.empty_cache()
            path.write_text(json.dumps(result, indent=1))
    problems = [p for r in rows for p in r["problems"]]
    if device.type == "cuda":
        print("wrote", path)
        print(f"\n{'T':>5} {'layer':>8} {'vllm':>8} {'stock':>8} {'plugin':>8} {'standin':>8} {'experts':>8} "
              f"{'floor':>7} {'v0.33':>6} {'v0.34':>6} {'ours':>6} {'map':>6} {'empty':>6}  path")
        for r in rows:
            if "floor_us" not in r:
                continue
            a = r["alone_us"]
            v = r.get("vllm_layer_us", {})
            print(f"{r['T']:>5} {r['layer_us']:>8.1f} "
                  + "".join(f"{v[n]:>9.1f}" if n in v else f"{'-':>9}" for n in ("off", "stock", "plugin", "standins"))
                  + f" {r['experts_us']:>8.1f} {r['floor_us']:>7.1f} "
                  f"{a['vllm_0.33.0']:>6.2f} {a['vllm_0.34.0']:>6.2f} {a['ours']:>6.2f} {a['map_only']:>6.2f} "
                  f"{a['empty']:>6.2f}  {r['ours_path']}")
    print(f"checks: {len(problems)} problems", *problems[:20], sep="\n  ")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
