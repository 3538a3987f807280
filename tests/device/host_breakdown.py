"""Where an eager map_and_record call spends its host time, piece by piece.

    python3 tests/device/host_breakdown.py [--tokens 1]

Each piece runs alone in a loop while a sleep kernel keeps the GPU busy (so
launches only queue), median of rounds, the pieces interleaved: the bench's
host measurement. The pieces are the steps of ``eplb_compile.map_and_record``
on a CUDA call, in order; their sum is close to the whole call, but not equal
(caches, branch history). For profiling the eager path; the bench's host table
is the figure.
"""

from __future__ import annotations

import argparse

import torch

import eplb_compile
from eplb_compile.bench.timing import host_overheads_us
from eplb_compile.kernels import chooser, cuda_variants, eager_extension, nvrtc
from eplb_compile.kernels.call import KernelCall
from eplb_compile.ops import _library
from eplb_compile.ops._validation import MAP_AND_RECORD


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1)
    args = parser.parse_args()
    dev = "cuda"
    print("C++ eager launcher:", "built" if eager_extension.wait() is not None else eager_extension.failure())
    ids = torch.randint(0, 256, (args.tokens, 8), dtype=torch.int32, device=dev)
    l2p = torch.full((256, 1024), -1, dtype=torch.int64, device=dev)
    l2p[:, 0] = torch.arange(256, device=dev)
    rc = torch.ones(256, dtype=torch.int32, device=dev)
    load = torch.zeros(288, dtype=torch.int32, device=dev)
    gate = torch.tensor(True, device=dev)
    unpadded = torch.tensor(args.tokens, dtype=torch.int32, device=dev)
    counts = torch.ones(36, dtype=torch.int32, device=dev)
    out = torch.empty_like(ids)
    args6 = (ids, l2p, rc, load, gate, unpadded)
    call = KernelCall(ids, l2p, rc, out, load, gate, unpadded)
    launcher = chooser.choose(call).launch
    variant = cuda_variants.VARIANTS[chooser.variant_name(call)]
    function = cuda_variants.compiled_functions(call)[variant.kernel]
    params = call.cuda_params()
    # cuLaunchKernel with every argument prepared: the driver's own cost plus one ctypes call.
    cu_launch = nvrtc._driver()[0]
    values, pointers = nvrtc._thread_launcher()[:2]
    values[: len(params)] = params
    import ctypes

    fn_ptr = ctypes.c_void_p(function)
    stream_ptr = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    shared = variant.shared_bytes(call)
    pieces = [
        ("whole: eplb_compile.map_and_record", lambda: eplb_compile.map_and_record(*args6)),
        ("whole: eplb_compile.map_only", lambda: eplb_compile.map_only(ids, l2p, rc)),
        ("whole: eplb_compile.record_counts", lambda: eplb_compile.record_counts(load, counts, 0, gate)),
        ("record_counts: chosen count kernel", lambda: chooser.choose_counts(torch.cuda.current_device()).launch(load, counts, 0, gate)),
        ("whole: torch.ops map_and_record", lambda: torch.ops.eplb_compile.map_and_record(*args6)),
        ("C++ launcher map_ids alone", lambda: eager_extension.LAUNCHER.map_ids(*args6)),
        ("C++ launcher record_counts alone", lambda: eager_extension.LAUNCHER.record_counts(load, counts, 0, gate)),
        ("Python path map_and_record", lambda: _library.map_and_record_python(*args6)),
        ("check_types", lambda: MAP_AND_RECORD.check_types(*args6)),
        ("validate", lambda: MAP_AND_RECORD.validate(*args6)),
        ("empty_like(contiguous)", lambda: torch.empty_like(ids, memory_format=torch.contiguous_format)),
        ("KernelCall(...)", lambda: KernelCall(ids, l2p, rc, out, load, gate, unpadded)),
        ("chooser.choose", lambda: chooser.choose(call)),
        ("launcher(call) (params + launch)", lambda: launcher(call)),
        ("call.cuda_params()", lambda: call.cuda_params()),
        ("compiled_functions", lambda: cuda_variants.compiled_functions(call)),
        ("nvrtc.launch (prepared params)",
         lambda: nvrtc.launch(0, function, 1, variant.threads, variant.shared_bytes(call), params)),
        ("cuLaunchKernel alone (ctypes, prepared)",
         lambda: cu_launch(fn_ptr, 1, 1, 1, variant.threads, 1, 1, shared, stream_ptr, pointers, None)),
        ("increment_version", lambda: torch.autograd.graph.increment_version(load)),
        ("plain torch slice add", lambda: load[0:36].add_(counts)),
        ("torch.empty_like(ids)", lambda: torch.empty_like(ids)),
    ]
    medians = host_overheads_us(dict(pieces), calls=100, rounds=15)  # the bench's host measurement, interleaved
    print(f"T={args.tokens}, variant {variant.name}; µs per call")
    for name, _ in pieces:
        print(f"{name:40s} {medians[name]:6.2f}")


if __name__ == "__main__":
    main()
