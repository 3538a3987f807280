"""The synthetic placements and routing: hand-computed cases and invariants."""

import pytest
import torch

from eplb_compile.workloads import eplb_placement, zipf_popularity, zipf_topk_ids


def test_placement_by_hand():
    # Redundant slots: expert 0 (6 -> 3 per replica), then expert 3 (4 -> 2).
    # Shares 3, 3, 2, 2, 1, 1 go to the least-loaded rank with room:
    # rank 0 gets e0, e3, e2 (physical 0-2), rank 1 e0, e3, e1 (physical 3-5).
    p = eplb_placement(4, 2, 2, load=torch.tensor([6.0, 1.0, 1.0, 4.0]))
    assert p.logical_to_physical_map.tolist() == [[0, 3], [5, -1], [2, -1], [1, 4]]
    assert p.logical_replica_count.tolist() == [2, 1, 1, 2]
    assert p.physical_to_logical_map.tolist() == [0, 3, 2, 0, 3, 1]
    assert (p.num_physical, p.num_local) == (6, 3)


@pytest.mark.parametrize("num_logical, num_redundant, ep_size", [(1, 0, 1), (6, 2, 4), (12, 4, 2), (16, 16, 8)])
@pytest.mark.parametrize("with_load", [False, True])
def test_placement_invariants(num_logical, num_redundant, ep_size, with_load):
    g = torch.Generator().manual_seed(num_logical)
    load = zipf_popularity(num_logical, order=torch.randperm(num_logical, generator=g)) if with_load else None
    p = eplb_placement(num_logical, num_redundant, ep_size, load=load, generator=g, slots=num_redundant + 2)
    l2p, count, p2l = p.logical_to_physical_map, p.logical_replica_count, p.physical_to_logical_map
    assert l2p.dtype == count.dtype == p2l.dtype == torch.int64
    assert l2p.shape == (num_logical, num_redundant + 2) and p.num_physical == num_logical + num_redundant
    assert (count >= 1).all() and int(count.sum()) == p.num_physical
    used = l2p[l2p >= 0]
    assert sorted(used.tolist()) == list(range(p.num_physical))  # every slot exactly once
    for expert in range(num_logical):
        replicas = l2p[expert, : count[expert]]
        assert (replicas >= 0).all() and (l2p[expert, count[expert] :] == -1).all()
        assert (p2l[replicas] == expert).all()
    if with_load and num_redundant:
        hottest = int(load.argmax())
        assert int(count[hottest]) == int(count.max()) > 1


def test_placement_balances_ranks_better_than_linear():
    load = zipf_popularity(16, alpha=1.2)  # expert 0 hottest: a linear placement is badly skewed
    p = eplb_placement(16, 8, 4, load=load)
    share = load / p.logical_replica_count.double()
    per_rank = torch.zeros(4, dtype=torch.float64).index_add_(
        0, torch.arange(p.num_physical) // p.num_local, share[p.physical_to_logical_map]
    )
    linear = load.reshape(4, 4).sum(dim=1)
    assert per_rank.max() / per_rank.mean() < 1.1 < linear.max() / linear.mean()


def test_random_placement_follows_the_generator():
    a = eplb_placement(12, 4, 4, generator=torch.Generator().manual_seed(1))
    b = eplb_placement(12, 4, 4, generator=torch.Generator().manual_seed(1))
    c = eplb_placement(12, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.logical_to_physical_map, b.logical_to_physical_map)
    assert not torch.equal(a.logical_to_physical_map, c.logical_to_physical_map)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_logical=0, num_redundant=0, ep_size=1), ValueError, "num_logical must be >= 1"),
        (dict(num_logical=4, num_redundant=-1, ep_size=1), ValueError, "num_redundant must be >= 0"),
        (dict(num_logical=4, num_redundant=0, ep_size=0), ValueError, "ep_size must be >= 1"),
        (dict(num_logical=4, num_redundant=1, ep_size=2), ValueError, "do not split over ep_size=2"),
        (dict(num_logical=True, num_redundant=0, ep_size=1), TypeError, "num_logical must be an int"),
        (dict(num_logical=4, num_redundant=0, ep_size=2.0), TypeError, "ep_size must be an int"),
        (dict(num_logical=4, num_redundant=4, ep_size=2, slots=1, load=torch.ones(4)), ValueError, "slots must be an int >= 2"),
        (dict(num_logical=2, num_redundant=0, ep_size=1, load=torch.tensor([1.0, -1.0])), ValueError, "load must be"),
        (dict(num_logical=2, num_redundant=0, ep_size=1, load=torch.ones(3)), ValueError, "load must be"),
        (dict(num_logical=2, num_redundant=0, ep_size=1, load=torch.tensor([1.0, float("nan")])), ValueError,
         "load must be"),
    ],
)
def test_placement_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        eplb_placement(**kwargs)


def test_popularity_by_hand():
    assert zipf_popularity(3, alpha=1.0).tolist() == pytest.approx([6 / 11, 3 / 11, 2 / 11], rel=1e-15)
    # order[i] is the i-th hottest.
    assert zipf_popularity(3, alpha=1.0, order=torch.tensor([2, 0, 1])).tolist() == pytest.approx(
        [3 / 11, 2 / 11, 6 / 11], rel=1e-15
    )
    assert zipf_popularity(4, alpha=0).tolist() == [0.25] * 4
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1, 3])):
        with pytest.raises(ValueError, match="order must be a permutation of range"):
            zipf_popularity(3, order=bad)
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="alpha must be"):
            zipf_popularity(3, alpha=bad)


def test_routing_shape_dtype_and_distinct_rows():
    g = torch.Generator().manual_seed(0)
    ids = zipf_topk_ids(500, 4, 6, generator=g, dtype=torch.int32)
    assert ids.shape == (500, 4) and ids.dtype == torch.int32
    assert ((ids >= 0) & (ids < 6)).all()
    assert all(len(set(row)) == 4 for row in ids.tolist())
    assert zipf_topk_ids(0, 2, 4).shape == (0, 2)
    assert sorted(zipf_topk_ids(1, 6, 6)[0].tolist()) == list(range(6))  # k = all experts


def test_routing_follows_the_popularity():
    order = torch.tensor([3, 0, 4, 1, 2])  # expert 3 hottest, expert 2 coldest
    ids = zipf_topk_ids(200_000, 1, 5, alpha=1.2, order=order, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids.reshape(-1), minlength=5).double() / ids.numel()
    # 200 000 draws: a standard error under 0.0012 per frequency.
    assert freq.tolist() == pytest.approx(zipf_popularity(5, alpha=1.2, order=order).tolist(), abs=0.006)
    # With k > 1 the first column is the hottest draw more often than the last.
    ids = zipf_topk_ids(20_000, 3, 5, order=order, generator=torch.Generator().manual_seed(1))
    assert (ids[:, 0] == 3).sum() > (ids[:, 2] == 3).sum()


def test_routing_follows_the_generator():
    draw = lambda seed: zipf_topk_ids(64, 2, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((10, 5, 4), {}, ValueError, "top_k=5 distinct experts"),
        ((-1, 2, 4), {}, ValueError, "num_tokens must be >= 0"),
        ((10, 0, 4), {}, ValueError, "top_k must be >= 1"),
        ((10.0, 2, 4), {}, TypeError, "num_tokens must be an int"),
        ((10, 2, 4), {"dtype": torch.float32}, TypeError, "integer dtype"),
    ],
)
def test_routing_refuses_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        zipf_topk_ids(*args, **kwargs)
