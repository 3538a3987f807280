"""The vLLM plugin against the real vLLM (0.32.0, 0.33.0 or 0.34.0), on CPU, eagerly, with no
vLLM class mocked (the layers are built by ``vllm_layers``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.config.compilation import CompilationMode  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory  # noqa: E402
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEPrepareAndFinalize  # noqa: E402
from vllm.model_executor.layers.fused_moe.prepare_finalize import (  # noqa: E402
    BatchedPrepareAndFinalize,
    MoEPrepareAndFinalizeNoDPEPModular,
)
from vllm_layers import (  # noqa: E402
    HIDDEN, INTERMEDIATE, OFF, ON, TOP_K, Layer, identity_placement, inputs, lowering_lines,
    replicated_placement,
)

from eplb_compile import vllm_plugin  # noqa: E402
from eplb_compile.reference import map_to_physical_reference  # noqa: E402
from eplb_compile.selection import MIN_TOKENS_ENV  # noqa: E402
from eplb_compile.vllm_plugin import backends, vllm_surface  # noqa: E402


# --------------------------------------------------------------------------
# Loading and switching.
# --------------------------------------------------------------------------


def test_entry_point_is_found_and_loaded_by_vllm_in_a_fresh_process():
    script = textwrap.dedent(
        """
        import importlib.metadata, json, sys
        found = [ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
                 if ep.name == "eplb_compile"]
        import eplb_compile, eplb_compile.vllm_plugin
        vllm_before_plugins = "vllm" in sys.modules
        from vllm.model_executor.custom_op import op_registry
        registered_before = "eplb_load_update" in op_registry
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from eplb_compile.vllm_plugin import register
        register()  # and again, as a second plugin load would
        register()
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.layers.fused_moe.prepare_finalize import (
            BatchedPrepareAndFinalize, MoEPrepareAndFinalizeNoDPEPModular)
        init = MoERunner.__init__
        print(json.dumps({
            "entry_points": found,
            "vllm_imported_by_our_imports": vllm_before_plugins,
            "registered_before": registered_before,
            "registered_after": op_registry.get("eplb_load_update").__name__,
            "init_hooked": getattr(init, "__eplb_compile__", False),
            "init_hooked_twice": getattr(init.__wrapped__, "__eplb_compile__", False),
            "batched_exact": BatchedPrepareAndFinalize(8, 4, 1, 0).supports_exact_expert_num_tokens(),
            "no_dp_ep_exact": MoEPrepareAndFinalizeNoDPEPModular().supports_exact_expert_num_tokens(),
        }))
        """
    )
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_PLUGINS="eplb_compile")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "entry_points": ["eplb_compile.vllm_plugin:register"],
        "vllm_imported_by_our_imports": False,
        "registered_before": False,
        "registered_after": "EplbLoadUpdate",
        "init_hooked": True,
        "init_hooked_twice": False,
        "batched_exact": True,
        "no_dp_ep_exact": False,
    }


@pytest.mark.parametrize(
    "custom_ops, mode, enabled",
    [
        (["+eplb_load_update"], None, True),  # the documented switch; vLLM adds "none"
        ([], None, False),  # compiled with Inductor, vLLM's default is "none"
        (["all"], None, True),
        (["all", "-eplb_load_update"], None, False),
        (["none", "-eplb_load_update"], None, False),
        ([], CompilationMode.NONE, True),  # eager: vLLM's default is "all"
    ],
)
def test_switch_follows_compilation_config_custom_ops(custom_ops, mode, enabled):
    layer = Layer(custom_ops, replicated_placement(), mode=mode)
    assert layer.attached is enabled
    # vLLM files the op either way, so "+/-eplb_load_update" never warns "no effect".
    filed = layer.config.compilation_config.enabled_custom_ops if enabled else (
        layer.config.compilation_config.disabled_custom_ops
    )
    assert filed[vllm_plugin.OP_NAME] == 1

    hidden, logits = inputs(24)
    layer.load.fill_(-7)
    layer.forward(hidden, logits)
    if enabled:
        assert torch.equal(layer.load + 7, layer.expected_load([24]))
    else:
        # Stock vLLM on CPU records nothing; its router method is the class's.
        assert torch.equal(layer.load, torch.full_like(layer.load, -7))
        assert layer.router._apply_eplb_mapping.__func__ is type(layer.router)._apply_eplb_mapping


def test_layer_without_eplb_is_left_alone():
    config = VllmConfig(compilation_config=CompilationConfig(custom_ops=ON))
    with set_current_vllm_config(config):
        runner = FusedMoEFactory(
            num_experts=8, top_k=2, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            params_dtype=torch.float32, tp_size=1, dp_size=1, pcp_size=1, prefix="dense.experts",
        )
    assert runner.router.eplb_state is None
    assert "_apply_eplb_mapping" not in vars(runner.router)


# --------------------------------------------------------------------------
# The forward: outputs, loads, gate, padding.
# --------------------------------------------------------------------------


def test_moe_output_is_identical_with_the_plugin_on_and_off(lowering):
    # One replica per expert, where stock vLLM on CPU (which does not map) and
    # the plugin (which does) route every token to the same physical expert.
    on, off = Layer(ON, identity_placement(8)), Layer(OFF, identity_placement(8))
    assert on.attached and not off.attached
    for num_tokens, seed in [(40, 1), (1, 2), (64, 3)]:
        hidden, logits = inputs(num_tokens, seed=seed)
        out_on, out_off = on.forward(hidden, logits), off.forward(hidden, logits)
        assert torch.equal(out_on, out_off)
    assert torch.equal(on.load, on.expected_load([40, 1, 64]))


def test_count_path_and_topk_path_give_identical_outputs_with_replicas(monkeypatch):
    hidden, logits = inputs(48, seed=5)
    outputs = {}
    for name, min_tokens in [("counts", 0), ("topk", 10**9)]:
        monkeypatch.setenv(MIN_TOKENS_ENV, str(min_tokens))
        layer = Layer(ON, replicated_placement())
        outputs[name] = layer.forward(hidden, logits)
        assert torch.equal(layer.load, layer.expected_load([48]))
    assert torch.equal(outputs["counts"], outputs["topk"])


def test_load_matches_reference_counts(lowering, plugin_log):
    layer = Layer(ON, replicated_placement())
    sizes = [40, 1, 17, 64, 33]
    for seed, num_tokens in enumerate(sizes):
        layer.forward(*inputs(num_tokens, seed=seed))
    expected = layer.expected_load(sizes)
    assert expected.sum() == sum(sizes) * TOP_K
    assert torch.equal(layer.load, expected)
    assert torch.equal(layer.load_pass[0], torch.zeros_like(layer.load_pass[0]))  # other layer's row
    backend = "BatchedPrepareAndFinalize"
    assert lowering_lines(plugin_log) == [
        f"{vllm_plugin.LOG_TAG} layer=model.layers.3.mlp.experts lowering={lowering} "
        f"backend={backend} reason={_reason(lowering)}"
    ]


def _reason(lowering: str) -> str:
    from eplb_compile import select_lowering

    return select_lowering(True, 40).reason if lowering == "counts" else select_lowering(True, 40, min_tokens=10**9).reason


def test_crossover_picks_the_lowering_per_forward(monkeypatch, plugin_log):
    monkeypatch.setenv(MIN_TOKENS_ENV, "17")
    layer = Layer(ON, replicated_placement())
    sizes = [16, 17, 3, 40]
    for seed, num_tokens in enumerate(sizes):
        layer.forward(*inputs(num_tokens, seed=seed))
    assert torch.equal(layer.load, layer.expected_load(sizes))
    lines = lowering_lines(plugin_log)
    assert [line.split(" lowering=")[1].split()[0] for line in lines] == ["topk", "counts"]  # once each


def test_every_dp_rank_picks_the_lowering_from_the_largest_batch(monkeypatch, plugin_log):
    # 16 tokens here, 200 on the other DP rank, crossover 100: both ranks must
    # take the count path, or tokens would be counted twice or never.
    monkeypatch.setenv(MIN_TOKENS_ENV, "100")
    layer = Layer(ON, replicated_placement())
    layer.config.parallel_config.data_parallel_size = 2  # so vLLM's forward context carries DP metadata
    layer.router.eplb_state.num_unpadded_tokens_tensors[0].fill_(16)
    across_dp = torch.tensor([16, 200], dtype=torch.int32)
    with set_forward_context(None, layer.config, num_tokens=16, num_tokens_across_dp=across_dp,
                             is_padding=torch.zeros(16, dtype=torch.bool)):
        layer.runner.forward(*inputs(16))
    assert torch.equal(layer.load, layer.expected_load([16]))
    (line,) = lowering_lines(plugin_log)
    assert "lowering=counts" in line and "200 tokens" in line


def test_gate_off_records_nothing_and_toggles_without_rebuild(lowering):
    layer = Layer(ON, replicated_placement())
    gate = layer.router.eplb_state.should_record_tensor
    gate.fill_(False)
    layer.forward(*inputs(40, seed=1))
    layer.forward(*inputs(9, seed=2))
    assert torch.equal(layer.load, torch.zeros_like(layer.load))
    gate.fill_(True)
    layer.forward(*inputs(23, seed=3))
    recorded_only_last = layer.expected_load([0, 0, 23])
    assert recorded_only_last.sum() == 23 * TOP_K
    assert torch.equal(layer.load, recorded_only_last)


def test_padded_rows_are_not_counted(lowering):
    f64 = torch.float64
    on, off = Layer(ON, identity_placement(8), dtype=f64), Layer(OFF, identity_placement(8), dtype=f64)
    hidden, logits = inputs(40, seed=4, dtype=f64)
    num_real = 29
    out_on, out_off = on.forward(hidden, logits, num_real=num_real), off.forward(hidden, logits, num_real=num_real)
    # Dropping padded rows shrinks each expert's batch, and a CPU GEMM may round
    # the last bit differently for another batch size: hence float64 and 1e-12.
    torch.testing.assert_close(out_on[:num_real], out_off[:num_real], rtol=1e-12, atol=1e-12)
    expected = on.expected_load([num_real])
    assert expected.sum() == num_real * TOP_K
    assert torch.equal(on.load, expected)
    if lowering == "counts":
        # Padded rows were mapped to -1, so the backend never dispatched them.
        assert torch.equal(out_on[num_real:], torch.zeros_like(out_on[num_real:]))


def test_count_path_needs_no_padding_mask_from_the_forward_context(monkeypatch, plugin_log):
    # The padded rows are the ones at or past EplbLayerState's num_unpadded_tokens,
    # as for vLLM's own recording, so no forward-context mask is needed.
    monkeypatch.setenv(MIN_TOKENS_ENV, "0")
    layer = Layer(ON, replicated_placement())
    out = layer.forward(*inputs(40, seed=4), num_real=31, padding_mask=False)
    assert torch.equal(layer.load, layer.expected_load([31]))
    assert torch.equal(out[31:], torch.zeros_like(out[31:]))  # padded rows were never dispatched
    (line,) = lowering_lines(plugin_log)
    assert "lowering=counts" in line


def test_backend_without_exact_counts_takes_the_topk_path(monkeypatch, plugin_log):
    monkeypatch.setenv(MIN_TOKENS_ENV, "0")
    layer = Layer(ON, replicated_placement())
    layer.runner.routed_experts.quant_method.moe_kernel = None  # no modular kernel, no counts
    physical = layer.route(*inputs(40, seed=6))
    reference = torch.tensor(map_to_physical_reference(layer.logical_ids[0], layer.l2p, layer.replicas))
    assert torch.equal(physical.reshape(-1).to(torch.int64), reference)
    assert torch.equal(layer.load, layer.expected_load([40]))
    (line,) = lowering_lines(plugin_log)
    assert "lowering=topk backend=none" in line


def test_count_path_records_in_prepare_and_survives_a_bypassed_prepare(monkeypatch, plugin_log):
    monkeypatch.setenv(MIN_TOKENS_ENV, "0")
    layer = Layer(ON, replicated_placement())
    # The count path maps, and records nothing until a prepare runs.
    physical = layer.route(*inputs(40, seed=7))
    reference = torch.tensor(map_to_physical_reference(layer.logical_ids[0], layer.l2p, layer.replicas))
    assert torch.equal(physical.reshape(-1).to(torch.int64), reference)
    assert torch.equal(layer.load, torch.zeros_like(layer.load))
    # The next forward notices, warns, and keeps the layer on the topk path.
    layer.forward(*inputs(25, seed=8))
    assert torch.equal(layer.load, layer.expected_load([0, 25]))
    messages = lowering_lines(plugin_log)
    assert "lowering=counts" in messages[0]
    assert "never reached the modular kernel's prepare" in messages[1]
    assert "lowering=topk" in messages[2]


def test_exact_count_capability_per_backend():
    assert not MoEPrepareAndFinalizeNoDPEPModular().supports_exact_expert_num_tokens()
    assert FusedMoEPrepareAndFinalize.supports_exact_expert_num_tokens is backends.never
    assert BatchedPrepareAndFinalize(8, 4, 1, 0).supports_exact_expert_num_tokens()
    # vLLM 0.33.0 dispatches DeepEP HT with expert_alignment=1 (read from its
    # source, which needs no deep_ep).
    assert vllm_surface.deepep_ht_expert_alignment() == 1


def test_only_backends_with_per_expert_counts_claim_them():
    """Every prepare/finalize class of the installed vLLM: only the four whose
    ``expert_num_tokens`` is exact per local expert may take the count path.
    MoRI (v1, and vLLM 0.34.0's EPv2) puts one total per rank there, and EPv2
    sends padding rows to local experts."""
    import importlib
    import inspect
    import pkgutil

    import vllm.model_executor.layers.fused_moe.prepare_finalize as package

    claiming = set()
    for module_info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        except ImportError:  # an optional dependency (deep_ep, nixl_ep, mori) is absent
            continue
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, FusedMoEPrepareAndFinalize) and cls.__module__ == module.__name__:
                if getattr(cls, backends.CAPABILITY) is not backends.never:
                    claiming.add((module_info.name, name))
    assert claiming <= set(backends.EXACT_COUNT_BACKENDS)
    assert ("batched", "BatchedPrepareAndFinalize") in claiming
    if vllm_surface.vllm_version().startswith("0.34"):
        from vllm.model_executor.layers.fused_moe.prepare_finalize.mori_epv2 import MoriEPv2PrepareAndFinalize

        assert MoriEPv2PrepareAndFinalize.supports_exact_expert_num_tokens is backends.never


def test_a_layer_that_maps_in_its_own_kernel_is_named_and_said_once(plugin_log):
    """MegaMoE layers are not MoERunners: the op cannot replace their mapping
    (they map and record themselves), the plugin says so once per layer, and
    the recorder still names them (they have a prefix, no layer_name)."""
    import types

    from eplb_compile.vllm_plugin import eplb_step_hook

    runner = Layer(ON, replicated_placement())
    mega = torch.nn.Module()
    mega.prefix = "model.layers.7.mlp.experts"
    model = types.SimpleNamespace(moe_layers=[runner.runner, mega], num_logical_experts=8, num_physical_experts=12)
    model_state = types.SimpleNamespace(model=model, model_name="m")
    assert vllm_surface.model_description(model_state)[1] == ["model.layers.3.mlp.experts", mega.prefix]
    assert vllm_surface.self_recording_layers(model_state) == [mega.prefix]
    with set_current_vllm_config(runner.config):
        eplb_step_hook._say_which_layers_record_themselves(model_state)
        eplb_step_hook._say_which_layers_record_themselves(model_state)
    lines = [r.getMessage() for r in plugin_log if "own kernel" in r.getMessage()]
    assert len(lines) == 1 and mega.prefix in lines[0], lines


def test_register_and_attach_are_reentrant():
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    hook, capability = MoERunner.__init__, BatchedPrepareAndFinalize.supports_exact_expert_num_tokens
    vllm_plugin.register()
    vllm_plugin.register()
    assert MoERunner.__init__ is hook
    assert BatchedPrepareAndFinalize.supports_exact_expert_num_tokens is capability
    layer = Layer(ON, replicated_placement())
    op, mapping = layer.router.eplb_load_update, layer.router._apply_eplb_mapping
    from eplb_compile.vllm_plugin.load_update import attach

    attach(layer.runner)
    assert layer.router.eplb_load_update is op and layer.router._apply_eplb_mapping == mapping


def test_each_ep_rank_records_its_own_slice():
    """Two real EP ranks (gloo): the count path adds at start = ep_rank * num_local."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "ep_rank_worker.py")
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    procs = [
        subprocess.Popen([sys.executable, worker, str(rank), str(port)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    ranks = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        ranks.append(json.loads(stdout.strip().splitlines()[-1]))

    l2p, replicas = replicated_placement()
    ids = torch.tensor(ranks[0]["counts"]["logical_ids"])
    physical = torch.tensor(map_to_physical_reference(ids, l2p, replicas))
    expected = torch.bincount(physical[physical >= 0], minlength=12).to(torch.int32)
    assert expected.sum() == 40 * TOP_K
    for rank, result in enumerate(ranks):
        assert (result["ep_rank"], result["ep_size"], result["num_local"]) == (rank, 2, 6)
        for lowering in ("counts", "topk"):
            assert result[lowering]["logical_ids"] == ranks[0]["counts"]["logical_ids"]  # tokens replicated
        # topk: every rank counts its own tokens (here all of them) on all experts.
        assert torch.equal(torch.tensor(result["topk"]["load"], dtype=torch.int32), expected)
        # counts: every rank adds what its own experts received, at its offset.
        own = torch.zeros(12, dtype=torch.int32)
        own[rank * 6 : rank * 6 + 6] = expected[rank * 6 : rank * 6 + 6]
        assert torch.equal(torch.tensor(result["counts"]["load"], dtype=torch.int32), own)
        assert result["counts"]["output"] == result["topk"]["output"]
    assert ranks[0]["counts"]["output"] == ranks[1]["counts"]["output"]  # all-reduced


def test_unsupported_vllm_release_stays_stock_with_one_log_line():
    """On a vLLM whose internals were not checked, register() installs nothing and says so once."""
    script = textwrap.dedent(
        """
        import json, logging, vllm
        vllm.__version__ = "0.99.0"  # a release that does not exist, so never checked against
        records = []
        handler = logging.Handler(); handler.emit = records.append
        logger = logging.getLogger("vllm.eplb_compile.vllm_plugin")
        logger.addHandler(handler); logger.setLevel(logging.INFO)
        from eplb_compile.vllm_plugin import register
        register(); register()
        from vllm.model_executor.custom_op import op_registry
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEPrepareAndFinalize
        print(json.dumps({
            "op_registered": "eplb_load_update" in op_registry,
            "init_hooked": getattr(MoERunner.__init__, "__eplb_compile__", False),
            "capability": hasattr(FusedMoEPrepareAndFinalize, "supports_exact_expert_num_tokens"),
            "lines": [r.getMessage() for r in records],
        }))
        """
    )
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_PLUGINS="")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["op_registered"] is False and result["init_hooked"] is False and result["capability"] is False
    assert result["lines"] == [
        "eplb_load_update: vLLM 0.99.0 is not supported (supported: 0.32.0, 0.33.0, 0.34.0); "
        "eplb_compile leaves vLLM stock"
    ]
