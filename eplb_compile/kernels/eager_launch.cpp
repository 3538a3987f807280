// The operators' eager CUDA calls in C++: check, allocate, pick the kernel, launch.
//
// In Python the same steps (ops/_library.py, kernels/chooser.py, nvrtc.py)
// cost about two torch ops of host time per call; here they are one function
// call. This file takes only calls that the operators' validation
// (ops/_validation.py) accepts and a registered launch table covers. For any
// other call it returns None (false for record_counts) without touching a
// tensor, and the caller runs the Python path, which raises the detailed
// error or picks Triton. tests/test_eager_launcher.py checks, on a GPU, that
// what it takes the validation accepts, over every single and every pair of
// argument changes to a valid call. The kernels are the NVRTC ones
// (eplb_topk.cu, eplb_counts.cu); Python compiles them and registers their
// handles here.
//
// No CUDA header: the launch goes through cuLaunchKernel's address (handed
// over by Python from libcuda), the current device and stream through c10's
// device-generic guard interface. Built on first use by eager_extension.py,
// which passes every constant shared with Python as a -D macro (below): each
// kernel parameter's slot, the count kernel's block size, the id capacities,
// the shared memory per histogram bin. None is written here by hand.

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

#if !defined(EPLB_TOPK_PARAM_COUNT) || !defined(EPLB_COUNT_PARAM_COUNT) || !defined(EPLB_COUNT_THREADS) || \
    !defined(EPLB_INT8_ID_CAPACITY) || !defined(EPLB_INT16_ID_CAPACITY) || !defined(EPLB_HIST_BYTES_PER_EXPERT)
#error "build with eplb_compile.kernels.eager_extension.build(), which defines the shared constants"
#endif

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
  if (t == at::kChar) return count <= EPLB_INT8_ID_CAPACITY;
  if (t == at::kShort) return count <= EPLB_INT16_ID_CAPACITY;
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

// The plan row that runs this call and its dynamic shared memory, or nullptr:
// not taken (outside the validation's rules or the kernels' limits, no table,
// a Triton row, a histogram past shared memory).
const Launch* accepted_row(const at::Tensor& ids, const at::Tensor& l2p, const at::Tensor& rc,
                           const std::optional<at::Tensor>& load, const std::optional<at::Tensor>& gate,
                           const std::optional<at::Tensor>& unpadded, int64_t* shared) {
  if (!mapping_accepted(ids, l2p, rc, unpadded)) return nullptr;
  const c10::Device device = ids.device();
  const bool records = load.has_value();
  // Recording: the load's dtype must hold every physical id; mapping only:
  // the map's entry count bounds them (no map values read).
  if (records ? !(gate.has_value() && load_accepted(*load, *gate, device) && ids_hold(ids.scalar_type(), load->size(0)))
              : !ids_hold(ids.scalar_type(), l2p.size(0) * l2p.size(1)))
    return nullptr;
  const auto found = tables.find(table_key(device.index(), static_cast<int64_t>(ids.scalar_type()), ids.size(1), records));
  if (found == tables.end()) return nullptr;
  const int64_t numel = ids.numel();
  const Launch* row = nullptr;
  for (const Launch& candidate : found->second.rows) {  // plans.KernelPlan.topk_variant's rule
    if (numel < candidate.min_numel) break;
    row = &candidate;
  }
  if (row == nullptr || row->function == 0) return nullptr;
  *shared = row->histogram ? EPLB_HIST_BYTES_PER_EXPERT * load->size(0) : 0;
  if (*shared > found->second.shared_limit) return nullptr;
  return row;
}

// Whether map_ids would take this call (what eplb_compile.eager_route asks); launches nothing.
bool takes_map(const at::Tensor& ids, const at::Tensor& l2p, const at::Tensor& rc,
               const std::optional<at::Tensor>& load, const std::optional<at::Tensor>& gate,
               const std::optional<at::Tensor>& unpadded) {
  int64_t shared = 0;
  return accepted_row(ids, l2p, rc, load, gate, unpadded, &shared) != nullptr &&
         current_stream_on(ids.device()).has_value();
}

