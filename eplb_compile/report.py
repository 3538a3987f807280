"""``eplb-compile report RECORD_DIR``: what a recording of the plugin's recorder says.

Reads every rank's files (``eplb_compile.recording``: the format and its
reader), sums the ranks' passes step by step into the global physical load,
maps it to logical experts with the map each pass was routed by, and prints
per layer the imbalance over time (the three metrics of
:mod:`eplb_compile.metrics`), the hottest logical experts, and what each
rearrangement changed. Loads count assignments (one per token and top-k
slot). ``--json`` prints the same as one JSON object; ``--plot DIR`` writes
PNGs. A folder that is not a recording or of an unknown format version is a
one-line error (exit status 2); lost, cut or malformed chunks are read
around, and each loss (rank, chunk, steps, maps) is printed first.
``--what-if [PLACEMENT]`` adds :mod:`eplb_compile.what_if`'s part. Needs
neither vLLM nor a GPU, and without ``--what-if`` not torch either: the
recording is read and measured with numpy, every step at once.

With more than ``MAX_STEP_LINES`` steps the text gives the statistics of the
steps and the worst one instead of a line per step; with more than
``MAX_LAYER_LINES`` layers, lines for the worst layers only; with more than
``MAX_RANK_LINES`` EP ranks, the hottest ranks; ``--json`` and ``--plot`` keep
every step, layer and rank.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
from dataclasses import dataclass

import numpy as np

from eplb_compile import metrics, what_if
from eplb_compile.cli import bounded_int
from eplb_compile.recording import Recording, RecordingError, read_recording

# Past these, the text summarises and --json / --plot hold the detail.
MAX_STEP_LINES = 20  # a per-step table up to this many steps, else its statistics and the worst step
MAX_LAYER_LINES = 10  # per-layer lines up to this many layers, else the worst ones and a count of the rest
MAX_RANK_LINES = 8  # per-EP-rank lines up to this many ranks, else the hottest ones


@dataclass
class ModelRecording:
    """One model of a recording, summed over ranks, with what the analysis asks of it."""

    info: dict
    steps: list[int]
    load: np.ndarray  # [steps, layers, physical], summed over ranks
    map_steps: list[int]
    maps: np.ndarray  # [maps, layers, physical]

    def logical(self) -> np.ndarray:
        """``[layers, logical]``: every pass mapped with the map it was routed by (the last one committed
        before its step), summed; one sum and one mapping per map, since the mapping is linear."""
        routed_by = np.searchsorted(self.map_steps, self.steps, side="left") - 1
        total = np.zeros((len(self.info["layer_names"]), self.info["num_logical"]), dtype=np.int64)
        for index in np.unique(routed_by):  # the steps are sorted: each map's passes are one run of rows
            rows = np.flatnonzero(routed_by == index)
            physical = self.load[rows[0]:rows[-1] + 1].sum(axis=0)
            total += metrics.logical_load_per_pass(physical, self.maps[index], self.info["num_logical"])
        return total


# ----------------------------------------------------------------------- analysis


def summarize(recording: Recording, top: int = 3, steps: tuple[int | None, int | None] = (None, None)) -> dict:
    """Everything the report prints, as plain data (the ``--json`` output).

    ``steps``: only EPLB steps ``first <= step < last`` (None: open); maps stay whole,
    since a pass is routed by a map committed before the range.
    """
    first, last = steps
    out = {"path": recording.path, "step_range": [first, last], "ep_size": recording.ep_size,
           "vllm_version": recording.header.get("vllm_version"),
           "eplb_compile_version": recording.header.get("eplb_compile_version"),
           "steps_missing_on_some_rank": recording.steps_missing_on_some_rank,
           "damage": recording.damage, "dropped": {str(rank): c for rank, c in recording.dropped.items()},
           "models": []}
    for info, s in recording.models:
        low = 0 if first is None else bisect.bisect_left(s.steps, first)
        high = len(s.steps) if last is None else bisect.bisect_left(s.steps, last)
        model = ModelRecording(info, s.steps[low:high], s.load[low:high], s.map_steps, s.maps)  # a view: no copy
        summary = _summarize_model(model, recording.ep_size, top)
        summary["rearrangements"] = [c for c in summary["rearrangements"]  # those committed in the range
                                     if (first is None or c["step"] >= first) and (last is None or c["step"] < last)]
        out["models"].append(summary)
    return out


def _summarize_model(model: ModelRecording, ep_size: int, top: int) -> dict:
    """The three metrics of every step at once, on the per-rank loads ``[steps, layers, ep_size]``."""
    ranks = metrics.rank_loads_per_pass(model.load, ep_size)
    balancedness = metrics.balancedness_per_pass(ranks, ep_size).tolist()
    max_over_mean = metrics.max_over_mean_per_pass(ranks, ep_size).tolist()
    trtllm = metrics.trtllm_per_pass(ranks, ep_size).tolist()
    tokens = model.load.sum(axis=(1, 2)).tolist()
    steps = [{"step": step, "tokens": tokens[row], "balancedness": balancedness[row],
              "max_over_mean": max_over_mean[row], "trtllm": trtllm[row]} for row, step in enumerate(model.steps)]
    logical = model.logical()
    hottest = []
    for row in logical:
        total = max(int(row.sum()), 1)
        experts = np.argsort(-row, kind="stable")[:min(top, row.size)]  # ties: the lower expert first
        hottest.append([{"expert": int(e), "tokens": int(row[e]), "share": int(row[e]) / total} for e in experts])
    return {"name": model.info["name"], "layer_names": model.info["layer_names"],
            "window_size": model.info["window_size"],
            "num_logical": model.info["num_logical"], "num_physical": model.info["num_physical"],
            "steps": steps, "hottest": hottest, "logical_load": logical.tolist(), "ranks": _ranks(ranks),
            "rearrangements": _rearrangements(model, steps)}


def _ranks(ranks: np.ndarray) -> list[dict]:
    """Per EP rank over the steps: its assignments, their share of all, and the layers it is the hottest rank of."""
    per_layer = ranks.sum(axis=0)  # [layers, ep_size]
    totals, everything = per_layer.sum(axis=0), per_layer.sum()
    loaded = per_layer.sum(axis=1) > 0  # a layer without assignments has no hottest rank
    hottest = np.bincount(per_layer.argmax(axis=1)[loaded], minlength=per_layer.shape[1])
    return [{"rank": rank, "assignments": int(total), "share": float(total / everything) if everything else 0.0,
             "hottest_layers": int(hottest[rank])} for rank, total in enumerate(totals)]


def _rearrangements(model: ModelRecording, steps: list[dict]) -> list[dict]:
    changes = []
    num_logical = model.info["num_logical"]
    for index in range(1, len(model.map_steps)):
        old, new, at = model.maps[index - 1], model.maps[index], model.map_steps[index]
        split = bisect.bisect_right(model.steps, at)  # steps[:split] <= at < steps[split:]
        before = steps[split - 1] if split else None
        after = steps[split] if split < len(steps) else None
        layers = []
        for layer in range(old.shape[0]):
            moved = int((old[layer] != new[layer]).sum())
            if not moved:
                continue
            count = lambda m: np.bincount(m[m >= 0], minlength=num_logical)  # noqa: E731
            delta = (count(new[layer]) - count(old[layer])).tolist()
            layers.append({
                "layer": layer, "slots_changed": moved,
                "replicas_gained": [e for e, d in enumerate(delta) if d > 0],
                "replicas_lost": [e for e, d in enumerate(delta) if d < 0],
                "max_over_mean_before": before["max_over_mean"][layer] if before else None,
                "max_over_mean_after": after["max_over_mean"][layer] if after else None,
            })
        changes.append({"step": at, "layers": layers})
    return changes


# ----------------------------------------------------------------------- text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_text(summary: dict) -> str:
    lines = [f"recording {summary['path']}: ep_size={summary['ep_size']} vllm={summary['vllm_version']} "
             f"eplb_compile={summary['eplb_compile_version']}"]
    if summary.get("damage"):
        lines.append("  damaged recording: what follows is read around these losses:")
        lines += [f"    {line}" for line in summary["damage"]]
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


# ----------------------------------------------------------------------- command line


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("record_dir", metavar="RECORD_DIR", help="the recorder's record_dir")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--top", type=bounded_int(1, 1024), default=3, help="hottest experts to list per layer (default 3)")
    parser.add_argument("--steps", type=_step_range, default=(None, None), metavar="A:B",
                        help="only EPLB steps A <= step < B (either side may be left out, as in 100: or :500)")
    what_if.add_what_if_arguments(parser)


def _step_range(text: str) -> tuple[int | None, int | None]:
    first, colon, last = text.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = tuple(int(part) if part.strip() else None for part in (first, last))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be A:B with integers A < B (either may be left out), got {text!r}") \
            from None
    if None not in bounds and bounds[0] >= bounds[1]:
        raise argparse.ArgumentTypeError(f"must be A:B with A < B, got {text!r}")
    return bounds


def _plot_dir_problem(folder: str) -> str | None:
    """Checked before reading: a folder the plots can be written into (made if its parent exists)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder!r} is a file, expected a directory"
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(folder) and not os.path.isdir(parent):
        return f"directory {parent!r} does not exist"
    if not os.access(folder if os.path.isdir(folder) else parent, os.W_OK):
        return f"directory {folder if os.path.isdir(folder) else parent!r} is not writable"
    return None


