"""Minimal reproducer: a user Triton kernel (wrap_triton) that mutates views
with a storage offset (the rows of one 2-D buffer), under torch.compile.

Plain torch + Triton, ready to report upstream. Each of R launches adds
``values[r]`` into ``buffer[r]``, a row of one [R, N] buffer, which is how
vLLM hands each layer its row of ``expert_load_pass``. Eager is the answer;
the compiled result is compared with it. Seen wrong on torch 2.11 with
Inductor (eplb_compile's compiled topk path counted into the wrong rows
until it recorded into a fresh buffer and added that with an aten add).

    python tests/device/repro_user_kernel_offset_view.py   # needs a CUDA GPU

Prints both results; exits 1 if they differ. ``reproduces()`` is what
tests/test_torch_compat.py calls.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

ROWS, N, BLOCK = 4, 20, 32


@triton.jit
def _add_into(dst_ptr, src_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(dst_ptr + offs, mask=mask) + tl.load(src_ptr + offs, mask=mask), mask=mask)


def add_into_rows(buffer: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    for r in range(ROWS):
        wrap_triton(_add_into)[(1,)](buffer[r], values[r], N, BLOCK=BLOCK)
    return buffer.sum()


def results(device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(eager buffer, compiled buffer) after the same launches on the same inputs."""
    values = torch.arange(ROWS * N, dtype=torch.int32, device=device).reshape(ROWS, N) + 1
    eager = torch.zeros(ROWS, N, dtype=torch.int32, device=device)
    add_into_rows(eager, values)
    torch._dynamo.reset()
    compiled = torch.zeros(ROWS, N, dtype=torch.int32, device=device)
    torch.compile(add_into_rows, fullgraph=True)(compiled, values)
    torch.cuda.synchronize()
    return eager.cpu(), compiled.cpu()


def reproduces(device: str = "cuda") -> bool:
    eager, compiled = results(device)
    return not torch.equal(eager, compiled)


def main() -> int:
    eager, compiled = results()
    print(f"torch {torch.__version__}, Triton {triton.__version__}")
    print("eager (right):\n", eager)
    print("torch.compile:\n", compiled)
    wrong = not torch.equal(eager, compiled)
    print("MISCOMPILED" if wrong else "same result: not reproduced on this torch")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
