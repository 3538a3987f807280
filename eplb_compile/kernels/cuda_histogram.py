"""CUDA kernels for the topk path, compiled at run time through NVRTC.

Recording costs vLLM's kernel one global atomic per (token, k) pair, and with
Zipf-skewed routing thousands of them queue on a few hot addresses: at 32768
tokens per rank that is 56 of its 59 us (DESIGN §4). Triton exposes no
shared-memory atomics, so the fast variant is a small CUDA kernel:

- ``smem``: each block maps a slice of ``topk_ids`` and counts into a private
  histogram in shared memory; at the end it adds its non-zero bins to the load
  with one ``red.global.add`` each. The grid is capped near the SM count, so a
  hot expert sees about one global atomic per SM instead of one per token.
  The replica-count table (as exact dividers) and the first map columns are
  staged in shared memory while the block's ids are in flight, which takes
  two dependent L2 round trips off every element. Variants differ in block
  size, grid cap and staged map columns; the dispatcher picks by shape.
- ``hist``: the same block-private histogram with no staging: each element
  reads its tables from global memory (L1/L2-resident) as ``direct`` does, so
  the set-up is only zeroing the bins. Variants differ in block size, ids per
  thread and grid cap.
- ``direct``: one thread per element and one relaxed ``red.global.add`` per
  recorded element, no shared memory: no set-up cost, for small T.

Both are bit-identical to vLLM 0.33.0 (DESIGN §2.1), including our one
deviation (a replica index past the map's slots maps to -1, never read).

The kernels are compiled lazily (``torch.cuda._compile_kernel``, present in
torch 2.11 to 2.14) once per (device, id dtype, k), so importing this module
stays cheap and CPU-only machines never touch NVRTC. They are launched with
``cuLaunchKernel`` through ctypes, which is captured by CUDA graphs like any
launch on the current stream.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass

import torch

from eplb_compile.kernels.triton_kernels import launch_map

# ---------------------------------------------------------------------------
# Kernel source. The prelude holds the CUDA-specific pieces (types, shared
# memory, atomics); the body is plain CUDA C++, which during development was
# also run on the CPU through a thread-per-CUDA-thread emulation of the prelude.
# ---------------------------------------------------------------------------

KERNEL_PRELUDE = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
#define EPLB_DEVICE __device__ __forceinline__
#define EPLB_SHARED_BUFFER(name) extern __shared__ __align__(16) unsigned char name[]
#define EPLB_SYNC() __syncthreads()
#define EPLB_CONSTANT __constant__
// Unused results: ptxas emits ATOMS / REDG (fire-and-forget, relaxed).
EPLB_DEVICE void count_shared(int* bin) { atomicAdd(bin, 1); }
EPLB_DEVICE void add_global(int* dst, int value) { atomicAdd(dst, value); }
EPLB_DEVICE u64 mul_hi_u64(u64 a, u64 b) { return __umul64hi(a, b); }
"""

