// The count path's kernel: load[i] += counts[i * counts_stride] for i < n when
// record_enabled is set. `load` points at the slice's first element (the host
// adds `start`). One thread per element of a disjoint slice: a plain
// read-modify-write, no atomics. The count and the current load are read
// without waiting for the gate (one memory round trip, not two); unsigned
// arithmetic, so int32 wraps like torch's add instead of overflowing
// (undefined in C++).
// Compiled by NVRTC once per device (eplb_compile/kernels/cuda_variants.py); standalone:
//   nvcc -arch=sm_90 -c eplb_counts.cu -o /dev/null

extern "C" __global__ void __launch_bounds__(1024)
    eplb_record_counts(int* __restrict__ load, const int* __restrict__ counts, long long counts_stride,
                       const unsigned char* __restrict__ record_enabled, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned c = (unsigned)counts[i * counts_stride];
    const unsigned current = (unsigned)load[i];
    if (*record_enabled != 0) load[i] = (int)(current + c);
}
