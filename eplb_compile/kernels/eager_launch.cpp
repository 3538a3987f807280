// The operators' eager CUDA calls in C++: check, allocate, pick the kernel, launch.
//
// In Python the same steps (ops/_library.py, kernels/chooser.py, nvrtc.py)
// cost about two torch ops of host time per call; here they are one function
// call. This file takes only calls that the operators' validation
// (ops/_validation.py) accepts and a registered launch table covers. For any
// other call it returns None (false for record_counts) without touching a
// tensor, and the caller runs the Python path, which raises the detailed
// error or picks Triton. The kernels are the NVRTC ones (eplb_topk.cu,
// eplb_counts.cu); Python compiles them and registers their handles here.
//
// No CUDA header: the launch goes through cuLaunchKernel's address (handed
// over by Python from libcuda), the current device and stream through c10's
// device-generic guard interface. Built on first use by eager_extension.py.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <unordered_map>
#include <vector>

namespace {

using CuLaunchKernel = int (*)(void* function, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                               unsigned block_y, unsigned block_z, unsigned shared_bytes, void* stream,
                               void** params, void** extra);
CuLaunchKernel cu_launch_kernel = nullptr;

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// One row of a card's plan with its kernel resolved: the last row whose
// min_numel <= T * k runs. function 0 marks a row the Python path runs (Triton).
struct Launch {
  int64_t min_numel;
  uintptr_t function;
  int64_t threads;
  int64_t elements_per_thread;
  int64_t max_blocks;  // 0: one element per thread, no cap
  bool histogram;      // needs 4 bytes of dynamic shared memory per physical expert
};

struct Table {
  std::vector<Launch> rows;
  int64_t shared_limit;  // dynamic shared memory the histogram functions opted in to
};

// Guarded by the GIL: pybind11 holds it through every call below.
std::unordered_map<int64_t, Table> tables;
std::unordered_map<int64_t, uintptr_t> count_functions;  // by device index

int64_t table_key(int64_t device, int64_t dtype, int64_t k, bool records) {
  return ((device * 64 + dtype) * (int64_t{1} << 32) + k) * 2 + (records ? 1 : 0);
}

bool is_id_dtype(at::ScalarType t) {
  return t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// ops/_validation.ids_hold: the ids' dtype holds -1 and every id below count.
bool ids_hold(at::ScalarType t, int64_t count) {
  if (t == at::kChar) return count <= 128;
  if (t == at::kShort) return count <= 32768;
  return true;
}

bool is_scalar_on(const at::Tensor& t, at::ScalarType dtype, const c10::Device& device) {
  return t.scalar_type() == dtype && t.numel() == 1 && t.device() == device;
}

// _validation.MAP_RULES (and num_unpadded_tokens' rules), plus the CUDA
// kernels' layout limits (cuda_variants._takes): contiguous ids, 32-bit sizes.
bool mapping_accepted(const at::Tensor& ids, const at::Tensor& l2p, const at::Tensor& rc,
                      const std::optional<at::Tensor>& unpadded) {
  const c10::Device device = ids.device();
  return device.is_cuda() && is_id_dtype(ids.scalar_type()) && ids.dim() == 2 && ids.is_contiguous() &&
         ids.numel() <= kMaxInt32 && l2p.scalar_type() == at::kLong && l2p.dim() == 2 && l2p.size(0) <= kMaxInt32 &&
         l2p.device() == device && (rc.scalar_type() == at::kInt || rc.scalar_type() == at::kLong) &&
         rc.dim() == 1 && rc.size(0) == l2p.size(0) && rc.device() == device &&
         (!unpadded.has_value() || is_scalar_on(*unpadded, at::kInt, device));
}

// _validation.LOAD_RULES on this device.
bool load_accepted(const at::Tensor& load, const at::Tensor& gate, const c10::Device& device) {
  return load.scalar_type() == at::kInt && load.dim() == 1 && load.is_contiguous() && load.size(0) <= kMaxInt32 &&
         load.device() == device && is_scalar_on(gate, at::kBool, device);
}

// The device's current stream, if the device is the current one (the kernel
// handles belong to the current device's context); nullopt otherwise.
std::optional<void*> current_stream_on(const c10::Device& device) {
  const c10::impl::DeviceGuardImplInterface* cuda = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  if (cuda->getDevice() != device) return std::nullopt;
  return cuda->getStream(device).native_handle();
}

// values: one slot per kernel parameter, on the caller's stack (no allocation per call).
template <size_t N>
void launch(uintptr_t function, int64_t blocks, int64_t threads, int64_t shared_bytes, void* stream,
            std::array<uint64_t, N>& values) {
  // The driver reads as many bytes of each slot as the kernel's parameter has
  // (little-endian: a 4-byte parameter is its slot's low half).
  std::array<void*, N> params;
  for (size_t i = 0; i < N; ++i) params[i] = &values[i];
  const int result = cu_launch_kernel(reinterpret_cast<void*>(function), static_cast<unsigned>(blocks), 1, 1,
                                      static_cast<unsigned>(threads), 1, 1, static_cast<unsigned>(shared_bytes),
                                      stream, params.data(), nullptr);
  TORCH_CHECK(result == 0, "eplb_compile: cuLaunchKernel failed with CUDA driver error ", result);
}

uint64_t address(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

// map_and_record (load given) or map_only (load and gate absent); None: not taken.
std::optional<at::Tensor> map_ids(const at::Tensor& ids, const at::Tensor& l2p, const at::Tensor& rc,
                                  const std::optional<at::Tensor>& load, const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& unpadded) {
  if (!mapping_accepted(ids, l2p, rc, unpadded)) return std::nullopt;
  const c10::Device device = ids.device();
  const bool records = load.has_value();
  // Recording: the load's dtype must hold every physical id; mapping only:
  // the map's entry count bounds them (no map values read).
  if (records ? !(gate.has_value() && load_accepted(*load, *gate, device) && ids_hold(ids.scalar_type(), load->size(0)))
              : !ids_hold(ids.scalar_type(), l2p.size(0) * l2p.size(1)))
    return std::nullopt;
  const auto found = tables.find(table_key(device.index(), static_cast<int64_t>(ids.scalar_type()), ids.size(1), records));
  if (found == tables.end()) return std::nullopt;
  const int64_t numel = ids.numel();
  const Launch* row = nullptr;
  for (const Launch& candidate : found->second.rows) {
    if (numel < candidate.min_numel) break;
    row = &candidate;
  }
  const int64_t shared = row != nullptr && row->histogram ? 4 * load->size(0) : 0;
  if (row == nullptr || row->function == 0 || shared > found->second.shared_limit) return std::nullopt;
  const std::optional<void*> stream = current_stream_on(device);
  if (!stream.has_value()) return std::nullopt;

  at::Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  if (numel > 0) {  // a grid of zero blocks is not a valid launch
    // EPLB_KERNEL_PARAMS' order (eplb_topk.cu), as KernelCall.cuda_params.
    std::array<uint64_t, 15> values = {
        address(ids), address(out), address(rc), rc.scalar_type() == at::kLong, static_cast<uint64_t>(rc.stride(0)),
        address(l2p), static_cast<uint64_t>(l2p.stride(0)), static_cast<uint64_t>(l2p.stride(1)),
        static_cast<uint64_t>(l2p.size(0)), static_cast<uint64_t>(l2p.size(1)),
        records ? address(*load) : 0, records ? static_cast<uint64_t>(load->size(0)) : 0,
        records ? address(*gate) : 0, unpadded.has_value() ? address(*unpadded) : 0, static_cast<uint64_t>(numel)};
    int64_t blocks = (numel + row->threads * row->elements_per_thread - 1) / (row->threads * row->elements_per_thread);
    if (row->max_blocks > 0 && blocks > row->max_blocks) blocks = row->max_blocks;
    launch(row->function, blocks, row->threads, shared, *stream, values);
  }
  // The kernel writes through a pointer: bump the version as the dispatcher
  // does for a Tensor(a!) argument (torch.autograd.graph.increment_version).
  if (records) load->unsafeGetTensorImpl()->bump_version();
  return out;
}

// record_counts; false: not taken. start arrives as any Python int: one past
// int64 is not taken here (Python's validation names the overrun).
bool record_counts(const at::Tensor& load, const at::Tensor& counts, const py::handle& start_object,
                   const at::Tensor& gate) {
  int overflow = 0;
  const int64_t start = PyLong_AsLongLongAndOverflow(start_object.ptr(), &overflow);
  if (overflow != 0 || (start == -1 && PyErr_Occurred() != nullptr)) {
    PyErr_Clear();
    return false;
  }
  const c10::Device device = load.device();
  const int64_t n = counts.dim() == 1 ? counts.size(0) : -1;
  const bool accepted = device.is_cuda() && load_accepted(load, gate, device) && counts.scalar_type() == at::kInt &&
                        n >= 0 && counts.device() == device && start >= 0 && start <= load.size(0) - n;
  if (!accepted) return false;
  const auto found = count_functions.find(device.index());
  if (found == count_functions.end()) return false;
  const std::optional<void*> stream = current_stream_on(device);
  if (!stream.has_value()) return false;
  if (n > 0) {
    constexpr int64_t threads = 256;  // cuda_variants.COUNT_THREADS
    std::array<uint64_t, 5> values = {address(load) + 4 * static_cast<uint64_t>(start), address(counts),
                                    static_cast<uint64_t>(counts.stride(0)), address(gate), static_cast<uint64_t>(n)};
    launch(found->second, (n + threads - 1) / threads, threads, 0, *stream, values);
  }
  load.unsafeGetTensorImpl()->bump_version();
  return true;
}

void set_launcher(uintptr_t cu_launch_kernel_address) {
  cu_launch_kernel = reinterpret_cast<CuLaunchKernel>(cu_launch_kernel_address);
}

void register_table(int64_t device, int64_t dtype, int64_t k, bool records,
                    const std::vector<std::tuple<int64_t, uintptr_t, int64_t, int64_t, int64_t, bool>>& rows,
                    int64_t shared_limit) {
  TORCH_CHECK(cu_launch_kernel != nullptr, "eplb_compile: set_launcher first");
  Table table{{}, shared_limit};
  for (const auto& [min_numel, function, threads, per_thread, max_blocks, histogram] : rows)
    table.rows.push_back({min_numel, function, threads, per_thread, max_blocks, histogram});
  tables[table_key(device, dtype, k, records)] = std::move(table);
}

void register_count_function(int64_t device, uintptr_t function) {
  TORCH_CHECK(cu_launch_kernel != nullptr, "eplb_compile: set_launcher first");
  count_functions[device] = function;
}

void clear() {
  tables.clear();
  count_functions.clear();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("map_ids", &map_ids, "map_and_record (load given) or map_only; None when not taken");
  m.def("record_counts", &record_counts, "record_counts; False when not taken");
  m.def("set_launcher", &set_launcher, "cuLaunchKernel's address");
  m.def("register_table", &register_table, "a (device, id dtype, k, records) launch table");
  m.def("register_count_function", &register_count_function, "the count kernel's handle on a device");
  m.def("clear", &clear, "forget every table and count function");
}
