"""The plugin's start-up checks of an ``initial_placement`` and its config keys, without vLLM.

The placement applied in vLLM's own EPLB loop is ``tests/integration/test_initial_placement.py``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from eplb_compile.placement import FORMAT_NAME, FORMAT_VERSION
from eplb_compile.vllm_plugin import config as plugin_config
from eplb_compile.vllm_plugin import initial_placement

DESCRIPTION = ("tiny", ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"], 4, 6)  # name, layers, L, P


def placement_file(tmp_path, **changes) -> str:
    table = [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]]
    model = {"name": "tiny", "layer_names": list(DESCRIPTION[1]), "num_logical": 4, "num_physical": 6,
             "num_redundant": 2, "physical_to_logical": table}
    body = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "ep_size": 2, "models": [model]}
    body.update(changes.pop("top", {}))
    model.update(changes)
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(body))
    return str(path)


def config(**keys):
    return plugin_config.from_additional_config({"eplb_compile": keys})


def test_config_keys():
    assert config().initial_placement is None and config().online_rebalancing is True
    assert config(initial_placement="p.json", online_rebalancing=False).online_rebalancing is False
    for key, value, expected in [("initial_placement", "", "a non-empty path or null"),
                                 ("online_rebalancing", "no", "true or false")]:
        with pytest.raises(ValueError, match=f"\\['{key}'\\] must be {expected}"):
            config(**{key: value})


def test_a_good_placement_is_returned_as_a_table(tmp_path):
    state = SimpleNamespace()
    initial_placement.before_add_model(state, config(initial_placement=placement_file(tmp_path)))
    placement = state._eplb_compile_placement
    table = initial_placement.checked_table(placement, 0, DESCRIPTION, ep_size=2)
    assert torch.equal(table, torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]]))
    assert not hasattr(state, "_eplb_compile_no_online_rebalancing")


@pytest.mark.parametrize("changes, ep_size, index, message", [
    ({}, 4, 0, "the placement is for EP size 2, this server's is 4"),
    ({}, 2, 1, "the placement has 1 model(s), this is model 2"),
    ({"layer_names": ["a"], "physical_to_logical": [[0, 1, 2, 3, 0, 1]]}, 2, 0,
     "the placement has 1 MoE layers, the model 2"),
    ({"num_logical": 3, "physical_to_logical": [[0, 1, 2, 0, 1, 2]] * 2}, 2, 0,
     "the placement has 3 logical experts, the model 4"),
    ({"num_physical": 4, "num_redundant": 0, "physical_to_logical": [[0, 1, 2, 3]] * 2}, 2, 0,
     "the placement has 4 physical slots, the model 6"),
])
def test_a_placement_that_does_not_fit_the_model_is_one_line(tmp_path, changes, ep_size, index, message):
    state = SimpleNamespace()
    initial_placement.before_add_model(state, config(initial_placement=placement_file(tmp_path, **changes)))
    with pytest.raises(ValueError) as error:
        initial_placement.checked_table(state._eplb_compile_placement, index, DESCRIPTION, ep_size)
    assert str(error.value) == ("additional_config['eplb_compile']['initial_placement'] does not fit model "
                                f"'tiny': {message}")


@pytest.mark.parametrize("changes, message", [
    ({"physical_to_logical": [[0, 1, 2, 0, 0, 1], [3, 2, 1, 0, 3, 2]]}, "layer 0 has no replica of logical expert 3"),
    ({"physical_to_logical": [[0, 1, 2, 3, 0, 7], [3, 2, 1, 0, 3, 2]]}, "layer 0 slot 5 holds expert 7"),
    ({"physical_to_logical": [[0, 1, 2, 3, 0], [3, 2, 1, 0, 3]]}, "expected [2 layers, 6 slots]"),
    ({"top": {"format": "sglang"}}, "not a placement"),
])
def test_a_bad_file_fails_before_vllm_builds_anything(tmp_path, changes, message):
    with pytest.raises(ValueError) as error:
        initial_placement.before_add_model(SimpleNamespace(), config(initial_placement=placement_file(tmp_path,
                                                                                                      **changes)))
    assert str(error.value).startswith("additional_config['eplb_compile']['initial_placement']: ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_truncated_or_missing_file(tmp_path):
    path = placement_file(tmp_path)
    (tmp_path / "cut.json").write_text(open(path).read()[:50])
    for target, message in [("cut.json", "truncated"), ("missing.json", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            initial_placement.before_add_model(SimpleNamespace(), config(initial_placement=str(tmp_path / target)))


def test_online_rebalancing_off_skips_only_the_periodic_rearrangement():
    calls = []

    def stock(self, is_profile=False, rank_mapping=None, use_last_expert_load=False):
        calls.append((is_profile, rank_mapping))
        return "moved"

    rearrange = initial_placement._wrap_rearrange(stock)
    state = SimpleNamespace()
    initial_placement.before_add_model(state, config(online_rebalancing=False))
    assert rearrange(state) is None and calls == []
    assert rearrange(state, is_profile=True) == "moved"  # reserves the transfer memory, moves nothing
    assert rearrange(state, rank_mapping={0: 0, 1: -1}) == "moved"  # elastic EP scaling
    assert rearrange(SimpleNamespace()) == "moved"  # a state without the switch: stock
    assert calls == [(True, None), (False, {0: 0, 1: -1}), (False, None)]
