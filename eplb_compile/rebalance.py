"""vLLM's default EPLB rebalancing algorithm, without vLLM.

``rebalance(load, num_physical, num_groups, num_nodes, num_ranks, old_map)``
returns the physical -> logical map ``[layers, num_physical]`` that vLLM's
``DefaultEplbPolicy.rebalance_experts`` (``vllm/distributed/eplb/policy/default.py``,
the same file in 0.33.0 and 0.34.0) returns for the same arguments, element
for element: ``tests/test_rebalance.py`` checks that on random loads against
whichever vLLM is installed. ``policy_rebalance`` calls vLLM's when vLLM is
importable, else this one; ``eplb-compile place`` uses it.

The algorithm (DeepSeek's EPLB): pack expert groups onto nodes (when the
groups split evenly over nodes), replicate the heaviest logical experts
(by load per replica) into the redundant slots of each node, pack the
physical experts onto ranks so ranks carry equal load with equal slot counts,
then, given the map in force, keep an expert that stays on a rank in its old
slot. Ties break as vLLM's do: the same numpy calls (``argsort`` of the
negated load, ``argmin``, ``argmax``) in the same dtypes (load as float32,
load per replica as float64).
"""

from __future__ import annotations

import numpy as np
import torch


def _pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy balanced packing of each row's items into ``num_packs`` packs of equal item count.

    Heaviest item first, into the lightest pack that is not full. Returns
    per item its pack and its position in the pack.
    """
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        return np.tile(np.arange(items, dtype=np.int64), (rows, 1)), np.zeros((rows, items), dtype=np.int64)
    order = np.argsort(-weight, axis=-1)
    pack = np.empty((rows, items), dtype=np.int64)
    position = np.empty((rows, items), dtype=np.int64)
    for row in range(rows):
        pack_load = np.zeros(num_packs, dtype=np.float64)
        pack_count = np.zeros(num_packs, dtype=np.int64)
        for item in order[row]:
            chosen = int(np.argmin(pack_load))
            pack[row, item] = chosen
            position[row, item] = pack_count[chosen]
            pack_load[chosen] += weight[row, item]
            pack_count[chosen] += 1
            if pack_count[chosen] == per_pack:
                pack_load[chosen] = np.inf  # full
    return pack, position


def _replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill the slots past the logical experts with replicas of the highest load per replica."""
    rows, num_logical = weight.shape
    slot_expert = np.tile(np.arange(num_slots, dtype=np.int64), (rows, 1))
    replicas = np.ones((rows, num_logical), dtype=np.int64)
    every_row = np.arange(rows)
    for slot in range(num_logical, num_slots):
        heaviest = np.argmax(weight / replicas, axis=-1)
        slot_expert[:, slot] = heaviest
        replicas[every_row, heaviest] += 1
    return slot_expert, replicas


def _invert(permutation: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(permutation)
    np.put_along_axis(inverse, permutation, np.arange(permutation.shape[1], dtype=np.int64)[None, :]
                      .repeat(permutation.shape[0], 0), axis=1)
    return inverse


def _hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                  num_ranks: int) -> np.ndarray:
    layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_rank = num_physical // num_ranks
    logical_per_node = num_logical // num_nodes

    # 1. Groups onto nodes; renumber logical experts node by node ("node-local" ids).
    group_load = weight.reshape(layers, num_groups, group_size).sum(axis=-1)
    group_node, group_position = _pack(group_load, num_nodes)
    first_of_group = (group_node * groups_per_node + group_position) * group_size
    logical_to_local = (first_of_group[..., None] + np.arange(group_size, dtype=np.int64)).reshape(layers, -1)
    local_to_logical = _invert(logical_to_local)

    # 2. Replicas within each node.
    local_load = np.take_along_axis(weight, local_to_logical, axis=1).reshape(-1, logical_per_node)
    slot_local, replicas = _replicate(local_load, num_physical // num_nodes)

    # 3. Physical experts onto the node's ranks, by load per replica.
    slot_load = np.take_along_axis(local_load / replicas, slot_local, axis=1)
    rank, position = _pack(slot_load, num_ranks // num_nodes)
    placed_slot = _invert(rank * slots_per_rank + position)
    placed_local = np.take_along_axis(slot_local, placed_slot, axis=1)
    node_offset = np.arange(0, num_logical, logical_per_node, dtype=np.int64)[None, :, None]
    placed_local = (placed_local.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    return np.take_along_axis(local_to_logical, placed_local, axis=1)


def _keep_old_slots(new: np.ndarray, num_ranks: int, old: np.ndarray) -> np.ndarray:
    """Per rank, an expert that was on the rank before keeps its old slot; the rest fill the others in order."""
    layers, num_physical = new.shape
    if num_ranks <= 0 or num_physical % num_ranks:
        return new
    per_rank = num_physical // num_ranks
    out = new.copy()
    for layer in range(layers):
        for start in range(0, num_physical, per_rank):
            incoming = list(new[layer, start:start + per_rank])
            taken = [False] * per_rank
            kept = [False] * per_rank
            for slot in range(per_rank):
                for index, expert in enumerate(incoming):
                    if not taken[index] and expert == old[layer, start + slot]:
                        out[layer, start + slot] = expert
                        taken[index] = kept[slot] = True
                        break
            rest = [expert for index, expert in enumerate(incoming) if not taken[index]]
            free = [slot for slot in range(per_rank) if not kept[slot]]
            for slot, expert in zip(free, rest, strict=True):
                out[layer, start + slot] = expert
    return out


def rebalance(load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
              old_map: torch.Tensor | None = None) -> torch.Tensor:
    """The physical -> logical map ``[layers, num_physical]`` (int64) for a logical load ``[layers, logical]``.

    Same arguments and result as vLLM's ``DefaultEplbPolicy.rebalance_experts``.
    """
    weight = load.float().cpu().numpy()
    if num_groups % num_nodes == 0:
        new = _hierarchical(weight, num_physical, num_groups, num_nodes, num_ranks)
    else:
        new = _hierarchical(weight, num_physical, 1, 1, num_ranks)
    if old_map is not None:
        new = _keep_old_slots(new, num_ranks, old_map.cpu().numpy())
    return torch.from_numpy(new)


def vllm_policy():
    """vLLM's ``DefaultEplbPolicy`` if vLLM is importable, else None."""
    try:
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    except Exception:  # no vLLM, or one that fails to import on this machine
        return None
    return DefaultEplbPolicy


def policy_rebalance(load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
                     old_map: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """The map from vLLM's policy when vLLM is installed, else from ``rebalance``; and which one ran."""
    policy = vllm_policy()
    if policy is None:
        return rebalance(load, num_physical, num_groups, num_nodes, num_ranks, old_map), "eplb_compile"
    return policy.rebalance_experts(load, num_physical, num_groups, num_nodes, num_ranks, old_map).long(), "vllm"
