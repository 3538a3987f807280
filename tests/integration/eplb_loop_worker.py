"""One EP rank of vLLM 0.33.0's EPLB loop on CPU (gloo), for ``test_eplb_loop.py``.

Run as ``python eplb_loop_worker.py RANK PORT OUT_FILE [OPTIONS_JSON]``. vLLM's
parallel state makes this rank EP rank RANK of 2 (tensor parallel 2 with
expert parallel, tokens replicated). A two-layer model of vLLM ``MoERunner``
layers (8 logical experts, 4 redundant, 12 physical, 6 per rank) is given to
vLLM's real ``EplbState``, which steps after every forward: load pass into
the window, all-reduce, rebalance, weight transfer over gloo, new maps. The
plugin (op on) maps and records; the lowering alternates between the count
and topk paths step by step. The same inputs also go through a second copy of
the model with the op off and EPLB's initial placement, which maps each
logical expert to the slot of the same number, the one placement that
stock vLLM (which does not map on CPU) routes right.

Everything the test checks is saved with ``torch.save`` to OUT_FILE: per
step, the gate, the logical ids, the pass before the step, the window and
maps after it, the local expert weights, and both outputs.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

NUM_LOGICAL, NUM_REDUNDANT, NUM_LAYERS, TOP_K = 8, 4, 2, 3
HIDDEN, INTERMEDIATE, MAX_TOKENS, NUM_TOKENS = 32, 48, 64, 24
WINDOW_SIZE, STEP_INTERVAL, STEPS = 3, 5, 12
DTYPE = torch.float64  # sums of replicas' partial outputs round in another order
MODEL_NAME = "eplb-loop-test-model"


def logical_weights(layer: int, w13_shape, w2_shape):
    """Every logical expert's weights for one layer, the same on every rank."""
    generator = torch.Generator().manual_seed(100 + layer)
    w13 = torch.randn((NUM_LOGICAL, *w13_shape), generator=generator, dtype=DTYPE) * 0.2
    w2 = torch.randn((NUM_LOGICAL, *w2_shape), generator=generator, dtype=DTYPE) * 0.2
    return w13, w2


