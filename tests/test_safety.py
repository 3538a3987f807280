"""Data-dependent oddities (invalid ids, odd replica counts, map entries
outside the load) are ignored, and never reach memory outside the arguments.

Every argument is a view into a larger buffer. The load's guard holds a
sentinel that must survive (no write out of bounds). The map's and replica
count's guards hold valid-looking entries: a read out of bounds would map to
(and record) them, so the result would differ from the reference.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import eplb_compile
from eplb_compile.reference import map_and_record_reference, map_only_reference, record_counts_reference

from tests.cases import DEVICES
from tests.guards import MARGIN as GUARD
from tests.guards import guarded, poison_allocator

NUM_LOGICAL, SLOTS, NUM_PHYSICAL = 5, 3, 12
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def guarded_load(values: torch.Tensor, device: str):
    return guarded(values, device)  # POISON around it: a stray write shows


def guarded_map(l2p: torch.Tensor, device: str) -> torch.Tensor:
    # Rows above and below, and columns past the slots, all hold physical id 0:
    # a read past a row or past the map would record expert 0.
    return guarded(l2p, device, fill=0).view


def guarded_replica_count(replica_count: torch.Tensor, device: str) -> torch.Tensor:
    return guarded(replica_count, device, fill=1).view


def default_inputs(tokens: int, k: int):
    g = torch.Generator().manual_seed(tokens * 31 + k)
    ids = torch.randint(0, NUM_LOGICAL, (tokens, k), generator=g)
    l2p = torch.randint(0, NUM_PHYSICAL, (NUM_LOGICAL, SLOTS), generator=g)
    replica_count = torch.randint(1, SLOTS + 1, (NUM_LOGICAL,), generator=g)
    return ids, l2p, replica_count


def _spread(ids: torch.Tensor, odd_values: list[int]) -> torch.Tensor:
    """Put the odd values at every third slot, keeping valid ids around them."""
    flat = ids.reshape(-1).clone()
    for i in range(0, flat.numel(), 3):
        flat[i] = odd_values[(i // 3) % len(odd_values)]
    return flat.reshape(ids.shape)


def _past_the_load(l2p: torch.Tensor) -> torch.Tensor:
    """Even ids moved past the load (some into the guard), one row past int32."""
    return torch.where(l2p % 2 == 0, NUM_PHYSICAL + l2p, l2p).index_fill(0, torch.tensor([1]), 2**40)


def _replica_counts(*values: int, dtype=torch.int32) -> Callable:
    return lambda ids, m, r: (ids, m, torch.tensor(values, dtype=dtype))


# name -> (id dtype, edit of (ids, l2p, replica_count), whether some slot must
# come out invalid: -1, or a physical id past the load).
ODDITIES = {
    "expert ids negative": (
        torch.int32, lambda ids, m, r: (_spread(ids, [-1, -2, -NUM_LOGICAL, INT32_MIN]), m, r), True,
    ),
    "expert ids past num_logical": (
        torch.int32,
        lambda ids, m, r: (_spread(ids, [NUM_LOGICAL, NUM_LOGICAL + 1, NUM_LOGICAL + GUARD, INT32_MAX]), m, r),
        True,
    ),
    # int64 ids are read as int32 (like vLLM): these wrap to invalid ids.
    "int64 expert ids wrapping to invalid": (
        torch.int64, lambda ids, m, r: (_spread(ids, [2**32 - 1, 2**32 + NUM_LOGICAL, 2**31, -(2**40)]), m, r), True,
    ),
    "int8 expert ids out of range": (
        torch.int8, lambda ids, m, r: (_spread(ids, [127, -128, -1, NUM_LOGICAL]), m, r), True,
    ),
    "int16 expert ids out of range": (
        torch.int16, lambda ids, m, r: (_spread(ids, [32767, -32768, NUM_LOGICAL]), m, r), True,
    ),
    # Counts below 1 count as 1 (vLLM's max(count, 1)): no division by zero.
    "replica count zero": (torch.int32, _replica_counts(0, 0, 0, 0, 0), False),
    "replica count negative": (torch.int32, _replica_counts(-1, -3, INT32_MIN, 0, -7), False),
    "replica count past slots": (torch.int32, _replica_counts(SLOTS + 1, SLOTS + 2, 2 * SLOTS, GUARD, INT32_MAX), True),
    "replica count past slots, int64": (
        torch.int32, _replica_counts(2**40, 2**33 + 1, SLOTS + 1, 2**62, 4, dtype=torch.int64), True,
    ),
    "physical ids -1 (padding)": (torch.int32, lambda ids, m, r: (ids, m.masked_fill(m % 3 == 0, -1), r), True),
    "physical ids below -1": (torch.int32, lambda ids, m, r: (ids, m.masked_fill(m % 3 == 0, -2 - GUARD), r), True),
    "physical ids past the load": (
        torch.int64,
        lambda ids, m, r: (ids, _past_the_load(m), r),
        True,
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_unpadded", [None, 7, 0, 10**6])
@pytest.mark.parametrize("oddity", ODDITIES)
def test_oddities_are_ignored_and_stay_in_bounds(device, oddity, num_unpadded):
    dtype, edit, invalidates = ODDITIES[oddity]
    ids, l2p, replica_count = edit(*default_inputs(tokens=23, k=4))
    ids = ids.to(dtype)
    start_load = torch.randint(0, 100, (NUM_PHYSICAL,), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    unpadded = None if num_unpadded is None else torch.tensor(num_unpadded, dtype=torch.int32)
    want_ids, want_load = map_and_record_reference(ids, l2p, replica_count, start_load, True, num_unpadded)
    # The oddity must matter: some slot maps to -1 or to an id past the load.
    assert ((want_ids < 0) | (want_ids.to(torch.int64) >= NUM_PHYSICAL)).any() == invalidates

    load = guarded_load(start_load, device)
    l2p_dev = guarded_map(l2p, device)
    replica_dev = guarded_replica_count(replica_count, device)
    ids_dev = ids.to(device)
    gate = torch.tensor(True, device=device)
    unpadded_dev = None if unpadded is None else unpadded.to(device)

    poison_allocator(device, ids.numel())
    got_ids = eplb_compile.map_and_record(ids_dev, l2p_dev, replica_dev, load.view, gate, unpadded_dev)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.equal(load.view.cpu(), want_load)
    assert load.intact()

    poison_allocator(device, ids.numel())
    assert torch.equal(eplb_compile.map_only(ids_dev, l2p_dev, replica_dev).cpu(), want_ids)


@pytest.mark.parametrize("device", DEVICES)
def test_record_counts_at_the_load_edges_stay_in_bounds(device):
    g = torch.Generator().manual_seed(2)
    start_load = torch.randint(0, 100, (NUM_PHYSICAL,), dtype=torch.int32, generator=g)
    # The first and last elements, the whole load, nothing at the very end.
    for start, n in [(0, 1), (NUM_PHYSICAL - 1, 1), (0, NUM_PHYSICAL), (NUM_PHYSICAL, 0), (5, 7)]:
        counts = torch.randint(0, 1000, (n,), dtype=torch.int32, generator=g)
        load = guarded_load(start_load, device)
        eplb_compile.record_counts(load.view, counts.to(device), start, torch.tensor(True, device=device))
        assert torch.equal(load.view.cpu(), record_counts_reference(start_load, counts, start, True))
        assert load.intact()


@pytest.mark.parametrize("device", DEVICES)
def test_everything_odd_at_once_with_the_gate_off_writes_nothing(device):
    ids = torch.tensor([[-1, NUM_LOGICAL], [0, 1], [2, 3]], dtype=torch.int32)
    l2p = torch.tensor([[-1, NUM_PHYSICAL, 0]] * NUM_LOGICAL)
    replica_count = torch.tensor([0, SLOTS + 1, 2, 3, 1])
    start_load = torch.arange(NUM_PHYSICAL, dtype=torch.int32)
    want_ids, _ = map_and_record_reference(ids, l2p, replica_count, start_load, False)
    load = guarded_load(start_load, device)
    got = eplb_compile.map_and_record(
        ids.to(device), guarded_map(l2p, device), guarded_replica_count(replica_count, device), load.view,
        torch.tensor(False, device=device),
    )
    assert torch.equal(got.cpu(), want_ids)
    assert torch.equal(load.view.cpu(), start_load)
    assert load.intact()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype, too_big", [(torch.int8, 200), (torch.int8, 128), (torch.int16, 2**15), (torch.int16, 2**40)])
def test_map_only_never_wraps_an_id_of_a_sparse_map(device, compiled, dtype, too_big):
    # Two map entries pass the capacity rule (which counts entries: an EPLB map
    # names each physical id below num_logical x slots once); this invalid map
    # names a larger id, which comes back -1, never wrapped (200 would be -56).
    l2p = torch.tensor([[too_big], [5]], device=device)
    ids = torch.tensor([[0, 1], [1, 0], [-1, 1]], dtype=dtype, device=device)
    replica_count = torch.ones(2, dtype=torch.int64, device=device)
    op = torch.compile(eplb_compile.map_only, fullgraph=True) if compiled else eplb_compile.map_only
    want = torch.tensor([[-1, 5], [5, -1], [-1, 5]], dtype=dtype)
    assert torch.equal(op(ids, l2p, replica_count).cpu(), want)
    assert torch.equal(map_only_reference(ids.cpu(), l2p.cpu(), replica_count.cpu()), want)
