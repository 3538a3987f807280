"""The captured graphs in graphs/ match what the compiler captures now.

Regenerate with ``eplb-compile graphs --regenerate`` (or EXPECTTEST_ACCEPT=1).
Goldens are tied to the torch release that captured them (their first line);
under another release the texts legitimately differ, so the check is skipped
there with that reason.
"""

import os

import expecttest
import pytest
import torch

from eplb_compile import capture


def _golden_torch_version(path) -> str:
    return path.read_text().splitlines()[0].split("torch ")[1].split(";")[0]


@pytest.mark.parametrize("path", capture.PATHS)
def test_golden_graphs(path):
    golden_files = {kind: capture.golden_path(path, kind) for kind in capture.KINDS}
    version = _golden_torch_version(golden_files["dynamo"])
    if torch.__version__.split("+")[0] != version and not os.environ.get("EXPECTTEST_ACCEPT"):
        pytest.skip(f"goldens were captured with torch {version}, this is {torch.__version__}")
    captured = capture.capture(path)
    case = expecttest.TestCase()
    case.maxDiff = None
    for kind, text in captured.items():
        want = capture.header() + text
        if os.environ.get("EXPECTTEST_ACCEPT"):
            golden_files[kind].write_text(want)
            continue
        case.assertMultiLineEqual(want, golden_files[kind].read_text(), f"{golden_files[kind]} is stale")


def test_goldens_show_the_lowering():
    # The count path must be generated loops; the topk path on CPU too.
    for path in capture.PATHS:
        summary = capture.golden_path(path, "output_code").read_text()
        assert "call fused loop: cpp_fused_" in summary
        assert "extern call" not in summary, summary
        dynamo = capture.golden_path(path, "dynamo").read_text()
        assert "torch.ops.eplb_compile." in dynamo
        post_grad = capture.golden_path(path, "post_grad").read_text()
        assert "eplb_compile" not in post_grad  # decomposed before Inductor lowers
