"""Prometheus metrics of the recorded EPLB load, one HTTP endpoint per EP rank.

Fed by the recorder's writer thread with each recorded pass (host copies),
so nothing here runs in the forward or blocks the step. Rank r serves on
``metrics_port + r`` at ``metrics_host``; every series carries ``rank``.

Global truth: besides its own pass, each recorded step brings the EP-global
assignments per layer and EP rank ``[layers, ep_size]`` (the step hook
all-reduces them over vLLM's EP group in ``EplbState.step``, as vLLM's own
balancedness log does with the whole pass). A rank's own pass would not do:
on the count path it holds only what its own experts received, on the topk
path only its own tokens. So the imbalance numbers here are those of
``eplb-compile report`` (which sums the ranks' files), on either lowering.

Series (``model``; ``layer`` is vLLM's layer index, ``3`` for
``model.layers.3.mlp.experts``), in assignments (one per token and top-k slot):

- ``eplb_compile_rank_assignments_total{model,layer,rank}``: counter, the
  EP-global assignments to rank r's physical experts over recorded steps
  (rank r serves its own ``rank``); ``rate()`` of it over ranks is the load;
- ``eplb_compile_window_balancedness{model,rank}``,
  ``eplb_compile_window_imbalance_max_over_mean{model,layer,rank}`` and
  ``eplb_compile_window_imbalance_trtllm{model,layer,rank}``: gauges over the
  EP-global load of the last ``window_size`` recorded passes (what vLLM
  rebalances on), served by EP rank 0 only (every rank knows them; one copy
  is enough);
- ``eplb_compile_window_passes{model,rank}``: passes in that window;
- ``eplb_compile_recorded_steps_total{model,rank}``,
  ``eplb_compile_dropped_steps_total{rank,reason}`` (``ring_full``,
  ``write_error``) and ``eplb_compile_write_errors_total{rank}``;
- only with ``per_expert_metrics``: ``eplb_compile_expert_window_assignments{model,layer,expert,rank}``,
  this rank's recorded part of each logical expert's window load
  (``sum by (model, layer, expert)`` over ranks is the global one).

Cost per recorded pass is independent of the window: running sums, one
addition and (once the window is full) one subtraction; the ratios are
computed when Prometheus scrapes. Memory is the window's history:
``[layers, ep_size]`` int32 per pass (58 x 72 x 4 B x 1000 = 17 MB at 72
ranks), and with per-expert series ``[layers, logical]`` int32 per pass
(58 x 256 x 4 B x 1000 = 59 MB).
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Callable

import torch

from eplb_compile import metrics
from eplb_compile.recording import ModelInfo

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_label(layer_name: str) -> str:
    """vLLM's layer index of a layer name (``model.layers.3.mlp.experts`` -> ``3``), else the name."""
    match = _LAYER_INDEX.search(layer_name)
    return match.group(1) if match else layer_name


class _ModelSums:
    """One model's running sums; the writer thread adds, scrapes read under the exporter's lock."""

    def __init__(self, info: ModelInfo, ep_size: int, per_expert: bool):
        layers = len(info.layer_names)
        self.info = info
        self.layer_labels = [layer_label(name) for name in info.layer_names]
        self.rank_total = torch.zeros((layers, ep_size), dtype=torch.int64)
        self.window = collections.deque()
        self.window_sum = torch.zeros((layers, ep_size), dtype=torch.int64)
        self.recorded = 0
        self.map: torch.Tensor | None = None
        self.expert_window = collections.deque() if per_expert else None
        self.expert_window_sum = torch.zeros((layers, info.num_logical), dtype=torch.int64)

    def add(self, load: torch.Tensor, rank_load: torch.Tensor) -> None:
        self.recorded += 1
        self.rank_total += rank_load
        self.window.append(rank_load.to(torch.int32))  # one step's count per rank fits; halves the history
        self.window_sum += rank_load
        if len(self.window) > self.info.window_size:
            self.window_sum -= self.window.popleft()
        if self.expert_window is not None and self.map is not None:
            logical = metrics.logical_load(load, self.map, self.info.num_logical).to(torch.int32)
            self.expert_window.append(logical)
            self.expert_window_sum += logical
            if len(self.expert_window) > self.info.window_size:
                self.expert_window_sum -= self.expert_window.popleft()


