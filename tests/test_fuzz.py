"""Hypothesis fuzz of shapes, id dtypes and strides, every op against the reference.

CI runs a bounded fuzz (the "ci" profile of tests/conftest.py). The long one
runs on demand:

    HYPOTHESIS_PROFILE=long pytest -m slow tests/test_fuzz.py
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import eplb_compile
from eplb_compile.reference import map_and_record_reference, map_only_reference, record_counts_reference

from tests.cases import DEVICES
from tests.guards import Guarded, guarded, poison_allocator
from tests.layouts import ID_LAYOUTS, ids_base_shape, ids_view

# Every id dtype the ops take (uint8 is refused: it cannot hold -1); the
# fuzzed loads stay under 128 physical experts, so int8 holds every id.
ID_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64]
MAP_LAYOUTS = ["contiguous", "transposed", "column_slice"]


@dataclass(frozen=True)
class MapParams:
    seed: int
    tokens: int
    k: int
    num_logical: int
    slots: int
    num_physical: int
    id_dtype: torch.dtype
    id_layout: str
    extremes: bool  # sprinkle the id dtype's min and max
    map_layout: str
    replica_dtype: torch.dtype
    replica_stepped: bool
    num_unpadded: int | None
    gate: bool


@st.composite
def map_params(draw, max_tokens: int) -> MapParams:
    tokens = draw(st.one_of(st.just(0), st.integers(0, 8), st.integers(0, max_tokens)))
    id_dtype = draw(st.sampled_from(ID_DTYPES))
    # int8 ids must hold every id the map can name (map_only's rule: 40 x 3 <= 128).
    max_slots = 3 if id_dtype == torch.int8 else 5
    return MapParams(
        seed=draw(st.integers(0, 2**31 - 1)),
        tokens=tokens,
        k=draw(st.one_of(st.just(1), st.integers(1, 10))),
        num_logical=draw(st.one_of(st.just(1), st.integers(1, 40))),
        slots=draw(st.one_of(st.just(1), st.integers(1, max_slots))),
        num_physical=draw(st.one_of(st.just(1), st.integers(1, 48))),
        id_dtype=id_dtype,
        id_layout=draw(st.sampled_from(ID_LAYOUTS)),
        extremes=draw(st.booleans()),
        map_layout=draw(st.sampled_from(MAP_LAYOUTS)),
        replica_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        replica_stepped=draw(st.booleans()),
        num_unpadded=draw(st.one_of(st.none(), st.integers(0, tokens + 2))),
        gate=draw(st.booleans()),
    )


def ids_base(p: MapParams, g: torch.Generator) -> torch.Tensor:
    shape = ids_base_shape(p.id_layout, p.tokens, p.k)
    # Ids from -2 to num_logical + 1: the out-of-range ones map to -1.
    values = torch.randint(-2, p.num_logical + 2, shape, generator=g)
    if p.extremes and values.numel():
        info = torch.iinfo(p.id_dtype)
        values.view(-1)[:: 5] = info.max
        values.view(-1)[2 :: 7] = info.min
    return values.to(p.id_dtype)  # wraps for the narrow dtypes, like a real cast


def map_base(p: MapParams, g: torch.Generator) -> torch.Tensor:
    shape = {
        "contiguous": (p.num_logical, p.slots),
        "transposed": (p.slots, p.num_logical),
        "column_slice": (p.num_logical, p.slots + 2),
    }[p.map_layout]
    # -1 padding, and ids past the load, which are never recorded.
    return torch.randint(-1, p.num_physical + 2, shape, generator=g)


def map_view(base: torch.Tensor, p: MapParams) -> torch.Tensor:
    return {"contiguous": base, "transposed": base.t(), "column_slice": base[:, 1 : 1 + p.slots]}[p.map_layout]


@dataclass
class MapInputs:
    ids: torch.Tensor
    l2p: torch.Tensor
    replica_count: torch.Tensor
    load: Guarded  # the load's view sits between POISON guards
    gate: torch.Tensor
    num_unpadded: torch.Tensor | None


def build(p: MapParams, device: str) -> MapInputs:
    """The same inputs on any device: the views are taken after the move."""
    g = torch.Generator().manual_seed(p.seed)
    ids = ids_view(ids_base(p, g).to(device), p.id_layout, p.tokens, p.k)
    l2p = map_view(map_base(p, g).to(device), p)
    # Replica counts from 0 (read as 1) to past the slots (mapped to -1).
    replicas = torch.randint(0, p.slots + 2, (p.num_logical * 2,), generator=g).to(p.replica_dtype).to(device)
    replica_count = replicas[::2] if p.replica_stepped else replicas[: p.num_logical]
    load = guarded(torch.randint(0, 1000, (p.num_physical,), generator=g, dtype=torch.int32), device)
    unpadded = None if p.num_unpadded is None else torch.tensor(p.num_unpadded, dtype=torch.int32, device=device)
    return MapInputs(ids, l2p, replica_count, load, torch.tensor(p.gate, device=device), unpadded)


def check_map_ops(p: MapParams, device: str) -> None:
    cpu = build(p, "cpu")
    want_ids, want_load = map_and_record_reference(
        cpu.ids, cpu.l2p, cpu.replica_count, cpu.load.view, p.gate, p.num_unpadded
    )
    x = build(p, device)
    assert x.ids.stride() == cpu.ids.stride() and x.l2p.stride() == cpu.l2p.stride()
    ids_before = x.ids.clone()

    poison_allocator(device, x.ids.numel())
    got = eplb_compile.map_and_record(x.ids, x.l2p, x.replica_count, x.load.view, x.gate, x.num_unpadded)
    assert got.dtype == p.id_dtype and got.shape == (p.tokens, p.k)
    assert torch.equal(got.cpu(), want_ids)
    assert torch.equal(x.load.view.cpu(), want_load)
    assert x.load.intact()

    poison_allocator(device, x.ids.numel())
    assert torch.equal(eplb_compile.map_only(x.ids, x.l2p, x.replica_count).cpu(), want_ids)
    poison_allocator(device, x.ids.numel())
    padded = eplb_compile.map_only(x.ids, x.l2p, x.replica_count, x.num_unpadded)
    assert torch.equal(padded.cpu(), map_only_reference(cpu.ids, cpu.l2p, cpu.replica_count, p.num_unpadded))
    assert torch.equal(x.ids, ids_before)  # the ids are read, never written


@st.composite
def counts_params(draw, max_physical: int):
    num_physical = draw(st.one_of(st.just(1), st.integers(1, max_physical)))
    n = draw(st.integers(0, num_physical))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        num_physical=num_physical,
        n=n,
        start=draw(st.integers(0, num_physical - n)),
        counts_step=draw(st.sampled_from([1, 2, 3])),
        gate=draw(st.booleans()),
    )


def check_record_counts(q: dict, device: str) -> None:
    g = torch.Generator().manual_seed(q["seed"])
    start_load = torch.randint(0, 10**6, (q["num_physical"],), generator=g, dtype=torch.int32)
    counts_base = torch.randint(0, 10**6, (q["n"] * q["counts_step"],), generator=g, dtype=torch.int32)
    want = record_counts_reference(start_load, counts_base[:: q["counts_step"]], q["start"], q["gate"])

    load = guarded(start_load, device)
    eplb_compile.record_counts(
        load.view, counts_base.to(device)[:: q["counts_step"]], q["start"], torch.tensor(q["gate"], device=device)
    )
    assert torch.equal(load.view.cpu(), want)
    assert load.intact()


@pytest.mark.parametrize("device", DEVICES)
@given(p=map_params(max_tokens=300))
def test_fuzz_map_ops(device, p):
    check_map_ops(p, device)


@pytest.mark.parametrize("device", DEVICES)
@given(q=counts_params(max_physical=300))
def test_fuzz_record_counts(device, q):
    check_record_counts(q, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@given(p=map_params(max_tokens=8192))
def test_fuzz_map_ops_long(device, p):
    check_map_ops(p, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@given(q=counts_params(max_physical=4096))
def test_fuzz_record_counts_long(device, q):
    check_record_counts(q, device)
