import math

import pytest
import torch

from eplb_compile import Lowering, count_path_min_tokens, select_lowering
from eplb_compile import selection
from eplb_compile.kernels import plans
from eplb_compile.selection import MIN_TOKENS_ENV

# The crossover of the packaged default plan (every card without its own, and the CPU).
DEFAULT_COUNT_PATH_MIN_TOKENS = plans.plan_for_device(None).count_path_min_tokens


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(MIN_TOKENS_ENV, raising=False)


@pytest.fixture
def no_plans(monkeypatch):
    """No card-specific plan: the default plan's crossover applies."""
    monkeypatch.setattr(selection.plans, "count_path_min_tokens", lambda device: DEFAULT_COUNT_PATH_MIN_TOKENS)


@pytest.fixture
def card_plans(monkeypatch):
    """Kernel plans whose crossover is 100 on CUDA cards and 200 elsewhere; records the devices asked."""
    asked = []

    def plan_crossover(device):
        asked.append(device)
        return 100 if device is not None and device.type == "cuda" else 200

    monkeypatch.setattr(selection.plans, "count_path_min_tokens", plan_crossover)
    return asked


def test_no_backend_counts_means_topk():
    for tokens in (0, 1, 10**6):
        choice = select_lowering(False, tokens, min_tokens=0)
        assert choice.lowering is Lowering.TOPK and "no exact" in choice.reason


def test_no_padding_mask_means_topk():
    choice = select_lowering(True, 10**6, has_padding_mask=False, min_tokens=0)
    assert choice.lowering is Lowering.TOPK and "no padding mask" in choice.reason
    # Without exact counts, that is the reason given, mask or not.
    assert "no exact" in select_lowering(False, 10**6, has_padding_mask=False).reason


def test_crossover_splits_the_token_range(no_plans):
    threshold = DEFAULT_COUNT_PATH_MIN_TOKENS
    assert select_lowering(True, threshold - 1).lowering is Lowering.TOPK
    assert select_lowering(True, threshold).lowering is Lowering.COUNTS
    assert select_lowering(True, 5, min_tokens=5).lowering is Lowering.COUNTS
    assert select_lowering(True, 4, min_tokens=5).lowering is Lowering.TOPK
    assert select_lowering(True, 0, min_tokens=0).lowering is Lowering.COUNTS


def test_reason_names_the_numbers():
    choice = select_lowering(True, 300, min_tokens=256)
    assert "300" in choice.reason and "256" in choice.reason
    choice = select_lowering(True, 200, min_tokens=256)
    assert "200" in choice.reason and "256" in choice.reason


def test_without_a_card_plan_the_default_plan_applies():
    assert DEFAULT_COUNT_PATH_MIN_TOKENS == 65536  # configs/default.json: conservative, past every measured crossover
    assert count_path_min_tokens() == DEFAULT_COUNT_PATH_MIN_TOKENS
    assert count_path_min_tokens(torch.device("cpu")) == DEFAULT_COUNT_PATH_MIN_TOKENS


def test_the_cards_plan_gives_the_crossover(card_plans):
    cuda = torch.device("cuda", 1)
    assert count_path_min_tokens(cuda) == 100
    assert count_path_min_tokens() == 200
    assert select_lowering(True, 100, device=cuda).lowering is Lowering.COUNTS
    assert select_lowering(True, 99, device=cuda).lowering is Lowering.TOPK
    assert select_lowering(True, 199).lowering is Lowering.TOPK
    assert "crossover 100" in select_lowering(True, 150, device=cuda).reason
    assert card_plans == [cuda, None, cuda, cuda, None, cuda]


