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

from eplb_compile.ops import EagerRoute, Implementation, eager_route, map_and_record, map_only, record_counts
from eplb_compile.selection import Lowering, LoweringChoice, count_path_min_tokens, select_lowering

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
