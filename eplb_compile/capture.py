"""What the compiler captured for each lowering: the goldens in the repository's ``graphs/``.

For each path we keep three texts: the Dynamo graph, the post-grad graph and a
normalised summary of Inductor's output code (fused loops against extern
calls). ``eplb-compile graphs --regenerate [--out DIR]`` rewrites them into an
existing directory (default ``graphs/`` of the working directory, so run it
from the repository root); ``tests/test_graphs.py`` compares.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import eplb_compile

KINDS = ("dynamo", "post_grad", "output_code")


def _topk_path(topk_ids, l2p, replica_count, load, record_enabled, num_unpadded_tokens):
    return eplb_compile.map_and_record(topk_ids, l2p, replica_count, load, record_enabled, num_unpadded_tokens)


def _count_path(topk_ids, l2p, replica_count, load, counts, start: int, record_enabled):
    physical = eplb_compile.map_only(topk_ids, l2p, replica_count)
    eplb_compile.record_counts(load, counts, start, record_enabled)
    return physical


def _inputs(device: str) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    num_logical, slots, num_physical, tokens, k, num_local = 8, 2, 12, 16, 2, 4
    topk_ids = torch.randint(-1, num_logical + 1, (tokens, k), generator=g).to(device)
    l2p = torch.randint(0, num_physical, (num_logical, slots), generator=g).to(device)
    replica_count = torch.randint(1, slots + 1, (num_logical,), generator=g).to(device)
    load = torch.zeros(num_physical, dtype=torch.int32, device=device)
    gate = torch.ones((), dtype=torch.bool, device=device)
    counts = torch.randint(0, 9, (num_local,), generator=g, dtype=torch.int32).to(device)
    unpadded = torch.tensor(tokens - 3, dtype=torch.int32, device=device)
    return {
        "topk_path": (_topk_path, (topk_ids, l2p, replica_count, load, gate, unpadded)),
        "count_path": (_count_path, (topk_ids, l2p, replica_count, load, counts, num_local, gate)),
    }


class _RecordPostGrad(CustomGraphPass):
    def __init__(self) -> None:
        self.graphs: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs.append(str(graph))

    def uuid(self) -> None:
        return None  # never cached: goldens must see the passes run


_ADDRESS = re.compile(r"0x[0-9a-f]+")
# Dynamo numbers its size symbols from a hash of the source: keep the shape, drop the number.
_SYMBOL = re.compile(r"\bs\d+\b")


def _normalise(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line.strip() or line.strip().startswith("# File:") or line.strip().startswith("# No stacktrace"):
            continue
        lines.append(_SYMBOL.sub("s?", _ADDRESS.sub("0x?", line)))
    return "\n".join(lines) + "\n"


def summarise_output_code(code: str) -> str:
    """Kernels Inductor generated, and every call the wrapper makes, in order."""
    kernels = sorted(set(re.findall(r"^(\w+) = async_compile\.(cpp_pybinding|triton)\(", code, re.M)))
    summary = [f"generated {kind} kernel: {name}" for name, kind in kernels]
    call_body = code[code.index("def call(") :] if "def call(" in code else ""
    for match in re.finditer(
        r"^\s+((?:cpp_fused|triton_)\w*|extern_kernels\.\w+|torch\.ops\.[\w.]+|aten\.[\w.]+)(?:\.run)?\(",
        call_body,
        re.M,
    ):
        name = match.group(1)
        kind = "fused loop" if name.startswith(("cpp_fused", "triton_")) else "extern call"
        summary.append(f"call {kind}: {name}")
    return "\n".join(summary) + "\n"


def capture_graphs(path: str, device: str = "cpu") -> dict[str, str]:
    """Compile ``path`` (``topk_path`` or ``count_path``) and return its three texts."""
    fn, args = _inputs(device)[path]
    dynamo_graphs: list[str] = []

    def recording_inductor(gm: torch.fx.GraphModule, example_inputs):
        dynamo_graphs.append(gm.print_readable(print_output=False))
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    post_grad = _RecordPostGrad()
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(args[0], 0)
    with torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=post_grad):
        compiled = torch.compile(fn, backend=recording_inductor, fullgraph=True)
        _, codes = run_and_get_code(compiled, *args)
    return {
        "dynamo": _normalise("\n".join(dynamo_graphs)),
        "post_grad": _normalise("\n".join(post_grad.graphs)),
        "output_code": summarise_output_code("\n".join(codes)),
    }


def golden_name(path: str, kind: str, device: str = "cpu") -> str:
    """File name of one golden, e.g. ``topk_path.cpu.dynamo.txt``."""
    return f"{path}.{device}.{kind}.txt"


def header() -> str:
    return f"# captured with torch {torch.__version__.split('+')[0]}; regenerate: eplb-compile graphs --regenerate\n"


PATHS = ("topk_path", "count_path")


def regenerate(out_dir: str | Path, device: str = "cpu", emit: Callable[[str], None] = print) -> None:
    """Write every golden into ``out_dir``, which must exist."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"goldens directory {out_dir} does not exist; pass an existing directory")
    for path in PATHS:
        for kind, text in capture_graphs(path, device).items():
            target = out_dir / golden_name(path, kind, device)
            target.write_text(header() + text)
            emit(f"wrote {target}")
