"""``eplb-compile bench``: the load update's kernels, timed per MoE layer on one GPU.

Defaults: 256 logical + 32 redundant experts (288 physical), top-8, 8 EP
ranks (36 local experts), Zipf-skewed routing with a per-layer EPLB
placement, vLLM 0.34.0's map shape ``[256, 33]`` (``--map-slots 1024``: 0.33.0's), 58 layers in one CUDA graph
(``timing.py`` says how device and host time are measured).

Every implementation is first checked bit-identical (ids and load; gate on,
gate off, no padding tensor, half padded) against
``eplb_compile.reference.expected_map_and_record``; a wrong one is reported,
never timed, and the command exits 1.

Modules: ``inputs`` (workload), ``impls`` (what is timed and its check),
``timing``, ``plan`` (``--topk-plan auto``: derive and write a plan file),
``report``, ``layer_cost`` (the MoE-layer run's table: with
``vllm_layer_cost.json`` in ``--out``, the report includes it and its goals).
The bench never edits library state or source.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from eplb_compile.cli import bounded_int

DEFAULT_TOKENS = (1, 16, 128, 512, 2048, 8192, 16384, 32768)
QUICK_TOKENS = (1, 128, 512, 2048, 32768)
MAX_TOKENS = 2**22  # tokens per rank: far past any batch one rank runs
ID_DTYPES = ("int16", "int32", "int64")  # torch dtypes by name: the CLI builds this parser without importing torch

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


def _token_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1 or values[-1] > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected token counts from 1 to {MAX_TOKENS}, got {text!r}")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=_token_list, default=None,
                        help=f"comma-separated tokens per rank (default {','.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--layers", type=bounded_int(1, 1024), default=58, help="MoE layers captured in one CUDA graph")
    parser.add_argument("--repeats", type=bounded_int(1, 1000), default=5, help="timed samples per figure (median; at least 5)")
    parser.add_argument("--replays", type=bounded_int(1, 100_000), default=20, help="graph replays per timed sample")
    parser.add_argument("--vllm-src", default=os.environ.get("EPLB_VLLM_SRC", ".vllm_src"),
                        help="folder holding vLLM's sources, for its kernel (env EPLB_VLLM_SRC)")
    parser.add_argument("--out", type=Path, default=Path("graphs"),
                        help="folder for bench_results.{csv,md,png} and the plan file (default: graphs)")
    parser.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, fewer replays")
    parser.add_argument("--topk-plan", default="card", choices=["card", "auto"],
                        help="card: time the plan the operators use on this card; auto: also derive a plan "
                             "from this run's variant table, time it and write device_name=<NAME>.json to --out")
    parser.add_argument("--num-logical", type=bounded_int(1, 65536), default=256)
    parser.add_argument("--num-redundant", type=bounded_int(0, 65536), default=32)
    parser.add_argument("--top-k", type=bounded_int(1, 1024), default=8)
    parser.add_argument("--ep-size", type=bounded_int(1, 1024), default=8)
    parser.add_argument("--map-slots", type=bounded_int(1, 65536), default=None,
                        help="map columns (default: --num-redundant + 1, vLLM 0.34.0's width; 0.32.0 and 0.33.0 "
                             "allocate 1024)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    parser.add_argument("--id-dtype", default="int32", choices=ID_DTYPES)
    parser.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0)
    parser.add_argument("--host-calls", type=bounded_int(1, 1_000_000), default=100, help="eager calls per host-overhead sample")
    parser.add_argument("--host-rounds", type=bounded_int(1, 1000), default=15, help="host-overhead samples (median)")


def run_bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("eplb-compile bench: error: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from eplb_compile.kernels import eager_extension

    try:
        eager_extension.enabled()
    except ValueError as error:
        print(f"eplb-compile bench: error: {error}", file=sys.stderr)
        return 2
    if args.num_redundant < 0 or (args.num_logical + args.num_redundant) % args.ep_size:
        print(f"eplb-compile bench: error: --num-logical + --num-redundant must be >= --num-logical and split "
              f"over --ep-size {args.ep_size} ranks", file=sys.stderr)
        return 2
    if args.top_k > args.num_logical:
        print(f"eplb-compile bench: error: --top-k {args.top_k} > --num-logical {args.num_logical}", file=sys.stderr)
        return 2
    if args.map_slots is None:
        args.map_slots = args.num_redundant + 1
    device = torch.device("cuda", torch.cuda.current_device())
    return _run(args, device, torch.cuda.get_device_name(device))


class _Measurer:
    """Checks each implementation, captures the good ones, times them; keeps the failures."""

    def __init__(self, setup, work, expected, replays: int, repeats: int):
        self.setup, self.work, self.expected = setup, work, expected
        self.replays, self.repeats = replays, repeats
        self.samples: dict[int, dict[str, list[float]]] = {t: {} for t in work}
        self.failures: list[str] = []
        self.failed: set[str] = set()

    def _fail(self, tokens: int, name: str, problem: str) -> None:
        self.failed.add(name)
        self.failures.append(f"T={tokens} {name}: {problem}")
        print(f"  not timed: T={tokens} {name}: {problem}")

    def measure(self, impls, tokens: int, rename: dict[str, str] | None = None) -> None:
        from eplb_compile.bench.impls import check_impl, layer_call
        from eplb_compile.bench.timing import capture_cuda_graph, time_graphs

        rename = rename or {}
        w = self.work[tokens]
        graphs = {}
        for impl in impls:
            try:
                problem = check_impl(impl, self.setup, w, self.expected[tokens])
            except Exception as error:  # noqa: BLE001 - a crash is a failed check, reported
                problem = f"{type(error).__name__}: {error}"
            if problem:
                self._fail(tokens, impl.name, f"WRONG: {problem}")
                continue
            w.loads.zero_()
            try:
                graphs[rename.get(impl.name, impl.name)] = capture_cuda_graph(layer_call(impl, self.setup, w), self.setup.layers)
            except Exception as error:  # noqa: BLE001 - report it, time the others
                self._fail(tokens, impl.name, f"CUDA graph capture failed: {type(error).__name__}: {error}")
        self.samples[tokens].update(time_graphs(graphs, self.setup.layers, self.replays, self.repeats))

    def medians(self) -> dict[int, dict[str, float]]:
        return {t: {n: statistics.median(v) for n, v in s.items()} for t, s in self.samples.items()}


def _run(args: argparse.Namespace, device: torch.device, gpu: str) -> int:
    import torch
    import triton

    from eplb_compile.bench import impls, inputs, plan, report
    from eplb_compile.bench.timing import copy_bandwidth_gbs, host_overheads
    from eplb_compile.kernels import cuda_variants, eager_extension, plans

    tokens_list = list(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS))
    replays = max(5, args.replays // 2) if args.quick else args.replays
    repeats = max(5, args.repeats)
    host_rounds = max(5, args.host_rounds // 2) if args.quick else args.host_rounds
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    no_plot = report.plot_unavailable()
    if no_plot:
        print(no_plot)

    vllm_fn, vllm_status = impls.load_vllm(args.vllm_src)
    launcher = eager_extension.wait()  # the eager calls below time what users run
    launcher_status = "built" if launcher is not None else f"not used ({eager_extension.state()}): Python path"
    reference = "vllm" if vllm_fn is not None else impls.VARIANT_PREFIX + "triton"
    card_plan = plans.plan_for_device(device)
    print(f"# eplb-compile bench on {gpu}; torch {torch.__version__}, Triton {triton.__version__}; {stamp}")
    print(f"# vLLM: {vllm_status}; ratios against: {reference}; C++ eager launcher: {launcher_status}")
    print(f"# the operators' plan on this card: {card_plan.topk_plan}, crossover {card_plan.count_path_min_tokens} "
          f"(from {card_plan.source})")
    setup = inputs.build_setup(args, device)
    work = {t: inputs.build_workload(setup, t, getattr(torch, args.id_dtype), args.seed) for t in tokens_list}
    expected = {t: inputs.expectations(setup, work[t]) for t in tokens_list}
    m = _Measurer(setup, work, expected, replays, repeats)

    # Phase 1: everything but the topk paths, whose plan may come from these numbers.
    variant_names = ["triton", *cuda_variants.VARIANTS]
    phase1 = impls.base_impls(vllm_fn, topk=False) + impls.variant_impls(variant_names)
    for tokens in tokens_list:
        print(f"  T={tokens}: checking and timing {len(phase1)} implementations")
        m.measure(phase1, tokens)
    medians = m.medians()

    topk, derived = "topk", None
    if args.topk_plan == "auto":
        table = {t: {n: medians[t][impls.VARIANT_PREFIX + n] for n in variant_names
                     if impls.VARIANT_PREFIX + n in medians[t] and impls.VARIANT_PREFIX + n not in m.failed}
                 for t in tokens_list}
        rows = plan.derive_plan(table, setup.k)
        derived = plan.kernel_plan(gpu, rows, card_plan.count_path_min_tokens)
        topk = "topk@derived"
        print(f"# derived plan: {rows}")

    # Phase 2: the topk paths beside map-only timed again (the same kernel
    # twice, phases apart: their difference is this run's noise).
    phase2 = [i for i in impls.base_impls(vllm_fn, topk=True) if i.name in ("topk", "map_only")]
    if derived is not None:
        phase2.append(impls.plan_impl(topk, plan.plan_launcher(derived)))
    for tokens in tokens_list:
        print(f"  T={tokens}: checking and timing the topk path")
        m.measure(phase2, tokens, {"map_only": "map_only@2"})
    medians = m.medians()

    crossover = card_plan.count_path_min_tokens
    plan_lines = [f"Operators' plan on this card: {list(card_plan.topk_plan)}, crossover {crossover} "
                  f"({card_plan.source})."]
    if derived is not None:
        measured = plan.count_path_crossover({t: r["count_path"] for t, r in medians.items() if "count_path" in r},
                                             {t: r[topk] for t, r in medians.items() if topk in r})
        crossover = plan.plan_crossover(measured, tokens_list)
        note = (f"eplb-compile bench --topk-plan auto: {args.num_logical} logical + {args.num_redundant} redundant "
                f"experts, top-{args.top_k}, Zipf s={args.zipf}, {args.layers} layers in one CUDA graph; count path "
                + (f"faster from {measured} tokens/rank" if measured is not None
                   else f"never faster up to {max(tokens_list)} tokens/rank: crossover set past the range"))
        path = plan.write_plan_file(out_dir, gpu, derived.topk_plan, crossover, {
            "torch": torch.__version__, "triton": triton.__version__, "date": stamp[:10], "note": note})
        plan_lines.append(f"Derived plan: {list(derived.topk_plan)}, crossover {crossover}; written to {path} "
                          f"(use it with {plans.PLAN_ENV}={path}).")
        print(f"# wrote {path}")

    try:
        host = host_overheads(setup, work, vllm_fn, args.host_calls, host_rounds)
    except Exception as error:  # noqa: BLE001 - keep the timings; say what failed
        m.failures.append(f"host overhead: {type(error).__name__}: {error}")
        host = []

    try:
        card_gbs = copy_bandwidth_gbs(device)
    except Exception as error:  # noqa: BLE001 - e.g. no free GiB: the table says "not measured"
        m.failures.append(f"copy bandwidth: {type(error).__name__}: {error}")
        card_gbs = None
    moved = {t: 2 * w.ids[0].numel() * w.ids[0].element_size() + 8 * setup.num_physical for t, w in work.items()}

    header = (f"{gpu}; torch {torch.__version__}; Triton {triton.__version__}; {stamp}; "
              f"{args.layers} layers in one CUDA graph, median of {repeats} x {replays} replays; "
              f"{args.num_logical}+{args.num_redundant} experts, top-{args.top_k}, EP {args.ep_size}, "
              f"Zipf s={args.zipf}, ids {args.id_dtype}, map slots {args.map_slots}")
    text = "\n".join([
        f"## Results (µs per MoE layer; goals use `{topk}`)", report.results_table(medians, reference, topk),
        "\n## Topk-path variants (µs per layer, explicit launchers)", report.variant_table(medians, variant_names),
        "", *plan_lines,
        "\n## Achieved bandwidth (per layer, one launch each)", report.bandwidth_table(medians, moved, card_gbs, topk),
        "\n## Goals", *report.goals(medians, tokens_list, reference, topk, crossover, host),
        "\n## Eager host cost per call (GPU kept busy; median of rounds)", report.host_table(host),
    ])
    layer_json = out_dir / "vllm_layer_cost.json"  # the MoE-layer run's, if one wrote it here
    if layer_json.is_file():
        from eplb_compile.bench import layer_cost

        text += "\n\n## Inside a MoE layer\n" + layer_cost.section(layer_json)
    report.write_csv(out_dir / "bench_results.csv", [gpu, torch.__version__, triton.__version__, stamp],
                     m.samples, host)
    png = out_dir / "bench_results.png"
    if not no_plot:
        lines = {reference: reference, "topk": "topk (op)", topk: "topk (derived plan)", "map_only": "map only",
                 "count_path": "count path (2 kernels)", "count_kernel": "count kernel", "floor": "one-kernel floor"}
        try:
            report.plot(png, medians, lines, [impls.VARIANT_PREFIX + n for n in variant_names], header)
        except Exception as error:  # noqa: BLE001 - the numbers matter more than the figure
            print(f"# plot failed: {type(error).__name__}: {error}")
    (out_dir / "bench_results.md").write_text(
        f"# `eplb-compile bench` results\n\n{header}\n\nvLLM: {vllm_status}\n\nC++ eager launcher: {launcher_status}\n\n"
        + ("" if no_plot else f"![µs per layer vs tokens per rank]({png.name})\n\n") + text + "\n")
    print(text)
    print(f"# wrote {out_dir / 'bench_results.csv'}, {out_dir / 'bench_results.md'}"
          + ("" if no_plot else f", {png}"))
    if m.failures:
        print("\nFAILED (not timed):", *m.failures, sep="\n  ")
        return 1
    return 0


__all__ = ["add_bench_arguments", "run_bench"]
