"""Wiring mistakes fail loudly and at once: every bad input raises an error that
names the argument and says what was expected, at the eager call and, under
torch.compile, from the fake at trace time. The checks read metadata only.

Longer than 300 lines: the table of bad inputs keeps each case next to the
message it must produce, and the harness is the same for all of them."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

import eplb_compile
from eplb_compile.reference import record_counts_reference

from tests.cases import DEVICES, MapCase, requires_cuda


@dataclass
class Args(MapCase):
    """A map case plus the count path's arguments: valid inputs for every op."""

    counts: torch.Tensor
    start: int


def valid_args(device: str) -> Args:
    g = torch.Generator().manual_seed(0)
    return Args(
        topk_ids=torch.randint(0, 4, (6, 2), generator=g, dtype=torch.int32).to(device),
        l2p=torch.randint(-1, 8, (4, 2), generator=g).to(device),
        replica_count=torch.randint(0, 3, (4,), generator=g).to(device),
        load=torch.zeros(8, dtype=torch.int32, device=device),
        record_enabled=torch.tensor(True, device=device),
        num_unpadded_tokens=torch.tensor(5, dtype=torch.int32, device=device),
        counts=torch.ones(3, dtype=torch.int32, device=device),
        start=2,
    )


# Each op with the Args fields it takes, in order.
OPS = {
    "map_and_record": (
        eplb_compile.map_and_record,
        ("topk_ids", "l2p", "replica_count", "load", "record_enabled", "num_unpadded_tokens"),
    ),
    "map_only": (eplb_compile.map_only, ("topk_ids", "l2p", "replica_count", "num_unpadded_tokens")),
    "record_counts": (eplb_compile.record_counts, ("load", "counts", "start", "record_enabled")),
}
MAP_OPS = ("map_and_record", "map_only")
LOAD_OPS = ("map_and_record", "record_counts")


def other_device(device: str) -> str:
    # On a CPU-only machine "meta" still dispatches (to the fake's checks).
    return "meta" if device == "cpu" else "cpu"


@dataclass
class BadInput:
    name: str
    ops: tuple[str, ...]
    make: Callable[[Args, str], Args]  # (valid args, device) -> bad args
    error: type[Exception]
    message: str  # a literal fragment of the message (the device is substituted)


def _noncontiguous_load(a: Args, device: str) -> Args:
    return replace(a, load=torch.zeros(16, dtype=torch.int32, device=device)[::2])


