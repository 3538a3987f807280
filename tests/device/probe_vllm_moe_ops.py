"""Do vLLM 0.26.0's compiled MoE ops load and give correct results on the GPU machine (torch 2.11)?

vLLM 0.33.0 and 0.34.0 ship binaries built for torch 2.14, which do not load
on the GPU machine. vLLM 0.26.0 pins torch 2.11 and ships ``_moe_C``'s ops in
``_moe_C_stable_libtorch.abi3.so``; ``vllm_fused_layer.py`` runs vLLM 0.33.0's
own MoE layer on them. This probe is the quick check on its own: it loads the
library, prints the ops' schemas (older than 0.33.0's: the layer adapts its
calls) and checks ``moe_sum``, ``moe_align_block_size`` and ``topk_softmax``
against plain torch.

    bash tests/device/make_vllm_moe_ops.sh     # where pip works: .vllm_gpu/moe_C_0.26.0_sm90.so.gz
    # on the GPU machine (carry .vllm_gpu)
    gunzip -c .vllm_gpu/moe_C_0.26.0_sm90.so.gz >/tmp/moe_C.so && python3 tests/device/probe_vllm_moe_ops.py /tmp/moe_C.so

Seen on an H100 (torch 2.11.0+cu130, 2026-12-05), with the unslimmed library:
it loads, and all three agree with plain torch ("checks: ok").
"""

from __future__ import annotations

import sys

import torch


def main(library: str) -> int:
    torch.ops.load_library(library)
    ops = torch.ops._moe_C
    for name in ("topk_softmax", "moe_align_block_size", "moe_sum"):
        print(f"{name}: {getattr(ops, name).default._schema}")
    device, problems = torch.device("cuda"), []

    x = torch.randn(5, 8, 64, device=device, dtype=torch.bfloat16)
    out = torch.empty(5, 64, device=device, dtype=torch.bfloat16)
    ops.moe_sum(x, out)
    if not torch.allclose(out.float(), x.float().sum(1), atol=0.1, rtol=0.02):
        problems.append("moe_sum differs from x.sum(1)")

    tokens, experts, k, block = 37, 72, 8, 16
    ids = torch.stack([torch.randperm(experts, device=device)[:k] for _ in range(tokens)]).to(torch.int32)
    padded = tokens * k + experts * (block - 1)
    sorted_ids = torch.empty(padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty((padded + block - 1) // block, dtype=torch.int32, device=device)
    used = torch.empty(1, dtype=torch.int32, device=device)
    ops.moe_align_block_size(ids, experts, block, sorted_ids, expert_ids, used, None)
    counts = torch.bincount(ids.flatten().long(), minlength=experts)
    real = sorted_ids[: int(used)][sorted_ids[: int(used)] < tokens * k]
    if int(used) != int(((counts + block - 1) // block * block).sum()) or not torch.equal(
            real.sort().values.cpu(), torch.arange(tokens * k, dtype=torch.int32)):
        problems.append("moe_align_block_size: padding or assignments differ")

    gating = torch.randn(tokens, experts, device=device)
    weights = torch.empty(tokens, k, device=device)
    top = torch.empty(tokens, k, dtype=torch.int32, device=device)
    ops.topk_softmax(weights, top, torch.empty_like(top), gating, False, None)
    want_weights, want_ids = torch.softmax(gating, -1).topk(k, -1)
    if not torch.equal(top.long().sort(-1).values, want_ids.sort(-1).values) or not torch.allclose(
            weights.sort(-1).values, want_weights.sort(-1).values, atol=1e-5):
        problems.append("topk_softmax differs from softmax + topk")
    print("checks:", "ok" if not problems else "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
