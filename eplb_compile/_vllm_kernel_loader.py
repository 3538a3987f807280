"""Load vLLM's EPLB router kernel (0.33.0 or 0.34.0) without installing vLLM.

The GPU machines run torch 2.11, which vLLM's binaries (built for torch 2.14)
do not load, so importing ``vllm.model_executor.layers.fused_moe`` there fails
without a stand-in for vLLM's compiled extensions. Only the kernel
``_eplb_map_and_record_i32_kernel`` and its launcher
``_eplb_map_and_record_triton`` are needed to compare with, or to time
against. :func:`load_vllm_router_kernel` copies them verbatim out of
``router/base_router.py`` into a module of their own, with plain
``torch``/``triton`` imports instead of vLLM's, written to a real file because
Triton reads a kernel's source from its file.

vLLM 0.34.0 moved the kernel's body into a shared ``@triton.jit`` helper,
``fused_moe/eplb_triton.py:eplb_map_and_record``, which its kernel calls
(``base_router.py:54``); when ``base_router.py`` imports that helper, it is
copied too, ahead of the kernel. The sha256 of what was copied says which
release it came from (:data:`KNOWN_RELEASES`).

The vLLM sources come from ``pip download vllm==<release> --no-deps`` (see
``tests/device/make_vllm_bundle.sh``); they are never part of this repo.
Extraction is plain Python; only loading needs Triton.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import pathlib
import tempfile
import textwrap
from types import ModuleType

FUSED_MOE = pathlib.Path("vllm/model_executor/layers/fused_moe")
ROUTER = FUSED_MOE / "router/base_router.py"
HELPER_FILE = FUSED_MOE / "eplb_triton.py"  # vLLM >= 0.34.0
KERNEL = "_eplb_map_and_record_i32_kernel"
LAUNCHER = "_eplb_map_and_record_triton"
HELPER = "eplb_map_and_record"
# sha256 of the copied source (helper, kernel, launcher) per release; another
# version loads too, with ``release`` None.
KNOWN_RELEASES = {
    "d1020a3d9a9eb60518b31e94a4b1422997154c42ca087e1b61e751ead7b3f2db": "0.33.0",
    "829925f38036ce64232700ec85bd510bbf3cfc53ad9a30c10e6296ca21d1480f": "0.34.0",
}

_HEADER = '''"""Copied verbatim from vLLM's {paths} by eplb_compile._vllm_kernel_loader."""
import torch
import triton
import triton.language as tl


'''


def _source_file(src_dir: pathlib.Path, relative: pathlib.Path) -> pathlib.Path | None:
    """``relative`` under ``src_dir`` (the folder holding ``vllm/``, or ``vllm/`` itself)."""
    for candidate in (src_dir / relative, src_dir / relative.relative_to("vllm")):
        if candidate.is_file():
            return candidate
    return None


def router_source_path(src_dir: str | pathlib.Path) -> pathlib.Path:
    """``base_router.py`` under ``src_dir``."""
    path = _source_file(pathlib.Path(src_dir), ROUTER)
    if path is None:
        raise FileNotFoundError(f"no {ROUTER} under {src_dir}")
    return path


def _functions(source: str, names: tuple[str, ...], where: str) -> list[str]:
    """The named top-level-or-nested functions, verbatim (decorators included), dedented, in ``names`` order."""
    lines = source.splitlines(keepends=True)
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found[node.name] = textwrap.dedent("".join(lines[first - 1 : node.end_lineno]))
    missing = set(names) - found.keys()
    if missing:
        raise LookupError(f"{', '.join(sorted(missing))} not found in {where}")
    return [found[name] for name in names]


def router_imports_helper(router_py: str) -> bool:
    """Whether ``base_router.py`` imports the shared helper (vLLM >= 0.34.0)."""
    return any(
        isinstance(node, ast.ImportFrom) and any(alias.name == HELPER for alias in node.names)
        for node in ast.walk(ast.parse(router_py))
    )


def extract_router_kernel_source(router_py: str, helper_py: str | None = None) -> str:
    """The helper (where the router imports it), the kernel and its launcher, verbatim, dedented."""
    parts = []
    if router_imports_helper(router_py):
        if helper_py is None:
            raise LookupError(f"base_router.py calls {HELPER} from {HELPER_FILE.name}, which was not given")
        parts += _functions(helper_py, (HELPER,), HELPER_FILE.name)
    parts += _functions(router_py, (KERNEL, LAUNCHER), "base_router.py")
    return "\n\n".join(parts)


def read_router_kernel_source(src_dir: str | pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    """The copied source from a folder of vLLM sources, and the files it came from."""
    router = router_source_path(src_dir)
    router_py = router.read_text()
    files, helper_py = [router], None
    if router_imports_helper(router_py):
        helper = _source_file(pathlib.Path(src_dir), HELPER_FILE)
        if helper is None:
            raise FileNotFoundError(f"base_router.py imports {HELPER}, but there is no {HELPER_FILE} under {src_dir}")
        files.append(helper)
        helper_py = helper.read_text()
    return extract_router_kernel_source(router_py, helper_py), files


def source_release(body: str) -> tuple[str, str | None]:
    """sha256 of the copied source and the vLLM release it matches (None: unknown)."""
    sha = hashlib.sha256(body.encode()).hexdigest()
    return sha, KNOWN_RELEASES.get(sha)


def load_vllm_router_kernel(src_dir: str | pathlib.Path, workdir: str | pathlib.Path | None = None) -> ModuleType:
    """Import vLLM's router kernel from a folder of vLLM sources.

    Returns a module with ``_eplb_map_and_record_i32_kernel``,
    ``_eplb_map_and_record_triton(topk_ids, logical_to_physical_map,
    logical_replica_count, expert_load_view, record_enabled,
    num_unpadded_tokens)`` (vLLM's launcher: it returns the physical ids and
    adds to ``expert_load_view``), ``source_sha256`` and ``release`` ("0.33.0",
    "0.34.0" or None). Needs Triton; vLLM itself is never imported.
    """
    body, files = read_router_kernel_source(src_dir)
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="vllm_router_kernel_"))
    module_file = workdir / "vllm_router_kernel.py"
    paths = " and ".join(str(rel) for rel in (ROUTER, HELPER_FILE)[: len(files)])
    module_file.write_text(_HEADER.format(paths=paths) + body)
    spec = importlib.util.spec_from_file_location(f"vllm_router_kernel_{abs(hash(body))}", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.source_sha256, module.release = source_release(body)
    return module