BAD_INPUTS = [
    BadInput("ids float", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids.float()),
             TypeError, "topk_ids must be an integer tensor, got torch.float32"),
    BadInput("ids bool", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids > 0),
             TypeError, "topk_ids must be an integer tensor, got torch.bool"),
    # uint32 is an integer dtype too, so the message must say which ones are taken.
    BadInput("ids uint32", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids.to(torch.uint32)),
             TypeError, "topk_ids must be an integer tensor, got torch.uint32 "
             "(expected int8, int16, int32 or int64)"),
    # Narrow ids that cannot hold every physical id would come back wrapped
    # while the load counts the true expert: refused, from metadata alone.
    BadInput("ids uint8", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids.to(torch.uint8)),
             TypeError, "got torch.uint8 (expected int8, int16, int32 or int64: uint8 cannot hold -1"),
    BadInput("ids int8, 129 physical experts", ("map_and_record",),
             lambda a, d: replace(a, topk_ids=a.topk_ids.to(torch.int8),
                                  load=torch.zeros(129, dtype=torch.int32, device=d)),
             TypeError, "topk_ids of dtype torch.int8 cannot hold every physical id: expert_load_view has 129 "
             "physical experts, so ids up to 128; use a wider dtype"),
    BadInput("ids int16, 32769 physical experts", ("map_and_record",),
             lambda a, d: replace(a, topk_ids=a.topk_ids.to(torch.int16),
                                  load=torch.zeros(32769, dtype=torch.int32, device=d)),
             TypeError, "topk_ids of dtype torch.int16 cannot hold every physical id: expert_load_view has 32769"),
    BadInput("ids int8, map of 4 x 33 entries", ("map_only",),
             lambda a, d: replace(a, topk_ids=a.topk_ids.to(torch.int8),
                                  l2p=torch.zeros(4, 33, dtype=torch.int64, device=d)),
             TypeError, "topk_ids of dtype torch.int8 cannot hold every physical id: logical_to_physical_map has "
             "4 x 33 entries, so ids up to 131"),
    BadInput("ids 1-D", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids.reshape(-1)),
             ValueError, "topk_ids must be 2-D [tokens, k], got shape (12,)"),
    BadInput("ids 3-D", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids.reshape(2, 3, 2)),
             ValueError, "topk_ids must be 2-D [tokens, k], got shape (2, 3, 2)"),
    BadInput("map int32", MAP_OPS, lambda a, d: replace(a, l2p=a.l2p.int()),
             TypeError, "logical_to_physical_map must be int64, got torch.int32"),
    BadInput("map 1-D", MAP_OPS, lambda a, d: replace(a, l2p=a.l2p.reshape(-1)),
             ValueError, "logical_to_physical_map must be 2-D [num_logical, slots], got shape (8,)"),
    BadInput("map 3-D", MAP_OPS, lambda a, d: replace(a, l2p=a.l2p.reshape(2, 2, 2)),
             ValueError, "logical_to_physical_map must be 2-D [num_logical, slots], got shape (2, 2, 2)"),
    BadInput("replica rows differ", MAP_OPS, lambda a, d: replace(a, replica_count=a.replica_count[:3]),
             ValueError, "logical_replica_count must be 1-D with one entry per row of "
             "logical_to_physical_map (4), got shape (3,)"),
    BadInput("replica count 2-D", MAP_OPS, lambda a, d: replace(a, replica_count=a.replica_count.reshape(2, 2)),
             ValueError, "logical_replica_count must be 1-D with one entry per row of "
             "logical_to_physical_map (4), got shape (2, 2)"),
    BadInput("replica count float", MAP_OPS, lambda a, d: replace(a, replica_count=a.replica_count.float()),
             TypeError, "logical_replica_count must be int32 or int64, got torch.float32"),
    BadInput("load int64", LOAD_OPS, lambda a, d: replace(a, load=a.load.long()),
             TypeError, "expert_load_view must be int32, got torch.int64"),
    BadInput("load 2-D", LOAD_OPS, lambda a, d: replace(a, load=a.load.reshape(2, 4)),
             ValueError, "expert_load_view must be 1-D [num_physical_experts], got shape (2, 4)"),
    BadInput("load strided", LOAD_OPS, _noncontiguous_load,
             ValueError, "expert_load_view must be contiguous, got stride (2,)"),
    BadInput("gate int32", LOAD_OPS, lambda a, d: replace(a, record_enabled=a.record_enabled.int()),
             TypeError, "record_enabled must be a torch.bool scalar tensor, got dtype torch.int32"),
    BadInput("gate two elements", LOAD_OPS,
             lambda a, d: replace(a, record_enabled=torch.ones(2, dtype=torch.bool, device=d)),
             ValueError, "record_enabled must hold exactly one element, got shape (2,)"),
    # Python objects where a tensor or an int belongs: the public wrappers
    # name the argument (WRAPPER_CHECKED below: under torch.compile these
    # arrive differently from the tensor checks).
    BadInput("gate Python bool", LOAD_OPS, lambda a, d: replace(a, record_enabled=True),
             TypeError, "record_enabled must be a torch.Tensor, got bool"),
    BadInput("ids None", MAP_OPS, lambda a, d: replace(a, topk_ids=None),
             TypeError, "topk_ids must be a torch.Tensor, got NoneType"),
    BadInput("map a list", MAP_OPS, lambda a, d: replace(a, l2p=a.l2p.tolist()),
             TypeError, "logical_to_physical_map must be a torch.Tensor, got list"),
    BadInput("replica count None", MAP_OPS, lambda a, d: replace(a, replica_count=None),
             TypeError, "logical_replica_count must be a torch.Tensor, got NoneType"),
    BadInput("load None", LOAD_OPS, lambda a, d: replace(a, load=None),
             TypeError, "expert_load_view must be a torch.Tensor, got NoneType"),
    BadInput("counts a list", ("record_counts",), lambda a, d: replace(a, counts=[1, 1, 1]),
             TypeError, "counts must be a torch.Tensor, got list"),
    BadInput("start a tensor", ("record_counts",), lambda a, d: replace(a, start=torch.tensor(2)),
             TypeError, "start must be an int, got Tensor"),
    BadInput("start a bool", ("record_counts",), lambda a, d: replace(a, start=True),
             TypeError, "start must be an int, got bool"),
    BadInput("unpadded Python int", MAP_OPS, lambda a, d: replace(a, num_unpadded_tokens=5),
             TypeError, "num_unpadded_tokens must be a torch.Tensor or None, got int"),
    BadInput("unpadded int64", MAP_OPS,
             lambda a, d: replace(a, num_unpadded_tokens=a.num_unpadded_tokens.long()),
             TypeError, "num_unpadded_tokens must be a torch.int32 scalar tensor, got dtype torch.int64"),
    BadInput("unpadded two elements", MAP_OPS,
             lambda a, d: replace(a, num_unpadded_tokens=torch.ones(2, dtype=torch.int32, device=d)),
             ValueError, "num_unpadded_tokens must hold exactly one element, got shape (2,)"),
    BadInput("counts int64", ("record_counts",), lambda a, d: replace(a, counts=a.counts.long()),
             TypeError, "counts must be int32, got torch.int64"),
    BadInput("counts 2-D", ("record_counts",), lambda a, d: replace(a, counts=a.counts.reshape(1, 3)),
             ValueError, "counts must be 1-D, got shape (1, 3)"),
    BadInput("counts overrun the load", ("record_counts",), lambda a, d: replace(a, start=6),
             ValueError, "counts of length 3 starting at start=6 overrun expert_load_view of length 8"),
    BadInput("counts longer than the load", ("record_counts",),
             lambda a, d: replace(a, counts=torch.ones(9, dtype=torch.int32, device=d), start=0),
             ValueError, "counts of length 9 starting at start=0 overrun expert_load_view of length 8"),
    BadInput("start negative", ("record_counts",), lambda a, d: replace(a, start=-1),
             ValueError, "start must be >= 0, got -1"),
    # Devices: every argument, each against the op's first tensor.
    BadInput("map on other device", MAP_OPS, lambda a, d: replace(a, l2p=a.l2p.to(other_device(d))),
             ValueError, "logical_to_physical_map is on {other} but topk_ids is on {device}; "
             "all tensors must be on one device"),
    BadInput("replica count on other device", MAP_OPS,
             lambda a, d: replace(a, replica_count=a.replica_count.to(other_device(d))),
             ValueError, "logical_replica_count is on {other} but topk_ids is on {device}"),
    BadInput("ids on other device", MAP_OPS, lambda a, d: replace(a, topk_ids=a.topk_ids.to(other_device(d))),
             ValueError, "logical_to_physical_map is on {device} but topk_ids is on {other}"),
    BadInput("load on other device", ("map_and_record",), lambda a, d: replace(a, load=a.load.to(other_device(d))),
             ValueError, "expert_load_view is on {other} but topk_ids is on {device}"),
    BadInput("gate on other device", ("map_and_record",),
             lambda a, d: replace(a, record_enabled=a.record_enabled.to(other_device(d))),
             ValueError, "record_enabled is on {other} but topk_ids is on {device}"),
    BadInput("unpadded on other device", MAP_OPS,
             lambda a, d: replace(a, num_unpadded_tokens=a.num_unpadded_tokens.to(other_device(d))),
             ValueError, "num_unpadded_tokens is on {other} but topk_ids is on {device}"),
    BadInput("counts on other device", ("record_counts",), lambda a, d: replace(a, counts=a.counts.to(other_device(d))),
             ValueError, "counts is on {other} but expert_load_view is on {device}"),
    BadInput("gate on other device (counts)", ("record_counts",),
             lambda a, d: replace(a, record_enabled=a.record_enabled.to(other_device(d))),
             ValueError, "record_enabled is on {other} but expert_load_view is on {device}"),
]

