"""vLLM 0.33.0 integration: the ``eplb_load_update`` custom op.

Loaded through the ``vllm.general_plugins`` entry point, :func:`register`
adds three things to vLLM, without a fork or a patch file:

1. A ``CustomOp`` named ``eplb_load_update``. vLLM decides whether it is on
   exactly as for its own ops: ``"+eplb_load_update"``, or ``"all"`` without
   ``"-eplb_load_update"``, in ``CompilationConfig.custom_ops``.
2. A capability method on ``FusedMoEPrepareAndFinalize``,
   :data:`CAPABILITY` (default False): does ``expert_tokens_meta.expert_num_tokens``
   hold exact, unaligned token counts for each local physical expert?
3. A hook in ``MoERunner.__init__``. For a layer with EPLB and the op on, it
   replaces that layer's router ``_apply_eplb_mapping`` with the op, and the
   first time the layer takes the count path it wraps its modular kernel's
   ``_prepare``; both as instance attributes, classes untouched. With the op
   off nothing is replaced, so the layer runs vLLM's own code.

Per forward, an enabled layer picks a lowering with
:func:`eplb_compile.select_lowering`:

- **topk**: ``map_and_record`` maps and counts from ``topk_ids`` in one kernel,
  skipping rows at or past ``num_unpadded_tokens`` like vLLM's kernel.
- **counts**: the router only maps (``map_only``), and once ``prepare`` has
  dispatched, ``record_counts`` adds the backend's ``expert_num_tokens`` to
  ``load[start:start + num_local]``, ``start = ep_rank * num_local`` (EPLB's
  linear placement), computed once per layer. Padded rows are set to -1
  before dispatch, using the padding mask of vLLM's forward context (the one
  vLLM's fused top-k routers already apply, ``VLLM_MOE_SKIP_PADDING``), so no
  backend sends them and their counts leave them out. Without that mask the
  layer takes the topk path.

Each layer logs the first use of each lowering once, on a line starting with
:data:`LOG_TAG`. This module calls only the public ``eplb_compile`` ops.
"""

from __future__ import annotations

import functools
import re
import weakref

import torch

import eplb_compile as ec

OP_NAME = "eplb_load_update"
CAPABILITY = "supports_exact_expert_num_tokens"
LOG_TAG = f"{OP_NAME}:"  # every log line of the plugin starts with it
LOGGER_NAME = f"vllm.{__name__}"  # a child of vLLM's logger: same handler and format
_MARK = "__eplb_compile__"  # set on everything we install, so we never install twice

_PF = "vllm.model_executor.layers.fused_moe.prepare_finalize"


def register() -> None:
    """The ``vllm.general_plugins`` entry point.

    vLLM calls it in every process, possibly more than once; every step
    checks vLLM's own state first, so repeated calls change nothing.
    """
    from vllm.model_executor.custom_op import op_registry

    if OP_NAME not in op_registry:
        _define_custom_op()
    _install_capability()
    _hook_moe_runner()


# --------------------------------------------------------------------------
# The capability: which backends count exactly (README, "Backends").
# --------------------------------------------------------------------------


def _capability(fn):
    setattr(fn, _MARK, True)
    return fn


@_capability
def _never(self) -> bool:
    return False


@_capability
def _always(self) -> bool:
    return True


@_capability
def _without_round_robin_remap(self) -> bool:
    # Round-robin placement renumbers experts for dispatch, so the local slots
    # would not be the slice [start, start + num_local). EPLB forces linear
    # placement, where this table is None.
    return self.global_to_physical is None


@_capability
def _deepep_ht_exact(self) -> bool:
    # The counts come from a host list copied to the device, which a CUDA
    # graph would replay frozen; DeepEP rounds them up to expert_alignment.
    return _deepep_ht_expert_alignment() == 1 and not _capturing()


# (module, class) -> capability. Classes not listed keep the default, False.
_EXACT_COUNT_BACKENDS = {
    (f"{_PF}.batched", "BatchedPrepareAndFinalize"): _always,
    (f"{_PF}.deepep_ll", "DeepEPLLPrepareAndFinalize"): _without_round_robin_remap,
    (f"{_PF}.nixl_ep", "NixlEPPrepareAndFinalize"): _without_round_robin_remap,
    (f"{_PF}.deepep_ht", "DeepEPHTPrepareAndFinalize"): _deepep_ht_exact,
}


def _install_capability() -> None:
    import importlib

    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEPrepareAndFinalize

    _set_capability(FusedMoEPrepareAndFinalize, _never)
    for (module_name, class_name), capability in _EXACT_COUNT_BACKENDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # its optional dependency (deep_ep, nixl_ep) is absent
            continue
        _set_capability(getattr(module, class_name), capability)


