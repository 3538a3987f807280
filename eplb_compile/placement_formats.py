"""A placement in the formats other servers load at start-up (the main model's, model 0).

- **SGLang** ``--init-expert-location FILE.json``: one JSON object
  ``{"physical_to_logical_map": [[...], ...]}``, one row per decoder layer
  *of the whole model*, indexed by layer number (SGLang's
  ``ExpertLocationMetadata.init_by_mapping``; a ``.json`` path is read as a
  file). The row of a recorded MoE layer goes at the layer number in its vLLM
  name (``model.layers.<i>.mlp.experts``); a layer the recording does not
  name (a dense layer, such as DeepSeek's first three) gets SGLang's trivial
  row (slot s holds expert ``s % num_logical``). SGLang's own
  ``--ep-num-redundant-experts`` must equal the placement's ``num_redundant``.
- **vLLM PR #41141** ``initial_mapping_path`` (offline EPLB, not in a vLLM
  release): a JSONL file of one record ``{"record_type": "eplb_initial_mapping",
  "version": 1, "num_redundant_experts": R, "num_slots": P,
  "initial_global_assignments": {"0": [...], "1": [...]}}``, keyed by MoE-layer
  index as a string (vLLM's order of MoE layers, the recording's), each list
  the layer's physical -> logical map. The key name is TensorRT-LLM's
  (``moe_config.load_balancer.initial_global_assignments``), whose YAML takes
  the same per-layer lists plus ``num_slots``.
"""

from __future__ import annotations

import json
import re

import torch

from eplb_compile.placement import PlacementError

_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def sglang_init_expert_location(placement: dict) -> dict:
    model = placement["models"][0]
    table = torch.as_tensor(model["physical_to_logical"])
    numbers = []
    for name in model["layer_names"]:
        match = _LAYER_NUMBER.search(name)
        if match is None:
            raise PlacementError(f"--sglang: layer name {name!r} has no 'layers.<number>.' part to place it by")
        numbers.append(int(match.group(1)))
    if len(set(numbers)) != len(numbers):
        raise PlacementError("--sglang: two recorded layers share a layer number")
    trivial = (torch.arange(model["num_physical"]) % model["num_logical"]).tolist()
    rows = [trivial] * (max(numbers) + 1)
    for row, number in zip(table.tolist(), numbers, strict=True):
        rows[number] = row
    return {"physical_to_logical_map": rows}


def vllm_initial_mapping_record(placement: dict) -> dict:
    model = placement["models"][0]
    table = torch.as_tensor(model["physical_to_logical"])
    return {"record_type": "eplb_initial_mapping", "version": 1,
            "num_redundant_experts": int(model["num_redundant"]), "num_slots": int(table.shape[1]),
            "initial_global_assignments": {str(layer): row for layer, row in enumerate(table.tolist())}}


def write_vllm_initial_mapping(placement: dict, path: str) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(vllm_initial_mapping_record(placement)) + "\n")
