"""Our rebalancing algorithm against vLLM's DefaultEplbPolicy (same arguments, same map)."""

import pytest
import torch

from eplb_compile import rebalance

# (layers, logical, physical, groups, nodes, ranks): global, hierarchical, groups that do not split over
# nodes (vLLM falls back to global), one slot per rank, no redundant experts, DeepSeek-V3-like.
SHAPES = [(3, 8, 8, 1, 1, 2), (4, 16, 20, 1, 1, 4), (2, 16, 24, 4, 2, 4), (2, 12, 16, 3, 2, 4),
          (3, 6, 8, 1, 1, 8), (2, 32, 32, 8, 4, 8), (2, 256, 288, 8, 4, 32), (5, 10, 15, 5, 1, 5)]


def random_load(layers, logical, generator, kind):
    if kind == "skewed":  # a few hot experts, as real routing has
        weights = torch.rand(logical, generator=generator) ** 4
        return torch.stack([torch.bincount(torch.multinomial(weights, 2000, True, generator=generator),
                                           minlength=logical) for _ in range(layers)])
    if kind == "ties":  # many equal loads: tie-breaking must match
        return torch.randint(0, 3, (layers, logical), generator=generator)
    return torch.randint(0, 10_000, (layers, logical), generator=generator)


def linear_map(layers, logical, physical):
    return (torch.arange(physical) % logical).expand(layers, physical).clone()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["uniform", "skewed", "ties"])
@pytest.mark.parametrize("with_old_map", [False, True])
def test_equal_to_vllm_default_policy(shape, kind, with_old_map):
    policy = rebalance.vllm_policy()
    if policy is None:
        pytest.skip("vLLM is not installed")
    layers, logical, physical, groups, nodes, ranks = shape
    generator = torch.Generator().manual_seed(SHAPES.index(shape) * 3 + ["uniform", "skewed", "ties"].index(kind))
    for _ in range(5):
        load = random_load(layers, logical, generator, kind)
        old = None
        if with_old_map:  # a previous rebalancing's map, so some experts stay on their rank
            old = rebalance.rebalance(random_load(layers, logical, generator, kind), physical, groups, nodes, ranks)
        ours = rebalance.rebalance(load, physical, groups, nodes, ranks, old)
        theirs = policy.rebalance_experts(load, physical, groups, nodes, ranks, old)
        assert torch.equal(ours, theirs.long()), (load, ours, theirs)


def test_policy_rebalance_names_the_implementation_it_ran():
    load = torch.tensor([[100, 1, 1, 1]])
    placement, which = rebalance.policy_rebalance(load, 6, 1, 1, 2)
    assert which == ("vllm" if rebalance.vllm_policy() is not None else "eplb_compile")
    assert torch.equal(placement, rebalance.rebalance(load, 6, 1, 1, 2))


def test_every_logical_expert_placed_and_the_hot_one_replicated():
    # Without vLLM: properties the algorithm guarantees, checked by hand.
    load = torch.tensor([[900, 10, 10, 10, 10, 10], [1, 1, 1, 1, 1, 500]])
    placement = rebalance.rebalance(load, 8, 1, 1, 2)
    for layer, hot in [(0, 0), (1, 5)]:
        counts = torch.bincount(placement[layer], minlength=6)
        assert (counts >= 1).all()
        assert counts[hot] == 3  # both redundant slots go to the one hot expert
        # its three replicas are split over both ranks
        ranks = {slot // 4 for slot in range(8) if placement[layer, slot] == hot}
        assert ranks == {0, 1}


def test_old_slots_are_kept():
    old = torch.tensor([[0, 1, 2, 3]])
    load = torch.tensor([[10, 1, 1, 10]])  # experts 0 and 3 end up on different ranks
    placement = rebalance.rebalance(load, 4, 1, 1, 2, old)
    for slot in range(4):
        rank = slot // 2
        expert = int(placement[0, slot])
        if int(old[0, slot]) in placement[0, 2 * rank:2 * rank + 2].tolist():
            assert int(placement[0, slot]) == int(old[0, slot]), placement
        assert 0 <= expert < 4
    assert sorted(placement[0].tolist()) == [0, 1, 2, 3]
