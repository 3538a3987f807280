"""A small random fuzz of every CUDA topk variant, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/device/fuzz_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 tests/device/fuzz_kernels.py

Each case is also checked against the reference, so a run that the sanitizer
passes is a correct one too. Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from eplb_compile.reference import expected_map_and_record
from eplb_compile.kernels import cuda_variants
from tests.test_kernel_variants import _random_inputs, _run, _strict


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    names = list(cuda_variants.VARIANTS)
    bad = 0
    for case in range(args.cases):
        name = names[case % len(names)]
        tokens = rng.choice([1, 2, 13, 100, 777, 3000])
        k = rng.choice([8, 8, 6, 1])
        num_logical, slots = rng.choice([(40, 4), (256, 1024), (7, 20)])
        num_physical = rng.choice([60, 288, 1000])
        id_dtype = rng.choice([torch.int32, torch.int64, torch.int16])
        record = rng.random() < 0.8
        num_unpadded = rng.choice([None, tokens, tokens // 2])
        ids, l2p, rc, load = _random_inputs(rng.randrange(2**31), tokens, k, num_logical, slots, num_physical,
                                            id_dtype, rng.choice([torch.int32, torch.int64]))
        want_ids, want_load = expected_map_and_record(ids, l2p, rc, load, record, num_unpadded)
        got_ids, got_load = _run(_strict(name), ids, l2p, rc, load, record, num_unpadded)
        if not (torch.equal(got_ids.cpu(), want_ids) and torch.equal(got_load.cpu(), want_load)):
            bad += 1
            print(f"MISMATCH case {case}: {name} T={tokens} k={k} L={num_logical} slots={slots} P={num_physical} "
                  f"{id_dtype} record={record} num_unpadded={num_unpadded}")
    print(f"fuzz: {args.cases - bad}/{args.cases} cases exact")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
