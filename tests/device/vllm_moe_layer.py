"""vLLM 0.33.0's real fused-MoE layer on a GPU, with the plugin on and off.

Needs vLLM's Python sources and the GPU harness ``vllm_shim`` on PYTHONPATH
(``tests/device/run_vllm_layer.sh`` sets them up). The harness stands in for
vLLM's compiled extensions (built for another torch) with plain-torch ops,
and, because vLLM's own ``BatchedPrepareAndFinalize.prepare`` and naive
weight-and-reduce call ``Tensor.nonzero()`` (a host sync that fails inside
CUDA-graph capture), swaps in sync-free versions with the same results.

Part 1, checks: several EPLB layers (random placements with replicas) built
by ``FusedMoEFactory``, with ``BatchedPrepareAndFinalize`` +
``BatchedTritonExperts`` or ``NaiveBatchedExperts``; stock vLLM (op off)
against the plugin on both lowerings; eager, inside ``torch.cuda.graph`` with
replays that change the inputs, the gate and ``num_unpadded_tokens``, and
under ``torch.compile(fullgraph=True)``. Every forward: the real rows' outputs
are bitwise equal to stock vLLM's, and the load equals an independent count.

What recording costs inside a MoE layer is measured by ``moe_layer_cost.py``
instead: this batched layer pads every expert to the batch maximum, far from
what serving runs at decode sizes.
"""

from __future__ import annotations

import argparse
import os
import sys

import vllm_shim  # noqa: F401  (first: installs the stand-ins)
import torch

from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG  # noqa: E402
from vllm.model_executor.layers.fused_moe.experts.fused_batched_moe import (  # noqa: E402
    BatchedTritonExperts,
    NaiveBatchedExperts,
)
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory  # noqa: E402
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel  # noqa: E402
from vllm.model_executor.layers.fused_moe.prepare_finalize import BatchedPrepareAndFinalize  # noqa: E402

from eplb_compile import vllm_plugin  # noqa: E402
from eplb_compile.reference import map_to_physical_reference  # noqa: E402
from eplb_compile.selection import MIN_TOKENS_ENV  # noqa: E402
from eplb_compile.workloads import eplb_placement  # noqa: E402

DEV = torch.device("cuda")
EXPERTS = {"triton": BatchedTritonExperts, "naive": NaiveBatchedExperts}


class Layer:
    def __init__(self, *, op_on: bool, experts: str, num_logical: int, num_redundant: int, top_k: int,
                 hidden: int, intermediate: int, max_tokens: int, dtype, seed: int, eplb: bool = True):
        g = torch.Generator().manual_seed(seed)
        place = eplb_placement(num_logical, num_redundant, 1, generator=g)
        self.l2p = place.logical_to_physical_map.to(DEV)
        self.replicas = place.logical_replica_count.to(DEV)
        num_physical = place.num_physical
        self.config = VllmConfig(compilation_config=CompilationConfig(
            custom_ops=["+eplb_load_update" if op_on else "-eplb_load_update"]))
        with set_current_vllm_config(self.config), torch.device(DEV):
            self.runner = FusedMoEFactory(
                num_experts=num_logical, top_k=top_k, hidden_size=hidden, intermediate_size=intermediate,
                params_dtype=dtype, enable_eplb=eplb, num_redundant_experts=num_redundant if eplb else 0,
                tp_size=1, dp_size=1, pcp_size=1, prefix=f"model.layers.{seed}.mlp.experts",
            )
        experts_mod = self.runner.routed_experts
        p2l = place.physical_to_logical_map if eplb else torch.arange(num_logical)
        w13 = torch.randn((num_logical, *experts_mod.w13_weight.shape[1:]), generator=g) * 0.05
        w2 = torch.randn((num_logical, *experts_mod.w2_weight.shape[1:]), generator=g) * 0.05
        with torch.no_grad():
            experts_mod.w13_weight.copy_(w13[p2l].to(dtype))
            experts_mod.w2_weight.copy_(w2[p2l].to(dtype))
        num_local = self.runner.moe_config.num_local_experts
        pf = BatchedPrepareAndFinalize(max_num_tokens=max_tokens, num_local_experts=num_local,
                                       num_dispatchers=1, rank=0)
        fused = EXPERTS[experts](moe_config=self.runner.moe_config, quant_config=FUSED_MOE_UNQUANTIZED_CONFIG,
                                 max_num_tokens=max_tokens, num_dispatchers=1)
        self.runner.routed_experts.quant_method.moe_kernel = FusedMoEKernel(pf, fused)
        self.load_pass = torch.zeros((2, num_physical), dtype=torch.int32, device=DEV)
        self.gate = torch.ones((), dtype=torch.bool, device=DEV)
        self.unpadded = torch.zeros((), dtype=torch.int32, device=DEV)
        if eplb:
            self.runner.set_eplb_state(1, self.load_pass, self.l2p.expand(2, -1, -1), self.replicas.expand(2, -1))
            state = self.runner.router.eplb_state
            state.should_record_tensor = self.gate
            state.num_unpadded_tokens_tensors = [self.unpadded]
        self.ids = torch.full((max_tokens, top_k), -7, dtype=torch.int32, device=DEV)
        self.runner.router.set_capture_fn(lambda ids: self.ids[: ids.shape[0]].copy_(ids))
        self.attached = eplb and "eplb_load_update" in vars(self.runner.router)

    @property
    def load(self):
        return self.load_pass[1]

    def forward(self, hidden, logits, call=None):
        call = self.runner.forward if call is None else call
        is_padding = torch.arange(hidden.shape[0], device=DEV) >= self.unpadded
        with set_current_vllm_config(self.config), set_forward_context(None, self.config, is_padding=is_padding):
            return call(hidden, logits)

    def expected_increment(self, num_tokens: int, num_real: int, gate: bool) -> torch.Tensor:
        ids = self.ids[:num_tokens].cpu()
        physical = torch.tensor(map_to_physical_reference(ids, self.l2p.cpu(), self.replicas.cpu())).view(ids.shape)
        physical = physical[:num_real].reshape(-1)
        physical = physical[physical >= 0]
        counts = torch.bincount(physical, minlength=self.load.numel()).to(torch.int32)
        return counts if gate else torch.zeros_like(counts)


