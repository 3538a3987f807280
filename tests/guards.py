"""Catching stray writes and unwritten outputs: one poison value, one guard buffer.

Torch only, so the device scripts can import it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Fits every id dtype (int8 included) and is never a right answer: ids come
# back as -1 or a map entry (the tests' maps hold -1 and non-negative ids),
# and loads never go negative.
POISON = -77
MARGIN = 32  # elements (or map rows and columns) of guard on each side


@dataclass
class Guarded:
    """A view in the middle of a larger buffer whose other elements hold ``fill``."""

    buffer: torch.Tensor
    view: torch.Tensor
    fill: int

    def intact(self) -> bool:
        """Whether nothing outside the view was written."""
        outside = self.buffer.clone()
        _region(outside, self.view.shape).fill_(self.fill)
        return bool((outside == self.fill).all())


def _region(buffer: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 1:
        return buffer[MARGIN : MARGIN + shape[0]]
    return buffer[MARGIN : MARGIN + shape[0], : shape[1]]


def guarded(values: torch.Tensor, device: str | torch.device, fill: int = POISON) -> Guarded:
    """``values`` (1-D or 2-D) copied into the middle of a buffer filled with ``fill``.

    A 1-D view is contiguous with ``MARGIN`` elements either side, as vLLM's
    load rows are; a 2-D view (a map) has ``MARGIN`` rows above and below and
    ``MARGIN`` columns past its last one. For a load, ``fill`` is POISON (a
    write shows); for a map or replica counts, a valid-looking entry (a read
    out of bounds would map to it and count it, so the result would differ).
    """
    if values.dim() == 1:
        shape = (values.shape[0] + 2 * MARGIN,)
    elif values.dim() == 2:
        shape = (values.shape[0] + 2 * MARGIN, values.shape[1] + MARGIN)
    else:
        raise ValueError(f"guarded takes 1-D or 2-D values, got shape {tuple(values.shape)}")
    buffer = torch.full(shape, fill, dtype=values.dtype, device=device)
    view = _region(buffer, values.shape)
    view.copy_(values)
    return Guarded(buffer, view, fill)


def poison_allocator(device: str | torch.device, numel: int) -> None:
    """Leave POISON in freed memory, so an output the op fails to write shows."""
    scratch = torch.full((max(numel, 1) * 2,), POISON, dtype=torch.int64, device=device)
    del scratch
