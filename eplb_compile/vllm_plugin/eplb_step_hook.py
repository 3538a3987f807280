"""The recorder's hook into vLLM's ``EplbState`` (``distributed/eplb/eplb_state.py``).

:func:`install` wraps two methods of the class, once, keeping vLLM's code:

- ``add_model``: after vLLM builds a model's EPLB state (at model load, with
  vLLM's config current), read and validate ``additional_config["eplb_compile"]``
  (a bad key fails the start-up), apply an ``initial_placement``
  (``initial_placement.py``) and, if it asks for it, start this rank's
  recorder and exporter and record the initial map.
- ``step``: before vLLM copies the pass into its window and zeroes it, hand
  the pass to the recorder for the steps whose pass goes into the window; and
  whenever vLLM wrote a model's map (in this step or since the last one), hand
  it the new map. When metrics are on (and EP size > 1), those steps also sum
  the assignments per EP rank ``[layers, ep_size]`` over the EP group (one
  all-reduce per model, in the step, never in the forward): the exporter's
  imbalance numbers are then the EP-global ones on either lowering. Every
  rank makes it at the same steps, a dummy step (DP rank without requests,
  whose pass vLLM ignores) with zeros, as vLLM's own collectives in ``step`` do.

Every ``EplbState`` internal (and the EP group and config reads) goes through
``vllm_surface.py``, which names the vLLM 0.33.0 file:line each relies on.
``_wrap_step`` imports no vLLM, so it can wrap a stand-in state.
"""

from __future__ import annotations

import atexit
import functools
import weakref

import torch

from eplb_compile.recording import START_UP_STEP, ModelInfo

from . import initial_placement, vllm_surface
from .config import ObservabilityConfig, check_ports, from_additional_config
from .recorder import Recorder

_ATTR = "_eplb_compile_recorder"  # on the EplbState instance


def install() -> None:
    """Wrap ``EplbState.add_model`` and ``EplbState.step`` (idempotent)."""
    vllm_surface.wrap_eplb_state_methods(_wrap_add_model, _wrap_step)
    initial_placement.install()


def recorder_of(eplb_state) -> Recorder | None:
    return getattr(eplb_state, _ATTR, None)


def _wrap_add_model(stock_add_model):
    @functools.wraps(stock_add_model)
    def add_model(self, *args, **kwargs):
        # Validated before vLLM allocates anything, so a bad key stops the start-up at once.
        config = from_additional_config(vllm_surface.additional_config())
        if config.enabled:
            check_ports(config, vllm_surface.ep_rank_and_size()[1])
        initial_placement.before_add_model(self, config)
        result = stock_add_model(self, *args, **kwargs)
        initial_placement.after_add_model(self, vllm_surface.add_model_config(args, kwargs))
        _say_which_layers_record_themselves(vllm_surface.newest_model_state(self))
        if config.enabled:
            _record_new_model(self, recorder_of(self) or _start(self, config))
        return result

    return add_model


_said_self_recording: set[str] = set()


def _say_which_layers_record_themselves(model_state) -> None:
    """Once per such layer: the op cannot replace a MegaMoE layer's mapping."""
    from vllm.logger import init_logger

    from . import LOG_TAG, load_update

    if not load_update.EplbLoadUpdate.enabled():
        return
    for name in vllm_surface.self_recording_layers(model_state):
        if name not in _said_self_recording:
            _said_self_recording.add(name)
            init_logger(f"vllm.{__name__}").info(
                "%s layer=%s maps and records in its own kernel (MegaMoE): vLLM records its load, "
                "eplb_load_update does not replace it", LOG_TAG, name)


def _record_new_model(state, recorder: Recorder) -> None:
    model_state = vllm_surface.newest_model_state(state)
    name, layer_names, num_logical, num_physical = vllm_surface.model_description(model_state)
    info = ModelInfo(name=name, layer_names=layer_names, num_logical=num_logical, num_physical=num_physical,
                     window_size=vllm_surface.window_size(state))
    index = recorder.add_model(info)
    if recorder.exporter is not None:
        recorder.exporter.add_model(info)
    recorder.map_versions.append(vllm_surface.map_version(model_state))
    recorder.on_map(index, START_UP_STEP, vllm_surface.physical_to_logical(model_state))


