"""Every place the plugin depends on vLLM or PyTorch internals, and nothing else.

On a vLLM upgrade, review this file: each function names the vLLM source it
depends on (paths under ``vllm/``), as ``file:line`` in 0.33.0 then 0.34.0
(``a / b``); vLLM's CPU build 0.32.0 has the same code, at the lines of 0.33.0
unless a third number says otherwise. Where the releases differ, the plugin
needs no branch of its own: each difference is said where it is read. The rest
of the plugin only calls these functions, vLLM's public ``CustomOp`` API and
``eplb_compile``'s public ops. Everything on the forward path here is plain
attribute access that Dynamo traces without a graph break. It runs past 300
lines (over 400) by design: it is the one list of the plugin's vLLM touchpoints, each
with its lines in two releases.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

# Set on everything the plugin installs into vLLM, so it never installs twice.
MARK = "__eplb_compile__"

_PREPARE_FINALIZE = "vllm.model_executor.layers.fused_moe.prepare_finalize"


def vllm_version() -> str:
    import vllm

    return vllm.__version__


# --------------------------------------------------------------------------
# Construction time.
# --------------------------------------------------------------------------


def after_moe_runner_init(callback: Callable[[Any], None]) -> None:
    """Call ``callback(runner)`` after every ``MoERunner.__init__``.

    ``model_executor/layers/fused_moe/runner/moe_runner.py:250 / :255``
    (``__init__`` sets ``self.router`` at :266 / :271 and
    ``self.routed_experts`` at :272 / :277).
    MoERunner is the one class every fused-MoE layer is built as, through
    ``FusedMoEFactory``, so this is where a layer's EPLB state first exists.
    """
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if getattr(MoERunner.__init__, MARK, False):
        return
    stock_init = MoERunner.__init__

    @functools.wraps(stock_init)
    def __init__(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        callback(self)

    setattr(__init__, MARK, True)
    MoERunner.__init__ = __init__


def eplb_router(runner):
    """The runner's router if it is vLLM's ``BaseRouter`` with EPLB on, else None.

    ``router/base_router.py``: ``BaseRouter.eplb_state`` is an
    ``EplbLayerState`` (``distributed/eplb/eplb_state.py:1192 / :1233``) when EPLB is on.
    """
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    router = runner.router
    if isinstance(router, BaseRouter) and router.eplb_state is not None:
        return router
    return None


def is_routed(router) -> bool:
    """Whether :func:`route_eplb_mapping_through` already ran on this router."""
    return "_apply_eplb_mapping" in vars(router)


def route_eplb_mapping_through(router, mapping: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``router._apply_eplb_mapping`` call ``mapping``.

    ``router/base_router.py:203 / :189`` defines ``_apply_eplb_mapping(topk_ids)``,
    called once per forward from ``_select_experts`` (:300 / :286); its stock
    body calls ``eplb_map_to_physical_and_record`` (0.34.0's kernel body is the
    shared ``fused_moe/eplb_triton.py:eplb_map_and_record``, same rules).
    MegaMoE layers (``DeepGemmMegaMoEExperts``) map and record in their own
    kernel and are not ``MoERunner``s, so they never get here (see
    :func:`self_recording_layers`). Set on the instance only, so the
    class and every other router stay stock.
    """
    router._apply_eplb_mapping = mapping


def install_capability(name: str, default, per_backend: dict[tuple[str, str], Any]) -> None:
    """Add the capability method ``name`` to vLLM's prepare/finalize classes.

    ``model_executor/layers/fused_moe/modular_kernel.py``
    (``FusedMoEPrepareAndFinalize``, the ABC) and the classes under
    ``prepare_finalize/``, as ``(module, class)``. A method vLLM defines itself
    is never replaced.
    """
    import importlib

    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEPrepareAndFinalize

    def install(cls: type, method) -> None:
        existing = cls.__dict__.get(name)
        if existing is None or getattr(existing, MARK, False):
            setattr(cls, name, method)

    install(FusedMoEPrepareAndFinalize, default)
    for (module_name, class_name), method in per_backend.items():
        try:
            module = importlib.import_module(f"{_PREPARE_FINALIZE}.{module_name}")
        except ImportError:  # its optional dependency (deep_ep, nixl_ep) is absent
            continue
        install(getattr(module, class_name), method)


