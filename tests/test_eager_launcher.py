"""The C++ eager launcher (kernels/eager_launch.cpp): what it takes, and that it is the Python path's result.

It must take only calls the operators' validation accepts (checked on every
single change and every pair of changes to a valid call's arguments), return exactly
what the Python path returns (ids, load, version counter), and leave every
other call to Python, which raises the detailed error or runs Triton. The
build is checked on the CPU (it compiles against the running torch); the rest
needs a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import eplb_compile
from eplb_compile.kernels import eager_extension
from eplb_compile.reference import expected_map_and_record
from tests.cases import make_case, map_cases

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the launcher runs CUDA kernels")


@pytest.fixture(scope="module")
def launcher():
    if not CUDA:
        return eager_extension.build()
    module = eager_extension.wait()
    assert module is not None, f"the C++ eager launcher did not build: {eager_extension.failure()}"
    return module


def test_it_builds_where_torch_extensions_dir_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # e.g. a container whose $HOME is read-only
    module = eager_extension.build()
    assert module.__file__.startswith(str(tmp_path) + "/eplb_compile_eager_")


def test_it_builds_and_takes_no_cpu_call(launcher):
    ids = torch.zeros(4, 8, dtype=torch.int32)
    l2p, rc = torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, dtype=torch.int32)
    load, gate = torch.zeros(16, dtype=torch.int32), torch.tensor(True)
    assert launcher.map_ids(ids, l2p, rc, load, gate, None) is None
    assert launcher.map_ids(ids, l2p, rc, None, None, None) is None
    assert launcher.record_counts(load, load[:4].clone(), 0, gate) is False
    assert launcher.takes_map(ids, l2p, rc, load, gate, None) is False
    assert launcher.takes_counts(load, load[:4].clone(), 0, gate) is False


def _python_path(monkeypatch):
    monkeypatch.setattr(eager_extension.LAUNCHER, "map_ids", eager_extension.not_ready)
    monkeypatch.setattr(eager_extension.LAUNCHER, "record_counts", eager_extension.not_ready)


def _both_paths(call):
    """call() through the launcher, then through the Python path; both results."""
    taken = call()
    with pytest.MonkeyPatch.context() as patch:
        _python_path(patch)
        python = call()
    return taken, python


def _registered(launcher, case):
    """Run one call through the public path, whose Python path hands the launcher this shape's table."""
    eplb_compile.map_and_record(case.topk_ids, case.l2p, case.replica_count, case.load.clone(), case.record_enabled,
                                case.num_unpadded_tokens)
    eplb_compile.map_only(case.topk_ids, case.l2p, case.replica_count, case.num_unpadded_tokens)


@needs_cuda
@given(case=map_cases(max_tokens=8192), dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]),
       rc64=st.booleans())
def test_it_equals_the_python_path_and_the_reference(launcher, case, dtype, rc64):
    case = case.to("cuda")
    case.topk_ids = case.topk_ids.to(dtype)
    case.replica_count = case.replica_count.to(torch.int64 if rc64 else torch.int32)
    _registered(launcher, case)
    args = (case.topk_ids, case.l2p, case.replica_count)
    loads = [case.load.clone(), case.load.clone()]
    versions = [load._version for load in loads]
    calls = iter(loads)
    ids, python_ids = _both_paths(lambda: eplb_compile.map_and_record(
        *args, next(calls), case.record_enabled, case.num_unpadded_tokens))
    unpadded = None if case.num_unpadded_tokens is None else int(case.num_unpadded_tokens)
    want_ids, want_load = expected_map_and_record(*args, case.load, bool(case.record_enabled), unpadded)
    assert torch.equal(ids, python_ids) and torch.equal(ids.cpu(), want_ids)
    assert torch.equal(loads[0], loads[1]) and torch.equal(loads[0].cpu(), want_load)
    assert [load._version for load in loads] == [v + 1 for v in versions]
    mapped, python_mapped = _both_paths(lambda: eplb_compile.map_only(*args, case.num_unpadded_tokens))
    assert torch.equal(mapped, python_mapped)
    if case.topk_ids.is_contiguous():  # the launcher leaves strided ids to Triton
        loads[0].zero_()
        assert launcher.map_ids(*args, loads[0], case.record_enabled, case.num_unpadded_tokens) is not None
        if dtype not in (torch.int8, torch.int16):  # map_only runs narrow ids as int32 (no narrow table)
            assert launcher.map_ids(*args, None, None, case.num_unpadded_tokens) is not None


