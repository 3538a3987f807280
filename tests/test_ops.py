"""The operators against the element-wise reference, and opcheck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import eplb_compile
import eplb_compile.ops  # noqa: F401 - registers torch.ops.eplb_compile (eplb_compile's names are lazy)
from eplb_compile.reference import (
    map_and_record_numpy,
    map_and_record_reference,
    map_only_reference,
    record_counts_reference,
)

from tests.cases import DEVICES, make_case, map_cases
from tests.guards import poison_allocator

OPS = torch.ops.eplb_compile


def _unpadded(case):
    return None if case.num_unpadded_tokens is None else int(case.num_unpadded_tokens)


def check_map_and_record(case, device):
    case = case.to(device)
    cpu = (case.topk_ids.cpu(), case.l2p.cpu(), case.replica_count.cpu())
    want_ids, want_load = map_and_record_reference(
        *cpu, case.load.cpu(), bool(case.record_enabled), _unpadded(case)
    )
    load = case.load.clone()
    poison_allocator(device, case.topk_ids.numel())
    ids = eplb_compile.map_and_record(
        case.topk_ids, case.l2p, case.replica_count, load, case.record_enabled, case.num_unpadded_tokens
    )
    assert ids.dtype == case.topk_ids.dtype and ids.shape == case.topk_ids.shape
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.equal(load.cpu(), want_load)

    poison_allocator(device, case.topk_ids.numel())
    mapped = eplb_compile.map_only(case.topk_ids, case.l2p, case.replica_count)
    assert torch.equal(mapped.cpu(), want_ids)

    # With padding: rows at or past num_unpadded are -1, the others as above.
    poison_allocator(device, case.topk_ids.numel())
    padded = eplb_compile.map_only(case.topk_ids, case.l2p, case.replica_count, case.num_unpadded_tokens)
    assert torch.equal(padded.cpu(), map_only_reference(*cpu, _unpadded(case)))


@pytest.mark.parametrize("device", DEVICES)
@given(case=map_cases())
def test_map_and_record_matches_reference(device, case):
    check_map_and_record(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_index_dtype(device, dtype):
    for seed in range(3):
        case = make_case(seed, 333, 7, 4, 3, 9, torch.int64, contiguous=seed % 2 == 0, num_unpadded=300, gate=True)
        case.topk_ids = case.topk_ids.clamp_min(0).to(dtype)
        check_map_and_record(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_unpadded", [-3, 0, 1, 5, 6, 7, 2**31 - 1])
def test_map_only_padding_rows_are_invalid(device, num_unpadded):
    # num_unpadded <= 0: every row is padding; >= T: none is.
    case = make_case(7, 6, 3, 4, 2, 8, torch.int32, contiguous=False, num_unpadded=num_unpadded, gate=True).to(device)
    got = eplb_compile.map_only(case.topk_ids, case.l2p, case.replica_count, case.num_unpadded_tokens)
    unpadded = eplb_compile.map_only(case.topk_ids, case.l2p, case.replica_count)
    rows = torch.arange(6, device=device).unsqueeze(1) < num_unpadded
    assert torch.equal(got, torch.where(rows, unpadded, -1))
    assert torch.equal(got.cpu(), map_only_reference(case.topk_ids.cpu(), case.l2p.cpu(), case.replica_count.cpu(),
                                                     num_unpadded))


@pytest.mark.parametrize("device", DEVICES)
def test_int64_ids_wrap_to_int32_like_vllm(device):
    # vLLM reads ids as int32, so 2**32 + 1 is expert 1, not an invalid id.
    case = make_case(0, 5, 2, 4, 2, 8, torch.int64, contiguous=True, num_unpadded=None, gate=True)
    case.topk_ids[0, 0] = 2**32 + 1
    case.topk_ids[1, 1] = -(2**32) + 2
    check_map_and_record(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_replica_past_slots_is_invalid_not_out_of_bounds(device):
    # Every logical expert claims 5 replicas but the map has 2 slots: vLLM
    # would read the next row (or past the map); we must yield -1 instead.
    l2p = torch.tensor([[0, 1], [2, 3]], device=device)
    replica_count = torch.tensor([5, 5], device=device)
    topk_ids = torch.tensor([[0], [1], [0], [1], [0], [1], [0], [1]], dtype=torch.int32, device=device)
    load = torch.zeros(4, dtype=torch.int32, device=device)
    ids = eplb_compile.map_and_record(topk_ids, l2p, replica_count, load, torch.tensor(True, device=device))
    replica = [(t * 2654435769 & 0xFFFFFFFF) % 5 for t in range(8)]
    want = [l2p[e, r].item() if r < 2 else -1 for e, r in zip(topk_ids.flatten().tolist(), replica)]
    assert ids.flatten().tolist() == want
    assert -1 in want and load.sum().item() == sum(p >= 0 for p in want)


@pytest.mark.parametrize("device", DEVICES)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_physical=st.integers(1, 300),
    data=st.data(),
    gate=st.booleans(),
    strided=st.booleans(),
)
def test_record_counts_matches_reference(device, seed, num_physical, data, gate, strided):
    n = data.draw(st.integers(0, num_physical))
    start = data.draw(st.integers(0, num_physical - n))
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(-5, 1000, (num_physical,), generator=g, dtype=torch.int32)
    counts = torch.randint(0, 5000, (n * 2 if strided else n,), generator=g, dtype=torch.int32)
    # Slice after the move: .to() would make a strided view contiguous.
    want = record_counts_reference(load, counts[::2] if strided else counts, start, gate)
    counts = counts.to(device)
    counts = counts[::2] if strided else counts
    load_dev = load.to(device)
    eplb_compile.record_counts(load_dev, counts.to(device), start, torch.tensor(gate, device=device))
    assert torch.equal(load_dev.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    case = make_case(1, 0, 8, 4, 2, 8, torch.int32, contiguous=True, num_unpadded=0, gate=True)
    check_map_and_record(case, device)


@given(case=map_cases(max_tokens=512))
def test_numpy_reference_matches_elementwise(case):
    # The two statements of the semantics in reference.py, against each other.
    args = (case.topk_ids, case.l2p, case.replica_count, case.load, bool(case.record_enabled), _unpadded(case))
    want_ids, want_load = map_and_record_reference(*args)
    got_ids, got_load = map_and_record_numpy(*args)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_load, want_load)


def test_numpy_reference_edges():
    # int64 ids that wrap as int32, counts past 2**32, an empty map, huge map values.
    ids = torch.tensor([[2**32 + 1, -(2**32) + 2], [5, -1], [0, 1]])
    l2p = torch.tensor([[2**40, 1, 2], [3, -1, 4]])
    counts = torch.tensor([2**33 + 1, -4])
    load = torch.arange(6, dtype=torch.int32)
    for unpadded in (None, 0, 2, 9):
        assert all(torch.equal(a, b) for a, b in zip(map_and_record_numpy(ids, l2p, counts, load, True, unpadded),
                                                     map_and_record_reference(ids, l2p, counts, load, True, unpadded)))
    empty = torch.zeros(0, 3, dtype=torch.int64)
    assert all(torch.equal(a, b) for a, b in zip(map_and_record_numpy(ids, empty, counts[:0], load, True),
                                                 map_and_record_reference(ids, empty, counts[:0], load, True)))


def _opcheck_cases(device):
    case = make_case(3, 37, 3, 4, 3, 10, torch.int32, contiguous=True, num_unpadded=30, gate=True).to(device)
    strided = make_case(4, 21, 5, 3, 2, 7, torch.int64, contiguous=False, num_unpadded=None, gate=False).to(device)
    counts = torch.arange(4, dtype=torch.int32, device=device)
    return [
        (OPS.map_and_record.default, (case.topk_ids, case.l2p, case.replica_count, case.load, case.record_enabled, case.num_unpadded_tokens)),
        (OPS.map_and_record.default, (strided.topk_ids, strided.l2p, strided.replica_count, strided.load, strided.record_enabled, None)),
        (OPS.map_only.default, (case.topk_ids, case.l2p, case.replica_count)),
        (OPS.map_only.default, (case.topk_ids, case.l2p, case.replica_count, case.num_unpadded_tokens)),
        (OPS.map_only.default, (strided.topk_ids, strided.l2p, strided.replica_count)),
        (OPS.record_counts.default, (case.load, counts, 3, case.record_enabled)),
        (OPS.record_counts.default, (strided.load, counts, 0, strided.record_enabled)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        result = opcheck(op, args)
        assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_the_ops_only_read_the_gate_and_the_maps():
    """vLLM 0.34.0 refills its record gate only when the value flips, so a write
    to it by anyone else would stick: the schemas promise the ops never write
    the gate, the maps or the counts; only the load is mutated."""
    mutated = {}
    for name in ("map_and_record", "map_only", "record_counts"):
        schema = getattr(OPS, name).default._schema
        mutated[name] = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == {"map_and_record": ["expert_load_view"], "map_only": [], "record_counts": ["expert_load_view"]}
