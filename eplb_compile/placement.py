"""Placements: which logical expert each physical slot holds, computed from a recording.

``compute_placement`` runs the rebalancing policy (:mod:`eplb_compile.rebalance`:
vLLM's ``DefaultEplbPolicy`` when vLLM is installed, else our equal
implementation) on the logical load of a step range of a recording, per
recorded model, and predicts the imbalance the placement would have had.

The placement file (``FORMAT_NAME``, ``FORMAT_VERSION``; JSON, one object):

- ``format``, ``version``; ``ep_size`` (the EP size it is for), ``num_groups``
  and ``num_nodes`` (as passed to the policy), ``policy`` (``"vllm <version>"``
  or ``"eplb_compile"``), ``recording`` (the folder it was computed from);
- ``models``: per recorded model (vLLM's main model first, a drafter next):
  ``name``, ``layer_names`` (vLLM's MoE layer names, one per row),
  ``num_logical``, ``num_physical`` (``num_logical + num_redundant``),
  ``num_redundant``, ``steps`` (first and last recorded step used, and how many),
  ``physical_to_logical`` (``[layers][num_physical]``: slot s of layer l holds
  logical expert ``physical_to_logical[l][s]``; rank r owns slots
  ``[r * P / ep_size, (r + 1) * P / ep_size)``), ``recorded_max_over_mean`` and
  ``predicted_max_over_mean`` (per layer: the hottest EP rank's load over the
  mean, 1.0 is perfect; predicted with each logical expert's recorded load split
  evenly over its replicas, as vLLM spreads tokens over replicas).

``load_placement`` reads and checks one; ``PlacementError`` is its one-line error.
The peers' formats are in :mod:`eplb_compile.placement_formats`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from eplb_compile import metrics
from eplb_compile.rebalance import policy_rebalance
from eplb_compile.recording import START_UP_STEP, ModelSteps, Recording

FORMAT_NAME = "eplb_compile.placement"
FORMAT_VERSION = 1


class PlacementError(ValueError):
    """A placement that cannot be computed, read or applied; the message is one line."""


@dataclass(frozen=True)
class StepRange:
    """Recorded steps s with ``first <= s < stop`` (None: unbounded), as ``--steps A:B`` reads."""

    first: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str) -> StepRange:
        parts = text.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            first, stop = (int(p) if p.strip() else None for p in parts)
        except ValueError:
            raise PlacementError(f"step range must be A:B (either may be left out), got {text!r}") from None
        if first is not None and stop is not None and stop <= first:
            raise PlacementError(f"step range {text!r} is empty (B must be greater than A)")
        return cls(first, stop)

    def __contains__(self, step: int) -> bool:
        return (self.first is None or step >= self.first) and (self.stop is None or step < self.stop)

    def __str__(self) -> str:
        return f"{'' if self.first is None else self.first}:{'' if self.stop is None else self.stop}"


# ----------------------------------------------------------------------- load and prediction


def torch_steps(steps: ModelSteps) -> ModelSteps:
    """A recording's model (numpy arrays, as :mod:`eplb_compile.recording` reads them) as tensors, sharing memory."""
    return ModelSteps(steps.steps, torch.as_tensor(steps.load), steps.map_steps, torch.as_tensor(steps.maps))


def map_before(steps: ModelSteps, step: int) -> torch.Tensor:
    """The map a pass recorded at ``step`` was routed by: the last one committed at an earlier step."""
    index = max(i for i, s in enumerate(steps.map_steps) if s < step)
    return steps.maps[index]


def start_up_map(steps: ModelSteps) -> torch.Tensor:
    return steps.maps[steps.map_steps.index(START_UP_STEP)]


def selected_rows(steps: ModelSteps, step_range: StepRange) -> list[int]:
    return [row for row, step in enumerate(steps.steps) if step in step_range]


def logical_load(steps: ModelSteps, rows: list[int], num_logical: int) -> torch.Tensor:
    """``[layers, logical]``: the recorded passes at ``rows``, each mapped with the map it was routed by."""
    total = torch.zeros((steps.load.shape[1], num_logical), dtype=torch.int64)
    for row in rows:
        total += metrics.logical_load(steps.load[row], map_before(steps, steps.steps[row]), num_logical)
    return total


def predicted_physical_load(logical: torch.Tensor, physical_to_logical: torch.Tensor) -> torch.Tensor:
    """``[layers, physical]`` float64: each logical expert's load split evenly over its replicas."""
    replicas = torch.stack([torch.bincount(row, minlength=logical.shape[1]) for row in physical_to_logical])
    per_replica = logical.to(torch.float64) / replicas.clamp_min(1)
    return torch.gather(per_replica, 1, physical_to_logical.long())


def predicted_max_over_mean(logical: torch.Tensor, physical_to_logical: torch.Tensor, ep_size: int) -> list[float]:
    return metrics.imbalance_max_over_mean(predicted_physical_load(logical, physical_to_logical), ep_size).tolist()


# ----------------------------------------------------------------------- computing


