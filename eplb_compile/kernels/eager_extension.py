"""The C++ eager launcher (``eager_launch.cpp``): built in the background, used once ready.

The first eager CUDA call starts a build with ``torch.utils.cpp_extension.load``
on a background thread (a C++ compiler, Python's headers and ninja: what
Triton's launcher and vLLM's install already need; about 20 s of one core,
once per machine and torch version, cached by torch under
``TORCH_EXTENSIONS_DIR``). Until it is ready, and wherever it cannot be built
(one warning), every call takes the Python path: the same kernels and
results, more host time. ``EPLB_COMPILE_EAGER_LAUNCHER=0`` keeps it off.

The chooser registers each (device, id dtype, k) launch table here as it
compiles the kernels, so the C++ side never decides which kernel a card runs:
it reads the rows the plan resolved to.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import warnings
from importlib import resources
from types import ModuleType

import torch

ENV = "EPLB_COMPILE_EAGER_LAUNCHER"


def not_ready(*_args) -> None:
    """The stand-in for each C++ function until it is built: takes no call."""
    return None


class _Launcher:
    """What the operators call: the C++ functions once built, stand-ins that take nothing before."""

    map_ids = staticmethod(not_ready)
    record_counts = staticmethod(not_ready)


LAUNCHER = _Launcher()
_module: ModuleType | None = None
_failure: Exception | None = None
_thread: threading.Thread | None = None
_lock = threading.Lock()
_registered: set[tuple] = set()


def failure() -> Exception | None:
    """Why the launcher could not be built in this process, or None."""
    return _failure


def build() -> ModuleType:
    """Compile (or load from torch's extension cache) and import the module; raises on failure.

    What the background build runs; on its own it needs no GPU (the CPU tests
    check the source compiles against the running torch).
    """
    from torch.utils import cpp_extension

    source = resources.files("eplb_compile.kernels").joinpath("eager_launch.cpp")
    text = source.read_text()
    # The name carries the source and torch's build: a cached module built
    # against another torch is never loaded.
    tag = hashlib.sha256(f"{text}\0{torch.__version__}\0{torch.version.git_version}".encode()).hexdigest()[:12]
    with resources.as_file(source) as path:
        return cpp_extension.load(name=f"eplb_compile_eager_{tag}", sources=[str(path)], extra_cflags=["-O2"],
                                  verbose=False)


def _build_and_install() -> None:
    global _module, _failure
    try:
        module = build()
        module.set_launcher(ctypes.cast(ctypes.PyDLL("libcuda.so.1").cuLaunchKernel, ctypes.c_void_p).value)
    except Exception as error:  # noqa: BLE001 - compiler, import and driver errors alike
        _failure = error
        warnings.warn(f"eplb_compile: the C++ eager launcher could not be built, using the Python path: {error}",
                      stacklevel=2)
        return
    _module = module
    LAUNCHER.map_ids, LAUNCHER.record_counts = module.map_ids, module.record_counts


def start() -> None:
    """Start the background build, once per process (a no-op when disabled or started)."""
    global _thread
    if _thread is not None or os.environ.get(ENV, "1") == "0":
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_build_and_install, name="eplb_compile eager launcher build",
                                       daemon=True)
            _thread.start()


def wait() -> ModuleType | None:
    """Start the build if needed and wait for it: the module, or None (disabled or failed)."""
    start()
    if _thread is not None:
        _thread.join()
    return _module


def registered(key: tuple) -> bool:
    return key in _registered


def register_topk(key: tuple, rows: list[tuple[int, int, int, int, int, bool]], shared_limit: int) -> None:
    """Hand the C++ side one (device, id dtype, k, records) table; a no-op until it is built."""
    if _module is None:
        return
    device, dtype, k, records = key
    _module.register_table(device, _SCALAR_TYPES[dtype], k, records, rows, shared_limit)
    _registered.add(key)


def register_count_function(device: int, function: int) -> None:
    if _module is None or ("counts", device) in _registered:
        return
    _module.register_count_function(device, function)
    _registered.add(("counts", device))


def clear() -> None:
    """Forget the registered tables (after the plans changed): the next Python-path call registers again."""
    if _module is not None:
        _module.clear()
    _registered.clear()


_SCALAR_TYPES = {torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}  # c10::ScalarType: Char, Short, Int, Long