CASES = [pytest.param(bad, op, id=f"{op}-{bad.name}") for bad in BAD_INPUTS for op in bad.ops]
# Python-type mistakes, caught by the wrappers' isinstance checks before any op runs.
WRAPPER_CHECKED = [c for c in CASES if " must be a torch.Tensor" in c.values[0].message
                   or "start must be an int" in c.values[0].message]
TENSOR_CHECKED = [c for c in CASES if c not in WRAPPER_CHECKED]


def _call_args(op: str, a: Args) -> list:
    return [getattr(a, field) for field in OPS[op][1]]


def _message(bad: BadInput, device: str) -> str:
    # The message prints torch.device, e.g. "cuda:0", not "cuda".
    shown = str(torch.empty(0, device=device).device)
    return bad.message.format(device=shown, other=other_device(device))


@contextlib.contextmanager
def no_host_sync(device: str):
    """On CUDA, make any host sync inside raise: the checks must not need one."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


class CountingBackend:
    """An eager backend that remembers being called: tracing got that far."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad, op", CASES)
def test_eager_call_rejects(device, bad, op):
    args = _call_args(op, bad.make(valid_args(device), device))
    with no_host_sync(device), pytest.raises(bad.error, match=re.escape(_message(bad, device))):
        OPS[op][0](*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad, op", TENSOR_CHECKED)
def test_compile_rejects_at_trace_time(device, bad, op, fresh_dynamo):
    args = _call_args(op, bad.make(valid_args(device), device))
    backend = CountingBackend()
    compiled = torch.compile(OPS[op][0], backend=backend, fullgraph=True)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=re.escape(_message(bad, device))) as raised:
        compiled(*args)
    # Dynamo wraps what the fake raised: recent torch prints "got TypeError(...)",
    # older torch chains the original as the cause.
    wrapped = raised.value
    assert f"got {bad.error.__name__}(" in str(wrapped) or isinstance(wrapped.__cause__, bad.error)
    assert backend.calls == 0, "the error must come from tracing, before any graph is built"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad, op", WRAPPER_CHECKED)
