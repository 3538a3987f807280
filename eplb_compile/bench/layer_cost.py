"""The recording's cost inside vLLM's MoE layer: the device run's JSON as a table, goals and a plot.

``tests/device/vllm_moe_layer.py --time`` (vLLM 0.33.0's real layer through
the GPU harness) writes ``vllm_layer_cost.json``; :func:`render` turns it into
``vllm_layer_cost.md`` and ``.png`` beside it (the PNG only where matplotlib
is installed). The share of the layer is the recording step timed alone at
the layer's shapes over the EPLB-off layer's time: the whole-layer A/B
difference is below the layer's own noise. "Ours" is what the plugin runs at
that T: the topk path below the card's crossover, the count path from it.
Plain Python: no GPU needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from eplb_compile.bench.report import fmt, markdown_table, plot_unavailable

SHARE_MAX_PCT = 0.5
METHOD = (
    "vLLM 0.33.0's Python fused-MoE code through the GPU harness: `MoERunner` (`FusedTopKRouter`, "
    "`EplbLayerState`) with `BatchedPrepareAndFinalize` + `BatchedTritonExperts`, hidden 2048, intermediate 1408, "
    "64 logical + 8 redundant experts (72 physical, one GPU so EP 1), top-8, bf16, each configuration captured in "
    "one `torch.cuda.graph`. Layer time: median of 5 samples of 20 (T <= 512) or 4 (T > 512) replays. EPLB off "
    "is the same layer with 72 logical experts and no EPLB state, so its routing differs: the A/B columns (layer "
    "with recording minus EPLB off) follow the experts' token counts, not the recording, and are not used for the "
    "shares. The recording step alone is timed at the layer's shapes (`[T, 8]` int32 ids, the layer's map), 20 "
    "calls per CUDA graph, median of 7; share = that time / the EPLB-off layer. Spread: the largest minus the "
    "smallest layer sample of one configuration. `bash tests/device/run_vllm_layer.sh --checks none --time`."
)


def ours(row: dict, crossover: int) -> str:
    """The lowering the plugin picks at this T (a backend with exact counts)."""
    return "counts" if row["T"] >= crossover else "topk"


def goals(rows: list[dict], crossover: int) -> list[str]:
    picked = {r["T"]: (ours(r, crossover), r[f"{ours(r, crossover)}_alone_us"], r[f"{ours(r, crossover)}_share_pct"])
              for r in rows}
    worse = [r["T"] for r in rows if picked[r["T"]][1] > r["vllm_alone_us"]]
    over = [r["T"] for r in rows if picked[r["T"]][2] > SHARE_MAX_PCT]
    detail = ", ".join(f"{t}: {name} {us:.2f} µs = {pct:.3f} %" for t, (name, us, pct) in picked.items())
    return [
        f"- ours <= vLLM's recording at every T: {'met' if not worse else 'MISSED at ' + str(worse)}",
        f"- ours <= {SHARE_MAX_PCT} % of the layer at every T: "
        f"{'met' if not over else 'MISSED at ' + ', '.join(map(str, over))} ({detail})",
    ]


def table(rows: list[dict]) -> str:
    header = ["T", "layer, EPLB off (µs)", "vLLM recording (µs)", "ours, topk (µs)", "ours, counts (µs)",
              "vLLM share", "topk share", "counts share", "A/B vLLM − off", "A/B topk − off", "A/B counts − off",
              "spread"]
    body = [[str(r["T"]), fmt(r["eplb_off"], ".1f"), fmt(r["vllm_alone_us"]), fmt(r["topk_alone_us"]),
             fmt(r["counts_alone_us"]), f"{r['vllm_share_pct']:.3f} %", f"{r['topk_share_pct']:.3f} %",
             f"{r['counts_share_pct']:.3f} %", fmt(r["vllm_ab_us"], ".1f"), fmt(r["topk_ab_us"], ".1f"),
             fmt(r["counts_ab_us"], ".1f"), fmt(r["spread_us"], ".1f")] for r in rows]
    return markdown_table(header, body)


def _load(json_path: Path) -> tuple[str, list[dict]]:
    data = json.loads(Path(json_path).read_text())
    return f"{data['device']}; torch {data['torch']}", sorted(data["rows"], key=lambda r: r["T"])


def section(json_path: Path, crossover: int) -> str:
    """The table and the goals, for the bench's report (``bench_results.md``)."""
    title, rows = _load(json_path)
    return "\n".join([f"{title}; {Path(json_path).name}, written by `bash tests/device/run_vllm_layer.sh --time`; "
                      f"µs and % of the EPLB-off layer ({Path(json_path).with_suffix('.md').name} says how).\n",
                      table(rows), "", f"Goals (the plugin's pick per T, crossover {crossover} tokens per rank):",
                      *goals(rows, crossover)])


def render(json_path: Path, crossover: int, method: str = METHOD) -> list[Path]:
    """Write ``<stem>.md`` (and ``<stem>.png`` with matplotlib) beside ``json_path``; the paths written."""
    title, rows = _load(json_path)
    md = Path(json_path).with_suffix(".md")
    text = [f"# Recording cost inside vLLM 0.33.0's MoE layer\n", f"{title}. {method}\n", table(rows), "",
            f"Goals (the plugin's pick per T, crossover {crossover} tokens per rank):", *goals(rows, crossover)]
    written = [md]
    if plot_unavailable() is None:
        png = md.with_suffix(".png")
        _plot(png, rows, title)
        text += ["", f"![recording share of the MoE layer]({png.name})"]
        written.append(png)
    md.write_text("\n".join(text) + "\n")
    return written


def _plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tokens = [r["T"] for r in rows]
    for name, label in (("vllm", "vLLM 0.33 recording"), ("topk", "ours, topk path"), ("counts", "ours, count path")):
        ax.plot(tokens, [r[f"{name}_share_pct"] for r in rows], marker="o", label=label)
    ax.axhline(SHARE_MAX_PCT, color="grey", linestyle="--", linewidth=1, label=f"goal: {SHARE_MAX_PCT} %")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("recording time / MoE layer time (%)")
    ax.set_title(f"Recording share of vLLM's MoE layer in a CUDA graph ({title})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