KERNEL_BODY = r"""
// Configured by the host: ID_T (the ids' C type), K (top-k), EPT (elements
// per thread per chunk of the smem kernel), STAGE_UNROLL (table loads in
// flight per thread while staging).
#define KNUTH_MULTIPLIER 2654435769u

// Exact n % max(count, 1) for every 32-bit n. Lemire's fastmod: with
// magic = ceil(2^64 / d), n % d == mulhi64(magic * n, d) for 32-bit n and d
// (d == 1 wraps magic to 0, giving 0 as it should). A count of 2^32 or more
// leaves every 32-bit hash unchanged: d == 0 flags that.
struct ReplicaDivider {
    u64 magic;
    u32 d;
    u32 unused;
};

EPLB_DEVICE i64 replica_count_at(const void* rc, int rc_is_int64, i64 rc_stride, int e) {
    return rc_is_int64 ? ((const i64*)rc)[e * rc_stride] : (i64)((const int*)rc)[e * rc_stride];
}

// ceil(2^64 / d) for d <= SMALL_DIVIDERS (0 for d < 2): EPLB's replica counts
// are small, so staging reads a table instead of running a 64-bit division.
#define SMALL_DIVIDERS 64
EPLB_CONSTANT u64 kSmallDividerMagic[SMALL_DIVIDERS + 1] = {@SMALL_DIVIDER_MAGIC@};

EPLB_DEVICE ReplicaDivider make_divider(i64 count) {
    ReplicaDivider r;
    count = count < 1 ? 1 : count;
    r.d = count > 0xFFFFFFFFll ? 0u : (u32)count;
    r.magic = r.d <= SMALL_DIVIDERS ? kSmallDividerMagic[r.d] : (~0ull / r.d) + 1ull;
    r.unused = 0u;
    return r;
}

EPLB_DEVICE u32 replica_of(u32 hash, ReplicaDivider div) {
    return div.d == 0u ? hash : (u32)mul_hi_u64(div.magic * (u64)hash, (u64)div.d);
}

// vLLM records flat index i only if i < num_unpadded * k, an int32 product.
EPLB_DEVICE u32 record_limit(const int* num_unpadded, u32 numel) {
    if (num_unpadded == 0) return numel;
    const int limit = (int)((u32)(*num_unpadded) * (u32)K);
    if (limit <= 0) return 0u;
    return (u32)limit < numel ? (u32)limit : numel;
}

#define EPLB_KERNEL_PARAMS                                                     \
    const ID_T* __restrict__ ids, ID_T* __restrict__ out,                      \
    const void* __restrict__ rc, int rc_is_int64, i64 rc_stride,               \
    const i64* __restrict__ l2p, i64 l2p_stride_e, i64 l2p_stride_s,           \
    int num_logical, i64 slots,                                                \
    int* __restrict__ load, int num_physical,                                  \
    const unsigned char* __restrict__ record_enabled,                          \
    const int* __restrict__ num_unpadded, u32 numel

// One element per thread, one relaxed global reduction per recorded element.
extern "C" __global__ void __launch_bounds__(1024) eplb_map_record_direct(EPLB_KERNEL_PARAMS) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= numel) return;
    // A null gate is map_only: nothing is read from it and nothing recorded.
    const bool record = record_enabled != nullptr && *record_enabled != 0;
    const u32 limit = record_limit(num_unpadded, numel);
    const int e = (int)ids[i];  // vLLM reads the ids as int32
    i64 physical = -1;
    if ((u32)e < (u32)num_logical) {
        i64 count = replica_count_at(rc, rc_is_int64, rc_stride, e);
        count = count < 1 ? 1 : count;
        const u32 hash = (i / K) * KNUTH_MULTIPLIER;
        const u32 replica = count > 0xFFFFFFFFll ? hash : hash % (u32)count;
        if ((i64)replica < slots) physical = l2p[e * l2p_stride_e + replica * l2p_stride_s];
    }
    out[i] = (ID_T)physical;
    if (record && i < limit && physical >= 0 && physical < num_physical) add_global(load + physical, 1);
}

// Block-private histogram in shared memory. Layout of the dynamic buffer:
// ReplicaDivider[num_logical] | i64 map_cache[num_logical * MAP_CACHE] | int hist[num_physical].
// The grid strides over chunks of blockDim.x * EPT elements.
template <int MAP_CACHE>
EPLB_DEVICE void map_record_smem(EPLB_KERNEL_PARAMS) {
    EPLB_SHARED_BUFFER(smem);
    ReplicaDivider* divs = (ReplicaDivider*)smem;
    i64* map_cache = (i64*)(divs + num_logical);
    int* hist = (int*)(map_cache + num_logical * MAP_CACHE);

    const u32 tid = threadIdx.x;
    const u32 nthreads = blockDim.x;
    const u32 chunk = nthreads * EPT;
    const u32 grid_stride = gridDim.x * chunk;
    u32 base = blockIdx.x * chunk;

    // Put this block's first ids in flight before staging the tables, so the
    // two memory latencies overlap instead of adding up.
    ID_T v[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
        const u32 i = base + j * nthreads + tid;
        v[j] = i < numel ? ids[i] : (ID_T)0;
    }
    const bool record = *record_enabled != 0;
    const u32 limit = record_limit(num_unpadded, numel);

    // Stage the replica counts (as dividers) and the first MAP_CACHE map
    // columns: one index space, each thread's loads all issued before any is
    // used, so staging costs about one L2 round trip, not one per item.
    const int n_stage = num_logical * (1 + MAP_CACHE);
    for (int q0 = tid; q0 < n_stage; q0 += nthreads * STAGE_UNROLL) {
        i64 staged[STAGE_UNROLL];
#pragma unroll
        for (int u = 0; u < STAGE_UNROLL; ++u) {
            const int q = q0 + u * nthreads;
            if (q < num_logical) {
                staged[u] = replica_count_at(rc, rc_is_int64, rc_stride, q);
            } else if (q < n_stage) {
                const int e = (q - num_logical) / (MAP_CACHE > 0 ? MAP_CACHE : 1);
                const int s = q - num_logical - e * MAP_CACHE;
                staged[u] = s < slots ? l2p[e * l2p_stride_e + s * l2p_stride_s] : -1;
            }
        }
#pragma unroll
        for (int u = 0; u < STAGE_UNROLL; ++u) {
            const int q = q0 + u * nthreads;
            if (q < num_logical) divs[q] = make_divider(staged[u]);
            else if (q < n_stage) map_cache[q - num_logical] = staged[u];
        }
    }
    if (record)
        for (int b = tid; b < num_physical; b += nthreads) hist[b] = 0;
    EPLB_SYNC();

    for (;;) {
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
            const u32 i = base + j * nthreads + tid;
            if (i < numel) {
                const int e = (int)v[j];  // vLLM reads the ids as int32
                i64 physical = -1;
                if ((u32)e < (u32)num_logical) {
                    const u32 replica = replica_of((i / K) * KNUTH_MULTIPLIER, divs[e]);
                    if ((i64)replica < slots)
                        physical = MAP_CACHE > 0 && replica < (u32)MAP_CACHE
                                       ? map_cache[e * MAP_CACHE + replica]
                                       : l2p[e * l2p_stride_e + replica * l2p_stride_s];
                }
                out[i] = (ID_T)physical;
                if (record && i < limit && physical >= 0 && physical < num_physical)
                    count_shared(hist + physical);
            }
        }
        base += grid_stride;  // base < numel < 2^31 and grid_stride < 2^31: no wrap
        if (base >= numel) break;
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
            const u32 i = base + j * nthreads + tid;
            v[j] = i < numel ? ids[i] : (ID_T)0;
        }
    }

    if (record) {  // block-uniform: every thread reads the same gate
        EPLB_SYNC();
        for (int b = tid; b < num_physical; b += nthreads) {
            const int c = hist[b];
            if (c != 0) add_global(load + b, c);
        }
    }
}

// Block-private histogram with no staging: each element reads its replica
// count and map entry from global memory (small tables, L1/L2-resident) as the
// direct kernel does; only the recording goes through shared memory. Set-up is
// zeroing num_physical bins, so the fixed cost stays near the direct kernel's
// while a hot expert still sees one global atomic per block. Each thread keeps
// HIST_EPT ids in flight; the phases below (load ids, map, store and count)
// let all their table loads be in flight together.
template <int HIST_EPT>
EPLB_DEVICE void map_record_hist(EPLB_KERNEL_PARAMS) {
    EPLB_SHARED_BUFFER(smem);
    int* hist = (int*)smem;
    const u32 tid = threadIdx.x;
    const u32 nthreads = blockDim.x;
    const u32 chunk = nthreads * HIST_EPT;
    const u32 grid_stride = gridDim.x * chunk;
    const bool record = *record_enabled != 0;
    const u32 limit = record_limit(num_unpadded, numel);
    if (record)
        for (int b = tid; b < num_physical; b += nthreads) hist[b] = 0;
    EPLB_SYNC();

    // base < numel < 2^31 and grid_stride < 2^31 + chunk: base += grid_stride never wraps.
    for (u32 base = blockIdx.x * chunk; base < numel; base += grid_stride) {
        ID_T v[HIST_EPT];
#pragma unroll
        for (int j = 0; j < HIST_EPT; ++j) {
            const u32 i = base + j * nthreads + tid;
            v[j] = i < numel ? ids[i] : (ID_T)0;
        }
        // Branch-free per element (predicated loads), so the HIST_EPT count
        // loads, then the HIST_EPT map loads, are each in flight together.
        int e[HIST_EPT];
        bool valid[HIST_EPT];
        i64 count[HIST_EPT];
#pragma unroll
        for (int j = 0; j < HIST_EPT; ++j) {
            e[j] = (int)v[j];  // vLLM reads the ids as int32
            valid[j] = base + j * nthreads + tid < numel && (u32)e[j] < (u32)num_logical;
        }
        if (rc_is_int64) {  // uniform
#pragma unroll
            for (int j = 0; j < HIST_EPT; ++j) count[j] = valid[j] ? ((const i64*)rc)[e[j] * rc_stride] : 1;
        } else {
#pragma unroll
            for (int j = 0; j < HIST_EPT; ++j) count[j] = valid[j] ? (i64)((const int*)rc)[e[j] * rc_stride] : 1;
        }
        i64 physical[HIST_EPT];
#pragma unroll
        for (int j = 0; j < HIST_EPT; ++j) {
            const u32 i = base + j * nthreads + tid;
            const i64 c = count[j] < 1 ? 1 : count[j];
            const u32 hash = (i / K) * KNUTH_MULTIPLIER;
            const u32 replica = c > 0xFFFFFFFFll ? hash : hash % (u32)c;
            physical[j] = valid[j] && (i64)replica < slots ? l2p[e[j] * l2p_stride_e + replica * l2p_stride_s] : -1;
        }
#pragma unroll
        for (int j = 0; j < HIST_EPT; ++j) {
            const u32 i = base + j * nthreads + tid;
            if (i < numel) {
                out[i] = (ID_T)physical[j];
                if (record && i < limit && physical[j] >= 0 && physical[j] < num_physical)
                    count_shared(hist + physical[j]);
            }
        }
    }

    if (record) {  // block-uniform: every thread reads the same gate
        EPLB_SYNC();
        for (int b = tid; b < num_physical; b += nthreads) {
            const int c = hist[b];
            if (c != 0) add_global(load + b, c);
        }
    }
}

#define EPLB_HIST_KERNEL(N)                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) eplb_map_record_hist_e##N(EPLB_KERNEL_PARAMS) {  \
        map_record_hist<N>(ids, out, rc, rc_is_int64, rc_stride, l2p, l2p_stride_e, l2p_stride_s,        \
                           num_logical, slots, load, num_physical, record_enabled, num_unpadded, numel);  \
    }
EPLB_HIST_KERNEL(1)
EPLB_HIST_KERNEL(4)
EPLB_HIST_KERNEL(8)

#define EPLB_SMEM_KERNEL(COLUMNS)                                                                    \
    extern "C" __global__ void __launch_bounds__(1024) eplb_map_record_smem_c##COLUMNS(EPLB_KERNEL_PARAMS) { \
        map_record_smem<COLUMNS>(ids, out, rc, rc_is_int64, rc_stride, l2p, l2p_stride_e, l2p_stride_s,      \
                                 num_logical, slots, load, num_physical, record_enabled, num_unpadded, numel); \
    }
EPLB_SMEM_KERNEL(0)
EPLB_SMEM_KERNEL(8)
EPLB_SMEM_KERNEL(16)
"""

