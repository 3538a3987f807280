"""vLLM starts on a placement computed from a recording, in vLLM's own EPLB loop on 2 gloo ranks (CPU).

Run 1 records a skewed workload (``eplb_loop_worker.step_inputs``: experts 4
and 5 hot in steps 0-4, which the linear start puts on rank 0 alone) with online
rebalancing off, so every pass is routed by the linear map. ``place``
computes a placement from it. Run 2 starts on that placement
(``additional_config["eplb_compile"]["initial_placement"]``), again with
online rebalancing off, and serves the same workload. Checked: maps and
expert weights on every rank follow the placement bit for bit from the first
step; every pass is what the router's logical ids give under the placement;
the recorded logical load is the same as run 1's; a slot of an expert with
one replica carries exactly its predicted load, and the measured imbalance
is the predicted one within 0.5 % (vLLM splits a replicated expert's tokens
over its replicas by batch position, which a recording does not keep: even
in expectation, so the test serves 2048-token batches); outputs
equal stock vLLM's (op off, linear start).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

import eplb_loop_worker as w  # noqa: E402
from test_eplb_loop import NUM_PHYSICAL, expected_pass, run_ranks  # noqa: E402

from eplb_compile import metrics  # noqa: E402
from eplb_compile.placement import (StepRange, compute_placement, logical_load, predicted_physical_load,  # noqa: E402
                                    selected_rows, to_json, torch_steps)
from eplb_compile.recording import read_recording  # noqa: E402

STEPS = 5  # experts 4 and 5 hot throughout
# Tokens per forward. vLLM sends token t of a batch to replica hash(t) mod replicas, so a replicated
# expert's load splits evenly over its replicas only in expectation: with 24 tokens a forward the
# measured max/mean was 1.069 / 1.063 where the even split predicts 1.009 / 1.000; the gap shrinks
# like 1 / sqrt(assignments per replica).
TOKENS = 2048


def options(record_dir, **section) -> str:
    section = {"record_dir": str(record_dir), "flush_every_steps": 2, "online_rebalancing": False, **section}
    return json.dumps({"record": True, "steps": STEPS, "weights_before_add_model": True, "hot_offset": 4, "tokens": TOKENS,
                       "additional_config": {"eplb_compile": section}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("initial_placement")
    first, _ = run_ranks(base, options(base / "rec1"))
    recording = read_recording(str(base / "rec1"))
    placement = compute_placement(recording)
    path = base / "placement.json"
    path.write_text(to_json(placement))
    second, logs = run_ranks(base, options(base / "rec2", initial_placement=str(path)))
    return {"base": base, "first": first, "second": second, "placement": placement, "logs": logs,
            "recording1": recording, "recording2": read_recording(str(base / "rec2"))}


def test_run_one_kept_the_linear_map_and_was_skewed(runs):
    linear = (torch.arange(NUM_PHYSICAL) % w.NUM_LOGICAL).expand(w.NUM_LAYERS, -1)
    for result in runs["first"]:
        for step in result["steps"]:  # online rebalancing off: the step at the interval moved nothing
            assert torch.equal(step["physical_to_logical_after"], linear)
    model = runs["placement"]["models"][0]
    print(f"recorded max/mean {model['recorded_max_over_mean']}, predicted {model['predicted_max_over_mean']}")
    assert min(model["recorded_max_over_mean"]) > 1.2
    assert max(model["predicted_max_over_mean"]) < min(model["recorded_max_over_mean"])


def test_maps_and_weights_follow_the_placement_from_the_first_step(runs):
    table = torch.tensor(runs["placement"]["models"][0]["physical_to_logical"])
    assert not torch.equal(table, runs["first"][0]["initial_map"])  # something had to move
    for result in runs["second"]:
        assert torch.equal(result["initial_map"], table)
        start, num_local = result["ep_rank"] * result["num_local"], result["num_local"]
        for step in result["steps"]:
            assert torch.equal(step["physical_to_logical"], table)
            assert torch.equal(step["physical_to_logical_after"], table)
            for layer in range(w.NUM_LAYERS):
                w13, w2 = w.logical_weights(layer, step["w13"][layer].shape[1:], step["w2"][layer].shape[1:])
                local = table[layer, start : start + num_local]
                assert torch.equal(step["w13"][layer], w13[local])
                assert torch.equal(step["w2"][layer], w2[local])


def test_every_pass_is_counted_under_the_placement(runs):
    for result in runs["second"]:
        for index, step in enumerate(result["steps"]):
            expected = expected_pass(step, result["ep_rank"], result["num_local"])
            if not step["gate"]:
                expected = torch.zeros_like(expected)
            assert torch.equal(step["pass_before_step"], expected), f"rank {result['ep_rank']} step {index}"


def test_measured_load_is_the_predicted_one(runs):
    (_, steps1), (_, steps2) = runs["recording1"].models[0], runs["recording2"].models[0]
    steps1, steps2 = torch_steps(steps1), torch_steps(steps2)
    assert steps1.steps == steps2.steps and len(steps2.steps) >= 2
    rows = selected_rows(steps2, StepRange())
    logical = logical_load(steps1, rows, w.NUM_LOGICAL)
    assert torch.equal(logical_load(steps2, rows, w.NUM_LOGICAL), logical)  # the same workload
    table = torch.tensor(runs["placement"]["models"][0]["physical_to_logical"])
    measured = steps2.load.sum(dim=0)
    predicted = predicted_physical_load(logical, table)
    # An expert with one slot carries exactly its recorded load there, as predicted.
    single = torch.stack([torch.bincount(row, minlength=w.NUM_LOGICAL)[row] == 1 for row in table])
    assert single.any() and torch.equal(measured[single].double(), predicted[single])
    # A replicated expert's slots share its load; how they share it depends on where its tokens sit
    # in the batch (vLLM picks a replica by position), which a recording does not keep. At TOKENS
    # a forward the split is even to within a few assignments in a thousand: the imbalance is the
    # predicted one within 0.5 % (measured 1.0003 / 1.0002 against 1.0016 / 1.0025 predicted).
    measured_ratio = metrics.imbalance_max_over_mean(measured, 2)
    model = runs["placement"]["models"][0]
    predicted_ratio = torch.tensor(model["predicted_max_over_mean"], dtype=torch.float64)
    print(f"max/mean per layer: recorded {model['recorded_max_over_mean']}, predicted {predicted_ratio.tolist()}, "
          f"measured on the placement {measured_ratio.tolist()}")
    assert (measured_ratio < torch.tensor(model["recorded_max_over_mean"], dtype=torch.float64)).all()
    torch.testing.assert_close(measured_ratio, predicted_ratio, rtol=0.005, atol=0)


def test_outputs_equal_stock_vllm(runs):
    for result in runs["second"]:
        for index, step in enumerate(result["steps"]):
            torch.testing.assert_close(step["output_on"], step["output_off"], rtol=1e-12, atol=1e-12,
                                       msg=f"rank {result['ep_rank']} step {index}")


def test_a_placement_for_another_ep_size_stops_the_start_up_on_every_rank(runs):
    import os
    import subprocess
    import sys

    from test_eplb_loop import free_port

    base = runs["base"]
    wrong = compute_placement(runs["recording1"], ep_size=4)  # 12 slots split over 4 ranks: a valid file
    path = base / "placement_ep4.json"
    path.write_text(to_json(wrong))
    port, worker = free_port(), os.path.join(os.path.dirname(__file__), "eplb_loop_worker.py")
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    procs = [subprocess.Popen([sys.executable, worker, str(rank), str(port), str(base / f"bad{rank}.pt"),
                               options(base / "rec_bad", initial_placement=str(path))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode != 0
        assert ("ValueError: additional_config['eplb_compile']['initial_placement'] does not fit model "
                "'eplb-loop-test-model': the placement is for EP size 4, this server's is 2") in stderr
    assert not (base / "bad0.pt").exists() and not (base / "rec_bad").exists()  # nothing ran, nothing recorded
