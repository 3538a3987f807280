"""The recorder, the Prometheus exporter and the config, in vLLM's real EPLB loop.

The 2-rank gloo loop of ``test_eplb_loop.py`` runs again with
``additional_config={"eplb_compile": {...}}`` and the step hook installed
(``eplb_step_hook.install()``, after vLLM loaded the plugin). Checked against
what vLLM itself did in the same run: the window after every step and the
maps after every rearrangement; the scraped metrics against
``eplb_compile.metrics`` on the recording.
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch

pytest.importorskip("vllm")

import eplb_loop_worker as w  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_eplb_loop import free_port, map_changes, run_ranks  # noqa: E402

from eplb_compile import metrics, recording, report  # noqa: E402
from eplb_compile.placement import torch_steps  # noqa: E402
from eplb_compile.vllm_plugin import config as plugin_config  # noqa: E402

WARNING = "cannot write to"


def two_free_ports() -> int:
    """A port p with p + 1 free too (rank r serves on p + r)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recorder")
    port = two_free_ports()
    section = {"record_dir": str(tmp / "recording"), "flush_every_steps": 2, "ring_steps": 8, "metrics_port": port,
               "per_expert_metrics": True}
    ranks, _ = run_ranks(tmp, json.dumps({"record": True, "additional_config": {"eplb_compile": section}}))
    return ranks, section["record_dir"]


def rank_recording(record_dir: str, rank: int):
    chunks = [recording.read_chunk(f) for f in sorted(glob.glob(os.path.join(record_dir, f"rank{rank}", "*")))]
    steps = torch_steps(recording.concat_chunks(chunks, 0))
    return chunks, (steps.steps, steps.load, steps.map_steps, steps.maps)


def test_recording_equals_the_window_step_by_step(recorded):
    ranks, record_dir = recorded
    for result in ranks:
        chunks, (steps, loads, _, _) = rank_recording(record_dir, result["ep_rank"])
        gated = [i for i, step in enumerate(result["steps"]) if step["gate"]]
        assert steps == gated
        for step, load in zip(steps, loads, strict=True):
            vllm_step = result["steps"][step]
            assert torch.equal(load, vllm_step["pass_before_step"])
            assert torch.equal(load, vllm_step["window"][vllm_step["window_step_before"]])
        header = chunks[0][0]
        assert (header["ep_rank"], header["ep_size"]) == (result["ep_rank"], 2)
        assert header["models"] == [{"name": w.MODEL_NAME, "num_logical": w.NUM_LOGICAL, "num_physical": 12,
                                     "window_size": w.WINDOW_SIZE,
                                     "layer_names": [f"model.layers.{i}.mlp.experts" for i in range(w.NUM_LAYERS)]}]
        assert [c[0]["chunk"] for c in chunks] == list(range(len(chunks))) and len(chunks) >= 3
        assert result["dropped"] == 0


def test_maps_are_recorded_at_start_up_and_at_each_rearrangement(recorded):
    ranks, record_dir = recorded
    for result in ranks:
        _, (_, _, map_steps, maps) = rank_recording(record_dir, result["ep_rank"])
        changes = map_changes(result["steps"])
        assert map_steps == [-1, *changes] and len(changes) >= 2
        assert torch.equal(maps[0], result["initial_map"])
        for recorded_map, step in zip(maps[1:], changes, strict=True):
            assert torch.equal(recorded_map, result["steps"][step]["physical_to_logical_after"])


def scraped_values(text: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("eplb_compile_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model"))
                values[(sample.name, labels)] = sample.value
    return values


