"""The ``torch.ops.eplb_compile`` operators: schema, CPU and CUDA
implementations, fake, and functional decomposition, one block per op.

Registered with ``torch.library.Library`` ``define``/``impl`` rather than the
``@custom_op`` decorator, whose Python dispatch costs several times more per
eager call. The plain-torch body (``_torch_impl``) is the CPU implementation;
the CUDA implementation launches a Triton or NVRTC kernel and is registered
only where Triton is installed. It is the one eager CUDA entry, reached
through the dispatcher: first the C++ eager launcher
(``kernels/eager_launch.cpp``) takes the calls it has a launch table for and
returns None for the rest; then the Python path validates in detail, asks
``chooser.choose`` which kernel runs, runs it, and lets the launcher's owner
(``kernels/eager_extension.py``) hand the launcher that shape's table.
``eplb_compile.eager_route`` says which of these a given call takes, and why.
The fakes validate metadata and allocate.

The functional decomposition runs when AOTAutograd functionalizes a graph, as
``torch.library.triton_op`` does internally: on CUDA it traces the Triton
kernel through ``wrap_triton`` so Inductor sees it; on CPU it traces the
plain-torch body, which Inductor fuses. Under AOTAutograd the decomposition
may run without the fake (aot_function, opcheck), so it validates too.

An op is decomposed only where every size rule that guards memory or id
capacity holds with no symbol involved (``Spec.decided``) and the sizes the
plain-torch body branches on are plain numbers (checked on every device, for
one rule). Otherwise it stays whole in the graph (functionalized like any
mutating custom op), and its CPU or CUDA implementation validates the real
sizes on every call: a compiled graph never relies on a guard, which a caller
may drop (vLLM does), to stay in bounds. ops/README.md says what that gives a
caller.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import NamedTuple

import torch
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from eplb_compile.kernels import eager_extension
from eplb_compile.kernels.call import KernelCall
from eplb_compile.kernels.eager_extension import LAUNCHER as _CPP
from eplb_compile.ops import _torch_impl
from eplb_compile.ops._validation import MAP_AND_RECORD, MAP_ONLY, NARROW_ID_DTYPES, RECORD_COUNTS

NAMESPACE = "eplb_compile"
LIB = torch.library.Library(NAMESPACE, "DEF")
HAS_TRITON = importlib.util.find_spec("triton") is not None


class GpuModules(NamedTuple):
    chooser: ModuleType
    triton_kernels: ModuleType


@functools.cache
def gpu_modules() -> GpuModules:
    """The modules that need Triton, imported on the first CUDA call (one cache lookup after)."""
    from eplb_compile.kernels import chooser, triton_kernels

    return GpuModules(chooser, triton_kernels)


def on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and HAS_TRITON


def _register(name: str, cpu, cuda, fake, decomposition, decomposable) -> None:
    LIB.impl(name, cpu, "CPU")
    if HAS_TRITON:
        LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)

    def functional_decomposition(mode, op, types, args, kwargs):
        # Same contract as torch.library.triton_op: decompose only plain,
        # fake and functional tensors; leave other subclasses to themselves.
        if any(
            not issubclass(t, torch._subclasses.FakeTensor) and t not in (torch.Tensor, FunctionalTensor)
            for t in types
        ):
            return NotImplemented
        if not decomposable(*args, **kwargs):
            return mode.__torch_dispatch__(op, types, args, kwargs)  # whole: validated on every call
        with mode:
            return decomposition(*args, **kwargs)

    torch.library.register_torch_dispatch(f"{NAMESPACE}::{name}", FunctionalTensorMode, functional_decomposition, lib=LIB)


# --------------------------------------------------------------------------
# map_and_record. `Tensor(a!)` marks the load as mutated in place:
# functionalization and cudagraph trees rely on it.
# --------------------------------------------------------------------------

LIB.define(
    "map_and_record(Tensor topk_ids, Tensor logical_to_physical_map, Tensor logical_replica_count, "
    "Tensor(a!) expert_load_view, Tensor record_enabled, Tensor? num_unpadded_tokens=None) -> Tensor"
)


def _map_and_record_cpu(ids, l2p, rc, load, gate, unpadded=None):
    MAP_AND_RECORD.validate(ids, l2p, rc, load, gate, unpadded)
    return _torch_impl.map_and_record(ids, l2p, rc, load, gate, unpadded)


def map_and_record_cuda(ids, l2p, rc, load, gate, unpadded=None):
    out = _CPP.map_ids(ids, l2p, rc, load, gate, unpadded)  # the C++ launcher, or None: not taken
    return out if out is not None else map_and_record_python(ids, l2p, rc, load, gate, unpadded)


def map_and_record_python(ids, l2p, rc, load, gate, unpadded=None):
    """The CUDA implementation's Python path: what runs the calls the C++ launcher does not take."""
    MAP_AND_RECORD.validate(ids, l2p, rc, load, gate, unpadded)
    call = KernelCall(ids, l2p, rc, torch.empty_like(ids, memory_format=torch.contiguous_format), load, gate, unpadded)
    choice = gpu_modules().chooser.choose(call, validated=True)
    eager_extension.learn(call)  # before the launch: a refused EPLB_COMPILE_EAGER_LAUNCHER changes nothing
    choice.launch(call)
    # The kernel writes through a pointer; bump the version as the dispatcher
    # does for a Tensor(a!) argument (the launch runs inside the implementation).
    torch.autograd.graph.increment_version(load)
    return call.out


