"""The one eager path: every call goes through the dispatcher, and ``eager_route`` says where it lands.

The public wrappers always call ``torch.ops.eplb_compile``; the CUDA
implementation behind it offers the call to the C++ launcher, then runs the
Python path. ``eager_route`` answers which implementation a call takes and
why: checked on the CPU (plain torch, the reasons, the launcher's states) and,
where a GPU exists, against what the launcher actually takes.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eplb_compile
from eplb_compile import EagerRoute, Implementation, eager_route
from eplb_compile.kernels import eager_extension
from eplb_compile.ops import route
from tests.cases import make_case

CUDA = torch.cuda.is_available()
OPS = torch.ops.eplb_compile
needs_cuda = pytest.mark.skipif(not CUDA, reason="the CUDA implementation needs a GPU")


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _case(device="cpu", seed=3, tokens=37):
    return make_case(seed, tokens, 8, 40, 4, 60, torch.int32, True, None, True).to(device)


def _args(case, gate=True):
    return (case.topk_ids, case.l2p, case.replica_count, case.load, torch.tensor(gate, device=case.load.device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_every_wrapper_goes_through_the_dispatcher(device):
    case = _case(device)
    ids, l2p, rc, load, gate = _args(case)
    with _SeenOps() as mode:
        eplb_compile.map_and_record(ids, l2p, rc, load, gate)
        eplb_compile.map_only(ids, l2p, rc)
        eplb_compile.record_counts(load, load[:4].clone(), 0, gate)
    for op in ("map_and_record", "map_only", "record_counts"):
        assert f"eplb_compile.{op}.default" in mode.seen


def test_cpu_calls_run_plain_torch():
    ids, l2p, rc, load, gate = _args(_case())
    for op, args in ((eplb_compile.map_and_record, (ids, l2p, rc, load, gate)),
                     ("map_and_record", (ids, l2p, rc, load, gate, None)),
                     (eplb_compile.map_only, (ids, l2p, rc)),
                     (eplb_compile.record_counts, (load, load[:4].clone(), 0, gate))):
        answer = eager_route(op, *args)
        assert isinstance(answer, EagerRoute)
        assert answer.implementation is Implementation.TORCH and answer.kernel == "torch"
        assert "CPU" in answer.reason and str(answer).startswith("plain torch (torch): CPU")


def test_meta_tensors_have_no_eager_implementation():
    ids, l2p, rc, load, gate = _args(_case("meta"))
    answer = eager_route(eplb_compile.map_only, ids, l2p, rc)
    assert answer.implementation is Implementation.NONE and "meta" in answer.reason


def test_an_invalid_call_raises_what_the_call_raises():
    ids, l2p, rc, load, gate = _args(_case())
    for call in (eplb_compile.map_and_record, lambda *a: eager_route("map_and_record", *a)):
        with pytest.raises(TypeError, match="expert_load_view must be int32"):
            call(ids, l2p, rc, load.long(), gate)
    for call in (eplb_compile.record_counts, lambda *a: eager_route(eplb_compile.record_counts, *a)):
        with pytest.raises(ValueError, match="overrun"):
            call(load, load[:8].clone(), load.shape[0] - 4, gate)
    with pytest.raises(ValueError, match="op must be one of"):
        eager_route(torch.add, ids, l2p, rc)


@pytest.mark.parametrize("value", ["0", "off", "OFF", " False ", "no"])
def test_launcher_off_spellings(monkeypatch, value):
    monkeypatch.setenv(eager_extension.ENV, value)
    assert eager_extension.enabled() is False


@pytest.mark.parametrize("value", ["1", "on", "True", "YES"])
def test_launcher_on_spellings(monkeypatch, value):
    monkeypatch.setenv(eager_extension.ENV, value)
    assert eager_extension.enabled() is True


@pytest.mark.parametrize("value", ["2", "disable", "", "nope"])
def test_other_launcher_spellings_are_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(eager_extension.ENV, value)
    monkeypatch.setattr(eager_extension, "_thread", None)  # as in a fresh process (a GPU run has started it)
    with pytest.raises(ValueError, match=eager_extension.ENV) as error:
        eager_extension.enabled()
    assert "\n" not in str(error.value) and repr(value) in str(error.value)
    with pytest.raises(ValueError, match=eager_extension.ENV):
        eager_extension.start()  # the first eager CUDA call refuses it too


def test_the_launchers_states_give_the_reason(monkeypatch):
    """Why the launcher takes nothing: off, failed, not started, building; "" once built."""
    monkeypatch.setattr(eager_extension, "_module", None)
    monkeypatch.setattr(eager_extension, "_failure", None)
    monkeypatch.setattr(eager_extension, "_thread", None)
    monkeypatch.setenv(eager_extension.ENV, "off")
    assert "is off" in route._why_launcher_declines(False, True)
    monkeypatch.delenv(eager_extension.ENV)
    assert "build has not started" in route._why_launcher_declines(False, True)
    monkeypatch.setattr(eager_extension, "_thread", object())
    assert "still being built" in route._why_launcher_declines(False, True)
    monkeypatch.setattr(eager_extension, "_failure", RuntimeError("no compiler"))
    assert "could not be built: no compiler" in route._why_launcher_declines(False, True)
    monkeypatch.setattr(eager_extension, "_failure", None)
    monkeypatch.setattr(eager_extension, "_module", object())
    assert eager_extension.state() == ""
    assert "only this package's CUDA kernels" in route._why_launcher_declines(False, True, cuda_kernel=False)
    assert "no launch table" in route._why_launcher_declines(False, False)
    assert "outside the C++ launcher's limits" in route._why_launcher_declines(False, True)
    assert route._why_launcher_declines(True, True) == ""


# ---------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("record", [True, False])
def test_the_wrappers_are_the_operators(record):
    case = _case("cuda")
    gate = torch.tensor(record, device="cuda")
    unpadded = torch.tensor(30, dtype=torch.int32, device="cuda")
    args = (case.topk_ids, case.l2p, case.replica_count)
    wrapper_load, op_load = case.load.clone(), case.load.clone()
    version = wrapper_load._version
    ids = eplb_compile.map_and_record(*args, wrapper_load, gate, unpadded)
    assert wrapper_load._version == version + 1  # the dispatcher bumps a Tensor(a!) argument
    assert torch.equal(ids, OPS.map_and_record(*args, op_load, gate, unpadded)) and torch.equal(wrapper_load, op_load)
    assert torch.equal(eplb_compile.map_only(*args, unpadded), OPS.map_only(*args, unpadded))
    counts = torch.randint(0, 1000, (12,), dtype=torch.int32, device="cuda")
    want = case.load.clone()
    if record:
        want[24:36] += counts
    base = case.load.clone()
    eplb_compile.record_counts(base, counts, 24, gate)
    assert torch.equal(base, want)


@needs_cuda
def test_the_route_is_what_the_launcher_takes():
    launcher = eager_extension.wait()
    case = _case("cuda")
    ids, l2p, rc, load, gate = _args(case)
    counts = load[:8].clone()
    eplb_compile.map_and_record(ids, l2p, rc, load.clone(), gate)  # hands over this shape's tables
    eplb_compile.map_only(ids, l2p, rc)
    eplb_compile.record_counts(load.clone(), counts, 0, gate)
    calls = ((eplb_compile.map_and_record, (ids, l2p, rc, load, gate), "takes_map", (ids, l2p, rc, load, gate, None)),
             (eplb_compile.map_only, (ids, l2p, rc), "takes_map", (ids, l2p, rc, None, None, None)),
             (eplb_compile.record_counts, (load, counts, 0, gate), "takes_counts", (load, counts, 0, gate)))
    for op, args, takes, launcher_args in calls:
        answer = eager_route(op, *args)
        taken = launcher is not None and getattr(launcher, takes)(*launcher_args)
        assert (answer.implementation is Implementation.CPP_LAUNCHER) == taken, (op.__name__, answer)
        if not taken:
            assert answer.implementation in (Implementation.PYTHON_CUDA, Implementation.TRITON, Implementation.TORCH)
    # Strided ids: no CUDA kernel takes them, so the Python path runs Triton.
    strided = torch.zeros(37, 16, dtype=torch.int32, device="cuda")[:, ::2]
    answer = eager_route(eplb_compile.map_and_record, strided, l2p, rc, load, gate)
    assert answer.implementation is Implementation.TRITON and answer.kernel == "triton", answer


@needs_cuda
def test_the_route_without_the_launcher(monkeypatch):
    monkeypatch.setattr(eager_extension, "_module", None)
    monkeypatch.setenv(eager_extension.ENV, "off")
    case = _case("cuda")
    ids, l2p, rc, load, gate = _args(case)
    answer = eager_route(eplb_compile.map_only, ids, l2p, rc)
    assert answer.implementation in (Implementation.PYTHON_CUDA, Implementation.TRITON), answer
    assert "is off" in answer.reason


def test_a_file_baton_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    lock = tmp_path / "lock"
    lock.write_text("")
    monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)  # torch 2.11's build lock
    with pytest.warns(UserWarning, match="did not finish"):
        eager_extension._remove_stale_lock(str(lock))
    assert not lock.exists()
    eager_extension._remove_stale_lock(str(lock))  # none left: nothing to do, no warning


def test_an_os_file_lock_left_after_a_build_is_kept(tmp_path, monkeypatch, recwarn):
    from torch.utils import cpp_extension

    lock = tmp_path / "lock"
    lock.write_text("")
    monkeypatch.delattr(cpp_extension, "FileBaton", raising=False)  # torch 2.14: an OS lock, its file stays
    eager_extension._remove_stale_lock(str(lock))
    assert lock.exists() and not recwarn.list


def test_builds_are_serialised_by_an_os_lock_a_dead_holder_releases(tmp_path):
    import subprocess
    import sys

    folder = str(tmp_path / "build")
    holder = "import fcntl, sys, time; h = open(sys.argv[1] + '.eplb_compile.lock', 'w'); " \
             "fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", holder, folder], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    entered = threading.Event()

    def build():
        with eager_extension._one_build_at_a_time(folder):
            entered.set()

    waiter = threading.Thread(target=build, daemon=True)
    waiter.start()
    assert not entered.wait(0.5)  # another process is building in this folder
    process.kill()  # killed mid-build: the kernel drops its lock
    process.wait()
    assert entered.wait(10)


def test_waiting_for_the_build_is_bounded(monkeypatch):
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, daemon=True)  # a build that never ends
    stuck.start()
    monkeypatch.setattr(eager_extension, "_thread", stuck)
    monkeypatch.setattr(eager_extension, "_module", None)
    monkeypatch.delenv(eager_extension.ENV, raising=False)
    started = time.monotonic()
    assert eager_extension.wait(timeout_s=0.2) is None
    assert time.monotonic() - started < 5
    assert "still being built" in eager_extension.state()
    release.set()
