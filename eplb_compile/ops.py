"""The ``eplb_compile`` operators: schemas, implementations, fakes, wrappers.

Registered with ``torch.library.Library`` ``define``/``impl`` rather than the
``@custom_op`` decorator, whose Python dispatch costs several times more per
eager call (DESIGN §2.1). Each operator has:

- a plain-torch implementation (CPU, and any device without Triton);
- a Triton implementation on CUDA (eager, CUDA graphs, vLLM's opaque MoE op);
- a fake that only validates metadata and allocates;
- a functional decomposition, run when AOTAutograd functionalizes the graph:
  this is what ``torch.library.triton_op`` does internally, and it lets
  Inductor see the Triton kernel (via ``wrap_triton``) or fuse the plain-torch
  body, instead of meeting an opaque extern call.
"""

from __future__ import annotations

import functools

import torch
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from eplb_compile.reference import KNUTH_MULTIPLIER

NAMESPACE = "eplb_compile"
LIB = torch.library.Library(NAMESPACE, "DEF")

# `Tensor(a!)` marks the load as mutated in place: functionalization and
# cudagraph trees rely on it; the ops return nothing else that aliases it.
LIB.define(
    "map_and_record(Tensor topk_ids, Tensor logical_to_physical_map, "
    "Tensor logical_replica_count, Tensor(a!) expert_load_view, "
    "Tensor record_enabled, Tensor? num_unpadded_tokens=None) -> Tensor"
)
LIB.define(
    "map_only(Tensor topk_ids, Tensor logical_to_physical_map, "
    "Tensor logical_replica_count) -> Tensor"
)
# `start` is a SymInt so a different EP rank reuses the same compiled graph.
LIB.define(
    "record_counts(Tensor(a!) expert_load_view, Tensor counts, SymInt start, "
    "Tensor record_enabled) -> ()"
)


@functools.cache
def _triton_kernels():
    """The Triton launchers, or None where Triton is not installed."""
    try:
        from eplb_compile import kernels
    except ImportError:
        return None
    return kernels


# --------------------------------------------------------------------------
# Validation: metadata only (shape, dtype, device, strides), so it is free of
# host syncs and runs identically in the eager call and in the fake at trace
# time.
# --------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_scalar(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    torch._check_type(
        t.dtype == dtype, lambda: f"{name} must be a {dtype} scalar tensor, got dtype {t.dtype}"
    )
    torch._check_value(
        t.numel() == 1, lambda: f"{name} must hold exactly one element, got shape {tuple(t.shape)}"
    )


def _check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check_value(
            t.device == first.device,
            lambda: f"{name} is on {t.device} but {first_name} is on {first.device}; "
            "all tensors must be on one device",
        )


def _check_load(expert_load_view: torch.Tensor) -> None:
    torch._check_type(
        expert_load_view.dtype == torch.int32,
        lambda: f"expert_load_view must be int32, got {expert_load_view.dtype}",
    )
    torch._check_value(
        expert_load_view.dim() == 1,
        lambda: f"expert_load_view must be 1-D [num_physical_experts], got shape "
        f"{tuple(expert_load_view.shape)}",
    )
    torch._check_value(
        expert_load_view.is_contiguous(),
        lambda: f"expert_load_view must be contiguous, got stride {expert_load_view.stride()}",
    )


def _check_map_args(
    topk_ids: torch.Tensor, logical_to_physical_map: torch.Tensor, logical_replica_count: torch.Tensor
) -> None:
    torch._check_type(
        topk_ids.dtype in _INDEX_DTYPES,
        lambda: f"topk_ids must be an integer tensor, got {topk_ids.dtype} "
        "(expected int8, uint8, int16, int32 or int64)",
    )
    torch._check_value(
        topk_ids.dim() == 2, lambda: f"topk_ids must be 2-D [tokens, k], got shape {tuple(topk_ids.shape)}"
    )
    torch._check_type(
        logical_to_physical_map.dtype == torch.int64,
        lambda: f"logical_to_physical_map must be int64, got {logical_to_physical_map.dtype}",
    )
    torch._check_value(
        logical_to_physical_map.dim() == 2,
        lambda: "logical_to_physical_map must be 2-D [num_logical, slots], got shape "
        f"{tuple(logical_to_physical_map.shape)}",
    )
    torch._check_type(
        logical_replica_count.dtype in (torch.int32, torch.int64),
        lambda: f"logical_replica_count must be int32 or int64, got {logical_replica_count.dtype}",
    )
    torch._check_value(
        logical_replica_count.dim() == 1
        and logical_replica_count.shape[0] == logical_to_physical_map.shape[0],
        lambda: f"logical_replica_count must be 1-D with one entry per row of "
        f"logical_to_physical_map ({logical_to_physical_map.shape[0]}), got shape "
        f"{tuple(logical_replica_count.shape)}",
    )
    _check_same_device(
        ("topk_ids", topk_ids),
        ("logical_to_physical_map", logical_to_physical_map),
        ("logical_replica_count", logical_replica_count),
    )


