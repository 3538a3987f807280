"""The plugin inside a compiled vLLM 0.33.0 MoE forward, on CPU.

On CPU vLLM calls the MoE forward directly, so in its compiled mode Dynamo
traces the router and the plugin's per-forward code (``runner/moe_runner.py``
``_moe_forward``). Here ``MoERunner.forward`` is compiled with
``torch.compile(fullgraph=True)`` and Inductor, with a dynamic token
dimension: one graph, no graph break, no recompile across token counts, and
the same outputs and loads as the eager forward, on both lowerings.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from vllm_layers import ON, Layer, inputs, lowering_lines, replicated_placement  # noqa: E402

from eplb_compile.selection import MIN_TOKENS_ENV  # noqa: E402

SIZES = [40, 17, 64, 33, 2]


def compiled(layer: Layer):
    counter = CompileCounterWithBackend("inductor")
    forward = torch.compile(layer.runner.forward, fullgraph=True, backend=counter)

    def call(hidden, logits):
        torch._dynamo.mark_dynamic(hidden, 0)
        torch._dynamo.mark_dynamic(logits, 0)
        return forward(hidden, logits)

    return call, counter


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def warm_up(layer: Layer) -> None:
    """One eager forward with the gate off, as vLLM's profiling run does: vLLM
    initialises its quant config lazily in the first forward, which would
    otherwise cost one recompile with the plugin on or off. The router's
    capture hook is dropped too: appending to a Python list is a side effect
    that a compiled graph guards on (expected loads come from the eager twin)."""
    layer.router.eplb_state.should_record_tensor.fill_(False)
    layer.forward(*inputs(8, seed=99))
    layer.router.set_capture_fn(None)
    layer.logical_ids.clear()


def run_both(schedule, **forward_kwargs):
    """Run ``schedule`` [(num_tokens, num_real, gate)] through an eager and a compiled layer."""
    eager, compiled_layer = Layer(ON, replicated_placement()), Layer(ON, replicated_placement())
    warm_up(compiled_layer)
    call, counter = compiled(compiled_layer)
    recorded = []
    for seed, (num_tokens, num_real, gate) in enumerate(schedule):
        hidden, logits = inputs(num_tokens, seed=seed)
        outputs = []
        for layer, fn in ((eager, None), (compiled_layer, call)):
            layer.router.eplb_state.should_record_tensor.fill_(gate)
            outputs.append(layer.forward(hidden, logits, num_real=num_real, call=fn, **forward_kwargs))
        # Inductor's CPU GEMMs may round the last bit differently from eager.
        torch.testing.assert_close(outputs[1][:num_real], outputs[0][:num_real], rtol=1e-5, atol=1e-5)
        recorded.append(num_real if gate else 0)
    return eager, compiled_layer, counter, recorded


def test_compiled_forward_records_like_eager_with_one_graph(lowering, plugin_log):
    schedule = [(n, n, True) for n in SIZES]
    eager, layer, counter, recorded = run_both(schedule)
    assert counter.frame_count == 1, "recompiled across token counts"
    assert torch.equal(eager.load, eager.expected_load(recorded))
    assert torch.equal(layer.load, eager.load)
    assert layer.load.sum() == sum(SIZES) * 3
    lines = lowering_lines(plugin_log)
    # One line per layer and lowering (two layers here: the compiled layer's
    # line comes from its eager warm-up; see the test without one below).
    assert len(lines) == 2 and all(f"lowering={lowering}" in line for line in lines), lines


def test_compiled_mode_logs_the_lowering_without_an_eager_forward(lowering, plugin_log):
    """vLLM compiles before any eager forward: the line must come from Dynamo's
    trace of the layer (where the lowering is decided), not from an eager call."""
    layer = Layer(ON, replicated_placement())
    call, counter = compiled(layer)
    for num_tokens in (40, 17, 64):
        layer.forward(*inputs(num_tokens), call=call)
    assert counter.frame_count >= 1
    lines = lowering_lines(plugin_log)
    assert len(lines) == 1 and f"lowering={lowering}" in lines[0], lines


def test_compiled_gate_and_padding_take_effect_without_recompiling(lowering):
    schedule = [(40, 31, True), (17, 17, False), (64, 50, True), (33, 1, False), (24, 0, True)]
    eager, layer, counter, recorded = run_both(schedule)
    assert counter.frame_count == 1
    expected = eager.expected_load(recorded)
    assert expected.sum() == (31 + 50) * 3
    assert torch.equal(layer.load, expected)
    assert torch.equal(eager.load, expected)


def test_compiled_count_path_needs_no_forward_context_mask(monkeypatch):
    monkeypatch.setenv(MIN_TOKENS_ENV, "0")
    schedule = [(40, 29, True), (18, 18, True)]
    eager, layer, counter, recorded = run_both(schedule, padding_mask=False)
    assert counter.frame_count == 1
    assert torch.equal(layer.load, eager.expected_load(recorded))


def test_compiled_graph_holds_the_plugin_ops_and_no_vllm_recording(lowering):
    """The lowering is decided at trace time: the graph holds that path's ops only."""
    layer = Layer(ON, replicated_placement())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    forward = torch.compile(layer.runner.forward, fullgraph=True, backend=backend)
    layer.forward(*inputs(40), call=forward)
    (gm,) = graphs
    targets = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    ours = {t.split(".")[-2] for t in targets if "eplb_compile" in t}
    assert ours == ({"map_only", "record_counts"} if lowering == "counts" else {"map_and_record"})