def report_command(args: argparse.Namespace) -> int:
    if args.plot and _plot_dir_problem(args.plot):
        print(f"eplb-compile report: error: argument --plot: {_plot_dir_problem(args.plot)}", file=sys.stderr)
        return 2
    if args.plot:
        from eplb_compile.plots import PLOT_EXTRA_HINT

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"eplb-compile report: error: --plot needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}",
                  file=sys.stderr)
            return 2
    if what_if.option_error(args):
        print(f"eplb-compile report: error: {what_if.option_error(args)}", file=sys.stderr)
        return 2
    errors: tuple[type[Exception], ...] = (RecordingError, OSError)
    if args.what_if is not None:  # torch and vLLM's policy: imported only when asked for
        from eplb_compile.placement import PlacementError

        errors += (PlacementError,)
    try:
        recording = read_recording(args.record_dir)
        summary = summarize(recording, top=args.top, steps=args.steps)
        if args.what_if is not None:
            summary["what_if"] = what_if.what_if(recording, args.what_if, args.expert_bytes)
    except errors as error:
        print(f"eplb-compile report: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    text = format_text(summary) + ("\n" + what_if.format_text(summary["what_if"]) if "what_if" in summary else "")
    print(json.dumps(summary) if args.json else text)
    if args.plot:
        from eplb_compile.report_plots import write_plots

        for path in write_plots(summary, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0
