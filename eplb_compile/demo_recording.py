"""``eplb-compile demo --record DIR``: a recording made on a CPU, in the recorder's own format.

The demo's simulated EP group (:mod:`eplb_compile.demo`) plays the part of
vLLM's ranks: every rank's pass of every step whose gate is on (the topk
lowering's per-rank load, as vLLM's ``expert_load_pass`` holds it) goes through
the plugin's :class:`~eplb_compile.vllm_plugin.recorder.Recorder`, so the
files are exactly what a server writes (``eplb_compile.recording``), and
``eplb-compile report``, ``report --what-if`` and ``place`` read them on a
laptop. The demo places experts as EPLB would from the routing prior, so
its layers start nearly balanced; ``--linear`` starts them on vLLM's default
linear placement (slot s holds expert ``s % num_logical``) instead, which is
where a fresh server starts before its first rearrangement.
"""

from __future__ import annotations

import eplb_compile
from eplb_compile.demo import DemoConfig, DemoResult
from eplb_compile.recording import START_UP_STEP, ModelInfo
from eplb_compile.vllm_plugin.recorder import Recorder


def layer_names(cfg: DemoConfig) -> list[str]:
    return [f"model.layers.{layer}.mlp.experts" for layer in range(cfg.layers)]


def write_demo_recording(cfg: DemoConfig, result: DemoResult, record_dir: str) -> int:
    """Write every rank's files under ``record_dir``; the number of steps recorded.

    Raises OSError when the recorder could not write everything (it never raises itself).
    """
    info = ModelInfo("demo", layer_names(cfg), cfg.num_logical, cfg.num_physical, cfg.steps)
    recorded = [step for step, gate in enumerate(result.gate) if gate]
    versions = {"vllm_version": None, "eplb_compile_version": getattr(eplb_compile, "__version__", None)}
    for rank in range(cfg.ep_size):
        recorder = Recorder(record_dir=record_dir, flush_every_steps=max(len(recorded), 1),
                            ring_steps=len(recorded) + 1, ep_rank=rank, ep_size=cfg.ep_size, versions=versions)
        recorder.add_model(info)
        recorder.on_map(0, START_UP_STEP, result.physical_to_logical)
        for step in recorded:
            recorder.on_pass(0, step, result.rank_loads[step, :, rank])
        recorder.close()
        if recorder.dropped:
            raise OSError(f"could not write the recording under {record_dir!r} (see the warning above)")
    return len(recorded)
