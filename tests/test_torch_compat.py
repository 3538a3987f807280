"""The Inductor workaround in ops/_library.py's traced map_and_record against what the running torch does.

The traced CUDA topk path counts into a fresh buffer and adds it to the load,
because Inductor miscompiles a user Triton kernel that mutates a view with a
storage offset. These GPU checks say when that is still needed (the minimal
reproducer still miscompiles) and that the compiled path is right with it.
"""

from __future__ import annotations

import torch

import eplb_compile
from eplb_compile.reference import map_and_record_reference

from tests.cases import make_case, requires_cuda


def _compiled_topk_on_rows_is_wrong() -> bool:
    """Our compiled CUDA topk path on the rows of one load buffer."""
    ranks, tokens, k, num_physical = 4, 96, 2, 20
    case = make_case(9, tokens, k, 16, 2, num_physical, torch.int64, True, None, True).to("cuda")
    ids = torch.randint(0, 16, (ranks, tokens, k), generator=torch.Generator().manual_seed(3)).cuda()

    def on_rows(ids, load_pass, gate):
        return torch.stack([eplb_compile.map_and_record(ids[r], case.l2p, case.replica_count, load_pass[r], gate)
                            for r in range(ranks)])

    want = torch.zeros(ranks, num_physical, dtype=torch.int32)
    for r in range(ranks):
        _, want[r] = map_and_record_reference(ids[r].cpu(), case.l2p.cpu(), case.replica_count.cpu(), want[r], True)
    load_pass = torch.zeros(ranks, num_physical, dtype=torch.int32, device="cuda")
    torch._dynamo.reset()
    torch.compile(on_rows, fullgraph=True)(ids, load_pass, case.record_enabled)
    torch._dynamo.reset()
    return not torch.equal(load_pass.cpu(), want)


@requires_cuda
def test_the_offset_view_workaround_is_still_needed_and_works():
    """The minimal reproducer still miscompiles on this torch (once it does not,
    the fresh buffer in _map_and_record_traced can go: this test then says so),
    and our compiled path on rows of one load buffer is right with the workaround."""
    from tests.device.repro_user_kernel_offset_view import reproduces

    assert reproduces(), (
        f"torch {torch.__version__} no longer miscompiles a user kernel mutating an offset view: "
        "drop the fresh buffer in ops/_library.py's _map_and_record_traced"
    )
    assert not _compiled_topk_on_rows_is_wrong()