def test_compiled_python_type_errors(device, bad, op, fresh_dynamo):
    # The wrapper's isinstance check runs inside the traced code. With
    # fullgraph=True Dynamo reports the raise as an Unsupported "Observed
    # exception" quoting the TypeError; without it, Dynamo gives the frame
    # back to Python and the caller gets the TypeError itself.
    args = _call_args(op, bad.make(valid_args(device), device))
    backend = CountingBackend()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"TypeError\(.*" + re.escape(f"{op}: {bad.message}")):
        torch.compile(OPS[op][0], backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    with pytest.raises(TypeError, match=re.escape(f"{op}: {bad.message}")):
        torch.compile(OPS[op][0], backend=backend)(*args)
    assert backend.calls == 0


def test_dynamic_shapes_message_shows_the_values(fresh_dynamo):
    # With dynamic sizes the overrun is a size rule undecided at trace time:
    # the op stays whole in the graph and its implementation raises on the
    # call, with the values the caller passed (never the symbols).
    compiled = torch.compile(eplb_compile.record_counts, backend="eager", fullgraph=True, dynamic=True)
    load, gate = torch.zeros(8, dtype=torch.int32), torch.tensor(True)
    compiled(load, torch.ones(3, dtype=torch.int32), 2, gate)
    with pytest.raises(ValueError, match=re.escape("counts of length 3 starting at start=6 overrun "
                                                   "expert_load_view of length 8")):
        compiled(load, torch.ones(3, dtype=torch.int32), 6, gate)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_valid_inputs_pass_eager_and_compiled(device, op, fresh_dynamo):
    # The control for the two tests above: the same harness, valid inputs.
    OPS[op][0](*_call_args(op, valid_args(device)))
    backend = CountingBackend()
    torch.compile(OPS[op][0], backend=backend, fullgraph=True)(*_call_args(op, valid_args(device)))
    assert backend.calls == 1


@pytest.mark.parametrize("op", OPS)
def test_checks_read_metadata_only(op):
    # Meta tensors have no data: if a check read a value it would fail here.
    args = valid_args("cpu")
    meta = Args(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in vars(args).items()})
    OPS[op][0](*_call_args(op, meta))
    with pytest.raises(ValueError, match=re.escape("start must be >= 0, got -1")):
        eplb_compile.record_counts(meta.load, meta.counts, -1, meta.record_enabled)


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_start_still_rejects_an_overrun(device, fresh_dynamo):
    # After a second rank's start makes `start` a SymInt, the overrun rule is
    # undecided at trace time: the op stays whole in the graph and a later bad
    # start fails in its implementation, on the call (tests/test_no_guards.py:
    # the same with Dynamo's guards dropped).
    compiled = torch.compile(eplb_compile.record_counts, backend="aot_eager", fullgraph=True)
    args = valid_args(device)
    buffer = torch.zeros(10, dtype=torch.int32, device=device)
    load = buffer[1:9]
    want = torch.zeros(8, dtype=torch.int32)
    for start in (2, 3, 5):
        compiled(load, args.counts, start, args.record_enabled)
        want = record_counts_reference(want, args.counts.cpu(), start, True)
    assert torch.equal(load.cpu(), want) and buffer[0] == 0 and buffer[9] == 0
    with pytest.raises(ValueError, match=r"counts of length 3 starting at start=6 overrun"):
        compiled(load, args.counts, 6, args.record_enabled)
    with pytest.raises(ValueError, match="start must be >= 0, got -1"):
        compiled(load, args.counts, -1, args.record_enabled)
    assert torch.equal(load.cpu(), want) and buffer[0] == 0 and buffer[9] == 0


@requires_cuda
def test_valid_calls_do_not_sync():
    args = valid_args("cuda")
    for op in OPS:  # warm up: Triton compiles on the first call
        OPS[op][0](*_call_args(op, args))
    torch.cuda.synchronize()
    with no_host_sync("cuda"):
        for op in OPS:
            OPS[op][0](*_call_args(op, args))
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start, message", [
    (2**63, "start must fit in int64 (-2**63 to 2**63 - 1), got 9223372036854775808"),
    (10**30, "start must fit in int64 (-2**63 to 2**63 - 1), got 1000000000000000000000000000000"),
    (-(2**63) - 1, "start must fit in int64 (-2**63 to 2**63 - 1), got -9223372036854775809"),
    (-(2**63), "start must be >= 0, got -9223372036854775808"),
    (2**63 - 1, "starting at start=9223372036854775807 overrun"),
])
def test_start_past_int64_is_a_value_error_naming_start(device, start, message):
    # The dispatcher's own parser would say "Expected a value of type 'int' ... found type 'int'".
    load = torch.zeros(16, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=re.escape(message)):
        eplb_compile.record_counts(load, torch.ones(4, dtype=torch.int32, device=device), start,
                                   torch.tensor(True, device=device))
    assert not load.any()
