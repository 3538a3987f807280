"""Prometheus gauges of the recorded EPLB load, one HTTP endpoint per EP rank.

Fed by the recorder's writer thread with each recorded pass (host copies),
so nothing here runs in the forward or blocks the step. Each rank serves
what it recorded, on ``metrics_port + ep_rank`` at ``metrics_host``:

- ``eplb_compile_balancedness{model}``: vLLM's balancedness (``EplbState.step``'s
  log line) of the last recorded pass;
- ``eplb_compile_imbalance_max_over_mean{model,layer}`` and
  ``eplb_compile_imbalance_trtllm{model,layer}``: per layer, over EP ranks;
- ``eplb_compile_layer_tokens{model,layer}``: token-to-expert assignments
  (tokens x top_k) of the last recorded pass;
- ``eplb_compile_expert_load{model,layer,expert}``: per logical expert, the
  last ``window_size`` recorded passes (vLLM's window) mapped with the maps
  they were routed by;
- ``eplb_compile_recorded_steps_total{model}``.

The three imbalance numbers are :mod:`eplb_compile.metrics` on the pass as
this rank holds it. vLLM all-reduces passes before it rebalances; on the
count path a rank holds only what its own experts received, so its ratios
describe its slice (``eplb-compile report`` sums the ranks first).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch

from eplb_compile import metrics

from eplb_compile.recording import ModelInfo


@dataclass
class _Latest:
    """What the last recorded pass of one model says; replaced whole, read by scrapes."""

    balancedness: float
    max_over_mean: list[float]
    trtllm: list[float]
    layer_tokens: list[int]
    window_load: torch.Tensor | None  # [layers, logical]
    recorded_steps: int


class Exporter:
    """The endpoint and its numbers.

    The numbers are computed per recorded pass with a few vectorized torch
    calls; the ~15k series of a large model are only spelled out when
    Prometheus scrapes (a custom collector), never per step, because the
    writer thread shares the GIL with the server.
    """

    def __init__(self, *, host: str, port: int, ep_size: int):
        import prometheus_client as prom

        self.ep_size = ep_size
        self._models: list[ModelInfo] = []
        self._maps: list[torch.Tensor | None] = []
        self._windows: list[collections.deque] = []
        self._latest: list[_Latest | None] = []
        self._lock = threading.Lock()
        self.registry = prom.CollectorRegistry()
        self.registry.register(self)
        self.server, self._server_thread = prom.start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def add_model(self, info: ModelInfo) -> None:
        self._models.append(info)
        self._maps.append(None)
        self._windows.append(collections.deque(maxlen=info.window_size))
        self._latest.append(None)

    def on_map(self, model: int, physical_to_logical: torch.Tensor) -> None:
        self._maps[model] = physical_to_logical

    def on_pass(self, model: int, load: torch.Tensor) -> None:
        window_load = None
        if self._maps[model] is not None:
            window = self._windows[model]
            window.append(metrics.logical_load(load, self._maps[model], self._models[model].num_logical))
            window_load = torch.stack(list(window)).sum(dim=0)
        previous = self._latest[model]
        latest = _Latest(
            balancedness=metrics.balancedness(load, self.ep_size),
            max_over_mean=metrics.imbalance_max_over_mean(load, self.ep_size).tolist(),
            trtllm=metrics.imbalance_trtllm(load, self.ep_size).tolist(),
            layer_tokens=load.sum(dim=-1).tolist(),
            window_load=window_load,
            recorded_steps=1 + (0 if previous is None else previous.recorded_steps),
        )
        with self._lock:
            self._latest[model] = latest

    def collect(self):
        """Called by prometheus_client at each scrape."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {
            "balancedness": GaugeMetricFamily(
                "eplb_compile_balancedness",
                "vLLM's balancedness (sum of mean over sum of max rank load) of the last recorded pass; "
                "1 is perfect", labels=["model"]),
            "max_over_mean": GaugeMetricFamily(
                "eplb_compile_imbalance_max_over_mean",
                "Max over mean EP-rank load of the last recorded pass; 1 is perfect", labels=["model", "layer"]),
            "trtllm": GaugeMetricFamily(
                "eplb_compile_imbalance_trtllm",
                "(max - mean) / mean EP-rank load of the last recorded pass; 0 is perfect",
                labels=["model", "layer"]),
            "layer_tokens": GaugeMetricFamily(
                "eplb_compile_layer_tokens",
                "Token-to-expert assignments (tokens x top_k) of the last recorded pass", labels=["model", "layer"]),
            "expert_load": GaugeMetricFamily(
                "eplb_compile_expert_load",
                "Tokens per logical expert over the last EPLB window of recorded passes",
                labels=["model", "layer", "expert"]),
            "recorded_steps": CounterMetricFamily(
                "eplb_compile_recorded_steps", "EPLB steps recorded", labels=["model"]),
        }
        with self._lock:
            latest = list(zip(self._models, self._latest, strict=True))
        for info, numbers in latest:
            if numbers is None:
                continue
            families["balancedness"].add_metric([info.name], numbers.balancedness)
            families["recorded_steps"].add_metric([info.name], numbers.recorded_steps)
            for layer in range(len(numbers.layer_tokens)):
                labels = [info.name, str(layer)]
                families["max_over_mean"].add_metric(labels, numbers.max_over_mean[layer])
                families["trtllm"].add_metric(labels, numbers.trtllm[layer])
                families["layer_tokens"].add_metric(labels, numbers.layer_tokens[layer])
            if numbers.window_load is not None:
                for layer, row in enumerate(numbers.window_load.tolist()):
                    for expert, value in enumerate(row):
                        families["expert_load"].add_metric([info.name, str(layer), str(expert)], value)
        yield from families.values()

    def describe(self):
        return []  # no families until the first pass: registering must not call collect()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