def _valid(tokens=37, physical=60):
    case = make_case(5, tokens, 8, 40, 4, physical, torch.int32, True, 30, True).to("cuda")
    return case


def _rejected_calls(case):
    """Calls the launcher must leave to Python, each with one thing wrong (or unsupported)."""
    ids, l2p, rc, load, gate, unpadded = (case.topk_ids, case.l2p, case.replica_count, case.load,
                                          case.record_enabled, case.num_unpadded_tokens)
    yield "uint8 ids", (ids.to(torch.uint8), l2p, rc, load, gate, unpadded)
    yield "float ids", (ids.float(), l2p, rc, load, gate, unpadded)
    yield "1-D ids", (ids.flatten(), l2p, rc, load, gate, unpadded)
    yield "strided ids", (ids.t().contiguous().t(), l2p, rc, load, gate, unpadded)
    yield "int32 map", (ids, l2p.int(), rc, load, gate, unpadded)
    yield "1-D map", (ids, l2p[:, 0], rc, load, gate, unpadded)
    yield "float replica count", (ids, l2p, rc.float(), load, gate, unpadded)
    yield "short replica count", (ids, l2p, rc[:-1], load, gate, unpadded)
    yield "map on the CPU", (ids, l2p.cpu(), rc, load, gate, unpadded)
    yield "int64 load", (ids, l2p, rc, load.long(), gate, unpadded)
    yield "2-D load", (ids, l2p, rc, load.view(6, 10), gate, unpadded)
    yield "strided load", (ids, l2p, rc, torch.zeros(120, dtype=torch.int32, device="cuda")[::2], gate, unpadded)
    yield "load on the CPU", (ids, l2p, rc, load.cpu(), gate, unpadded)
    yield "int gate", (ids, l2p, rc, load, gate.int(), unpadded)
    yield "two-element gate", (ids, l2p, rc, load, gate.repeat(2), unpadded)
    yield "gate on the CPU", (ids, l2p, rc, load, gate.cpu(), unpadded)
    yield "int64 num_unpadded", (ids, l2p, rc, load, gate, unpadded.long())
    yield "num_unpadded on the CPU", (ids, l2p, rc, load, gate, unpadded.cpu())
    yield "int8 ids, 200 physical", (ids.to(torch.int8), l2p, rc, torch.zeros(200, dtype=torch.int32, device="cuda"),
                                     gate, unpadded)
    yield "load and no gate", (ids, l2p, rc, load, None, unpadded)
    yield "k without a table", (torch.zeros(4, 23, dtype=torch.int32, device="cuda"), l2p, rc, load, gate, unpadded)


@needs_cuda
def test_it_leaves_every_other_call_to_python(launcher):
    case = _valid()
    _registered(launcher, case)
    # int8 ids get their tables too, so only the capacity rule can turn them away.
    # (map_only runs int8 and int16 ids as int32, so that an id past the dtype
    # comes back -1: it registers no int8 table.)
    ids8 = case.topk_ids.to(torch.int8)
    eplb_compile.map_and_record(ids8, case.l2p, case.replica_count, case.load.clone(), case.record_enabled)
    accepted = (case.topk_ids, case.l2p, case.replica_count, case.load, case.record_enabled, case.num_unpadded_tokens)
    assert launcher.takes_map(*accepted) and launcher.map_ids(*accepted) is not None
    before = case.load.clone()
    for what, args in _rejected_calls(case):
        assert not launcher.takes_map(*args), what
        assert launcher.map_ids(*args) is None, what
    assert torch.equal(case.load, before)  # nothing launched
    assert launcher.map_ids(ids8, case.l2p, case.replica_count, None, None, None) is None  # 160


