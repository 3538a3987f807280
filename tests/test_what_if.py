"""``eplb-compile report --what-if``: predicted imbalance and switching cost, without vLLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eplb_compile.cli import main
from eplb_compile import what_if
from eplb_compile.what_if import transfers
from tests.test_place import exit_status, record


def test_transfers_one_per_rank_and_expert():
    # r0 [0, 1] -> [0, 3]: receives 3 from r1; r1 [2, 3] -> [2, 1]: receives 1 from r0.
    assert transfers(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 2, 1]), 2) == ([1, 1], [1, 1])
    # Three ranks of two slots: r0 [0, 1] -> [3, 3] gets 3 once (the second slot is a local copy);
    # r1 [2, 3] -> [0, 1] gets 0 and 1, each from its first holder r0 (r2 holds them too);
    # r2 [0, 1] -> [2, 2] gets 2 from r1.
    old, new = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 0, 1, 2, 2])
    assert transfers(old, new, 3) == ([1, 2, 1], [2, 2, 0])
    assert transfers(old, old, 3) == ([0, 0, 0], [0, 0, 0])


def test_transfers_follow_vllms_senders_and_receivers():
    execute = pytest.importorskip("vllm.distributed.eplb.rebalance_execute")
    generator = np.random.default_rng(0)
    for _ in range(200):
        ep_size, per_rank, logical = generator.integers(1, 5), generator.integers(1, 4), 0
        physical = int(ep_size * per_rank)
        logical = int(generator.integers(1, physical + 1))
        old = np.concatenate([np.arange(logical), generator.integers(0, logical, physical - logical)])
        new = np.concatenate([np.arange(logical), generator.integers(0, logical, physical - logical)])
        generator.shuffle(old), generator.shuffle(new)
        send_map, recv_map = execute.get_ep_ranks_with_experts_batch(np.unique(new), int(per_rank), old, new)
        received, sent = [0] * int(ep_size), [0] * int(ep_size)
        # vLLM's send side (move_to_buffer, rebalance_execute.py:418-433 in 0.33.0): each holder's
        # receivers, worked out from the sender's end; transfers() works from the receiver's end.
        for expert, holders in send_map.items():
            takers = recv_map[expert]
            if not holders or not takers:
                continue
            each = len(takers) // len(holders)
            for position, sender in enumerate(holders):
                destinations = takers[position * each : (position + 1) * each]
                if len(holders) * each + position < len(takers):
                    destinations.append(takers[len(holders) * each + position])
                sent[sender] += len(destinations)
                for rank in destinations:
                    received[rank] += 1
        assert transfers(torch.from_numpy(old), torch.from_numpy(new), int(ep_size)) == (received, sent)


def test_report_what_if_text_and_json(tmp_path, capsys):
    # Linear map, loads [100, 90, 10, 0] twice: r0 carries 380 of 400 (95%), max/mean 1.9; the computed
    # placement [0, 3, 2, 1] predicts 1.0 and moves expert 3 to r0 and expert 1 to r1.
    record(tmp_path / "rec", {0: [100, 90, 10, 0], 1: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    assert main(["report", str(tmp_path / "rec"), "--what-if", "--expert-bytes", "2048"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.experts" in text
    rows = [line.split() for line in text.splitlines() if "%" in line]
    line = next(row for row in rows if row[0] == "model.layers.0.mlp.experts")
    assert line[1:] == ["r0", "95.0%", "1.900", "1.000"]
    assert "2 slots change in 1 layers" in text and "r0: receives 1 experts, sends 1 (2.0 KiB in, 2.0 KiB out)" in text

    assert main(["report", str(tmp_path / "rec"), "--what-if", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["what_if"]
    layer = result["models"][0]["layers"][0]
    assert layer["hottest_rank"] == 0 and layer["hottest_share"] == pytest.approx(0.95)
    assert layer["recorded"] == pytest.approx(1.9) and layer["computed"] == pytest.approx(1.0)
    switch = result["models"][0]["switch"]["computed"]
    assert switch["experts_received"] == [1, 1] and switch["experts_sent"] == [1, 1]
    assert "bytes_received" not in switch  # no size given, none recorded


def test_report_what_if_keeps_to_the_step_range(tmp_path, capsys):
    # Step 0 skewed onto r0 (max/mean 1.9), step 1 onto r1 ([0, 10, 90, 100]: 1.9 too), both: 1.0.
    record(tmp_path / "rec", {0: [100, 90, 10, 0], 1: [0, 10, 90, 100]}, {-1: [0, 1, 2, 3]})
    wanted = {(None, None): (2, 1.0, 0.5), ("0", "1"): (1, 1.9, 0.95), ("1", None): (1, 1.9, 0.95)}
    for (first, last), (count, recorded, share) in wanted.items():
        argv = [] if first is None else ["--steps", f"{first}:{last or ''}"]
        assert main(["report", str(tmp_path / "rec"), "--what-if", "--json", *argv]) == 0
        model = json.loads(capsys.readouterr().out)["what_if"]["models"][0]
        layer = model["layers"][0]
        assert (model["steps"], layer["recorded"], layer["hottest_share"]) == (count, pytest.approx(recorded),
                                                                            pytest.approx(share))


def test_report_what_if_with_a_given_placement(tmp_path, capsys):
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    given = tmp_path / "given.json"
    assert main(["place", str(tmp_path / "rec"), "-o", str(given), "--num-redundant", "2"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "rec"), "--what-if", str(given), "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["what_if"]["models"][0]
    assert model["layers"][0]["given"] == pytest.approx(1.05)  # see test_place's redundant case
    assert model["switch"]["given"] == {"comparable": False,
                                        "reason": "the map in force has 4 slots, the placement 6"}


@pytest.mark.parametrize("argv, message", [
    (["--expert-bytes", "8"], "argument --expert-bytes: needs --what-if"),
    (["--what-if", "--expert-bytes", "0"], "argument --expert-bytes: must be an integer >= 1, got 0"),
    (["--what-if", "MISSING"], "cannot read"),
    (["--what-if", "OTHER"], "has 2 layers of 4 experts, the recording 1 of 4"),
])
def test_bad_what_if_options_are_one_line(tmp_path, capsys, argv, message):
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    record(tmp_path / "other", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]}, layers=2)
    assert main(["place", str(tmp_path / "other"), "-o", str(tmp_path / "other.json")]) == 0
    capsys.readouterr()
    argv = [{"MISSING": str(tmp_path / "missing.json"), "OTHER": str(tmp_path / "other.json")}.get(a, a) for a in argv]
    assert exit_status(["report", str(tmp_path / "rec"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_report_what_if_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    assert main(["report", str(tmp_path / "rec"), "--plot", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "model0_what_if.png").exists()  # only with --what-if
    assert main(["report", str(tmp_path / "rec"), "--what-if", "--plot", str(tmp_path / "png")]) == 0
    assert f"wrote {tmp_path / 'png' / 'model0_what_if.png'}" in capsys.readouterr().err
    assert (tmp_path / "png" / "model0_what_if.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bars(axes) -> dict[str, list[float]]:
    """Bar heights by the key their label starts with (``recorded``, ``computed: sent``, ...)."""
    return {bars.get_label().split(": predicted")[0]: [bar.get_height() for bar in bars] for bars in axes.containers}


def test_what_if_figure_draws_the_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from eplb_compile.report_plots import what_if_figure

    # r0 holds expert 0 three times, r1 experts 1-3: loads [100, 0, 50, 0, 0, 0] are 150 for expert 0, all on
    # r0 (max/mean 2.0). `place` computes [0, 0, 2 | 1, 0, 3]: 50 per replica of expert 0, r0 100 and r1 50
    # (4/3), one expert moving each way. The given placement [0, 1, 2 | 3, 3, 3] keeps 150 on r0 (2.0) and
    # moves experts 1 and 2 from r1 to r0, nothing back: per layer received [2, 0], sent [0, 2].
    record(tmp_path / "rec", {0: [100, 0, 50, 0, 0, 0]}, {-1: [0, 0, 0, 1, 2, 3]}, layers=2)
    assert main(["place", str(tmp_path / "rec"), "-o", str(tmp_path / "given.json")]) == 0
    given = json.loads((tmp_path / "given.json").read_text())
    given["models"][0]["physical_to_logical"] = [[0, 1, 2, 3, 3, 3]] * 2
    (tmp_path / "given.json").write_text(json.dumps(given))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "rec"), "--what-if", str(tmp_path / "given.json"), "--json",
                 "--expert-bytes", str(3 * 2**20)]) == 0
    result = json.loads(capsys.readouterr().out)["what_if"]
    model = result["models"][0]
    figure = what_if_figure(result, model)
    figure.canvas.draw()  # the bytes axis takes its limits from the experts axis when drawn
    imbalance, cost = figure.axes[:2]
    layers = model["layers"]
    assert _bars(imbalance) == {key: pytest.approx([layer[key] for layer in layers])
                                for key in ("recorded", "computed", "given")}
    assert _bars(imbalance) == {"recorded": pytest.approx([2.0, 2.0]), "computed": pytest.approx([4 / 3, 4 / 3]),
                                "given": pytest.approx([2.0, 2.0])}
    assert [label.get_text() for label in imbalance.get_xticklabels()] == ["model.layers.0.mlp.experts",
                                                                         "model.layers.1.mlp.experts"]
    switch = model["switch"]
    assert _bars(cost) == {f"{key}: {direction}": switch[key][f"experts_{direction}"]
                           for key in ("computed", "given") for direction in ("received", "sent")}
    assert _bars(cost) == {"computed: received": [2, 2], "computed: sent": [2, 2],  # two layers
                           "given: received": [4, 0], "given: sent": [0, 4]}
    mib = cost.child_axes[0]  # the bytes axis: 3 MiB an expert
    assert mib.get_ylabel() == "MiB" and mib.get_ylim() == pytest.approx(tuple(3 * v for v in cost.get_ylim()))


def test_what_if_figure_says_when_a_switch_is_not_comparable(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from eplb_compile.report_plots import what_if_figure

    record(tmp_path / "rec", {0: [100, 90, 10, 0]}, {-1: [0, 1, 2, 3]})
    assert main(["place", str(tmp_path / "rec"), "-o", str(tmp_path / "given.json"), "--num-redundant", "2"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "rec"), "--what-if", str(tmp_path / "given.json"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["what_if"]
    imbalance, cost = what_if_figure(result, result["models"][0]).axes[:2]
    assert _bars(imbalance)["given"] == pytest.approx([1.05])
    assert set(_bars(cost)) == {"computed: received", "computed: sent"}
    assert [text.get_text() for text in cost.texts] == [
        "given: not comparable (the map in force has 4 slots, the placement 6)"]
    assert not cost.child_axes  # no size given, none recorded: no bytes axis


def test_what_if_text_is_summarised_at_deployment_scale():
    # 58 layers, 16 ranks: layer i recorded 1 + i/100 except five planted hot layers; ranks 3 and 11 busiest.
    recorded = [1 + i / 100 for i in range(58)]
    for layer, value in {4: 3.0, 9: 2.9, 20: 2.8, 33: 2.7, 41: 2.6}.items():
        recorded[layer] = value
    layers = [{"name": f"model.layers.{i}.mlp.experts", "hottest_rank": i % 16, "hottest_share": 0.1,
               "recorded": recorded[i], "computed": 1.01} for i in range(58)]
    received, sent = [1] * 16, [1] * 16
    received[3], sent[11] = 9, 7
    result = {"policy": "DefaultEplbPolicy", "given": None, "models": [{
        "name": "m", "steps": 5, "layers": layers,
        "switch": {"computed": {"comparable": True, "slots_changed": 40, "layers_changed": 12,
                                "experts_received": received, "experts_sent": sent}}}]}
    text = what_if.format_text(result)
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("model.layers.")]
    # The ten worst as recorded, worst first: the five planted ones, then layers 57 down to 53.
    assert [row[0] for row in rows] == [f"model.layers.{i}.mlp.experts" for i in (4, 9, 20, 33, 41, 57, 56, 55, 54, 53)]
    assert "... and 48 other layers (recorded max/mean <= 1.520); --json has every layer" in text
    mean_line = next(line for line in text.splitlines() if "mean of all 58 layers" in line)
    assert mean_line.split()[-2:] == [f"{sum(recorded) / 58:.3f}", "1.010"]
    assert "40 slots change in 12 layers, 24 expert transfers" in text
    rank_lines = [line.split()[0] for line in text.splitlines() if line.startswith("    r")]
    assert rank_lines[:2] == ["r3:", "r11:"] and len(rank_lines) == 8
    assert "... and 8 other ranks (each receives <= 1, sends <= 1); --json has every rank" in text
    assert len(text.splitlines()) < 30  # against 58 layer lines and 16 rank lines unsummarised
