"""The topk and count lowerings agree on a real gloo process group (2 and 4 ranks).

Each rank routes, maps with replicas, dispatches with all_to_all_single and
records both ways (``eplb_compile.ep_simulation.run_rank``); after the EP
all-reduce the two loads must be identical, step by step and window by
window, and equal to counts computed without the operators or the dispatch.
The same code runs on NCCL in ``tests/device/nccl_equivalence.py``.
"""

from __future__ import annotations

import pytest
import torch

from eplb_compile.ep_simulation import (
    SimConfig,
    placement,
    reference_passes,
    reference_windows,
    route_step,
    run_spawned,
    verify,
)
from eplb_compile.metrics import balancedness, imbalance_max_over_mean, imbalance_trtllm
from eplb_compile.reference import map_and_record_reference

CFG = SimConfig(num_layers=3, num_logical=12, num_redundant=4, top_k=4, max_tokens=48, steps=12, window_size=4,
                gate_off_steps=(2, 3, 9))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"gloo-{n}-ranks")
def spawned(request):
    world_size = request.param
    return world_size, run_spawned(CFG, world_size)


def test_lowerings_agree_every_step(spawned):
    world_size, results = spawned
    for rank, result in enumerate(results):
        for kind in ("passes", "windows"):
            topk, counts = result[f"topk_{kind}"], result[f"counts_{kind}"]
            assert topk.shape == counts.shape == (CFG.steps, CFG.num_layers, CFG.num_physical)
            assert torch.equal(topk, counts), f"rank {rank}: {kind} differ at " \
                f"(step, layer, expert) {(topk != counts).nonzero().tolist()[:5]}"


def test_every_rank_sees_the_same_global_load(spawned):
    _, results = spawned
    for result in results[1:]:
        for key, value in result.items():
            assert torch.equal(value, results[0][key]), key


def test_loads_equal_the_reference(spawned):
    world_size, results = spawned
    expected = reference_passes(CFG, world_size)
    for result in results:
        assert torch.equal(result["counts_passes"], expected)
        assert torch.equal(result["counts_windows"], reference_windows(expected, CFG.window_size))
    # The last window holds exactly the last W steps, gated ones included as zeros.
    last = results[0]["counts_windows"][-1]
    assert torch.equal(last, expected[CFG.steps - CFG.window_size :].sum(dim=0))


def test_logical_totals_equal_unpadded_gated_tokens(spawned):
    """Summed over replicas, the load is a plain count of logical ids: no hash, no map."""
    world_size, results = spawned
    final_windows = results[0]["topk_windows"][-1]
    window_steps = range(CFG.steps - CFG.window_size, CFG.steps)
    for layer in range(CFG.num_layers):
        p = placement(CFG, layer, world_size)
        l2p, replica_count = p.logical_to_physical_map, p.logical_replica_count
        physical_to_logical = torch.full((CFG.num_physical,), -1, dtype=torch.int64)
        for expert in range(CFG.num_logical):
            physical_to_logical[l2p[expert, : replica_count[expert]]] = expert
        assert (physical_to_logical >= 0).all()
        assert torch.equal(physical_to_logical, p.physical_to_logical_map)
        expected = torch.zeros(CFG.num_logical, dtype=torch.int64)
        for step in window_steps:
            if step in CFG.gate_off_steps:
                continue
            for rank in range(world_size):
                topk_ids, num_unpadded = route_step(CFG, rank, step)
                expected += torch.bincount(topk_ids[layer, :num_unpadded].reshape(-1).long(), minlength=CFG.num_logical)
        observed = torch.zeros(CFG.num_logical, dtype=torch.int64).index_add_(
            0, physical_to_logical, final_windows[layer]
        )
        assert torch.equal(observed, expected)


def test_gate_padding_and_replicas_matter(spawned):
    """The scenario exercises what it claims to: otherwise the checks above prove little."""
    world_size, results = spawned
    passes = results[0]["counts_passes"]
    gated_off = torch.tensor([s in CFG.gate_off_steps for s in range(CFG.steps)])
    assert (passes[gated_off] == 0).all()
    assert (passes[~gated_off].sum(dim=-1) > 0).all()
    # The last window spans a gate-off step.
    assert any(s in CFG.gate_off_steps for s in range(CFG.steps - CFG.window_size, CFG.steps))

    # Padded rows exist, and counting them would change the load.
    padded_rows, with_padding = 0, torch.zeros_like(passes)
    for step in range(CFG.steps):
        if step in CFG.gate_off_steps:
            continue
        for rank in range(world_size):
            topk_ids, num_unpadded = route_step(CFG, rank, step)
            padded_rows += topk_ids.shape[1] - num_unpadded
            for layer in range(CFG.num_layers):
                p = placement(CFG, layer, world_size)
                l2p, replica_count = p.logical_to_physical_map, p.logical_replica_count
                empty = torch.zeros(CFG.num_physical, dtype=torch.int32)
                _, load = map_and_record_reference(topk_ids[layer], l2p, replica_count, empty, True)
                with_padding[step, layer] += load
    assert padded_rows > 0
    assert (with_padding.sum(dim=-1) > passes.sum(dim=-1))[~gated_off].any()

    # Some logical expert has several replicas, and more than one of them got tokens.
    p = placement(CFG, 0, world_size)
    l2p, replica_count = p.logical_to_physical_map, p.logical_replica_count
    hot = int(replica_count.argmax())
    assert replica_count[hot] > 1
    assert (passes[:, 0, l2p[hot, : replica_count[hot]]].sum(dim=0) > 0).sum() > 1

    # Load lands on every rank's experts, so the count path needed the dispatch.
    per_rank = passes.sum(dim=(0, 1)).reshape(world_size, -1).sum(dim=-1)
    assert (per_rank > 0).all()


def test_metrics_agree(spawned):
    world_size, results = spawned
    topk, counts = results[0]["topk_windows"], results[0]["counts_windows"]
    for step in range(CFG.steps):
        assert balancedness(topk[step], world_size) == balancedness(counts[step], world_size)
        assert torch.equal(imbalance_max_over_mean(topk[step], world_size),
                           imbalance_max_over_mean(counts[step], world_size))
        assert torch.equal(imbalance_trtllm(topk[step], world_size), imbalance_trtllm(counts[step], world_size))
    assert 0.0 < balancedness(counts[-1], world_size) < 1.0  # skewed routing is visibly imbalanced


def test_verify_passes_and_catches_a_miscount(spawned):
    """The checker the NCCL script relies on."""
    world_size, results = spawned
    assert verify(CFG, world_size, results) == []
    corrupted = [dict(result) for result in results]
    corrupted[-1]["counts_passes"] = corrupted[-1]["counts_passes"].clone()
    corrupted[-1]["counts_passes"][5, 1, 0] += 1
    failures = verify(CFG, world_size, corrupted)
    assert len(failures) == 1 and f"rank {world_size - 1}" in failures[0] and "[5]" in failures[0]


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="do not split over 3 ranks"):
        run_spawned(SimConfig(steps=1), 3)
