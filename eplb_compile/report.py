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

The text (:mod:`eplb_compile.report_text`) summarises a large recording;
``--json`` and ``--plot`` keep every step, layer and rank.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from eplb_compile import metrics, what_if
from eplb_compile.cli import bounded_int
from eplb_compile.recording import Recording, RecordingError, read_recording
from eplb_compile.report_text import format_text

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
        routed_by = np.searchsorted(self.map_steps, self.steps, side="left") - 1  # >= 0: the reader leaves
        # out the steps that no map it holds routed
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
        recording = read_recording(args.record_dir, args.steps)  # only the range's loads: memory follows it
        summary = summarize(recording, top=args.top, steps=args.steps)
        if args.what_if is not None:
            summary["what_if"] = what_if.what_if(recording, args.what_if, args.expert_bytes, args.steps)
    except errors as error:
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
