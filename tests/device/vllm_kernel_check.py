"""vLLM 0.33.0's and 0.34.0's router kernels against eplb_compile, and the count path in a CUDA graph.

For the GPU machine (torch 2.11, Triton 3.6, no vLLM install)::

    bash tests/device/make_vllm_bundle.sh     # once, where pip works: .vllm_src/ (0.33.0), .vllm_src/v0.34.0/
    python3 tests/device/vllm_kernel_check.py --vllm-src .vllm_src --vllm-src .vllm_src/v0.34.0   # carry .vllm_src

Each ``--vllm-src`` (or ``EPLB_VLLM_SRC``, one folder) holds
``vllm/model_executor/layers/fused_moe/router/base_router.py`` (and, for 0.34.0,
``fused_moe/eplb_triton.py``); vLLM itself is never imported. Checks, per release:

1. fuzz: ``_eplb_map_and_record_i32_kernel`` through vLLM's own launcher
   against ``eplb_compile.map_and_record`` on random inputs (int16 to int64
   ids, invalid and wrapping ids, replica counts -1 to the map's slots, huge
   map entries, loads shorter than the map, with and without
   ``num_unpadded_tokens``, gate on and off, T from 0 to 8192, k from 1 to
   10). Physical ids and loads must be bit-identical; outputs land in
   poisoned memory, loads start non-zero. One exception, reported apart:
   0.34.0 dropped 0.33.0's ``max(replica_count, 1)``, so a valid id whose
   replica count is <= 0 is ``hash % 0`` there; ours (and 0.33.0) map it to
   slot 0. Those entries are compared, not required equal; the rest must be.
2. zero replicas: what the release's kernel writes for ids whose replica count
   is 0 or -1 (int32 and int64 counts), against slot 0, -1 and the map; in a
   child process, since ``hash % 0`` may read out of bounds and fault (then
   the fuzz draws no count < 1 for that release).
3. graph: both captured in CUDA graphs, replayed on new ids with the gate and
   ``num_unpadded_tokens`` changed between replays.
4. toy MoE: a MoE block built from our ops (route, map, dispatch to this
   rank's experts, experts, combine) with the count path captured in one CUDA
   graph and replayed: the load must equal the reference counts of the real
   rows, and the output must equal the eager forward. vLLM's own modular
   kernel is tested through the GPU harness (``vllm_moe_layer.py``) and on CPU
   in ``tests/integration``.

Prints a PASS/FAIL table; exits 1 on any failure. (Longer than 300 lines:
one standalone script for the GPU machine, where pytest is not assumed.) With ``--device cpu`` and
``TRITON_INTERPRET=1`` it checks its own logic on CPU: the fuzz through
Triton's interpreter, the toy MoE eagerly, no graphs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo, when not installed

import eplb_compile as ec  # noqa: E402
from eplb_compile._vllm_kernel_loader import load_vllm_router_kernel  # noqa: E402
from eplb_compile.reference import map_to_physical_reference  # noqa: E402
from tests.guards import poison_allocator  # noqa: E402

# uint8 is left out: eplb_compile refuses it (it cannot hold -1).
ID_DTYPES = [torch.int32, torch.int64, torch.int32, torch.int64, torch.int16]
EDGE_TOKENS = [0, 1, 2, 3, 255, 256, 257, 1023, 4097, 8192]


# --------------------------------------------------------------------------
# 1. Fuzz: vLLM's launcher against ours, eager.
# --------------------------------------------------------------------------


def random_case(rng: random.Random, device: str, max_tokens: int, zero_counts: bool = True):
    """Random inputs on which vLLM's kernel stays in bounds.

    vLLM reads ``l2p[e, hash % count]`` without checking the slots (0.33.0:
    ``max(count, 1)``); ours marks a replica past them invalid (our one
    deviation). So counts here never exceed the slots; counts of 0 and -1 are
    drawn (``check_fuzz`` compares their ids apart for 0.34.0).
    """
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    tokens = min(rng.choice(EDGE_TOKENS) if rng.random() < 0.4 else rng.randint(0, 8192), max_tokens)
    k = rng.randint(1, 10)
    id_dtype = rng.choice(ID_DTYPES)
    num_logical = rng.randint(1, 127 if id_dtype == torch.int16 else 300)
    slots = rng.randint(1, 4)
    num_physical_ids = num_logical + rng.randint(0, 64)
    l2p = torch.randint(0, num_physical_ids, (num_logical, slots), generator=g)
    # Half the cases without counts < 1 (strict load checks for 0.34.0); none where 0.34.0's kernel faults on them.
    lowest = -1 if zero_counts and rng.random() < 0.5 else 1
    replicas = torch.randint(lowest, slots + 1, (num_logical,), generator=g)  # <= slots
    l2p[torch.rand(l2p.shape, generator=g) < 0.1] = -1  # holes, inside and past the counts
    if rng.random() < 0.3:
        l2p[0, 0] = (1 << 35) + 3  # in the map, far past any load: mapped, never counted
    low, high = -3, num_logical + 3
    ids = torch.randint(low, high, (tokens, k), generator=g)
    if id_dtype == torch.int64 and tokens:
        ids[0, 0] = (1 << 32) + min(2, num_logical - 1)  # vLLM reads ids as int32: wraps to a valid id
        ids[-1, -1] = -(1 << 33) + 1
    num_physical = max(1, num_physical_ids - rng.randint(0, 3))  # a load shorter than the map sometimes
    load = torch.randint(0, 1000, (num_physical,), generator=g, dtype=torch.int32)
    record = rng.random() < 0.75
    num_unpadded = None if rng.random() < 0.4 else rng.randint(0, tokens + 2)
    rc_dtype = rng.choice([torch.int64, torch.int32])
    case = dict(
        ids=ids.to(id_dtype).to(device),
        l2p=l2p.to(device),
        replicas=replicas.to(rc_dtype).to(device),
        load=load.to(device),
        record=torch.tensor(record, device=device),
        num_unpadded=None if num_unpadded is None else torch.tensor(num_unpadded, dtype=torch.int32, device=device),
    )
    label = (f"T={tokens} k={k} {str(id_dtype)[6:]} L={num_logical} slots={slots} P={num_physical} "
             f"rc={str(rc_dtype)[6:]} record={record} num_unpadded={num_unpadded}")
    return case, label


def run_vllm(vllm, case):
    load = case["load"].clone()
    poison_allocator(case["ids"].device.type, case["ids"].numel())
    ids = vllm._eplb_map_and_record_triton(
        case["ids"], case["l2p"], case["replicas"], load, case["record"], case["num_unpadded"]
    )
    return ids, load


def run_ours(case):
    load = case["load"].clone()
    poison_allocator(case["ids"].device.type, case["ids"].numel())
    ids = ec.map_and_record(case["ids"], case["l2p"], case["replicas"], load, case["record"], case["num_unpadded"])
    return ids, load


def zero_replica_entries(case) -> torch.Tensor:
    """Entries whose id (read as int32, as vLLM reads it) is valid and whose replica count is <= 0."""
    ids = case["ids"].to(torch.int32).to(torch.int64).cpu().reshape(-1)
    replicas = case["replicas"].cpu()
    valid = (ids >= 0) & (ids < replicas.numel())
    return valid & (replicas[ids.clamp(0, replicas.numel() - 1)] <= 0)


def check_fuzz(vllm, args) -> tuple[bool, str]:
    """Bit-identical ids and loads; for 0.34.0, entries with replica count <= 0 are compared apart."""
    rng = random.Random(args.seed)
    bad, zero_entries, zero_same, zero_cases, zero_load_same = [], 0, 0, 0, 0
    clamps = vllm.release != "0.34.0"  # 0.33.0 clamps the count to >= 1, as ours does
    deadline = time.monotonic() + args.budget_s
    ran = 0
    for index in range(args.cases):
        if time.monotonic() > deadline:  # Triton compiles a variant per new shape class
            break
        ran += 1
        case, label = random_case(rng, args.device, args.max_tokens, zero_counts=vllm.zero_counts_safe)
        want_ids, want_load = run_vllm(vllm, case)
        got_ids, got_load = run_ours(case)
        zero = torch.zeros(case["ids"].numel(), dtype=torch.bool) if clamps else zero_replica_entries(case)
        same_shape = got_ids.dtype == want_ids.dtype and got_ids.shape == want_ids.shape
        got, want = got_ids.reshape(-1).cpu(), want_ids.reshape(-1).cpu()
        same = same_shape and torch.equal(got[~zero], want[~zero])
        if zero.any():
            zero_cases += 1
            zero_entries += int(zero.sum())
            zero_same += int((got[zero] == want[zero]).sum())
            zero_load_same += torch.equal(got_load, want_load)
        else:
            same = same and torch.equal(got_load, want_load)
        if same and case["ids"].numel() <= 2000:  # ours agrees with the element-wise semantics too
            reference = map_to_physical_reference(case["ids"].cpu(), case["l2p"].cpu(), case["replicas"].cpu())
            same = torch.equal(got.to(torch.int64), torch.tensor(reference, dtype=torch.int64).to(got.dtype).to(torch.int64))
        if not same:
            bad.append(f"case {index}: {label}")
    for line in bad[:10]:
        print("  MISMATCH", line)
    budget = f" (time budget: {ran} of {args.cases} ran)" if ran < args.cases else ""
    detail = f"{ran - len(bad)}/{ran} cases bit-identical (ids and load){budget}"
    if not clamps:
        detail += (f"; apart: {zero_cases} cases with ids of replica count <= 0: {zero_same}/{zero_entries} "
                   f"such ids equal to ours, loads equal in {zero_load_same}/{zero_cases}")
    return not bad and ran > 0, detail


def check_zero_replicas(vllm, args) -> tuple[bool | None, str]:
    """What the kernel writes, and records, for valid ids whose replica count is 0 or -1.

    The map's slots hold distinct values per expert, so the output says which
    slot (if any) was read. Informational: it passes unless the kernel raises.
    """
    device, tokens, k, num_logical, slots = args.device, 512, 8, 64, 4
    g = torch.Generator().manual_seed(args.seed + 5)
    l2p = (torch.arange(num_logical * slots).view(num_logical, slots) + 1).to(device)  # slot s of e: e*slots+s+1
    ids = torch.randint(0, num_logical, (tokens, k), generator=g, dtype=torch.int32).to(device)
    found = []
    for count in (0, -1):
        for rc_dtype in (torch.int64, torch.int32):
            replicas = torch.full((num_logical,), count, dtype=rc_dtype, device=device)
            case = dict(ids=ids, l2p=l2p, replicas=replicas, record=torch.tensor(True, device=device), num_unpadded=None,
                        load=torch.zeros(num_logical * slots + 1, dtype=torch.int32, device=device))
            out, load = run_vllm(vllm, case)
            ours, _ = run_ours(case)
            out, ours = out.cpu().to(torch.int64), ours.cpu().to(torch.int64)
            e = ids.cpu().to(torch.int64)
            kinds = {"slot 0 (= ours)": out == l2p.cpu()[e, 0], "-1": out == -1}
            for s in range(1, slots):
                kinds[f"slot {s}"] = out == l2p.cpu()[e, s]
            other = torch.ones_like(out, dtype=torch.bool)
            for m in kinds.values():
                other &= ~m
            kinds["other"] = other
            share = ", ".join(f"{name} {100 * int(m.sum()) / out.numel():.0f} %" for name, m in kinds.items() if m.any())
            recorded = int(load.sum())
            found.append(f"count {count} ({str(rc_dtype)[6:]}): {share}; recorded {recorded}/{out.numel()}")
            print("PART", found[-1], flush=True)  # what ran before a fault, for the parent process
            if not torch.equal(ours, l2p.cpu()[e, 0]):
                return False, "ours did not map a replica count <= 0 to slot 0"
    print("  zero replicas,", vllm.release or "?", "->", " | ".join(found))
    return None, " | ".join(found)


# --------------------------------------------------------------------------
# 2. Both kernels inside CUDA graphs.
# --------------------------------------------------------------------------


def check_graph_replay(vllm, args) -> tuple[bool, str]:
    device, tokens, k = "cuda", 512, 8
    g = torch.Generator().manual_seed(args.seed + 1)
    l2p = torch.randint(0, 288, (256, 3), generator=g)
    replicas = torch.randint(1, 4, (256,), generator=g)
    l2p, replicas = l2p.to(device), replicas.to(device)
    ids = torch.zeros((tokens, k), dtype=torch.int64, device=device)
    gate = torch.ones((), dtype=torch.bool, device=device)
    unpadded = torch.tensor(tokens, dtype=torch.int32, device=device)
    loads = {name: torch.zeros(288, dtype=torch.int32, device=device) for name in ("vllm", "ours")}
    run = {
        "vllm": lambda: vllm._eplb_map_and_record_triton(ids, l2p, replicas, loads["vllm"], gate, unpadded),
        "ours": lambda: ec.map_and_record(ids, l2p, replicas, loads["ours"], gate, unpadded),
    }
    graphs, outs = {}, {}
    for name, fn in run.items():
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        loads[name].zero_()
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            outs[name] = fn()
        loads[name].zero_()
    for replay in range(6):
        ids.copy_(torch.randint(-1, 257, (tokens, k), generator=g))
        gate.fill_(replay % 3 != 1)
        unpadded.fill_([tokens, 300, 0, 511, 1, tokens][replay])
        for name in run:
            outs[name].fill_(-7)
            graphs[name].replay()
        torch.cuda.synchronize()
        if not (torch.equal(outs["vllm"], outs["ours"]) and torch.equal(loads["vllm"], loads["ours"])):
            return False, f"replay {replay} differs"
    if loads["ours"].sum() == 0:
        return False, "nothing was recorded"
    return True, "6 replays, gate and num_unpadded changed between them: identical"


# --------------------------------------------------------------------------
# 3. A toy MoE block from our ops, count path in one CUDA graph.
# --------------------------------------------------------------------------


class ToyMoE:
    """What one EP rank of vLLM's modular kernel does, from our ops.

    route (softmax top-k) -> map to physical (map_only, padded rows to -1, as
    the plugin does) -> dispatch to this rank's experts, counting the tokens
    each receives (the backend's ``expert_num_tokens``) -> SiLU MLP experts
    -> weighted combine -> ``record_counts(load, counts, ep_rank * L, gate)``.
    """

    def __init__(self, l2p, replicas, ep_rank, num_local, hidden, inter, top_k, seed, device):
        g = torch.Generator().manual_seed(seed)
        self.l2p, self.replicas, self.top_k = l2p.to(device), replicas.to(device), top_k
        self.start, self.num_local = ep_rank * num_local, num_local
        self.w1 = (torch.randn((num_local, inter, hidden), generator=g) * 0.1).to(device)
        self.w2 = (torch.randn((num_local, hidden, inter), generator=g) * 0.1).to(device)

    def forward(self, x, logits, is_padding, load, gate):
        weights, logical = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        physical = ec.map_only(logical, self.l2p, self.replicas).masked_fill(is_padding.unsqueeze(1), -1)
        local = physical - self.start
        mine = (local >= 0) & (local < self.num_local)
        slot = torch.where(mine, local, 0)
        counts = torch.zeros(self.num_local, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, slot.reshape(-1), mine.reshape(-1).to(torch.int32))  # expert_num_tokens
        h = torch.nn.functional.silu(torch.einsum("th,tkih->tki", x, self.w1[slot]))
        y = torch.einsum("tki,tkhi->tkh", h, self.w2[slot])
        out = (y * (weights * mine).unsqueeze(-1)).sum(dim=1)
        ec.record_counts(load, counts, self.start, gate)
        return out, logical


def check_toy_moe(args) -> tuple[bool, str]:
    """The count path captured once, replayed with new routing, padding and gate."""
    device, tokens, hidden, inter, top_k = args.device, 256, 64, 32, 6
    num_logical, num_physical, ep_size, ep_rank = 64, 80, 4, 2  # 16 redundant, 20 local experts
    g = torch.Generator().manual_seed(args.seed + 2)
    l2p = torch.full((num_logical, 2), -1, dtype=torch.int64)
    l2p[:, 0] = torch.randperm(num_physical, generator=g)[:num_logical]
    l2p[:16, 1] = torch.tensor(sorted(set(range(num_physical)) - set(l2p[:, 0].tolist())))
    replicas = torch.tensor([2] * 16 + [1] * (num_logical - 16))
    moe = ToyMoE(l2p, replicas, ep_rank, num_physical // ep_size, hidden, inter, top_k, args.seed, device)

    x = torch.zeros((tokens, hidden), device=device)
    logits = torch.zeros((tokens, num_logical), device=device)
    is_padding = torch.zeros(tokens, dtype=torch.bool, device=device)
    gate = torch.ones((), dtype=torch.bool, device=device)
    load = torch.zeros(num_physical, dtype=torch.int32, device=device)
    if device == "cuda":
        moe.forward(x, logits, is_padding, load, gate)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_logical = moe.forward(x, logits, is_padding, load, gate)
        replay = graph.replay
    else:  # the same steps, eager: checks this script's logic where there is no GPU
        static = {}

        def replay():
            static["out"], static["logical"] = moe.forward(x, logits, is_padding, load, gate)
    load.zero_()

    expected = torch.zeros(num_physical, dtype=torch.int64)
    lo, hi = moe.start, moe.start + moe.num_local
    for step, (num_real, record) in enumerate([(256, True), (200, True), (17, False), (0, True), (131, True)]):
        x.copy_(torch.randn((tokens, hidden), generator=g))
        logits.copy_(torch.randn((tokens, num_logical), generator=g))
        is_padding.copy_(torch.arange(tokens) >= num_real)
        gate.fill_(record)
        if device == "cuda":
            static_out.fill_(float("nan"))
            replay()
            torch.cuda.synchronize()
        else:
            replay()
            static_out, static_logical = static["out"], static["logical"]
        eager_out, _ = moe.forward(x, logits, is_padding, torch.zeros_like(load), gate)
        if not torch.allclose(static_out, eager_out, rtol=1e-4, atol=1e-5):
            return False, f"replay {step}: output differs from the eager forward"
        if record:
            physical = torch.tensor(
                map_to_physical_reference(static_logical[:num_real].cpu(), l2p, replicas), dtype=torch.int64
            )
            expected += torch.bincount(physical[(physical >= lo) & (physical < hi)], minlength=num_physical)
        if not torch.equal(load.cpu().to(torch.int64), expected):
            return False, f"replay {step}: load differs from the reference counts"
    if expected.sum() == 0 or load[:lo].any() or load[hi:].any():
        return False, "nothing recorded, or recorded outside this rank's experts"
    how = "CUDA graph replays" if device == "cuda" else "eager steps (no GPU: no graph)"
    return True, f"5 {how}, 0 to 256 padded rows, gate toggled: load = reference; rank {ep_rank} of {ep_size}"


# --------------------------------------------------------------------------


def probe_zero_replicas(src: str, args) -> tuple[bool | None, str, bool]:
    """Check 2 in a child process: an out-of-bounds read there must not take this
    process's CUDA context. Returns (ok, detail, the kernel faulted)."""
    command = [sys.executable, __file__, "--probe-zero-replicas", "--vllm-src", src, "--device", args.device,
               "--seed", str(args.seed)]
    child = subprocess.run(command, capture_output=True, text=True, timeout=120)
    line = next((l for l in child.stdout.splitlines() if l.startswith("PROBE ")), None)
    if child.returncode == 0 and line:
        return None, line.split(" ", 2)[2], False
    if line and line.startswith("PROBE FAIL"):
        return False, line.split(" ", 2)[2], False
    error = [l for l in (child.stderr or "").splitlines() if "Error" in l or "error" in l][-1:]
    parts = [l[5:] for l in child.stdout.splitlines() if l.startswith("PART ")]
    return None, (" | ".join(parts) + " | then " if parts else "") + \
        f"the kernel FAULTED (exit {child.returncode}): {error[0][:300] if error else '?'}", True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-src", action="append", help="a folder of one release's vLLM sources (repeatable; "
                        "default: EPLB_VLLM_SRC or .vllm_src and .vllm_src/v0.34.0 where present)")
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=70.0, help="stop each release's fuzz after this long")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--probe-zero-replicas", action="store_true",
                        help="only check 2 for the one --vllm-src (run in a child process: it may fault)")
    args = parser.parse_args()
    if args.probe_zero_replicas:
        vllm = load_vllm_router_kernel(args.vllm_src[0])
        ok, detail = check_zero_replicas(vllm, args)
        if args.device == "cuda":
            torch.cuda.synchronize()  # a fault surfaces here, as a non-zero exit
        print("PROBE", "ok" if ok is not False else "FAIL", detail)
        return 0 if ok is not False else 1
    sources = args.vllm_src or [d for d in (os.environ.get("EPLB_VLLM_SRC", ".vllm_src"), ".vllm_src/v0.34.0")
                                if pathlib.Path(d).is_dir()]
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    results = []
    for src in sources:
        vllm = load_vllm_router_kernel(src)
        tag = f"vLLM {vllm.release or '?'}"
        print(f"{tag} router kernel from {src}: sha256 {vllm.source_sha256[:16]}...")
        results.append((f"{src}: a known release", vllm.release is not None, f"{tag}, {vllm.source_sha256[:16]}"))
        probe_ok, probe_detail, faulted = probe_zero_replicas(src, args)
        vllm.zero_counts_safe = not faulted  # else the fuzz draws no count < 1 (it would fault)
        results.append((f"replica count <= 0 vs {tag}", probe_ok, probe_detail))
        checks = [("fuzz", check_fuzz)]
        if args.device == "cuda":
            checks.append(("CUDA graph", check_graph_replay))
        for name, check in checks:
            try:
                ok, detail = check(vllm, args)
            except Exception:  # a crash is a failure with its traceback, not an abort of the table
                traceback.print_exc()
                ok, detail = False, "raised (traceback above)"
            results.append((f"{name} vs {tag}", ok, detail))
        if args.device == "cpu":
            results.append((f"CUDA graph vs {tag}", None, "skipped: --device cpu"))
    if not sources:
        results.append(("vLLM sources", False, "none given and none at .vllm_src"))
    try:
        ok, detail = check_toy_moe(args)
    except Exception:
        traceback.print_exc()
        ok, detail = False, "raised (traceback above)"
    results.append(("toy MoE count path in CUDA graph", ok, detail))

    print(f"\n{'check':36} {'result':6} detail")
    for name, ok, detail in results:
        print(f"{name:36} {('SKIP' if detail.startswith('skipped') else 'INFO') if ok is None else 'PASS' if ok else 'FAIL':6} {detail}")
    return 0 if all(ok is not False for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