def _map_and_record_fake(ids, l2p, rc, load, gate, unpadded=None):
    MAP_AND_RECORD.check_symbolic(ids, l2p, rc, load, gate, unpadded)
    return ids.new_empty(ids.shape)


def _map_and_record_traced(ids, l2p, rc, load, gate, unpadded=None):
    MAP_AND_RECORD.check_symbolic(ids, l2p, rc, load, gate, unpadded)
    if not on_cuda(ids):
        return _torch_impl.map_and_record(ids, l2p, rc, load, gate, unpadded)
    triton_kernels = gpu_modules().triton_kernels
    out = torch.empty(ids.shape, dtype=ids.dtype, device=ids.device)
    # Inductor miscompiles a user Triton kernel that mutates a view with a
    # storage offset (a row of a 2-D buffer) on torch 2.11 through 2.14
    # (reproducer: tests/device/repro_user_kernel_offset_view.py, checked on
    # the GPU by tests/test_torch_compat.py; upstream pytorch/pytorch#192219,
    # #192226). So the kernel counts into a fresh buffer, added to the load by
    # an aten add, which Inductor lowers correctly even into an offset view.
    fresh = torch.zeros_like(load)
    triton_kernels.launch_map(KernelCall(ids, l2p, rc, out, fresh, gate, unpadded), traced=True)
    load.add_(fresh)
    return out


def _map_and_record_decomposable(ids, l2p, rc, load, gate, unpadded=None):
    return MAP_AND_RECORD.decided(ids, l2p, rc, load, gate, unpadded) and _torch_impl.branches_decided(
        *l2p.shape, load.shape[0])


_register("map_and_record", _map_and_record_cpu, map_and_record_cuda, _map_and_record_fake, _map_and_record_traced,
          _map_and_record_decomposable)

# --------------------------------------------------------------------------
# map_only: the mapping alone; rows at or past num_unpadded_tokens come back -1.
# --------------------------------------------------------------------------

LIB.define(
    "map_only(Tensor topk_ids, Tensor logical_to_physical_map, Tensor logical_replica_count, "
    "Tensor? num_unpadded_tokens=None) -> Tensor"
)


def _map_only_cpu(ids, l2p, rc, unpadded=None):
    MAP_ONLY.validate(ids, l2p, rc, unpadded)
    return _torch_impl.map_only(ids, l2p, rc, unpadded)


