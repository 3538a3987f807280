"""``eplb-compile bench --topk-plan auto`` on the CPU: plan derivation and the plan file it writes."""

import pytest

from eplb_compile.bench import plan
from eplb_compile.kernels import plans


def test_fastest_variant_wins_and_switches_at_the_geometric_middle():
    times = {
        1: {"triton": 2.2, "direct": 2.0, "hist_e1": 2.5},
        512: {"triton": 3.0, "direct": 2.8, "hist_e1": 2.6},
        32768: {"triton": 50.0, "direct": 9.0, "hist_e1": 6.0, "hist_e4": 5.0},
    }
    # sqrt(1 * 512) = 22.6 -> 23 tokens; sqrt(512 * 32768) = 4096 tokens; times top-8.
    assert plan.derive_plan(times, 8) == ((0, "direct"), (23 * 8, "hist_e1"), (4096 * 8, "hist_e4"))


def test_a_tie_keeps_the_current_variant():
    times = {1: {"direct": 2.0, "hist_e1": 2.5}, 128: {"direct": 2.03, "hist_e1": 2.0}}
    assert plan.derive_plan(times, 8) == ((0, "direct"),)  # 2.03 is within PLAN_TIE of 2.0


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        plan.derive_plan({1: {"smem": 1.0}}, 8)


def test_count_path_crossover_needs_every_larger_t():
    topk = {1: 2.0, 2048: 3.0, 8192: 4.0, 32768: 5.0}
    assert plan.count_path_crossover({1: 3.0, 2048: 2.9, 8192: 4.1, 32768: 4.9}, topk) == 32768
    assert plan.count_path_crossover({1: 3.0, 2048: 2.9, 8192: 3.9, 32768: 4.9}, topk) == 2048
    assert plan.count_path_crossover({1: 3.0, 32768: 5.1}, topk) is None
    assert plan.plan_crossover(None, [1, 32768]) == 65536
    assert plan.plan_crossover(2048, [1, 32768]) == 2048


def test_written_plan_file_loads_with_the_library_parser(tmp_path):
    # sqrt(1 * 32768) = 181.02 -> 182 tokens.
    rows = plan.derive_plan({1: {"direct": 2.0, "hist_e4": 3.0}, 32768: {"direct": 9.0, "hist_e4": 5.0}}, 8)
    path = plan.write_plan_file(tmp_path, "NVIDIA H200", rows, 65536,
                                {"torch": "2.14", "triton": "3.8", "date": "2026-12-03", "note": "test"})
    assert path.name == "device_name=NVIDIA_H200.json"
    loaded = plans.load_plan_file(path)
    assert loaded.device_name == "NVIDIA_H200"
    assert loaded.topk_plan == ((0, "direct"), (182 * 8, "hist_e4"))
    assert loaded.count_path_min_tokens == 65536
    assert loaded.topk_variant(8) == "direct" and loaded.topk_variant(182 * 8) == "hist_e4"
    # The derived plan the bench times is the same plan, without touching the library's.
    assert plan.kernel_plan("NVIDIA H200", rows, 65536).topk_plan == loaded.topk_plan


def test_an_invalid_plan_is_refused_when_written(tmp_path):
    with pytest.raises(plans.PlanFileError):
        plan.write_plan_file(tmp_path, "X", ((0, "direct"), (0, "hist_e4")), 1, {})
