"""vLLM 0.33.0's own EPLB loop with the plugin recording, on 2 gloo ranks (CPU).

Each rank (``eplb_loop_worker.py``) runs forwards through vLLM ``MoERunner``
layers and then vLLM's real ``EplbState.step``: pass into the window,
all-reduce, rebalance with vLLM's default policy, expert weights moved over
gloo, new maps committed. Checked here, against counts computed from the
router's logical ids and the maps alone: the window after every step, the
maps and weights after every rearrangement, and the outputs against stock
vLLM with the op off. The only vLLM code replaced is listed in
``vllm_test_patches.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

import eplb_loop_worker as w  # noqa: E402

from eplb_compile.reference import map_to_physical_reference  # noqa: E402

NUM_PHYSICAL = w.NUM_LOGICAL + w.NUM_REDUNDANT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(tmp_path, options: str = "{}", world_size: int = 2) -> tuple[list[dict], list[str]]:
    """Run the worker on every rank; each rank's saved results and its output (stdout + stderr)."""
    port, worker = free_port(), os.path.join(os.path.dirname(__file__), "eplb_loop_worker.py")
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(world_size)]
    procs = [
        subprocess.Popen([sys.executable, worker, str(rank), str(port), str(out), options], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, out in enumerate(outs)
    ]
    logs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-4000:]
        logs.append(stdout + stderr)
    return [torch.load(out) for out in outs], logs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("eplb_loop"))[0]