@functools.cache
def deepep_ht_expert_alignment() -> int | None:
    """The ``expert_alignment`` vLLM passes to DeepEP HT dispatch (1 in 0.33.0).

    ``prepare_finalize/deepep_ht.py:185 / :185`` (0.32.0 :164). Read from the module's source,
    which needs no ``deep_ep`` installed; None unless every call site passes
    the same literal.
    """
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec(f"{_PREPARE_FINALIZE}.deepep_ht")
    if spec is None or spec.origin is None:
        return None
    found = set(re.findall(r"expert_alignment=(\d+)", pathlib.Path(spec.origin).read_text()))
    return int(found.pop()) if len(found) == 1 else None


# --------------------------------------------------------------------------
# Per forward.
# --------------------------------------------------------------------------


def modular_kernel(runner):
    """The layer's ``FusedMoEKernelModularImpl``, or None (monolithic, none yet).

    ``runner.routed_experts.quant_method.moe_kernel`` is a ``FusedMoEKernel``
    whose ``.impl`` is modular or monolithic (``modular_kernel.py:1704-1716 / :1767-1779``).
    Looked up per forward: vLLM installs the kernel after the runner is built.
    """
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernelModularImpl

    kernel = getattr(runner.routed_experts.quant_method, "moe_kernel", None)
    impl = getattr(kernel, "impl", None)
    return impl if isinstance(impl, FusedMoEKernelModularImpl) else None


def after_every_prepare(callback: Callable[[Any], None]) -> None:
    """Call ``callback(expert_tokens_meta)`` after every modular kernel's ``_prepare``.

    ``modular_kernel.py:1236 / :1296`` (0.32.0 :1170): ``FusedMoEKernelModularImpl._prepare`` returns
    ``(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights)``, unpacked
    by name at its call site (:1547 / :1607). Dispatch has happened by then, so
    ``expert_num_tokens`` holds what this rank's experts received. Wrapped once
    on the class, before any forward: a wrapper added to an instance at its
    first forward would be state that a compiled graph guards on.
    """
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernelModularImpl

    if getattr(FusedMoEKernelModularImpl._prepare, MARK, False):
        return
    stock_prepare = FusedMoEKernelModularImpl._prepare

    @functools.wraps(stock_prepare)
    def _prepare(self, *args, **kwargs):
        a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights = stock_prepare(self, *args, **kwargs)
        callback(expert_tokens_meta)
        return a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights

    setattr(_prepare, MARK, True)
    FusedMoEKernelModularImpl._prepare = _prepare


def ubatch_id() -> int:
    """``v1/worker/ubatching.py:154 / :154`` ``dbo_current_ubatch_id()``: which
    micro-batch runs (indexes ``EplbLayerState.num_unpadded_tokens_tensors``)."""
    from vllm.v1.worker.ubatching import dbo_current_ubatch_id

    return dbo_current_ubatch_id()


def dp_max_num_tokens(local_num_tokens: int) -> int:
    """The largest token count of any DP rank in this forward (eager only).

    ``forward_context.py:82 / :78``: ``DPMetadata.num_tokens_across_dp_cpu``, a CPU
    tensor, present when the forward context has DP metadata.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return local_num_tokens
    dp_metadata = get_forward_context().dp_metadata
    if dp_metadata is None:
        return local_num_tokens
    return int(dp_metadata.num_tokens_across_dp_cpu.max())


# --------------------------------------------------------------------------
# EplbState (the recorder). ``distributed/eplb/eplb_state.py`` unless named.
# Only plain attribute reads after the imports: the step hook runs them on
# host counters and never syncs the device.
# --------------------------------------------------------------------------


def wrap_eplb_state_methods(add_model_wrapper: Callable, step_wrapper: Callable) -> None:
    """Replace ``EplbState.add_model`` (:362 / :369) and ``EplbState.step`` (:561 / :580) by
    ``wrapper(stock_method)``, once. ``add_model`` builds a model's EPLB state
    with vLLM's config current; ``step`` copies the pass into the window."""
    from vllm.distributed.eplb.eplb_state import EplbState

    if getattr(EplbState.step, MARK, False):
        return
    for name, wrapper in (("add_model", add_model_wrapper), ("step", step_wrapper)):
        wrapped = wrapper(getattr(EplbState, name))
        setattr(wrapped, MARK, True)
        setattr(EplbState, name, wrapped)


def model_states(state) -> list:
    """``EplbState.model_states`` (:240 / :241): a dict filled by ``add_model``
    (:526 / :545), in insertion order. Its key differs (``compute_hash()`` /
    ``hash_config_cached``); only the values are read."""
    return list(state.model_states.values())


def newest_model_state(state):
    """The ``EplbModelState`` the last ``add_model`` built (see :func:`model_states`)."""
    return model_states(state)[-1]


