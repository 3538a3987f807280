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
SHAPES = ("Timed in CUDA graphs, 4 layers of distinct weights per graph (1.25 GB each, far past L2); hidden "
          "2048, intermediate 1408, 64 logical + 8 redundant experts (72 physical, one rank), top-8, bf16, uniform "
          "random routing. ")
VLLM_LAYER = (
    "**vLLM layer**: vLLM 0.33.0's own non-batched MoE layer as it serves unquantized bf16 on one Hopper GPU: "
    "the gate GEMM, then `FusedMoEFactory`'s `MoERunner` (`FusedTopKRouter`, softmax top-8 renormalised, EPLB) "
    "with the kernel vLLM's oracle picks there, `MoEPrepareAndFinalizeNoDPEPModular` + `TritonExperts` (its "
    "untuned default config: vLLM ships no tuned file for E=64 or 72, N=1408 on these cards). **EPLB off** is "
    "the model without EPLB (64 experts); **vLLM's recording** and **ours** are EPLB on (72 experts, so more "
    "experts' weights read) with stock vLLM's step or the plugin's. It runs vLLM 0.33.0's Python; its compiled "
    "`_moe_C` ops (`topk_softmax`, `moe_align_block_size`, `moe_sum`) are vLLM 0.26.0's binary (the newest "
    "built for the GPU machine's torch 2.11; small adapters pass 0.33.0's calls to their older schemas) and "
    "`silu_and_mul` is one Triton kernel (vLLM's is one CUDA kernel). **With the harness's stand-ins** is the "
    "same layer with the GPU harness's plain-torch `topk_softmax` and `silu_and_mul`: how far those distort "
    "it. Checked first at every T: the plugin's output bitwise equal to stock vLLM's, every EPLB variant's load "
    "equal to a count of the router's ids, the router's ids a top-8 of the softmax, and at T <= 64 every "
    "variant within bf16 error of an fp32 reference. **largest spread**: max − min of one variant's samples, "
    "the largest of the four; a difference between variants inside it is noise. The floor counts the 72 physical "
    "experts' weights, so it is compared with EPLB on. "
)
NO_VLLM_LAYER = ("vLLM's own non-batched layer was not timed in this run (it needs `--vllm-moe-ops`: vLLM's "
                 "Python and compiled MoE ops on the GPU machine). ")
