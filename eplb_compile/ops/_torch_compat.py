"""Which torch releases need which workaround, in one place.

Each function answers from the torch version alone (no probe at import), and
a GPU test (tests/test_torch_compat.py) checks its answer against what the
running torch actually does.
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