# The smem kernel is built with 0, 8 or 16 leading map columns staged per
# expert; replicas past them are read from global memory. Zipf-skewed routing
# (s = 1) gives the hottest expert about 9 of the 32 redundant slots.
MAP_CACHE_COLUMNS = (0, 8, 16)
ELEMENTS_PER_THREAD = 4  # ids in flight per thread per chunk of the smem kernel
STAGE_UNROLL = 8  # table loads in flight per thread while the smem kernel stages
DIRECT_BLOCK = 256

_ID_C_TYPES = {
    torch.int8: "signed char",
    torch.uint8: "unsigned char",
    torch.int16: "short",
    torch.int32: "int",
    torch.int64: "long long",
}

_MAX_INT32 = 2**31 - 1


def kernel_source(id_dtype: torch.dtype, k: int) -> str:
    """The full CUDA source for one (id dtype, k): what NVRTC compiles."""
    config = (
        f"#define ID_T {_ID_C_TYPES[id_dtype]}\n#define K {int(k)}\n"
        f"#define EPT {ELEMENTS_PER_THREAD}\n#define STAGE_UNROLL {STAGE_UNROLL}\n"
    )
    return KERNEL_PRELUDE + config + kernel_body()


def kernel_body() -> str:
    """KERNEL_BODY with its divider table filled in: ceil(2^64 / d), 0 below d = 2."""
    magic = ", ".join(["0ull", "0ull"] + [f"{-(-(1 << 64) // d)}ull" for d in range(2, 65)])
    return KERNEL_BODY.replace("@SMALL_DIVIDER_MAGIC@", magic)