def logical_to_physical(physical_to_logical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's replica table from its physical->logical map, replicas in slot order."""
    slots = [(physical_to_logical == e).nonzero().flatten().tolist() for e in range(w.NUM_LOGICAL)]
    table = torch.full((w.NUM_LOGICAL, max(map(len, slots))), -1, dtype=torch.int64)
    for expert, row in enumerate(slots):
        table[expert, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return table, torch.tensor([len(row) for row in slots], dtype=torch.int64)


def expected_pass(step: dict, ep_rank: int, num_local: int, *, maps=None) -> torch.Tensor:
    """This rank's load for one forward: its tokens' logical ids mapped with
    the maps in force (or ``maps``), counted; the count path keeps only the
    experts this rank holds (what they received)."""
    maps = step["physical_to_logical"] if maps is None else maps
    load = torch.zeros((w.NUM_LAYERS, NUM_PHYSICAL), dtype=torch.int32)
    for layer, ids in enumerate(step["logical_ids"]):
        l2p, replicas = logical_to_physical(maps[layer])
        physical = torch.tensor(map_to_physical_reference(ids, l2p, replicas))
        load[layer] = torch.bincount(physical, minlength=NUM_PHYSICAL).to(torch.int32)
    if step["lowering"] == "counts":
        own = torch.zeros(NUM_PHYSICAL, dtype=torch.bool)
        own[ep_rank * num_local : (ep_rank + 1) * num_local] = True
        load[:, ~own] = 0
    return load


def map_changes(steps) -> list[int]:
    return [i for i, s in enumerate(steps) if not torch.equal(s["physical_to_logical"], s["physical_to_logical_after"])]


def test_the_layer_uses_the_replica_table_of_the_map(ranks):
    for result in ranks:
        for step in result["steps"]:
            for layer in range(w.NUM_LAYERS):
                l2p, replicas = logical_to_physical(step["physical_to_logical"][layer])
                vllm_l2p = step["logical_to_physical"][layer]
                assert torch.equal(vllm_l2p[:, : l2p.shape[1]], l2p)
                assert (vllm_l2p[:, l2p.shape[1] :] == -1).all()
                assert torch.equal(step["replica_count"][layer], replicas)


def test_window_holds_exactly_the_tokens_recorded_while_the_gate_was_on(ranks):
    for result in ranks:
        ep_rank, num_local = result["ep_rank"], result["num_local"]
        window = torch.zeros((w.WINDOW_SIZE, w.NUM_LAYERS, NUM_PHYSICAL), dtype=torch.int32)
        position, gated = 0, {"counts": 0, "topk": 0}
        for index, step in enumerate(result["steps"]):
            expected = expected_pass(step, ep_rank, num_local) if step["gate"] else torch.zeros_like(window[0])
            assert torch.equal(step["pass_before_step"], expected), f"rank {ep_rank} step {index}"
            if step["gate"]:
                assert expected.sum() > 0
                gated[step["lowering"]] += 1
                window[position] = expected
                position = (position + 1) % w.WINDOW_SIZE
            assert torch.equal(step["window"], window), f"rank {ep_rank} step {index}"
        assert min(gated.values()) >= 2, gated  # both lowerings recorded into the window
        assert 0 < sum(s["gate"] for s in result["steps"]) < len(result["steps"])  # the gate switched


def test_rearrangements_change_the_maps_on_every_rank_alike(ranks):
    changes = map_changes(ranks[0]["steps"])
    assert len(changes) >= 2, changes
    for result in ranks[1:]:
        assert map_changes(result["steps"]) == changes
        for mine, theirs in zip(result["steps"], ranks[0]["steps"], strict=True):
            assert torch.equal(mine["physical_to_logical_after"], theirs["physical_to_logical_after"])
    for index in changes:
        new_map = ranks[0]["steps"][index]["physical_to_logical_after"]
        for layer in range(w.NUM_LAYERS):  # every logical expert keeps at least one slot
            assert sorted(set(new_map[layer].tolist())) == list(range(w.NUM_LOGICAL))


def test_expert_weights_follow_the_map_after_every_step(ranks):
    for result in ranks:
        start, num_local = result["ep_rank"] * result["num_local"], result["num_local"]
        for step in result["steps"]:
            local = step["physical_to_logical_after"][:, start : start + num_local]
            for layer in range(w.NUM_LAYERS):
                w13, w2 = w.logical_weights(layer, step["w13"][layer].shape[1:], step["w2"][layer].shape[1:])
                assert torch.equal(step["w13"][layer], w13[local[layer]])
                assert torch.equal(step["w2"][layer], w2[local[layer]])
        moved = [i for i in map_changes(result["steps"])
                 if not torch.equal(result["steps"][i]["physical_to_logical"][:, start : start + num_local],
                                    result["steps"][i]["physical_to_logical_after"][:, start : start + num_local])]
        assert moved, "no rearrangement changed this rank's experts, so no weight was moved"


def test_forwards_after_a_rearrangement_record_under_the_new_maps(ranks):
    """Counted under the old maps, some gated forward after a change would differ:
    so the window test above can tell stale maps from new ones."""
    for result in ranks:
        steps, distinguished = result["steps"], 0
        for change in map_changes(steps):
            old_maps = steps[change]["physical_to_logical"]
            for step in steps[change + 1 :]:
                if step["gate"] and not torch.equal(
                    expected_pass(step, result["ep_rank"], result["num_local"], maps=old_maps),
                    expected_pass(step, result["ep_rank"], result["num_local"]),
                ):
                    distinguished += 1
        assert distinguished >= 2


def test_outputs_with_the_op_on_equal_stock_vllm_with_the_op_off(ranks):
    for result in ranks:
        for index, step in enumerate(result["steps"]):
            # Replicas split an expert's tokens over two GEMMs and the TP all-reduce
            # adds ranks' parts in another order: equal up to float64 rounding.
            torch.testing.assert_close(step["output_on"], step["output_off"], rtol=1e-12, atol=1e-12,
                                       msg=f"rank {result['ep_rank']} step {index}")
        # Stock vLLM's router on CPU neither maps nor records: only the plugin feeds EPLB here.
        for load in result["stock_off_recorded"]:
            assert torch.equal(load, torch.zeros_like(load))
    for mine, theirs in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert torch.equal(mine["output_on"], theirs["output_on"])  # all-reduced
