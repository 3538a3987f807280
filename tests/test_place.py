"""``eplb-compile place``, the placement file and the peers' formats, without vLLM.

Recordings are written by the real :class:`Recorder`; expected placements and
imbalances are worked out by hand in the comments.
"""

from __future__ import annotations

import json

import pytest
import torch

from eplb_compile.cli import main
from eplb_compile.placement import PlacementError, load_placement
from eplb_compile.recording import ModelInfo
from eplb_compile.vllm_plugin.recorder import Recorder

EP_SIZE = 2
VERSIONS = {"vllm_version": "0.33.0", "eplb_compile_version": "test"}


def record(record_dir, passes: dict[int, list[int]], maps: dict[int, list[int]], layers: int = 1,
           first_layer: int = 0, num_logical: int = 4) -> None:
    """Every layer sees ``passes[step]`` (global physical load, split over the two ranks); ``maps[step]``
    is committed at ``step`` (-1: start-up)."""
    num_physical = len(maps[-1])
    info = ModelInfo("tiny", [f"model.layers.{first_layer + i}.mlp.experts" for i in range(layers)],
                     num_logical, num_physical, 8)
    for rank in range(EP_SIZE):
        recorder = Recorder(record_dir=str(record_dir), ep_rank=rank, ep_size=EP_SIZE, versions=VERSIONS,
                            flush_every_steps=2, ring_steps=64)
        recorder.add_model(info)
        recorder.on_map(0, -1, torch.tensor(maps[-1]).expand(layers, -1).clone())
        for step, load in sorted(passes.items()):
            half = torch.tensor(load) // 2 if rank == 0 else torch.tensor(load) - torch.tensor(load) // 2
            recorder.on_pass(0, step, half.expand(layers, -1).clone().to(torch.int32))
            if step in maps:
                recorder.on_map(0, step, torch.tensor(maps[step]).expand(layers, -1).clone())
        recorder.close()


