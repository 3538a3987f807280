"""What the bench times: one call per MoE layer, and its check against the reference.

Every implementation takes a ``KernelCall`` (the layer's tensors by name);
the count kinds also take the backend's counts and the rank's first expert.

- ``map_record``: the topk path (ids mapped and counted in one call): our
  operator, each CUDA variant and the Triton kernel through explicit
  launchers, a candidate plan's launcher, vLLM's launcher;
- ``map_only``: the mapping alone (the topk path's floor);
- ``count_path``: what the plugin runs when the backend counts: ``map_only``
  with ``num_unpadded`` (padded rows come back -1), then ``record_counts``:
  two kernels;
- ``counts``: the count kernel alone; ``floor``: a one-element add, the
  cheapest kernel a graph can hold; ``copy``: ``out.copy_(ids)``, the
  cheapest kernel that moves the topk path's bytes (ids in, ids out).

Nothing here reads or writes library state: a variant is launched by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eplb_compile.bench.inputs import POISON, Expected, Setup, Workload, padded
from eplb_compile.kernels.call import KernelCall

VARIANT_PREFIX = "variant:"  # + a plan variant name: "variant:triton", "variant:direct", ...


@dataclass
class Impl:
    name: str
    kind: str  # "map_record", "map_only", "counts", "count_path", "floor", "copy"
    fn: Callable | None


def load_vllm(src_dir: str):
    """vLLM's launcher from its carried sources, and a line saying what was loaded (or why not)."""
    from eplb_compile._vllm_kernel_loader import load_vllm_router_kernel

    try:
        module = load_vllm_router_kernel(src_dir)
    except Exception as error:  # noqa: BLE001 - any failure means: run without vLLM, say why
        return None, f"unavailable ({type(error).__name__}: {error})"
    version = module.release or f"of unknown release (source sha256 {module.source_sha256[:16]})"
    return module._eplb_map_and_record_triton, f"vLLM {version} _eplb_map_and_record_triton, loaded from {src_dir}"


def _vllm_call(vllm_fn, call: KernelCall) -> torch.Tensor:
    return vllm_fn(topk_ids=call.ids, logical_to_physical_map=call.l2p, logical_replica_count=call.replica_count,
                   expert_load_view=call.load, record_enabled=call.gate, num_unpadded_tokens=call.num_unpadded)


def variant_impls(names: list[str]) -> list[Impl]:
    """One explicit launcher per plan variant (``triton`` is the in-repo one-atomic-per-element kernel)."""
    from eplb_compile.kernels.cuda_variants import VARIANTS
    from eplb_compile.kernels.triton_kernels import launch_map

    impls = []
    for name in names:
        launch = launch_map if name == "triton" else VARIANTS[name].launch  # raises if unsupported: no fallback

        def fn(call, launch=launch):
            launch(call)
            return call.out

        impls.append(Impl(VARIANT_PREFIX + name, "map_record", fn))
    return impls


def plan_impl(name: str, launcher: Callable[[KernelCall], None]) -> Impl:
    """A candidate plan's topk path, through its own launcher (the global plan is never touched)."""

    def fn(call):
        launcher(call)
        return call.out

    return Impl(name, "map_record", fn)


