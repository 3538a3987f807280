"""The recording's cost inside a MoE layer: the device run's JSON as tables, goals and a plot.

``tests/device/moe_layer_cost.py`` (on a GPU) writes ``vllm_layer_cost.json``:
per tokens-per-rank T, a grouped-GEMM MoE layer's time, its experts' time and
its weight-read floor (the denominators), and, in one run on one card, vLLM
0.33.0's and 0.34.0's recording kernels, ours on the plugin's path, ours
map-only and an empty kernel, each alone in a 58-layer CUDA graph (the
numerators), plus each inside the layer (A/B). :func:`render` writes
``vllm_layer_cost.md`` and ``.png`` beside it (the PNG only where matplotlib
is installed). Plain Python: no GPU needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from eplb_compile.bench.report import fmt, markdown_table, plot_unavailable

MARGINAL_MAX_US = 0.3  # ours - map-only, at decode sizes
MARGINAL_MAX_T = 128
MODEL_LAYERS = 58
NUMERATORS = {"vllm_0.33.0": "vLLM 0.33.0", "vllm_0.34.0": "vLLM 0.34.0", "ours": "ours",
              "map_only": "ours, map only", "empty": "empty kernel"}
METHOD = (
    "Denominator: a grouped-GEMM MoE layer (`torch._grouped_mm`) timed in CUDA graphs: gate GEMM, softmax "
    "top-8, the recording step, sort by expert, the experts' two grouped GEMMs with SiLU-and-mul between, "
    "un-sort and weighted sum; hidden 2048, intermediate 1408, 64 logical + 8 redundant experts (72 physical, "
    "one rank), bf16, uniform random routing, 4 layers of distinct weights per graph (1.25 GB each, far past L2). "
    "Why not vLLM's own layer: its non-batched fused-MoE path needs `_moe_C::moe_align_block_size` and "
    "`moe_sum`, compiled ops whose binaries in vLLM 0.33.0 and 0.34.0 (built for torch 2.14) do not load on the "
    "GPU machine (torch 2.11); vLLM 0.26.0's (pinned to torch 2.11) do load there and agree with plain torch "
    "(`tests/device/probe_vllm_moe_ops.py`), so vLLM's own layer is the next denominator to time; "
    "and the GPU harness's batched layer pads every expert to the batch maximum (238 µs at T=1 on the H200, "
    "7x the weight-read floor), which makes shares look far smaller than in serving. Three denominators: "
    "**layer** (the whole layer, EPLB off), **experts** (the two grouped GEMMs and the activation alone on the "
    "layer's dispatched rows: what a fully fused layer approaches), **floor** (bytes of the experts the batch "
    "touches plus the gate / the card's measured copy bandwidth). Numerators, in the same run: each step alone "
    "in one CUDA graph of 58 layers, each layer with its own `[T, 8]` int32 ids and load (µs per layer, median "
    "of 7 samples of 20 replays); every numerator checked against vLLM 0.33.0's ids and load first. \"ours\" is "
    "what the plugin runs at that T (topk path below the card's crossover). A/B: the layer with the step inside "
    "minus the layer without; noisier than the step alone (spread column). "
    "`bash tests/device/run_layer_cost.sh` (writes the JSON), then `python -m eplb_compile.bench.layer_cost JSON`."
)


def _load(json_path: Path) -> tuple[str, dict, list[dict]]:
    data = json.loads(Path(json_path).read_text())
    if "copy_bandwidth_gbs" not in data:
        raise ValueError(f"{Path(json_path).name} is from the older batched-layer run, which had no weight-read "
                         "floor and one vLLM release: re-run `bash tests/device/run_layer_cost.sh`")
    title = (f"{data['device']} (driver {data['driver']}); torch {data['torch']}, Triton {data['triton']}, "
             f"CUDA {data['cuda']}; copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s (read + write)")
    complete = [r for r in data["rows"] if "floor_us" in r]  # a size that failed on the device has only problems
    return title, data, sorted(complete, key=lambda r: r["T"])


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f} %"


def cost_table(rows: list[dict]) -> str:
    header = ["T", "layer", "experts", "floor (active experts)", *NUMERATORS.values(), "ours − map only",
              "ours / vLLM 0.34", "ours / vLLM 0.33", "vLLM 0.34 / empty"]
    body = []
    for r in rows:
        a = r["alone_us"]
        body.append([str(r["T"]), fmt(r["layer_us"], ".1f"), fmt(r["experts_us"], ".1f"),
                     f"{fmt(r['floor_us'], '.1f')} ({r['active_experts']:g})",
                     *[fmt(a[n]) + (f" ({r['ours_path']})" if n == "ours" else "") for n in NUMERATORS],
                     fmt(a["ours"] - a["map_only"]), f"{a['ours'] / a['vllm_0.34.0']:.2f}",
                     f"{a['ours'] / a['vllm_0.33.0']:.2f}", f"{a['vllm_0.34.0'] / a['empty']:.2f}"])
    return markdown_table(header, body)


def share_table(rows: list[dict]) -> str:
    header = ["T", "vLLM 0.33 / layer", "vLLM 0.34 / layer", "ours / layer", "vLLM 0.34 / experts",
              "ours / experts", "vLLM 0.34 / floor", "ours / floor"]
    body = []
    for r in rows:
        a = r["alone_us"]
        body.append([str(r["T"]), _pct(a["vllm_0.33.0"], r["layer_us"]), _pct(a["vllm_0.34.0"], r["layer_us"]),
                     _pct(a["ours"], r["layer_us"]), _pct(a["vllm_0.34.0"], r["experts_us"]),
                     _pct(a["ours"], r["experts_us"]), _pct(a["vllm_0.34.0"], r["floor_us"]),
                     _pct(a["ours"], r["floor_us"])])
    return markdown_table(header, body)


def ab_table(rows: list[dict]) -> str:
    header = ["T", "layer, EPLB off", *[f"+ {label}" for label in NUMERATORS.values()], "largest spread"]
    body = [[str(r["T"]), fmt(r["layer_us"], ".1f"),
             *[f"{r['layer_with_us'][n] - r['layer_us']:+.1f}" for n in NUMERATORS], fmt(r["layer_spread_us"], ".1f")]
            for r in rows]
    return markdown_table(header, body)


def decode_step_lines(rows: list[dict]) -> list[str]:
    """What one decode step of a 58-layer model spends on recording, per T up to 128."""
    lines = []
    for r in rows:
        if r["T"] > MARGINAL_MAX_T:
            continue
        a, step = r["alone_us"], MODEL_LAYERS * r["layer_us"]
        lines.append(f"- T={r['T']}: MoE layers {step / 1e3:.2f} ms; recording vLLM 0.33.0 "
                     f"{MODEL_LAYERS * a['vllm_0.33.0']:.0f} µs, vLLM 0.34.0 {MODEL_LAYERS * a['vllm_0.34.0']:.0f} µs, "
                     f"ours {MODEL_LAYERS * a['ours']:.0f} µs (saves {MODEL_LAYERS * (a['vllm_0.34.0'] - a['ours']):.0f}"
                     f" µs per step vs 0.34.0, {100 * (a['vllm_0.34.0'] - a['ours']) / r['layer_us']:.2f} % of the "
                     f"MoE time); mapping alone {MODEL_LAYERS * a['map_only']:.0f} µs")
    return lines


def goals(rows: list[dict]) -> list[str]:
    worse = [r["T"] for r in rows if r["alone_us"]["ours"] > r["alone_us"]["vllm_0.34.0"]]
    over = [r["T"] for r in rows if r["T"] <= MARGINAL_MAX_T
            and r["alone_us"]["ours"] - r["alone_us"]["map_only"] > MARGINAL_MAX_US]
    worst = max((r["alone_us"]["ours"] - r["alone_us"]["map_only"], r["T"]) for r in rows if r["T"] <= MARGINAL_MAX_T)
    return [
        f"- ours <= vLLM 0.34.0's recording at every T: {'met' if not worse else 'MISSED at ' + str(worse)}",
        f"- recording's marginal cost over map-only <= {MARGINAL_MAX_US} µs at T <= {MARGINAL_MAX_T}: "
        f"{'met' if not over else 'MISSED at ' + str(over)} (largest {worst[0]:.2f} µs at T={worst[1]})",
    ]


def section(json_path: Path) -> str:
    """The cost table and the goals, for the bench's report (``bench_results.md``)."""
    try:
        title, _, rows = _load(json_path)
    except ValueError as error:
        return f"Not shown: {error}."
    return "\n".join([f"{title}; {Path(json_path).name}, written by `bash tests/device/run_layer_cost.sh`; µs per "
                      f"layer ({Path(json_path).with_suffix('.md').name} says how).\n", cost_table(rows), "",
                      "Goals (one run, one card):", *goals(rows)])