class Exporter:
    """The endpoint and its numbers, spelled out only when Prometheus scrapes (a custom collector)."""

    def __init__(self, *, host: str, port: int, ep_rank: int, ep_size: int, per_expert: bool = False):
        import prometheus_client as prom

        self.ep_rank, self.ep_size, self.per_expert = ep_rank, ep_size, per_expert
        self._models: list[_ModelSums] = []
        self._lock = threading.Lock()
        self._recorder_counters: Callable[[], dict[str, int]] = dict
        self.registry = prom.CollectorRegistry()
        self.registry.register(self)
        self.server, self._server_thread = prom.start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def add_model(self, info: ModelInfo) -> None:
        with self._lock:
            self._models.append(_ModelSums(info, self.ep_size, self.per_expert))

    def watch(self, counters: Callable[[], dict[str, int]]) -> None:
        """Where the recorder's drop and error counters are read at each scrape."""
        self._recorder_counters = counters

    def on_map(self, model: int, physical_to_logical: torch.Tensor) -> None:
        with self._lock:
            self._models[model].map = physical_to_logical

    def on_pass(self, model: int, load: torch.Tensor, rank_load: torch.Tensor) -> None:
        """One recorded pass: this rank's ``[layers, physical]`` and the EP-global ``[layers, ep_size]``."""
        with self._lock:
            self._models[model].add(load, rank_load.to(torch.int64))

    def collect(self):
        """Called by prometheus_client at each scrape."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def family(kind, name, documentation, labels):
            return kind(name, documentation, labels=[*labels, "rank"])

        rank = str(self.ep_rank)
        assignments = family(CounterMetricFamily, "eplb_compile_rank_assignments",
                             "EP-global assignments (token x top-k) to this EP rank's physical experts, "
                             "over recorded steps", ["model", "layer"])
        recorded = family(CounterMetricFamily, "eplb_compile_recorded_steps", "EPLB steps recorded", ["model"])
        passes = family(GaugeMetricFamily, "eplb_compile_window_passes",
                        "Recorded passes in the window the imbalance gauges are computed on", ["model"])
        balancedness = family(GaugeMetricFamily, "eplb_compile_window_balancedness",
                              "vLLM's balancedness (sum over layers of mean over sum of max EP-rank load) of the "
                              "EP-global window load; 1 is perfect", ["model"])
        max_over_mean = family(GaugeMetricFamily, "eplb_compile_window_imbalance_max_over_mean",
                               "Max over mean EP-rank load of the EP-global window load; 1 is perfect",
                               ["model", "layer"])
        trtllm = family(GaugeMetricFamily, "eplb_compile_window_imbalance_trtllm",
                        "(max - mean) / mean EP-rank load of the EP-global window load; 0 is perfect",
                        ["model", "layer"])
        expert = family(GaugeMetricFamily, "eplb_compile_expert_window_assignments",
                        "This rank's recorded assignments per logical expert over the window; sum over ranks "
                        "for the global load", ["model", "layer", "expert"])
        dropped = family(CounterMetricFamily, "eplb_compile_dropped_steps",
                         "Recorded steps lost: ring_full (the writer fell behind), write_error (a flush failed)",
                         ["reason"])
        write_errors = family(CounterMetricFamily, "eplb_compile_write_errors", "Flushes that failed", [])
        with self._lock:
            snapshot = [(m.info.name, m.layer_labels, m.recorded, m.rank_total[:, self.ep_rank].tolist(),
                         len(m.window), m.window_sum.clone(),
                         m.expert_window_sum.tolist() if m.expert_window is not None else None)
                        for m in self._models]
        for name, layers, steps, totals, in_window, window_sum, experts in snapshot:
            recorded.add_metric([name, rank], steps)
            for layer, total in zip(layers, totals, strict=True):
                assignments.add_metric([name, layer, rank], total)
            if self.ep_rank == 0 and in_window:
                passes.add_metric([name, rank], in_window)
                balancedness.add_metric([name, rank], _balancedness(window_sum))
                for layer, mom, trt in zip(layers, _max_over_mean(window_sum).tolist(),
                                           _trtllm(window_sum).tolist(), strict=True):
                    max_over_mean.add_metric([name, layer, rank], mom)
                    trtllm.add_metric([name, layer, rank], trt)
            for layer, row in zip(layers, experts or [], strict=False):
                for index, value in enumerate(row):
                    expert.add_metric([name, layer, str(index), rank], value)
        counters = self._recorder_counters()
        for reason in ("ring_full", "write_error"):
            dropped.add_metric([reason, rank], counters.get(f"dropped_{reason}", 0))
        write_errors.add_metric([rank], counters.get("write_errors", 0))
        yield from (assignments, recorded, passes, balancedness, max_over_mean, trtllm, dropped, write_errors)
        if self.per_expert:
            yield expert

    def describe(self):
        return []  # no families until the first pass: registering must not call collect()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# The metrics of eplb_compile.metrics, on loads already summed per EP rank ([layers, ep_size]):
# a [layers, ep_size] load is its own per-rank load with one expert per rank.
def _balancedness(rank_load: torch.Tensor) -> float:
    return metrics.balancedness(rank_load, rank_load.shape[1])


def _max_over_mean(rank_load: torch.Tensor) -> torch.Tensor:
    return metrics.imbalance_max_over_mean(rank_load, rank_load.shape[1])


def _trtllm(rank_load: torch.Tensor) -> torch.Tensor:
    return metrics.imbalance_trtllm(rank_load, rank_load.shape[1])
