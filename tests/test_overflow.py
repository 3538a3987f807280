"""The int32 limit per physical expert per pass, and the window-sum check."""

import pytest
import torch

import eplb_compile
from eplb_compile.overflow import (
    INT32_MAX,
    INT64_MAX,
    max_count_per_pass,
    max_tokens_per_pass,
    pass_fits_int32,
    window_is_exact,
    window_sum_fits_int64,
)

from tests.cases import DEVICES


def test_worst_case_is_every_rank_sending_every_slot_to_one_expert():
    # Count path: R ranks each send all T * k routed slots to local expert 0.
    ranks, tokens, k = 3, 5, 4
    counts_from_each_rank = [torch.tensor([tokens * k, 0], dtype=torch.int32) for _ in range(ranks)]
    load = torch.zeros(2, dtype=torch.int32)
    for counts in counts_from_each_rank:
        eplb_compile.record_counts(load, counts, 0, torch.tensor(True))
    assert load[0] == max_count_per_pass(tokens, k, ranks)
    # Topk path: one rank's view sees only its own T * k slots.
    topk_load = torch.zeros(2, dtype=torch.int32)
    eplb_compile.map_and_record(
        torch.zeros((tokens, k), dtype=torch.int32), torch.tensor([[0]]), torch.tensor([1]), topk_load,
        torch.tensor(True),
    )
    assert topk_load[0] == max_count_per_pass(tokens, k, 1)


@pytest.mark.parametrize("k, ranks", [(1, 1), (8, 1), (8, 64), (6, 9), (2, 2**30)])
def test_max_tokens_per_pass_is_the_int32_boundary(k, ranks):
    limit = max_tokens_per_pass(k, ranks)
    assert pass_fits_int32(limit, k, ranks)
    assert not pass_fits_int32(limit + 1, k, ranks)


def test_max_tokens_per_pass_for_a_deepseek_like_deployment():
    # top-8 on 64 EP ranks: about 4.2 million tokens per rank per step.
    assert max_tokens_per_pass(8, 64) == 4_194_303


@pytest.mark.parametrize("args", [(-1, 8, 1), (1, 0, 1), (1, 8, 0)])
def test_max_count_per_pass_rejects_nonsense(args):
    with pytest.raises(ValueError, match="expected tokens_per_rank >= 0, top_k >= 1 and ep_size >= 1"):
        max_count_per_pass(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_a_pass_past_int32_wraps_negative_and_is_detected(device):
    # The limit is real: one count past 2**31 - 1 wraps the counter.
    gate = torch.tensor(True, device=device)
    window = torch.zeros((3, 2), dtype=torch.int32, device=device)
    assert bool(window_is_exact(window))
    load = torch.tensor([INT32_MAX - 1, 7], dtype=torch.int32, device=device)
    eplb_compile.map_and_record(
        torch.zeros((2, 1), dtype=torch.int32, device=device), torch.tensor([[0]], device=device),
        torch.tensor([1], device=device), load, gate,
    )
    assert load[0].item() == INT32_MAX + 1 - 2**32
    window[1] = load
    assert not bool(window_is_exact(window))

    counts_load = torch.tensor([INT32_MAX, 0], dtype=torch.int32, device=device)
    eplb_compile.record_counts(counts_load, torch.tensor([1], dtype=torch.int32, device=device), 0, gate)
    window[1] = counts_load
    assert not bool(window_is_exact(window))


def test_vllm_window_sum_is_int64_and_exact_at_the_int32_limit():
    # vLLM sums its int32 window with .sum(dim=0): torch promotes to int64.
    window = torch.full((16, 2, 3), INT32_MAX, dtype=torch.int32)
    total = window.sum(dim=0)
    assert total.dtype == torch.int64
    assert torch.equal(total, torch.full((2, 3), 16 * INT32_MAX, dtype=torch.int64))
    assert window_sum_fits_int64(window)
    # The same sum kept in int32 would be wrong: why int64 matters.
    assert not torch.equal(window.sum(dim=0, dtype=torch.int32).long(), total)


@pytest.mark.parametrize("ranks", [1, 8, 64])
def test_window_sum_fits_int64_boundary(ranks):
    # Meta tensors: the check reads only the shape and dtype, never the data.
    most_slots = INT64_MAX // (ranks * INT32_MAX)
    fits = torch.empty((most_slots, 1), dtype=torch.int32, device="meta")
    too_many = torch.empty((most_slots + 1, 1), dtype=torch.int32, device="meta")
    assert window_sum_fits_int64(fits, ranks)
    assert not window_sum_fits_int64(too_many, ranks)
    # vLLM's windows (int32, a few thousand slots) are nowhere near it.
    assert window_sum_fits_int64(torch.empty((10_000, 58, 288), dtype=torch.int32, device="meta"), ranks)


def test_window_sum_fits_int64_cannot_vouch_for_an_int64_window():
    assert not window_sum_fits_int64(torch.empty((2, 4), dtype=torch.int64, device="meta"))
    assert window_sum_fits_int64(torch.empty((1, 4), dtype=torch.int64, device="meta"))


@pytest.mark.parametrize(
    "window, error, message",
    [
        (torch.zeros(3), TypeError, "window must be an integer tensor, got torch.float32"),
        (torch.zeros((), dtype=torch.int32), ValueError,
         r"window must be at least 1-D \[window_size, ...\], got shape \(\)"),
    ],
)
def test_window_sum_fits_int64_rejects_bad_windows(window, error, message):
    with pytest.raises(error, match=message):
        window_sum_fits_int64(window)


@pytest.mark.parametrize("device", DEVICES)
def test_window_is_exact_stays_on_the_device(device):
    window = torch.zeros((4, 3), dtype=torch.int32, device=device)
    result = window_is_exact(window)
    assert result.device == window.device and result.dtype == torch.bool and result.dim() == 0
