"""The layer-cost report: the plugin's pick per T, the two goals, the files written."""

import json

from eplb_compile.bench import layer_cost


def _row(T, layer, vllm, topk, counts):
    row = {"T": T, "eplb_off": layer, "spread_us": 1.0}
    for name, us in (("vllm", vllm), ("topk", topk), ("counts", counts)):
        row.update({f"{name}_alone_us": us, f"{name}_share_pct": 100 * us / layer, f"{name}_ab_us": us})
    return row


def test_goals_follow_the_plugins_pick(tmp_path):
    rows = [_row(1, 200.0, 2.0, 1.5, 3.0), _row(8192, 100000.0, 17.0, 3.0, 2.9)]
    lines = layer_cost.goals(rows, crossover=8192)
    assert lines[0].endswith("met")  # topk 1.5 <= 2.0 at T=1, counts 2.9 <= 17 at 8192
    assert "MISSED at 1" in lines[1] and "1: topk 1.50 µs = 0.750 %" in lines[1]
    assert "8192: counts 2.90 µs" in lines[1]
    # Below every crossover the count path would be picked nowhere: its 3.0 µs at T=1 never counts.
    below = layer_cost.goals([_row(1, 1000.0, 2.0, 1.5, 3.0)], crossover=10**9)
    assert below[1].startswith("- ours <= 0.5 % of the layer at every T: met")
    slower = layer_cost.goals([_row(1, 1000.0, 1.0, 1.5, 0.5)], crossover=10**9)
    assert slower[0].endswith("MISSED at [1]")


def test_render_writes_the_table(tmp_path):
    path = tmp_path / "vllm_layer_cost.json"
    path.write_text(json.dumps({"device": "GPU X", "torch": "2.x", "rows": [_row(16, 700.0, 2.3, 1.9, 3.1)]}))
    written = layer_cost.render(path, crossover=8192, method="Method.")
    text = (tmp_path / "vllm_layer_cost.md").read_text()
    assert written[0].name == "vllm_layer_cost.md"
    assert "| 16 | 700.0 | 2.30 | 1.90 | 3.10 |" in text and "GPU X; torch 2.x. Method." in text


def test_section_for_the_bench_report(tmp_path):
    path = tmp_path / "vllm_layer_cost.json"
    path.write_text(json.dumps({"device": "GPU X", "torch": "2.x", "rows": [_row(1, 200.0, 2.0, 1.5, 3.0)]}))
    text = layer_cost.section(path, crossover=16384)
    assert text.startswith("GPU X; torch 2.x; vllm_layer_cost.json")
    assert "| 1 | 200.0 | 2.00 | 1.50 | 3.00 |" in text and "MISSED at 1" in text
