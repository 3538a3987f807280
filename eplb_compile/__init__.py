"""Per-expert load counting for EPLB, as a compile- and graph-friendly operator.

Public API::

    map_and_record(topk_ids, l2p, replica_count, load, record_enabled, num_unpadded=None)
    map_only(topk_ids, l2p, replica_count, num_unpadded=None)
    record_counts(load, counts, start, record_enabled)
    select_lowering(...) -> LoweringChoice
"""

from eplb_compile.ops import map_and_record, map_only, record_counts
from eplb_compile.selection import Lowering, LoweringChoice, count_path_min_tokens, select_lowering

__all__ = [
    "Lowering",
    "LoweringChoice",
    "count_path_min_tokens",
    "map_and_record",
    "map_only",
    "record_counts",
    "select_lowering",
]
__version__ = "0.1.0"