def map_only_cuda(ids, l2p, rc, unpadded=None):
    if ids.dtype in NARROW_ID_DTYPES:
        # The kernels store ids in the ids' dtype; int8 and int16 go through int64
        # so that an id the dtype cannot hold comes back -1, never wrapped (through
        # int32, a sparse map's entry 2**40 would wrap to 0 before the fit).
        MAP_ONLY.validate(ids, l2p, rc, unpadded)
        return _torch_impl.fit_ids(map_only_cuda(ids.to(torch.int64), l2p, rc, unpadded), ids.dtype)
    out = _CPP.map_ids(ids, l2p, rc, None, None, unpadded)
    return out if out is not None else map_only_python(ids, l2p, rc, unpadded)


def map_only_python(ids, l2p, rc, unpadded=None):
    MAP_ONLY.validate(ids, l2p, rc, unpadded)
    call = KernelCall(ids, l2p, rc, torch.empty_like(ids, memory_format=torch.contiguous_format), None, None,
                      unpadded)
    choice = gpu_modules().chooser.choose(call, validated=True)
    eager_extension.learn(call)  # before the launch: a refused EPLB_COMPILE_EAGER_LAUNCHER changes nothing
    choice.launch(call)
    return call.out


def _map_only_fake(ids, l2p, rc, unpadded=None):
    MAP_ONLY.check_symbolic(ids, l2p, rc, unpadded)
    return ids.new_empty(ids.shape)


def _map_only_traced(ids, l2p, rc, unpadded=None):
    MAP_ONLY.check_symbolic(ids, l2p, rc, unpadded)
    if not on_cuda(ids):
        return _torch_impl.map_only(ids, l2p, rc, unpadded)
    triton_kernels = gpu_modules().triton_kernels
    narrow = ids.dtype in NARROW_ID_DTYPES  # through int64, as map_only_cuda
    wide = ids.to(torch.int64) if narrow else ids
    out = torch.empty(wide.shape, dtype=wide.dtype, device=wide.device)
    triton_kernels.launch_map(KernelCall(wide, l2p, rc, out, num_unpadded=unpadded), traced=True)
    return _torch_impl.fit_ids(out, ids.dtype) if narrow else out


def _map_only_decomposable(ids, l2p, rc, unpadded=None):
    return MAP_ONLY.decided(ids, l2p, rc, unpadded) and _torch_impl.branches_decided(*l2p.shape)


_register("map_only", _map_only_cpu, map_only_cuda, _map_only_fake, _map_only_traced, _map_only_decomposable)

# --------------------------------------------------------------------------
# record_counts. `start` is a SymInt so another EP rank reuses the same graph.
# --------------------------------------------------------------------------

LIB.define(
    "record_counts(Tensor(a!) expert_load_view, Tensor counts, SymInt start, Tensor record_enabled) -> ()"
)


def _record_counts_cpu(load, counts, start, gate):
    RECORD_COUNTS.validate(load, counts, start, gate)
    _torch_impl.record_counts(load, counts, start, gate)


def record_counts_cuda(load, counts, start, gate):
    if not _CPP.record_counts(load, counts, start, gate):
        record_counts_python(load, counts, start, gate)


def record_counts_python(load, counts, start, gate):
    RECORD_COUNTS.validate(load, counts, start, gate)
    device = load.get_device()
    choice = gpu_modules().chooser.choose_counts(device)
    eager_extension.learn_counts(device)
    choice.launch(load, counts, start, gate)
    # The kernel writes through a pointer; bump the version as the dispatcher
    # does for a Tensor(a!) argument (and as the torch fallback's add does).
    torch.autograd.graph.increment_version(load)


def _record_counts_fake(load, counts, start, gate):
    RECORD_COUNTS.check_symbolic(load, counts, start, gate)


def _record_counts_traced(load, counts, start, gate):
    RECORD_COUNTS.check_symbolic(load, counts, start, gate)
    # Plain torch on every device, so Inductor fuses it with its neighbours
    # into generated code (one kernel on CUDA).
    _torch_impl.record_counts(load, counts, start, gate)


_register("record_counts", _record_counts_cpu, record_counts_cuda, _record_counts_fake, _record_counts_traced,
          RECORD_COUNTS.decided)
