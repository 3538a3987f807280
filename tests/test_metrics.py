"""Load-imbalance metrics on hand-computed examples, and the PNG plots."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from eplb_compile import metrics
from eplb_compile.metrics import balancedness, imbalance_max_over_mean, imbalance_trtllm, rank_loads
from eplb_compile.plots import imbalance_series, plot_imbalance_over_steps, plot_load_heatmap, write_example_figures

# Two layers, four physical experts. With ep_size=2, rank 0 owns experts 0-1:
#   layer 0: ranks get 1+2=3 and 3+4=7 -> mean 5, max 7
#   layer 1: ranks get 0 and 10          -> mean 5, max 10
PASS = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 5]], dtype=torch.int32)
# The same totals spread over two steps, each step unlike the total, so a
# metric that looks at one step only gets a different answer.
WINDOW = torch.tensor(
    [[[1, 0, 3, 0], [0, 0, 5, 0]],
     [[0, 2, 0, 4], [0, 0, 0, 5]]], dtype=torch.int32
)


@pytest.mark.parametrize("load", [PASS, WINDOW], ids=["pass", "window"])
def test_hand_computed_ep2(load):
    assert rank_loads(load, 2).tolist() == [[3.0, 7.0], [0.0, 10.0]]
    assert balancedness(load, 2) == pytest.approx((5 + 5) / (7 + 10), rel=1e-15)
    assert imbalance_max_over_mean(load, 2).tolist() == pytest.approx([7 / 5, 10 / 5], rel=1e-15)
    assert imbalance_trtllm(load, 2).tolist() == pytest.approx([(7 - 5) / 5, (10 - 5) / 5], rel=1e-15)


@pytest.mark.parametrize("load", [PASS, WINDOW], ids=["pass", "window"])
def test_hand_computed_ep4(load):
    # One expert per rank: layer 0 mean 2.5 max 4; layer 1 mean 2.5 max 5.
    assert rank_loads(load, 4).tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]]
    assert balancedness(load, 4) == pytest.approx((2.5 + 2.5) / (4 + 5), rel=1e-15)
    assert imbalance_max_over_mean(load, 4).tolist() == pytest.approx([4 / 2.5, 5 / 2.5], rel=1e-15)
    assert imbalance_trtllm(load, 4).tolist() == pytest.approx([1.5 / 2.5, 2.5 / 2.5], rel=1e-15)


def test_single_step_of_window_differs_from_total():
    # Guards the window summation: step 0 alone has layer 0 ranks at 1 and 3.
    assert imbalance_max_over_mean(WINDOW[0], 2).tolist() == pytest.approx([3 / 2, 5 / 2.5])
    assert imbalance_max_over_mean(WINDOW, 2).tolist() != imbalance_max_over_mean(WINDOW[0], 2).tolist()


def test_trtllm_is_computed_as_written():
    # Ranks 2 and 1: mean 1.5. (2 - 1.5) / 1.5 == 1/3 exactly in float64,
    # while 2 / 1.5 - 1 rounds to 0.33333333333333326.
    load = torch.tensor([[2, 1]])
    assert imbalance_trtllm(load, 2).item() == 1 / 3


def test_balanced_and_empty_loads():
    balanced = torch.full((3, 8), 6, dtype=torch.int32)
    assert balancedness(balanced, 4) == 1.0
    assert imbalance_max_over_mean(balanced, 4).tolist() == [1.0, 1.0, 1.0]
    assert imbalance_trtllm(balanced, 4).tolist() == [0.0, 0.0, 0.0]
    empty = torch.zeros(2, 8, dtype=torch.int32)
    # vLLM logs balancedness 0.0 when no token was recorded.
    assert balancedness(empty, 4) == 0.0
    # An empty layer is balanced, never NaN.
    mixed = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 3]])
    assert imbalance_max_over_mean(mixed, 2).tolist() == [1.0, 1.5]
    assert imbalance_trtllm(mixed, 2).tolist() == [0.0, 0.5]


@pytest.mark.parametrize(
    "load, ep_size, message",
    [
        (torch.zeros(2, 6, dtype=torch.int32), 4, "do not split evenly"),
        (torch.zeros(3, 2, 6, dtype=torch.int32), 4, "do not split evenly"),
        (torch.zeros(2, 8, dtype=torch.int32), 0, "ep_size must be positive"),
        (torch.zeros(8, dtype=torch.int32), 2, "must be \\[layers, physical\\]"),
        (torch.zeros(1, 1, 2, 8, dtype=torch.int32), 2, "must be \\[layers, physical\\]"),
    ],
)
@pytest.mark.parametrize("metric", [rank_loads, balancedness, imbalance_max_over_mean, imbalance_trtllm])
def test_errors(metric, load, ep_size, message):
    with pytest.raises(ValueError, match=message):
        metric(load, ep_size)


def test_balancedness_matches_vllm():
    """Against vLLM 0.33.0's own statistics, computed as ``EplbState.step`` does."""
    eplb_state = pytest.importorskip("vllm.distributed.eplb.eplb_state")
    generator = torch.Generator().manual_seed(0)
    for layers, physical, ep_size in [(3, 16, 4), (5, 288, 8), (1, 6, 6)]:
        load = torch.randint(0, 1000, (layers, physical), generator=generator, dtype=torch.int32)
        num_tokens_per_rank = load.reshape(layers, ep_size, -1).sum(dim=-1).float()
        avg, max_ = eplb_state._compute_eplb_load_stats(num_tokens_per_rank)
        assert balancedness(load, ep_size) == pytest.approx(float(avg) / float(max_), rel=1e-6)