METHOD = (
    "**grouped-GEMM layer**: gate GEMM, softmax top-8, the recording step, sort by expert, two "
    "`torch._grouped_mm` with SiLU-and-mul between, un-sort and weighted sum (EPLB off); **experts**: its two "
    "GEMMs and the activation alone; **floor**: bytes of the experts the batch touches plus the gate / the "
    "card's measured copy bandwidth. Numerators, in the same run: each step alone in one CUDA graph of 58 "
    "layers, each layer with its own `[T, 8]` int32 ids and load (µs per layer, median of {repeats} samples of "
    "20 replays; the layers: median of {repeats} samples); every numerator checked against vLLM 0.33.0's ids "
    "and load first. \"ours\" is what the plugin runs at that T (the topk path below the card's crossover; in "
    "vLLM's layer the topk path at every T, since its no-EP prepare/finalize gives no per-expert counts). A/B: "
    "the layer with the step inside minus the layer without; noisier than the step alone (spread column). "
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


def _has_vllm_layer(rows: list[dict]) -> bool:
    return all("vllm_layer_us" in r for r in rows)


def _layer_us(r: dict) -> float:
    """The denominator shares and decode steps use: vLLM's own layer (EPLB off) where the run timed it."""
    return r["vllm_layer_us"]["off"] if "vllm_layer_us" in r else r["layer_us"]


def vllm_layer_table(rows: list[dict]) -> str:
    header = ["T", "EPLB off", "EPLB on, vLLM's recording", "EPLB on, ours", "ours − vLLM's, inside",
              "largest spread", "with the harness's stand-ins", "stand-ins add", "grouped-GEMM layer", "floor",
              "EPLB on, ours / floor"]
    body = []
    for r in rows:
        v = r["vllm_layer_us"]
        body.append([str(r["T"]), fmt(v["off"], ".1f"), fmt(v["stock"], ".1f"), fmt(v["plugin"], ".1f"),
                     f"{v['plugin'] - v['stock']:+.1f}", fmt(v["spread"], ".1f"), fmt(v["standins"], ".1f"),
                     f"{v['standins'] - v['stock']:+.1f} ({100 * (v['standins'] / v['stock'] - 1):+.0f} %)",
                     fmt(r["layer_us"], ".1f"), fmt(r["floor_us"], ".1f"), f"{v['plugin'] / r['floor_us']:.2f}"])
    return markdown_table(header, body)


def cost_table(rows: list[dict]) -> str:
    header = ["T", "grouped-GEMM layer", "experts", "floor (active experts)", *NUMERATORS.values(), "ours − map only",
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
    """Each numerator's share of each denominator; vLLM 0.33.0's only of the headline layer."""
    denominators = [("vLLM layer", lambda r: r["vllm_layer_us"]["off"])] if _has_vllm_layer(rows) else []
    denominators += [("grouped-GEMM layer" if denominators else "layer", lambda r: r["layer_us"]),
                     ("experts", lambda r: r["experts_us"]), ("floor", lambda r: r["floor_us"])]
    columns = [(name, whole, who) for i, (name, whole) in enumerate(denominators)
               for who in (["vllm_0.33.0"] if i == 0 else []) + ["vllm_0.34.0", "ours"]]
    short = {"vllm_0.33.0": "vLLM 0.33", "vllm_0.34.0": "vLLM 0.34", "ours": "ours"}
    header = ["T", *[f"{short[who]} / {name}" for name, _, who in columns]]
    body = [[str(r["T"]), *[_pct(r["alone_us"][who], whole(r)) for _, whole, who in columns]] for r in rows]
    return markdown_table(header, body)


def ab_table(rows: list[dict]) -> str:
    header = ["T", "grouped-GEMM layer, EPLB off", *[f"+ {label}" for label in NUMERATORS.values()], "largest spread"]
    body = [[str(r["T"]), fmt(r["layer_us"], ".1f"),
             *[f"{r['layer_with_us'][n] - r['layer_us']:+.1f}" for n in NUMERATORS], fmt(r["layer_spread_us"], ".1f")]
            for r in rows]
    return markdown_table(header, body)


def decode_step_lines(rows: list[dict]) -> list[str]:
    """What one decode step of a 58-layer model spends on recording, per T up to 128."""
    lines, whose = [], " (vLLM's layer, EPLB off)" if _has_vllm_layer(rows) else ""
    for r in rows:
        if r["T"] > MARGINAL_MAX_T:
            continue
        a, layer = r["alone_us"], _layer_us(r)
        step = MODEL_LAYERS * layer
        lines.append(f"- T={r['T']}: MoE layers {step / 1e3:.2f} ms{whose}; recording vLLM 0.33.0 "
                     f"{MODEL_LAYERS * a['vllm_0.33.0']:.0f} µs, vLLM 0.34.0 {MODEL_LAYERS * a['vllm_0.34.0']:.0f} µs, "
                     f"ours {MODEL_LAYERS * a['ours']:.0f} µs (saves {MODEL_LAYERS * (a['vllm_0.34.0'] - a['ours']):.0f}"
                     f" µs per step vs 0.34.0, {100 * (a['vllm_0.34.0'] - a['ours']) / layer:.2f} % of the "
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


def render(json_path: Path, method: str | None = None) -> list[Path]:
    """Write ``<stem>.md`` (and ``<stem>.png`` with matplotlib) beside ``json_path``; the paths written."""
    title, data, rows = _load(json_path)
    md = Path(json_path).with_suffix(".md")
    problems = [p for r in data["rows"] for p in r.get("problems", [])]
    vllm = _has_vllm_layer(rows)
    if method is None:
        method = SHAPES + (VLLM_LAYER if vllm else NO_VLLM_LAYER) + METHOD.replace("{repeats}",
                                                                               str(data.get("repeats", 7)))
    passed = "all numerators equal to vLLM 0.33.0 (ids and load) at every T" + (
        ", and vLLM's layer passed its checks" if vllm else "")
    text = ["# What EPLB recording costs inside a MoE layer: vLLM 0.33.0, vLLM 0.34.0 and ours\n",
            f"{title}. {method}\n",
            f"Checks before timing: {passed if not problems else 'PROBLEMS: ' + '; '.join(problems)}.\n",
            *([f"## vLLM 0.33.0's own layer ({data.get('vllm_layer_kernel') or 'its kernel'}), µs per layer\n",
               vllm_layer_table(rows), ""] if vllm else []),
            "## Microseconds per layer: the recording steps alone, the grouped-GEMM layer\n", cost_table(rows), "",
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
            line = right.plot(tokens, [100 * r["alone_us"][name] / _layer_us(r) for r in rows], marker="o",
                              label=f"{label} / layer")
            right.plot(tokens, [100 * r["alone_us"][name] / r["floor_us"] for r in rows], linestyle=":",
                       color=line[0].get_color(), label=f"{label} / weight-read floor")
    left.set_ylabel("µs per layer (58-layer CUDA graph)")
    left.set_title("recording step alone", fontsize=9)
    right.set_ylabel("share (%)")
    right.set_yscale("log")
    which = "vLLM's MoE layer" if _has_vllm_layer(rows) else "the MoE layer"
    right.set_title(f"share of {which} (solid) and of the weight-read floor (dotted)", fontsize=9)
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