def _start(state, config: ObservabilityConfig) -> Recorder:
    from vllm.logger import init_logger

    import eplb_compile

    from . import LOG_TAG

    ep_rank, ep_size = vllm_surface.ep_rank_and_size()
    logger = init_logger(f"vllm.{__name__}")
    exporter = None
    if config.metrics_port is not None:
        from .exporter import Exporter

        try:
            exporter = Exporter(host=config.metrics_host, port=config.metrics_port + ep_rank, ep_rank=ep_rank,
                                ep_size=ep_size, per_expert=config.per_expert_metrics)
        except (OSError, OverflowError) as error:  # port taken: the server runs on, without metrics
            logger.warning("%s no metrics endpoint on %s:%d: %s", LOG_TAG, config.metrics_host,
                           config.metrics_port + ep_rank, error)
    recorder = Recorder(
        record_dir=config.record_dir, flush_every_steps=config.flush_every_steps, ring_steps=config.ring_steps,
        ep_rank=ep_rank, ep_size=ep_size, exporter=exporter, logger=logger,
        versions={"vllm_version": vllm_surface.vllm_version(), "eplb_compile_version": eplb_compile.__version__},
    )
    if exporter is not None:
        exporter.watch(lambda: dict(recorder.counters))
    # Decided from the config, not from whether this rank's endpoint came up: every rank joins the all-reduce.
    recorder.sums_rank_load_over_ep = config.metrics_port is not None and ep_size > 1
    setattr(state, _ATTR, recorder)
    atexit.register(_close, weakref.ref(recorder))
    logger.info("%s recording EPLB load: record_dir=%s metrics=%s", LOG_TAG, config.record_dir,
                None if exporter is None else f"{config.metrics_host}:{exporter.port}")
    return recorder


def _close(recorder_ref) -> None:
    recorder = recorder_ref()
    if recorder is not None:
        recorder.close()


def _wrap_step(stock_step):
    @functools.wraps(stock_step)
    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        recorder = recorder_of(self)
        if recorder is None or is_profile:  # a profile step only reserves transfer memory
            return stock_step(self, is_dummy, is_profile, log_stats)
        number = recorder.step_number
        recorder.step_number += 1
        model_states = vllm_surface.model_states(self)
        # A map written since the last step (fault-tolerance recovery, elastic
        # EP, update_mapping) routed this step's pass: file it before this step.
        _record_changed_maps(recorder, model_states, number - 1)
        # Read before the stock step copies the pass into the window and zeroes it.
        if vllm_surface.pass_goes_into_window(self, log_stats):
            for index, model_state in enumerate(model_states):
                load = vllm_surface.load_pass(model_state)
                rank_load = None
                if recorder.sums_rank_load_over_ep:
                    rank_load = _rank_load(load, recorder.ep_size, zero=is_dummy)
                    vllm_surface.all_reduce_over_ep(rank_load)
                # A dummy step is a DP rank without requests keeping step with its peers
                # (vLLM's execute_dummy_batch; warm-up and capture runs skip EPLB): it
                # served no tokens, and vLLM zeroes its pass. Recorded as zeros, the step
                # stays in the EP-global recording instead of being left out for every rank.
                recorder.on_pass(index, number, torch.zeros_like(load) if is_dummy else load, rank_load)
        stock_step(self, is_dummy, is_profile, log_stats)
        # A sync rearrangement commits inside the step, an async one during a later one.
        _record_changed_maps(recorder, model_states, number)

    return step


def _rank_load(load, ep_size: int, zero: bool):
    """This rank's pass summed per EP rank's experts, ``[layers, ep_size]`` int64 (zeros for a dummy step)."""
    per_rank = load.reshape(load.shape[0], ep_size, -1).sum(dim=-1, dtype=torch.int64)
    return per_rank.zero_() if zero else per_rank


def _record_changed_maps(recorder: Recorder, model_states: list, step: int) -> None:
    for index, model_state in enumerate(model_states):
        version = vllm_surface.map_version(model_state)
        if version != recorder.map_versions[index]:
            recorder.map_versions[index] = version
            recorder.on_map(index, step, vllm_surface.physical_to_logical(model_state))
