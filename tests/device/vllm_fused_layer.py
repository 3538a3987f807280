"""vLLM 0.33.0's own non-batched MoE layer on the GPU machine: the realistic denominator.

``moe_layer_cost.py --vllm-moe-ops SO`` uses this (``run_layer_cost.sh`` sets it up
where ``.vllm_gpu/`` holds the bundle). The layer is what vLLM 0.33.0 builds and
serves for unquantized bf16 on one Hopper GPU: ``FusedMoEFactory`` -> ``MoERunner``
with ``FusedTopKRouter`` (softmax top-8, renormalised) and EPLB, and the kernel
vLLM's own oracle picks there (``select_unquantized_moe_backend`` puts Triton first
on SM90): ``MoEPrepareAndFinalizeNoDPEPModular`` + ``TritonExperts``
(``moe_align_block_size``, two ``fused_moe_kernel`` GEMMs, ``silu_and_mul``,
``moe_sum``). The gate GEMM runs before it, as in a model.

What is not vLLM 0.33.0's own code, and why:
- ``_moe_C``'s compiled ops (``topk_softmax``, ``moe_align_block_size``, ``moe_sum``)
  are vLLM 0.26.0's binary, the newest built for the GPU machine's torch 2.11. Their
  schemas are older: 0.33.0 added ``is_padding`` to ``topk_softmax`` (None here: no
  padded rows), ``topk_ids``/``expert_map`` to ``moe_sum`` and ``scatter_idx`` to
  ``moe_align_block_size`` (both None on one rank), so small adapters take 0.33.0's
  calls and refuse anything else.
- ``_C::silu_and_mul`` is one Triton kernel here (vLLM's is one CUDA kernel in ``_C``,
  whose binary is not carried).
- ``STANDINS`` switches both to the GPU harness's plain-torch stand-ins, to measure how
  far those distort the layer.
"""

from __future__ import annotations

import os

import torch

STANDINS = {"on": False}  # read at call time: a CUDA graph keeps what was on at capture
_LIBS: list = []  # keeps the torch.library registration alive


def install(library: str) -> None:
    """Before anything imports vllm: load 0.26.0's ``_moe_C``, keep the shim off its ops, adapt 0.33.0's calls."""
    os.environ["VLLM_SHIM_SKIP"] = ",".join(filter(None, [
        os.environ.get("VLLM_SHIM_SKIP", ""), "_moe_C::topk_softmax", "_moe_C::topk_sigmoid", "_C::silu_and_mul"]))
    torch.ops.load_library(library)
    import vllm_shim  # noqa: F401  (the rest of the stand-ins and the platform)
    from vllm import _custom_ops as ops

    ops.topk_softmax, ops.moe_align_block_size, ops.moe_sum = _topk_softmax, _moe_align_block_size, _moe_sum
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("silu_and_mul(Tensor(a!) out, Tensor input) -> ()")
    lib.impl("silu_and_mul", _silu_and_mul, "CompositeExplicitAutograd")
    _LIBS.append(lib)


def _topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize=False,
                  e_score_correction_bias=None, is_padding=None):
    if is_padding is not None:
        raise ValueError("vLLM 0.26.0's topk_softmax has no is_padding: run without padded rows")
    if STANDINS["on"]:
        import vllm_shim

        return vllm_shim._topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize,
                                       e_score_correction_bias, None)
    torch.ops._moe_C.topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize,
                                  e_score_correction_bias)


def _moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids, num_tokens_post_pad,
                          expert_map=None, scatter_idx=None):
    if scatter_idx is not None:
        raise ValueError("vLLM 0.26.0's moe_align_block_size has no scatter_idx")
    torch.ops._moe_C.moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                                          num_tokens_post_pad, expert_map)


def _moe_sum(input, output, topk_ids=None, expert_map=None):
    if expert_map is not None:
        raise ValueError("vLLM 0.26.0's moe_sum has no expert_map: one rank only")
    torch.ops._moe_C.moe_sum(input, output)


