"""``--topk-plan auto``: a card's kernel plan derived from the variant table, as a plan file.

The plan is written to ``<out>/device_name=<NAME>.json`` in the format of
``eplb_compile/kernels/plans.py`` (the library's own configs are never
edited; point ``EPLB_COMPILE_KERNEL_PLAN`` at the file, or copy it into
``eplb_compile/kernels/configs/`` in a change of its own). The candidate plan
is timed through :func:`plan_launcher`, an explicit launcher, never by
changing the plan the operators read. Plain Python and torch: no GPU needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from eplb_compile.kernels import plans
from eplb_compile.kernels.call import KernelCall

# Keep the current variant while it is within this factor of the fastest: a
# plan that switches on noise costs a switch and buys nothing.
PLAN_TIE = 1.02


def derive_plan(times: dict[int, dict[str, float]], k: int) -> tuple[tuple[int, str], ...]:
    """Plan rows ``(min_numel, variant)`` from per-T medians ``{tokens: {variant: µs}}``.

    At each measured T the fastest variant wins (ties keep the current one);
    a switch between two measured token counts is placed at their geometric
    middle, in elements (tokens x ``k``). Variants missing at a T are skipped.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    unknown = {name for row in times.values() for name in row} - set(plans.VARIANT_NAMES)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; expected some of {plans.VARIANT_NAMES}")
    plan: list[tuple[int, str]] = []
    previous_tokens = None
    for tokens in sorted(times):
        row = times[tokens]
        if not row:
            continue
        best = min(row, key=row.get)
        if plan and plan[-1][1] in row and row[plan[-1][1]] <= PLAN_TIE * row[best]:
            best = plan[-1][1]
        if not plan:
            plan.append((0, best))
        elif best != plan[-1][1]:
            # ceil(sqrt(a*b)) lies in (a, b] for a < b: rows stay strictly ascending.
            plan.append((math.ceil(math.sqrt(previous_tokens * tokens)) * k, best))
        previous_tokens = tokens
    return tuple(plan) or ((0, "triton"),)


def count_path_crossover(count_path: dict[int, float], topk: dict[int, float]) -> int | None:
    """Smallest measured T from which the count path beats topk at every larger measured T."""
    crossover = None
    for tokens in sorted(set(count_path) & set(topk), reverse=True):
        if count_path[tokens] >= topk[tokens]:
            break
        crossover = tokens
    return crossover


def plan_crossover(measured: int | None, tokens: list[int]) -> int:
    """The crossover to store: the measured one, else past the measured range (twice its largest T)."""
    return measured if measured is not None else 2 * max(tokens)


def file_name(device_name: str) -> str:
    """``device_name=<NAME>.json``, the name ``plans.plan_for_device`` looks up."""
    return f"device_name={device_name.replace(' ', '_')}.json"


def write_plan_file(out_dir: str | Path, device_name: str, plan: tuple[tuple[int, str], ...], crossover: int,
                    measured_with: dict[str, str]) -> Path:
    """Write the plan file into ``out_dir`` and read it back with the library's parser (so it loads)."""
    path = Path(out_dir) / file_name(device_name)
    data = {
        "format": plans.FORMAT,
        "device_name": device_name.replace(" ", "_"),
        "topk_plan": [[int(min_numel), variant] for min_numel, variant in plan],
        "count_path_min_tokens": int(crossover),
        "measured_with": dict(measured_with),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    plans.load_plan_file(path)  # PlanFileError here, not when a user loads it
    return path


def kernel_plan(device_name: str, plan: tuple[tuple[int, str], ...], crossover: int) -> plans.KernelPlan:
    return plans.KernelPlan(device_name.replace(" ", "_"), tuple(plan), crossover, "derived in this run")


def plan_launcher(plan: plans.KernelPlan) -> Callable[[KernelCall], None]:
    """Launch a topk call as the operators would under ``plan``: its variant if it takes the call, else Triton."""
    from eplb_compile.kernels.cuda_variants import VARIANTS
    from eplb_compile.kernels.triton_kernels import launch_map

    def launch(call: KernelCall) -> None:
        name = plan.topk_variant(call.ids.numel())
        variant = VARIANTS.get(name)
        if variant is not None and variant.supports(call):
            variant.launch_supported(call)
        else:
            launch_map(call)

    return launch
