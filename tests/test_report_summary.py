"""``eplb-compile report`` at scale: no torch on its path, and text that summarises.

The time and memory on a DeepSeek-V3-shaped recording are measured by the
benchmark script ``tests/report_scale.py``, not here.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch
from tests.test_report import make_recording, run_report

from eplb_compile import metrics, report_text
from eplb_compile.recording import ModelInfo
from eplb_compile.vllm_plugin.recorder import Recorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLI as `python -m eplb_compile` runs it, then whether torch was imported.
RUN_CLI = "import sys; from eplb_compile.cli import main; code = main(sys.argv[1:]); print(code, 'torch' in sys.modules)"


def run_cli_in_a_fresh_python(*argv: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", RUN_CLI, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    *out, last = done.stdout.splitlines()
    return "\n".join(out), last


def test_the_report_imports_no_torch(tmp_path):
    make_recording(tmp_path)
    for extra in ([], ["--json"], ["--steps", "1:5", "--top", "2"]):
        out, last = run_cli_in_a_fresh_python("report", str(tmp_path), *extra)
        assert last == "0 False", f"report {extra}: torch was imported"
        assert "model tiny" in out or '"name": "tiny"' in out
    _, last = run_cli_in_a_fresh_python("report", str(tmp_path), "--what-if")  # vLLM's policy: torch, as expected
    assert last == "0 True"
    done = subprocess.run([sys.executable, "-c", "import sys, eplb_compile; eplb_compile.__version__; "
                           "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


EP, LAYERS, LOGICAL, PHYSICAL = 10, 12, 16, 20  # past the text's limits of 8 ranks and 10 layers
STEPS = list(range(0, 48, 2))  # 24 steps: past its limit of 20


def make_big_recording(record_dir) -> dict[tuple[int, int], torch.Tensor]:
    """Layer l's extra load is on EP rank l % EP's experts and grows with l: the worst layers are the last
    ones, ranks 1 and 0 (two layers each) the hottest, then 9, 8, ... 2."""
    info = ModelInfo("big", [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)], LOGICAL, PHYSICAL, 64)
    generator = torch.Generator().manual_seed(3)
    per_rank = PHYSICAL // EP
    passes = {}
    for rank in range(EP):
        recorder = Recorder(record_dir=str(record_dir), ep_rank=rank, ep_size=EP, flush_every_steps=5, ring_steps=32,
                            versions={"vllm_version": "0.33.0", "eplb_compile_version": "test"})
        recorder.add_model(info)
        recorder.on_map(0, -1, (torch.arange(PHYSICAL) % LOGICAL).expand(LAYERS, -1).clone())
        for step in STEPS:
            load = 100 + step + torch.randint(0, 4, (LAYERS, PHYSICAL), generator=generator)
            if rank == 0:
                for layer in range(LAYERS):
                    hot = layer % EP
                    load[layer, hot * per_rank:(hot + 1) * per_rank] += 50 * (layer + 1)
            passes[rank, step] = load.to(torch.int32)
            recorder.on_pass(0, step, passes[rank, step])
        recorder.close()
    return passes


def test_many_steps_layers_and_ranks_are_summarised(tmp_path, capsys):
    passes = make_big_recording(tmp_path)
    assert run_report(str(tmp_path)) == 0
    text = capsys.readouterr().out
    totals = {step: sum(passes[rank, step] for rank in range(EP)) for step in STEPS}
    balanced = [metrics.balancedness(totals[step], EP) for step in STEPS]
    mean_max_over_mean = [statistics.fmean(metrics.imbalance_max_over_mean(totals[step], EP).tolist())
                          for step in STEPS]
    assert "24 steps (0 to 46), min / median / mean / max:" in text
    assert (f"    balancedness   {min(balanced):.4f} / {statistics.median(balanced):.4f} / "
            f"{statistics.fmean(balanced):.4f} / {max(balanced):.4f}") in text
    assert (f"    mean max/mean  {min(mean_max_over_mean):.3f} / {statistics.median(mean_max_over_mean):.3f} / "
            f"{statistics.fmean(mean_max_over_mean):.3f} / {max(mean_max_over_mean):.3f}") in text
    worst = STEPS[balanced.index(min(balanced))]
    assert f"  worst step {worst}: balancedness {min(balanced):.4f}," in text
    assert "every step: --json (steps[]) or --plot DIR" in text
    assert not [line for line in text.splitlines() if line.startswith(f"  {'46':>6} ")]  # no per-step table
    # Per layer: the 10 worst (the skew grows with the layer), then the count of the others.
    per_layer = [line for line in text.splitlines() if line.startswith("    L") and "max/mean" in line
                 and "trtllm" in line]
    assert [line.split()[0] for line in per_layer] == [f"L{layer}" for layer in range(11, 1, -1)]
    assert "    ... and 2 other layers (worst max/mean <= " in text
    # Per rank: the 8 hottest of 10, by share of every assignment, with the layers each is the hottest of.
    rank_load = torch.stack([totals[step] for step in STEPS]).sum(dim=0).reshape(LAYERS, EP, -1).sum(dim=-1)
    share = rank_load.sum(dim=0) / rank_load.sum()
    hottest_of = torch.bincount(rank_load.argmax(dim=1), minlength=EP)
    lines = [line for line in text.splitlines() if line.startswith("    r")]
    expected_order = sorted(range(EP), key=lambda r: -share[r].item())[:8]
    assert expected_order == [1, 0, 9, 8, 7, 6, 5, 4]  # the recording is what it means to be
    assert [line.split(":")[0].strip() for line in lines] == [f"r{r}" for r in expected_order]
    for line, rank in zip(lines, expected_order, strict=True):
        assert line == (f"    r{rank}: {100 * share[rank].item():.1f}% ({int(rank_load[:, rank].sum())} assignments), "
                        f"hottest in {int(hottest_of[rank])} of {LAYERS} layers")
    assert "    ... and 2 other ranks; --json has every rank" in text


def test_json_keeps_every_step_layer_and_rank(tmp_path, capsys):
    passes = make_big_recording(tmp_path)
    assert run_report(str(tmp_path), "--json") == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert [s["step"] for s in model["steps"]] == STEPS and all(len(s["max_over_mean"]) == LAYERS
                                                                 for s in model["steps"])
    assigned = [sum(int(passes[r, step].reshape(LAYERS, EP, -1)[:, rank].sum()) for r in range(EP) for step in STEPS)
                for rank in range(EP)]
    assert [r["assignments"] for r in model["ranks"]] == assigned
    assert [r["rank"] for r in model["ranks"]] == list(range(EP))


def test_a_small_recording_keeps_its_detail(tmp_path, capsys):
    made = make_recording(tmp_path)
    assert run_report(str(tmp_path)) == 0
    text = capsys.readouterr().out
    for step in made["steps"]:  # a line per step
        assert [line for line in text.splitlines() if line.startswith(f"  {step:>6} ")]
    assert "min / median / mean / max" not in text and "other layers" not in text
    assert sum(line.startswith("    L") and "trtllm" in line for line in text.splitlines()) == 3
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("    r")] == ["    r0", "    r1"]


def test_long_replica_lists_are_cut_in_the_text_only():
    assert report_text._ids(list(range(8))) == str(list(range(8)))
    assert report_text._ids(list(range(11))) == "[0, 1, 2, 3, 4, 5, 6, 7, ... 3 more]"
