"""The text of ``eplb-compile report``: the summary :mod:`eplb_compile.report` computes, for a reader.

Small recordings get every line: a line per step, per layer and per EP rank.
A large one is summarised: with more than ``MAX_STEP_LINES`` steps, the
min / median / mean / max of balancedness and of the mean max/mean over the
steps, and the worst step, instead of a line per step; with more than
``MAX_LAYER_LINES`` layers, lines for the worst layers only and a count of the
others; with more than ``MAX_RANK_LINES`` EP ranks, the hottest ranks. Each
cut says where the rest is (``--json``, ``--plot``).
"""

from __future__ import annotations

import statistics

# Past these, the text summarises and --json / --plot hold the detail.
MAX_STEP_LINES = 20  # a per-step table up to this many steps, else its statistics and the worst step
MAX_LAYER_LINES = 10  # per-layer lines up to this many layers, else the worst ones and a count of the rest
MAX_RANK_LINES = 8  # per-EP-rank lines up to this many ranks, else the hottest ones


DAMAGE_LINES_SHOWN = 20


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_text(summary: dict) -> str:
    lines = [f"recording {summary['path']}: ep_size={summary['ep_size']} vllm={summary['vllm_version']} "
             f"eplb_compile={summary['eplb_compile_version']}"]
    if summary.get("damage"):
        lines.append("  damaged recording: what follows is read around these losses:")
        lines += [f"    {line}" for line in summary["damage"][:DAMAGE_LINES_SHOWN]]
        if len(summary["damage"]) > DAMAGE_LINES_SHOWN:  # a long outage: thousands of lost chunks
            lines.append(f"    ... and {len(summary['damage']) - DAMAGE_LINES_SHOWN} more (all in --json)")
    paused = {rank: c["paused_steps"] for rank, c in summary.get("dropped", {}).items() if c.get("paused_steps")}
    if paused:  # an operator's choice, not damage; one line however many ranks
        low, high = min(paused.values()), max(paused.values())
        who = (f"rank {next(iter(paused))}" if len(paused) == 1 else f"ranks {', '.join(paused)}"
               if len(paused) <= MAX_RANK_LINES else f"{len(paused)} ranks")
        amount = _count(low, "recorded step") if low == high else f"{low} to {high} recorded steps each"
        lines.append(f"  {who}: {amount} not written while record_dir/PAUSE existed (as of the last readable "
                     f"chunks; per rank in --json)")
    first, last = summary.get("step_range", [None, None])
    if (first, last) != (None, None):
        lines.append(f"  steps {'' if first is None else first}:{'' if last is None else last} only "
                     f"(first <= step < last)")
    for model in summary["models"]:
        lines += _model_text(model)
    return "\n".join(lines)


def _model_text(model: dict) -> list[str]:
    steps, names = model["steps"], model["layer_names"]
    lines = [f"model {model['name']}: {len(names)} layers, {model['num_logical']} logical / "
             f"{model['num_physical']} physical experts, {_count(len(steps), 'recorded step')}, "
             f"{_count(len(model['rearrangements']), 'rearrangement')}",
             f"  recorded: only the steps whose pass vLLM puts into its EPLB window (the last "
             f"{model['window_size']} before each rearrangement, and before balancedness logs); "
             f"loads are assignments (token x top-k)",
             "  imbalance over time, all layers (balancedness: 1 is perfect; max/mean over EP ranks)"]
    lines += _steps_text(steps)
    worst_of = [max(s["max_over_mean"][layer] for s in steps) if steps else 0.0 for layer in range(len(names))]
    shown = (list(range(len(names))) if len(names) <= MAX_LAYER_LINES else
             sorted(range(len(names)), key=lambda layer: -worst_of[layer])[:MAX_LAYER_LINES])
    others = (f"    ... and {len(names) - len(shown)} other layers (worst max/mean <= "
              f"{max(w for i, w in enumerate(worst_of) if i not in shown):.3f}); --json has every layer"
              if len(shown) < len(names) else None)
    lines.append("  imbalance over time, per layer: max/mean and (max-mean)/mean (trtllm), first -> last, worst"
                 + (f" ({len(shown)} worst layers of {len(names)})" if others else ""))
    for layer in shown:
        if not steps:
            break
        series = [(s["step"], s["max_over_mean"][layer], s["trtllm"][layer]) for s in steps]
        worst = max(series, key=lambda item: item[1])
        lines.append(f"    L{layer} {names[layer]}: max/mean {series[0][1]:.3f} -> {series[-1][1]:.3f} "
                     f"(worst {worst[1]:.3f} at step {worst[0]}), trtllm {series[0][2]:.3f} -> "
                     f"{series[-1][2]:.3f}")
    if steps and others:
        lines.append(others)
    lines += _ranks_text(model["ranks"], len(names))
    lines.append("  hottest logical experts (share of the layer's recorded load)"
                 + (f", in the {len(shown)} worst layers" if others else ""))
    for layer in shown:
        experts = ", ".join(f"e{h['expert']} {100 * h['share']:.1f}%" for h in model["hottest"][layer])
        lines.append(f"    L{layer} {names[layer]}: {experts}")
    for change in model["rearrangements"]:
        lines.append(f"  rearrangement at step {change['step']}: "
                     f"{len(change['layers'])} of {len(names)} layers changed")
        changed = change["layers"]
        if len(changed) > MAX_LAYER_LINES:  # the layers most imbalanced before it
            changed = sorted(changed, key=lambda c: -(c["max_over_mean_before"] or 0.0))[:MAX_LAYER_LINES]
        for c in changed:
            imbalance = " ".join(f"{k} {v:.3f}" for k, v in [("max/mean before", c["max_over_mean_before"]),
                                                              ("after", c["max_over_mean_after"])]
                                 if v is not None)
            lines.append(f"    L{c['layer']}: {c['slots_changed']} slots, replicas gained {_ids(c['replicas_gained'])} "
                         f"lost {_ids(c['replicas_lost'])}; {imbalance}")
        if len(changed) < len(change["layers"]):
            lines.append(f"    ... and {len(change['layers']) - len(changed)} other changed layers (less imbalanced "
                         f"before); --json has every layer")
    return lines


