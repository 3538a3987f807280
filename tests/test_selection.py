import pytest
import torch

from eplb_compile import Lowering, count_path_min_tokens, select_lowering
from eplb_compile.selection import DEFAULT_COUNT_PATH_MIN_TOKENS, MIN_TOKENS_ENV

COUNTS = torch.zeros(36, dtype=torch.int32)


def test_no_backend_counts_means_topk():
    for tokens in (1, 10**6):
        choice = select_lowering(None, tokens)
        assert choice.lowering is Lowering.TOPK and "no exact" in choice.reason


def test_crossover_splits_the_token_range():
    threshold = DEFAULT_COUNT_PATH_MIN_TOKENS
    assert select_lowering(COUNTS, threshold - 1).lowering is Lowering.TOPK
    assert select_lowering(COUNTS, threshold).lowering is Lowering.COUNTS
    assert select_lowering(COUNTS, 5, min_tokens=5).lowering is Lowering.COUNTS
    assert select_lowering(COUNTS, 4, min_tokens=5).lowering is Lowering.TOPK


def test_environment_override(monkeypatch):
    monkeypatch.setenv(MIN_TOKENS_ENV, "7")
    assert count_path_min_tokens() == 7
    assert select_lowering(COUNTS, 7).lowering is Lowering.COUNTS
    assert select_lowering(COUNTS, 6).lowering is Lowering.TOPK
    for bad in ("-1", "many"):
        monkeypatch.setenv(MIN_TOKENS_ENV, bad)
        with pytest.raises(ValueError, match=MIN_TOKENS_ENV):
            count_path_min_tokens()


def test_reason_names_the_numbers():
    choice = select_lowering(COUNTS, 300, min_tokens=256)
    assert "300" in choice.reason and "256" in choice.reason


def test_a_router_can_choose_before_prepare_with_a_bool():
    assert select_lowering(True, 300, min_tokens=256).lowering is Lowering.COUNTS
    assert select_lowering(False, 300, min_tokens=256).lowering is Lowering.TOPK
