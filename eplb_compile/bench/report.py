"""The bench's report: markdown tables, goals met or missed with numbers, CSV, PNG.

matplotlib is optional (the ``[plot]`` extra): :func:`plot_unavailable` is
asked before any timing, and without it the PNG is skipped with one line.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import statistics
import textwrap
from pathlib import Path

from eplb_compile.bench.impls import VARIANT_PREFIX
from eplb_compile.bench.timing import HostRow

TOPK_VS_MAP_ONLY_MAX = 1.15
SPEEDUP_VS_VLLM_MIN = 12.0
SPEEDUP_AT_TOKENS = 32768
HOST_VS_VLLM_MAX = 0.5
HOST_VS_SLICE_ADD_MAX = 2.0


def plot_unavailable() -> str | None:
    """None if matplotlib can be imported, else the line to print."""
    if importlib.util.find_spec("matplotlib") is None:
        return "# matplotlib not installed: no PNG (pip install 'eplb-compile[plot]')"
    return None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def results_table(medians, reference: str, topk: str) -> str:
    header = ["T", reference, "topk (op)"] + (["topk (derived plan)"] if topk != "topk" else []) + [
        "map-only", "map-only again", "count path (2 kernels)", "count kernel", "floor",
        "topk / map-only", f"{reference} / topk"]
    rows = []
    for t in sorted(medians):
        m = medians[t]
        cells = [str(t), fmt(m.get(reference)), fmt(m.get("topk"))]
        if topk != "topk":
            cells.append(fmt(m.get(topk)))
        cells += [fmt(m.get(n)) for n in ("map_only", "map_only@2", "count_path", "count_kernel", "floor")]
        cells += [fmt(_ratio(m.get(topk), m.get("map_only@2", m.get("map_only")))),
                  fmt(_ratio(m.get(reference), m.get(topk)), ".1f")]
        rows.append(cells)
    return markdown_table(header, rows)


def bandwidth_table(medians, moved_bytes: dict[int, int], card_gbs: float | None, topk: str) -> str:
    """Bytes each layer's kernel must move (ids in, ids out, the load), and the
    bandwidth each implementation achieves on them, whole launch included."""
    rows = []
    for t in sorted(medians):
        m, nbytes = medians[t], moved_bytes[t]
        cells = [str(t), f"{nbytes / 1024:.0f}"]
        for name in ("copy", "map_only", topk):
            us = m.get(name)
            cells += [fmt(us), fmt(None if not us else nbytes / us / 1e3, ".0f")]
        above = None if m.get(topk) is None or m.get("copy") is None else m[topk] - m["copy"]
        cells.append(fmt(above))
        rows.append(cells)
    card = "not measured" if card_gbs is None else f"{card_gbs:.0f} GB/s"
    return (f"Card copy bandwidth (1 GiB device copy, read + write): {card}.\n\n"
            + markdown_table(["T", "KiB moved", "copy µs", "copy GB/s", "map-only µs", "map-only GB/s", f"{topk} µs",
                              f"{topk} GB/s", f"{topk} - copy µs"], rows))


def variant_table(medians, variant_names: list[str]) -> str:
    rows = []
    for t in sorted(medians):
        present = {n: medians[t][VARIANT_PREFIX + n] for n in variant_names if VARIANT_PREFIX + n in medians[t]}
        best = min(present, key=present.get) if present else "-"
        rows.append([str(t)] + [fmt(present.get(n)) for n in variant_names] + [best])
    return markdown_table(["T"] + variant_names + ["fastest"], rows)


def goals(medians, tokens: list[int], reference: str, topk: str, crossover: int, host: list[HostRow]) -> list[str]:
    from eplb_compile.selection import Lowering, select_lowering

    lines = []
    ratios = {t: _ratio(medians[t].get(topk), medians[t].get("map_only@2", medians[t].get("map_only")))
              for t in tokens}
    worst = max((r for r in ratios.values() if r is not None), default=float("nan"))
    lines.append(f"1. topk <= {TOPK_VS_MAP_ONLY_MAX}x map-only at every T: "
                 f"{_met(all(r is not None and r <= TOPK_VS_MAP_ONLY_MAX for r in ratios.values()))} "
                 f"(worst {worst:.2f}x; " + ", ".join(f"{t}: {fmt(r)}" for t, r in ratios.items()) + ")")
    at = medians.get(SPEEDUP_AT_TOKENS, {})
    speedup = _ratio(at.get(reference), at.get(topk))
    if speedup is None:
        lines.append(f"2. >= {SPEEDUP_VS_VLLM_MIN}x {reference} at T={SPEEDUP_AT_TOKENS}: not measured")
    else:
        lines.append(f"2. >= {SPEEDUP_VS_VLLM_MIN}x {reference} at T={SPEEDUP_AT_TOKENS}: "
                     f"{_met(reference == 'vllm' and speedup >= SPEEDUP_VS_VLLM_MIN)} ({speedup:.1f}x: "
                     f"{at[reference]:.2f} vs {at[topk]:.2f} µs)"
                     + ("" if reference == "vllm" else " -- vLLM not loaded, so not met as stated"))
    picks = [t for t in tokens
             if select_lowering(True, t, has_padding_mask=True, min_tokens=crossover).lowering == Lowering.COUNTS]
    bad = [t for t in picks if not (medians[t].get("count_path", math.inf) <= medians[t].get(topk, -math.inf))]
    detail = ", ".join(f"{t}: {fmt(medians[t].get('count_path'))} vs {fmt(medians[t].get(topk))}" for t in picks)
    lines.append(f"3. count path <= topk wherever the selector picks it (crossover {crossover}): {_met(not bad)} ("
                 + (f"picks the count path at {detail}" if picks else "picks it at no measured T") + ")")
    lines.append(_host_goal(host))
    return lines


def _host_goal(host: list[HostRow]) -> str:
    vllm = {r.tokens: r.us for r in host if r.call.startswith("vLLM")}
    slice_add = {r.tokens: r.us for r in host if r.call == "plain torch slice add"}
    ops = [r for r in host if r.is_op]
    if not ops:
        return "4. eager host cost: not measured"
    worst_vllm = max((r.us / vllm[r.tokens] for r in ops if r.tokens in vllm), default=None)
    worst_add = max((r.us / slice_add[r.tokens] for r in ops if r.tokens in slice_add), default=None)
    vllm_part = ("vLLM not loaded" if worst_vllm is None
                 else f"{_met(worst_vllm <= HOST_VS_VLLM_MAX)} (worst {worst_vllm:.2f}x)")
    add_part = "-" if worst_add is None else f"{_met(worst_add <= HOST_VS_SLICE_ADD_MAX)} (worst {worst_add:.2f}x)"
    return (f"4. eager host cost per op <= {HOST_VS_VLLM_MAX}x vLLM's launcher: {vllm_part}; "
            f"<= {HOST_VS_SLICE_ADD_MAX}x a plain slice add: {add_part}")


def host_table(host: list[HostRow]) -> str:
    vllm = {r.tokens: r.us for r in host if r.call.startswith("vLLM")}
    slice_add = {r.tokens: r.us for r in host if r.call == "plain torch slice add"}
    rows = [[r.call, str(r.tokens), fmt(r.us, ".1f"), fmt(_ratio(r.us, vllm.get(r.tokens))),
             fmt(_ratio(r.us, slice_add.get(r.tokens)))] for r in host]
    return markdown_table(["call", "T", "µs/call", "vs vLLM", "vs slice add"], rows)


def write_csv(path: Path, context: list[str], samples, host: list[HostRow]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gpu", "torch", "triton", "timestamp", "metric", "tokens", "impl", "median_us", "min_us",
                         "max_us", "samples"])
        for tokens, by_impl in sorted(samples.items()):
            for impl, values in by_impl.items():
                writer.writerow(context + ["graph_us_per_layer", tokens, impl, f"{statistics.median(values):.4f}",
                                           f"{min(values):.4f}", f"{max(values):.4f}", len(values)])
        for row in host:
            writer.writerow(context + ["host_us_per_call", row.tokens, row.call, f"{row.us:.3f}", "", "", ""])


def plot(path: Path, medians, lines: dict[str, str], dashed: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    tokens = sorted(medians)
    for names, style in ((list(lines), dict(linewidth=2, marker="o")),
                         (dashed, dict(linestyle="--", linewidth=1, marker=".", alpha=0.7))):
        for name in names:
            points = [(t, medians[t][name]) for t in tokens if name in medians[t]]
            if points:
                ax.plot(*zip(*points), label=lines.get(name, name), **style)
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
