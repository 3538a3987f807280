"""Which topk-path kernel runs on which card: measured plans, stored as data.

One JSON file per card in ``configs/`` (``device_name=<NAME>.json``, NAME
being ``torch.cuda.get_device_name(i)`` with spaces as underscores) and a
conservative ``default.json`` for every other card and for the CPU. The
``EPLB_COMPILE_KERNEL_PLAN`` environment variable names a file of the same
format that replaces them all (what ``eplb-compile bench`` writes, for users
who re-tune: the library's own files are never edited). Plain Python:
importing this needs neither Triton nor a GPU.

Format::

    {"format": 1, "device_name": "NVIDIA_H200",
     "topk_plan": [[0, "direct"], [4096, "hist_e1"], ...],
     "count_path_min_tokens": 65536,
     "measured_with": {"torch": "...", "triton": "...", "date": "...", "note": "..."}}

``topk_plan`` rows are (min_numel, variant) in ascending min_numel from 0:
the last row whose min_numel <= T * k picks the variant.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

PLAN_ENV = "EPLB_COMPILE_KERNEL_PLAN"
FORMAT = 1
# "triton" is triton_kernels.py's one-atomic-per-element kernel; the others are cuda_variants.VARIANTS.
VARIANT_NAMES = ("triton", "direct", "hist_e1", "hist_e4", "hist_e4_wide")


@dataclass(frozen=True)
class KernelPlan:
    device_name: str
    topk_plan: tuple[tuple[int, str], ...]
    count_path_min_tokens: int
    source: str  # the file it was read from

    def topk_variant(self, numel: int) -> str:
        """The variant for a topk call of ``numel`` = T * k elements (a shape: no sync)."""
        chosen = self.topk_plan[0][1]
        for min_numel, variant in self.topk_plan:
            if numel < min_numel:
                break
            chosen = variant
        return chosen


class PlanFileError(ValueError):
    pass


def _parse(data: object, source: str) -> KernelPlan:
    def fail(key: str, expected: str, got: object) -> PlanFileError:
        return PlanFileError(f"kernel plan {source}: {key!r} must be {expected}, got {got!r}")

    if not isinstance(data, dict):
        raise fail("(top level)", "a JSON object", data)
    if data.get("format") != FORMAT:
        raise fail("format", str(FORMAT), data.get("format"))
    name = data.get("device_name")
    if not isinstance(name, str) or not name:
        raise fail("device_name", "a non-empty string", name)
    rows = data.get("topk_plan")
    expected_rows = f"a list of [min_numel, variant] rows, min_numel ascending from 0, variant one of {VARIANT_NAMES}"
    if not isinstance(rows, list) or not rows:
        raise fail("topk_plan", expected_rows, rows)
    plan = []
    for row in rows:
        ok = (
            isinstance(row, list) and len(row) == 2 and type(row[0]) is int and row[0] >= 0
            and row[1] in VARIANT_NAMES and (row[0] > plan[-1][0] if plan else row[0] == 0)
        )
        if not ok:
            raise fail("topk_plan", expected_rows, row)
        plan.append((row[0], row[1]))
    crossover = data.get("count_path_min_tokens")
    if type(crossover) is not int or crossover < 0:
        raise fail("count_path_min_tokens", "a non-negative integer", crossover)
    if not isinstance(data.get("measured_with"), dict):
        raise fail("measured_with", "an object (torch, triton, date, note)", data.get("measured_with"))
    return KernelPlan(name, tuple(plan), crossover, source)


def load_plan_file(path: str | os.PathLike) -> KernelPlan:
    """Read and validate one plan file; PlanFileError names the file and the key."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    # ValueError: not UTF-8 (UnicodeDecodeError), not JSON, an integer too long
    # to convert; RecursionError: nesting too deep.
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PlanFileError(f"kernel plan {path}: cannot be read as JSON: {reason}") from None
    return _parse(data, str(path))


def _packaged(file_name: str) -> KernelPlan | None:
    entry = resources.files("eplb_compile.kernels").joinpath("configs", file_name)
    if not entry.is_file():
        return None
    return _parse(json.loads(entry.read_text()), f"eplb_compile/kernels/configs/{file_name}")


@functools.cache
def _plan_for_name(device_name: str | None) -> KernelPlan:
    override = os.environ.get(PLAN_ENV)
    if override:
        try:
            return load_plan_file(override)
        except PlanFileError as error:
            raise PlanFileError(f"{PLAN_ENV}={override}: {error}") from None
    if device_name is not None:
        found = _packaged(f"device_name={device_name.replace(' ', '_')}.json")
        if found is not None:
            return found
    return _packaged("default.json")


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)  # a property query: no sync, no kernel


def plan_for_device(device: torch.device | None) -> KernelPlan:
    """The plan for ``device``'s card (cached; no sync). CPU and None get the default."""
    if device is None or device.type != "cuda":
        return _plan_for_name(None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _plan_for_name(_device_name(index))


def count_path_min_tokens(device: torch.device | None) -> int:
    """Tokens per rank from which the count path beats the fused topk kernel on ``device``'s card."""
    return plan_for_device(device).count_path_min_tokens


def clear_cache() -> None:
    """Forget the plans read so far (after changing ``EPLB_COMPILE_KERNEL_PLAN``)."""
    _plan_for_name.cache_clear()
