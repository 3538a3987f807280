"""Run the GPU kernels over a fuzzed batch of odd inputs, under memcheck.

From the repository root on a GPU machine:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/device/sanitize.py

(or ``sh tests/device/sanitize.sh``). Every case goes through the operators
(map_and_record, map_only with and without padding, record_counts; on the
GPU through the C++ eager launcher where it takes the call) and
each CUDA variant of ``eplb_compile.kernels.cuda_variants`` directly (a
variant that does not take a case raises ValueError and is counted as not
applicable). Results are compared with the element-wise reference; the
script prints how many cases it tried and exits 1 on any mismatch. Memcheck
exits 1 on any out-of-bounds or misaligned access.

Two ways to catch a stray access, alternating by case:
- exact allocations: the caching allocator is off (set below, before torch is
  imported), so every tensor is its own cudaMalloc and memcheck sees an access
  one element past it;
- guarded views: the load sits inside sentinels that must survive, and the map
  and replica counts inside valid-looking entries that a stray read would map
  to and count, so the result would differ from the reference.

Only torch and eplb_compile are needed (no pytest or hypothesis).
``--device cpu`` runs the same batch through the CPU lowering, to try the
script without a GPU.
"""

from __future__ import annotations

import os

# Before torch: one cudaMalloc per tensor, so memcheck knows each one's bounds.
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when not installed
import eplb_compile  # noqa: E402
from eplb_compile.kernels.call import KernelCall  # noqa: E402
from eplb_compile.reference import (  # noqa: E402
    map_and_record_reference,
    map_only_reference,
    record_counts_reference,
)
from tests.guards import MARGIN as GUARD  # noqa: E402
from tests.guards import POISON, guarded  # noqa: E402
from tests.layouts import ID_LAYOUTS, ids_base_shape, ids_view  # noqa: E402

# The id dtypes the ops take, each with the most physical ids it holds.
ID_CAPACITY = {torch.int8: 2**7, torch.int16: 2**15, torch.int32: 2**31, torch.int64: 2**63}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass
class Case:
    index: int
    tokens: int
    k: int
    num_logical: int
    slots: int
    num_physical: int
    id_dtype: torch.dtype
    id_layout: str
    guarded: bool
    num_unpadded: int | None
    gate: bool
    ids_base: torch.Tensor  # CPU; the view is taken on the device
    l2p: torch.Tensor
    replica_count: torch.Tensor
    load: torch.Tensor
    counts: torch.Tensor
    start: int

    def describe(self) -> str:
        return (
            f"case {self.index}: T={self.tokens} k={self.k} logical={self.num_logical} slots={self.slots} "
            f"P={self.num_physical} ids={self.id_dtype} {self.id_layout} guarded={self.guarded} "
            f"unpadded={self.num_unpadded} gate={self.gate} counts[{self.counts.numel()}]@{self.start}"
        )


def _tokens(rng: random.Random, max_tokens: int) -> int:
    kind = rng.random()
    if kind < 0.15:
        return rng.choice([0, 1, 2, 3])
    if kind < 0.55:
        return rng.randint(1, min(64, max_tokens))
    if kind < 0.85:
        return rng.randint(1, min(1024, max_tokens))
    return rng.choice([max_tokens, rng.randint(1, max_tokens)])


