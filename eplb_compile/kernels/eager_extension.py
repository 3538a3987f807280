"""The C++ eager launcher (``eager_launch.cpp``): its build, its launch tables, and whether it is on.

The operators' CUDA implementation (``ops/_library.py``) first offers each
eager call to the launcher, which runs it in one C++ call when it has a launch
table for the call's (device, id dtype, k) and the call is within its limits;
otherwise it takes nothing and the Python path runs the call. The Python path
then calls ``learn(call)`` / ``learn_counts(device)``, and this module, which
owns the launcher, builds that shape's table from the card's plan: the plan's
rows with their NVRTC kernel handles (0 for a Triton row). The C++ side never
decides which kernel a card runs.

The first eager CUDA call starts a build with ``torch.utils.cpp_extension.load``
on a background thread (a C++ compiler, Python's headers and ninja: what
Triton's launcher and vLLM's install already need; about 20 s of one core,
once per machine and torch version, cached by torch under
``TORCH_EXTENSIONS_DIR``). Until it is ready, and wherever it cannot be built
(one warning), every call takes the Python path: the same kernels and
results, more host time. ``EPLB_COMPILE_EAGER_LAUNCHER=0`` (or off, false,
no) keeps it off.

Every constant the C++ side shares with Python (each kernel parameter's slot,
the count kernel's block size, the id capacities of int8 and int16, the
shared memory a histogram bin takes) is passed as a ``-D`` macro at build
time from the Python definitions: there is one source of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
import threading
import warnings
from importlib import resources
from types import ModuleType

import torch

from eplb_compile.kernels import call as call_module
from eplb_compile.kernels import cuda_variants

ENV = "EPLB_COMPILE_EAGER_LAUNCHER"
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def enabled() -> bool:
    """Whether ``EPLB_COMPILE_EAGER_LAUNCHER`` leaves the launcher on (unset: on).

    Raises ValueError (one line, naming the variable) for any other spelling.
    """
    value = os.environ.get(ENV)
    if value is None:
        return True
    word = value.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise ValueError(f"{ENV} must be one of {'/'.join(_ON)} (on) or {'/'.join(_OFF)} (off), got {value!r}")


def build_macros() -> dict[str, int]:
    """The constants the C++ source is compiled with, from their Python owners."""
    macros = {f"EPLB_SLOT_{name.upper()}": i for i, name in enumerate(call_module.TOPK_PARAMS)}
    macros["EPLB_TOPK_PARAM_COUNT"] = len(call_module.TOPK_PARAMS)
    macros.update({f"EPLB_COUNT_SLOT_{name.upper()}": i for i, name in enumerate(cuda_variants.COUNT_PARAMS)})
    macros["EPLB_COUNT_PARAM_COUNT"] = len(cuda_variants.COUNT_PARAMS)
    macros["EPLB_COUNT_THREADS"] = cuda_variants.COUNT_THREADS
    macros["EPLB_HIST_BYTES_PER_EXPERT"] = cuda_variants.HIST_BYTES_PER_EXPERT
    from eplb_compile.ops import _validation  # here: the ops package imports this module

    macros["EPLB_INT8_ID_CAPACITY"] = _validation._ID_CAPACITY[torch.int8]
    macros["EPLB_INT16_ID_CAPACITY"] = _validation._ID_CAPACITY[torch.int16]
    return macros


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
_tables: set[tuple] = set()  # the (device, id dtype, k, records) tables and ("counts", device) handed over


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
    flags = [f"-D{name}={value}" for name, value in sorted(build_macros().items())]
    # The name carries the source, the constants and torch's build: a cached
    # module built against another torch or other constants is never loaded.
    fingerprint = "\0".join([text, *flags, torch.__version__, str(torch.version.git_version), sys.version])
    name = f"eplb_compile_eager_{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
    # TORCH_EXTENSIONS_DIR as torch reads it (cpp_extension.py:2813 in 2.14); a folder of our own.
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    with _one_build_at_a_time(folder), resources.as_file(source) as path:
        _remove_stale_lock(os.path.join(folder, "lock"))
        return cpp_extension.load(name=name, sources=[str(path)], extra_cflags=["-O2", *flags],
                                  build_directory=folder, verbose=False)


@contextlib.contextmanager
def _one_build_at_a_time(folder: str):
    """An OS file lock around the build (vLLM starts one process per GPU, and each builds):
    the kernel releases it when a process dies, so a killed build never blocks the next."""
    import fcntl

    with open(folder + ".eplb_compile.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_stale_lock(lock: str) -> None:
    """Where torch guards a build with ``FileBaton`` (torch 2.11: ``torch/utils/file_baton.py``,
    whose ``wait`` polls for as long as the file ``lock`` exists), a build killed mid-way
    leaves the file and every later build waits for ever. Called holding
    ``_one_build_at_a_time``, so no build of ours is running here: the file is stale.
    torch 2.14 takes an OS file lock instead, whose file stays after every build, harmlessly."""
    from torch.utils import cpp_extension

    if "FileBaton" not in vars(cpp_extension) or not os.path.exists(lock):
        return
    warnings.warn(f"eplb_compile: removing {lock}, left by a build that did not finish", stacklevel=2)
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock)


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
    if _thread is not None or not enabled():
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_build_and_install, name="eplb_compile eager launcher build",
                                       daemon=True)
            _thread.start()


def wait(timeout_s: float | None = 300.0) -> ModuleType | None:
    """Start the build if needed and wait for it, at most ``timeout_s`` (None: for ever):
    the module, or None (disabled, failed, or not built in time: ``state()`` says which)."""
    start()
    if _thread is not None:
        _thread.join(timeout_s)
    return _module


def built() -> ModuleType | None:
    """The built module, or None (not yet, off, or failed); never waits."""
    return _module


def state() -> str:
    """Why the launcher takes no call at all right now, or "" once it is built."""
    if _module is not None:
        return ""
    if not enabled():
        return f"the C++ launcher is off ({ENV}={os.environ[ENV]})"
    if _failure is not None:
        return f"the C++ launcher could not be built: {_failure}"
    if _thread is None:
        return "the C++ launcher's build has not started (the first eager CUDA call starts it)"
    return "the C++ launcher is still being built in the background"


def has_table(call: call_module.KernelCall) -> bool:
    ids = call.ids
    return (ids.get_device(), ids.dtype, ids.shape[1], call.records) in _tables


def learn(call: call_module.KernelCall) -> None:
    """Hand the launcher the table for this call's (device, id dtype, k, records),
    built from the card's plan; starts the build on first use, a no-op until it is built."""
    if _module is None:
        start()
        return
    from eplb_compile.kernels import chooser, nvrtc  # Triton: imported only where CUDA calls run

    ids = call.ids
    device = ids.get_device()
    key = (device, ids.dtype, ids.shape[1], call.records)
    if key in _tables or chooser.cuda_failure() is not None:
        return
    try:
        functions = cuda_variants.compiled_functions(call)
    except RuntimeError:
        return  # the chooser latches and warns on its own call
    sm_count, shared_limit = nvrtc.device_limits(device)
    plan_rows = chooser.plan_for_index(device).topk_plan if call.records else ((0, "direct"),)
    rows = []
    for min_numel, name in plan_rows:
        variant = cuda_variants.VARIANTS.get(name)
        if variant is None:  # a Triton row: the Python path runs it
            rows.append((min_numel, 0, 0, 0, 0, False))
            continue
        function = functions[variant.kernel]
        if variant.histogram:
            nvrtc.allow_dynamic_shared_memory(function, shared_limit)
        max_blocks = 0 if variant.blocks_per_sm is None else max(1, int(sm_count * variant.blocks_per_sm))
        rows.append((min_numel, function, variant.threads, variant.elements_per_thread, max_blocks,
                     variant.histogram))
    _module.register_table(device, _SCALAR_TYPES[ids.dtype], ids.shape[1], call.records, rows, shared_limit)
    _tables.add(key)


def learn_counts(device: int) -> None:
    """Hand the launcher this device's count kernel (as ``learn`` does the topk tables)."""
    if _module is None:
        start()
        return
    if ("counts", device) in _tables:
        return
    from eplb_compile.kernels import chooser

    if chooser.cuda_failure() is not None:
        return
    try:
        function = cuda_variants.count_function(device)
    except RuntimeError:
        return
    _module.register_count_function(device, function)
    _tables.add(("counts", device))


def has_count_function(device: int) -> bool:
    return ("counts", device) in _tables


def clear() -> None:
    """Forget the tables (after the plans changed): the next Python-path call of each shape hands one over again."""
    if _module is not None:
        _module.clear()
    _tables.clear()


_SCALAR_TYPES = {torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4}  # c10::ScalarType: Char, Short, Int, Long
