"""One rank of a 2-rank expert-parallel MoE layer on CPU (gloo), for the tests.

Run by ``test_vllm_plugin.test_each_ep_rank_records_its_own_slice`` as
``python ep_rank_worker.py RANK PORT``. vLLM's own parallel state makes this
rank EP rank RANK of 2 (tensor parallel 2 with expert parallel, tokens
replicated); the layer holds experts ``[RANK * 6, RANK * 6 + 6)`` of 12 and
vLLM all-reduces its output. Prints one JSON line: per lowering, this rank's
load row, its output and the logical ids the router chose.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import install_cpu_stand_ins  # noqa: E402


def main(rank: int, port: int) -> None:
    remove_stand_ins = install_cpu_stand_ins()  # keep: dropping it unregisters the kernel
    from vllm.config import ParallelConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    from vllm.config import CompilationConfig, VllmConfig
    from vllm.plugins import load_general_plugins

    import vllm_layers as t
    from eplb_compile.selection import MIN_TOKENS_ENV

    load_general_plugins()
    config = VllmConfig(
        compilation_config=CompilationConfig(custom_ops=t.ON),
        parallel_config=ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True),
    )
    l2p, replicas = t.replicated_placement()
    # vLLM's CPU build names its shared-memory group after this (device_communicators/
    # cpu_communicator.py:238; its CPU worker sets it, v1/worker/cpu_worker.py:148-152).
    # A name of each rank's own makes it all-reduce through torch.distributed (gloo),
    # as it does when ranks do not share one (:34-50): its shared-memory all-reduce
    # has no float64, which this test runs in.
    os.environ.setdefault("VLLM_DIST_IDENT", f"eplb-test-{port}-rank{rank}")
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=2, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )
        initialize_model_parallel(tensor_model_parallel_size=2)
        runner = FusedMoEFactory(
            num_experts=8, top_k=t.TOP_K, hidden_size=t.HIDDEN, intermediate_size=t.INTERMEDIATE,
            params_dtype=torch.float32, enable_eplb=True, num_redundant_experts=4,
            dp_size=1, pcp_size=1, prefix="model.layers.3.mlp.experts",
        )
    parallel = runner.moe_config.moe_parallel_config
    num_local = runner.moe_config.num_local_experts
    t.fill_expert_weights(runner.routed_experts, l2p, first_physical=parallel.ep_rank * num_local,
                          dtype=torch.float32, seed=0)
    t.install_batched_kernel(runner)

    load_pass = torch.zeros((2, 12), dtype=torch.int32)
    runner.set_eplb_state(1, load_pass, l2p.expand(2, -1, -1), replicas.expand(2, -1))
    state = runner.router.eplb_state
    state.should_record_tensor = torch.ones((), dtype=torch.bool)
    state.num_unpadded_tokens_tensors = [torch.tensor(40, dtype=torch.int32)]
    logical_ids: list[torch.Tensor] = []
    runner.router.set_capture_fn(lambda ids: logical_ids.append(ids.clone()))

    hidden, logits = t.inputs(40, seed=3)
    result = {"ep_rank": parallel.ep_rank, "ep_size": parallel.ep_size, "num_local": num_local}
    for lowering, min_tokens in [("counts", "0"), ("topk", str(10**9))]:
        os.environ[MIN_TOKENS_ENV] = min_tokens
        load_pass.zero_()
        logical_ids.clear()
        with set_current_vllm_config(config), set_forward_context(
            None, config, is_padding=torch.zeros(40, dtype=torch.bool)
        ):
            out = runner.forward(hidden.clone(), logits.clone())
        result[lowering] = {
            "load": load_pass[1].tolist(),
            "output": out.tolist(),
            "logical_ids": logical_ids[0].tolist(),
        }
    print(json.dumps(result))
    remove_stand_ins()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
