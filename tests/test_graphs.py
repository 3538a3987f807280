"""The captured graphs in graphs/ match what the compiler captures now.

Regenerate with ``eplb-compile graphs --regenerate`` (or EXPECTTEST_ACCEPT=1).
Goldens are tied to the torch release that captured them (their first line);
under another release the texts legitimately differ, so the check is skipped
there with that reason.
"""

import os
from pathlib import Path

import expecttest
import pytest
import torch

from eplb_compile import capture

# The repository's goldens, wherever the package is installed.
GRAPHS = Path(__file__).resolve().parent.parent / "graphs"


def _golden(path: str, kind: str) -> Path:
    return GRAPHS / capture.golden_name(path, kind)


def _golden_torch_version(path) -> str:
    return path.read_text().splitlines()[0].split("torch ")[1].split(";")[0]


@pytest.mark.parametrize("path", capture.PATHS)
def test_golden_graphs(path):
    golden_files = {kind: _golden(path, kind) for kind in capture.KINDS}
    version = _golden_torch_version(golden_files["dynamo"])
    if torch.__version__.split("+")[0] != version and not os.environ.get("EXPECTTEST_ACCEPT"):
        pytest.skip(f"goldens were captured with torch {version}, this is {torch.__version__}")
    captured = capture.capture_graphs(path)
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
        summary = _golden(path, "output_code").read_text()
        assert "call fused loop: cpp_fused_" in summary
        assert "extern call" not in summary, summary
        dynamo = _golden(path, "dynamo").read_text()
        assert "torch.ops.eplb_compile." in dynamo
        post_grad = _golden(path, "post_grad").read_text()
        assert "eplb_compile" not in post_grad  # decomposed before Inductor lowers


def test_regenerate_writes_into_the_given_directory_only(tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "capture_graphs", lambda path, device: {kind: f"{path} {kind}\n" for kind in capture.KINDS})
    written = []
    capture.regenerate(tmp_path, emit=written.append)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(capture.golden_name(path, kind) for path in capture.PATHS for kind in capture.KINDS)
    assert (tmp_path / "topk_path.cpu.dynamo.txt").read_text() == capture.header() + "topk_path dynamo\n"
    assert len(written) == len(names)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        capture.regenerate(tmp_path / "missing")
