"""vLLM starts on a placement: ``additional_config["eplb_compile"]["initial_placement"]``.

When ``EplbState.add_model`` has built a model's EPLB state (weights loaded,
maps at vLLM's linear start), every EP rank checks the placement file's entry
for that model (the n-th ``add_model`` call takes the n-th model of the file,
the order the recorder writes them in) against the model: EP size, MoE layer
count, logical experts, physical slots. Any mismatch raises one ``ValueError``
line naming it before anything moves. Then the expert weights move and the
maps are committed through vLLM's own rearrangement machinery
(``vllm_surface.move_experts_and_commit``), so the server serves its first
request on the placement. ``online_rebalancing: false`` makes vLLM's
periodic rearrangement a no-op on this state (the load window, balancedness
logging and the recorder carry on); elastic EP's rearrangements still run.
"""

from __future__ import annotations

import functools

import torch

from eplb_compile.placement import PlacementError, load_placement

from . import vllm_surface
from .config import SECTION, ObservabilityConfig

_NO_REBALANCING = "_eplb_compile_no_online_rebalancing"  # on the EplbState instance
_PLACEMENT = "_eplb_compile_placement"  # the loaded file, on the EplbState instance


def install() -> None:
    vllm_surface.wrap_eplb_state_rearrange(_wrap_rearrange)


def before_add_model(state, config: ObservabilityConfig) -> None:
    """Read and check the file before vLLM allocates anything: a bad file stops the start-up at once."""
    if config.initial_placement is not None and not hasattr(state, _PLACEMENT):
        try:
            setattr(state, _PLACEMENT, load_placement(config.initial_placement))
        except PlacementError as error:
            raise ValueError(f"additional_config[{SECTION!r}]['initial_placement']: {error}") from None
    if not config.online_rebalancing:
        setattr(state, _NO_REBALANCING, True)


def after_add_model(state, model_config) -> None:
    """Apply the file's entry for the model ``add_model`` just built, on every EP rank."""
    placement = getattr(state, _PLACEMENT, None)
    if placement is None:
        return
    model_state = vllm_surface.newest_model_state(state)
    index = len(vllm_surface.model_states(state)) - 1
    table = checked_table(placement, index, vllm_surface.model_description(model_state),
                          vllm_surface.ep_rank_and_size()[1])
    vllm_surface.move_experts_and_commit(state, model_state, model_config, table)


def checked_table(placement: dict, index: int, description: tuple[str, list[str], int, int],
                  ep_size: int) -> torch.Tensor:
    """The placement's map for model ``index``; ValueError (one line) naming the first mismatch."""
    name, layer_names, num_logical, num_physical = description
    where = f"additional_config[{SECTION!r}]['initial_placement'] does not fit model {name!r}"
    if placement["ep_size"] != ep_size:
        raise ValueError(f"{where}: the placement is for EP size {placement['ep_size']}, this server's is {ep_size}")
    if index >= len(placement["models"]):
        raise ValueError(f"{where}: the placement has {len(placement['models'])} model(s), this is model {index + 1}")
    model = placement["models"][index]
    for what, theirs, ours in [("MoE layers", len(model["layer_names"]), len(layer_names)),
                               ("logical experts", model["num_logical"], num_logical),
                               ("physical slots", model["num_physical"], num_physical)]:
        if theirs != ours:
            raise ValueError(f"{where}: the placement has {theirs} {what}, the model {ours}")
    return model["physical_to_logical"]


def _wrap_rearrange(stock_rearrange):
    @functools.wraps(stock_rearrange)
    def rearrange(self, is_profile: bool = False, rank_mapping=None, use_last_expert_load: bool = False):
        if getattr(self, _NO_REBALANCING, False) and not is_profile and rank_mapping is None:
            return None
        return stock_rearrange(self, is_profile, rank_mapping, use_last_expert_load)

    return rearrange
