"""Run-time compiled CUDA kernels: NVRTC through torch, launches through the driver.

Generic: nothing here knows what the kernels compute. ``compile_functions``
builds a CUDA source once per (device, source) with
``torch.cuda._compile_kernel`` (torch 2.11 to 2.14) and returns its
``CUfunction`` handles; ``launch`` calls ``cuLaunchKernel`` through ctypes on
the current stream, which CUDA graphs capture like any other launch. A
CPU-only machine never touches NVRTC or libcuda: both load on first use.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

MAX_PARAMS = 32  # parameter slots per launch; each holds one 4- or 8-byte value


@functools.cache
def _driver():
    """cuLaunchKernel, cuModuleGetFunction and cuFuncSetAttribute from libcuda."""
    # PyDLL keeps the GIL through the call, so no other thread can rewrite the
    # thread's parameter buffer mid-launch (and no GIL round trip per launch).
    lib = ctypes.PyDLL("libcuda.so.1")
    # No argtypes on the launch: converting 11 arguments through them costs
    # about a microsecond per call. launch() passes the two handles as
    # c_void_p, the seven sizes as Python ints (C int: all below 2^31, and an
    # int is passed like an unsigned int), the parameter array and NULL.
    launch = lib["cuLaunchKernel"]
    launch.restype = ctypes.c_int
    get_function = lib.cuModuleGetFunction
    get_function.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
    get_function.restype = ctypes.c_int
    set_attribute = lib.cuFuncSetAttribute
    set_attribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    set_attribute.restype = ctypes.c_int
    return launch, get_function, set_attribute


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")


_modules: dict[tuple[int, str], dict[str, int]] = {}
_modules_lock = threading.Lock()


def compile_functions(device_index: int, source: str, names: tuple[str, ...]) -> dict[str, int]:
    """``CUfunction`` handles of ``names`` in ``source``, compiled once per device.

    Raises RuntimeError if NVRTC or the driver fails; the caller decides
    whether to remember that (this module keeps no failure state).
    """
    key = (device_index, source)
    found = _modules.get(key)
    if found is not None:
        return found
    with _modules_lock:
        found = _modules.get(key)
        if found is None:
            try:
                found = _compile(device_index, source, names)
            except Exception as error:  # noqa: BLE001 - NVRTC, driver and import errors alike
                raise RuntimeError(f"compiling CUDA kernels with NVRTC failed: {error}") from error
            _modules[key] = found
    return found


def _compile(device_index: int, source: str, names: tuple[str, ...]) -> dict[str, int]:
    _, get_function, _ = _driver()
    with torch.cuda.device(device_index):
        # Keywords only: the positional parameters differ between torch releases.
        kernel = torch.cuda._compile_kernel(kernel_source=source, kernel_name=names[0], nvcc_options=["-std=c++17"])
        functions = {names[0]: kernel.func.value}
        for name in names[1:]:
            handle = ctypes.c_void_p()
            _check(get_function(ctypes.byref(handle), kernel.module, name.encode()), f"cuModuleGetFunction({name})")
            functions[name] = handle.value
    _owners.append(kernel)  # the module is never unloaded; keep its owner alive
    return functions


_owners: list = []


@functools.cache
def device_limits(device_index: int) -> tuple[int, int]:
    """(SM count, dynamic shared memory a block may opt in to), in bytes."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 48 * 1024)


_shared_opted_in: dict[int, int] = {}


def allow_dynamic_shared_memory(function: int, nbytes: int) -> None:
    """A block gets more than 48 KB of dynamic shared memory only once its function opts in."""
    if nbytes <= 48 * 1024 or _shared_opted_in.get(function, 0) >= nbytes:
        return
    max_dynamic_shared_size_bytes = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    _check(_driver()[2](function, max_dynamic_shared_size_bytes, nbytes), "cuFuncSetAttribute")
    _shared_opted_in[function] = nbytes


_per_thread = threading.local()


def _thread_launcher():
    """Per thread, built once: the parameter slots, the pointer array cuLaunchKernel
    reads them through, and the raw entry points a launch needs (looked up here,
    not at import: CPU-only torch builds lack them)."""
    values = (ctypes.c_uint64 * MAX_PARAMS)()
    base = ctypes.addressof(values)
    pointers = (ctypes.c_void_p * MAX_PARAMS)(*range(base, base + 8 * MAX_PARAMS, 8))
    # torch._C._cuda_getDevice is torch.cuda.current_device() without its Python wrapper.
    launcher = (values, pointers, _driver()[0], torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream,
                ctypes.c_void_p)
    _per_thread.value = launcher
    return launcher


def launch(device_index: int, function: int, blocks: int, threads: int, shared_bytes: int, params: list) -> None:
    """``function<<<blocks, threads, shared_bytes, current stream>>>(*params)``.

    Each parameter is an int (a pointer, or a 4- or 8-byte scalar); the driver
    reads as many bytes of each slot as the kernel's signature says
    (little-endian, so a 4-byte int is the slot's low half).
    """
    try:
        values, pointers, cu_launch, get_device, raw_stream, pointer = _per_thread.value
    except AttributeError:
        values, pointers, cu_launch, get_device, raw_stream, pointer = _thread_launcher()
    if device_index != get_device():
        # The function and the stream belong to the tensors' device context.
        with torch.cuda.device(device_index):
            launch(device_index, function, blocks, threads, shared_bytes, params)
        return
    values[: len(params)] = params
    result = cu_launch(pointer(function), blocks, 1, 1, threads, 1, 1, shared_bytes, pointer(raw_stream(device_index)),
                       pointers, None)
    if result:
        _check(result, "cuLaunchKernel")
