"""Compiled graphs stay in bounds when the caller drops Dynamo's guards, as vLLM does.

Each test compiles one graph over several valid calls (every size dynamic),
with a ``guard_filter_fn`` that drops every guard, so nothing makes Dynamo
retrace: the bad call runs the same graph. Every size rule that guards memory
or id capacity must still refuse it with the eager call's error, and nothing
outside the arguments may change (the load sits between POISON guards).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import eplb_compile
from eplb_compile.reference import map_and_record_reference, map_only_reference, record_counts_reference

from tests.cases import DEVICES, requires_cuda
from tests.guards import guarded

@contextlib.contextmanager
def one_graph():
    """A fresh Dynamo, no compile caches (a cached graph would bring its old
    guards), and a check that every call ran the one graph."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def compiled_without_guards(fn):
    # A new filter per compile: torch 2.14 skipped a filter object it had seen
    # before torch._dynamo.reset(), keeping every guard.
    return torch.compile(fn, fullgraph=True, dynamic=True,
                         options={"guard_filter_fn": lambda entries: [False] * len(entries)})


def record(load, counts, start, gate):
    eplb_compile.record_counts(load, counts, start, gate)


@pytest.mark.parametrize("device", DEVICES)
def test_record_counts_overrun_is_refused_without_guards(device):
    gate = torch.tensor(True, device=device)
    with one_graph():
        run = compiled_without_guards(record)
        for start, n, size in [(2, 4, 16), (5, 4, 16), (9, 3, 12)]:
            load = guarded(torch.arange(size, dtype=torch.int32), device)
            counts = torch.arange(1, n + 1, dtype=torch.int32)
            run(load.view, counts.to(device), start, gate)
            assert torch.equal(load.view.cpu(), record_counts_reference(torch.arange(size, dtype=torch.int32),
                                                                        counts, start, True))
            assert load.intact()
        # The case: start 14 with 4 counts on a 16-long view of a larger buffer.
        for start, n, size, message in [
            (14, 4, 16, "counts of length 4 starting at start=14 overrun expert_load_view of length 16"),
            (0, 17, 16, "counts of length 17 starting at start=0 overrun expert_load_view of length 16"),
            (-3, 4, 16, "start must be >= 0, got -3"),
        ]:
            load = guarded(torch.zeros(size, dtype=torch.int32), device)
            with pytest.raises(ValueError, match=re.escape(message)):
                run(load.view, torch.ones(n, dtype=torch.int32, device=device), start, gate)
            assert load.intact() and not load.view.any()


def map_ops(ids, l2p, replica_count, load, gate):
    return (eplb_compile.map_and_record(ids, l2p, replica_count, load, gate),
            eplb_compile.map_only(ids, l2p, replica_count))


