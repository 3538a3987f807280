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

import torch

from eplb_compile import metrics

from .recorder import ModelInfo


def logical_load(load: torch.Tensor, physical_to_logical: torch.Tensor, num_logical: int) -> torch.Tensor:
    """``[..., layers, physical]`` load summed onto logical experts, as vLLM's rearrange does."""
    index = physical_to_logical.masked_fill(physical_to_logical < 0, num_logical).expand_as(load)
    out = torch.zeros((*load.shape[:-1], num_logical + 1), dtype=torch.int64)
    return out.scatter_add_(-1, index.long(), load.long())[..., :num_logical]


class Exporter:
    def __init__(self, *, host: str, port: int, ep_size: int):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.ep_size = ep_size
        gauge = lambda name, doc, labels: prom.Gauge(name, doc, labels, registry=self.registry)  # noqa: E731
        self.balancedness = gauge("eplb_compile_balancedness",
                                  "vLLM's balancedness (sum of mean over sum of max rank load) of the last "
                                  "recorded pass; 1 is perfect", ["model"])
        self.max_over_mean = gauge("eplb_compile_imbalance_max_over_mean",
                                   "Max over mean EP-rank load of the last recorded pass; 1 is perfect",
                                   ["model", "layer"])
        self.trtllm = gauge("eplb_compile_imbalance_trtllm",
                            "(max - mean) / mean EP-rank load of the last recorded pass; 0 is perfect",
                            ["model", "layer"])
        self.layer_tokens = gauge("eplb_compile_layer_tokens",
                                  "Token-to-expert assignments (tokens x top_k) of the last recorded pass",
                                  ["model", "layer"])
        self.expert_load = gauge("eplb_compile_expert_load",
                                 "Tokens per logical expert over the last EPLB window of recorded passes",
                                 ["model", "layer", "expert"])
        self.recorded_steps = prom.Counter("eplb_compile_recorded_steps", "EPLB steps recorded", ["model"],
                                           registry=self.registry)
        self._models: list[ModelInfo] = []
        self._maps: list[torch.Tensor | None] = []
        self._windows: list[collections.deque] = []
        self.server, self._server_thread = prom.start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def add_model(self, info: ModelInfo) -> None:
        self._models.append(info)
        self._maps.append(None)
        self._windows.append(collections.deque(maxlen=info.window_size))

    def on_map(self, model: int, physical_to_logical: torch.Tensor) -> None:
        self._maps[model] = physical_to_logical

    def on_pass(self, model: int, load: torch.Tensor) -> None:
        info, name = self._models[model], self._models[model].name
        self.balancedness.labels(name).set(metrics.balancedness(load, self.ep_size))
        max_over_mean = metrics.imbalance_max_over_mean(load, self.ep_size).tolist()
        trtllm = metrics.imbalance_trtllm(load, self.ep_size).tolist()
        for layer, tokens in enumerate(load.sum(dim=-1).tolist()):
            self.max_over_mean.labels(name, str(layer)).set(max_over_mean[layer])
            self.trtllm.labels(name, str(layer)).set(trtllm[layer])
            self.layer_tokens.labels(name, str(layer)).set(tokens)
        if self._maps[model] is not None:
            window = self._windows[model]
            window.append(logical_load(load, self._maps[model], info.num_logical))
            for layer, row in enumerate(torch.stack(list(window)).sum(dim=0).tolist()):
                for expert, value in enumerate(row):
                    self.expert_load.labels(name, str(layer), str(expert)).set(value)
        self.recorded_steps.labels(name).inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