def check_config(experts: str, seed: int, lowering: str, failures: list, stats: dict) -> None:
    os.environ[MIN_TOKENS_ENV] = "0" if lowering == "counts" else str(10**9)
    shape = dict(experts=experts, num_logical=16, num_redundant=8, top_k=4, hidden=128, intermediate=256,
                 max_tokens=96, dtype=torch.bfloat16, seed=seed)
    on, off = Layer(op_on=True, **shape), Layer(op_on=False, **shape)
    assert on.attached and not off.attached
    g = torch.Generator(device=DEV).manual_seed(seed)
    name = f"{experts}/seed{seed}/{lowering}"

    def compare(tag, out_on, out_off, num_tokens, num_real, gate, before):
        stats["forwards"] += 1
        if not torch.equal(out_on[:num_real], out_off[:num_real]):
            failures.append(f"{name} {tag}: outputs differ (T={num_tokens} real={num_real})")
        want = before + on.expected_increment(num_tokens, num_real, gate)
        if not torch.equal(on.load.cpu(), want):
            failures.append(f"{name} {tag}: plugin load != independent count")
        if not torch.equal(off.load.cpu(), want):  # stock vLLM's own kernel, as a second oracle
            failures.append(f"{name} {tag}: stock vLLM load != independent count")

    # Eager.
    for step, (num_tokens, num_real, gate) in enumerate([(96, 96, True), (40, 29, True), (7, 7, False), (64, 1, True)]):
        hidden = torch.randn((num_tokens, 128), generator=g, device=DEV).to(torch.bfloat16)
        logits = torch.randn((num_tokens, 16), generator=g, device=DEV)
        before = on.load.cpu()
        assert torch.equal(before, off.load.cpu())
        outs = []
        for layer in (on, off):
            layer.gate.fill_(gate)
            layer.unpadded.fill_(num_real)
            outs.append(layer.forward(hidden.clone(), logits.clone()))
        compare(f"eager{step}", *outs, num_tokens, num_real, gate, before)

    # torch.cuda.graph: one capture, replays with new inputs, gate and num_unpadded.
    T = 96
    static = {id(layer): (torch.zeros((T, 128), dtype=torch.bfloat16, device=DEV),
                          torch.zeros((T, 16), device=DEV)) for layer in (on, off)}
    graphs, outputs = {}, {}
    for layer in (on, off):
        h, lg = static[id(layer)]
        layer.gate.fill_(False)
        layer.unpadded.fill_(T)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer.forward(h, lg)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs[id(layer)] = layer.forward(h, lg)
        graphs[id(layer)] = graph
    for replay, (num_real, gate) in enumerate([(96, True), (50, True), (96, False), (3, True), (0, True), (77, True)]):
        hidden = torch.randn((T, 128), generator=g, device=DEV).to(torch.bfloat16)
        logits = torch.randn((T, 16), generator=g, device=DEV)
        before = on.load.cpu()
        for layer in (on, off):
            static[id(layer)][0].copy_(hidden)
            static[id(layer)][1].copy_(logits)
            layer.gate.fill_(gate)
            layer.unpadded.fill_(num_real)
            graphs[id(layer)].replay()
        torch.cuda.synchronize()
        stats["replays"] += 1
        compare(f"graph{replay}", outputs[id(on)], outputs[id(off)], T, num_real, gate, before)

    # torch.compile(fullgraph=True) of the layer's forward.
    compiled_on = torch.compile(on.runner.forward, fullgraph=True)
    compiled_off = torch.compile(off.runner.forward, fullgraph=True)
    for step, (num_tokens, num_real) in enumerate([(48, 48), (80, 61)]):
        hidden = torch.randn((num_tokens, 128), generator=g, device=DEV).to(torch.bfloat16)
        logits = torch.randn((num_tokens, 16), generator=g, device=DEV)
        before = on.load.cpu()
        outs = []
        for layer, fn in ((on, compiled_on), (off, compiled_off)):
            layer.gate.fill_(True)
            layer.unpadded.fill_(num_real)
            outs.append(layer.forward(hidden.clone(), logits.clone(), call=fn))
        compare(f"compiled{step}", *outs, num_tokens, num_real, True, before)
    torch._dynamo.reset()


