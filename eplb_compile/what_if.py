"""``eplb-compile report --what-if [PLACEMENT]``: what a placement would have changed.

Per model and MoE layer of a recording, over its recorded steps (those of ``--steps A:B``, else all): the
hottest EP rank and its share of the layer's load, max/mean over ranks as
recorded, as predicted under the placement ``eplb-compile place`` computes
(:mod:`eplb_compile.placement`), and under a given placement file. Predicted
loads split each logical expert's recorded load evenly over its replicas.
vLLM instead picks a token's replica from its position in the forward's batch
(:mod:`eplb_compile.reference`), which a recording does not keep. The even
split is each replica's average share when many tokens per forward route
independently of their position; with few tokens per forward the split is
uneven (a one-token forward always takes the first replica) and the measured
max/mean comes out above the predicted one.

And what switching costs, from the map in force at the end of the recording:
per rank, the experts it would receive and send, counted the way vLLM's
``rearrange_expert_weights_inplace`` moves them (``rebalance_execute.py``):
a rank receives an expert it will hold but does not hold now, once however
many slots it fills with it (other slots are local copies); the ranks that
hold it now share the sending, receiver by receiver in rank order. Bytes are
those counts times the size of one expert's weights (``--expert-bytes``, else
the recording's ``expert_bytes`` where it has one). A rearrangement stalls
serving while the weights move.

The text, like the report's own, is summarised for a deployment: past
``MAX_LAYER_LINES`` layers, the most imbalanced as recorded and the mean of all;
past ``MAX_RANK_LINES`` ranks, those that move the most. ``--json`` has all.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from eplb_compile import metrics
from eplb_compile.recording import Recording
from eplb_compile.report_text import MAX_LAYER_LINES, MAX_RANK_LINES

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


def add_what_if_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--what-if", nargs="?", const="", default=None, metavar="PLACEMENT",
                        help="also show the imbalance under the placement `place` would compute (and under "
                             "PLACEMENT, a placement file) and what switching to it moves")
    parser.add_argument("--expert-bytes", type=int, metavar="N",
                        help="bytes of one expert's weights, for --what-if's switching cost")


def option_error(args: argparse.Namespace) -> str | None:
    if args.expert_bytes is not None and args.what_if is None:
        return "argument --expert-bytes: needs --what-if"
    if args.expert_bytes is not None and args.expert_bytes < 1:
        return f"argument --expert-bytes: must be an integer >= 1, got {args.expert_bytes}"
    return None


def transfers(old: torch.Tensor, new: torch.Tensor, ep_size: int) -> tuple[list[int], list[int]]:
    """Experts each rank receives and sends when one layer's map goes from ``old`` to ``new`` (``[physical]``)."""
    per_rank = old.numel() // ep_size
    received, sent = [0] * ep_size, [0] * ep_size
    for expert in sorted(set(new.tolist()) - {-1}):  # -1: a slot elastic EP left empty
        holders = _ranks_holding(old, expert, per_rank)
        takers = [rank for rank in _ranks_holding(new, expert, per_rank) if rank not in holders]
        if not holders or not takers:
            continue
        each = len(takers) // len(holders)
        for position, rank in enumerate(takers):
            remainder_start = len(holders) * each
            sender = holders[position // each] if position < remainder_start else holders[position - remainder_start]
            received[rank] += 1
            sent[sender] += 1
    return received, sent


def _ranks_holding(table: torch.Tensor, expert: int, per_rank: int) -> list[int]:
    slots = (table == expert).nonzero().flatten().tolist()
    return list(dict.fromkeys(slot // per_rank for slot in slots))  # in order of first slot, as vLLM lists them


def switching_cost(current: torch.Tensor, target: torch.Tensor, ep_size: int, expert_bytes: int | None) -> dict:
    """Over all layers: slots whose expert changes, and per rank experts (and bytes) received and sent."""
    if current.shape != target.shape:
        return {"comparable": False, "reason": f"the map in force has {current.shape[1]} slots, the placement "
                                               f"{target.shape[1]}"}
    received, sent = [0] * ep_size, [0] * ep_size
    for old, new in zip(current, target, strict=True):
        layer_received, layer_sent = transfers(old, new, ep_size)
        received = [a + b for a, b in zip(received, layer_received, strict=True)]
        sent = [a + b for a, b in zip(sent, layer_sent, strict=True)]
    out = {"comparable": True, "slots_changed": int((current != target).sum()),
           "layers_changed": int((current != target).any(dim=1).sum()),
           "experts_received": received, "experts_sent": sent, "expert_bytes": expert_bytes}
    if expert_bytes is not None:
        out["bytes_received"] = [n * expert_bytes for n in received]
        out["bytes_sent"] = [n * expert_bytes for n in sent]
    return out


def what_if(recording: Recording, placement_path: str = "", expert_bytes: int | None = None,
            steps: tuple[int | None, int | None] = (None, None)) -> dict:
    """The ``what_if`` part of the report's JSON, over the recorded steps ``first <= step < last``
    (the report's ``--steps``); PlacementError for a given placement that does not fit."""
    import torch  # here, not at the top: the report without --what-if imports no torch

    from eplb_compile.placement import (PlacementError, StepRange, compute_placement, load_placement,
                                        logical_load, predicted_max_over_mean, selected_rows, torch_steps)

    step_range = StepRange(*steps)
    computed = compute_placement(recording, step_range)
    given = load_placement(placement_path) if placement_path else None
    if given is not None and len(given["models"]) != len(recording.models):
        raise PlacementError(f"{placement_path}: {len(given['models'])} models, the recording has "
                             f"{len(recording.models)}")
    out = {"policy": computed["policy"], "given": placement_path or None, "models": []}
    for index, (info, steps) in enumerate(recording.models):
        steps = torch_steps(steps)
        rows = selected_rows(steps, step_range)
        logical = logical_load(steps, rows, info["num_logical"])
        load = steps.load[rows].sum(dim=0)  # [layers, physical]
        ranks = metrics.rank_loads(load, recording.ep_size)  # [layers, ep_size]
        current = steps.maps[-1]
        targets = {"computed": (torch.tensor(computed["models"][index]["physical_to_logical"]), recording.ep_size)}
        if given is not None:
            model = given["models"][index]
            if len(model["layer_names"]) != len(info["layer_names"]) or model["num_logical"] != info["num_logical"]:
                raise PlacementError(f"{placement_path}: model {model['name']!r} has {len(model['layer_names'])} "
                                     f"layers of {model['num_logical']} experts, the recording "
                                     f"{len(info['layer_names'])} of {info['num_logical']}")
            targets["given"] = (model["physical_to_logical"], given["ep_size"])
        predicted = {name: predicted_max_over_mean(logical, table, ep) for name, (table, ep) in targets.items()}
        recorded = metrics.imbalance_max_over_mean(load, recording.ep_size).tolist()
        layers = []
        for layer, name in enumerate(info["layer_names"]):
            total = float(ranks[layer].sum())
            hottest = int(ranks[layer].argmax())
            layers.append({"name": name, "hottest_rank": hottest,
                           "hottest_share": float(ranks[layer, hottest]) / total if total else 0.0,
                           "recorded": recorded[layer], **{k: v[layer] for k, v in predicted.items()}})
        size = expert_bytes if expert_bytes is not None else info.get("expert_bytes")
        out["models"].append({
            "name": info["name"], "steps": len(rows), "layers": layers,
            "switch": {k: switching_cost(current, table, ep, size) if ep == recording.ep_size else
                       {"comparable": False, "reason": f"the placement is for EP size {ep}, the recording "
                                                       f"{recording.ep_size}"}
                       for k, (table, ep) in targets.items()}})
    return out


def _bytes(n: int) -> str:
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_text(result: dict) -> str:
    """The what-if text; past ``MAX_LAYER_LINES`` layers or ``MAX_RANK_LINES`` ranks, the worst of them, a
    line for the rest, and ``--json`` for every one (as the report's own text does)."""
    lines = [f"what-if: max/mean over EP ranks as recorded, and as predicted under the placement computed by "
             f"{result['policy']}" + (f" and under {result['given']}" if result["given"] else "")]
    columns = ["computed"] + (["given"] if result["given"] else [])
    for model in result["models"]:
        layers = model["layers"]
        order = sorted(range(len(layers)), key=lambda i: -layers[i]["recorded"])  # ties: the lower layer
        shown = layers if len(layers) <= MAX_LAYER_LINES else [layers[i] for i in order[:MAX_LAYER_LINES]]
        lines.append(f"model {model['name']} ({model['steps']} steps)"
                     + (f": the {len(shown)} layers most imbalanced as recorded, of {len(layers)}"
                        if len(shown) < len(layers) else ""))
        lines.append(f"  {'layer':<32} {'hottest rank':>12} {'share':>6} {'recorded':>9} "
                     + " ".join(f"{c:>9}" for c in columns))
        for layer in shown:
            lines.append(f"  {layer['name']:<32} {'r' + str(layer['hottest_rank']):>12} "
                         f"{100 * layer['hottest_share']:>5.1f}% {layer['recorded']:>9.3f} "
                         + " ".join(f"{layer[c]:>9.3f}" for c in columns))
        if len(shown) < len(layers):
            rest = layers[order[MAX_LAYER_LINES]]["recorded"]
            lines.append(f"  ... and {len(layers) - len(shown)} other layers (recorded max/mean <= {rest:.3f}); "
                         f"--json has every layer")
            lines.append(f"  {'mean of all ' + str(len(layers)) + ' layers':<52} "
                         + " ".join(f"{sum(l[c] for l in layers) / len(layers):>9.3f}"
                                    for c in ["recorded", *columns]))
        for name, cost in model["switch"].items():
            lines += _switch_text(name, cost)
    return "\n".join(lines)


def _switch_text(name: str, cost: dict) -> list[str]:
    if not cost["comparable"]:
        return [f"  switching to the {name} placement: not comparable ({cost['reason']})"]
    received, sent = cost["experts_received"], cost["experts_sent"]
    sized = "bytes_received" in cost
    lines = [f"  switching to the {name} placement from the map in force at the end: "
             f"{cost['slots_changed']} slots change in {cost['layers_changed']} layers, {sum(received)} expert "
             f"transfers" + (f" ({_bytes(sum(cost['bytes_received']))})" if sized else "")]
    ranks = list(range(len(received)))
    if len(ranks) > MAX_RANK_LINES:  # the busiest ranks: the switch lasts as long as theirs
        ranks = sorted(ranks, key=lambda r: -(received[r] + sent[r]))[:MAX_RANK_LINES]
    for rank in ranks:
        size = f" ({_bytes(cost['bytes_received'][rank])} in, {_bytes(cost['bytes_sent'][rank])} out)" if sized else ""
        lines.append(f"    r{rank}: receives {received[rank]} experts, sends {sent[rank]}{size}")
    if len(ranks) < len(received):
        others = [r for r in range(len(received)) if r not in ranks]
        lines.append(f"    ... and {len(others)} other ranks (each receives <= {max(received[r] for r in others)}, "
                     f"sends <= {max(sent[r] for r in others)}); --json has every rank")
    return lines
