"""``eplb-compile report`` and the recorder's file format, without vLLM.

Recordings here are written by the real :class:`Recorder` (as the step hook
drives it) from passes made up by the test; ``tests/integration/test_recorder.py``
records vLLM's own EPLB loop.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch

from eplb_compile import metrics, recording, report
from eplb_compile.recording import ModelInfo
from eplb_compile.vllm_plugin.recorder import Recorder

EP_SIZE, LAYERS, LOGICAL, PHYSICAL = 2, 3, 6, 8
INFO = ModelInfo("tiny", [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)], LOGICAL, PHYSICAL, 2)
VERSIONS = {"vllm_version": "0.33.0", "eplb_compile_version": "test"}


def make_recorder(record_dir, rank: int, **kwargs) -> Recorder:
    options = {"flush_every_steps": 2, "ring_steps": 16, **kwargs}
    recorder = Recorder(record_dir=str(record_dir), ep_rank=rank, ep_size=EP_SIZE, versions=VERSIONS, **options)
    recorder.add_model(INFO)
    return recorder


def make_recording(record_dir, steps=(0, 1, 3, 4, 6), rearrange_at=3, seed=0) -> dict:
    """Both ranks record ``steps``; the map changes at step ``rearrange_at``."""
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]).expand(LAYERS, -1).clone()]
    maps.append(maps[0].clone())
    maps[1][1] = torch.tensor([5, 4, 3, 2, 1, 0, 5, 5])  # layer 1 changes, the others keep theirs
    passes = {}
    for rank in range(EP_SIZE):
        recorder = make_recorder(record_dir, rank)
        recorder.on_map(0, -1, maps[0])
        for step in steps:
            passes[rank, step] = torch.randint(0, 50, (LAYERS, PHYSICAL), generator=generator, dtype=torch.int32)
            recorder.on_pass(0, step, passes[rank, step])
            if step == rearrange_at:
                recorder.on_map(0, step, maps[1])
        recorder.close()
    return {"passes": passes, "maps": maps, "steps": list(steps)}


def run_report(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    report.add_report_arguments(parser)
    return report.report_command(parser.parse_args(list(argv)))


def test_report_sums_ranks_and_maps_with_the_map_each_pass_was_routed_by(tmp_path, capsys):
    made = make_recording(tmp_path)
    assert run_report(str(tmp_path), "--json", "--top", "2") == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert [s["step"] for s in model["steps"]] == made["steps"]
    logical = torch.zeros((LAYERS, LOGICAL), dtype=torch.int64)
    for s in model["steps"]:
        total = made["passes"][0, s["step"]] + made["passes"][1, s["step"]]
        assert s["tokens"] == total.sum().item()
        assert s["balancedness"] == metrics.balancedness(total, EP_SIZE)
        assert s["max_over_mean"] == metrics.imbalance_max_over_mean(total, EP_SIZE).tolist()
        assert s["trtllm"] == metrics.imbalance_trtllm(total, EP_SIZE).tolist()
        routed_by = made["maps"][0] if s["step"] <= 3 else made["maps"][1]  # step 3's pass predates its map
        for layer in range(LAYERS):
            for physical in range(PHYSICAL):
                logical[layer, routed_by[layer, physical]] += total[layer, physical]
    assert model["logical_load"] == logical.tolist()
    for layer, hot in enumerate(model["hottest"]):
        assert [h["tokens"] for h in hot] == sorted(logical[layer].tolist(), reverse=True)[:2]
    (change,) = model["rearrangements"]
    assert change["step"] == 3
    assert [c["layer"] for c in change["layers"]] == [1]
    assert change["layers"][0]["slots_changed"] == 8
    assert change["layers"][0]["replicas_gained"] == [5] and change["layers"][0]["replicas_lost"] == [0, 1]


def test_text_report_and_plots(tmp_path, capsys):
    make_recording(tmp_path / "rec")
    assert run_report(str(tmp_path / "rec"), "--plot", str(tmp_path / "png")) == 0
    text = capsys.readouterr().out
    assert "model tiny: 3 layers, 6 logical / 8 physical experts, 5 recorded steps, 1 rearrangement" in text
    assert "1 rearrangements" not in text
    assert "rearrangement at step 3: 1 of 3 layers changed" in text
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["model0_heatmap.png", "model0_imbalance.png"]


def one_line_error(capsys, *argv) -> str:
    assert run_report(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def test_a_truncated_file_is_read_around_and_said(tmp_path, capsys):
    made = make_recording(tmp_path)
    chunk = tmp_path / "rank1" / "chunk-000001.safetensors"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    assert run_report(str(tmp_path), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [0, 1, 6]  # rank 1's steps 3 and 4 are gone
    assert model["steps"][-1]["tokens"] == (made["passes"][0, 6] + made["passes"][1, 6]).sum().item()
    lost, left_out = summary["damage"]
    assert lost.startswith("rank 1 chunk 1 lost: ") and "chunk-000001.safetensors: truncated or corrupt" in lost
    assert lost.endswith("its steps after 1 and before 6 and any map committed then are not in the recording of rank 1")
    assert left_out == "model 'tiny': steps 3-4 left out: not recorded by every rank"


def test_folder_that_is_not_a_recording(tmp_path, capsys):
    assert "not a recording (no such folder)" in one_line_error(capsys, str(tmp_path / "absent"))
    assert "not a recording (no rank*/chunk-*.safetensors files)" in one_line_error(capsys, str(tmp_path))
    from safetensors.torch import save_file

    (tmp_path / "rank0").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "rank0" / "chunk-000000.safetensors"))
    assert "not a recording (no 'eplb_compile' header)" in one_line_error(capsys, str(tmp_path))


def test_unknown_format_version(tmp_path, capsys):
    from safetensors.numpy import save_file

    make_recording(tmp_path)  # then rewritten as a newer eplb_compile would write it (one such chunk among
    for path in map(str, tmp_path.glob("rank*/chunk-*.safetensors")):  # readable ones is read around)
        header, tensors = recording.read_chunk(path)
        save_file(tensors, path, metadata={"eplb_compile": json.dumps({**header, "version": 99})})
    assert "unknown format version 99 (this eplb_compile reads version 2)" in one_line_error(capsys, str(tmp_path))


def test_missing_rank(tmp_path, capsys):
    make_recording(tmp_path)
    for chunk in (tmp_path / "rank1").iterdir():
        chunk.unlink()
    assert "ranks [0] recorded, but ep_size is 2" in one_line_error(capsys, str(tmp_path))


def test_steps_not_flushed_by_every_rank_are_left_out(tmp_path, capsys):
    make_recording(tmp_path)
    (tmp_path / "rank1" / "chunk-000002.safetensors").unlink()  # rank 1 killed before its last flush
    assert run_report(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "rank 1: no closing chunk (the recorder was killed, or is still running): steps after 4" in out
    assert "steps 6 left out: not recorded by every rank" in out


def test_unwritable_folder_warns_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    recorder = make_recorder(blocker / "rec", 0, flush_every_steps=1)
    with caplog.at_level(logging.WARNING):
        recorder.on_map(0, -1, torch.zeros((LAYERS, PHYSICAL), dtype=torch.int64))
        for step in range(5):
            recorder.on_pass(0, step, torch.ones((LAYERS, PHYSICAL), dtype=torch.int32))
        recorder.close()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"eplb_compile recorder: cannot write to {blocker / 'rec'}"
    ]
    assert recorder.dropped == 5


def test_a_full_ring_drops_passes_with_one_warning(tmp_path, caplog):
    recorder = make_recorder(tmp_path, 0, ring_steps=2)
    with caplog.at_level(logging.WARNING):
        recorder.on_map(0, -1, torch.zeros((LAYERS, PHYSICAL), dtype=torch.int64))
        recorder._rings[0][-1].get()  # hold both slots, as a stalled writer thread would
        recorder._rings[0][-1].get()
        for step in range(3):
            recorder.on_pass(0, step, torch.ones((LAYERS, PHYSICAL), dtype=torch.int32))
        recorder.close()
    assert recorder.dropped == 3
    assert len(caplog.records) == 1 and "fell 2 steps behind" in caplog.records[0].getMessage()


def test_files_are_written_whole_or_not_at_all(tmp_path):
    make_recording(tmp_path)
    names = sorted(p.name for p in (tmp_path / "rank0").iterdir())
    assert names == [f"chunk-{i:06d}.safetensors" for i in range(3)]  # no temporary left behind
    header, tensors = recording.read_chunk(str(tmp_path / "rank0" / names[0]))
    assert header["format"] == "eplb_compile.recording" and header["version"] == 2
    assert header["models"][0]["layer_names"] == INFO.layer_names
    assert tensors["model0.load"].dtype == np.int32 and tensors["model0.load"].shape == (2, LAYERS, PHYSICAL)


@pytest.mark.parametrize("argv, message", [
    (["--top", "-1"], "argument --top: must be an integer >= 1, got -1"),
    (["--top", "0"], "argument --top: must be an integer >= 1, got 0"),
    (["--steps", "5:3"], "argument --steps: must be A:B with A < B, got '5:3'"),
    (["--steps", "7"], "argument --steps: must be A:B with integers A < B"),
])
def test_bad_options_are_one_line_before_anything_is_read(tmp_path, capsys, argv, message):
    from eplb_compile.cli import main

    make_recording(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path), *argv])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_plot_paths_are_checked_before_the_report_prints(tmp_path, capsys):
    make_recording(tmp_path / "rec")
    (tmp_path / "a_file").write_text("")
    assert "argument --plot: " in one_line_error(capsys, str(tmp_path / "rec"), "--plot", str(tmp_path / "a_file"))
    absent = tmp_path / "absent" / "plots"
    assert "does not exist" in one_line_error(capsys, str(tmp_path / "rec"), "--plot", str(absent))
    assert not (tmp_path / "absent").exists()


def test_a_step_range_keeps_its_steps_and_its_rearrangements(tmp_path, capsys):
    made = make_recording(tmp_path)
    assert run_report(str(tmp_path), "--json", "--steps", "3:6") == 0
    summary = json.loads(capsys.readouterr().out)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [3, 4] and summary["step_range"] == [3, 6]
    assert [c["step"] for c in model["rearrangements"]] == [3]
    logical = torch.zeros((LAYERS, LOGICAL), dtype=torch.int64)
    for step, routed_by in ((3, 0), (4, 1)):  # step 3 predates the map committed at 3
        logical += metrics.logical_load(made["passes"][0, step] + made["passes"][1, step], made["maps"][routed_by],
                                        LOGICAL)
    assert model["logical_load"] == logical.tolist()
    assert run_report(str(tmp_path), "--json", "--steps", "4:") == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert [s["step"] for s in model["steps"]] == [4, 6] and model["rearrangements"] == []


def test_plots_stop_their_lines_at_unrecorded_steps():
    import math

    from eplb_compile.report_plots import with_gaps

    xs, ys = with_gaps([3, 4, 9, 10, 11, 20], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert [x if not math.isnan(x) else None for x in xs] == [3, 4, None, 9, 10, 11, None, 20]
    assert [y if not math.isnan(y) else None for y in ys] == [1.0, 2.0, None, 3.0, 4.0, 5.0, None, 6.0]


def test_a_pause_file_stops_writing_passes_and_the_report_says_so(tmp_path, capsys, caplog):
    passes = {}
    with caplog.at_level(logging.INFO, logger="eplb_compile.vllm_plugin.recorder"):
        for rank in range(EP_SIZE):
            recorder = make_recorder(tmp_path, rank)
            recorder.on_map(0, -1, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]).expand(LAYERS, -1).clone())
            for step in range(6):
                (tmp_path / "PAUSE").touch() if step == 2 else None
                (tmp_path / "PAUSE").unlink() if step == 4 else None
                passes[rank, step] = torch.full((LAYERS, PHYSICAL), step + 1, dtype=torch.int32)
                recorder.on_pass(0, step, passes[rank, step])
                recorder.wait_idle()  # the writer thread looks for the file when it takes the pass
            recorder.close()
            assert recorder.counters["paused_steps"] == 2 and recorder.dropped == 0
    switches = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert switches == ["eplb_compile recorder: rank 0 paused recording", "eplb_compile recorder: rank 0 resumed recording",
                        "eplb_compile recorder: rank 1 paused recording", "eplb_compile recorder: rank 1 resumed recording"]
    read = recording.read_recording(str(tmp_path))
    (_, steps), = read.models
    assert list(steps.steps) == [0, 1, 4, 5]
    assert not read.damage  # a pause is not a loss
    assert run_report(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "ranks 0, 1: 2 recorded steps not written while record_dir/PAUSE existed" in out


def test_a_restarted_server_never_writes_over_the_earlier_runs_recording(tmp_path, caplog):
    make_recording(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    with caplog.at_level(logging.WARNING):
        recorder = make_recorder(tmp_path, 0)  # the same record_dir, chunk numbers from 0 again
        recorder.on_map(0, -1, torch.zeros((LAYERS, PHYSICAL), dtype=torch.int64))
        for step in range(4):
            recorder.on_pass(0, step, torch.ones((LAYERS, PHYSICAL), dtype=torch.int32))
        recorder.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"eplb_compile recorder: {tmp_path / 'rank0'} holds an earlier run's recording; not recording "
        f"(point record_dir at a new or empty folder)"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")} == before


def test_a_pause_counts_steps_not_each_models_pass(tmp_path):
    recorder = make_recorder(tmp_path, 0, flush_every_steps=100)
    recorder.add_model(ModelInfo("drafter", ["model.layers.9.mlp.experts"], LOGICAL, PHYSICAL, 2))
    for model, layers in ((0, LAYERS), (1, 1)):
        recorder.on_map(model, -1, torch.zeros((layers, PHYSICAL), dtype=torch.int64))
    recorder.on_pass(0, 0, torch.ones((LAYERS, PHYSICAL), dtype=torch.int32))
    recorder.wait_idle()
    (tmp_path / "PAUSE").touch()
    for step in (1, 2, 3):
        recorder.on_pass(0, step, torch.ones((LAYERS, PHYSICAL), dtype=torch.int32))
        recorder.on_pass(1, step, torch.ones((1, PHYSICAL), dtype=torch.int32))
    recorder.wait_idle()
    assert recorder.counters["paused_steps"] == 3
    # Step 0, recorded before the pause, was written when the pause began, not left pending.
    header, tensors = recording.read_chunk(str(tmp_path / "rank0" / "chunk-000000.safetensors"))
    assert tensors["model0.steps"].tolist() == [0]
    recorder.close()