def _check_record_args(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
) -> None:
    _check_load(expert_load_view)
    _check_scalar(record_enabled, "record_enabled", torch.bool)
    named = [("topk_ids", topk_ids), ("expert_load_view", expert_load_view), ("record_enabled", record_enabled)]
    if num_unpadded_tokens is not None:
        _check_scalar(num_unpadded_tokens, "num_unpadded_tokens", torch.int32)
        named.append(("num_unpadded_tokens", num_unpadded_tokens))
    _check_same_device(*named)


def _check_counts_args(
    expert_load_view: torch.Tensor, counts: torch.Tensor, start: int, record_enabled: torch.Tensor
) -> None:
    _check_load(expert_load_view)
    torch._check_type(counts.dtype == torch.int32, lambda: f"counts must be int32, got {counts.dtype}")
    torch._check_value(counts.dim() == 1, lambda: f"counts must be 1-D, got shape {tuple(counts.shape)}")
    _check_scalar(record_enabled, "record_enabled", torch.bool)
    torch._check_value(start >= 0, lambda: f"start must be >= 0, got {start}")
    torch._check_value(
        start + counts.shape[0] <= expert_load_view.shape[0],
        lambda: f"counts of length {counts.shape[0]} starting at start={start} overrun "
        f"expert_load_view of length {expert_load_view.shape[0]}",
    )
    _check_same_device(
        ("expert_load_view", expert_load_view), ("counts", counts), ("record_enabled", record_enabled)
    )


def _map_args_valid(topk_ids, logical_to_physical_map, logical_replica_count) -> bool:
    """One cheap expression with the same meaning as _check_map_args, for eager calls.

    The detailed checks (a closure and a torch._check per condition) cost
    more than the kernel launch; eager calls run them only to build the
    message once this says something is wrong. Fakes always use them, since
    symbolic shapes need torch._check.
    """
    device = topk_ids.device
    return (
        topk_ids.dtype in _INDEX_DTYPES
        and topk_ids.dim() == 2
        and logical_to_physical_map.dtype == torch.int64
        and logical_to_physical_map.dim() == 2
        and logical_replica_count.dtype in (torch.int32, torch.int64)
        and logical_replica_count.dim() == 1
        and logical_replica_count.shape[0] == logical_to_physical_map.shape[0]
        and logical_to_physical_map.device == device
        and logical_replica_count.device == device
    )


def _record_args_valid(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens) -> bool:
    device = topk_ids.device
    return (
        expert_load_view.dtype == torch.int32
        and expert_load_view.dim() == 1
        and expert_load_view.is_contiguous()
        and record_enabled.dtype == torch.bool
        and record_enabled.numel() == 1
        and expert_load_view.device == device
        and record_enabled.device == device
        and (
            num_unpadded_tokens is None
            or (
                num_unpadded_tokens.dtype == torch.int32
                and num_unpadded_tokens.numel() == 1
                and num_unpadded_tokens.device == device
            )
        )
    )


def _counts_args_valid(expert_load_view, counts, start, record_enabled) -> bool:
    device = expert_load_view.device
    return (
        expert_load_view.dtype == torch.int32
        and expert_load_view.dim() == 1
        and expert_load_view.is_contiguous()
        and counts.dtype == torch.int32
        and counts.dim() == 1
        and record_enabled.dtype == torch.bool
        and record_enabled.numel() == 1
        and 0 <= start
        and start + counts.shape[0] <= expert_load_view.shape[0]
        and counts.device == device
        and record_enabled.device == device
    )


