"""What the operators ask of torch beyond its public API, in one place.

``user_kernel_mutating_offset_view_is_miscompiled`` answers from the torch
version alone (no probe at import), and a GPU test
(tests/test_torch_compat.py) checks its answer against what the running torch
does. ``nothing_intercepts_eager_calls`` reads dispatcher state through
``torch._C`` functions present in torch 2.11 through 2.14.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def user_kernel_mutating_offset_view_is_miscompiled() -> bool:
    """Whether Inductor miscompiles a user Triton kernel (``wrap_triton``) that
    mutates a view with a storage offset, e.g. a row of a 2-D buffer.

    Seen on torch 2.11 (reproducer: tests/device/repro_user_kernel_offset_view.py).
    Upstream reports of the same family (a mutated user-kernel argument whose
    storage offset is resolved against the wrong buffer) are pytorch/pytorch
    #192219 and #192226; which release carries a fix is not known, so every
    release from 2.11 on is assumed affected until tests/test_torch_compat.py
    shows otherwise on the GPU.
    """
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 11)


def nothing_intercepts_eager_calls() -> bool:
    """Whether an op called now goes straight to its backend kernel: not traced
    by Dynamo, no ``TorchDispatchMode`` (FakeTensorMode, make_fx's proxy mode,
    FunctionalTensorMode, FlopCounterMode, ...), no ``TorchFunctionMode``, no
    functorch transform (vmap, grad). Then the public wrappers may call the
    CUDA implementation themselves and skip the dispatcher's ~5 µs.
    """
    return not (
        torch.compiler.is_compiling()
        # torch/csrc/utils/torch_dispatch_mode.h: the stack torch.utils._python_dispatch pushes modes on
        or torch._C._len_torch_dispatch_stack()
        # torch/csrc/utils/python_arg_parser.cpp (is_torch_function_mode_enabled): any TorchFunctionMode
        or torch._C._is_torch_function_mode_enabled()
        # torch/csrc/functorch/init.cpp (peek_interpreter_stack): None outside every functorch transform
        or torch._C._functorch.peek_interpreter_stack() is not None
    )