def spread_map(num_logical: int, num_physical: int) -> torch.Tensor:
    """One slot per logical expert, naming physical ids up to num_physical - 1."""
    return (torch.arange(num_logical) * (num_physical - 1) // max(num_logical - 1, 1)).reshape(num_logical, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, capacity", [(torch.int8, 2**7), (torch.int16, 2**15)])
def test_id_capacity_is_refused_without_guards(device, dtype, capacity):
    gate = torch.tensor(True, device=device)
    ids = torch.tensor([[0], [1], [3]], dtype=dtype)
    with one_graph():
        run = compiled_without_guards(map_ops)
        for num_physical in (40, 60, capacity):  # the largest load the dtype can serve
            l2p, replica_count = spread_map(4, num_physical), torch.ones(4, dtype=torch.int64)
            load = guarded(torch.zeros(num_physical, dtype=torch.int32), device)
            got, mapped = run(ids.to(device), l2p.to(device), replica_count.to(device), load.view, gate)
            want, want_load = map_and_record_reference(ids, l2p, replica_count, torch.zeros(num_physical,
                                                                                           dtype=torch.int32), True)
            assert torch.equal(got.cpu(), want) and torch.equal(load.view.cpu(), want_load) and load.intact()
            assert torch.equal(mapped.cpu(), map_only_reference(ids, l2p, replica_count))
        # One physical expert more: its id would wrap in the ids' dtype.
        l2p, replica_count = spread_map(4, capacity + 1), torch.ones(4, dtype=torch.int64)
        load = guarded(torch.zeros(capacity + 1, dtype=torch.int32), device)
        with pytest.raises(TypeError, match=f"has {capacity + 1} physical experts, so ids up to {capacity}"):
            run(ids.to(device), l2p.to(device), replica_count.to(device), load.view, gate)
        assert load.intact() and not load.view.any()


def only_map(ids, l2p, replica_count):
    return eplb_compile.map_only(ids, l2p, replica_count)


@pytest.mark.parametrize("device", DEVICES)
def test_map_only_capacity_is_refused_without_guards(device):
    ids = torch.tensor([[0], [1]], dtype=torch.int8, device=device)
    with one_graph():
        run = compiled_without_guards(only_map)
        for num_logical in (20, 50, 128):
            l2p = spread_map(num_logical, num_logical)
            want = map_only_reference(ids.cpu(), l2p, torch.ones(num_logical, dtype=torch.int64))
            assert torch.equal(run(ids, l2p.to(device), torch.ones(num_logical, dtype=torch.int64, device=device)).cpu(),
                               want)
        with pytest.raises(TypeError, match="has 129 x 1 entries, so ids up to 128"):
            run(ids, spread_map(129, 129).to(device), torch.ones(129, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_replica_count_shorter_than_the_map_is_refused_without_guards(device):
    # An equality between sizes is no guard to drop: Dynamo gives both sizes
    # one symbol, and Inductor's generated code asserts every input's size.
    gate = torch.tensor(True, device=device)
    ids = torch.full((3, 2), 7, dtype=torch.int32, device=device)
    with one_graph():
        run = compiled_without_guards(map_ops)
        for num_logical in (5, 6, 9):
            run(ids, torch.zeros(num_logical, 3, dtype=torch.int64, device=device),
                torch.ones(num_logical, dtype=torch.int64, device=device),
                torch.zeros(10, dtype=torch.int32, device=device), gate)
        load = guarded(torch.zeros(10, dtype=torch.int32), device)
        with pytest.raises(AssertionError, match="expected size 4==8"):
            run(ids, torch.zeros(8, 3, dtype=torch.int64, device=device),
                torch.ones(4, dtype=torch.int64, device=device), load.view, gate)
        assert load.intact() and not load.view.any()


@requires_cuda
def test_the_whole_ops_need_no_host_sync():
    # Every size dynamic: the ops stay whole and validate on each call, from
    # the metadata alone (torch raises on a sync in "error" mode).
    from tests.test_validation import no_host_sync

    device, gate = "cuda", torch.tensor(True, device="cuda")
    with one_graph():
        run = compiled_without_guards(lambda ids, l2p, rc, load, counts, start: (
            *map_ops(ids, l2p, rc, load, gate), record(load, counts, start, gate)))
        for num_physical, start in [(40, 2), (60, 5), (100, 9)]:
            args = (torch.tensor([[0], [1], [3]], dtype=torch.int8, device=device),
                    spread_map(4, num_physical).to(device), torch.ones(4, dtype=torch.int64, device=device),
                    torch.zeros(num_physical, dtype=torch.int32, device=device),
                    torch.ones(4, dtype=torch.int32, device=device))
            run(*args, start)  # compiles (and may sync) on the first call
            torch.cuda.synchronize()
            with no_host_sync(device):
                run(*args, start)
            torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_static_sizes_are_asserted_on_each_call(device):
    # vLLM's case: only the token count dynamic; the load's length is a plain
    # number in the graph, so the overrun rule was decided at trace time, and
    # Inductor's per-call input assertions keep a shorter load out.
    gate = torch.tensor(True, device=device)
    with one_graph():
        run = torch.compile(record, fullgraph=True, dynamic=False,
                            options={"guard_filter_fn": lambda entries: [False] * len(entries)})
        load = guarded(torch.zeros(16, dtype=torch.int32), device)
        run(load.view, torch.ones(4, dtype=torch.int32, device=device), 12, gate)
        assert load.view[12:].tolist() == [1] * 4 and load.intact()
        short = guarded(torch.zeros(12, dtype=torch.int32), device)
        with pytest.raises(AssertionError, match="expected size 12==16"):
            run(short.view, torch.ones(4, dtype=torch.int32, device=device), 12, gate)
        assert short.intact() and not short.view.any()
