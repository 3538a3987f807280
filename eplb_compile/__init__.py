"""Per-expert load counting for EPLB, as a compile- and graph-friendly operator.

Public API::

    map_and_record(topk_ids, logical_to_physical_map, logical_replica_count,
                   expert_load_view, record_enabled, num_unpadded_tokens=None) -> physical ids
    map_only(topk_ids, logical_to_physical_map, logical_replica_count, num_unpadded_tokens=None) -> physical ids
    record_counts(expert_load_view, counts, start, record_enabled) -> None
    select_lowering(has_exact_counts, num_tokens, *, has_padding_mask=True, min_tokens=None,
                    device=None) -> LoweringChoice
    count_path_min_tokens(device=None) -> int
    eager_route(op, *args) -> EagerRoute   # which implementation an eager call takes, and why
"""

import importlib

# Each public name, and the module that defines it: imported on first use (PEP 562), so that
# `import eplb_compile` and `eplb-compile report` do not pay torch's import (ops registers torch ops).
_DEFINED_IN = {
    "EagerRoute": "eplb_compile.ops", "Implementation": "eplb_compile.ops", "eager_route": "eplb_compile.ops",
    "map_and_record": "eplb_compile.ops", "map_only": "eplb_compile.ops", "record_counts": "eplb_compile.ops",
    "Lowering": "eplb_compile.selection", "LoweringChoice": "eplb_compile.selection",
    "count_path_min_tokens": "eplb_compile.selection", "select_lowering": "eplb_compile.selection",
}

__all__ = [
    "EagerRoute",
    "Implementation",
    "Lowering",
    "LoweringChoice",
    "count_path_min_tokens",
    "eager_route",
    "map_and_record",
    "map_only",
    "record_counts",
    "select_lowering",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(_DEFINED_IN[name]), name)
        globals()[name] = value  # the next look-up is an ordinary attribute
        return value
    raise AttributeError(f"module 'eplb_compile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_DEFINED_IN])