# ---------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SmemVariant:
    """A launch shape of the shared-memory kernel."""

    threads: int
    blocks_per_sm: float  # grid cap = SMs * this: fewer blocks, fewer flush atomics
    map_columns: int  # one of MAP_CACHE_COLUMNS


# smem_c16 / smem_many / smem_small / smem_few were dropped after the first
# device run: each was slower than `smem` at every T (kernels/NOTES.md).
SMEM_VARIANTS: dict[str, SmemVariant] = {
    "smem": SmemVariant(threads=512, blocks_per_sm=1.0, map_columns=8),
    "smem_c0": SmemVariant(threads=512, blocks_per_sm=1.0, map_columns=0),
}


@dataclass(frozen=True)
class HistVariant:
    """A launch shape of the unstaged histogram kernel (``map_record_hist``)."""

    threads: int
    elements_per_thread: int  # one of HIST_ELEMENTS_PER_THREAD
    blocks_per_sm: float  # grid cap = SMs * this


HIST_ELEMENTS_PER_THREAD = (1, 4, 8)

HIST_VARIANTS: dict[str, HistVariant] = {
    "hist": HistVariant(threads=256, elements_per_thread=4, blocks_per_sm=2.0),
    "hist_wide": HistVariant(threads=512, elements_per_thread=4, blocks_per_sm=1.0),
    "hist_e1": HistVariant(threads=256, elements_per_thread=1, blocks_per_sm=2.0),
    "hist_e8": HistVariant(threads=256, elements_per_thread=8, blocks_per_sm=1.0),
}


