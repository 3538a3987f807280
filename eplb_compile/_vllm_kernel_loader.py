"""Load vLLM 0.33.0's EPLB router kernel without installing vLLM.

The GPU machines run torch 2.11, which vLLM 0.33.0's binaries (built for
torch 2.14) do not load, so importing ``vllm.model_executor.layers.fused_moe``
there fails without a stand-in for vLLM's compiled extensions. Only
``_eplb_map_and_record_i32_kernel`` and its launcher
``_eplb_map_and_record_triton`` are needed to compare with, or to time
against. :func:`load_vllm_router_kernel` copies those two functions verbatim
out of ``router/base_router.py`` into a module of their own, with plain
``torch``/``triton`` imports instead of vLLM's, written to a real file
because Triton reads a kernel's source from its file.

The vLLM sources come from ``pip download vllm==0.33.0 --no-deps`` (see
``tests/device/make_vllm_bundle.sh``); they are never part of this repo.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import pathlib
import tempfile
import textwrap
from types import ModuleType

ROUTER = pathlib.Path("vllm/model_executor/layers/fused_moe/router/base_router.py")
KERNEL = "_eplb_map_and_record_i32_kernel"
LAUNCHER = "_eplb_map_and_record_triton"
# sha256 of the two functions as vLLM 0.33.0 ships them; another version loads
# too, but `matches_vllm_0_33_0` says so.
VLLM_0_33_0_SHA256 = "d1020a3d9a9eb60518b31e94a4b1422997154c42ca087e1b61e751ead7b3f2db"

_HEADER = '''"""Copied verbatim from vLLM's {path} by eplb_compile._vllm_kernel_loader."""
import torch
import triton
import triton.language as tl


'''


def router_source_path(src_dir: str | pathlib.Path) -> pathlib.Path:
    """``base_router.py`` under ``src_dir`` (the folder holding ``vllm/``, or ``vllm/`` itself)."""
    src_dir = pathlib.Path(src_dir)
    for candidate in (src_dir / ROUTER, src_dir / ROUTER.relative_to("vllm")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {ROUTER} under {src_dir}")


def extract_router_kernel_source(router_py: str) -> str:
    """The kernel and its launcher, verbatim (decorators included), dedented."""
    tree = ast.parse(router_py)
    lines = router_py.splitlines(keepends=True)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in (KERNEL, LAUNCHER):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found[node.name] = textwrap.dedent("".join(lines[first - 1 : node.end_lineno]))
    missing = {KERNEL, LAUNCHER} - found.keys()
    if missing:
        raise LookupError(f"{', '.join(sorted(missing))} not found in base_router.py")
    return found[KERNEL] + "\n\n" + found[LAUNCHER]


def load_vllm_router_kernel(src_dir: str | pathlib.Path, workdir: str | pathlib.Path | None = None) -> ModuleType:
    """Import vLLM's router kernel from a folder of vLLM sources.

    Returns a module with ``_eplb_map_and_record_i32_kernel``,
    ``_eplb_map_and_record_triton(topk_ids, logical_to_physical_map,
    logical_replica_count, expert_load_view, record_enabled,
    num_unpadded_tokens)`` (vLLM's launcher: it returns the physical ids and
    adds to ``expert_load_view``), ``source_sha256`` and
    ``matches_vllm_0_33_0``. Needs Triton; vLLM itself is never imported.
    """
    path = router_source_path(src_dir)
    body = extract_router_kernel_source(path.read_text())
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="vllm_router_kernel_"))
    module_file = workdir / "vllm_router_kernel.py"
    module_file.write_text(_HEADER.format(path=ROUTER) + body)
    spec = importlib.util.spec_from_file_location("vllm_router_kernel", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.source_sha256 = hashlib.sha256(body.encode()).hexdigest()
    module.matches_vllm_0_33_0 = module.source_sha256 == VLLM_0_33_0_SHA256
    return module
