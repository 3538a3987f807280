"""Load-imbalance metrics over EP ranks: each formula once, in numpy.

EPLB's placement is linear, so rank r owns physical experts
``[r * P / ep_size, (r + 1) * P / ep_size)``.

The ``*_per_pass`` functions own the formulas. They take numpy loads
``[..., layers, physical]`` and treat every leading dimension as separate
passes, so ``eplb-compile report`` computes a whole recording's steps in one
call, without importing torch. The torch API below them (``rank_loads``,
``balancedness``, ``imbalance_max_over_mean``, ``imbalance_trtllm``,
``logical_load``) is for callers holding tensors: it takes a pass
``[layers, physical]`` or a window ``[steps, layers, physical]`` (summed over
steps first), calls the numpy formula and gives tensors back, so both paths
give the same numbers bit for bit.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------- numpy: the formulas


def rank_loads_per_pass(load: np.ndarray, ep_size: int) -> np.ndarray:
    """Assignments per EP rank: ``[..., layers, physical]`` -> ``[..., layers, ep_size]`` float64."""
    load = np.asarray(load)
    if ep_size <= 0:
        raise ValueError(f"ep_size must be positive, got {ep_size}")
    if load.ndim < 2:
        raise ValueError(f"load must be [..., layers, physical], got {load.shape}")
    if load.shape[-1] % ep_size != 0:
        raise ValueError(f"{load.shape[-1]} physical experts do not split evenly over ep_size={ep_size}")
    by_rank = load.reshape(*load.shape[:-1], ep_size, load.shape[-1] // ep_size)
    if load.dtype.kind in "iub":  # exact in int64, then float64 (exact below 2**53)
        return by_rank.sum(axis=-1, dtype=np.int64).astype(np.float64)
    return by_rank.astype(np.float64).sum(axis=-1)


def balancedness_per_pass(load: np.ndarray, ep_size: int) -> np.ndarray:
    """vLLM's balancedness per pass ``[...]``: sum over layers of mean, over sum of max (1.0 is perfect).

    As ``EplbState.step`` logs it (``_compute_eplb_load_stats``), including
    its 0.0 for an empty load. vLLM computes it on the pass in float32; this
    uses float64, so the last digits may differ on huge loads.
    """
    per_rank = rank_loads_per_pass(load, ep_size)
    max_total = per_rank.max(axis=-1).sum(axis=-1)
    mean_total = per_rank.mean(axis=-1).sum(axis=-1)
    return np.where(max_total == 0, 0.0, mean_total / np.where(max_total == 0, 1.0, max_total))


def max_over_mean_per_pass(load: np.ndarray, ep_size: int) -> np.ndarray:
    """Per layer max/mean over ranks ``[..., layers]``, as in the upstream test plan (1.0 is perfect).

    A layer with no assignments at all counts as balanced (1.0), not NaN.
    """
    per_rank = rank_loads_per_pass(load, ep_size)
    max_load, mean = per_rank.max(axis=-1), per_rank.mean(axis=-1)
    return np.where(mean > 0, max_load / np.maximum(mean, 1e-12), 1.0)


def trtllm_per_pass(load: np.ndarray, ep_size: int) -> np.ndarray:
    """Per layer (max - mean) / mean over ranks ``[..., layers]``, TensorRT-LLM's definition (0.0 is perfect).

    Computed as written rather than as max/mean - 1, which rounds differently.
    A layer with no assignments at all counts as balanced (0.0).
    """
    per_rank = rank_loads_per_pass(load, ep_size)
    max_load, mean = per_rank.max(axis=-1), per_rank.mean(axis=-1)
    return np.where(mean > 0, (max_load - mean) / np.maximum(mean, 1e-12), 0.0)


def logical_load_per_pass(load: np.ndarray, physical_to_logical: np.ndarray, num_logical: int) -> np.ndarray:
    """``[..., layers, physical]`` load summed onto logical experts (int64), as vLLM's rearrange does.

    ``physical_to_logical`` ``[layers, physical]`` (or broadcastable to the load); -1 (an empty slot) is dropped.
    """
    load = np.asarray(load)
    index = np.broadcast_to(np.asarray(physical_to_logical), load.shape).astype(np.int64)
    if index.size and (int(index.max()) >= num_logical or int(index.min()) < -1):
        # Flattened below, such an entry would add its load to another layer's expert.
        raise ValueError(f"physical_to_logical names logical experts {int(index.min())}..{int(index.max())}, "
                         f"outside -1..{num_logical - 1}")
    index = np.where(index < 0, num_logical, index)
    rows = int(np.prod(load.shape[:-1]))
    offsets = (np.arange(rows, dtype=np.int64) * (num_logical + 1)).reshape(*load.shape[:-1], 1)
    out = np.zeros(rows * (num_logical + 1), dtype=np.int64)
    np.add.at(out, (index + offsets).ravel(), load.astype(np.int64).ravel())
    return out.reshape(*load.shape[:-1], num_logical + 1)[..., :num_logical]


# ----------------------------------------------------------------------- torch: the same, on tensors


def _window(load) -> tuple[np.ndarray, object]:
    """A pass or a window summed over steps, as numpy, and the device to give results back on."""
    if load.dim() == 3:
        load = load.sum(dim=0)
    if load.dim() != 2:
        raise ValueError(f"load must be [layers, physical] or [steps, layers, physical], got {tuple(load.shape)}")
    return _numpy(load), load.device


def _numpy(tensor) -> np.ndarray:
    """A tensor's values in numpy; dtypes numpy lacks (bfloat16) as float64."""
    import torch

    tensor = tensor.detach().cpu()
    return (tensor.to(torch.float64) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _tensor(values: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(values)).to(device)


def rank_loads(load, ep_size: int):
    """Assignments per EP rank: ``[layers, ep_size]`` as float64."""
    window, device = _window(load)
    return _tensor(rank_loads_per_pass(window, ep_size), device)


def balancedness(load, ep_size: int) -> float:
    """vLLM's balancedness of a pass or window (:func:`balancedness_per_pass`)."""
    return float(balancedness_per_pass(_window(load)[0], ep_size))


def imbalance_max_over_mean(load, ep_size: int):
    """Per-layer max/mean over ranks (:func:`max_over_mean_per_pass`), float64 ``[layers]``."""
    window, device = _window(load)
    return _tensor(max_over_mean_per_pass(window, ep_size), device)


def imbalance_trtllm(load, ep_size: int):
    """Per-layer (max - mean) / mean over ranks (:func:`trtllm_per_pass`), float64 ``[layers]``."""
    window, device = _window(load)
    return _tensor(trtllm_per_pass(window, ep_size), device)


def logical_load(load, physical_to_logical, num_logical: int):
    """``[..., layers, physical]`` load summed onto logical experts (:func:`logical_load_per_pass`), int64."""
    values = logical_load_per_pass(_numpy(load), _numpy(physical_to_logical), num_logical)
    return _tensor(values, load.device)
