"""Each torch-version switch in ops/_torch_compat.py against what the running torch does."""

from __future__ import annotations

import torch

import eplb_compile
from eplb_compile.ops import _library, _torch_compat
from eplb_compile.reference import map_and_record_reference

from tests.cases import make_case, requires_cuda


def test_answers_from_the_version_alone():
    assert isinstance(_torch_compat.user_kernel_mutating_offset_view_is_miscompiled(), bool)


def _compiled_topk_on_rows_is_wrong() -> bool:
    """Our compiled CUDA topk path, workaround off, on the rows of one load buffer."""
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
def test_offset_view_switch_matches_this_torch(monkeypatch):
    """The switch says whether this torch has the Inductor bug (the minimal
    reproducer decides), and with the switch's answer our compiled path is right.

    Measured on torch 2.11 (H200): the minimal reproducer miscompiles, while
    our topk path on rows of one load buffer happens to come out right without
    the workaround; the workaround stays on there, since the bug is present.
    """
    from tests.device.repro_user_kernel_offset_view import reproduces

    minimal = reproduces()
    expected = _torch_compat.user_kernel_mutating_offset_view_is_miscompiled()
    assert expected == minimal, (
        f"torch {torch.__version__}: the minimal reproducer {'does' if minimal else 'does not'} reproduce but "
        f"the switch says {expected}. Update _torch_compat.user_kernel_mutating_offset_view_is_miscompiled."
    )
    assert not _compiled_topk_on_rows_is_wrong()  # with the switch as it is