@needs_cuda
def test_record_counts_equals_the_python_path(launcher):
    load = torch.randint(0, 1000, (64,), dtype=torch.int32, device="cuda")
    counts = torch.randint(0, 1000, (32,), dtype=torch.int32, device="cuda")[::2]  # strided counts too
    gate = torch.tensor(True, device="cuda")
    eplb_compile.record_counts(load.clone(), counts, 0, gate)  # registers the count kernel
    for start, record in ((0, True), (48, True), (20, False)):
        loads = iter([load.clone(), load.clone()])
        out = []
        _both_paths(lambda: out.append(next(loads)) or eplb_compile.record_counts(
            out[-1], counts, start, torch.tensor(record, device="cuda")))
        want = load.clone()
        if record:
            want[start:start + 16] += counts
        assert torch.equal(out[0], want) and torch.equal(out[1], want)
    version = load._version
    assert launcher.record_counts(load, counts, 3, gate) is True
    assert launcher.record_counts(load, counts[:0], 64, gate) is True  # empty: nothing launched, still bumped
    assert load._version == version + 2
    for what, args in (("negative start", (load, counts, -1, gate)), ("overrun", (load, counts, 49, gate)),
                       ("start past int64", (load, counts, 2**70, gate)), ("int64 counts", (load, counts.long(), 0, gate)),
                       ("2-D counts", (load, counts.view(4, 4), 0, gate)), ("CPU counts", (load, counts.cpu(), 0, gate)),
                       ("int64 load", (load.long(), counts, 0, gate)), ("int gate", (load, counts, 0, gate.int()))):
        assert launcher.takes_counts(*args) is False, what
        assert launcher.record_counts(*args) is False, what
    assert launcher.takes_counts(load, counts, 3, gate) is True


@needs_cuda
def test_errors_come_from_the_python_path():
    case = _valid()
    with pytest.raises(TypeError, match="expert_load_view must be int32"):
        eplb_compile.map_and_record(case.topk_ids, case.l2p, case.replica_count, case.load.long(), case.record_enabled)
    with pytest.raises(ValueError, match="overrun"):
        eplb_compile.record_counts(case.load, case.load[:8].clone(), case.load.shape[0] - 4, case.record_enabled)


@needs_cuda
def test_it_runs_on_the_current_stream_and_in_cuda_graphs(launcher):
    case = _valid()
    _registered(launcher, case)
    load = torch.zeros_like(case.load)
    args = (case.topk_ids, case.l2p, case.replica_count, load, case.record_enabled, case.num_unpadded_tokens)
    counts = torch.ones(8, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a launch on any other stream would break the capture
        assert launcher.map_ids(*args) is not None
        assert launcher.record_counts(load, counts, 0, case.record_enabled)
    load.zero_()
    for _ in range(3):
        graph.replay()
    _, want = expected_map_and_record(case.topk_ids, case.l2p, case.replica_count, torch.zeros_like(load), True, 30)
    want[:8] += 1
    assert torch.equal(load.cpu(), 3 * want)
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert launcher.map_ids(*args) is not None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# The launcher restates the validation's accept rules in C++ (a Python check
# per call costs as much as the launch). ops/_validation.py owns them: whatever
# the launcher takes, the validation must accept. Each change below turns one
# argument of a valid call into something the rules may or may not accept.
def _id_dtype(dtype):
    return lambda ids: ids.to(dtype)


def _strided(t):
    """The same values, every other element of a buffer twice as long (any shape)."""
    return torch.stack([t, t], -1)[..., 0]


_CHANGES = [
    (0, _id_dtype(torch.uint8)), (0, _id_dtype(torch.int8)), (0, _id_dtype(torch.int16)), (0, _id_dtype(torch.int64)),
    (0, lambda ids: ids.float()), (0, lambda ids: ids.flatten()), (0, _strided),
    (0, lambda ids: ids.cpu()), (0, lambda ids: ids[:0]), (0, lambda ids: ids[..., :3].contiguous()),
    (0, lambda ids: ids.unsqueeze(0)),
    (1, lambda l2p: l2p.int()), (1, lambda l2p: l2p[:, 0]), (1, lambda l2p: l2p.cpu()),
    (1, lambda l2p: l2p.mT.contiguous().mT if l2p.dim() == 2 else l2p), (1, lambda l2p: torch.cat([l2p, l2p[:1]])),
    (1, lambda l2p: l2p.repeat(1, 40)),  # 40 x 160 entries: past int8's and int16's capacity for map_only
    (2, lambda rc: rc.long()), (2, lambda rc: rc.float()), (2, lambda rc: rc.short()), (2, lambda rc: rc[:-1]),
    (2, lambda rc: rc.cpu()), (2, _strided), (2, lambda rc: rc.unsqueeze(-1)),
    (3, lambda load: load.long()), (3, lambda load: load.unsqueeze(0)), (3, _strided),
    (3, lambda load: load.cpu()), (3, lambda load: load.new_zeros(200)), (3, lambda load: load.new_zeros(40000)),
    (3, lambda load: None),
    (4, lambda gate: gate.int()), (4, lambda gate: torch.cat([gate.view(-1)] * 2)),
    (4, lambda gate: gate.reshape(1, -1)),
    (4, lambda gate: gate.cpu()), (4, lambda gate: None),
    (5, lambda n: n.long()), (5, lambda n: n.cpu()), (5, lambda n: torch.cat([n.view(-1)] * 2)), (5, lambda n: None),
]


def _validation_accepts(spec, *args) -> bool:
    """What the public op accepts: its argument types, then its rules."""
    try:
        spec.check_types(*args)
        spec.validate(*args)
    except Exception:  # noqa: BLE001 - any refusal (a None where a tensor belongs included)
        return False
    return True


def _change_sets(changes: list) -> list[tuple[int, ...]]:
    """No change, every single change and every pair: each refusal alone and each two together."""
    return [()] + [(i,) for i in range(len(changes))] + list(itertools.combinations(range(len(changes)), 2))


@needs_cuda
def test_what_it_takes_the_validation_accepts(launcher):
    from eplb_compile.ops._validation import MAP_AND_RECORD, MAP_ONLY

    case = _valid()
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):  # a table for every id dtype
        ids = case.topk_ids.to(dtype)
        eplb_compile.map_and_record(ids, case.l2p, case.replica_count, case.load.clone(), case.record_enabled)
        if dtype not in (torch.int8, torch.int16):  # map_only runs narrow ids as int32: no narrow table
            eplb_compile.map_only(ids, case.l2p, case.replica_count)
    wrong, taken_count = [], 0
    for changes in _change_sets(_CHANGES):
        for map_only in (False, True):
            args = [case.topk_ids, case.l2p, case.replica_count, case.load.clone(), case.record_enabled,
                    case.num_unpadded_tokens]
            for index in changes:
                position, change = _CHANGES[index]
                if args[position] is not None:  # a removed optional argument stays removed
                    args[position] = change(args[position])
            if map_only:
                args[3] = args[4] = None
            ids, l2p, rc, load, gate, unpadded = args
            accepts = (_validation_accepts(MAP_ONLY, ids, l2p, rc, unpadded) if load is None else
                       _validation_accepts(MAP_AND_RECORD, *args))
            taken = launcher.takes_map(*args)
            taken_count += taken
            if (taken and not accepts) or (launcher.map_ids(*args) is not None) != taken:
                wrong.append((changes, map_only, taken, accepts))
    assert not wrong, f"{len(wrong)} calls (changes, map_only, taken, accepted): {wrong[:5]}"
    assert taken_count > len(_CHANGES)  # the unchanged calls and the harmless changes were taken


