"""The CLI's main job: both lowerings agree with the reference, compiled."""

import numpy as np
import pytest
import torch

from eplb_compile.cli import main
from eplb_compile.demo import DemoConfig, Lowering, format_report, lowering_mismatches, run_demo
from eplb_compile.metrics import imbalance_max_over_mean


def test_compiled_demo_lowerings_agree_with_reference():
    cfg = DemoConfig(layers=2, ep_size=2, num_logical=6, num_redundant=2, tokens_per_rank=64, steps=5,
                     count_path_min_tokens=32)
    result = run_demo(cfg, compile=True)
    assert lowering_mismatches(result) == []
    topk, counts = result.loads["topk"], result.loads["counts"]
    assert torch.equal(topk, counts)
    # The gate really turns recording off, and on-steps really record.
    assert result.gate == [True, True, True, False, True]
    assert topk[3].sum() == 0 and all(topk[s].sum() > 0 for s in (0, 1, 2, 4))
    # Padding is dropped: never more than tokens * k per rank and layer are counted.
    assert int(topk[0].sum(-1).max()) <= cfg.ep_size * cfg.tokens_per_rank * cfg.top_k
    assert [lowering for _, lowering, _ in result.choices] == [Lowering.COUNTS, Lowering.TOPK]
    assert "counts" in format_report(cfg, result)


def test_verify_catches_a_wrong_count():
    cfg = DemoConfig(layers=1, ep_size=2, num_logical=4, num_redundant=0, tokens_per_rank=16, steps=2)
    result = run_demo(cfg, compile=False)
    assert lowering_mismatches(result) == []
    result.loads["counts"][1, 0, 0] += 1
    assert lowering_mismatches(result) == ["counts: step 1 differs from the reference by 1 counts"]


def test_cli_demo_eager_with_plot_and_window(tmp_path, capsys):
    plot, window = tmp_path / "imbalance.png", tmp_path / "window.pt"
    code = main(["demo", "--eager", "--steps", "3", "--tokens-per-rank", "32", "--plot", str(plot),
                 "--save-window", str(window)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK: topk and count lowerings gave identical global loads" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(window).shape == (3, 4, 20)
    assert main(["plot", str(window), "--ep-size", "4", "--output", str(tmp_path / "heat.png")]) == 0


def test_demo_plot_draws_gate_off_steps_as_gaps(tmp_path, capsys, monkeypatch):
    # The gate is off in step 3 of 5: nothing is recorded, so the plot has no point there (NaN breaks
    # the line), where max/mean of an empty load would read 1.00, a perfectly balanced step.
    plt = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read what it draws
    assert main(["demo", "--eager", "--steps", "5", "--tokens-per-rank", "32", "--plot", str(tmp_path / "i.png"),
                 "--save-window", str(tmp_path / "window.pt")]) == 0, capsys.readouterr().out
    loads = torch.load(tmp_path / "window.pt")
    assert loads[3].sum() == 0 and all(loads[s].sum(dim=-1).min() > 0 for s in (0, 1, 2, 4))
    recorded = [0, 1, 2, 4]
    per_layer = torch.stack([imbalance_max_over_mean(loads[s], 4) for s in recorded]).T.numpy()  # [layers, steps]
    lines = figures[0].axes[0].lines
    assert len(lines) == 2 * 4  # two lowerings x four layers
    for line in lines:
        xs, ys = list(line.get_xdata()), np.asarray(line.get_ydata(), dtype=float)
        assert xs == [0, 1, 2, 3, 4] and np.isnan(ys[3])
        assert any(np.allclose(ys[recorded], layer) for layer in per_layer)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(layers=0), "layers must be an int >= 1"), (dict(steps=-1), "steps must be an int >= 1"),
     (dict(tokens_per_rank=True), "tokens_per_rank must be an int"), (dict(ep_size=3), "ep_size=3 must divide the 20"),
     (dict(top_k=17), "top_k <= num_logical"), (dict(device="tpu"), "device must be")],
)
def test_config_refuses_what_cannot_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)