def _validate_map(topk_ids, logical_to_physical_map, logical_replica_count) -> None:
    if not _map_args_valid(topk_ids, logical_to_physical_map, logical_replica_count):
        _check_map_args(topk_ids, logical_to_physical_map, logical_replica_count)


def _validate_record(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens) -> None:
    if not _record_args_valid(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens):
        _check_record_args(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens)


def _validate_counts(expert_load_view, counts, start, record_enabled) -> None:
    if not _counts_args_valid(expert_load_view, counts, start, record_enabled):
        _check_counts_args(expert_load_view, counts, start, record_enabled)


# --------------------------------------------------------------------------
# Plain-torch lowerings (CPU; also the compile-time decomposition on CPU).
# --------------------------------------------------------------------------


def _map_torch(
    topk_ids: torch.Tensor, logical_to_physical_map: torch.Tensor, logical_replica_count: torch.Tensor
) -> torch.Tensor:
    """Physical ids as int64, flat, -1 where invalid (vectorised DESIGN §2.1)."""
    num_logical, slots = logical_to_physical_map.shape
    k = topk_ids.shape[1]
    experts = topk_ids.reshape(-1).to(torch.int32).to(torch.int64)
    if num_logical == 0 or slots == 0:
        return torch.full_like(experts, -1)
    flat = torch.arange(experts.shape[0], device=experts.device, dtype=torch.int64)
    valid = (experts >= 0) & (experts < num_logical)
    safe_expert = torch.where(valid, experts, 0)
    replica_count = logical_replica_count.to(torch.int64)[safe_expert].clamp_min(1)
    replica = ((flat // k) * KNUTH_MULTIPLIER).bitwise_and(0xFFFFFFFF) % replica_count
    valid = valid & (replica < slots)
    physical = logical_to_physical_map[safe_expert, torch.where(valid, replica, 0)]
    return torch.where(valid, physical, -1)


def _record_torch(
    physical: torch.Tensor,
    k: int,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
) -> None:
    num_physical = expert_load_view.shape[0]
    if num_physical == 0 or physical.shape[0] == 0:
        return
    record = (physical >= 0) & (physical < num_physical) & record_enabled.reshape(())
    if num_unpadded_tokens is not None:
        flat = torch.arange(physical.shape[0], device=physical.device)
        record = record & (flat < num_unpadded_tokens.reshape(()).to(torch.int64) * k)
    # An int32 accumulating index_put_ lowers to a fused loop with atomic adds;
    # scatter_add_ would fall back to aten on CPU, and int64 on every device.
    expert_load_view.index_put_((torch.where(record, physical, 0),), record.to(torch.int32), accumulate=True)


def _map_and_record_torch(
    topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled, num_unpadded_tokens=None
):
    physical = _map_torch(topk_ids, logical_to_physical_map, logical_replica_count)
    _record_torch(physical, topk_ids.shape[1], expert_load_view, record_enabled, num_unpadded_tokens)
    return physical.to(topk_ids.dtype).reshape(topk_ids.shape)


def _map_only_torch(topk_ids, logical_to_physical_map, logical_replica_count):
    physical = _map_torch(topk_ids, logical_to_physical_map, logical_replica_count)
    return physical.to(topk_ids.dtype).reshape(topk_ids.shape)


def _record_counts_torch(expert_load_view, counts, start, record_enabled):
    n = counts.shape[0]
    # A plain slice add: no arange, no scatter (the upstream reviewers' ask).
    expert_load_view[start : start + n].add_(torch.where(record_enabled.reshape(()), counts, 0))


# --------------------------------------------------------------------------
# Triton lowerings (CUDA).
# --------------------------------------------------------------------------


def _map_and_record_triton(
    topk_ids,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    record_enabled,
    num_unpadded_tokens=None,
    *,
    wrap=False,
):
    kernels = _triton_kernels()
    out = torch.empty(topk_ids.shape, dtype=topk_ids.dtype, device=topk_ids.device)
    if wrap:
        # Under compile, trace the Triton kernel so Inductor can see into it.
        # It records into a fresh buffer that is then added to the load: in
        # torch 2.11 Inductor miscompiles a user kernel that mutates a view
        # with a storage offset (a row of expert_load_pass), while an aten
        # add into such a view is lowered correctly.
        fresh_load = torch.zeros_like(expert_load_view)
        kernels.launch_map(
            topk_ids, logical_to_physical_map, logical_replica_count, out,
            fresh_load, record_enabled, num_unpadded_tokens, wrap=True,
        )
        expert_load_view.add_(fresh_load)
    else:
        kernels.map_and_record_cuda(
            topk_ids, logical_to_physical_map, logical_replica_count,
            expert_load_view, record_enabled, num_unpadded_tokens, out,
        )
    return out


def _map_only_triton(topk_ids, logical_to_physical_map, logical_replica_count, *, wrap=False):
    out = torch.empty(topk_ids.shape, dtype=topk_ids.dtype, device=topk_ids.device)
    if wrap:
        _triton_kernels().launch_map(topk_ids, logical_to_physical_map, logical_replica_count, out, wrap=True)
    else:
        _triton_kernels().map_only_cuda(topk_ids, logical_to_physical_map, logical_replica_count, out)
    return out


def _record_counts_triton(expert_load_view, counts, start, record_enabled):
    _triton_kernels().launch_record_counts(expert_load_view, counts, start, record_enabled)


# --------------------------------------------------------------------------
# Registration.
# --------------------------------------------------------------------------

def _eager_map_and_record(body):
    def map_and_record(
        topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled,
        num_unpadded_tokens=None,
    ):
        _validate_map(topk_ids, logical_to_physical_map, logical_replica_count)
        _validate_record(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens)
        return body(
            topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled,
            num_unpadded_tokens,
        )

    return map_and_record


def _eager_map_only(body):
    def map_only(topk_ids, logical_to_physical_map, logical_replica_count):
        _validate_map(topk_ids, logical_to_physical_map, logical_replica_count)
        return body(topk_ids, logical_to_physical_map, logical_replica_count)

    return map_only


def _eager_record_counts(body):
    def record_counts(expert_load_view, counts, start, record_enabled):
        _validate_counts(expert_load_view, counts, start, record_enabled)
        body(expert_load_view, counts, start, record_enabled)

    return record_counts


LIB.impl("map_and_record", _eager_map_and_record(_map_and_record_torch), "CPU")
LIB.impl("map_only", _eager_map_only(_map_only_torch), "CPU")
LIB.impl("record_counts", _eager_record_counts(_record_counts_torch), "CPU")

if _triton_kernels() is not None:
    LIB.impl("map_and_record", _eager_map_and_record(_map_and_record_triton), "CUDA")
    LIB.impl("map_only", _eager_map_only(_map_only_triton), "CUDA")
    LIB.impl("record_counts", _eager_record_counts(_record_counts_triton), "CUDA")


@torch.library.register_fake(f"{NAMESPACE}::map_and_record", lib=LIB)
def _map_and_record_fake(
    topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled, num_unpadded_tokens=None
):
    _check_map_args(topk_ids, logical_to_physical_map, logical_replica_count)
    _check_record_args(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens)
    return topk_ids.new_empty(topk_ids.shape)


@torch.library.register_fake(f"{NAMESPACE}::map_only", lib=LIB)
def _map_only_fake(topk_ids, logical_to_physical_map, logical_replica_count):
    _check_map_args(topk_ids, logical_to_physical_map, logical_replica_count)
    return topk_ids.new_empty(topk_ids.shape)


@torch.library.register_fake(f"{NAMESPACE}::record_counts", lib=LIB)
def _record_counts_fake(expert_load_view, counts, start, record_enabled):
    _check_counts_args(expert_load_view, counts, start, record_enabled)


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and _triton_kernels() is not None


# Under AOTAutograd the decomposition may run without the fake having run
# (aot_function, opcheck), so it validates with the symbolic-safe checks.
def _map_and_record_decomposition(
    topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled,
    num_unpadded_tokens=None,
):
    _check_map_args(topk_ids, logical_to_physical_map, logical_replica_count)
    _check_record_args(topk_ids, expert_load_view, record_enabled, num_unpadded_tokens)
    args = (topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled,
            num_unpadded_tokens)
    if _on_cuda(topk_ids):
        return _map_and_record_triton(*args, wrap=True)
    return _map_and_record_torch(*args)


def _map_only_decomposition(topk_ids, logical_to_physical_map, logical_replica_count):
    _check_map_args(topk_ids, logical_to_physical_map, logical_replica_count)
    if _on_cuda(topk_ids):
        return _map_only_triton(topk_ids, logical_to_physical_map, logical_replica_count, wrap=True)
    return _map_only_torch(topk_ids, logical_to_physical_map, logical_replica_count)


def _record_counts_decomposition(expert_load_view, counts, start, record_enabled):
    _check_counts_args(expert_load_view, counts, start, record_enabled)
    # The count path stays plain torch on every device, so Inductor fuses it
    # with its neighbours into generated code (one kernel on CUDA).
    _record_counts_torch(expert_load_view, counts, start, record_enabled)


_DECOMPOSITIONS = {
    "map_and_record": _map_and_record_decomposition,
    "map_only": _map_only_decomposition,
    "record_counts": _record_counts_decomposition,
}


def _register_functional_decomposition(name: str) -> None:
    decomposition = _DECOMPOSITIONS[name]

    def functional_decomposition(mode, op, types, args, kwargs):
        # Same contract as torch.library.triton_op: decompose only plain,
        # fake and functional tensors; leave other subclasses to themselves.
        if any(
            not issubclass(t, torch._subclasses.FakeTensor) and t not in (torch.Tensor, FunctionalTensor)
            for t in types
        ):
            return NotImplemented
        with mode:
            return decomposition(*args, **kwargs)

    torch.library.register_torch_dispatch(
        f"{NAMESPACE}::{name}", FunctionalTensorMode, functional_decomposition, lib=LIB
    )


for _name in _DECOMPOSITIONS:
    _register_functional_decomposition(_name)


# --------------------------------------------------------------------------
# Public wrappers.
# --------------------------------------------------------------------------


def map_and_record(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map logical expert ids to physical ones and count them, in one kernel.

    Bit-identical to vLLM 0.33.0's ``eplb_map_to_physical_and_record``, except
    that a replica index past the map's slots is treated as invalid (-1)
    instead of being read out of bounds.

    Args:
        topk_ids: ``[T, k]`` logical expert ids, any integer dtype (read as int32).
        logical_to_physical_map: ``[num_logical, slots]`` int64, padded with -1.
        logical_replica_count: ``[num_logical]`` int32 or int64.
        expert_load_view: ``[num_physical]`` int32, contiguous; incremented in place.
        record_enabled: bool scalar tensor; nothing is recorded when it is False.
        num_unpadded_tokens: optional int32 scalar tensor; rows at or past it
            are mapped but not counted.

    Returns:
        Physical expert ids with the shape and dtype of ``topk_ids``; -1 for
        invalid ids.
    """
    return torch.ops.eplb_compile.map_and_record.default(
        topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view, record_enabled, num_unpadded_tokens
    )


def map_only(
    topk_ids: torch.Tensor, logical_to_physical_map: torch.Tensor, logical_replica_count: torch.Tensor
) -> torch.Tensor:
    """The mapping of :func:`map_and_record`, without recording.

    Used when the load comes from the dispatch backend's counts instead.
    """
    return torch.ops.eplb_compile.map_only.default(topk_ids, logical_to_physical_map, logical_replica_count)


def record_counts(
    expert_load_view: torch.Tensor, counts: torch.Tensor, start: int, record_enabled: torch.Tensor
) -> None:
    """``expert_load_view[start:start+n] += counts`` when ``record_enabled``.

    One kernel (gate included), no host sync. ``counts`` is the backend's
    int32 ``expert_num_tokens`` for this rank's ``n`` local physical experts,
    and ``start = ep_rank * n`` under EPLB's linear placement.
    """
    torch.ops.eplb_compile.record_counts.default(expert_load_view, counts, start, record_enabled)
