"""One ``vllm.LLM`` run on CPU with EPLB and the plugin, for ``test_engine.py``.

Run as ``python engine_run.py OPTIONS_JSON OUT_JSON``. It writes a tiny
random-weight Qwen3-MoE, serves greedy requests with vLLM's engine (tensor
parallel 2 with expert parallelism and EPLB, vLLM's CPU build), and saves
what the test checks to OUT_JSON: the generated token ids, and per EP rank
(read with ``collective_rpc`` from :class:`EngineTestWorker`) every pass that
went into vLLM's load window with its token count, the window, the maps, the
rearrangements, whether the local expert weights follow the maps, and which
layers the plugin's op replaced.

:class:`EngineTestWorker` is vLLM's ``worker_extension_cls``: vLLM imports
this module in every spawned worker before it builds the model, which also
installs the test-only patches of ``vllm_test_patches.py`` there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import vllm_test_patches  # noqa: E402

vllm_test_patches.install_engine_patches()

NUM_LAYERS, NUM_EXPERTS, TOP_K, NUM_REDUNDANT = 2, 8, 2, 2
VOCAB = 512


def write_model(folder: str) -> None:
    """A Qwen3-MoE with random weights and a skewed router, saved with ``transformers``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:  # a few hot experts, so that EPLB has something to move
            layer.mlp.gate.weight[:3] += 0.5 * layer.mlp.gate.weight[:3].sign()
    model.save_pretrained(folder, safe_serialization=True)


def prompts(round_: int) -> list[dict]:
    generator = torch.Generator().manual_seed(round_)
    return [{"prompt_token_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()}
            for n in (5, 9, 13, 3)]


class EngineTestWorker:
    """Methods vLLM mixes into its worker, for ``collective_rpc``."""

    def eplb_test_install_probe(self) -> dict:
        """Wrap this rank's ``EplbState`` to keep what the test checks; return
        the start-up placement's local expert weights, by logical expert."""
        state = self.model_runner.eplb_state
        state.test_passes, state.test_rearrangements = [], 0
        stock_step, stock_rearrange = state.step, state.rearrange

        def step(is_dummy=False, is_profile=False, log_stats=False):
            if not is_dummy and not is_profile and state._should_record_current_step(log_stats=log_stats):
                model_state = next(iter(state.model_states.values()))
                tokens = int(model_state.num_unpadded_tokens_tensors[0])
                state.test_passes.append((tokens, model_state.expert_load_pass.tolist()))
            return stock_step(is_dummy, is_profile, log_stats)

        def rearrange(*args, **kwargs):
            if not kwargs.get("is_profile", False):
                state.test_rearrangements += 1
            return stock_rearrange(*args, **kwargs)

        state.step, state.rearrange = step, rearrange
        return self._local_experts()

    def eplb_test_snapshot(self) -> dict:
        from eplb_compile.vllm_plugin import eplb_step_hook

        state = self.model_runner.eplb_state
        recorder = eplb_step_hook.recorder_of(state)
        if recorder is not None:
            recorder.close()  # flushes what it holds
        model_state = next(iter(state.model_states.values()))
        return {
            **self._local_experts(),
            "passes": state.test_passes,
            "rearrangements": state.test_rearrangements,
            "window": model_state.expert_load_window.tolist(),
            "window_size": state.expert_load_window_size,
            "op_replaced_router": ["_apply_eplb_mapping" in vars(layer.router) for layer in model_state.model.moe_layers],
        }

    def _local_experts(self) -> dict:
        """This rank's map and, per layer, a digest of each local expert's
        weights as vLLM holds them (its CPU kernels may repack the checkpoint's)."""
        model_state = next(iter(self.model_runner.eplb_state.model_states.values()))
        digests = []
        for layer in model_state.model.moe_layers:
            experts = layer.routed_experts
            digests.append([
                hashlib.sha256(experts.w13_weight[slot].contiguous().numpy().tobytes()
                               + experts.w2_weight[slot].contiguous().numpy().tobytes()).hexdigest()
                for slot in range(layer.moe_config.num_local_experts)
            ])
        layer = model_state.model.moe_layers[0]
        return {"ep_rank": layer.moe_config.moe_parallel_config.ep_rank,
                "num_local": layer.moe_config.num_local_experts,
                "maps": model_state.physical_to_logical_map.tolist(), "digests": digests}


def main(options: dict, out_file: str) -> None:
    from vllm import LLM, SamplingParams

    model_dir = options["model_dir"]
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        write_model(model_dir)
    eplb_config = {"window_size": 4, "step_interval": options.get("step_interval", 6),
                   "num_redundant_experts": NUM_REDUNDANT, "use_async": False, "communicator": "torch_gloo"}
    additional = {"eplb_compile": options["eplb_compile"]} if options.get("eplb_compile") else {}
    llm = LLM(
        model=model_dir, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=256,
        tensor_parallel_size=2, enable_expert_parallel=True, enable_eplb=True, eplb_config=eplb_config,
        enforce_eager=options["eager"], additional_config=additional,
        compilation_config={"custom_ops": ["+eplb_load_update" if options["op"] else "-eplb_load_update"]},
        worker_extension_cls="engine_run.EngineTestWorker", max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,  # else each worker reserves a share of the host memory
    )
    start_up = llm.collective_rpc("eplb_test_install_probe")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    tokens = []
    for round_ in range(options.get("rounds", 4)):
        outputs = llm.generate(prompts(round_), params, use_tqdm=False)
        tokens.append([list(output.outputs[0].token_ids) for output in outputs])
    ranks = llm.collective_rpc("eplb_test_snapshot")
    with open(out_file, "w") as f:
        json.dump({"tokens": tokens, "start_up": start_up, "ranks": ranks}, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
