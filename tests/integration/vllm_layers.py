"""vLLM 0.33.0 MoE layers with EPLB, built by vLLM itself on CPU, for the plugin's tests.

A layer here is what vLLM builds for a MoE layer with EPLB: ``FusedMoEFactory``
gives a ``MoERunner`` (router with an ``EplbLayerState``, routed experts), run
through ``MoERunner.forward``. Its modular kernel is vLLM's
``BatchedPrepareAndFinalize`` with ``NaiveBatchedExperts``, the one pairing
that runs on CPU; its EPLB tensors are rows of ``[layers, ...]`` buffers, as
``EplbState`` hands them out.

On CPU, vLLM's own ``eplb_map_to_physical_and_record`` neither maps nor
records (it returns ``topk_ids``), so expected loads are computed from the
logical ids the router chose (vLLM's ``capture_fn`` hook), mapped by the
element-wise reference in ``eplb_compile.reference`` and counted with
``torch.bincount``.
"""

from __future__ import annotations

import torch
from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.model_executor.layers.fused_moe.experts.fused_batched_moe import NaiveBatchedExperts
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel
from vllm.model_executor.layers.fused_moe.prepare_finalize import BatchedPrepareAndFinalize

from eplb_compile.reference import map_to_physical_reference
from eplb_compile.vllm_plugin import LOG_TAG

ON = ["+eplb_load_update"]
OFF = ["-eplb_load_update"]
HIDDEN, INTERMEDIATE, TOP_K, MAX_TOKENS = 32, 48, 3, 64


def identity_placement(num_logical: int):
    l2p = torch.arange(num_logical, dtype=torch.int64).unsqueeze(1)
    return l2p, torch.ones(num_logical, dtype=torch.int64)


def replicated_placement():
    """8 logical experts on 12 physical: expert 0 has 3 replicas, 1 and 2 have
    2, the rest 1; unused slots hold -1."""
    l2p = torch.full((8, 3), -1, dtype=torch.int64)
    l2p[:, 0] = torch.arange(8)
    l2p[0, 1:] = torch.tensor([8, 9])
    l2p[1, 1] = 10
    l2p[2, 1] = 11
    replicas = torch.tensor([3, 2, 2, 1, 1, 1, 1, 1], dtype=torch.int64)
    return l2p, replicas


