"""The Grafana dashboard's queries, through a real Prometheus scraping a real recording run.

Debian's ``prometheus`` (2.42; ``apt-get install prometheus``) is started on
127.0.0.1 with a 1 s scrape of both exporters of the 2-rank gloo loop of
``test_recorder.py`` (vLLM's real ``EplbState``, the lowering alternating
between the count and topk paths). Once every pass is in the exporters, the
workers keep serving until Prometheus has scraped them; then every panel's
PromQL query of ``vllm_plugin/grafana_dashboard.json`` is evaluated through
Prometheus's HTTP API and compared with what ``eplb-compile report``'s reader
computes from the files of the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")
if shutil.which("prometheus") is None:
    pytest.skip("no prometheus binary (Debian: apt-get install prometheus)", allow_module_level=True)

import eplb_loop_worker as w  # noqa: E402
from test_eplb_loop import free_port, run_ranks  # noqa: E402
from test_recorder import two_free_ports  # noqa: E402

from eplb_compile import metrics, recording  # noqa: E402
from eplb_compile.placement import torch_steps  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "eplb_compile" / "vllm_plugin" / "grafana_dashboard.json"


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as reply:
        answer = json.load(reply)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def start_prometheus(tmp: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "eplb_compile", "static_configs": [{"targets": targets}]}],
    }))
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "prometheus.log", "w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A finished recording run, and every dashboard query's answer while its exporters served the end state."""
    tmp = tmp_path_factory.mktemp("prometheus")
    port = two_free_ports()
    prometheus, base = start_prometheus(tmp, [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    release = tmp / "release"
    section = {"record_dir": str(tmp / "recording"), "flush_every_steps": 2, "metrics_port": port}
    options = {"record": True, "hold_metrics": str(release), "additional_config": {"eplb_compile": section}}
    run: dict = {}
    runner = threading.Thread(target=lambda: run.update(ranks=run_ranks(tmp, json.dumps(options))[0]))
    runner.start()
    try:
        deadline = time.monotonic() + 400
        ready = [Path(f"{release}.rank{r}.ready") for r in range(2)]
        while not all(p.exists() for p in ready) and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(p.exists() for p in ready), "the ranks did not finish their steps"
        served_since = max(float(p.read_text()) for p in ready)
        # Wait for a scrape of both ranks that started after every pass was in the exporters.
        while time.monotonic() < deadline:
            stamps = query(base, "timestamp(eplb_compile_recorded_steps_total)")
            if len(stamps) == 2 and min(float(s["value"][1]) for s in stamps) > served_since + 1:
                break
            time.sleep(0.5)
        answers = {}
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            (target,) = panel["targets"]
            expr = target["expr"].replace("$model", ".*").replace("$__rate_interval", "1m")
            answers[panel["title"]] = query(base, expr)
    finally:
        release.write_text("")
        runner.join(timeout=300)
        prometheus.terminate()
        prometheus.wait(timeout=30)
    return run["ranks"], section["record_dir"], answers


def by_labels(result: list[dict], *names: str) -> dict[tuple, float]:
    return {tuple(series["metric"].get(n) for n in names): float(series["value"][1]) for series in result}


def test_every_panel_returns_the_reports_numbers(scraped):
    ranks, record_dir, answers = scraped
    (info, summed), = recording.read_recording(record_dir).models  # what eplb-compile report reads
    summed = torch_steps(summed)
    assert {s["lowering"] for s in ranks[0]["steps"] if s["gate"]} == {"counts", "topk"}
    layers = [str(layer) for layer in range(w.NUM_LAYERS)]
    window = summed.load[-w.WINDOW_SIZE :].sum(dim=0)
    everything = summed.load.sum(dim=0)
    name = w.MODEL_NAME
    assert set(answers) == {
        "Balancedness, EP-global, last EPLB window",
        "Max / mean EP-rank load per layer, last EPLB window",
        "(max - mean) / mean per layer (TensorRT-LLM), last EPLB window",
        "Max / mean EP-rank load per layer, all recorded steps",
        "Assignments per second per EP rank (recorded steps)",
        "Recorded steps per EP rank",
        "Recorded steps dropped, and failed flushes",
    }
    assert by_labels(answers["Balancedness, EP-global, last EPLB window"], "model") == {
        (name,): pytest.approx(metrics.balancedness(window, 2), rel=1e-12)}
    for title, expected in [
        ("Max / mean EP-rank load per layer, last EPLB window", metrics.imbalance_max_over_mean(window, 2)),
        ("(max - mean) / mean per layer (TensorRT-LLM), last EPLB window", metrics.imbalance_trtllm(window, 2)),
        ("Max / mean EP-rank load per layer, all recorded steps", metrics.imbalance_max_over_mean(everything, 2)),
    ]:
        assert by_labels(answers[title], "model", "layer") == {
            (name, layer): pytest.approx(expected[int(layer)].item(), rel=1e-12) for layer in layers}, title
    rates = by_labels(answers["Assignments per second per EP rank (recorded steps)"], "model", "rank")
    assert set(rates) == {(name, "0"), (name, "1")} and all(value >= 0 for value in rates.values())
    assert by_labels(answers["Recorded steps per EP rank"], "model", "rank") == {
        (name, "0"): len(summed.steps), (name, "1"): len(summed.steps)}
    assert by_labels(answers["Recorded steps dropped, and failed flushes"], "rank", "reason") == {
        (rank, reason): 0.0 for rank in ("0", "1") for reason in ("ring_full", "write_error", "failed flushes")}
    assert (metrics.imbalance_max_over_mean(window, 2) > 1).any()  # a load to be wrong about


def test_the_dashboard_is_a_grafana_dashboard_with_gaps_drawn_as_gaps():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "model"}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["fieldConfig"]["defaults"]["custom"]["spanNulls"] is False