def model_description(model_state) -> tuple[str, list[str], int, int]:
    """``(name, layer_names, num_logical, num_physical)`` of a model's EPLB state.

    ``EplbModelState.model_name`` (:188 / :189) and ``.model`` (:189 / :190), a
    ``MixtureOfExperts`` (``model_executor/models/interfaces.py:1072-1090 /
    :1071-1089``: ``num_logical_experts``, ``num_physical_experts``,
    ``moe_layers``) whose layers are ``MoERunner`` objects named by
    ``layer_name`` (``runner/moe_runner.py:294 / :299``), or MegaMoE layers,
    which have only a ``prefix`` (``fused_moe/deep_gemm_mega_moe.py``, 0.34.0 :293).
    """
    model = model_state.model
    layer_names = [_layer_name(layer) for layer in model.moe_layers]
    return model_state.model_name, layer_names, model.num_logical_experts, model.num_physical_experts


def _layer_name(layer) -> str:
    name = getattr(layer, "layer_name", None)
    return str(name if name is not None else layer.prefix)


def self_recording_layers(model_state) -> list[str]:
    """Names of the model's EPLB layers that map and record in their own kernel.

    Those are the entries of ``moe_layers`` that are not ``MoERunner``s:
    MegaMoE's ``DeepGemmMegaMoEExperts`` (``fused_moe/deep_gemm_mega_moe.py:235
    / :231``) calls the router's mapping function directly in 0.33.0
    (:765-784) and maps and records inside its input-staging kernel in 0.34.0
    (``fused_moe/prepare_megamoe.py:127-141``), never through
    ``_apply_eplb_mapping``. Their load still lands in ``expert_load_pass``.
    """
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return [_layer_name(layer) for layer in model_state.model.moe_layers if not isinstance(layer, MoERunner)]


def window_size(state) -> int:
    """``EplbState.expert_load_window_size`` (:252 / :253, set by ``add_model`` at :457 / :469)."""
    return state.expert_load_window_size


def pass_goes_into_window(state, log_stats: bool) -> bool:
    """``EplbState._should_record_current_step`` (:697 / :738): the test a non-dummy
    ``step`` makes before it copies the pass into the window and zeroes it
    (:647-655 / :666-674). Reads host counters only."""
    return state._should_record_current_step(log_stats=log_stats)


def load_pass(model_state) -> torch.Tensor:
    """``EplbModelState.expert_load_pass`` (:163 / :164), ``[layers, physical]``, this step's counts."""
    return model_state.expert_load_pass


def physical_to_logical(model_state) -> torch.Tensor:
    """``EplbModelState.physical_to_logical_map`` (:105 / :106), updated in place when
    a rearrangement commits (``_commit_eplb_maps``)."""
    return model_state.physical_to_logical_map


def map_version(model_state) -> tuple[int, int]:
    """Changes whenever vLLM writes the model's ``physical_to_logical_map``.

    Every writer changes the tensor in place or replaces it: a rearrangement's
    commit (``_commit_eplb_maps``, 0.33.0 :1388, 0.34.0 :1424: ``copy_``, or a
    new buffer view when elastic EP changes the slot count), whether sync
    (inside ``step``), async (during a later ``step``), or outside any step
    (elastic EP's ``rearrange``, ``update_mapping`` at 0.33.0 :1111 / 0.34.0
    :1152, and in 0.34.0 fault-tolerance recovery,
    ``v1/worker/sentinel/gpu_worker_sentinel.py:256-271``, which marks dead
    slots in place). So the tensor's identity and its version counter
    (``torch.Tensor._version``, bumped by every in-place write to it or to the
    buffer it views) tell that it changed, on the host, without a sync.
    """
    tensor = model_state.physical_to_logical_map
    return id(tensor), tensor._version


def ep_rank_and_size() -> tuple[int, int]:
    """This rank and the size of vLLM's EP group, the one ``EplbState.step``
    uses (:586 / :605): ``distributed/parallel_state.py:1660 / :1664``
    ``get_ep_group()``, ``GroupCoordinator.rank_in_group`` / ``world_size``
    (:448 / :448, :439 / :439)."""
    from vllm.distributed.parallel_state import get_ep_group

    group = get_ep_group()
    return group.rank_in_group, group.world_size