# ---------------------------------------------------------------------------
# Compilation.
# ---------------------------------------------------------------------------


@functools.cache
def _driver():
    """cuLaunchKernel, cuModuleGetFunction and cuFuncSetAttribute from libcuda."""
    # PyDLL keeps the GIL through the call, so no other thread can rewrite the
    # thread's parameter buffer mid-launch (and no GIL round trip per launch).
    lib = ctypes.PyDLL("libcuda.so.1")
    launch = lib.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
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


_DIRECT_KERNEL = "eplb_map_record_direct"
_SMEM_KERNELS = {columns: f"eplb_map_record_smem_c{columns}" for columns in MAP_CACHE_COLUMNS}
_HIST_KERNELS = {n: f"eplb_map_record_hist_e{n}" for n in HIST_ELEMENTS_PER_THREAD}
_modules: dict[tuple, dict | Exception] = {}
_modules_lock = threading.Lock()


def compiled_functions(device_index: int, id_dtype: torch.dtype, k: int) -> dict[str, int]:
    """CUfunction handles for one (device, id dtype, k), built on first use.

    A failure is remembered and raised again, so a broken toolchain costs one
    NVRTC attempt, not one per call.
    """
    key = (device_index, id_dtype, k)
    found = _modules.get(key)
    if found is None:
        with _modules_lock:
            found = _modules.get(key)
            if found is None:
                try:
                    found = _compile(device_index, id_dtype, k)
                except Exception as error:  # noqa: BLE001 - kept and raised below
                    found = RuntimeError(f"building the EPLB CUDA kernels with NVRTC failed: {error}")
                _modules[key] = found
    if isinstance(found, Exception):
        raise found
    return found


