"""Which implementation an eager call of an operator takes, and why.

``eager_route(op, *args)`` answers for the call ``op(*args)`` made now, in
this process, without running it (it launches nothing and changes no state
but compiling the CUDA kernels the chooser asks about, as the call would):

- ``Implementation.TORCH``: CPU tensors run the plain-torch body;
- ``Implementation.CPP_LAUNCHER``: the C++ eager launcher takes the call
  (``kernel`` names the kernel of the card's plan it launches);
- ``Implementation.PYTHON_CUDA``: the Python path launches one of this
  package's CUDA kernels (``kernel``: the variant, or the count kernel);
- ``Implementation.TRITON``: the Python path launches the Triton kernel;
- ``Implementation.TORCH`` on CUDA too, for ``record_counts`` once the CUDA
  kernels could not be built (one torch op);
- ``Implementation.NONE``: no implementation runs it (CUDA tensors without
  Triton, or another device).

``reason`` says why, in one sentence per step that decided. An invalid call
raises the error the call itself would raise. Under ``torch.compile`` the
operators trace to Triton (topk) or plain torch (counts) instead: this
answers for eager calls only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch

from eplb_compile.kernels import eager_extension
from eplb_compile.kernels.call import KernelCall
from eplb_compile.ops import _library
from eplb_compile.ops._validation import MAP_AND_RECORD, MAP_ONLY, RECORD_COUNTS


class Implementation(enum.Enum):
    CPP_LAUNCHER = "C++ eager launcher"
    PYTHON_CUDA = "Python path, CUDA kernel"
    TRITON = "Python path, Triton kernel"
    TORCH = "plain torch"
    NONE = "no implementation"


@dataclass(frozen=True)
class EagerRoute:
    implementation: Implementation
    kernel: str  # a CUDA variant ("direct", "hist_e1", ...), "eplb_record_counts", "triton" or "torch"; "" for NONE
    reason: str

    def __str__(self) -> str:
        kernel = f" ({self.kernel})" if self.kernel else ""
        return f"{self.implementation.value}{kernel}: {self.reason}"


_SPECS = {"map_and_record": MAP_AND_RECORD, "map_only": MAP_ONLY, "record_counts": RECORD_COUNTS}


def eager_route(op: Callable | str, *args) -> EagerRoute:
    """The implementation ``op(*args)`` takes as an eager call now, and why.

    ``op`` is one of the public operators (``eplb_compile.map_and_record``,
    ``map_only``, ``record_counts``) or its name; ``args`` are its arguments,
    positionally, as the call would pass them (optional ones may be left out).
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"eager_route: op must be one of {sorted(_SPECS)} or the function, got {op!r}")
    args = _with_defaults(name, args)
    spec.check_types(*args)
    spec.validate(*args)
    device = (args[0]).device
    if device.type == "cpu":
        return EagerRoute(Implementation.TORCH, "torch", "CPU tensors: the CPU implementation is the plain-torch body")
    if device.type != "cuda":
        return EagerRoute(Implementation.NONE, "", f"no eager implementation is registered for {device.type} tensors")
    if not _library.HAS_TRITON:
        return EagerRoute(Implementation.NONE, "", "CUDA tensors, but Triton is not installed, so the operators "
                                                   "register no CUDA implementation")
    chooser = _library.gpu_modules().chooser
    if name == "record_counts":
        load, counts, start, gate = args
        choice = chooser.choose_counts(load.get_device())
        takes = _launcher_takes("takes_counts", load, counts, start, gate)
        why_not = _why_launcher_declines(takes, eager_extension.has_count_function(load.get_device()),
                                         choice.is_cuda_kernel)
    else:
        ids, l2p, rc = args[:3]
        load, gate, unpadded = args[3:] if name == "map_and_record" else (None, None, args[3])
        call = KernelCall(ids, l2p, rc, ids, load, gate, unpadded)  # out: unused by the choice
        choice = chooser.choose(call, validated=True)
        takes = _launcher_takes("takes_map", ids, l2p, rc, load, gate, unpadded)
        why_not = _why_launcher_declines(takes, eager_extension.has_table(call), choice.is_cuda_kernel)
    if takes:
        return EagerRoute(Implementation.CPP_LAUNCHER, choice.kernel,
                          f"the C++ launcher has this shape's launch table and the call is within its limits; "
                          f"{choice.reason}")
    if choice.kernel == "triton":
        implementation = Implementation.TRITON
    elif choice.kernel == "torch":
        implementation = Implementation.TORCH
    else:
        implementation = Implementation.PYTHON_CUDA
    return EagerRoute(implementation, choice.kernel, f"{why_not}; {choice.reason}")


def _with_defaults(name: str, args: tuple) -> tuple:
    if name == "map_and_record" and len(args) == 5:
        return (*args, None)
    if name == "map_only" and len(args) == 3:
        return (*args, None)
    return args


def _launcher_takes(function: str, *args) -> bool:
    module = eager_extension.built()
    return module is not None and getattr(module, function)(*args)


def _why_launcher_declines(takes: bool, has_table: bool, cuda_kernel: bool = True) -> str:
    if takes:
        return ""
    state = eager_extension.state()
    if state:
        return state
    if not cuda_kernel:
        return "the C++ launcher runs only this package's CUDA kernels, not this one"
    if not has_table:
        return ("the C++ launcher has no launch table for this call's shape yet (device, and for the topk ops "
                "id dtype and k): the first Python-path call of each shape hands it one")
    return "the call is outside the C++ launcher's limits (e.g. strided ids, or a histogram past shared memory)"