def _silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    if STANDINS["on"] or not (input.is_contiguous() and out.is_contiguous()):
        import vllm_shim

        return vllm_shim._silu_and_mul(out, input)
    rows, d = input.numel() // input.shape[-1], input.shape[-1] // 2
    _silu_and_mul_kernel()[(rows, -(-d // 1024))](out, input, d, BLOCK=1024)


def _silu_and_mul_kernel():
    """silu(x) * y in one kernel, as vLLM's: silu in fp32, cast to the input dtype, then the product."""
    global _KERNEL
    if "_KERNEL" not in globals():
        import triton
        import triton.language as tl

        @triton.jit
        def silu_and_mul(out_ptr, in_ptr, d, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            mask = col < d
            x = tl.load(in_ptr + row * 2 * d + col, mask=mask).to(tl.float32)
            y = tl.load(in_ptr + row * 2 * d + d + col, mask=mask)
            tl.store(out_ptr + row * d + col, (x / (1.0 + tl.exp(-x))).to(y.dtype) * y, mask=mask)

        _KERNEL = silu_and_mul
    return _KERNEL


class VllmLayers:
    """``copies`` layers of distinct weights, each built four ways over the same weights:
    ``off`` (EPLB off: 64 experts), ``stock`` (EPLB on, vLLM 0.33.0's recording),
    ``plugin`` (EPLB on, the plugin's op), ``standins`` (stock, with the harness's
    plain-torch ``topk_softmax`` and ``silu_and_mul``)."""

    VARIANTS = ("off", "stock", "plugin", "standins")

    def __init__(self, copies: int, device, *, hidden: int, inter: int, top_k: int, l2p, replicas):
        from vllm.config import CompilationConfig, VllmConfig

        self.device, self.top_k, self.hidden = device, top_k, hidden
        self.l2p, self.replicas = l2p, replicas
        num_logical, num_physical = l2p.shape[0], int(replicas.sum())
        p2l = torch.empty(num_physical, dtype=torch.long)
        for logical, row in enumerate(l2p.cpu().tolist()):
            for physical in row[: int(replicas[logical])]:
                p2l[physical] = logical
        self.p2l = p2l.to(device)
        self.configs = {op: VllmConfig(compilation_config=CompilationConfig(
            custom_ops=["+eplb_load_update" if op else "-eplb_load_update"])) for op in (True, False)}
        self.copies = []
        for seed in range(copies):
            g = torch.Generator(device=device).manual_seed(100 + seed)
            bf16 = dict(dtype=torch.bfloat16, device=device, generator=g)
            w13 = torch.randn((num_logical, 2 * inter, hidden), **bf16) * hidden**-0.5
            w2 = torch.randn((num_logical, hidden, inter), **bf16) * inter**-0.5
            physical = (w13[self.p2l], w2[self.p2l])
            copy = {"gate": torch.randn((num_logical, hidden), **bf16) * hidden**-0.5, "logical": (w13, w2)}
            for number, name in enumerate(self.VARIANTS):
                copy[name] = self._runner(name != "off", name == "plugin", physical if name != "off" else (w13, w2),
                                          len(self.VARIANTS) * seed + number, num_logical, hidden, inter)
            self.copies.append(copy)

    def _runner(self, eplb: bool, op_on: bool, weights, index: int, num_logical: int, hidden: int,
                inter: int) -> dict:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

        config = self.configs[op_on]
        num_redundant = int(self.replicas.sum()) - num_logical if eplb else 0
        with set_current_vllm_config(config), torch.device(self.device):
            runner = FusedMoEFactory(num_experts=num_logical, top_k=self.top_k, hidden_size=hidden,
                                     intermediate_size=inter, params_dtype=torch.bfloat16, enable_eplb=eplb,
                                     num_redundant_experts=num_redundant, tp_size=1, dp_size=1, pcp_size=1,
                                     prefix=f"model.layers.{index}.mlp.experts")
            experts = runner.routed_experts
            experts.w13_weight.data, experts.w2_weight.data = weights  # shared between variants: same bytes read
            experts.quant_method.process_weights_after_loading(experts)  # vLLM's oracle builds the kernel
        kernel = experts.quant_method.moe_kernel
        state = {"runner": runner, "config": config, "kernel": kernel,
                 "load": torch.zeros((2, int(self.replicas.sum())), dtype=torch.int32, device=self.device)}
        if eplb:
            runner.set_eplb_state(1, state["load"], self.l2p.expand(2, -1, -1), self.replicas.expand(2, -1))
            runner.router.eplb_state.should_record_tensor = torch.ones((), dtype=torch.bool, device=self.device)
            state["unpadded"] = torch.zeros((), dtype=torch.int32, device=self.device)
            runner.router.eplb_state.num_unpadded_tokens_tensors = [state["unpadded"]]
        state["ids"] = None
        runner.router.set_capture_fn(lambda ids: state.__setitem__("ids", ids))
        state["attached"] = eplb and "eplb_load_update" in vars(runner.router)
        return state

    def kernel_names(self) -> str:
        kernel = self.copies[0]["stock"]["kernel"]
        impl = getattr(kernel, "impl", kernel)
        return f"{type(impl.prepare_finalize).__name__} + {type(impl.fused_experts).__name__}"

    def forward(self, copy: dict, variant: str, x: torch.Tensor) -> torch.Tensor:
        from vllm.config import set_current_vllm_config
        from vllm.forward_context import set_forward_context

        state = copy[variant]
        if "unpadded" in state and not torch.cuda.is_current_stream_capturing():  # set by the eager warm-up
            state["unpadded"].fill_(x.shape[0])
        STANDINS["on"] = variant == "standins"
        try:
            logits = x @ copy["gate"].T
            with set_current_vllm_config(state["config"]), set_forward_context(None, state["config"]):
                return state["runner"].forward(x, logits)
        finally:
            STANDINS["on"] = False

    def reference(self, copy: dict, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """fp32 MoE output for the router's logical ``ids``: renormalised softmax weights, silu(gate) * up."""
        w13, w2 = copy["logical"]
        scores = torch.softmax((x @ copy["gate"].T).float(), dim=-1)
        weights = scores.gather(1, ids.long())
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros((x.shape[0], x.shape[1]), dtype=torch.float32, device=x.device)
        inter = w2.shape[2]
        for k in range(ids.shape[1]):
            h = torch.einsum("th,tnh->tn", x.float(), w13[ids[:, k].long()].float())
            a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            out += weights[:, k : k + 1] * torch.einsum("tn,thn->th", a, w2[ids[:, k].long()].float())
        return out


def check(layers: VllmLayers, tokens: int, x: torch.Tensor) -> list[str]:
    """On the first copy, before timing: the plugin's output bitwise equal to stock vLLM's; each EPLB
    variant's load increment equal to a count of the router's logical ids; the real ``topk_softmax``'s
    ids a valid top-k of the softmax; at T <= 64 each variant's output within bf16 error of an fp32
    reference for its own ids."""
    copy, problems, outs, ids = layers.copies[0], [], {}, {}
    before = {v: copy[v]["load"][1].clone() for v in VllmLayers.VARIANTS if v != "off"}
    for variant in VllmLayers.VARIANTS:
        outs[variant] = layers.forward(copy, variant, x)
        ids[variant] = copy[variant]["ids"].clone()
    torch.cuda.synchronize()
    tag = f"T={tokens} vLLM layer"
    if not copy["plugin"]["attached"] or copy["stock"]["attached"]:
        problems.append(f"{tag}: the plugin is not attached where it should be (plugin/stock)")
    if not torch.equal(outs["plugin"], outs["stock"]):
        problems.append(f"{tag}: plugin output differs from stock vLLM's")
    num_logical = layers.l2p.shape[0]
    for variant, start in before.items():
        increment = (copy[variant]["load"][1] - start).long()
        got = torch.zeros(num_logical, dtype=torch.long, device=x.device).index_add_(0, layers.p2l, increment)
        want = torch.bincount(ids[variant].reshape(-1).long(), minlength=num_logical)
        if not torch.equal(got, want):
            problems.append(f"{tag} {variant}: load increment != count of the router's ids")
    scores = torch.softmax((x @ copy["gate"].T).float(), dim=-1)
    for variant in ("off", "stock", "standins"):
        chosen = ids[variant].long()
        picked = scores.gather(1, chosen)
        rest = scores.scatter(1, chosen, float("-inf")).max(-1).values
        unique = chosen.sort(-1).values.diff(dim=-1).ne(0).all()
        if not unique or (picked.min(-1).values < rest - 1e-6).any():
            problems.append(f"{tag} {variant}: router ids are not a top-{chosen.shape[1]} of the softmax")
        if tokens <= 64:
            ref = layers.reference(copy, x, chosen)
            error = ((outs[variant].float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max()
            if not error <= 0.03:
                problems.append(f"{tag} {variant}: output off the fp32 reference by {float(error):.3f} (> 0.03)")
    return problems


def time_layers(layers: VllmLayers, xs: list, graph, time, replays: int, repeats: int) -> dict:
    """µs per layer for each variant: one CUDA graph per variant over every copy, timed interleaved."""
    graphs = {variant: graph(lambda v=variant: [layers.forward(c, v, x) for c, x in zip(layers.copies, xs)])
              for variant in VllmLayers.VARIANTS}
    timed = time(graphs, len(layers.copies), replays=replays, repeats=repeats)
    return {**{v: round(m, 2) for v, (m, _) in timed.items()},
            "spread": round(max(s for _, s in timed.values()), 2)}
