"""The ``eplb_load_update`` CustomOp: one MoE layer's EPLB mapping and load update.

Attached to an EPLB layer at construction (when vLLM's ``custom_ops`` enable
it), it replaces the router's ``_apply_eplb_mapping``. Per forward it picks a
lowering with :func:`eplb_compile.select_lowering`:

- **topk**: ``map_and_record`` maps and counts from ``topk_ids`` in one kernel,
  skipping rows at or past ``num_unpadded_tokens`` like vLLM's kernel.
- **counts**: the router only maps, and padded rows (at or past
  ``num_unpadded_tokens``) come back as -1 so no backend dispatches them;
  once ``prepare`` has dispatched, ``record_counts`` adds the backend's
  ``expert_num_tokens`` to ``load[start:start + num_local]``, with
  ``start = ep_rank * num_local`` (EPLB's linear placement).

Every per-forward line here is traceable by Dynamo with no graph break, so
vLLM's compiled mode (which traces the MoE forward on CPU) and users who
compile an MoE block keep one graph. Each layer logs each lowering once:
eagerly at its first use, compiled when Dynamo traces it.

Imports vLLM at module level; install it with the project: ``pip install -e '.[vllm]'``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.custom_op import CustomOp

# Imported by name at plugin load: the package's names are lazy (PEP 562), and a first
# look-up inside a forward Dynamo traces must not be an import.
from eplb_compile import Lowering, map_and_record, map_only, record_counts, select_lowering
from eplb_compile.vllm_plugin import LOG_TAG, LOGGER_NAME, OP_NAME, backends, vllm_surface

logger = init_logger(LOGGER_NAME)

_logged: set[tuple[int, str]] = set()
_op_keys = itertools.count()
# ubatch id -> the op whose count-path forward waits for its prepare. Set by
# the router, cleared by the prepare that follows: empty between forwards, so
# a compiled graph never sees it change.
_counts_pending: dict[int, EplbLoadUpdate] = {}


def log_lowering(op_key: int, layer_name: str, lowering: str, backend: str, reason: str) -> None:
    """Log a layer's lowering the first time it is used (eager) or traced (compiled).

    Under torch.compile the lowering is decided while Dynamo traces (see
    select_lowering), so the line is written then, once per layer and lowering,
    whether or not the layer ever ran eagerly. A graph loaded from a warm
    compile cache is not traced, so it logs nothing.
    """
    if torch.compiler.is_compiling():
        vllm_surface.call_when_traced(_log_lowering_once, op_key, layer_name, lowering, backend, reason)
    else:
        _log_lowering_once(op_key, layer_name, lowering, backend, reason)


def _log_lowering_once(op_key: int, layer_name: str, lowering: str, backend: str, reason: str) -> None:
    if (op_key, lowering) in _logged:
        return
    _logged.add((op_key, lowering))
    logger.info("%s layer=%s lowering=%s backend=%s reason=%s", LOG_TAG, layer_name, lowering, backend, reason)


@vllm_surface.call_after_compiled_graphs
def warn_counts_lost(layer_name: str, why: str) -> None:
    logger.warning(
        "%s layer=%s: %s, so that forward's load was not recorded; this layer keeps the "
        "topk path from now on", LOG_TAG, layer_name, why,
    )


@dataclass(frozen=True)
class _Layer:
    """The layer's runner, held in a plain object so that nn.Module does not
    adopt it (and its weights) as a submodule of the op."""

    runner: Any


@CustomOp.register(OP_NAME)
class EplbLoadUpdate(CustomOp):
    """Maps one MoE layer's expert ids and records its EPLB load."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.layer_name = runner.layer_name
        self._layer = _Layer(runner)
        self._key = next(_op_keys)
        self._counts_lost = False  # set once a count-path forward lost its load

    def forward_native(self, topk_ids: torch.Tensor) -> torch.Tensor:
        runner = self._layer.runner
        state = runner.router.eplb_state
        ubatch = vllm_surface.ubatch_id()
        num_unpadded = state.num_unpadded_tokens_tensors[ubatch]
        waiting = _counts_pending.pop(ubatch, None)
        if waiting is not None:
            # Model code that calls the router and then its own GEMMs instead
            # of the modular kernel: that forward's counts never came.
            waiting._counts_lost = True
            warn_counts_lost(waiting.layer_name, "a count-path forward never reached the modular kernel's prepare")

        impl = None if self._counts_lost else vllm_surface.modular_kernel(runner)
        choice = select_lowering(
            backends.has_exact_counts(impl),
            self._rank_uniform_num_tokens(topk_ids.shape[0]),
            device=topk_ids.device,
        )
        backend = "none" if impl is None else type(impl.prepare_finalize).__name__
        log_lowering(self._key, self.layer_name, choice.lowering.value, backend, choice.reason)

        if choice.lowering is Lowering.COUNTS:
            _counts_pending[ubatch] = self
            # Padded rows come back -1 from the same kernel; rows of -1 are
            # never dispatched, so expert_num_tokens leaves them out.
            return map_only(
                topk_ids, state.logical_to_physical_map, state.logical_replica_count, num_unpadded
            )
        return map_and_record(
            topk_ids,
            state.logical_to_physical_map,
            state.logical_replica_count,
            state.expert_load_view,
            state.should_record_tensor,
            num_unpadded,
        )

    def forward_cuda(self, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.forward_native(topk_ids)

    def _rank_uniform_num_tokens(self, local_num_tokens):
        """Tokens per rank as every EP rank sees it, so all pick one lowering.

        A rank on the count path records what its experts received from every
        rank; one on the topk path records what its own tokens chose. Mixing
        the two would count some tokens twice and others never. Under
        torch.compile the count is symbolic and the DP maximum is host data,
        so the selector decides from the symbol alone (see select_lowering).
        """
        if torch.compiler.is_compiling():
            return local_num_tokens
        return vllm_surface.dp_max_num_tokens(local_num_tokens)

    def _record_counts(self, expert_tokens_meta) -> None:
        """After this layer's prepare: add the backend's counts to the load."""
        counts = None if expert_tokens_meta is None else expert_tokens_meta.expert_num_tokens
        if counts is None:
            self._counts_lost = True
            warn_counts_lost(self.layer_name, f"the backend claims {backends.CAPABILITY}() but its prepare "
                             "returned no expert_num_tokens")
            return
        state = self._layer.runner.router.eplb_state
        start, num_local = self._local_slice(state.expert_load_view.shape[0])
        counts = counts[:num_local]
        if counts.dtype != torch.int32:  # vLLM's backends give int32: no cast kernel then
            counts = counts.to(torch.int32)
        record_counts(state.expert_load_view, counts, start, state.should_record_tensor)

    def _local_slice(self, num_physical: int) -> tuple[int, int]:
        """``(start, num_local)`` of this rank's experts under EPLB's linear placement.

        Read from the layer's config on every call (it is Python arithmetic,
        constant in a compiled graph): vLLM may swap the config (elastic EP),
        and a cached value would be state that a compiled graph guards on.
        """
        config = self._layer.runner.moe_config
        num_local = config.num_local_experts
        start = config.moe_parallel_config.ep_rank * num_local
        if start + num_local > num_physical:
            raise RuntimeError(
                f"{LOG_TAG} layer={self.layer_name}: local experts [{start}, {start + num_local}) "
                f"do not fit the {num_physical} physical experts of the load"
            )
        return start, num_local


def attach(runner) -> None:
    """Give an EPLB layer the op, and route its router through it when enabled.

    Runs at model construction, where vLLM's config is current, as for every
    CustomOp. Instantiating the op also files it under vLLM's enabled or
    disabled custom ops, so "+/-eplb_load_update" never warns "no effect".
    """
    from vllm.platforms import current_platform

    router = vllm_surface.eplb_router(runner)
    if router is None or vllm_surface.is_routed(router):
        return
    op = EplbLoadUpdate(runner)
    if not EplbLoadUpdate.enabled():
        return
    if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
        logger.warning(
            "%s layer=%s stays stock: eplb_compile has no kernels for %s",
            LOG_TAG, op.layer_name, current_platform.device_type,
        )
        return
    vllm_surface.after_every_prepare(_record_pending_counts)
    vllm_surface.route_eplb_mapping_through(router, op.forward)
    router.eplb_load_update = op  # for introspection and tests


def _record_pending_counts(expert_tokens_meta) -> None:
    op = _counts_pending.pop(vllm_surface.ubatch_id(), None)
    if op is not None:
        op._record_counts(expert_tokens_meta)