def _set_capability(cls: type, capability) -> None:
    existing = cls.__dict__.get(CAPABILITY)
    if existing is None or getattr(existing, _MARK, False):  # never override vLLM's own
        setattr(cls, CAPABILITY, capability)


@functools.cache
def _deepep_ht_expert_alignment() -> int | None:
    """The ``expert_alignment`` vLLM passes to DeepEP HT dispatch (1 in 0.33.0).

    Read from the module's source, which needs no ``deep_ep`` to read; None
    unless every call site passes the same literal.
    """
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec(f"{_PF}.deepep_ht")
    if spec is None or spec.origin is None:
        return None
    found = set(re.findall(r"expert_alignment=(\d+)", pathlib.Path(spec.origin).read_text()))
    return int(found.pop()) if len(found) == 1 else None


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------
# The custom op and its hook into MoERunner.
# --------------------------------------------------------------------------


def _define_custom_op() -> type:
    from vllm.model_executor.custom_op import CustomOp

    @CustomOp.register(OP_NAME)
    class EplbLoadUpdate(CustomOp):
        """Maps one MoE layer's expert ids and records its EPLB load."""

        def __init__(self, runner) -> None:
            super().__init__()
            self.layer_name = runner.layer_name
            self._runner = weakref.ref(runner)
            self._placement = None  # (moe_config, start, num_local)
            self._counts_pending: dict[int, bool] = {}  # ubatch id -> record after prepare
            self._logged: set[ec.Lowering] = set()
            self._counts_bypassed = False

        def forward_native(self, topk_ids: torch.Tensor) -> torch.Tensor:
            return _map_and_record_layer(self, topk_ids)

        def forward_cuda(self, topk_ids: torch.Tensor) -> torch.Tensor:
            return _map_and_record_layer(self, topk_ids)

    return EplbLoadUpdate