class Layer:
    """One EPLB MoE layer built by vLLM, its config, and its load."""

    def __init__(self, custom_ops, placement, *, dtype=torch.float32, seed=0, mode=None):
        l2p, replicas = placement
        num_logical, num_physical = l2p.shape[0], int(l2p.max()) + 1
        mode_arg = {} if mode is None else {"mode": mode}
        self.config = VllmConfig(compilation_config=CompilationConfig(custom_ops=list(custom_ops), **mode_arg))
        with set_current_vllm_config(self.config):
            self.runner = FusedMoEFactory(
                num_experts=num_logical,
                top_k=TOP_K,
                hidden_size=HIDDEN,
                intermediate_size=INTERMEDIATE,
                params_dtype=dtype,
                enable_eplb=True,
                num_redundant_experts=num_physical - num_logical,
                tp_size=1,
                dp_size=1,
                pcp_size=1,
                prefix="model.layers.3.mlp.experts",
            )
        self.router = self.runner.router
        fill_expert_weights(self.runner.routed_experts, l2p, first_physical=0, dtype=dtype, seed=seed)
        install_batched_kernel(self.runner)

        # EplbState's shapes: one row per MoE layer; this is layer 1 of 2.
        self.load_pass = torch.zeros((2, num_physical), dtype=torch.int32)
        self.runner.set_eplb_state(1, self.load_pass, l2p.expand(2, -1, -1), replicas.expand(2, -1))
        state = self.router.eplb_state
        state.should_record_tensor = torch.ones((), dtype=torch.bool)
        state.num_unpadded_tokens_tensors = [torch.zeros((), dtype=torch.int32)]
        self.l2p, self.replicas = l2p, replicas
        self.logical_ids: list[torch.Tensor] = []
        self.router.set_capture_fn(lambda ids: self.logical_ids.append(ids.clone()))

    @property
    def load(self) -> torch.Tensor:
        return self.load_pass[1]

    def forward(self, hidden, logits, *, num_real=None, padding_mask=True, call=None):
        """``MoERunner.forward`` (or ``call(hidden, logits)``, e.g. a compiled
        version of it) in a forward context, as vLLM's model runner sets it."""
        num_tokens = hidden.shape[0]
        num_real = num_tokens if num_real is None else num_real
        self.router.eplb_state.num_unpadded_tokens_tensors[0].fill_(num_real)
        is_padding = torch.arange(num_tokens) >= num_real if padding_mask else None
        call = self.runner.forward if call is None else call
        with set_forward_context(None, self.config, is_padding=is_padding):
            return call(hidden.clone(), logits.clone())

    def route(self, hidden, logits):
        """The router alone, as model code that runs its own GEMMs after it does."""
        num_tokens = hidden.shape[0]
        self.router.eplb_state.num_unpadded_tokens_tensors[0].fill_(num_tokens)
        with set_forward_context(None, self.config, is_padding=torch.zeros(num_tokens, dtype=torch.bool)):
            _, physical = self.router.select_experts(hidden, logits)
        return physical

    def expected_load(self, num_real_per_forward: list[int]) -> torch.Tensor:
        """Counts of every forward's real rows, mapped by the reference."""
        load = torch.zeros_like(self.load)
        for ids, num_real in zip(self.logical_ids, num_real_per_forward, strict=True):
            physical = torch.tensor(map_to_physical_reference(ids, self.l2p, self.replicas)).view(ids.shape)
            physical = physical[:num_real].reshape(-1)
            physical = physical[physical >= 0]
            load += torch.bincount(physical, minlength=load.numel()).to(torch.int32)
        return load

    @property
    def attached(self) -> bool:
        return "_apply_eplb_mapping" in vars(self.router)


def install_batched_kernel(runner) -> None:
    """vLLM's batched modular kernel, as its oracle builds it on XPU with
    ``moe_backend="batched_triton"`` (``all2all_utils.maybe_make_prepare_finalize``),
    with the batched experts that run on CPU."""
    prepare_finalize = BatchedPrepareAndFinalize(
        max_num_tokens=MAX_TOKENS,
        num_local_experts=runner.moe_config.num_local_experts,
        num_dispatchers=1,
        rank=runner.moe_config.moe_parallel_config.ep_rank,
    )
    experts = NaiveBatchedExperts(
        moe_config=runner.moe_config,
        quant_config=FUSED_MOE_UNQUANTIZED_CONFIG,
        max_num_tokens=MAX_TOKENS,
        num_dispatchers=1,
    )
    runner.routed_experts.quant_method.moe_kernel = FusedMoEKernel(prepare_finalize, experts)


def fill_expert_weights(experts, l2p, *, first_physical: int, dtype, seed: int) -> None:
    """Give every local physical expert its logical expert's weights, as EPLB does."""
    num_logical, num_local = l2p.shape[0], experts.w13_weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn((num_logical, *experts.w13_weight.shape[1:]), generator=generator, dtype=dtype)
    w2 = torch.randn((num_logical, *experts.w2_weight.shape[1:]), generator=generator, dtype=dtype)
    physical_to_logical = torch.empty(int(l2p.max()) + 1, dtype=torch.int64)
    for logical, row in enumerate(l2p.tolist()):
        for physical in row:
            if physical >= 0:
                physical_to_logical[physical] = logical
    local = physical_to_logical[first_physical : first_physical + num_local]
    with torch.no_grad():
        experts.w13_weight.copy_(w13[local] * 0.2)
        experts.w2_weight.copy_(w2[local] * 0.2)


def inputs(num_tokens: int, num_logical: int = 8, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn((num_tokens, HIDDEN), generator=generator, dtype=dtype)
    logits = torch.randn((num_tokens, num_logical), generator=generator, dtype=dtype)
    return hidden, logits


def lowering_lines(records) -> list[str]:
    """The plugin's log lines among ``records``."""
    return [r.getMessage() for r in records if r.getMessage().startswith(LOG_TAG)]
