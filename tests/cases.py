"""Random operator inputs shared by the tests: invalid ids, replicas past the
map's slots, physical ids past the load, padding, gate off, dtypes, strides."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass
class MapCase:
    topk_ids: torch.Tensor
    l2p: torch.Tensor
    replica_count: torch.Tensor
    load: torch.Tensor
    record_enabled: torch.Tensor
    num_unpadded_tokens: torch.Tensor | None

    def to(self, device: str) -> "MapCase":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        # .to() keeps the ids' strides only on the same device; rebuild them.
        ids = self.topk_ids
        moved_ids = torch.empty_strided(ids.shape, ids.stride(), dtype=ids.dtype, device=device)
        moved_ids.copy_(ids)
        return MapCase(
            moved_ids, move(self.l2p), move(self.replica_count), move(self.load),
            move(self.record_enabled), move(self.num_unpadded_tokens),
        )


def make_case(
    seed: int,
    tokens: int,
    k: int,
    num_logical: int,
    slots: int,
    num_physical: int,
    dtype: torch.dtype,
    contiguous: bool,
    num_unpadded: int | None,
    gate: bool,
) -> MapCase:
    g = torch.Generator().manual_seed(seed)
    # Ids from -1 to num_logical + 1: out-of-range ones must map to -1.
    ids = torch.randint(-1, num_logical + 2, (k, tokens) if not contiguous else (tokens, k), generator=g)
    ids = ids.t() if not contiguous else ids
    ids = ids.to(dtype)
    # Physical ids from -1 (padding) to past the load: never recorded.
    l2p = torch.randint(-1, num_physical + 2, (num_logical, slots), generator=g)
    # Replica counts of 0 and past the slots are both legal inputs to ignore safely.
    replica_count = torch.randint(0, slots + 2, (num_logical,), generator=g)
    load = torch.randint(0, 1000, (num_physical,), generator=g, dtype=torch.int32)
    unpadded = None if num_unpadded is None else torch.tensor(num_unpadded, dtype=torch.int32)
    return MapCase(ids, l2p, replica_count, load, torch.tensor(gate), unpadded)


@st.composite
def map_cases(draw, max_tokens: int = 4096) -> MapCase:
    tokens = draw(st.one_of(st.integers(0, 64), st.integers(0, max_tokens)))
    return make_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        tokens=tokens,
        k=draw(st.integers(1, 10)),
        num_logical=draw(st.integers(1, 4)),
        slots=draw(st.integers(1, 4)),
        num_physical=draw(st.integers(1, 16)),
        dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        contiguous=draw(st.booleans()),
        num_unpadded=draw(st.one_of(st.none(), st.integers(0, tokens + 2))),
        gate=draw(st.booleans()),
    )