def make_case(index: int, rng: random.Random, max_tokens: int) -> Case:
    g = torch.Generator().manual_seed(rng.randint(0, 2**31 - 1))
    tokens = _tokens(rng, max_tokens)
    k = rng.choice([1, 2, 4, 6, 8, 8, rng.randint(1, 10)])
    num_logical = rng.choice([1, rng.randint(1, 8), rng.randint(9, 300)])
    slots = rng.choice([1, rng.randint(1, 5)])
    # Mostly EP-sized loads; some far past what a shared-memory histogram holds.
    num_physical = rng.choice([1, rng.randint(1, 400), rng.randint(1, 400), rng.randint(30_000, 70_000)])
    # A dtype that holds every physical id: of the load (map_and_record) and of the map (map_only).
    id_dtype = rng.choice([d for d, cap in ID_CAPACITY.items() if max(num_physical, num_logical * slots) <= cap])
    id_layout = rng.choice(("contiguous",) + ID_LAYOUTS)  # contiguous twice as often
    shape = ids_base_shape(id_layout, tokens, k)

    # Expert ids: out of range on both sides, a hot expert, the dtype's extremes.
    ids = torch.randint(-3, num_logical + 3, shape, generator=g)
    if rng.random() < 0.3:
        hot = torch.rand(shape, generator=g) < 0.7
        ids = torch.where(hot, rng.randrange(num_logical), ids)
    if rng.random() < 0.3 and ids.numel():
        info = torch.iinfo(id_dtype)
        ids.view(-1)[::7] = info.max
        ids.view(-1)[3::11] = info.min
        if id_dtype == torch.int64:  # read as int32, like vLLM: wraps
            ids.view(-1)[5::13] = 2**32 + rng.randrange(num_logical)

    # Physical ids: -1 padding, below -1, past the load, past int32.
    l2p = torch.randint(-1, num_physical + 3, (num_logical, slots), generator=g)
    odd = torch.rand(l2p.shape, generator=g)
    l2p = torch.where(odd < 0.1, -1, l2p)
    l2p = torch.where((odd > 0.97), torch.tensor(rng.choice([-5, num_physical + GUARD, 2**40])), l2p)

    # Replica counts: 0 and negative (read as 1), past the slots (mapped to -1).
    replica_count = torch.randint(-1, slots + 3, (num_logical,), generator=g)
    if rng.random() < 0.2:
        replica_count[rng.randrange(num_logical)] = rng.choice([INT32_MAX, INT32_MIN, 2**40])
    fits_int32 = bool((replica_count >= INT32_MIN).all() and (replica_count <= INT32_MAX).all())
    if fits_int32 and rng.random() < 0.5:
        replica_count = replica_count.to(torch.int32)

    num_unpadded = rng.choice([None, None, 0, tokens, rng.randint(0, tokens + 3)])
    load = torch.randint(0, 1000, (num_physical,), generator=g, dtype=torch.int32)
    n = rng.choice([0, num_physical, rng.randint(0, num_physical)])
    start = rng.randint(0, num_physical - n)
    counts = torch.randint(0, 10_000, (n,), generator=g, dtype=torch.int32)
    return Case(
        index, tokens, k, num_logical, slots, num_physical, id_dtype, id_layout, index % 2 == 0,
        num_unpadded, rng.random() < 0.8, ids.to(id_dtype), l2p, replica_count, load, counts, start,
    )


class Inputs:
    """One case's tensors on the device (fresh for each kernel)."""

    def __init__(self, case: Case, device: str):
        self.ids = ids_view(case.ids_base.to(device), case.id_layout, case.tokens, case.k)
        # Decoys: physical id 0 and replica count 1, so a stray read counts expert 0;
        # POISON around the load, so a stray write shows.
        self.l2p = self._place(case.l2p, device, case.guarded, 0).view
        self.replica_count = self._place(case.replica_count, device, case.guarded, 1).view
        self.load_guard = self._place(case.load, device, case.guarded, POISON)
        self.load = self.load_guard.view
        self.gate = torch.tensor(case.gate, device=device)
        self.unpadded = (
            None if case.num_unpadded is None else torch.tensor(case.num_unpadded, dtype=torch.int32, device=device)
        )

    @staticmethod
    def _place(t: torch.Tensor, device: str, guarded_view: bool, fill: int):
        """``t`` on the device: in the middle of a guarded buffer, or alone (exact allocation)."""
        if guarded_view:
            return guarded(t, device, fill)
        alone = t.to(device, copy=True)  # a copy on the CPU too: the load is mutated
        return Alone(alone)


class Alone:
    """An unguarded tensor, for the exact-allocation cases: memcheck sees its bounds."""

    def __init__(self, view: torch.Tensor):
        self.view = view

    def intact(self) -> bool:
        return True


def cuda_variants() -> dict:
    """The CUDA kernel variants by name."""
    try:
        from eplb_compile.kernels.cuda_variants import VARIANTS
    except ImportError as error:
        print(f"CUDA variants: not available ({error})")
        return {}
    return dict(VARIANTS)