def step_inputs(step: int, hot_offset: int = 0):
    """One forward's tokens, the same on every rank; the hot experts move with the step
    so that every rearrangement has a new load to balance (``hot_offset`` shifts them)."""
    generator = torch.Generator().manual_seed(step)
    hidden = torch.randn((NUM_TOKENS, HIDDEN), generator=generator, dtype=DTYPE)
    logits = torch.randn((NUM_LAYERS, NUM_TOKENS, NUM_LOGICAL), generator=generator, dtype=DTYPE)
    hot = torch.tensor([(step // STEP_INTERVAL + k + hot_offset) % NUM_LOGICAL for k in range(2)])
    logits[..., hot] += 2.5
    return hidden, logits


def build_model(config, prefix_offset: int = 0):
    """A vLLM ``MixtureOfExperts`` of ``NUM_LAYERS`` EPLB ``MoERunner`` layers."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
    from vllm.model_executor.models.interfaces import MixtureOfExperts

    import vllm_layers as t

    class TinyMoEModel(torch.nn.Module, MixtureOfExperts):
        def __init__(self):
            super().__init__()
            with set_current_vllm_config(config):
                self.layers = torch.nn.ModuleList(
                    FusedMoEFactory(
                        num_experts=NUM_LOGICAL, top_k=TOP_K, hidden_size=HIDDEN,
                        intermediate_size=INTERMEDIATE, params_dtype=DTYPE, enable_eplb=True,
                        num_redundant_experts=NUM_REDUNDANT, dp_size=1, pcp_size=1,
                        prefix=f"model.layers.{layer}.mlp.experts",
                    )
                    for layer in range(NUM_LAYERS)
                )
            self.moe_layers = list(self.layers)
            self.num_moe_layers = NUM_LAYERS
            self.num_expert_groups = 1
            self.num_logical_experts = self.num_routed_experts = NUM_LOGICAL
            self.num_redundant_experts = NUM_REDUNDANT
            self.num_physical_experts = NUM_LOGICAL + NUM_REDUNDANT
            self.num_local_physical_experts = self.layers[0].moe_config.num_local_experts
            self.num_shared_experts = 0
            self.expert_weights = []

    model = TinyMoEModel()
    for layer, runner in enumerate(model.layers):
        t.install_batched_kernel(runner)
    return model


def fill_weights(model, physical_to_logical: torch.Tensor, ep_rank: int) -> None:
    num_local = model.num_local_physical_experts
    for layer, runner in enumerate(model.layers):
        experts = runner.routed_experts
        w13, w2 = logical_weights(layer, experts.w13_weight.shape[1:], experts.w2_weight.shape[1:])
        local = physical_to_logical[layer, ep_rank * num_local : (ep_rank + 1) * num_local]
        with torch.no_grad():
            experts.w13_weight.copy_(w13[local])
            experts.w2_weight.copy_(w2[local])


class _ModelConfig:
    """What ``EplbState.add_model`` reads of a ``ModelConfig``: its name and hash
    (a real one needs a Hugging Face model to load). vLLM 0.33.0 keys its model
    states by ``compute_hash()``; 0.34.0 by ``hash_config_cached``, which
    hashes ``compile_factors()`` (``distributed/eplb/eplb_state.py:545``)."""

    model = MODEL_NAME

    def compute_hash(self) -> str:
        return MODEL_NAME

    def compile_factors(self) -> dict:
        return {"model": MODEL_NAME}


def forward(model, config, hidden, logits):
    from vllm.forward_context import set_forward_context

    out = hidden
    with set_forward_context(None, config, is_padding=torch.zeros(NUM_TOKENS, dtype=torch.bool)):
        for layer, runner in enumerate(model.layers):
            out = runner.forward(out.clone(), logits[layer].clone())
    return out


def finish_recording(state, hold_metrics: str | None = None) -> dict:
    """Scrape this rank's metrics endpoint (while the server runs), then flush and stop.

    ``hold_metrics``: a path; write ``{path}.rank{r}.ready`` once every pass is
    in the exporter, then keep serving until ``path`` exists (a Prometheus of
    the test scrapes meanwhile)."""
    import time
    import urllib.request

    from eplb_compile.vllm_plugin import eplb_step_hook

    recorder = eplb_step_hook.recorder_of(state)
    recorder.wait_idle()
    if hold_metrics:
        with open(f"{hold_metrics}.rank{recorder.ep_rank}.ready", "w") as ready:
            ready.write(str(time.time()))
        deadline = time.monotonic() + 180
        while not os.path.exists(hold_metrics) and time.monotonic() < deadline:
            time.sleep(0.1)
    scraped = None
    if recorder.exporter is not None:
        with urllib.request.urlopen(f"http://127.0.0.1:{recorder.exporter.port}/metrics", timeout=30) as reply:
            scraped = reply.read().decode()
        recorder.exporter.close()
    recorder.close()
    return {"scraped": scraped, "dropped": recorder.dropped}


def main(rank: int, port: int, out_file: str, options: dict) -> None:
    from conftest import install_cpu_stand_ins

    import vllm_test_patches

    remove_stand_ins = install_cpu_stand_ins()  # keep: dropping it unregisters the kernel
    vllm_test_patches.install()
    from vllm.config import CompilationConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.plugins import load_general_plugins

    import vllm_layers as t
    from eplb_compile.selection import MIN_TOKENS_ENV

    global NUM_TOKENS  # tokens per forward: the placement test serves large batches (see there)
    NUM_TOKENS = options.get("tokens", NUM_TOKENS)
    t.MAX_TOKENS = max(t.MAX_TOKENS, NUM_TOKENS)

    load_general_plugins()
    if options.get("record"):
        from eplb_compile.vllm_plugin import eplb_step_hook

        eplb_step_hook.install()
    config_on, config_off = (
        vllm_test_patches.vllm_config_with_eplb(
            tp_size=2, window_size=WINDOW_SIZE, step_interval=STEP_INTERVAL,
            compilation_config=CompilationConfig(custom_ops=custom_ops), additional_config=additional_config,
        )
        for custom_ops, additional_config in [(t.ON, options.get("additional_config", {})), (t.OFF, {})]
    )
    parallel = config_on.parallel_config
    # vLLM's CPU build names its shared-memory group after this (device_communicators/
    # cpu_communicator.py:238; its CPU worker sets it, v1/worker/cpu_worker.py:148-152).
    # A name of each rank's own makes it all-reduce through torch.distributed (gloo),
    # as it does when ranks do not share one (:34-50): its shared-memory all-reduce
    # has no float64, which this test runs in.
    os.environ.setdefault("VLLM_DIST_IDENT", f"eplb-test-{port}-rank{rank}")
    with set_current_vllm_config(config_on):
        init_distributed_environment(world_size=2, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=2)
    model_on, model_off = build_model(config_on), build_model(config_off)
    ep_rank = model_on.layers[0].moe_config.moe_parallel_config.ep_rank

    linear_map = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(NUM_LOGICAL, NUM_REDUNDANT))
    linear_map = linear_map.expand(NUM_LAYERS, -1).clone()
    if options.get("weights_before_add_model"):  # as vLLM loads them: before add_model, in the linear order
        fill_weights(model_on, linear_map, ep_rank)
    with set_current_vllm_config(config_on):
        state = EplbState(parallel, torch.device("cpu"))
        state.add_model(model_on, _ModelConfig())
    (model_state,) = state.model_states.values()
    if not options.get("weights_before_add_model"):
        fill_weights(model_on, model_state.physical_to_logical_map, ep_rank)
    initial_map = model_state.physical_to_logical_map.clone()
    fill_weights(model_off, linear_map, ep_rank)
    identity = torch.arange(NUM_LOGICAL).expand(NUM_LAYERS, -1).unsqueeze(-1)
    for layer, runner in enumerate(model_off.layers):  # stock vLLM, static initial placement
        runner.set_eplb_state(layer, torch.zeros((NUM_LAYERS, 12), dtype=torch.int32), identity,
                              torch.ones((NUM_LAYERS, NUM_LOGICAL), dtype=torch.int64))
        runner.router.eplb_state.should_record_tensor = torch.zeros((), dtype=torch.bool)
        runner.router.eplb_state.num_unpadded_tokens_tensors = [torch.tensor(NUM_TOKENS, dtype=torch.int32)]

    logical_ids: list[list[torch.Tensor]] = [[] for _ in range(NUM_LAYERS)]
    for layer, runner in enumerate(model_on.layers):
        runner.router.set_capture_fn(lambda ids, layer=layer: logical_ids[layer].append(ids.clone()))

    steps = []
    for step in range(options.get("steps", STEPS)):
        lowering = "counts" if step % 2 == 0 else "topk"
        os.environ[MIN_TOKENS_ENV] = "0" if lowering == "counts" else str(10**9)
        hidden, logits = step_inputs(step, options.get("hot_offset", 0))
        if step == options.get("remap_before_step"):
            # A map rewritten between steps, as elastic EP's and fault recovery's
            # are: vLLM's update_mapping, physical slots 0 and the last swapped.
            new_map = model_state.physical_to_logical_map_buffer.clone()
            new_map[:, [0, -1]] = new_map[:, [-1, 0]]
            state.update_mapping(_ModelConfig(), new_map)
        record = {
            "lowering": lowering,
            "gate": bool(state.should_record_tensor),
            "physical_to_logical": model_state.physical_to_logical_map.clone(),
            "logical_to_physical": model_state.logical_to_physical_map.clone(),
            "replica_count": model_state.logical_replica_count.clone(),
        }
        state.prepare_forward(_ModelConfig(), NUM_TOKENS)
        with set_current_vllm_config(config_on):
            record["output_on"] = forward(model_on, config_on, hidden, logits)
        with set_current_vllm_config(config_off):
            record["output_off"] = forward(model_off, config_off, hidden, logits)
        record["logical_ids"] = [ids.pop() for ids in logical_ids]
        record["pass_before_step"] = model_state.expert_load_pass.clone()
        record["window_step_before"] = state.expert_load_window_step
        with set_current_vllm_config(config_on):
            state.step()
        record["window"] = model_state.expert_load_window.clone()
        record["physical_to_logical_after"] = model_state.physical_to_logical_map.clone()
        record["w13"] = [runner.routed_experts.w13_weight.detach().clone() for runner in model_on.layers]
        record["w2"] = [runner.routed_experts.w2_weight.detach().clone() for runner in model_on.layers]
        steps.append(record)

    stock_off_recorded = [runner.router.eplb_state.expert_load_view.clone() for runner in model_off.layers]
    result = {"ep_rank": ep_rank, "num_local": model_on.num_local_physical_experts, "steps": steps,
              "initial_map": initial_map, "stock_off_recorded": stock_off_recorded}
    if options.get("record"):
        result.update(finish_recording(state, options.get("hold_metrics")))
    torch.save(result, out_file)
    remove_stand_ins()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
