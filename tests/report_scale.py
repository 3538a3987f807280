"""How long ``eplb-compile report`` takes, and how much memory, on a DeepSeek-V3-shaped recording.

A benchmark script, not a test (pytest does not collect it): run it from the
repository root with ``python tests/report_scale.py [--keep DIR]``. It writes,
with :mod:`eplb_compile.recording`'s writer, what 8 EP ranks record over 1000
EPLB steps of a model of 58 MoE layers with 256 logical + 32 redundant experts
(288 physical; int32 loads; a flush every 100 steps, three rearrangements:
about 534 MB), then runs ``python -m eplb_compile report DIR`` and
``report DIR --json`` in a subprocess each, and prints each one's wall time,
peak RSS (``os.wait4``'s ``ru_maxrss`` of that child alone) and output size.
The files are read from the page cache (they were just written), as a report
run right after a recording would. The recording is written by a subprocess
too: a child's ``ru_maxrss`` includes its parent's peak at the fork, so the
measuring process stays small (no torch, no loads).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's eplb_compile, not an installed one
EP_SIZE, STEPS, FLUSH_EVERY = 8, 1000, 100
LAYERS, LOGICAL, PHYSICAL = 58, 256, 288
REARRANGE_AT = (300, 600, 900)
VERSIONS = {"vllm_version": "0.33.0", "eplb_compile_version": "report_scale"}


def _maps(rng) -> dict:
    """The start-up map (vLLM's linear one) and one EPLB-like map per rearrangement, by commit step."""
    import numpy as np

    from eplb_compile.recording import START_UP_STEP

    linear = np.tile(np.arange(PHYSICAL) % LOGICAL, (LAYERS, 1))
    maps = {START_UP_STEP: linear}
    for step in REARRANGE_AT:
        rows = [rng.permutation(np.concatenate([np.arange(LOGICAL), rng.integers(0, LOGICAL, PHYSICAL - LOGICAL)]))
                for _ in range(LAYERS)]
        maps[step] = np.stack(rows)
    return maps


def write_recording(folder: str, seed: int = 0) -> int:
    """Every rank's chunks under ``folder``, with the recorder's writer and torch tensors; the bytes written."""
    import numpy as np
    import torch

    from eplb_compile.recording import START_UP_STEP, ModelInfo, ModelSteps, chunk_tensors, make_header, write_chunk

    rng = np.random.default_rng(seed)
    info = ModelInfo("deepseek_v3", [f"model.layers.{3 + i}.mlp.experts" for i in range(LAYERS)], LOGICAL, PHYSICAL,
                     STEPS)
    maps = _maps(rng)
    popularity = rng.zipf(1.5, (LAYERS, PHYSICAL)).clip(max=20).astype(np.float64)  # a few hot experts per layer
    for rank in range(EP_SIZE):
        in_force = None
        for chunk, first in enumerate(range(0, STEPS, FLUSH_EVERY)):
            steps = list(range(first, first + FLUSH_EVERY))
            load = rng.poisson(popularity * 40, (len(steps), LAYERS, PHYSICAL)).astype(np.int32)
            committed = sorted(s for s in maps if first <= s < first + FLUSH_EVERY
                               or (s == START_UP_STEP and chunk == 0))
            pending = ModelSteps(steps, torch.from_numpy(load), committed,
                                 torch.from_numpy(np.stack([maps[s] for s in committed]) if committed
                                                  else np.zeros((0, LAYERS, PHYSICAL), np.int64)))
            header = make_header(chunk, rank, EP_SIZE, VERSIONS, [info], final=first + FLUSH_EVERY >= STEPS,
                                 counters={"dropped_ring_full": 0, "dropped_write_error": 0, "write_errors": 0})
            write_chunk(folder, header, chunk_tensors([info], [pending], [in_force]))
            if committed:
                in_force = (committed[-1], torch.from_numpy(maps[committed[-1]]))
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def measure(argv: list[str], cwd: str) -> dict:
    """One subprocess: wall seconds, its own peak RSS in MB, its stdout's lines and bytes, its exit status."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd)  # `-m` imports cwd's eplb_compile
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the maximum over all children
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, error = out.read(), err.read()
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "lines": text.count(b"\n"),
            "bytes": len(text), "rc": child.returncode, "stderr": error.decode()[-500:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="write the recording into DIR (new or empty) and keep it")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each command (default 2)")
    parser.add_argument("--repo", default=ROOT, help="the checkout whose eplb_compile is measured (default: this one)")
    parser.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)  # the writing subprocess
    args = parser.parse_args()
    if args.write_only:
        print(write_recording(args.write_only))
        return 0
    folder = args.keep or tempfile.mkdtemp(prefix="eplb-report-scale-")
    start = time.perf_counter()
    size = int(subprocess.run([sys.executable, __file__, "--write-only", folder], check=True, capture_output=True,
                              text=True).stdout)
    print(f"wrote {EP_SIZE} ranks x {STEPS} steps ({LAYERS} layers, {LOGICAL} logical / {PHYSICAL} physical experts): "
          f"{size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s into {folder}")
    print(f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}; eplb_compile from {args.repo}")
    failed = False
    for extra in ([], ["--json"]):
        command = [sys.executable, "-m", "eplb_compile", "report", folder, *extra]
        for _ in range(args.repeat):
            result = measure(command, args.repo)
            failed |= result["rc"] != 0
            print(f"report {' '.join(extra) or '(text)':<7} wall {result['wall_s']:5.2f} s  peak RSS "
                  f"{result['peak_rss_mb']:6.0f} MB  output {result['lines']} lines, {result['bytes'] / 1e3:.0f} kB"
                  + (f"  EXIT {result['rc']}: {result['stderr']}" if result["rc"] else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(folder)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
