"""The wrappers' direct eager path: when it is taken, and that it is the dispatcher's result.

An eager call on plain CUDA tensors skips the dispatcher and runs the CUDA
implementation itself; every mode, tracer or subclass sends it through
``torch.ops`` instead. The guard is checked on the CPU; the equivalence of
the two paths (ids, load, version counter, errors) needs a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import eplb_compile
from eplb_compile.ops import _library
from eplb_compile.ops._torch_compat import nothing_intercepts_eager_calls
from tests.cases import make_case

CUDA = torch.cuda.is_available()
OPS = torch.ops.eplb_compile


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_plain_eager_call_is_not_intercepted():
    assert nothing_intercepts_eager_calls()


@pytest.mark.parametrize("mode", [_SeenOps, TorchFunctionMode, torch._subclasses.fake_tensor.FakeTensorMode])
def test_every_mode_intercepts(mode):
    with mode():
        assert not nothing_intercepts_eager_calls()
    assert nothing_intercepts_eager_calls()


def test_vmap_and_compile_intercept():
    seen = []
    torch.vmap(lambda x: seen.append(nothing_intercepts_eager_calls()) or x)(torch.zeros(2, 3))
    assert seen == [False]
    compiled = torch.compile(lambda x: x + int(nothing_intercepts_eager_calls()), backend="eager", fullgraph=True)
    assert compiled(torch.zeros(1)).item() == 0  # traced with the guard False


def test_cpu_and_subclass_tensors_go_through_the_dispatcher():
    cpu = torch.zeros(2, 8, dtype=torch.int32)
    assert not _library.runs_on_cuda_directly(cpu, cpu)
    if CUDA:
        cuda = cpu.cuda()
        assert _library.runs_on_cuda_directly(cuda, cuda, None)
        assert not _library.runs_on_cuda_directly(cuda, cuda.as_subclass(_Subclass))
        assert not _library.runs_on_cuda_directly(cuda.as_subclass(_Subclass), cuda)


needs_cuda = pytest.mark.skipif(not CUDA, reason="the direct path runs CUDA implementations")


def _case(seed=3, tokens=37):
    case = make_case(seed, tokens, 8, 40, 4, 60, torch.int32, True, None, True)
    return case.to("cuda")


@needs_cuda
@pytest.mark.parametrize("record", [True, False])
def test_direct_path_equals_the_dispatcher(record):
    case = _case()
    gate = torch.tensor(record, device="cuda")
    unpadded = torch.tensor(30, dtype=torch.int32, device="cuda")
    args = (case.topk_ids, case.l2p, case.replica_count)
    direct_load, dispatched_load = case.load.clone(), case.load.clone()
    version = direct_load._version
    direct = eplb_compile.map_and_record(*args, direct_load, gate, unpadded)
    assert direct_load._version == version + 1  # as the dispatcher bumps a Tensor(a!) argument
    dispatched = OPS.map_and_record(*args, dispatched_load, gate, unpadded)
    assert torch.equal(direct, dispatched) and torch.equal(direct_load, dispatched_load)
    assert torch.equal(eplb_compile.map_only(*args, unpadded), OPS.map_only(*args, unpadded))
    counts = torch.randint(0, 1000, (12,), dtype=torch.int32, device="cuda")
    version = direct_load._version
    eplb_compile.record_counts(direct_load, counts, 24, gate)
    assert direct_load._version == version + 1
    OPS.record_counts(dispatched_load, counts, 24, gate)
    assert torch.equal(direct_load, dispatched_load)
    # record_counts alone, against the slice add it stands for.
    want = case.load.clone()
    if record:
        want[24:36] += counts
    base = case.load.clone()
    eplb_compile.record_counts(base, counts, 24, gate)
    assert torch.equal(base, want)


@needs_cuda
def test_a_mode_sees_the_operator():
    case = _case()
    gate = torch.tensor(True, device="cuda")
    with _SeenOps() as mode:
        eplb_compile.map_and_record(case.topk_ids, case.l2p, case.replica_count, case.load, gate)
        eplb_compile.record_counts(case.load, case.load[:4].clone(), 0, gate)
    assert "eplb_compile.map_and_record.default" in mode.seen
    assert "eplb_compile.record_counts.default" in mode.seen


@needs_cuda
def test_direct_path_raises_the_dispatchers_errors():
    case = _case()
    gate = torch.tensor(True, device="cuda")
    bad_load = case.load.to(torch.int64)
    for call in (eplb_compile.map_and_record, OPS.map_and_record):
        with pytest.raises(TypeError, match="expert_load_view must be int32"):
            call(case.topk_ids, case.l2p, case.replica_count, bad_load, gate)
    for call in (eplb_compile.record_counts, OPS.record_counts):
        with pytest.raises(ValueError, match="overrun"):
            call(case.load, case.load[:8].clone(), case.load.shape[0] - 4, gate)
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            call(case.load, case.load[:4].clone(), 0, gate.cpu())