def test_metrics_are_the_ep_global_numbers_of_the_report_on_both_lowerings(recorded):
    """Each rank records only part of the load (its experts' slice on the count path,
    its own tokens on the topk path); the gauges must still be the report's numbers,
    which sum every rank's files."""
    ranks, record_dir = recorded
    assert {step["lowering"] for step in ranks[0]["steps"] if step["gate"]} == {"counts", "topk"}
    (info, summed), = recording.read_recording(record_dir).models  # the report's reader
    summed = torch_steps(summed)
    rank_load = summed.load.reshape(len(summed.steps), w.NUM_LAYERS, 2, -1).sum(dim=-1)  # [steps, layers, ranks]
    window = summed.load[-w.WINDOW_SIZE :].sum(dim=0)
    for result in ranks:
        rank = result["ep_rank"]
        values = scraped_values(result["scraped"])
        me = ("rank", str(rank))
        assert values[("eplb_compile_recorded_steps_total", (me,))] == len(summed.steps)
        for layer in range(w.NUM_LAYERS):  # the layer label is vLLM's index, from the layer's name
            key = (("layer", str(layer)), me)
            assert values[("eplb_compile_rank_assignments_total", key)] == rank_load[:, layer, rank].sum().item()
        if rank == 0:
            assert values[("eplb_compile_window_passes", (me,))] == w.WINDOW_SIZE
            assert values[("eplb_compile_window_balancedness", (me,))] == metrics.balancedness(window, 2)
            max_over_mean, trtllm = metrics.imbalance_max_over_mean(window, 2), metrics.imbalance_trtllm(window, 2)
            for layer in range(w.NUM_LAYERS):
                key = (("layer", str(layer)), me)
                assert values[("eplb_compile_window_imbalance_max_over_mean", key)] == max_over_mean[layer].item()
                assert values[("eplb_compile_window_imbalance_trtllm", key)] == trtllm[layer].item()
        else:  # one copy of the global gauges, on rank 0
            assert not [k for k in values if k[0].startswith("eplb_compile_window_")]
        for reason in ("ring_full", "write_error"):
            assert values[("eplb_compile_dropped_steps_total", (me, ("reason", reason)))] == 0
        assert values[("eplb_compile_write_errors_total", (me,))] == 0
    # Per-expert series (asked for here): each rank's part, summed over ranks = the report's window.
    logical = torch.zeros((w.NUM_LAYERS, w.NUM_LOGICAL), dtype=torch.int64)
    for step, load in list(zip(summed.steps, summed.load, strict=True))[-w.WINDOW_SIZE :]:
        routed_by = summed.maps[max(i for i, s in enumerate(summed.map_steps) if s < step)]
        logical += metrics.logical_load(load, routed_by, w.NUM_LOGICAL)
    for layer in range(w.NUM_LAYERS):
        for expert in range(w.NUM_LOGICAL):
            total = sum(scraped_values(result["scraped"])[("eplb_compile_expert_window_assignments", (
                ("expert", str(expert)), ("layer", str(layer)), ("rank", str(result["ep_rank"]))))]
                for result in ranks)
            assert total == logical[layer, expert].item()