def _compile(device_index: int, id_dtype: torch.dtype, k: int) -> dict:
    _, get_function, _ = _driver()
    with torch.cuda.device(device_index):
        # Keywords only: the positional parameters differ between torch releases.
        kernel = torch.cuda._compile_kernel(
            kernel_source=kernel_source(id_dtype, k), kernel_name=_DIRECT_KERNEL, nvcc_options=["-std=c++17"]
        )
        functions = {_DIRECT_KERNEL: kernel.func.value}
        for name in (*_SMEM_KERNELS.values(), *_HIST_KERNELS.values()):
            handle = ctypes.c_void_p()
            _check(get_function(ctypes.byref(handle), kernel.module, name.encode()), f"cuModuleGetFunction({name})")
            functions[name] = handle.value
    functions["module_owner"] = kernel  # the module is never unloaded; keep its owner alive
    return functions


@functools.cache
def _device_limits(device_index: int) -> tuple[int, int]:
    """(SM count, shared memory a block may opt in to)."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 48 * 1024)


_smem_opted_in: dict[int, int] = {}


def _opt_in_smem(function: int, nbytes: int) -> None:
    """A block gets more than 48 KB of dynamic shared memory only once its function opts in."""
    if nbytes <= 48 * 1024 or _smem_opted_in.get(function, 0) >= nbytes:
        return
    max_dynamic_shared_size_bytes = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    _check(_driver()[2](function, max_dynamic_shared_size_bytes, nbytes), "cuFuncSetAttribute")
    _smem_opted_in[function] = nbytes


# ---------------------------------------------------------------------------
# Launch.
# ---------------------------------------------------------------------------

_NUM_PARAMS = 15
_param_buffers = threading.local()


def _thread_launcher():
    """Per thread, built once: the parameter slots, the pointer array cuLaunchKernel
    reads them through, and the raw entry points a launch needs (looked up here,
    not at import: CPU-only torch builds lack them)."""
    values = (ctypes.c_uint64 * _NUM_PARAMS)()
    base = ctypes.addressof(values)
    pointers = (ctypes.c_void_p * _NUM_PARAMS)(*range(base, base + 8 * _NUM_PARAMS, 8))
    # torch._C._cuda_getDevice is torch.cuda.current_device() without its Python wrapper.
    launcher = (values, pointers, _driver()[0], torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream)
    _param_buffers.value = launcher
    return launcher


def _launch(device_index: int, function: int, grid: int, threads: int, smem: int, params: list) -> None:
    try:
        values, pointers, launch, get_device, raw_stream = _param_buffers.value
    except AttributeError:
        values, pointers, launch, get_device, raw_stream = _thread_launcher()
    if device_index != get_device():
        # The function and the stream belong to the tensors' device context.
        with torch.cuda.device(device_index):
            _launch(device_index, function, grid, threads, smem, params)
        return
    # The driver reads each parameter (4 or 8 bytes, little-endian) from its slot.
    values[:] = params
    result = launch(function, grid, 1, 1, threads, 1, 1, smem, raw_stream(device_index), pointers, None)
    if result:
        _check(result, "cuLaunchKernel")


def _params(topk_ids, l2p, replica_count, load, record_enabled, num_unpadded_tokens, out) -> list:
    """The kernels' parameters, in EPLB_KERNEL_PARAMS order."""
    return [
        topk_ids.data_ptr(),
        out.data_ptr(),
        replica_count.data_ptr(),
        replica_count.dtype == torch.int64,
        replica_count.stride(0),
        l2p.data_ptr(),
        l2p.stride(0),
        l2p.stride(1),
        l2p.shape[0],
        l2p.shape[1],
        load.data_ptr(),
        load.shape[0],
        0 if record_enabled is None else record_enabled.data_ptr(),
        0 if num_unpadded_tokens is None else num_unpadded_tokens.data_ptr(),
        topk_ids.numel(),
    ]


