"""The step hook's all-reduce for the EP-global metrics: same count on every rank, dummy steps included.

A rank that skips a collective its peers make hangs the server. In data
parallel, a DP rank without requests runs a dummy step while the others run
real ones; vLLM ignores its pass but still makes its collectives. The hook
must too. Driven through ``eplb_step_hook._wrap_step`` with a stand-in state
(vLLM's ``EplbState`` needs its EP group; ``tests/integration`` has the real one).
"""

from __future__ import annotations

import torch

from eplb_compile.recording import ModelInfo
from eplb_compile.vllm_plugin import eplb_step_hook, vllm_surface
from eplb_compile.vllm_plugin.recorder import Recorder

LAYERS, PHYSICAL, EP_SIZE = 2, 8, 4


class StandIn:
    def __init__(self, gate_steps: set[int]):
        model_state = type("ModelState", (), {})()
        model_state.expert_load_pass = torch.arange(LAYERS * PHYSICAL, dtype=torch.int32).view(LAYERS, PHYSICAL)
        model_state.physical_to_logical_map = torch.arange(PHYSICAL).expand(LAYERS, -1)
        self.model_states = {"m": model_state}
        self.gate_steps, self.calls = gate_steps, 0

    def _should_record_current_step(self, log_stats: bool = False) -> bool:
        return self.calls in self.gate_steps

    def step(self, is_dummy=False, is_profile=False, log_stats=False):
        self.calls += 1


def test_every_gated_step_all_reduces_once_per_model_dummy_or_not(monkeypatch, tmp_path):
    reduced = []
    monkeypatch.setattr(vllm_surface, "all_reduce_over_ep", lambda tensor: reduced.append(tensor.clone()) or tensor)
    state = StandIn(gate_steps={1, 2, 4})
    recorder = Recorder(record_dir=None, flush_every_steps=10, ring_steps=8, ep_rank=0, ep_size=EP_SIZE,
                        versions={})
    recorder.add_model(ModelInfo("m", ["layers.0", "layers.1"], PHYSICAL, PHYSICAL, 4))
    recorder.map_versions.append(vllm_surface.map_version(state.model_states["m"]))
    recorder.sums_rank_load_over_ep = True
    state._eplb_compile_recorder = recorder
    step = eplb_step_hook._wrap_step(StandIn.step)
    for is_dummy in (False, False, True, False, True):  # steps 0..4; gated: 1, 2 (dummy), 4 (dummy)
        step(state, is_dummy=is_dummy)
    step(state, is_profile=True)  # every rank profiles alike: no collective
    recorder.close()
    assert len(reduced) == 3
    per_rank = state.model_states["m"].expert_load_pass.reshape(LAYERS, EP_SIZE, -1).sum(dim=-1, dtype=torch.int64)
    assert torch.equal(reduced[0], per_rank)
    assert not reduced[1].any() and not reduced[2].any()  # a dummy step's pass is ignored, as vLLM does
    assert recorder.counters["dropped_ring_full"] == 0


def test_no_collective_without_metrics(monkeypatch):
    monkeypatch.setattr(vllm_surface, "all_reduce_over_ep", lambda tensor: (_ for _ in ()).throw(AssertionError))
    state = StandIn(gate_steps={0, 1})
    recorder = Recorder(record_dir=None, flush_every_steps=10, ring_steps=8, ep_rank=0, ep_size=EP_SIZE,
                        versions={})
    recorder.add_model(ModelInfo("m", ["layers.0", "layers.1"], PHYSICAL, PHYSICAL, 4))
    recorder.map_versions.append(vllm_surface.map_version(state.model_states["m"]))
    state._eplb_compile_recorder = recorder
    step = eplb_step_hook._wrap_step(StandIn.step)
    step(state)
    step(state, is_dummy=True)
    recorder.close()


def test_a_dummy_step_is_recorded_as_zeros_so_the_step_stays_in_the_recording(tmp_path):
    from eplb_compile import recording

    state = StandIn(gate_steps={0, 1})
    recorder = Recorder(record_dir=str(tmp_path), flush_every_steps=10, ring_steps=8, ep_rank=0, ep_size=EP_SIZE,
                        versions={})
    recorder.add_model(ModelInfo("m", ["layers.0", "layers.1"], PHYSICAL, PHYSICAL, 4))
    recorder.map_versions.append(vllm_surface.map_version(state.model_states["m"]))
    recorder.on_map(0, -1, state.model_states["m"].physical_to_logical_map)
    state._eplb_compile_recorder = recorder
    step = eplb_step_hook._wrap_step(StandIn.step)
    step(state)
    step(state, is_dummy=True)  # this DP rank had no requests; its peers served tokens at this step
    recorder.close()
    (path,) = sorted((tmp_path / "rank0").iterdir())
    _, tensors = recording.read_chunk(str(path))
    assert tensors["model0.steps"].tolist() == [0, 1]
    assert tensors["model0.load"][0].tolist() == state.model_states["m"].expert_load_pass.tolist()
    assert not tensors["model0.load"][1].any()
