"""What the CUDA sources, the C++ launcher and Python must agree on, checked on the CPU.

Each constant has one Python owner: the topk kernels' parameter order
(``call.TOPK_PARAMS``), the count kernel's (``cuda_variants.COUNT_PARAMS``),
its block size, the bytes a histogram bin takes, the id capacities of int8 and
int16 (``ops/_validation.py``). The C++ launcher gets them as ``-D`` macros at
build time (``eager_extension.build_macros``); the ``.cu`` kernels' parameter
lists are compared here with the Python tuples, and the Python packing with the
names, so a reorder on any side fails in CI, not only on a GPU.
"""

from __future__ import annotations

import re
from importlib import resources

import torch

from eplb_compile.kernels import cuda_variants, eager_extension, nvrtc
from eplb_compile.kernels.call import TOPK_PARAMS, KernelCall


def _source(name: str) -> str:
    return resources.files("eplb_compile.kernels").joinpath(name).read_text()


def _parameter_names(declaration: str) -> list[str]:
    """The names in a C parameter list: the last identifier of each comma-separated part."""
    declaration = declaration.replace("\\", " ")
    return [re.findall(r"[A-Za-z_]\w*", part)[-1] for part in declaration.split(",")]


def test_topk_kernels_take_the_parameters_in_topk_params_order():
    body = _source("eplb_topk.cu")
    declaration = re.search(r"#define EPLB_KERNEL_PARAMS\s*\\\n(.*?)\n\n", body, re.S).group(1)
    assert tuple(_parameter_names(declaration)) == TOPK_PARAMS


def test_count_kernel_takes_the_parameters_in_count_params_order():
    body = _source("eplb_counts.cu")
    declaration = re.search(r"eplb_record_counts\((.*?)\)", body, re.S).group(1)
    assert tuple(_parameter_names(declaration)) == cuda_variants.COUNT_PARAMS


def test_kernel_call_packs_each_parameter_into_its_slot():
    ids = torch.arange(24, dtype=torch.int32).view(6, 4)
    out, load = torch.empty_like(ids), torch.zeros(50, dtype=torch.int32)
    l2p = torch.zeros(7, 3, dtype=torch.int64)[:, :2]  # strided: stride (3, 1), shape (7, 2)
    rc, gate, unpadded = torch.ones(14, dtype=torch.int64)[::2], torch.tensor(True), torch.tensor(5, dtype=torch.int32)
    want = {"ids": ids.data_ptr(), "out": out.data_ptr(), "rc": rc.data_ptr(), "rc_is_int64": True, "rc_stride": 2,
            "l2p": l2p.data_ptr(), "l2p_stride_e": 3, "l2p_stride_s": 1, "num_logical": 7, "slots": 2,
            "load": load.data_ptr(), "num_physical": 50, "record_enabled": gate.data_ptr(),
            "num_unpadded": unpadded.data_ptr(), "numel": 24}
    assert set(want) == set(TOPK_PARAMS)
    params = KernelCall(ids, l2p, rc, out, load, gate, unpadded).cuda_params()
    assert dict(zip(TOPK_PARAMS, params)) == want and len(params) == len(TOPK_PARAMS)


def test_count_launch_packs_each_parameter_into_its_slot(monkeypatch):
    launched = []
    monkeypatch.setattr(cuda_variants, "count_function", lambda device: 99)
    monkeypatch.setattr(nvrtc, "launch", lambda *args: launched.append(args))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    load, counts, gate = torch.zeros(600, dtype=torch.int32), torch.ones(1000, dtype=torch.int32)[::3], torch.tensor(1)
    cuda_variants.launch_counts(load, counts, 7, gate)
    (device, function, blocks, threads, shared, params), = launched
    assert (function, threads, blocks, shared) == (99, cuda_variants.COUNT_THREADS, 2, 0)  # 334 counts, 256 a block
    assert dict(zip(cuda_variants.COUNT_PARAMS, params)) == {
        "load": load.data_ptr() + 4 * 7, "counts": counts.data_ptr(), "counts_stride": 3,
        "record_enabled": gate.data_ptr(), "n": 334}


def test_the_launcher_uses_every_shared_constant_and_restates_none():
    cpp = _source("eager_launch.cpp")
    macros = eager_extension.build_macros()
    for name in macros:
        assert re.search(rf"\b{name}\b", cpp), f"eager_launch.cpp does not use {name}"
    for name in TOPK_PARAMS:  # each slot written once
        assert len(re.findall(rf"values\[EPLB_SLOT_{name.upper()}\] =", cpp)) == 1, name
    for name in cuda_variants.COUNT_PARAMS:
        assert len(re.findall(rf"values\[EPLB_COUNT_SLOT_{name.upper()}\] =", cpp)) == 1, name
    code = re.sub(r"//[^\n]*", "", cpp)  # numbers in comments are fine
    for literal in ("128", "32768", "256", "15"):
        assert not re.search(rf"\b{literal}\b", code), f"eager_launch.cpp restates {literal}"
    assert macros["EPLB_INT8_ID_CAPACITY"] == 128 and macros["EPLB_INT16_ID_CAPACITY"] == 32768
    assert macros["EPLB_TOPK_PARAM_COUNT"] == len(TOPK_PARAMS) == 15
