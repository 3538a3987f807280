// The topk path's CUDA kernels: map logical expert ids to physical ones and
// count them into the expert load, bit-identical to vLLM 0.33.0's Triton
// kernel except that a replica index past the map's slots maps to -1 instead
// of being read out of bounds.
//
// The host (eplb_compile/kernels/cuda_variants.py) prepends two defines and
// compiles this file with NVRTC once per (device, id dtype, k):
//   ID_T  the C type of topk_ids and of the output ids (int, long long, ...)
//   K     top-k, the number of columns of topk_ids
// It also compiles standalone, which is how to check it:
//   nvcc -arch=sm_90 -c -DID_T=int -DK=8 eplb_topk.cu -o /dev/null
//
// Why shared memory: with Zipf-skewed routing thousands of tokens pick the
// same few experts, and one global atomic per (token, k) pair queues on those
// few addresses. The hist kernels count into a block-private histogram and
// add each non-zero bin to the load once per block.

typedef unsigned int u32;
typedef long long i64;

#define KNUTH_MULTIPLIER 2654435769u

// Every kernel takes the same parameters, in this order (KernelCall.cuda_params
// packs them). A null record_enabled means map_only: nothing is counted and
// load is never touched; num_unpadded then marks the padded rows, whose ids
// come back as -1.
#define EPLB_KERNEL_PARAMS                                                     \
    const ID_T* __restrict__ ids, ID_T* __restrict__ out,                      \
    const void* __restrict__ rc, int rc_is_int64, i64 rc_stride,               \
    const i64* __restrict__ l2p, i64 l2p_stride_e, i64 l2p_stride_s,           \
    int num_logical, i64 slots,                                                \
    int* __restrict__ load, int num_physical,                                  \
    const unsigned char* __restrict__ record_enabled,                          \
    const int* __restrict__ num_unpadded, u32 numel

__device__ __forceinline__ i64 replica_count_at(const void* rc, int rc_is_int64, i64 rc_stride, int e) {
    return rc_is_int64 ? ((const i64*)rc)[e * rc_stride] : (i64)((const int*)rc)[e * rc_stride];
}

// vLLM records flat index i only if i < num_unpadded * k, an int32 product.
__device__ __forceinline__ u32 record_limit(const int* num_unpadded, u32 numel) {
    if (num_unpadded == 0) return numel;
    const int limit = (int)((u32)(*num_unpadded) * (u32)K);
    if (limit <= 0) return 0u;
    return (u32)limit < numel ? (u32)limit : numel;
}

// The physical id of flat element i whose logical id is e (-1 if invalid).
// Counts below 1 act as 1; a count of 2^32 or more leaves the hash unchanged.
__device__ __forceinline__ i64 physical_of(u32 i, int e, i64 count, const i64* l2p, i64 l2p_stride_e,
                                           i64 l2p_stride_s, i64 slots) {
    count = count < 1 ? 1 : count;
    const u32 hash = (i / K) * KNUTH_MULTIPLIER;
    const u32 replica = count > 0xFFFFFFFFll ? hash : hash % (u32)count;
    return (i64)replica < slots ? l2p[e * l2p_stride_e + replica * l2p_stride_s] : -1;
}

// One element per thread, one relaxed global reduction per recorded element:
// no set-up cost, the fastest at small T. Also the map_only kernel.
extern "C" __global__ void __launch_bounds__(1024) eplb_map_record_direct(EPLB_KERNEL_PARAMS) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= numel) return;
    const bool map_only = record_enabled == nullptr;
    const int e = (int)ids[i];  // vLLM reads the ids as int32
    i64 physical = -1;
    if ((u32)e < (u32)num_logical)
        physical = physical_of(i, e, replica_count_at(rc, rc_is_int64, rc_stride, e), l2p, l2p_stride_e,
                               l2p_stride_s, slots);
    if (map_only) {
        // Rows at or past num_unpadded are padding: -1 (a row comparison, no product to overflow).
        if (num_unpadded != nullptr && (*num_unpadded <= 0 || i / K >= (u32)*num_unpadded)) physical = -1;
        out[i] = (ID_T)physical;
        return;
    }
    out[i] = (ID_T)physical;
    // Unused result: ptxas emits a fire-and-forget RED.
    if (*record_enabled != 0 && i < record_limit(num_unpadded, numel) && physical >= 0 && physical < num_physical)
        atomicAdd(load + physical, 1);
}

