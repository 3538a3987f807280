"""Minimal plain-torch reproducer of an Inductor miscompile, ready to report upstream.

A clone of a buffer taken between two in-place adds into a slice of that
buffer should hold the value after the first add. Compiled with Inductor it
holds the value after the second (eager and aot_eager are right):

    load[1:4].add_(c); snapshot = load.clone(); load[1:4].add_(c)

Seen on torch 2.14.0 (CPU). Run it as a script:

    python tests/upstream_repro_inductor_read_between_slice_adds.py

It prints the snapshot from each backend and exits 1 while the bug is present.
tests/test_compile.py pins the same behaviour through eplb_compile.record_counts.
"""

import sys

import torch


def read_between_slice_adds(load: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    load[1:4].add_(counts)
    snapshot = load.clone()
    load[1:4].add_(counts)
    return snapshot


def snapshot_with(backend: str) -> list[int]:
    torch._dynamo.reset()
    load = torch.zeros(6, dtype=torch.int32)
    counts = torch.tensor([1, 2, 3], dtype=torch.int32)
    return torch.compile(read_between_slice_adds, backend=backend, fullgraph=True)(load, counts).tolist()


def main() -> int:
    right = [0, 1, 2, 3, 0, 0]
    print(f"torch {torch.__version__}; expected snapshot {right}")
    wrong = False
    for backend in ("eager", "aot_eager", "inductor"):
        got = snapshot_with(backend)
        wrong |= got != right
        print(f"  {backend:9s} snapshot {got}  {'ok' if got == right else 'WRONG (the value after the second add)'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