def _hook_moe_runner() -> None:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if getattr(MoERunner.__init__, _MARK, False):
        return
    stock_init = MoERunner.__init__

    @functools.wraps(stock_init)
    def __init__(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        _attach(self)

    setattr(__init__, _MARK, True)
    MoERunner.__init__ = __init__


def _attach(runner) -> None:
    """Give an EPLB layer the op; route its router through it when enabled.

    Runs at model construction, where vLLM's config is current, as for every
    CustomOp. Instantiating the op also files it under vLLM's enabled or
    disabled custom ops, so "+/-eplb_load_update" never warns "no effect".
    """
    from vllm.model_executor.custom_op import op_registry
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.platforms import current_platform

    router = runner.router
    if not isinstance(router, BaseRouter) or router.eplb_state is None:
        return
    if "_apply_eplb_mapping" in vars(router):
        return  # already attached
    op = op_registry[OP_NAME](runner)
    if not type(op).enabled():
        return
    if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
        _logger().warning(
            "%s layer=%s stays stock: eplb_compile has no kernels for %s",
            LOG_TAG, op.layer_name, current_platform.device_type,
        )
        return
    router._apply_eplb_mapping = op.forward
    router.eplb_load_update = op  # for introspection and tests


# --------------------------------------------------------------------------
# Per forward.
# --------------------------------------------------------------------------


def _map_and_record_layer(op, topk_ids: torch.Tensor) -> torch.Tensor:
    """The router's EPLB step: logical -> physical ids, plus the load update."""
    runner = op._runner()
    state = runner.router.eplb_state
    ubatch = _vllm().ubatch_id()
    if op._counts_pending.get(ubatch) and not op._counts_bypassed:
        # Some model code calls the router and then its own GEMMs instead of
        # the modular kernel: that forward's load is lost, never again.
        op._counts_bypassed = True
        _logger().warning(
            "%s layer=%s: a forward on the count path never reached the modular kernel's "
            "prepare, so its load was not recorded; this layer keeps the topk path from now on",
            LOG_TAG, op.layer_name,
        )

    impl = None if op._counts_bypassed else _count_path_kernel(runner)
    padding = None if impl is None else _padding_mask(topk_ids.shape[0])
    choice = _choose_lowering(op, impl, padding, topk_ids.shape[0])

    use_counts = choice.lowering is ec.Lowering.COUNTS
    op._counts_pending[ubatch] = use_counts
    if use_counts:
        _record_counts_after_prepare(op, impl)
        physical = ec.map_only(topk_ids, state.logical_to_physical_map, state.logical_replica_count)
        # Rows of -1 are never dispatched, so expert_num_tokens leaves them out.
        return physical.masked_fill(padding.unsqueeze(1), -1)
    return ec.map_and_record(
        topk_ids,
        state.logical_to_physical_map,
        state.logical_replica_count,
        state.expert_load_view,
        state.should_record_tensor,
        state.num_unpadded_tokens_tensors[ubatch],
    )


def _choose_lowering(op, impl, padding, num_tokens: int) -> ec.LoweringChoice:
    if impl is not None and padding is None:
        choice = ec.LoweringChoice(ec.Lowering.TOPK, "no padding mask in the forward context")
    else:
        # Only whether exact counts will exist matters: prepare makes them later.
        choice = ec.select_lowering(True if impl is not None else None, _rank_uniform_num_tokens(num_tokens))
    if choice.lowering not in op._logged and not torch.compiler.is_compiling():
        op._logged.add(choice.lowering)
        backend = "none" if impl is None else type(impl.prepare_finalize).__name__
        _logger().info(
            "%s layer=%s lowering=%s backend=%s reason=%s",
            LOG_TAG, op.layer_name, choice.lowering.value, backend, choice.reason,
        )
    return choice


def _count_path_kernel(runner):
    """The layer's modular kernel if its backend counts exactly, else None."""
    kernel = getattr(runner.routed_experts.quant_method, "moe_kernel", None)
    impl = getattr(kernel, "impl", None)
    if isinstance(impl, _vllm().ModularImpl) and getattr(impl.prepare_finalize, CAPABILITY)():
        return impl
    return None


def _padding_mask(num_tokens: int) -> torch.Tensor | None:
    """vLLM's per-row padding mask for this forward, as its routers slice it.

    None when there is none, or when it does not cover every row (tokens
    gathered from other ranks before routing).
    """
    context = _vllm().forward_context()
    is_padding = None if context is None else context.is_padding
    if is_padding is None or is_padding.shape[0] < num_tokens:
        return None
    return is_padding[:num_tokens]


def _rank_uniform_num_tokens(local_num_tokens: int) -> int:
    """Tokens per rank as every EP rank sees it, so all pick one lowering.

    A rank on the count path records what its experts received from every
    rank; one on the topk path records what its own tokens chose. Mixing the
    two across ranks would count some tokens twice and others never.
    """
    context = _vllm().forward_context()
    if context is not None and context.dp_metadata is not None:
        return int(context.dp_metadata.num_tokens_across_dp_cpu.max())
    return local_num_tokens


def _record_counts_after_prepare(op, impl) -> None:
    """Wrap this kernel's ``_prepare`` (once) to add its counts to the load."""
    if getattr(impl._prepare, _MARK, False):
        return
    stock_prepare = impl._prepare

    def _prepare(*args, **kwargs):
        result = stock_prepare(*args, **kwargs)
        if op._counts_pending.pop(_vllm().ubatch_id(), False):
            _record_counts(op, result[2])
        return result

    setattr(_prepare, _MARK, True)
    impl._prepare = _prepare


def _record_counts(op, expert_tokens_meta) -> None:
    runner = op._runner()
    state = runner.router.eplb_state
    counts = None if expert_tokens_meta is None else expert_tokens_meta.expert_num_tokens
    if counts is None:
        raise RuntimeError(
            f"{LOG_TAG} layer={op.layer_name}: the backend claims {CAPABILITY}() "
            "but its prepare returned no expert_num_tokens"
        )
    start, num_local = _placement(op, runner, state.expert_load_view.shape[0])
    ec.record_counts(
        state.expert_load_view, counts[:num_local].to(torch.int32), start, state.should_record_tensor
    )


def _placement(op, runner, num_physical: int) -> tuple[int, int]:
    """``(start, num_local)`` of this rank's experts, once per layer config.

    Recomputed only if vLLM swaps the layer's config (elastic EP).
    """
    config = runner.moe_config
    if op._placement is None or op._placement[0] is not config:
        num_local = config.num_local_experts
        start = config.moe_parallel_config.ep_rank * num_local
        if start + num_local > num_physical:
            raise RuntimeError(
                f"{LOG_TAG} layer={op.layer_name}: local experts [{start}, {start + num_local}) "
                f"do not fit the {num_physical} physical experts of the load"
            )
        op._placement = (config, start, num_local)
    return op._placement[1], op._placement[2]


@functools.cache
def _vllm():
    """The vLLM functions the per-forward code calls, imported once."""
    from types import SimpleNamespace

    from vllm.forward_context import get_forward_context, is_forward_context_available
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernelModularImpl
    from vllm.v1.worker.ubatching import dbo_current_ubatch_id

    return SimpleNamespace(
        forward_context=lambda: get_forward_context() if is_forward_context_available() else None,
        ubatch_id=dbo_current_ubatch_id,
        ModularImpl=FusedMoEKernelModularImpl,
    )


@functools.cache
def _logger():
    from vllm.logger import init_logger

    return init_logger(LOGGER_NAME)