def check_traced_on_gpu(experts: str, lowering: str, failures: list, stats: dict) -> None:
    """Dynamo traces the router and the plugin on the GPU too: ``_forward_impl``
    (what vLLM's opaque ``moe_forward`` op runs) under ``torch.compile(fullgraph=True)``
    with a dynamic token dimension: one graph across token counts, and the same
    outputs and loads as stock vLLM run eagerly."""
    from torch._dynamo.testing import CompileCounterWithBackend

    os.environ[MIN_TOKENS_ENV] = "0" if lowering == "counts" else str(10**9)
    shape = dict(experts=experts, num_logical=16, num_redundant=8, top_k=4, hidden=128, intermediate=256,
                 max_tokens=96, dtype=torch.bfloat16, seed=7)
    on, off = Layer(op_on=True, **shape), Layer(op_on=False, **shape)
    name = f"traced/{experts}/{lowering}"
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    traced = torch.compile(lambda h, lg: on.runner._forward_impl(h, lg, None, None), fullgraph=True, backend=counter)

    def call(h, lg):
        torch._dynamo.mark_dynamic(h, 0)
        torch._dynamo.mark_dynamic(lg, 0)
        return traced(h, lg)

    # One eager forward first, as vLLM's profiling run: vLLM initialises its
    # quant config lazily in the first forward (a recompile with the op on or off).
    on.gate.fill_(False)
    on.unpadded.fill_(8)
    on.forward(torch.zeros((8, 128), dtype=torch.bfloat16, device=DEV), torch.zeros((8, 16), device=DEV))
    g = torch.Generator(device=DEV).manual_seed(11)
    try:
        for num_tokens, num_real in [(48, 48), (80, 61), (17, 17), (96, 90)]:
            hidden = torch.randn((num_tokens, 128), generator=g, device=DEV).to(torch.bfloat16)
            logits = torch.randn((num_tokens, 16), generator=g, device=DEV)
            before = on.load.cpu()
            for layer in (on, off):
                layer.gate.fill_(True)
                layer.unpadded.fill_(num_real)
            out_on = on.forward(hidden.clone(), logits.clone(), call=call)
            out_off = off.forward(hidden.clone(), logits.clone())
            stats["forwards"] += 1
            if not torch.equal(out_on[:num_real], out_off[:num_real]):
                failures.append(f"{name}: outputs differ (T={num_tokens})")
            if not torch.equal(on.load.cpu(), before + on.expected_increment(num_tokens, num_real, True)):
                failures.append(f"{name}: load != independent count (T={num_tokens})")
        if counter.frame_count != 1:
            failures.append(f"{name}: {counter.frame_count} graphs for 4 token counts")
        stats["traced"] = stats.get("traced", 0) + 1
    except Exception as error:  # report, do not hide: a trace failure is a failure
        failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
        print(f"{name}: {type(error).__name__}:", "\n".join(str(error).splitlines()[:40]), flush=True)
    torch._dynamo.reset()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", choices=["all", "traced", "none"], default="all",
                        help="all: eager, CUDA-graph and compiled checks; traced: Dynamo tracing _forward_impl "
                             "on the GPU (fails inside vLLM's modular kernel, at workspace.py:124's "
                             "ContextVar.get, which vLLM itself never traces: see the README)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    vllm_shim.graph_safe_batched(True)
    from vllm.v1.worker.workspace import init_workspace_manager

    init_workspace_manager(DEV)  # the modular kernel's scratch buffers, as vLLM's GPU worker sets up
    vllm_plugin.register()
    from eplb_compile.kernels import eager_extension

    print("C++ eager launcher:", "built" if eager_extension.wait() is not None else eager_extension.failure())
    failures: list[str] = []
    stats = {"forwards": 0, "replays": 0}
    for experts in ("triton", "naive") if args.checks == "all" else ():
        for seed in (0, 1, 2):
            for lowering in ("topk", "counts"):
                check_config(experts, seed, lowering, failures, stats)
    for experts in ("naive", "triton") if args.checks == "traced" else ():
        for lowering in ("topk", "counts"):
            check_traced_on_gpu(experts, lowering, failures, stats)
    print(f"checks: {stats['forwards']} forwards compared ({stats['replays']} graph replays, "
          f"{stats.get('traced', 0)} layers traced by Dynamo on the GPU), {len(failures)} failures")
    for line in failures[:20]:
        print("  FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
