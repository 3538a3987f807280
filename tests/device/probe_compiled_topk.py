"""Probe: the compiled CUDA topk path on load views (debugging aid)."""
import os

import torch
from torch._inductor.utils import run_and_get_code

import eplb_compile as ec
from eplb_compile import ops
from eplb_compile.reference import map_and_record_reference

torch.manual_seed(0)
R, T, k, L, P = 4, 96, 2, 16, 20
l2p = torch.randint(0, P, (L, 2), device="cuda")
rc = torch.randint(1, 3, (L,), device="cuda")
ids = torch.randint(0, L, (R, T, k), device="cuda")
gate = torch.ones((), dtype=torch.bool, device="cuda")
unp = torch.full((R,), T, dtype=torch.int32, device="cuda")


def on_views(ids, load, gate, unp):
    return torch.stack([ec.map_and_record(ids[r], l2p, rc, load[r], gate, unp[r]) for r in range(R)])


def on_tensors(ids, loads, gate, unp):
    return torch.stack([ec.map_and_record(ids[r], l2p, rc, loads[r], gate, unp[r]) for r in range(R)])


want = torch.zeros(R, P, dtype=torch.int32)
for r in range(R):
    _, want[r] = map_and_record_reference(ids[r].cpu(), l2p.cpu(), rc.cpu(), want[r], True, T)

original = ops._map_and_record_triton


def fresh_buffer(topk_ids, l2p_, rc_, load, gate_, unp_=None, *, wrap=False):
    if not wrap:
        return original(topk_ids, l2p_, rc_, load, gate_, unp_)
    scratch = torch.zeros_like(load)
    out = original(topk_ids, l2p_, rc_, scratch, gate_, unp_, wrap=True)
    load.add_(scratch)
    return out


for name in ["eager-views", "compiled-views", "compiled-tensors", "compiled-views-fresh"]:
    torch._dynamo.reset()
    ops._map_and_record_triton = fresh_buffer if name.endswith("fresh") else original
    load = torch.zeros(R, P, dtype=torch.int32, device="cuda")
    if name == "eager-views":
        on_views(ids, load, gate, unp)
    elif name == "compiled-tensors":
        loads = [torch.zeros(P, dtype=torch.int32, device="cuda") for _ in range(R)]
        run_and_get_code(torch.compile(on_tensors, fullgraph=True), ids, loads, gate, unp)
        load = torch.stack(loads)
    else:
        _, codes = run_and_get_code(torch.compile(on_views, fullgraph=True), ids, load, gate, unp)
        with open(os.path.join(os.environ.get("OUT", "/tmp"), f"probe_{name}.py"), "w") as f:
            f.write("\n\n".join(codes))
    torch.cuda.synchronize()
    ok = torch.equal(load.cpu(), want)
    print(f"{name:22s} load equal: {ok}  sum {int(load.sum())} want {int(want.sum())}")
    if not ok:
        print(load.cpu()[:2].tolist())