def run(cases: int, max_tokens: int, seed: int, device: str) -> int:
    rng = random.Random(seed)
    variants = cuda_variants() if device == "cuda" else {}
    failures: list[str] = []
    tried = {"ops": 0, **{name: 0 for name in variants}}
    not_applicable = {name: 0 for name in variants}
    broken: dict[str, str] = {}

    def expect(ok: bool, what: str, case: Case) -> None:
        if not ok:
            failures.append(f"{what} mismatch in {case.describe()}")

    began = time.time()
    for index in range(cases):
        case = make_case(index, rng, max_tokens)
        cpu_ids = ids_view(case.ids_base, case.id_layout, case.tokens, case.k)
        want_ids, want_load = map_and_record_reference(
            cpu_ids, case.l2p, case.replica_count, case.load, case.gate, case.num_unpadded
        )

        x = Inputs(case, device)
        got = eplb_compile.map_and_record(x.ids, x.l2p, x.replica_count, x.load, x.gate, x.unpadded)
        expect(torch.equal(got.cpu(), want_ids), "map_and_record ids", case)
        expect(torch.equal(x.load.cpu(), want_load), "map_and_record load", case)
        expect(x.load_guard.intact(), "map_and_record guard", case)
        expect(torch.equal(eplb_compile.map_only(x.ids, x.l2p, x.replica_count).cpu(), want_ids), "map_only", case)
        want_padded = map_only_reference(cpu_ids, case.l2p, case.replica_count, case.num_unpadded)
        got_padded = eplb_compile.map_only(x.ids, x.l2p, x.replica_count, x.unpadded)
        expect(torch.equal(got_padded.cpu(), want_padded), "map_only padded", case)

        x = Inputs(case, device)
        eplb_compile.record_counts(x.load, case.counts.to(device), case.start, x.gate)
        want_counts = record_counts_reference(case.load, case.counts, case.start, case.gate)
        expect(torch.equal(x.load.cpu(), want_counts), "record_counts load", case)
        expect(x.load_guard.intact(), "record_counts guard", case)
        tried["ops"] += 1

        for name, variant in variants.items():
            if name in broken:
                continue
            x = Inputs(case, device)
            ids = x.ids.contiguous()  # these kernels take contiguous ids only; the map may be strided
            out = torch.full(ids.shape, POISON, dtype=case.id_dtype, device=device)
            try:
                variant.launch(KernelCall(ids, x.l2p, x.replica_count, out, x.load, x.gate, x.unpadded))
            except ValueError:  # the kernel does not take these inputs (e.g. too large for shared memory)
                not_applicable[name] += 1
                continue
            except RuntimeError as error:  # NVRTC or the driver: no kernel to check
                broken[name] = str(error)
                continue
            expect(torch.equal(out.cpu(), want_ids), f"{name} ids", case)
            expect(torch.equal(x.load.cpu(), want_load), f"{name} load", case)
            expect(x.load_guard.intact(), f"{name} guard", case)
            tried[name] += 1
        if device == "cuda":
            torch.cuda.synchronize()  # attribute a fault to this case

    print(f"cases tried: {cases} (seed {seed}, T up to {max_tokens}) in {time.time() - began:.1f} s on {device}")
    for name, count in tried.items():
        extra = f", {not_applicable[name]} not applicable" if name in not_applicable else ""
        print(f"  {name}: {count} checked{extra}")
    for name, error in broken.items():
        print(f"  {name}: UNAVAILABLE, not checked: {error}")
    for failure in failures[:20]:
        print("FAIL", failure)
    print(f"{'FAIL' if failures else 'PASS'}: {len(failures)} mismatches")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu to try the script")
    if args.device == "cuda":
        from eplb_compile.kernels import eager_extension

        # The operators' eager calls then take the C++ launcher (once each
        # shape's table is registered), as they do in a server.
        built = eager_extension.wait()
        print("C++ eager launcher:", "built" if built is not None else f"not built: {eager_extension.failure()}")
    sys.exit(run(args.cases, args.max_tokens, args.seed, args.device))


if __name__ == "__main__":
    main()
