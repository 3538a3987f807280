"""The vLLM router-kernel loader: what it copies out of 0.33.0- and 0.34.0-style sources.

Extraction is plain Python (no Triton, no GPU). Where vLLM is installed (CI
installs 0.33.0, then 0.34.0 over it), its own ``base_router.py`` and
``eplb_triton.py`` are read from disk, never imported, and the copied source's
sha256 must name the installed release.
"""

import importlib.metadata
import importlib.util
import pathlib
import textwrap

import pytest

from eplb_compile import _vllm_kernel_loader as loader

# base_router.py as 0.33.0 lays it out: kernel and launcher under a platform test.
ROUTER_033 = textwrap.dedent('''
    from vllm.triton_utils import tl, triton
    if current_platform.is_cuda_alike():

        @triton.jit
        def _eplb_map_and_record_i32_kernel(ids_ptr, out_ptr, n, BLOCK_SIZE: tl.constexpr):
            offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            tl.store(out_ptr + offs, tl.load(ids_ptr + offs, mask=offs < n), mask=offs < n)

        def _eplb_map_and_record_triton(ids):
            return ids

        def unrelated():
            pass
''')
# 0.34.0: the kernel calls a shared helper imported from eplb_triton.py.
ROUTER_034 = ROUTER_033.replace(
    "from vllm.triton_utils import tl, triton",
    "from vllm.model_executor.layers.fused_moe.eplb_triton import eplb_map_and_record\n"
    "from vllm.triton_utils import tl, triton",
).replace("tl.load(ids_ptr + offs, mask=offs < n)", "eplb_map_and_record(ids_ptr, offs, n)")
HELPER_034 = textwrap.dedent('''
    from vllm.triton_utils import tl, triton


    @triton.jit
    def eplb_map_and_record(ids_ptr, offs, n):
        return tl.load(ids_ptr + offs, mask=offs < n)
''')


def _write(root: pathlib.Path, router: str, helper: str | None) -> pathlib.Path:
    (root / loader.ROUTER).parent.mkdir(parents=True)
    (root / loader.ROUTER).write_text(router)
    if helper is not None:
        (root / loader.HELPER_FILE).write_text(helper)
    return root


def test_033_layout_copies_kernel_and_launcher_only():
    body = loader.extract_router_kernel_source(ROUTER_033)
    assert not loader.router_imports_helper(ROUTER_033)
    assert body.startswith("@triton.jit\ndef _eplb_map_and_record_i32_kernel(")  # dedented, decorator kept
    assert "def _eplb_map_and_record_triton(ids):" in body and "unrelated" not in body


def test_034_layout_copies_the_shared_helper_first():
    assert loader.router_imports_helper(ROUTER_034)
    with pytest.raises(LookupError, match="eplb_map_and_record from eplb_triton.py"):
        loader.extract_router_kernel_source(ROUTER_034)  # without the helper the kernel would be a NameError
    body = loader.extract_router_kernel_source(ROUTER_034, HELPER_034)
    helper_at, kernel_at = body.index("def eplb_map_and_record("), body.index("def _eplb_map_and_record_i32_kernel(")
    assert helper_at < kernel_at and "_eplb_map_and_record_triton" in body


def test_reads_the_helper_file_from_a_source_folder(tmp_path):
    body, files = loader.read_router_kernel_source(_write(tmp_path, ROUTER_034, HELPER_034))
    assert [f.name for f in files] == ["base_router.py", "eplb_triton.py"]
    assert body == loader.extract_router_kernel_source(ROUTER_034, HELPER_034)
    assert loader.source_release(body)[1] is None  # not a real release


def test_missing_helper_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="imports eplb_map_and_record, but there is no"):
        loader.read_router_kernel_source(_write(tmp_path, ROUTER_034, None))
    with pytest.raises(FileNotFoundError, match="no vllm/model_executor"):
        loader.router_source_path(tmp_path / "nowhere")


def test_known_releases_are_two_distinct_hashes():
    assert sorted(loader.KNOWN_RELEASES.values()) == ["0.33.0", "0.34.0"]
    assert all(len(sha) == 64 for sha in loader.KNOWN_RELEASES)


def _installed_vllm_root() -> pathlib.Path:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def test_installed_vllm_source_is_the_installed_release():
    root = _installed_vllm_root()
    version = importlib.metadata.version("vllm")
    if version not in ("0.33.0", "0.34.0"):
        pytest.skip(f"vLLM {version} has no recorded hash")
    body, files = loader.read_router_kernel_source(root)
    sha, release = loader.source_release(body)
    assert release == version, f"copied source sha256 {sha} does not match vLLM {version}"
    assert len(files) == (2 if version == "0.34.0" else 1)


def test_installed_vllm_kernel_loads_with_triton(tmp_path):
    pytest.importorskip("triton")
    root = _installed_vllm_root()
    module = loader.load_vllm_router_kernel(root, workdir=tmp_path)
    assert callable(module._eplb_map_and_record_triton)
    assert module.release == importlib.metadata.version("vllm") or module.release is None
    if loader.router_imports_helper(loader.router_source_path(root).read_text()):
        assert hasattr(module, loader.HELPER)  # the kernel's global, resolved at compile time
