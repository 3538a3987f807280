"""Capture and replay: the load update inside CUDA graphs (GPU only)."""

import pytest
import torch

from eplb_compile.demo import DemoConfig, Lowering, ToyMoEBlock

from tests.cases import requires_cuda

pytestmark = requires_cuda

CFG = DemoConfig(layers=3, ep_size=4, num_logical=16, num_redundant=4, tokens_per_rank=96, device="cuda")


def _model_and_input(seed=0):
    model = ToyMoEBlock(CFG).cuda()
    x = torch.randn(CFG.ep_size, CFG.tokens_per_rank, CFG.hidden, generator=torch.Generator().manual_seed(seed)).cuda()
    return model, x


def _global(loads):
    """The EP all-reduce: a rank's topk row spans every expert, its count row
    only its own slice, so only the sums over ranks must agree."""
    return loads.sum(dim=1)


def _one_pass(model, x, record=True, unpadded=None):
    """Loads of one eager pass with the given gate and padding."""
    model.zero_load_pass()
    model.record_enabled.fill_(record)
    model.num_unpadded_tokens.fill_(CFG.tokens_per_rank if unpadded is None else unpadded)
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    return {lowering: model.load_pass(lowering).clone() for lowering in Lowering}


def test_plain_cuda_graph_replays_gate_and_padding():
    model, x = _model_and_input()
    full = _one_pass(model, x)
    padded = _one_pass(model, x, unpadded=CFG.tokens_per_rank - 40)
    assert torch.equal(_global(full[Lowering.TOPK]), _global(full[Lowering.COUNTS]))
    assert torch.equal(_global(padded[Lowering.TOPK]), _global(padded[Lowering.COUNTS]))
    assert padded[Lowering.TOPK].sum() < full[Lowering.TOPK].sum()

    model.zero_load_pass()
    model.record_enabled.fill_(True)
    model.num_unpadded_tokens.fill_(CFG.tokens_per_rank)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(x)
    # Capture runs nothing: the load is still zero.
    assert model.load_pass(Lowering.TOPK).sum() == 0

    replays = 7
    for _ in range(replays):
        graph.replay()
    for lowering in Lowering:
        assert torch.equal(model.load_pass(lowering), replays * full[lowering])

    # Gate off between replays: nothing more is recorded, no re-capture.
    model.record_enabled.fill_(False)
    for _ in range(3):
        graph.replay()
    for lowering in Lowering:
        assert torch.equal(model.load_pass(lowering), replays * full[lowering])

    # Gate back on, with padding: the next replays count only unpadded rows.
    model.record_enabled.fill_(True)
    model.num_unpadded_tokens.fill_(CFG.tokens_per_rank - 40)
    graph.replay()
    graph.replay()
    for lowering in Lowering:
        assert torch.equal(model.load_pass(lowering), replays * full[lowering] + 2 * padded[lowering])


def test_reduce_overhead_really_uses_cudagraphs():
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    counters.clear()
    model, x = _model_and_input(seed=1)
    full = _one_pass(model, x)
    for layer in model.layers:
        # The loads are module buffers, so cudagraph trees keep them static.
        layer.compile(mode="reduce-overhead", fullgraph=True)
    model.zero_load_pass()
    model.record_enabled.fill_(True)
    calls = 6

    def step():
        # One forward per "step"; ids are dropped, as cudagraph trees reuse
        # output memory on the next step.
        torch.compiler.cudagraph_mark_step_begin()
        h = x
        with torch.no_grad():
            for layer in model.layers:
                h, _ = layer(h, model.record_enabled, model.num_unpadded_tokens)

    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    for lowering in Lowering:
        assert torch.equal(model.load_pass(lowering), calls * full[lowering])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None
    recorded = sum(len(nodes) for nodes in manager.roots.values())
    assert recorded >= 1, "no CUDA graph was recorded"

    model.record_enabled.fill_(False)
    step()
    torch.cuda.synchronize()
    for lowering in Lowering:
        assert torch.equal(model.load_pass(lowering), calls * full[lowering])
    torch._dynamo.reset()


def test_no_host_sync_in_eager_ops():
    model, x = _model_and_input(seed=2)
    _one_pass(model, x)  # warm up (Triton compiles on first launch)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