def _ids(experts: list[int], most: int = 8) -> str:
    """``[1, 2]``; a long list as its first ``most`` and how many more (--json has them all)."""
    return str(experts) if len(experts) <= most else f"{str(experts[:most])[:-1]}, ... {len(experts) - most} more]"


def _steps_text(steps: list[dict]) -> list[str]:
    """The per-step table, or for many steps its statistics, the worst step and where the detail is."""
    rows = []
    for s in steps:
        worst = max(range(len(s["max_over_mean"])), key=s["max_over_mean"].__getitem__)
        rows.append((s, sum(s["max_over_mean"]) / len(s["max_over_mean"]), worst))
    if len(steps) <= MAX_STEP_LINES:
        lines = [f"  {'step':>6} {'assignments':>11} {'balancedness':>12} {'mean max/mean':>13} "
                 f"{'worst max/mean':>15}"]
        return lines + [f"  {s['step']:>6} {s['tokens']:>11} {s['balancedness']:>12.4f} {mean:>13.3f} "
                        f"{s['max_over_mean'][worst]:>9.3f} (L{worst})" for s, mean, worst in rows]

    def spread(values: list[float], digits: int) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values),
                                                       statistics.fmean(values), max(values)))

    s, mean, layer = min(rows, key=lambda row: row[0]["balancedness"])
    return [f"  {len(steps)} steps ({steps[0]['step']} to {steps[-1]['step']}), min / median / mean / max:",
            f"    balancedness   {spread([s['balancedness'] for s in steps], 4)}",
            f"    mean max/mean  {spread([mean for _, mean, _ in rows], 3)}",
            f"  worst step {s['step']}: balancedness {s['balancedness']:.4f}, mean max/mean {mean:.3f}, "
            f"worst max/mean {s['max_over_mean'][layer]:.3f} (L{layer}), {s['tokens']} assignments",
            "  every step: --json (steps[]) or --plot DIR (imbalance per layer over steps)"]


def _ranks_text(ranks: list[dict], layers: int) -> list[str]:
    shown = ranks if len(ranks) <= MAX_RANK_LINES else sorted(ranks, key=lambda r: -r["share"])[:MAX_RANK_LINES]
    lines = ["  EP ranks: share of the assignments, and of how many layers the rank is the hottest"
             + (f" ({len(shown)} hottest of {len(ranks)})" if len(shown) < len(ranks) else "")]
    lines += [f"    r{r['rank']}: {100 * r['share']:.1f}% ({r['assignments']} assignments), hottest in "
              f"{r['hottest_layers']} of {layers} layers" for r in shown]
    if len(shown) < len(ranks):
        lines.append(f"    ... and {len(ranks) - len(shown)} other ranks; --json has every rank")
    return lines
