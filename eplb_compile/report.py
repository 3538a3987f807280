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
neither vLLM nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from eplb_compile import metrics, what_if
from eplb_compile.cli import bounded_int
from eplb_compile.placement import PlacementError
from eplb_compile.recording import Recording, RecordingError, read_recording


@dataclass
class ModelRecording:
    """One model of a recording, summed over ranks, with what the analysis asks of it."""

    info: dict
    steps: list[int]
    load: torch.Tensor  # [steps, layers, physical], summed over ranks
    map_steps: list[int]
    maps: torch.Tensor  # [maps, layers, physical]

    def map_for(self, step: int) -> torch.Tensor:
        """The map a pass recorded at ``step`` was routed by: the last one committed before it."""
        index = max(i for i, s in enumerate(self.map_steps) if s < step)
        return self.maps[index]

    def logical(self) -> torch.Tensor:
        """``[steps, layers, logical]``."""
        if not self.steps:
            return torch.zeros((0, len(self.info["layer_names"]), self.info["num_logical"]), dtype=torch.int64)
        return torch.stack([metrics.logical_load(load, self.map_for(step), self.info["num_logical"])
                            for step, load in zip(self.steps, self.load, strict=True)])


# ----------------------------------------------------------------------- analysis


def summarize(recording: Recording, top: int = 3, steps: tuple[int | None, int | None] = (None, None)) -> dict:
    """Everything the report prints, as plain data (the ``--json`` output).

    ``steps``: only EPLB steps ``first <= step < last`` (None: open); maps stay whole,
    since a pass is routed by a map committed before the range.
    """
    first, last = steps
    models = []
    for info, s in recording.models:
        keep = [row for row, step in enumerate(s.steps)
                if (first is None or step >= first) and (last is None or step < last)]
        models.append(ModelRecording(info, [s.steps[row] for row in keep], s.load[keep], s.map_steps, s.maps))
    out = {"path": recording.path, "step_range": [first, last], "ep_size": recording.ep_size, "vllm_version": recording.header.get("vllm_version"),
           "eplb_compile_version": recording.header.get("eplb_compile_version"),
           "steps_missing_on_some_rank": recording.steps_missing_on_some_rank,
           "damage": recording.damage, "dropped": {str(rank): c for rank, c in recording.dropped.items()},
           "models": []}
    for model in models:
        summary = _summarize_model(model, recording.ep_size, top)
        summary["rearrangements"] = [c for c in summary["rearrangements"]  # those committed in the range
                                     if (first is None or c["step"] >= first) and (last is None or c["step"] < last)]
        out["models"].append(summary)
    return out


def _summarize_model(model: ModelRecording, ep_size: int, top: int) -> dict:
    steps = [{"step": step, "tokens": int(load.sum()), "balancedness": metrics.balancedness(load, ep_size),
              "max_over_mean": metrics.imbalance_max_over_mean(load, ep_size).tolist(),
              "trtllm": metrics.imbalance_trtllm(load, ep_size).tolist()}
             for step, load in zip(model.steps, model.load, strict=True)]
    logical = torch.zeros((len(model.info["layer_names"]), model.info["num_logical"]), dtype=torch.int64)
    for step, load in zip(model.steps, model.load, strict=True):  # one step at a time: memory stays flat
        logical += metrics.logical_load(load, model.map_for(step), model.info["num_logical"])
    hottest = []
    for layer, row in enumerate(logical):
        total = max(int(row.sum()), 1)
        values, experts = row.topk(min(top, row.numel()))
        hottest.append([{"expert": int(e), "tokens": int(v), "share": int(v) / total}
                        for v, e in zip(values, experts, strict=True)])
    return {"name": model.info["name"], "layer_names": model.info["layer_names"],
            "window_size": model.info["window_size"],
            "num_logical": model.info["num_logical"], "num_physical": model.info["num_physical"],
            "steps": steps, "hottest": hottest, "logical_load": logical.tolist(),
            "rearrangements": _rearrangements(model, steps)}


