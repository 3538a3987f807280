"""``eplb-compile demo --record DIR``: the demo's EP group written in the recorder's format."""

from __future__ import annotations

import glob
import json

import pytest
import torch

from eplb_compile.cli import main
from eplb_compile.demo import DemoConfig, run_demo
from eplb_compile.demo_recording import write_demo_recording
from eplb_compile.recording import read_chunk, read_recording
from tests.test_place import exit_status

SMALL = ["--eager", "--layers", "2", "--ep-size", "2", "--steps", "5", "--tokens-per-rank", "64"]


@pytest.mark.parametrize("placement", ["eplb", "linear"])
def test_recording_holds_every_ranks_passes_and_the_placement(tmp_path, placement):
    cfg = DemoConfig(layers=2, ep_size=2, steps=5, tokens_per_rank=64, placement=placement)
    result = run_demo(cfg, compile=False)
    assert write_demo_recording(cfg, result, str(tmp_path)) == 4  # the gate is off at step 3
    read = read_recording(str(tmp_path))
    info, steps = read.models[0]
    assert read.ep_size == 2 and info["num_logical"] == 16 and info["num_physical"] == 20
    assert steps.steps == [0, 1, 2, 4]
    # Summed over ranks: the demo's global topk load, which the demo checks against its reference.
    assert torch.equal(torch.from_numpy(steps.load), result.loads["topk"][[0, 1, 2, 4]].long())
    for rank in range(2):
        files = sorted(glob.glob(str(tmp_path / f"rank{rank}" / "*.safetensors")))  # the data, then the closing chunk
        loads = torch.cat([torch.from_numpy(read_chunk(file)[1]["model0.load"]) for file in files])
        assert torch.equal(loads, result.rank_loads[[0, 1, 2, 4], :, rank])
    assert steps.map_steps == [-1]
    if placement == "linear":
        assert torch.equal(torch.from_numpy(steps.maps[0]), (torch.arange(20) % 16).expand(2, 20))
    assert torch.equal(torch.from_numpy(steps.maps[0]), result.physical_to_logical)


def test_cli_record_then_place_improves_a_linear_start(tmp_path, capsys):
    record = tmp_path / "rec"
    assert main(["demo", *SMALL, "--linear", "--record", str(record)]) == 0
    assert f"recorded 4 steps of 2 EP ranks into {record}" in capsys.readouterr().out
    assert main(["place", str(record), "-o", str(tmp_path / "p.json")]) == 0
    model = json.loads((tmp_path / "p.json").read_text())["models"][0]
    for recorded, predicted in zip(model["recorded_max_over_mean"], model["predicted_max_over_mean"], strict=True):
        assert predicted < recorded


def test_record_into_a_non_empty_folder_or_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    (tmp_path / "file").write_text("")
    for target, message in [("used", "is not empty"), ("file", "is a file, expected a directory"),
                            ("no/such", "does not exist")]:
        assert exit_status(["demo", *SMALL, "--record", str(tmp_path / target)]) == 2
        err = capsys.readouterr().err
        assert "argument --record: " in err and message in err and err.count("\n") == 1, err
