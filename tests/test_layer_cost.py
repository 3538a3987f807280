"""The MoE-layer cost report: tables, goals and the per-decode-step lines from a device run's JSON."""

import json

from eplb_compile.bench import layer_cost


def _row(T, layer, v033, v034, ours, map_only, empty=1.1, path="topk"):
    alone = {"vllm_0.33.0": v033, "vllm_0.34.0": v034, "ours": ours, "map_only": map_only, "empty": empty}
    return {"T": T, "ours_path": path, "problems": [], "alone_us": alone, "alone_spread_us": 0.1,
            "layer_us": layer, "layer_spread_us": 2.0, "experts_us": layer / 2, "floor_us": layer / 4,
            "active_experts": 8.0, "weight_mb": 138.0, "layer_with_us": {n: layer + us for n, us in alone.items()}}


def _write(tmp_path, rows):
    path = tmp_path / "vllm_layer_cost.json"
    path.write_text(json.dumps({"device": "GPU X", "driver": "1.2", "torch": "2.x", "triton": "3.y", "cuda": "13",
                                "copy_bandwidth_gbs": 3000.0, "rows": rows}))
    return path


def test_goals():
    met = layer_cost.goals([_row(1, 100.0, 2.3, 2.2, 1.8, 1.6), _row(512, 900.0, 3.5, 3.4, 2.8, 1.8)])
    assert met[0].endswith("met")
    assert met[1].startswith("- recording's marginal cost over map-only <= 0.3 µs at T <= 128: met")
    assert "largest 0.20 µs at T=1" in met[1]  # T=512's 1.0 µs is past the decode range
    missed = layer_cost.goals([_row(1, 100.0, 2.3, 1.7, 1.8, 1.4), _row(16, 100.0, 2.3, 2.2, 1.8, 1.6)])
    assert missed[0].endswith("MISSED at [1]")  # 1.8 > 0.34.0's 1.7
    assert "MISSED at [1]" in missed[1] and "largest 0.40 µs at T=1" in missed[1]


def test_render_writes_tables_and_decode_step(tmp_path):
    path = _write(tmp_path, [_row(1, 100.0, 2.3, 2.2, 1.8, 1.6), _row(2048, 5000.0, 6.0, 5.5, 2.5, 2.0)])
    written = layer_cost.render(path, method="Method.")
    text = (tmp_path / "vllm_layer_cost.md").read_text()
    assert written[0].name == "vllm_layer_cost.md"
    assert "GPU X (driver 1.2); torch 2.x, Triton 3.y, CUDA 13; copy bandwidth 3000 GB/s" in text
    # T, layer, experts, floor (active), 0.33, 0.34, ours (path), map only, empty, ours - map, ours/0.34, ours/0.33
    assert "| 1 | 100.0 | 50.0 | 25.0 (8) | 2.30 | 2.20 | 1.80 (topk) | 1.60 | 1.10 | 0.20 | 0.82 | 0.78 | 2.00 |" in text
    assert "| 1 | 2.30 % | 2.20 % | 1.80 % | 4.40 % | 3.60 % | 8.80 % | 7.20 % |" in text
    # 58 layers x 100 µs = 5.80 ms; 58 x 2.2 = 128 µs; 58 x 1.8 = 104 µs; saves 58 x 0.4 = 23 µs = 0.40 %
    assert "- T=1: MoE layers 5.80 ms; recording vLLM 0.33.0 133 µs, vLLM 0.34.0 128 µs, ours 104 µs " \
           "(saves 23 µs per step vs 0.34.0, 0.40 % of the MoE time); mapping alone 93 µs" in text
    assert "T=2048: MoE" not in text  # prefill sizes are not decode steps
    assert "| 1 | 100.0 | +2.3 | +2.2 | +1.8 | +1.6 | +1.1 | 2.0 |" in text  # the A/B table


def test_vllm_layer_is_the_denominator_where_timed(tmp_path):
    rows = [_row(1, 100.0, 2.3, 2.2, 1.8, 1.6), _row(16, 400.0, 2.3, 2.2, 1.8, 1.6)]
    rows[0]["vllm_layer_us"] = {"off": 50.0, "stock": 53.0, "plugin": 52.5, "standins": 79.5, "spread": 0.7}
    rows[1]["vllm_layer_us"] = {"off": 200.0, "stock": 210.0, "plugin": 210.0, "standins": 231.0, "spread": 0.3}
    layer_cost.render(_write(tmp_path, rows), method="Method.")
    text = (tmp_path / "vllm_layer_cost.md").read_text()
    # off, stock, plugin, plugin - stock, spread, stand-ins, stand-ins - stock (+50 %), grouped layer, floor, plugin / floor
    assert "| 1 | 50.0 | 53.0 | 52.5 | -0.5 | 0.7 | 79.5 | +26.5 (+50 %) | 100.0 | 25.0 | 2.10 |" in text
    # shares of vLLM's layer first (2.3 / 50, 2.2 / 50, 1.8 / 50), then 0.34.0 and ours of the grouped-GEMM layer, experts, floor
    assert "| 1 | 4.60 % | 4.40 % | 3.60 % | 2.20 % | 1.80 % | 4.40 % | 3.60 % | 8.80 % | 7.20 % |" in text
    # 58 x 50 µs = 2.90 ms; saves 58 x 0.4 = 23 µs = 0.80 % of vLLM's layer
    assert "- T=1: MoE layers 2.90 ms (vLLM's layer, EPLB off); recording vLLM 0.33.0 133 µs" in text
    assert "(saves 23 µs per step vs 0.34.0, 0.80 % of the MoE time)" in text
    assert "vLLM's layer passed its checks" in text


def test_section_for_the_bench_report(tmp_path):
    text = layer_cost.section(_write(tmp_path, [_row(1, 100.0, 2.3, 2.2, 1.8, 1.6)]))
    assert text.startswith("GPU X (driver 1.2)") and "vllm_layer_cost.json" in text
    assert "- ours <= vLLM 0.34.0's recording at every T: met" in text


def test_older_json_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "vllm_layer_cost.json"
    path.write_text(json.dumps({"device": "GPU X", "torch": "2.x", "rows": [{"T": 1, "eplb_off": 238.1}]}))
    assert layer_cost.section(path).startswith("Not shown: vllm_layer_cost.json is from the older batched-layer run")
