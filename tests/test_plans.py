"""Per-card kernel plans as data: the shipped files, the loader's checks, the override."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest
import torch

from eplb_compile.kernels import cuda_variants, plans

CONFIGS = resources.files("eplb_compile.kernels").joinpath("configs")


def _write(tmp_path, **overrides):
    data = {"format": 1, "device_name": "X", "topk_plan": [[0, "direct"], [100, "hist_e4"]],
            "count_path_min_tokens": 7, "measured_with": {"note": "test"}}
    data.update(overrides)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    monkeypatch.delenv(plans.PLAN_ENV, raising=False)
    plans.clear_cache()
    yield
    plans.clear_cache()


def test_variant_names_are_the_live_kernels():
    assert set(plans.VARIANT_NAMES) == {"triton", *cuda_variants.VARIANTS}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.iterdir() if p.name.endswith(".json")))
def test_shipped_plan_files_load(name):
    plan = plans.load_plan_file(CONFIGS.joinpath(name))
    if name != "default.json":
        assert name == f"device_name={plan.device_name}.json"


def test_h100_and_h200_plans():
    h100 = plans.load_plan_file(CONFIGS.joinpath("device_name=NVIDIA_H100_80GB_HBM3.json"))
    h200 = plans.load_plan_file(CONFIGS.joinpath("device_name=NVIDIA_H200.json"))
    # Measured by `eplb-compile bench --topk-plan auto` on each card (graphs/bench_results.md for the H200,
    # graphs/README.md for the H100); both cards' runs derived the same topk rows.
    assert h100.topk_plan == h200.topk_plan
    assert h200.topk_variant(2047) == "direct" and h200.topk_variant(2048) == "hist_e1"
    assert h200.topk_variant(92688) == "hist_e4_wide"
    assert (h100.count_path_min_tokens, h200.count_path_min_tokens) == (16384, 16384)


def test_cpu_and_none_get_the_default():
    default = plans.load_plan_file(CONFIGS.joinpath("default.json"))
    assert plans.plan_for_device(torch.device("cpu")).topk_plan == default.topk_plan
    assert plans.count_path_min_tokens(None) == default.count_path_min_tokens


def test_topk_variant_picks_by_numel():
    plan = plans.KernelPlan("X", ((0, "triton"), (128, "direct"), (4096, "hist_e4")), 1, "test")
    assert [plan.topk_variant(n) for n in (0, 127, 128, 4095, 4096, 10**7)] == [
        "triton", "triton", "direct", "direct", "hist_e4", "hist_e4"
    ]


def test_env_override_replaces_every_plan(tmp_path, monkeypatch):
    monkeypatch.setenv(plans.PLAN_ENV, str(_write(tmp_path)))
    plans.clear_cache()
    assert plans.count_path_min_tokens(torch.device("cpu")) == 7
    assert plans.plan_for_device(None).topk_variant(100) == "hist_e4"


@pytest.mark.parametrize("overrides, key", [
    ({"format": 2}, "'format'"),
    ({"device_name": ""}, "'device_name'"),
    ({"topk_plan": []}, "'topk_plan'"),
    ({"topk_plan": [[1, "direct"]]}, "'topk_plan'"),  # must start at 0
    ({"topk_plan": [[0, "direct"], [0, "hist_e4"]]}, "'topk_plan'"),  # ascending
    ({"topk_plan": [[0, "smem"]]}, "'topk_plan'"),  # a retired variant
    ({"count_path_min_tokens": -1}, "'count_path_min_tokens'"),
    ({"count_path_min_tokens": True}, "'count_path_min_tokens'"),
    ({"measured_with": None}, "'measured_with'"),
])
def test_bad_plan_file_names_file_and_key(tmp_path, overrides, key):
    path = _write(tmp_path, **overrides)
    with pytest.raises(plans.PlanFileError, match=f"kernel plan {path}: {key} must be"):
        plans.load_plan_file(path)


def test_unreadable_plan_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(plans.PlanFileError, match="cannot be read as JSON"):
        plans.load_plan_file(path)


@pytest.mark.parametrize("content", [
    b"\xff\xfe{\"format\": 1}",  # not UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
    b'{"format": ' + b"9" * 5000 + b"}",  # an integer past Python's conversion limit
    b"",
])
def test_malformed_plan_file_named_by_the_variable_is_one_line(tmp_path, monkeypatch, content):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    monkeypatch.setenv(plans.PLAN_ENV, str(path))
    plans.clear_cache()
    with pytest.raises(plans.PlanFileError) as raised:
        plans.count_path_min_tokens(torch.device("cpu"))
    message = str(raised.value)
    assert message.startswith(f"{plans.PLAN_ENV}={path}: kernel plan {path}: cannot be read as JSON: ")
    assert "\n" not in message


def test_cuda_source_is_shipped_and_the_package_imports_without_triton():
    assert resources.files("eplb_compile.kernels").joinpath("eplb_topk.cu").is_file()
    source = cuda_variants.kernel_source(torch.int32, 8)
    assert source.startswith("#define ID_T int\n#define K 8\n") and "eplb_map_record_direct" in source
    # A fresh interpreter: the package, the ops and the plans load without importing Triton.
    # (torch >= 2.14's own torch._dynamo imports Triton when it is installed:
    # only an import beyond what torch itself does counts.)
    code = ("import sys, torch, torch._dynamo; by_torch = 'triton' in sys.modules; "
            "import eplb_compile, eplb_compile.kernels, eplb_compile.kernels.plans, "
            "eplb_compile.kernels.cuda_variants; "
            "assert 'eplb_compile.kernels.triton_kernels' not in sys.modules, 'our Triton kernels imported'; "
            "assert by_torch or 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
