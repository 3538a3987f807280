"""``eplb-compile place RECORDING -o PLACEMENT``: a placement computed from a recording.

Reads the recording (:mod:`eplb_compile.recording`), runs the rebalancing
policy on the logical load of ``--steps A:B`` (recorded step numbers s with
A <= s < B; default all) for ``--ep-size`` and ``--num-redundant`` (default:
the recording's), writes the placement file (:mod:`eplb_compile.placement`)
and, on request, the same placement for SGLang (``--sglang``) and for vLLM
PR #41141 (``--initial-mapping``): :mod:`eplb_compile.placement_formats`.
Prints per layer the recorded and predicted max/mean. A bad option or
recording is one line on stderr, exit status 2. Needs neither vLLM nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eplb_compile.cli import bounded_int
from eplb_compile.recording import RecordingError, read_recording


def add_place_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", metavar="RECORDING", help="the recorder's record_dir")
    parser.add_argument("-o", "--output", required=True, metavar="PLACEMENT", help="the placement file to write (JSON)")
    parser.add_argument("--steps", default=":", metavar="A:B",
                        help="recorded steps s with A <= s < B to balance for (default all; A or B may be left out)")
    parser.add_argument("--ep-size", type=bounded_int(1, 1024), help="EP size to place for (default: the recording's)")
    parser.add_argument("--num-redundant", type=bounded_int(0, 65536),
                        help="redundant experts per layer (default: the recording's)")
    parser.add_argument("--num-groups", type=bounded_int(1, 65536), default=1,
                        help="expert groups, as the model's num_expert_groups (default 1: global balancing)")
    parser.add_argument("--num-nodes", type=bounded_int(1, 4096), default=1,
                        help="nodes the EP ranks span (default 1); >1 balances groups over nodes first, as vLLM does")
    parser.add_argument("--sglang", metavar="FILE.json", help="also write SGLang's --init-expert-location file")
    parser.add_argument("--initial-mapping", metavar="FILE.jsonl",
                        help="also write vLLM PR #41141's eplb_initial_mapping record")


def _fail(message: str) -> int:
    print(f"eplb-compile place: error: {message}", file=sys.stderr)
    return 2


def _unwritable(option: str, path: str | None) -> str | None:
    if path is None:
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"argument {option}: {path!r} is a directory, expected a file name"
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"argument {option}: directory {parent!r} does not exist or is not writable"
    return None


def format_text(placement: dict) -> str:
    lines = [f"placement for EP size {placement['ep_size']} by {placement['policy']} from {placement['recording']}"]
    for model in placement["models"]:
        steps = model["steps"]
        lines.append(f"model {model['name']}: {model['num_logical']} logical experts in {model['num_physical']} slots "
                     f"({model['num_redundant']} redundant), {steps['count']} steps ({steps['first']} to "
                     f"{steps['last']}); max/mean over EP ranks, recorded -> predicted")
        for name, recorded, predicted in zip(model["layer_names"], model["recorded_max_over_mean"],
                                             model["predicted_max_over_mean"], strict=True):
            lines.append(f"  {name}: {recorded:.3f} -> {predicted:.3f}")
    return "\n".join(lines)


def place_command(args: argparse.Namespace) -> int:
    # Here, not at the top: the CLI imports this module to build its parser, and the policy needs torch.
    from eplb_compile import placement_formats
    from eplb_compile.placement import PlacementError, StepRange, compute_placement, to_json

    for option, path in [("-o", args.output), ("--sglang", args.sglang), ("--initial-mapping", args.initial_mapping)]:
        problem = _unwritable(option, path)
        if problem:
            return _fail(problem)
    try:
        step_range = StepRange.parse(args.steps)
        placement = compute_placement(read_recording(args.recording), step_range, args.ep_size, args.num_redundant,
                                      args.num_groups, args.num_nodes)
        sglang = args.sglang and placement_formats.sglang_init_expert_location(placement)
    except (RecordingError, PlacementError) as error:
        return _fail(str(error))
    with open(args.output, "w") as handle:
        handle.write(to_json(placement) + "\n")
    if args.sglang:
        with open(args.sglang, "w") as handle:
            json.dump(sglang, handle)
    if args.initial_mapping:
        placement_formats.write_vllm_initial_mapping(placement, args.initial_mapping)
    print(format_text(placement))
    for path in filter(None, [args.output, args.sglang, args.initial_mapping]):
        print(f"wrote {path}", file=sys.stderr)
    return 0