def all_reduce_over_ep(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over vLLM's EP group in place, as ``EplbState._allreduce_list``
    (:1053 / :1089) does with the pass for its balancedness log: ``all_reduce`` on
    ``get_ep_group().device_group``. On CUDA it is queued on the stream (no host sync)."""
    from torch.distributed import all_reduce
    from vllm.distributed.parallel_state import get_ep_group

    all_reduce(tensor, group=get_ep_group().device_group)
    return tensor


def additional_config() -> Any:
    """The current ``VllmConfig.additional_config`` (``config/vllm.py:429 /
    :459``, a dict, or an object in 0.34.0); None outside a config context
    (``get_current_vllm_config_or_none``, :3633 / :3769)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    return None if vllm_config is None else vllm_config.additional_config


# --------------------------------------------------------------------------
# EplbState (the initial placement). ``distributed/eplb/eplb_state.py`` unless named.
# --------------------------------------------------------------------------


def add_model_config(args: tuple, kwargs: dict):
    """The ``model_config`` argument of ``EplbState.add_model(model, model_config, model_name=None)``
    (:362 / :369), whichever way it was passed; ``update_mapping`` finds the model state by it."""
    return args[1] if len(args) > 1 else kwargs["model_config"]


def move_experts_and_commit(state, model_state, model_config, new_map: torch.Tensor) -> None:
    """Move this rank's expert weights to ``new_map`` (``[layers, physical]``) and make it the model's map,
    with vLLM's own machinery, as a synchronous rearrangement does (``rearrange``, :933-950 / :977-994).

    Weights: ``rebalance_execute.py:642 / :669`` ``rearrange_expert_weights_inplace(old, new,
    model.expert_weights, model_state.expert_buffer, ep_group, model_state.communicator)``, a collective
    every EP rank enters; ``MixtureOfExperts.expert_weights`` (``models/interfaces.py:1058 / :1057``)
    is filled by ``add_model``, the buffer and communicator are ``EplbModelState`` fields
    (:190, :212 / :191, :213); the group is ``get_ep_group().device_group`` as ``rearrange`` takes it
    (:775 / :819). Maps: ``EplbState.update_mapping(model_config, expanded)`` (:1111 / :1152), which
    writes ``physical_to_logical_map_buffer`` (:121 / :122, wider than the map only under elastic EP,
    padded with -1) and recomputes the logical -> physical map and replica counts from it.
    """
    from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace
    from vllm.distributed.parallel_state import get_ep_group

    current = model_state.physical_to_logical_map
    new_map = new_map.to(device=current.device, dtype=current.dtype)
    rearrange_expert_weights_inplace(current, new_map, model_state.model.expert_weights, model_state.expert_buffer,
                                     get_ep_group().device_group, model_state.communicator)
    expanded = torch.full_like(model_state.physical_to_logical_map_buffer, -1)
    expanded[:, : new_map.shape[1]] = new_map
    state.update_mapping(model_config, expanded)


def wrap_eplb_state_rearrange(wrapper: Callable) -> None:
    """Replace ``EplbState.rearrange(is_profile=False, rank_mapping=None, use_last_expert_load=False)``
    (:758 / :802) by ``wrapper(stock)``, once. ``step`` calls it every ``step_interval`` steps (:682-693 /
    :701-712); elastic EP calls it with a ``rank_mapping``; the profile run with ``is_profile``."""
    from vllm.distributed.eplb.eplb_state import EplbState

    if getattr(EplbState.rearrange, MARK, False):
        return
    wrapped = wrapper(EplbState.rearrange)
    setattr(wrapped, MARK, True)
    EplbState.rearrange = wrapped


# --------------------------------------------------------------------------
# PyTorch.
# --------------------------------------------------------------------------


def call_when_traced(fn: Callable[..., None], *args) -> None:
    """Call ``fn(*args)`` once per Dynamo trace of the caller; eagerly, nothing.

    ``torch/_dynamo/comptime.py`` ``comptime(f)``: Dynamo calls ``f(ctx)``
    while it traces and adds nothing to the graph; outside Dynamo it is a no-op.
    Unlike :func:`call_after_compiled_graphs`, this also works from a function
    Dynamo inlines (vLLM inlines ``forward_native``), where a reorderable
    logging call is silently dropped (torch 2.13, 2.14). ``fn`` and ``args``
    must be constants at trace time: they are read back from this frame.
    """
    from torch._dynamo.comptime import comptime

    comptime(_call_with_traced_locals)


def _call_with_traced_locals(ctx) -> None:
    # ComptimeContext.get_local reads this frame's locals (call_when_traced's).
    ctx.get_local("fn").as_python_constant()(*ctx.get_local("args").as_python_constant())


def call_after_compiled_graphs(fn: Callable[..., None]) -> Callable[..., None]:
    """Let ``fn`` (a logging function with constant arguments) run in compiled code.

    ``torch/_dynamo/config.py`` ``reorderable_logging_functions``: Dynamo
    records a call to such a function instead of breaking the graph, and
    replays it after the graph on every run. Eager calls are plain calls.
    """
    torch._dynamo.config.reorderable_logging_functions.add(fn)
    return fn