def base_impls(vllm_fn, *, topk: bool) -> list[Impl]:
    """vLLM (if loaded), our operators, the count kernel and the floor; the topk op only if ``topk``."""
    import eplb_compile.ops  # noqa: F401 - registers torch.ops.eplb_compile

    ops = torch.ops.eplb_compile
    # Each layer's output stays alive (as a model's does until its consumer
    # ran), so no layer writes into the buffer another layer just freed, which
    # would still be in L2: the operators' outputs are then as cold as the
    # explicit launchers' preallocated ones.
    held: dict[int, torch.Tensor] = {}

    def hold(call, out):
        held[call.ids.data_ptr()] = out
        return out

    def count_path(call, counts, start):
        physical = ops.map_only(call.ids, call.l2p, call.replica_count, call.num_unpadded)
        ops.record_counts(call.load, counts, start, call.gate)
        return hold(call, physical)

    impls = []
    if vllm_fn is not None:
        impls.append(Impl("vllm", "map_record", lambda call: _vllm_call(vllm_fn, call)))
    if topk:
        impls.append(Impl("topk", "map_record", lambda call: hold(call, ops.map_and_record(
            call.ids, call.l2p, call.replica_count, call.load, call.gate, call.num_unpadded))))
    impls += [
        Impl("map_only", "map_only", lambda call: hold(call, ops.map_only(call.ids, call.l2p, call.replica_count,
                                                                          call.num_unpadded))),
        Impl("count_kernel", "counts", lambda call, counts, start: ops.record_counts(call.load, counts, start,
                                                                                     call.gate)),
        Impl("count_path", "count_path", count_path),
        Impl("floor", "floor", None),
        Impl("copy", "copy", None),
    ]
    return impls


def check_impl(impl: Impl, setup: Setup, work: Workload, expected: list[Expected]) -> str | None:
    """None if ``impl`` matches the reference in every expected case, else what differs."""
    if impl.kind in ("floor", "copy"):
        return None
    device = work.ids.device
    for case in expected:
        layer = case.layer
        ids = work.ids[layer]
        gate = torch.tensor(case.record, device=device)
        unpadded = (None if case.num_unpadded is None
                    else torch.tensor(case.num_unpadded, dtype=torch.int32, device=device))
        load = case.initial_load.clone()
        out = torch.full_like(ids, POISON)
        counts = setup.counts[layer]
        call = KernelCall(ids, setup.l2p[layer], setup.replica_count[layer], out,
                          load=load if impl.kind != "map_only" else None,
                          gate=gate if impl.kind != "map_only" else None, num_unpadded=unpadded)
        want_ids, want_load = case.mapped, case.load
        if impl.kind == "map_record":
            got = impl.fn(call)
        elif impl.kind == "map_only":
            got = impl.fn(call)
            want_ids, want_load = padded(case.mapped, case.num_unpadded), case.initial_load.cpu()
        else:
            got = impl.fn(call, counts, setup.start)
            want_ids = padded(case.mapped, case.num_unpadded) if impl.kind == "count_path" else None
            want_load = case.initial_load.cpu().clone()
            if case.record:
                want_load[setup.start:setup.start + setup.num_local] += counts.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        where = f"layer {layer}, gate {case.record}, num_unpadded {case.num_unpadded}"
        if want_ids is not None:
            if got is None or got.shape != want_ids.shape or got.dtype != ids.dtype:
                return f"returned {None if got is None else (tuple(got.shape), got.dtype)}, not ids like topk_ids"
            if not torch.equal(got.cpu(), want_ids):
                return f"{(got.cpu() != want_ids).sum().item()} physical ids differ ({where})"
        if not torch.equal(load.cpu(), want_load):
            return f"load differs in {(load.cpu() != want_load).sum().item()} experts ({where})"
    return None


def layer_call(impl: Impl, setup: Setup, work: Workload) -> Callable[[int], object]:
    """``call(layer)``: the implementation on that layer's inputs (built once, outside any capture)."""
    if impl.kind == "floor":
        return lambda layer: setup.floor_cells[layer].add_(1)
    if impl.kind == "copy":
        return lambda layer: work.outs[layer].copy_(work.ids[layer])
    calls = [
        KernelCall(work.ids[layer], setup.l2p[layer], setup.replica_count[layer], work.outs[layer],
                   load=None if impl.kind == "map_only" else work.loads[layer],
                   gate=None if impl.kind == "map_only" else setup.gate,
                   num_unpadded=None if impl.kind == "map_only" else work.unpadded)
        for layer in range(setup.layers)
    ]
    if impl.kind in ("map_record", "map_only"):
        return lambda layer: impl.fn(calls[layer])
    return lambda layer: impl.fn(calls[layer], setup.counts[layer], setup.start)