def _rearrangements(model: ModelRecording, steps: list[dict]) -> list[dict]:
    changes = []
    num_logical = model.info["num_logical"]
    for index in range(1, len(model.map_steps)):
        old, new, at = model.maps[index - 1], model.maps[index], model.map_steps[index]
        before = [s for s in steps if s["step"] <= at][-1:]
        after = [s for s in steps if s["step"] > at][:1]
        layers = []
        for layer in range(old.shape[0]):
            moved = int((old[layer] != new[layer]).sum())
            if not moved:
                continue
            count = lambda m: torch.bincount(m[m >= 0], minlength=num_logical)  # noqa: E731
            delta = (count(new[layer]) - count(old[layer])).tolist()
            layers.append({
                "layer": layer, "slots_changed": moved,
                "replicas_gained": [e for e, d in enumerate(delta) if d > 0],
                "replicas_lost": [e for e, d in enumerate(delta) if d < 0],
                "max_over_mean_before": before[0]["max_over_mean"][layer] if before else None,
                "max_over_mean_after": after[0]["max_over_mean"][layer] if after else None,
            })
        changes.append({"step": at, "layers": layers})
    return changes


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_text(summary: dict) -> str:
    lines = [f"recording {summary['path']}: ep_size={summary['ep_size']} vllm={summary['vllm_version']} "
             f"eplb_compile={summary['eplb_compile_version']}"]
    if summary.get("damage"):
        lines.append("  damaged recording: what follows is read around these losses:")
        lines += [f"    {line}" for line in summary["damage"]]
    for rank, counters in summary.get("dropped", {}).items():
        if counters.get("paused_steps"):  # an operator's choice, not damage
            lines.append(f"  rank {rank}: {_count(counters['paused_steps'], 'recorded step')} not written while "
                         f"record_dir/PAUSE existed (as of its last readable chunk)")
    first, last = summary.get("step_range", [None, None])
    if (first, last) != (None, None):
        lines.append(f"  steps {'' if first is None else first}:{'' if last is None else last} only "
                     f"(first <= step < last)")
    for model in summary["models"]:
        steps = model["steps"]
        lines.append(f"model {model['name']}: {len(model['layer_names'])} layers, {model['num_logical']} logical / "
                     f"{model['num_physical']} physical experts, {_count(len(steps), 'recorded step')}, "
                     f"{_count(len(model['rearrangements']), 'rearrangement')}")
        lines.append(f"  recorded: only the steps whose pass vLLM puts into its EPLB window (the last "
                     f"{model['window_size']} before each rearrangement, and before balancedness logs); "
                     f"loads are assignments (token x top-k)")
        lines.append("  imbalance over time, all layers (balancedness: 1 is perfect; max/mean over EP ranks)")
        lines.append(f"  {'step':>6} {'assignments':>11} {'balancedness':>12} {'mean max/mean':>13} "
                     f"{'worst max/mean':>15}")
        for s in steps:
            worst = max(range(len(s["max_over_mean"])), key=s["max_over_mean"].__getitem__)
            mean = sum(s["max_over_mean"]) / len(s["max_over_mean"])
            lines.append(f"  {s['step']:>6} {s['tokens']:>11} {s['balancedness']:>12.4f} {mean:>13.3f} "
                         f"{s['max_over_mean'][worst]:>9.3f} (L{worst})")
        lines.append("  imbalance over time, per layer: max/mean and (max-mean)/mean (trtllm), first -> last, worst")
        for layer, name in enumerate(model["layer_names"]):
            if not steps:
                break
            series = [(s["step"], s["max_over_mean"][layer], s["trtllm"][layer]) for s in steps]
            worst = max(series, key=lambda item: item[1])
            lines.append(f"    L{layer} {name}: max/mean {series[0][1]:.3f} -> {series[-1][1]:.3f} "
                         f"(worst {worst[1]:.3f} at step {worst[0]}), trtllm {series[0][2]:.3f} -> "
                         f"{series[-1][2]:.3f}")
        lines.append("  hottest logical experts (share of the layer's recorded load)")
        for layer, hot in enumerate(model["hottest"]):
            experts = ", ".join(f"e{h['expert']} {100 * h['share']:.1f}%" for h in hot)
            lines.append(f"    L{layer} {model['layer_names'][layer]}: {experts}")
        for change in model["rearrangements"]:
            lines.append(f"  rearrangement at step {change['step']}: "
                         f"{len(change['layers'])} of {len(model['layer_names'])} layers changed")
            for c in change["layers"]:
                imbalance = " ".join(f"{k} {v:.3f}" for k, v in [("max/mean before", c["max_over_mean_before"]),
                                                                  ("after", c["max_over_mean_after"])]
                                     if v is not None)
                lines.append(f"    L{c['layer']}: {c['slots_changed']} slots, replicas gained {c['replicas_gained']} "
                             f"lost {c['replicas_lost']}; {imbalance}")
    return "\n".join(lines)


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
    try:
        recording = read_recording(args.record_dir)
        summary = summarize(recording, top=args.top, steps=args.steps)
        if args.what_if is not None:
            summary["what_if"] = what_if.what_if(recording, args.what_if, args.expert_bytes)
    except (RecordingError, PlacementError, OSError) as error:
        print(f"eplb-compile report: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    text = format_text(summary) + ("\n" + what_if.format_text(summary["what_if"]) if "what_if" in summary else "")
    print(json.dumps(summary) if args.json else text)
    if args.plot:
        from eplb_compile.report_plots import write_plots

        for path in write_plots(summary, args.plot):
            print(f"wrote {path}", file=sys.stderr)
        if "what_if" in summary:
            from eplb_compile.report_plots import write_what_if_plots

            for path in write_what_if_plots(summary["what_if"], args.plot):
                print(f"wrote {path}", file=sys.stderr)
    return 0