def test_argument_and_environment_override_the_plan(card_plans, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert select_lowering(True, 50, min_tokens=50, device=cuda).lowering is Lowering.COUNTS
    monkeypatch.setenv(MIN_TOKENS_ENV, "7")
    assert count_path_min_tokens(cuda) == 7
    assert select_lowering(True, 7, device=cuda).lowering is Lowering.COUNTS
    assert select_lowering(True, 6, device=cuda).lowering is Lowering.TOPK
    assert select_lowering(True, 6, min_tokens=6).lowering is Lowering.COUNTS  # the argument wins
    assert card_plans == []  # never consulted while an override is set


@pytest.mark.parametrize("unset", ["", "  "])
def test_empty_environment_variable_means_unset(no_plans, monkeypatch, unset):
    monkeypatch.setenv(MIN_TOKENS_ENV, unset)
    assert count_path_min_tokens() == DEFAULT_COUNT_PATH_MIN_TOKENS


@pytest.mark.parametrize("bad", ["-1", "many", "1.5", "nan", "0x10"])
def test_garbage_environment_variable_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(MIN_TOKENS_ENV, bad)
    with pytest.raises(ValueError, match=MIN_TOKENS_ENV):
        count_path_min_tokens()
    with pytest.raises(ValueError, match=MIN_TOKENS_ENV):
        select_lowering(True, 10)


@pytest.mark.parametrize("bad", [0, 1, "yes", "", [True], 1.0, math.nan])
def test_has_exact_counts_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="has_exact_counts must be a bool"):
        select_lowering(bad, 10**6, min_tokens=0)


@pytest.mark.parametrize("bad", [0, 1, None, "no", torch.tensor(False)])
def test_has_padding_mask_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="has_padding_mask must be a bool"):
        select_lowering(True, 10, has_padding_mask=bad)


@pytest.mark.parametrize("name", ["num_tokens", "min_tokens"])
@pytest.mark.parametrize(
    "bad, error",
    [(True, TypeError), (False, TypeError), (1.0, TypeError), (math.nan, TypeError), ("5", TypeError),
     ([5], TypeError), (torch.tensor(5), TypeError), (-1, ValueError), (-5, ValueError)],
)
def test_token_counts_must_be_non_negative_ints(name, bad, error):
    args = {"num_tokens": 10, "min_tokens": 10, name: bad}
    with pytest.raises(error, match=f"{name} must be a non-negative int"):
        select_lowering(True, args["num_tokens"], min_tokens=args["min_tokens"])


def test_device_must_be_a_torch_device():
    with pytest.raises(TypeError, match="device must be a torch.device"):
        select_lowering(True, 10, device="cuda")


@pytest.mark.parametrize("bad", [None, torch.zeros(3, dtype=torch.int32), 1])
def test_has_exact_counts_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="has_exact_counts must be a bool"):
        select_lowering(bad, 300, min_tokens=256)


def _compiled_chooser(**kwargs):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def choose(ids):
        if select_lowering(True, ids.shape[0], device=ids.device, **kwargs).lowering is Lowering.COUNTS:
            return ids + 1
        return ids - 1

    torch._dynamo.reset()
    choose.counter = counter
    return choose


@pytest.mark.parametrize("override", ["argument", "environment", "card plan"])
def test_compiled_graph_chooses_once_without_guarding_on_the_token_count(override, card_plans, monkeypatch):
    """Where the router runs inside the compiled graph (vLLM on CPU, which drops
    guards), one traced choice serves every size: topk unless the crossover is 0."""
    if override == "environment":
        monkeypatch.setenv(MIN_TOKENS_ENV, "200")
    choose = _compiled_chooser(**({"min_tokens": 200} if override == "argument" else {}))
    for size in (300, 199, 200, 7):
        assert choose(torch.zeros(size)).tolist() == [-1.0] * size
    assert choose.counter.frame_count == 1
    if override == "card plan":
        assert card_plans and all(device == torch.device("cpu") for device in card_plans)


def test_compiled_graph_takes_the_count_path_when_the_crossover_is_zero():
    choose = _compiled_chooser(min_tokens=0)
    for size in (300, 3):
        assert choose(torch.zeros(size)).tolist() == [1.0] * size
    assert choose.counter.frame_count == 1


def test_garbage_environment_variable_under_compile_names_the_variable(monkeypatch):
    monkeypatch.setenv(MIN_TOKENS_ENV, "junk")
    # torch.compile wraps the ValueError in its own exception; the message survives.
    with pytest.raises(Exception, match=MIN_TOKENS_ENV):
        _compiled_chooser()(torch.zeros(4))
