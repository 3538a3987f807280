"""``eplb-compile report RECORD_DIR``: what a recording of the plugin's recorder says.

Reads every rank's files (format in ``eplb_compile.vllm_plugin.recorder``),
sums the ranks' passes step by step into the global physical load, maps it
to logical experts with the map each pass was routed by, and prints per
layer the imbalance over time (the three metrics of :mod:`eplb_compile.metrics`),
the hottest logical experts, and what each rearrangement changed. ``--json``
prints the same as one JSON object; ``--plot DIR`` writes PNGs. A folder
that is not a recording, an unknown format version or a truncated file is
a one-line error (exit status 2). Needs neither vLLM nor a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

import torch

from eplb_compile import metrics
from eplb_compile.cli import bounded_int
from eplb_compile.vllm_plugin.exporter import logical_load
from eplb_compile.vllm_plugin.recorder import CHUNK_GLOB, FORMAT_NAME, FORMAT_VERSION, HEADER_KEY


class RecordingError(ValueError):
    """The folder is not a readable recording; the message is one line."""


@dataclass
class ModelRecording:
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
        return torch.stack([logical_load(load, self.map_for(step), self.info["num_logical"])
                            for step, load in zip(self.steps, self.load, strict=True)])


@dataclass
class Recording:
    path: str
    ep_size: int
    header: dict
    models: list[ModelRecording]
    steps_missing_on_some_rank: int


def read_recording(path: str) -> Recording:
    if not os.path.isdir(path):
        raise RecordingError(f"{path}: not a recording (no such folder)")
    files = sorted(glob.glob(os.path.join(path, "rank*", CHUNK_GLOB)))
    if not files:
        raise RecordingError(f"{path}: not a recording (no rank*/{CHUNK_GLOB} files)")
    chunks: dict[int, list[tuple[dict, dict]]] = {}
    for file in files:
        header, tensors = read_chunk(file)
        chunks.setdefault(header["ep_rank"], []).append((header, tensors))
    header = chunks[min(chunks)][0][0]
    ep_size = header["ep_size"]
    if sorted(chunks) != list(range(ep_size)):
        raise RecordingError(f"{path}: ranks {sorted(chunks)} recorded, but ep_size is {ep_size}")
    models, missing = [], 0
    for index, info in enumerate(header["models"]):
        per_rank = [concat_chunks(chunks[rank], index) for rank in range(ep_size)]
        common = sorted(set.intersection(*(set(steps) for steps, _, _, _ in per_rank)))
        missing += max(len(steps) for steps, _, _, _ in per_rank) - len(common)
        load = torch.zeros((len(common), len(info["layer_names"]), info["num_physical"]), dtype=torch.int64)
        for steps, loads, _, _ in per_rank:
            position = {step: row for row, step in enumerate(steps)}
            for row, step in enumerate(common):
                load[row] += loads[position[step]]
        _, _, map_steps, maps = per_rank[0]
        if -1 not in map_steps:
            raise RecordingError(f"{path}: rank 0 has no start-up map for model {info['name']!r} (first chunk missing)")
        models.append(ModelRecording(info, common, load, map_steps, maps))
    return Recording(path, ep_size, header, models, missing)


def read_chunk(file: str) -> tuple[dict, dict]:
    """One file's header and tensors; RecordingError if it is not a readable chunk."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a cut file
        raise RecordingError(f"{file}: truncated or corrupt ({str(error).splitlines()[0]})") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, ValueError):
        raise RecordingError(f"{file}: not a recording (no {HEADER_KEY!r} header)") from None
    if header.get("format") != FORMAT_NAME:
        raise RecordingError(f"{file}: not a recording (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise RecordingError(f"{file}: unknown format version {header.get('version')!r} "
                             f"(this eplb_compile reads version {FORMAT_VERSION})")
    return header, tensors


def concat_chunks(chunks: list[tuple[dict, dict]], model: int):
    """One rank's chunks, in order, for one model: ``(steps, load, map_steps, maps)``."""
    steps, loads, map_steps, maps = [], [], [], []
    for _, tensors in sorted(chunks, key=lambda chunk: chunk[0]["chunk"]):
        steps += tensors[f"model{model}.steps"].tolist()
        loads.append(tensors[f"model{model}.load"])
        map_steps += tensors[f"model{model}.map_steps"].tolist()
        maps.append(tensors[f"model{model}.maps"])
    return steps, torch.cat(loads), map_steps, torch.cat(maps)


# ----------------------------------------------------------------------- analysis


def summarize(recording: Recording, top: int = 3) -> dict:
    """Everything the report prints, as plain data (the ``--json`` output)."""
    out = {"path": recording.path, "ep_size": recording.ep_size, "vllm_version": recording.header.get("vllm_version"),
           "eplb_compile_version": recording.header.get("eplb_compile_version"),
           "steps_missing_on_some_rank": recording.steps_missing_on_some_rank, "models": []}
    for model in recording.models:
        out["models"].append(_summarize_model(model, recording.ep_size, top))
    return out


def _summarize_model(model: ModelRecording, ep_size: int, top: int) -> dict:
    steps = [{"step": step, "tokens": int(load.sum()), "balancedness": metrics.balancedness(load, ep_size),
              "max_over_mean": metrics.imbalance_max_over_mean(load, ep_size).tolist(),
              "trtllm": metrics.imbalance_trtllm(load, ep_size).tolist()}
             for step, load in zip(model.steps, model.load, strict=True)]
    logical = model.logical().sum(dim=0)  # [layers, logical]
    hottest = []
    for layer, row in enumerate(logical):
        total = max(int(row.sum()), 1)
        values, experts = row.topk(min(top, row.numel()))
        hottest.append([{"expert": int(e), "tokens": int(v), "share": int(v) / total}
                        for v, e in zip(values, experts, strict=True)])
    return {"name": model.info["name"], "layer_names": model.info["layer_names"],
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


def format_text(summary: dict) -> str:
    lines = [f"recording {summary['path']}: ep_size={summary['ep_size']} vllm={summary['vllm_version']} "
             f"eplb_compile={summary['eplb_compile_version']}"]
    if summary["steps_missing_on_some_rank"]:
        lines.append(f"  ({summary['steps_missing_on_some_rank']} steps left out: not recorded by every rank)")
    for model in summary["models"]:
        steps = model["steps"]
        lines.append(f"model {model['name']}: {len(model['layer_names'])} layers, {model['num_logical']} logical / "
                     f"{model['num_physical']} physical experts, {len(steps)} recorded steps, "
                     f"{len(model['rearrangements'])} rearrangements")
        lines.append("  imbalance over time, all layers (balancedness: 1 is perfect; max/mean over EP ranks)")
        lines.append(f"  {'step':>6} {'tokens':>8} {'balancedness':>12} {'mean max/mean':>13} {'worst max/mean':>15}")
        for s in steps:
            worst = max(range(len(s["max_over_mean"])), key=s["max_over_mean"].__getitem__)
            mean = sum(s["max_over_mean"]) / len(s["max_over_mean"])
            lines.append(f"  {s['step']:>6} {s['tokens']:>8} {s['balancedness']:>12.4f} {mean:>13.3f} "
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
    parser.add_argument("--top", type=bounded_int(0, 1024), default=3, help="hottest experts to list per layer (default 3)")


def report_command(args: argparse.Namespace) -> int:
    try:
        summary = summarize(read_recording(args.record_dir), top=args.top)
    except RecordingError as error:
        print(f"eplb-compile report: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else format_text(summary))
    if args.plot:
        from eplb_compile.report_plots import write_plots

        for path in write_plots(summary, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0