_COUNT_CHANGES = [
    (0, lambda load: load.long()), (0, lambda load: load.unsqueeze(0)), (0, _strided),
    (0, lambda load: load.cpu()), (0, lambda load: load[:20]),
    (1, lambda counts: counts.long()), (1, lambda counts: counts.unsqueeze(0)), (1, lambda counts: counts.cpu()),
    (1, _strided), (1, lambda counts: counts[:0]), (1, lambda counts: torch.cat([counts] * 5)),
    (2, lambda start: -1), (2, lambda start: 48), (2, lambda start: 49), (2, lambda start: 2**63),
    (2, lambda start: 2**70),  # (a bool start never gets here: the dispatcher's int refuses it)
    (3, lambda gate: gate.int()), (3, lambda gate: gate.repeat(2)), (3, lambda gate: gate.cpu()),
]


@needs_cuda
def test_what_it_takes_for_record_counts_the_validation_accepts(launcher):
    from eplb_compile.ops._validation import RECORD_COUNTS

    gate = torch.tensor(True, device="cuda")
    counts = torch.ones(16, dtype=torch.int32, device="cuda")
    eplb_compile.record_counts(torch.zeros(64, dtype=torch.int32, device="cuda"), counts, 0, gate)  # registers
    wrong, taken_count = [], 0
    for changes in _change_sets(_COUNT_CHANGES):
        args = [torch.zeros(64, dtype=torch.int32, device="cuda"), counts, 3, gate]
        for index in changes:
            position, change = _COUNT_CHANGES[index]
            args[position] = change(args[position])
        taken = launcher.takes_counts(*args)
        taken_count += taken
        if (taken and not _validation_accepts(RECORD_COUNTS, *args)) or launcher.record_counts(*args) != taken:
            wrong.append((changes, taken))
    assert not wrong, f"{len(wrong)} calls (changes, taken): {wrong[:5]}"
    assert taken_count > 1  # the unchanged call and the harmless changes were taken