// map_and_record (load given) or map_only (load and gate absent); None: not taken.
std::optional<at::Tensor> map_ids(const at::Tensor& ids, const at::Tensor& l2p, const at::Tensor& rc,
                                  const std::optional<at::Tensor>& load, const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& unpadded) {
  int64_t shared = 0;
  const Launch* row = accepted_row(ids, l2p, rc, load, gate, unpadded, &shared);
  if (row == nullptr) return std::nullopt;
  const std::optional<void*> stream = current_stream_on(ids.device());
  if (!stream.has_value()) return std::nullopt;
  const bool records = load.has_value();
  const int64_t numel = ids.numel();

  at::Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  if (numel > 0) {  // a grid of zero blocks is not a valid launch
    std::array<uint64_t, EPLB_TOPK_PARAM_COUNT> values{};
    values[EPLB_SLOT_IDS] = address(ids);
    values[EPLB_SLOT_OUT] = address(out);
    values[EPLB_SLOT_RC] = address(rc);
    values[EPLB_SLOT_RC_IS_INT64] = rc.scalar_type() == at::kLong;
    values[EPLB_SLOT_RC_STRIDE] = static_cast<uint64_t>(rc.stride(0));
    values[EPLB_SLOT_L2P] = address(l2p);
    values[EPLB_SLOT_L2P_STRIDE_E] = static_cast<uint64_t>(l2p.stride(0));
    values[EPLB_SLOT_L2P_STRIDE_S] = static_cast<uint64_t>(l2p.stride(1));
    values[EPLB_SLOT_NUM_LOGICAL] = static_cast<uint64_t>(l2p.size(0));
    values[EPLB_SLOT_SLOTS] = static_cast<uint64_t>(l2p.size(1));
    values[EPLB_SLOT_LOAD] = records ? address(*load) : 0;
    values[EPLB_SLOT_NUM_PHYSICAL] = records ? static_cast<uint64_t>(load->size(0)) : 0;
    values[EPLB_SLOT_RECORD_ENABLED] = records ? address(*gate) : 0;
    values[EPLB_SLOT_NUM_UNPADDED] = unpadded.has_value() ? address(*unpadded) : 0;
    values[EPLB_SLOT_NUMEL] = static_cast<uint64_t>(numel);
    int64_t blocks = (numel + row->threads * row->elements_per_thread - 1) / (row->threads * row->elements_per_thread);
    if (row->max_blocks > 0 && blocks > row->max_blocks) blocks = row->max_blocks;
    launch(row->function, blocks, row->threads, shared, *stream, values);
  }
  // The kernel writes through a pointer: bump the version as the dispatcher
  // does for a Tensor(a!) argument (torch.autograd.graph.increment_version).
  if (records) load->unsafeGetTensorImpl()->bump_version();
  return out;
}

// The count kernel for this call, or 0: not taken. start arrives as any
// Python int: one past int64 is not taken here (Python's validation names the overrun).
uintptr_t accepted_count_function(const at::Tensor& load, const at::Tensor& counts, const py::handle& start_object,
                                  const at::Tensor& gate, int64_t* start) {
  int overflow = 0;
  *start = PyLong_AsLongLongAndOverflow(start_object.ptr(), &overflow);
  if (overflow != 0 || (*start == -1 && PyErr_Occurred() != nullptr)) {
    PyErr_Clear();
    return 0;
  }
  const c10::Device device = load.device();
  const int64_t n = counts.dim() == 1 ? counts.size(0) : -1;
  const bool accepted = device.is_cuda() && load_accepted(load, gate, device) && counts.scalar_type() == at::kInt &&
                        n >= 0 && counts.device() == device && *start >= 0 && *start <= load.size(0) - n;
  if (!accepted || !current_stream_on(device).has_value()) return 0;
  const auto found = count_functions.find(device.index());
  return found == count_functions.end() ? 0 : found->second;
}

// Whether record_counts would take this call; launches nothing.
bool takes_counts(const at::Tensor& load, const at::Tensor& counts, const py::handle& start_object,
                  const at::Tensor& gate) {
  int64_t start = 0;
  return accepted_count_function(load, counts, start_object, gate, &start) != 0;
}

// record_counts; false: not taken.
bool record_counts(const at::Tensor& load, const at::Tensor& counts, const py::handle& start_object,
                   const at::Tensor& gate) {
  int64_t start = 0;
  const uintptr_t function = accepted_count_function(load, counts, start_object, gate, &start);
  if (function == 0) return false;
  const int64_t n = counts.size(0);
  if (n > 0) {
    std::array<uint64_t, EPLB_COUNT_PARAM_COUNT> values{};
    values[EPLB_COUNT_SLOT_LOAD] = address(load) + 4 * static_cast<uint64_t>(start);
    values[EPLB_COUNT_SLOT_COUNTS] = address(counts);
    values[EPLB_COUNT_SLOT_COUNTS_STRIDE] = static_cast<uint64_t>(counts.stride(0));
    values[EPLB_COUNT_SLOT_RECORD_ENABLED] = address(gate);
    values[EPLB_COUNT_SLOT_N] = static_cast<uint64_t>(n);
    launch(function, (n + EPLB_COUNT_THREADS - 1) / EPLB_COUNT_THREADS, EPLB_COUNT_THREADS, 0,
           *current_stream_on(load.device()), values);
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
  m.def("takes_map", &takes_map, "whether map_ids would take the call (launches nothing)");
  m.def("takes_counts", &takes_counts, "whether record_counts would take the call (launches nothing)");
  m.def("set_launcher", &set_launcher, "cuLaunchKernel's address");
  m.def("register_table", &register_table, "a (device, id dtype, k, records) launch table");
  m.def("register_count_function", &register_count_function, "the count kernel's handle on a device");
  m.def("clear", &clear, "forget every table and count function");
}