# --------------------------------------------------------------------------
# Plots: a real PNG comes out.
# --------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == _PNG_SIGNATURE
    # The first chunk of a PNG is IHDR: width and height, big-endian.
    assert data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_plot_imbalance_over_steps(tmp_path):
    window = torch.randint(0, 50, (12, 3, 16), generator=torch.Generator().manual_seed(1))
    series = torch.stack([imbalance_max_over_mean(window[: s + 1], 4) for s in range(12)])
    path = plot_imbalance_over_steps({"topk": series, "counts": series.clone()}, tmp_path / "imbalance.png")
    width, height = _png_size(path)
    assert width > 300 and height > 200


def test_plot_imbalance_rejects_bad_series(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_imbalance_over_steps({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[steps, layers\]"):
        plot_imbalance_over_steps({"topk": torch.ones(5)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("shape", [(3, 16), (4, 3, 16)], ids=["pass", "window"])
def test_plot_load_heatmap(tmp_path, shape):
    load = torch.randint(0, 50, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    width, height = _png_size(plot_load_heatmap(load, 4, tmp_path / "heatmap.png"))
    assert width > 200 and height > 150


def test_imbalance_series_per_step():
    loads = {"topk": WINDOW, "counts": WINDOW.flip(0)}
    series = imbalance_series(loads, 2)
    assert series["topk"].shape == (2, 2)
    assert series["topk"].flatten().tolist() == pytest.approx([3 / 2, 5 / 2.5, 4 / 3, 5 / 2.5], rel=1e-15)
    assert torch.equal(series["counts"], series["topk"].flip(0))


def test_write_example_figures(tmp_path):
    window = torch.randint(0, 50, (6, 3, 16), dtype=torch.int32, generator=torch.Generator().manual_seed(4))
    paths = write_example_figures({"topk": window, "counts": window.clone()}, 4, tmp_path, title="t")
    assert [p.name for p in paths] == ["example_imbalance.png", "example_heatmap.png", "example_figures.json"]
    assert all(_png_size(p)[0] > 200 for p in paths[:2])
    assert json.loads(paths[2].read_text())["imbalance_title"] == "t"


def test_one_hot_rank():
    # Eight ranks, one expert each: 101 tokens, 100 of them on rank 0.
    load = torch.tensor([[100, 0, 0, 0, 0, 0, 0, 1]])
    assert balancedness(load, 8) == pytest.approx((101 / 8) / 100, rel=1e-15)
    assert imbalance_max_over_mean(load, 8).item() == pytest.approx(100 / (101 / 8), rel=1e-15)


# --------------------------------------------------------------------------
# The numpy formulas, every step at once (what `eplb-compile report` uses),
# against the torch API step by step and against torch formulas written here.
# --------------------------------------------------------------------------


def _torch_reference(load: torch.Tensor, ep_size: int) -> tuple[float, list[float], list[float]]:
    """The metrics in torch, as this module computed them before its formulas moved to numpy."""
    per_rank = load.to(torch.float64).reshape(load.shape[0], ep_size, -1).sum(dim=-1)
    max_load, mean = per_rank.max(dim=-1).values, per_rank.mean(dim=-1)
    max_total = max_load.sum()
    balanced = 0.0 if max_total == 0 else float(mean.sum() / max_total)
    over = torch.where(mean > 0, max_load / mean.clamp_min(1e-12), torch.ones_like(mean))
    trtllm = torch.where(mean > 0, (max_load - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))
    return balanced, over.tolist(), trtllm.tolist()


@pytest.mark.parametrize("steps, layers, physical, ep_size", [(7, 5, 24, 4), (33, 58, 288, 8), (3, 1, 9, 9)])
def test_numpy_per_pass_equals_the_torch_metrics_on_random_loads(steps, layers, physical, ep_size):
    import numpy as np

    from eplb_compile import metrics

    generator = torch.Generator().manual_seed(steps)
    load = torch.randint(0, 5000, (steps, layers, physical), generator=generator, dtype=torch.int32)
    load[0, 0] = 0  # an empty layer: balanced, never NaN
    if steps > 3:
        load[1] = 0  # an empty pass: balancedness 0.0, as vLLM logs it
    array = load.numpy()
    ranks = metrics.rank_loads_per_pass(array, ep_size)
    per_pass = (metrics.balancedness_per_pass(array, ep_size), metrics.max_over_mean_per_pass(array, ep_size),
                metrics.trtllm_per_pass(array, ep_size))
    from_ranks = (metrics.balancedness_per_pass(ranks, ep_size), metrics.max_over_mean_per_pass(ranks, ep_size),
                  metrics.trtllm_per_pass(ranks, ep_size))  # as the report computes them
    for got in (per_pass, from_ranks):
        assert got[0].shape == (steps,) and got[1].shape == got[2].shape == (steps, layers)
        for step in range(steps):
            assert got[0][step] == balancedness(load[step], ep_size)  # bit for bit
            assert got[1][step].tolist() == imbalance_max_over_mean(load[step], ep_size).tolist()
            assert got[2][step].tolist() == imbalance_trtllm(load[step], ep_size).tolist()
            balanced, over, trtllm = _torch_reference(load[step], ep_size)
            assert got[0][step] == pytest.approx(balanced, rel=1e-14, abs=0)
            assert got[1][step].tolist() == over and got[2][step].tolist() == trtllm
    assert np.array_equal(ranks, load.to(torch.float64).reshape(steps, layers, ep_size, -1).sum(dim=-1).numpy())
    maps = torch.randint(-1, 11, (layers, physical), generator=generator)
    logical = metrics.logical_load_per_pass(array, maps.numpy(), 11)
    expected = torch.zeros((steps, layers, 12), dtype=torch.int64)
    expected.scatter_add_(-1, maps.masked_fill(maps < 0, 11).expand(steps, -1, -1), load.long())
    assert logical.dtype == np.int64 and logical.tolist() == expected[..., :11].tolist()
    assert metrics.logical_load(load, maps, 11).tolist() == logical.tolist()


def test_a_map_entry_past_the_logical_experts_is_refused_not_added_to_another_layer():
    load = torch.ones((2, 4), dtype=torch.int32)
    bad = torch.tensor([[0, 1, 5, 2], [0, 1, 2, 3]])  # 5 >= 4 logical experts
    with pytest.raises(ValueError, match="outside -1..3"):
        metrics.logical_load(load, bad, 4)
    with pytest.raises(ValueError, match="outside -1..3"):
        metrics.logical_load(load, torch.full((2, 4), -2), 4)


def test_bfloat16_loads_have_metrics():
    load = torch.tensor([[3.0, 1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    assert metrics.imbalance_max_over_mean(load, 2).tolist() == [2.0]
    assert metrics.balancedness(load, 2) == 0.5
