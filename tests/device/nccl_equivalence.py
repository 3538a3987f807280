"""The topk/count equivalence proof of tests/test_distributed.py, on NCCL and CUDA.

Run from the repository root on a machine with 2 GPUs:

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 tests/device/nccl_equivalence.py

or without torchrun (spawns the ranks itself):

    NCCL_NVLS_ENABLE=0 python tests/device/nccl_equivalence.py --nproc 2

Every rank routes, maps (Triton ops on CUDA), dispatches with NCCL
all_to_all_single and records both ways; rank 0 checks that the all-reduced
loads agree every step and equal the CPU reference, prints a summary and a
PASS/FAIL line, and exits non-zero on FAIL. ``--backend gloo`` runs the same
script on CPU, to try it without GPUs.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off on the shared machines.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from eplb_compile.ep_simulation import SimConfig, run_rank, run_spawned, verify  # noqa: E402


def _config(args: argparse.Namespace) -> SimConfig:
    # A DeepSeek-like shape scaled down: 64 logical + 16 redundant experts, top-8.
    return SimConfig(
        num_layers=args.layers, num_logical=64, num_redundant=16, top_k=8, max_tokens=args.tokens,
        steps=args.steps, window_size=4, gate_off_steps=(2, 3, 9),
    )


def _report(
    cfg: SimConfig, world_size: int, backend: str, results: list[dict[str, torch.Tensor]], seconds: float
) -> int:
    failures = verify(cfg, world_size, results)
    first = results[0]
    print(
        f"{backend}: {world_size} ranks, steps={cfg.steps}, layers={cfg.num_layers}, P={cfg.num_physical} "
        f"({cfg.num_physical // world_size} per rank), top_k={cfg.top_k}, tokens/rank<={cfg.max_tokens}, "
        f"window={cfg.window_size}, gate off at steps {list(cfg.gate_off_steps)}; ran in {seconds:.1f} s"
    )
    print(
        f"recorded over all steps: topk path {int(first['topk_passes'].sum())}, "
        f"count path {int(first['counts_passes'].sum())}; final window total "
        f"topk {int(first['topk_windows'][-1].sum())}, count {int(first['counts_windows'][-1].sum())}"
    )
    if failures:
        print("FAIL\n" + "\n".join(failures))
        return 1
    print("PASS: both lowerings gave the same [layers, physical] load every step, equal to the reference")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="max tokens per rank per step")
    args = parser.parse_args()
    cfg = _config(args)

    if "RANK" not in os.environ:
        start = time.perf_counter()
        results = run_spawned(cfg, args.nproc, backend=args.backend)
        return _report(cfg, args.nproc, args.backend, results, time.perf_counter() - start)  # incl. process start

    # Under torchrun: this process is one rank.
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    try:
        start = time.perf_counter()
        result = run_rank(cfg, device)
        seconds = time.perf_counter() - start
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        status = 0
        if dist.get_rank() == 0:
            status = _report(cfg, dist.get_world_size(), args.backend, gathered, seconds)
        return status
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