def _supported(topk_ids, l2p, replica_count, load, record_enabled, num_unpadded_tokens, out) -> bool:
    """What the CUDA kernels take; anything else goes to the Triton kernel.

    The operator has validated dtypes and devices already; these are the
    kernels' own limits: contiguous 2-D ids, 32-bit flat indices.
    """
    return (
        topk_ids.dtype in _ID_C_TYPES
        and topk_ids.dim() == 2
        and topk_ids.is_contiguous()
        and out.is_contiguous()
        and out.dtype == topk_ids.dtype
        and topk_ids.numel() <= _MAX_INT32
        and l2p.shape[0] <= _MAX_INT32
        and load.shape[0] <= _MAX_INT32
        and replica_count.dtype in (torch.int32, torch.int64)
        and (record_enabled is None or record_enabled.dtype in (torch.bool, torch.uint8))
        and (num_unpadded_tokens is None or num_unpadded_tokens.dtype == torch.int32)
    )


def smem_bytes(num_logical: int, num_physical: int, map_columns: int) -> int:
    """Dynamic shared memory of the smem kernel: dividers, map columns, histogram."""
    return 16 * num_logical + 8 * map_columns * num_logical + 4 * num_physical


def _launch_kernel(kernel_name, threads, per_block, blocks_per_sm, nbytes, args) -> None:
    """Compile (once) and launch ``kernel_name`` over ``args``' elements."""
    topk_ids = args[0]
    device_index = topk_ids.device.index
    num_sms, _ = _device_limits(device_index)
    function = compiled_functions(device_index, topk_ids.dtype, topk_ids.shape[1])[kernel_name]
    if nbytes:
        _opt_in_smem(function, nbytes)
    blocks = -(-topk_ids.numel() // per_block)
    if blocks_per_sm is not None:
        blocks = min(blocks, max(1, int(num_sms * blocks_per_sm)))
    _launch(device_index, function, blocks, threads, nbytes, _params(*args))


def _launch_smem(variant: SmemVariant, *args) -> bool:
    """Launch the smem kernel; False, launching nothing, where it does not apply."""
    if not _supported(*args):
        return False
    topk_ids, l2p, _, load = args[:4]
    if topk_ids.numel() == 0:
        return True
    smem_limit = _device_limits(topk_ids.device.index)[1]
    columns = variant.map_columns
    nbytes = smem_bytes(l2p.shape[0], load.shape[0], columns)
    if nbytes > smem_limit:
        columns = 0  # the map columns are an optimisation; the histogram is the point
        nbytes = smem_bytes(l2p.shape[0], load.shape[0], columns)
    if nbytes > smem_limit:
        return False
    _launch_kernel(_SMEM_KERNELS[columns], variant.threads, variant.threads * ELEMENTS_PER_THREAD,
                   variant.blocks_per_sm, nbytes, args)
    return True


def _launch_hist(variant: HistVariant, *args) -> bool:
    """Launch the unstaged histogram kernel; False, launching nothing, where it does not apply."""
    if not _supported(*args):
        return False
    topk_ids, load = args[0], args[3]
    if topk_ids.numel() == 0:
        return True
    nbytes = 4 * load.shape[0]  # the histogram only
    if nbytes > _device_limits(topk_ids.device.index)[1]:
        return False
    _launch_kernel(_HIST_KERNELS[variant.elements_per_thread], variant.threads,
                   variant.threads * variant.elements_per_thread, variant.blocks_per_sm, nbytes, args)
    return True


def _launch_direct(*args) -> bool:
    if not _supported(*args):
        return False
    if args[0].numel() == 0:
        return True
    _launch_kernel(_DIRECT_KERNEL, DIRECT_BLOCK, DIRECT_BLOCK, None, 0, args)
    return True


def _fall_back(name: str, fallback: bool, topk_ids, l2p, replica_count, load, record_enabled, num_unpadded_tokens, out):
    if not fallback:
        raise ValueError(f"the {name} CUDA kernel does not take these inputs (fallback=False)")
    launch_map(topk_ids, l2p, replica_count, out, load, record_enabled, num_unpadded_tokens)


# ---------------------------------------------------------------------------
# Public entry points: the dispatcher's arguments, plus ``fallback``.
# ---------------------------------------------------------------------------


def map_and_record_smem(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
    out: torch.Tensor,
    *,
    variant: str = "smem",
    fallback: bool = True,
) -> torch.Tensor:
    """Map + record with the shared-memory histogram kernel; returns ``out``.

    Where the kernel does not apply (non-contiguous ids, a histogram too large
    for shared memory, ...) the Triton kernel runs instead, or, with
    ``fallback=False``, ValueError is raised: tests and the benchmark use that
    to know which kernel ran.
    """
    args = (topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view,
            record_enabled, num_unpadded_tokens, out)
    if not _launch_smem(SMEM_VARIANTS[variant], *args):
        _fall_back(variant, fallback, *args)
    return out


def map_and_record_direct(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
    out: torch.Tensor,
    *,
    fallback: bool = True,
) -> torch.Tensor:
    """Map + record with one relaxed global reduction per element; returns ``out``."""
    args = (topk_ids, logical_to_physical_map, logical_replica_count, expert_load_view,
            record_enabled, num_unpadded_tokens, out)
    if not _launch_direct(*args):
        _fall_back("direct", fallback, *args)
    return out


def map_only_direct(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    out: torch.Tensor,
) -> bool:
    """The direct kernel with a null gate: mapping only, into ``out``.

    Its launch costs less host time than Triton's launcher. False, launching
    nothing, where the kernel does not take these inputs.
    """
    # ``out`` stands in for the load: with a null gate the kernel never touches it.
    return _launch_direct(topk_ids, logical_to_physical_map, logical_replica_count, out, None, None, out)


def _smem_entry(name: str):
    def call(*args, fallback: bool = True) -> torch.Tensor:
        return map_and_record_smem(*args, variant=name, fallback=fallback)

    call.__name__ = f"map_and_record_{name}"
    return call


def _hist_entry(name: str):
    variant = HIST_VARIANTS[name]

    def call(*args, fallback: bool = True) -> torch.Tensor:
        """Map + record with the unstaged shared-memory histogram kernel; returns ``out``."""
        if not _launch_hist(variant, *args):
            _fall_back(name, fallback, *args)
        return args[6]

    call.__name__ = f"map_and_record_{name}"
    return call


# Every CUDA variant by name: what the dispatcher picks from, the tests check
# and the benchmark times.
VARIANTS = {
    "direct": map_and_record_direct,
    **{name: _smem_entry(name) for name in SMEM_VARIANTS},
    **{name: _hist_entry(name) for name in HIST_VARIANTS},
}