def test_unwritable_record_dir_warns_once_and_the_loop_keeps_running(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    section = {"record_dir": str(blocker / "recording"), "flush_every_steps": 1}
    options = {"record": True, "steps": 6, "additional_config": {"eplb_compile": section}}
    ranks, logs = run_ranks(tmp_path, json.dumps(options))
    for result, log in zip(ranks, logs, strict=True):
        assert len(result["steps"]) == 6
        assert len(re.findall(WARNING, log)) == 1, log[-3000:]
        recorded = sum(step["gate"] for step in result["steps"])
        assert recorded >= 2 and result["dropped"] == recorded  # every flush failed, none raised
        for step in result["steps"]:
            torch.testing.assert_close(step["output_on"], step["output_off"], rtol=1e-12, atol=1e-12)
    assert not blocker.is_dir()


def test_report_reads_the_recording(recorded, capsys, tmp_path):
    ranks, record_dir = recorded
    args = report_args(record_dir, "--json", "--plot", str(tmp_path / "plots"))
    assert report.report_command(args) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    (model,) = summary["models"]
    gated = [i for i, step in enumerate(ranks[0]["steps"]) if step["gate"]]
    assert [s["step"] for s in model["steps"]] == gated
    for s in model["steps"]:  # the ranks' passes summed, then eplb_compile.metrics
        total = sum(result["steps"][s["step"]]["pass_before_step"] for result in ranks)
        assert s["tokens"] == total.sum().item()
        assert s["balancedness"] == metrics.balancedness(total, 2)
        assert s["max_over_mean"] == metrics.imbalance_max_over_mean(total, 2).tolist()
    assert [c["step"] for c in model["rearrangements"]] == map_changes(ranks[0]["steps"])
    for name in ("model0_imbalance.png", "model0_heatmap.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.report_command(report_args(record_dir)) == 0
    text = capsys.readouterr().out
    assert "rearrangement at step" in text and "hottest logical experts" in text


def report_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    report.add_report_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("section, key", [
    ({"flush_every_step": 5}, "flush_every_step"),
    ({"flush_every_steps": 0}, "flush_every_steps"),
    ({"metrics_port": "9000"}, "metrics_port"),
    ({"record_dir": 3}, "record_dir"),
    ({"ring_steps": True}, "ring_steps"),
    ({"ring_steps": 10**9}, "ring_steps"),  # was accepted, then start-up tried to pin 66.8 TB
    ({"flush_every_steps": 10**12}, "flush_every_steps"),
    ({"metrics_port": 65536}, "metrics_port"),
    ({"metrics_port": 0}, "metrics_port"),
    ({"per_expert_metrics": "yes"}, "per_expert_metrics"),
])
def test_bad_additional_config_fails_at_start_up(section, key):
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed.eplb.eplb_state import EplbState

    from eplb_compile.vllm_plugin import eplb_step_hook

    eplb_step_hook.install()
    with set_current_vllm_config(VllmConfig(additional_config={"eplb_compile": section})):
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            # Fails before vLLM's add_model reads its arguments: nothing was built.
            EplbState(ParallelConfig(), torch.device("cpu")).add_model(None, None)


def test_config_is_off_by_default_and_parses_every_key():
    assert not plugin_config.from_additional_config({}).enabled
    assert not plugin_config.from_additional_config(None).enabled
    full = {"record_dir": "/r", "flush_every_steps": 7, "ring_steps": 3, "metrics_port": 9100,
            "metrics_host": "0.0.0.0", "per_expert_metrics": True}
    assert plugin_config.from_additional_config({"eplb_compile": full}) == plugin_config.ObservabilityConfig(**full)
    with pytest.raises(ValueError, match="must be a JSON object"):
        plugin_config.from_additional_config({"eplb_compile": ["record_dir"]})


def test_metrics_port_must_leave_a_port_for_every_ep_rank():
    """Rank r serves on metrics_port + r: 65535 with 2 ranks used to pass, then rank 1 died at bind."""
    config = plugin_config.from_additional_config({"eplb_compile": {"metrics_port": 65535}})
    plugin_config.check_ports(config, 1)
    with pytest.raises(ValueError, match=r"'metrics_port'\] = 65535: .* 2 EP ranks need ports up to 65536"):
        plugin_config.check_ports(config, 2)
    plugin_config.check_ports(plugin_config.from_additional_config({"eplb_compile": {"metrics_port": 65534}}), 2)


def test_a_map_rewritten_between_steps_is_filed_before_the_step_it_routes(tmp_path):
    """Fault-tolerance recovery (vLLM 0.34.0), elastic EP and ``update_mapping``
    rewrite the maps outside ``EplbState.step``; the recording must still say
    which map routed each pass."""
    record_dir = tmp_path / "recording"
    options = {"record": True, "steps": 4, "remap_before_step": 2,
               "additional_config": {"eplb_compile": {"record_dir": str(record_dir), "flush_every_steps": 1}}}
    ranks, _ = run_ranks(tmp_path, json.dumps(options))
    for result in ranks:
        _, (_, _, map_steps, maps) = rank_recording(str(record_dir), result["ep_rank"])
        remapped = result["steps"][2]["physical_to_logical"]
        assert not torch.equal(remapped, result["steps"][1]["physical_to_logical"])
        # Filed at step 1: it routed steps 2 and later (vLLM also rearranged at step 0).
        assert map_steps[-1] == 1 and 2 not in map_steps
        assert torch.equal(maps[-1], remapped)