// Block-private histogram in shared memory (num_physical ints). Each element
// reads its replica count and map entry from global memory (small tables,
// L1/L2-resident) as the direct kernel does; only the counting goes through
// shared memory. The grid strides over chunks of blockDim.x * EPT elements.
// The element loop runs in phases (load EPT ids; EPT predicated count loads;
// EPT predicated map loads; stores and counts) so each phase's EPT loads are
// in flight together instead of forming one dependent chain per element.
// Each chunk's ids are loaded before the previous chunk's stores (the first
// chunk's before the set-up), and the histogram is zeroed whatever the gate
// says: the id loads' latency overlaps the zeroing and the barrier, and the
// zeroing never waits for the gate.
template <int EPT>
__device__ __forceinline__ void map_record_hist(EPLB_KERNEL_PARAMS) {
    extern __shared__ __align__(16) unsigned char smem[];
    int* hist = (int*)smem;
    const u32 tid = threadIdx.x;
    const u32 nthreads = blockDim.x;
    const u32 chunk = nthreads * EPT;
    const u32 grid_stride = gridDim.x * chunk;
    u32 base = blockIdx.x * chunk;
    int e[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
        const u32 i = base + j * nthreads + tid;
        e[j] = i < numel ? (int)ids[i] : 0;  // vLLM reads the ids as int32
    }
    const bool record = *record_enabled != 0;  // grid-uniform
    const u32 limit = record_limit(num_unpadded, numel);
    for (int b = tid; b < num_physical; b += nthreads) hist[b] = 0;
    __syncthreads();

    // base < numel < 2^31 and grid_stride < 2^31 + chunk: base += grid_stride never wraps.
    for (; base < numel; base += grid_stride) {
        bool valid[EPT];
        i64 count[EPT];
#pragma unroll
        for (int j = 0; j < EPT; ++j) valid[j] = base + j * nthreads + tid < numel && (u32)e[j] < (u32)num_logical;
        if (rc_is_int64) {  // uniform
#pragma unroll
            for (int j = 0; j < EPT; ++j) count[j] = valid[j] ? ((const i64*)rc)[e[j] * rc_stride] : 1;
        } else {
#pragma unroll
            for (int j = 0; j < EPT; ++j) count[j] = valid[j] ? (i64)((const int*)rc)[e[j] * rc_stride] : 1;
        }
        i64 physical[EPT];
#pragma unroll
        for (int j = 0; j < EPT; ++j)
            physical[j] = valid[j] ? physical_of(base + j * nthreads + tid, e[j], count[j], l2p, l2p_stride_e,
                                                 l2p_stride_s, slots)
                                   : -1;
        const u32 next = base + grid_stride;
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
            const u32 i = next + j * nthreads + tid;
            e[j] = next < numel && i < numel ? (int)ids[i] : 0;
        }
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
            const u32 i = base + j * nthreads + tid;
            if (i < numel) {
                out[i] = (ID_T)physical[j];
                if (record && i < limit && physical[j] >= 0 && physical[j] < num_physical)
                    atomicAdd(hist + physical[j], 1);
            }
        }
    }

    if (record) {
        __syncthreads();
        for (int b = tid; b < num_physical; b += nthreads) {
            const int c = hist[b];
            if (c != 0) atomicAdd(load + b, c);
        }
    }
}

#define HIST_ARGS ids, out, rc, rc_is_int64, rc_stride, l2p, l2p_stride_e, l2p_stride_s, num_logical, slots, \
                  load, num_physical, record_enabled, num_unpadded, numel

extern "C" __global__ void __launch_bounds__(1024) eplb_map_record_hist_e1(EPLB_KERNEL_PARAMS) {
    map_record_hist<1>(HIST_ARGS);
}

extern "C" __global__ void __launch_bounds__(1024) eplb_map_record_hist_e4(EPLB_KERNEL_PARAMS) {
    map_record_hist<4>(HIST_ARGS);
}