def compute_placement(recording: Recording, step_range: StepRange = StepRange(), ep_size: int | None = None,
                      num_redundant: int | None = None, num_groups: int = 1, num_nodes: int = 1) -> dict:
    """The placement file's object for every model of ``recording``; PlacementError for options that cannot work."""
    ep_size = recording.ep_size if ep_size is None else ep_size
    if ep_size % num_nodes:
        raise PlacementError(f"--num-nodes {num_nodes} does not divide the EP size {ep_size}")
    out = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "ep_size": ep_size, "num_groups": num_groups,
           "num_nodes": num_nodes, "policy": None, "recording": recording.path, "models": []}
    for info, steps in recording.models:
        steps = torch_steps(steps)
        num_logical = info["num_logical"]
        redundant = info["num_physical"] - num_logical if num_redundant is None else num_redundant
        num_physical = num_logical + redundant
        if num_physical % ep_size:
            raise PlacementError(f"model {info['name']!r}: {num_logical} logical + {redundant} redundant experts "
                                 f"do not split evenly over EP size {ep_size}")
        if num_logical % num_groups:
            raise PlacementError(f"--num-groups {num_groups} does not divide the {num_logical} logical experts "
                                 f"of model {info['name']!r}")
        rows = selected_rows(steps, step_range)
        if not rows:
            raise PlacementError(f"model {info['name']!r}: no recorded step in --steps {step_range} "
                                 f"(recorded: {_span(steps.steps)})")
        logical = logical_load(steps, rows, num_logical)
        old = start_up_map(steps)  # keep experts in the slots a fresh server starts them in, where possible
        same_shape = old.shape[1] == num_physical and ep_size == recording.ep_size
        placement, policy = policy_rebalance(logical, num_physical, num_groups, num_nodes, ep_size,
                                             old if same_shape else None)
        out["policy"] = policy if policy != "vllm" else f"vllm {_vllm_version()}"
        recorded = metrics.imbalance_max_over_mean(steps.load[rows].sum(dim=0), recording.ep_size).tolist()
        used = [steps.steps[row] for row in rows]
        out["models"].append({
            "name": info["name"], "layer_names": info["layer_names"], "num_logical": num_logical,
            "num_physical": num_physical, "num_redundant": redundant,
            "steps": {"first": used[0], "last": used[-1], "count": len(used)},
            "physical_to_logical": placement.tolist(), "recorded_max_over_mean": recorded,
            "predicted_max_over_mean": predicted_max_over_mean(logical, placement, ep_size)})
    return out


def _span(steps: list[int]) -> str:
    return f"steps {steps[0]} to {steps[-1]}" if steps else "no steps"


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


# ----------------------------------------------------------------------- reading and checking


def check_map(physical_to_logical: torch.Tensor, num_logical: int, ep_size: int, where: str) -> None:
    """PlacementError naming the first problem: ids out of range, a logical expert without replica, slots vs EP."""
    if physical_to_logical.dim() != 2:
        raise PlacementError(f"{where}: physical_to_logical must be [layers][slots]")
    layers, num_physical = physical_to_logical.shape
    if ep_size <= 0 or num_physical % ep_size:
        raise PlacementError(f"{where}: {num_physical} slots do not split evenly over EP size {ep_size}")
    bad = (physical_to_logical < 0) | (physical_to_logical >= num_logical)
    if bad.any():
        layer, slot = (int(i) for i in bad.nonzero()[0])
        expert = int(physical_to_logical[layer, slot])
        raise PlacementError(f"{where}: layer {layer} slot {slot} holds expert {expert}, outside 0..{num_logical - 1}")
    for layer in range(layers):
        missing = (torch.bincount(physical_to_logical[layer], minlength=num_logical) == 0).nonzero().flatten()
        if missing.numel():
            raise PlacementError(f"{where}: layer {layer} has no replica of logical expert {int(missing[0])}")


def load_placement(path: str) -> dict:
    """A placement file, checked; each model's ``physical_to_logical`` as an int64 tensor."""
    try:
        with open(path) as handle:
            placement = json.load(handle)
    except OSError as error:
        raise PlacementError(f"{path}: cannot read ({error.strerror})") from None
    except ValueError:
        raise PlacementError(f"{path}: not a placement (not JSON, or truncated)") from None
    if not isinstance(placement, dict) or placement.get("format") != FORMAT_NAME:
        raise PlacementError(f"{path}: not a placement (no format {FORMAT_NAME!r})")
    if placement.get("version") != FORMAT_VERSION:
        raise PlacementError(f"{path}: unknown placement version {placement.get('version')!r} "
                             f"(this eplb_compile reads version {FORMAT_VERSION})")
    try:
        ep_size = int(placement["ep_size"])
        for model in placement["models"]:
            where = f"{path}: model {model['name']!r}"
            try:
                table = torch.tensor(model["physical_to_logical"], dtype=torch.int64)
            except (TypeError, ValueError):
                raise PlacementError(f"{where}: physical_to_logical is not a [layers][slots] table of integers") \
                    from None
            if table.dim() != 2 or table.shape != (len(model["layer_names"]), int(model["num_physical"])):
                raise PlacementError(f"{where}: physical_to_logical is {list(table.shape)}, expected "
                                     f"[{len(model['layer_names'])} layers, {model['num_physical']} slots]")
            check_map(table, int(model["num_logical"]), ep_size, where)
            model["physical_to_logical"] = table
    except (KeyError, TypeError) as error:
        raise PlacementError(f"{path}: not a complete placement (missing or malformed {error})") from None
    return placement


def to_json(placement: dict) -> str:
    plain = {**placement, "models": [{**m, "physical_to_logical": torch.as_tensor(m["physical_to_logical"]).tolist()}
                                     for m in placement["models"]]}
    return json.dumps(plain, indent=1)