def exit_status(argv: list[str]) -> int:
    """``main``'s status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def place(tmp_path, *options) -> dict:
    out = tmp_path / "placement.json"
    assert main(["place", str(tmp_path / "rec"), "-o", str(out), *options]) == 0
    return json.loads(out.read_text())


def test_hot_pair_on_one_rank_is_split(tmp_path, capsys):
    # Linear map: rank 0 owns experts 0, 1 (load 100 + 90), rank 1 owns 2, 3 (10 + 0): max/mean 190/100.
    record(tmp_path / "rec", {0: [100, 90, 10, 0], 1: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    placement = place(tmp_path)
    model = placement["models"][0]
    # Heaviest first into the lighter rank: 0 -> r0, 1 -> r1, 2 -> r1 (90 < 100), 3 -> r0 (r1 full);
    # experts staying on their rank keep their start-up slot: r0 [0, 3], r1 [2, 1].
    assert model["physical_to_logical"] == [[0, 3, 2, 1]]
    assert model["recorded_max_over_mean"] == [pytest.approx(1.9)]
    assert model["predicted_max_over_mean"] == [pytest.approx(1.0)]
    assert model["steps"] == {"first": 0, "last": 1, "count": 2}
    assert placement["ep_size"] == 2 and model["num_redundant"] == 0
    assert "model.layers.0.mlp.experts: 1.900 -> 1.000" in capsys.readouterr().out


def test_passes_are_mapped_with_the_map_they_were_routed_by_and_steps_select(tmp_path):
    # From step 1 on the map is reversed, so the physical load [0, 10, 90, 100] at steps 2 and 3 is
    # logical [100, 90, 10, 0] again; step 0 (routed by the start-up map) is all on expert 3.
    record(tmp_path / "rec", {0: [0, 0, 0, 500], 1: [0, 0, 0, 0], 2: [0, 10, 90, 100], 3: [0, 10, 90, 100]},
           {-1: [0, 1, 2, 3], 1: [3, 2, 1, 0]})
    model = place(tmp_path, "--steps", "2:")["models"][0]
    assert model["steps"] == {"first": 2, "last": 3, "count": 2}
    assert model["predicted_max_over_mean"] == [pytest.approx(1.0)]
    assert model["physical_to_logical"] == [[0, 3, 2, 1]]
    # Steps 0 to 1 alone: logical load [0, 0, 0, 500]; one expert cannot be split without redundancy.
    model = place(tmp_path, "--steps", ":2")["models"][0]
    assert model["predicted_max_over_mean"] == [pytest.approx(2.0)]
    # All steps: logical [200, 180, 20, 500] (read with the identity map everywhere it would be
    # [0, 20, 180, 700]). Packing: 3 -> r0, 0 -> r1, 1 -> r1 (200 < 500), 2 -> r0; no expert stays on
    # its start-up rank, so the slots fill in packing order. Ranks 520 and 380: max/mean 520/450.
    model = place(tmp_path)["models"][0]
    assert model["physical_to_logical"] == [[3, 2, 0, 1]]
    assert model["predicted_max_over_mean"] == [pytest.approx(520 / 450)]


def test_redundant_experts_replicate_the_hot_ones(tmp_path):
    # 6 slots: the two redundant ones replicate expert 0 (100/2 = 50) and then expert 1 (90/2 = 45).
    # Packing 50, 50, 45, 45, 10, 0 three per rank gives ranks of 105 and 95: max/mean 1.05.
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    model = place(tmp_path, "--num-redundant", "2")["models"][0]
    table = torch.tensor(model["physical_to_logical"])
    assert table.shape == (1, 6) and model["num_physical"] == 6
    assert sorted(table[0, :3].tolist()) in ([0, 1, 2], [0, 1, 3])
    assert sorted(table[0].tolist()) == [0, 0, 1, 1, 2, 3]
    assert model["predicted_max_over_mean"] == [pytest.approx(1.05)]


def test_peer_formats(tmp_path):
    # Recorded MoE layers are the model's layers 1 and 2 (layer 0 dense, as DeepSeek's first layers).
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]}, layers=2, first_layer=1)
    sglang, jsonl = tmp_path / "sglang.json", tmp_path / "mapping.jsonl"
    place(tmp_path, "--sglang", str(sglang), "--initial-mapping", str(jsonl))
    assert json.loads(sglang.read_text()) == {"physical_to_logical_map": [[0, 1, 2, 3], [0, 3, 2, 1], [0, 3, 2, 1]]}
    lines = jsonl.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{
        "record_type": "eplb_initial_mapping", "version": 1, "num_redundant_experts": 0, "num_slots": 4,
        "initial_global_assignments": {"0": [0, 3, 2, 1], "1": [0, 3, 2, 1]}}]


def test_placement_file_round_trips_and_bad_ones_are_one_line(tmp_path):
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    place(tmp_path)
    good = json.loads((tmp_path / "placement.json").read_text())
    loaded = load_placement(str(tmp_path / "placement.json"))
    assert torch.equal(loaded["models"][0]["physical_to_logical"], torch.tensor([[0, 3, 2, 1]]))

    def broken(change, text=None) -> str:
        bad = json.loads(json.dumps(good))
        change(bad)
        path = tmp_path / "bad.json"
        path.write_text(text if text is not None else json.dumps(bad))
        with pytest.raises(PlacementError) as error:
            load_placement(str(path))
        assert "\n" not in str(error.value)
        return str(error.value)

    table = lambda p: p["models"][0]  # noqa: E731
    assert "truncated" in broken(lambda p: None, text=json.dumps(good)[:40])
    assert "not a placement" in broken(lambda p: p.update(format="other"))
    assert "unknown placement version 7" in broken(lambda p: p.update(version=7))
    assert "no replica of logical expert 1" in broken(lambda p: table(p).update(physical_to_logical=[[0, 3, 2, 0]]))
    assert "holds expert 9" in broken(lambda p: table(p).update(physical_to_logical=[[0, 3, 2, 9]]))
    assert "expected [1 layers, 4 slots]" in broken(lambda p: table(p).update(physical_to_logical=[[0, 3, 2]]))
    assert "do not split evenly over EP size 3" in broken(lambda p: p.update(ep_size=3))
    assert "missing or malformed 'layer_names'" in broken(lambda p: table(p).pop("layer_names"))


@pytest.mark.parametrize("options, message", [
    (["--steps", "x"], "step range must be A:B"),
    (["--steps", "5:3"], "is empty"),
    (["--steps", "10:"], "no recorded step in --steps 10:"),
    (["--ep-size", "3"], "do not split evenly over EP size 3"),
    (["--ep-size", "0"], "argument --ep-size: must be an integer >= 1"),
    (["--num-redundant", "-1"], "argument --num-redundant: must be an integer >= 0"),
    (["--num-groups", "3"], "--num-groups 3 does not divide the 4 logical experts"),
    (["--num-nodes", "4"], "--num-nodes 4 does not divide the EP size 2"),
    (["-o", "/nonexistent/p.json"], "directory '/nonexistent' does not exist"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, options, message):
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    argv = ["place", str(tmp_path / "rec"), "-o", str(tmp_path / "p.json"), *options]
    status = exit_status(argv)
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.json").exists()


def test_not_a_recording_is_one_line(tmp_path, capsys):
    assert main(["place", str(tmp_path / "missing"), "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "not a recording" in err and err.count("\n") == 1


def test_without_vllm_our_policy_places_the_same(tmp_path, monkeypatch):
    from eplb_compile import rebalance

    record(tmp_path / "rec", {0: [100, 90, 10, 0], 1: [7, 300, 5, 1]}, {-1: [0, 1, 2, 3]})
    with_vllm = place(tmp_path, "--num-redundant", "2")
    monkeypatch.setattr(rebalance, "vllm_policy", lambda: None)
    without = place(tmp_path, "--num-redundant", "2")
    assert without["policy"] == "eplb_compile"
    assert without["models"] == with_vllm["models"]
