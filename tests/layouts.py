"""How ``topk_ids [T, k]`` can sit in memory: vLLM hands over slices and
transposes. Torch only, so the device scripts can import it too."""

from __future__ import annotations

import torch

ID_LAYOUTS = ("contiguous", "transposed", "stepped", "column_slice", "expanded")


def ids_base_shape(layout: str, tokens: int, k: int) -> tuple[int, int]:
    """Shape of the storage that ``ids_view`` takes the ``[tokens, k]`` view of."""
    return {
        "contiguous": (tokens, k),
        "transposed": (k, tokens),
        "stepped": (2 * tokens, 3 * k),
        "column_slice": (tokens, k + 3),
        "expanded": (1, k),
    }[layout]


def ids_view(base: torch.Tensor, layout: str, tokens: int, k: int) -> torch.Tensor:
    """The ``[tokens, k]`` view of ``base`` (shaped by ``ids_base_shape``) in ``layout``."""
    return {
        "contiguous": lambda: base,
        "transposed": lambda: base.t(),
        "stepped": lambda: base[::2, 1::3],
        "column_slice": lambda: base[:, 2 : 2 + k],
        "expanded": lambda: base.expand(tokens, k),  # stride 0 across tokens
    }[layout]()
