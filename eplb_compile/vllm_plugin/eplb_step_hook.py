"""The recorder's hook into vLLM 0.33.0's ``EplbState`` (``distributed/eplb/eplb_state.py``).

:func:`install` wraps two methods of the class, once, keeping vLLM's code:

- ``add_model``: after vLLM builds a model's EPLB state (at model load, with
  vLLM's config current), read and validate ``additional_config["eplb_compile"]``
  (a bad key fails the start-up) and, if it asks for it, start this rank's
  recorder and exporter and record the initial map.
- ``step``: before vLLM copies the pass into its window and zeroes it, hand
  the pass to the recorder for the steps whose pass goes into the window; after
  a rearrangement, hand it the new map.

Every vLLM attribute or method used here that is not public API is marked
``# vLLM touchpoint`` with the file:line of 0.33.0 it relies on.
"""

from __future__ import annotations

import atexit
import functools
import weakref

from .config import ObservabilityConfig, from_additional_config
from .recorder import ModelInfo, Recorder

_MARK = "__eplb_compile__"
_ATTR = "_eplb_compile_recorder"  # on the EplbState instance


def install() -> None:
    """Wrap ``EplbState.add_model`` and ``EplbState.step`` (idempotent)."""
    from vllm.distributed.eplb.eplb_state import EplbState

    if getattr(EplbState.step, _MARK, False):
        return
    EplbState.add_model = _wrap_add_model(EplbState.add_model)  # vLLM touchpoint: eplb_state.py:362
    EplbState.step = _wrap_step(EplbState.step)  # vLLM touchpoint: eplb_state.py:561


def recorder_of(eplb_state) -> Recorder | None:
    return getattr(eplb_state, _ATTR, None)


def _wrap_add_model(stock_add_model):
    @functools.wraps(stock_add_model)
    def add_model(self, *args, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        # Validated before vLLM allocates anything, so a bad key stops the start-up at once.
        config = from_additional_config(None if vllm_config is None else vllm_config.additional_config)
        result = stock_add_model(self, *args, **kwargs)
        if config.enabled:
            _record_new_model(self, recorder_of(self) or _start(self, config))
        return result

    setattr(add_model, _MARK, True)
    return add_model


def _record_new_model(state, recorder: Recorder) -> None:
    model_state = list(state.model_states.values())[-1]  # vLLM touchpoint: eplb_state.py:240, insertion order
    model = model_state.model  # vLLM touchpoint: eplb_state.py:189
    info = ModelInfo(
        name=model_state.model_name,  # vLLM touchpoint: eplb_state.py:188
        layer_names=[str(layer.layer_name) for layer in model.moe_layers],  # MoERunner, runner/moe_runner.py:294
        num_logical=model.num_logical_experts,
        num_physical=model.num_physical_experts,
        window_size=state.expert_load_window_size,  # vLLM touchpoint: eplb_state.py:252
    )
    index = recorder.add_model(info)
    if recorder.exporter is not None:
        recorder.exporter.add_model(info)
    # vLLM touchpoint: eplb_state.py:105 (physical_to_logical_map, committed in place by _commit_eplb_maps)
    recorder.on_map(index, -1, model_state.physical_to_logical_map)


def _start(state, config: ObservabilityConfig) -> Recorder:
    import vllm
    from vllm.distributed.parallel_state import get_ep_group
    from vllm.logger import init_logger

    import eplb_compile

    from . import LOG_TAG

    group = get_ep_group()  # vLLM's EP group, as EplbState.step uses it (eplb_state.py:588)
    ep_rank, ep_size = group.rank_in_group, group.world_size
    logger = init_logger(f"vllm.{__name__}")
    exporter = None
    if config.metrics_port is not None:
        from .exporter import Exporter

        try:
            exporter = Exporter(host=config.metrics_host, port=config.metrics_port + ep_rank, ep_size=ep_size)
        except OSError as error:  # port taken: the server runs on, without metrics
            logger.warning("%s no metrics endpoint on %s:%d: %s", LOG_TAG, config.metrics_host,
                           config.metrics_port + ep_rank, error)
    recorder = Recorder(
        record_dir=config.record_dir, flush_every_steps=config.flush_every_steps, ring_steps=config.ring_steps,
        ep_rank=ep_rank, ep_size=ep_size, exporter=exporter, logger=logger,
        versions={"vllm_version": vllm.__version__, "eplb_compile_version": eplb_compile.__version__},
    )
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
        model_states = list(self.model_states.values())  # vLLM touchpoint: eplb_state.py:240
        # The same test vLLM's step makes before it copies the pass into the window
        # (eplb_state.py:646-655); it reads only host counters.
        if not is_dummy and self._should_record_current_step(log_stats=log_stats):  # vLLM touchpoint: :697
            for index, model_state in enumerate(model_states):
                recorder.on_pass(index, number, model_state.expert_load_pass)  # vLLM touchpoint: :163
        # vLLM touchpoint: eplb_state.py:194 (rebalanced: async maps land during a later step)
        async_pending = [getattr(m, "rebalanced", False) for m in model_states]
        stock_step(self, is_dummy, is_profile, log_stats)
        # Sync mode rearranges inside the step and then resets the counter to 0
        # (eplb_state.py:692); async mode commits the last layer's map when
        # ``rebalanced`` drops back to False.
        rearranged = not self.is_async and self.expert_rearrangement_step == 0  # vLLM touchpoint: :279, :257
        for index, model_state in enumerate(model_states):
            if rearranged or (async_pending[index] and not model_state.rebalanced):
                recorder.on_map(index, number, model_state.physical_to_logical_map)  # vLLM touchpoint: :105

    setattr(step, _MARK, True)
    return step