def render(json_path: Path, method: str = METHOD) -> list[Path]:
    """Write ``<stem>.md`` (and ``<stem>.png`` with matplotlib) beside ``json_path``; the paths written."""
    title, data, rows = _load(json_path)
    md = Path(json_path).with_suffix(".md")
    problems = [p for r in data["rows"] for p in r.get("problems", [])]
    text = ["# What EPLB recording costs inside a MoE layer: vLLM 0.33.0, vLLM 0.34.0 and ours\n",
            f"{title}. {method}\n",
            f"Checks before timing: {'all numerators equal to vLLM 0.33.0 (ids and load) at every T' if not problems else 'PROBLEMS: ' + '; '.join(problems)}.\n",
            "## Microseconds per layer\n", cost_table(rows), "",
            "## Share of the layer\n", share_table(rows), "",
            f"## Per decode step of a {MODEL_LAYERS}-layer model (MoE layers only)\n", *decode_step_lines(rows), "",
            "## Inside the layer (A/B: layer with the step minus layer without, µs)\n", ab_table(rows), "",
            "## Goals (one run, one card)\n", *goals(rows)]
    written = [md]
    if plot_unavailable() is None:
        png = md.with_suffix(".png")
        _plot(png, rows, data["device"])
        text += ["", f"![recording cost and share of the MoE layer]({png.name})"]
        written.append(png)
    md.write_text("\n".join(text) + "\n")
    return written


def _plot(path: Path, rows: list[dict], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["T"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, label in NUMERATORS.items():
        left.plot(tokens, [r["alone_us"][name] for r in rows], marker="o", label=label)
        if name in ("vllm_0.33.0", "vllm_0.34.0", "ours"):
            line = right.plot(tokens, [100 * r["alone_us"][name] / r["layer_us"] for r in rows], marker="o",
                              label=f"{label} / layer")
            right.plot(tokens, [100 * r["alone_us"][name] / r["floor_us"] for r in rows], linestyle=":",
                       color=line[0].get_color(), label=f"{label} / weight-read floor")
    left.set_ylabel("µs per layer (58-layer CUDA graph)")
    left.set_title("recording step alone", fontsize=9)
    right.set_ylabel("share (%)")
    right.set_yscale("log")
    right.set_title("share of the MoE layer (solid) and of its weight-read floor (dotted)", fontsize=9)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens], fontsize=7)
        ax.set_xlabel("tokens per rank")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"EPLB recording inside a MoE layer, {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    print("wrote", *render(Path(sys.argv[1] if len(sys.argv) > 1 else "graphs/vllm_layer_cost.json")))
