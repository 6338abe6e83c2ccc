// Python glue for the low-latency mode: the NVSHMEM runtime functions and LowLatencyContext,
// which owns the symmetric heap, the peer table and the timeout record, and launches the
// kernels on a caller's stream. Tensors stay in Python; everything here is pointers as ints.
#include <cuda_runtime.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bindings.h"
#include "mpiep/errors.h"
#include "mpiep/low_latency.h"
#include "runtime/nvshmem_runtime.h"

namespace py = pybind11;

namespace mpiep {
namespace {

template <class T>
T* as_ptr(uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

class LowLatencyContext {
 public:
  LowLatencyContext(int device, size_t heap_bytes, bool allow_nvlink, int num_blocks,
                    double timeout_s)
      : device_(device), num_blocks_(num_blocks) {
    MPIEP_CHECK_ARG(nvshmem_rt::initialized(), "call nvshmem_init before creating the context");
    MPIEP_CHECK_ARG(num_blocks > 0, "num_blocks must be positive");
    MPIEP_CUDA_CHECK(cudaSetDevice(device_));
    rank_ = nvshmem_rt::my_pe();
    size_ = nvshmem_rt::n_pes();
    half_bytes_ = heap_bytes / 2 / 4096 * 4096;
    MPIEP_CHECK_ARG(half_bytes_ > kSignal(), "num_rdma_bytes is too small for low-latency mode");
    heap_ = static_cast<uint8_t*>(nvshmem_rt::alloc(heap_bytes));
    for (int h = 0; h < 2; ++h) MPIEP_CUDA_CHECK(cudaMemset(heap_ + h * half_bytes_, 0, kSignal()));

    std::vector<uint8_t*> bases(size_, nullptr);
    for (int r = 0; r < size_; ++r) {
      void* p = nvshmem_rt::peer_ptr(heap_, r);
      nvlink_peers_.push_back(p != nullptr);
      if (allow_nvlink) bases[r] = static_cast<uint8_t*>(p);
    }
    MPIEP_CUDA_CHECK(cudaMalloc(&peer_bases_, size_ * sizeof(uint8_t*)));
    MPIEP_CUDA_CHECK(
        cudaMemcpy(peer_bases_, bases.data(), size_ * sizeof(uint8_t*), cudaMemcpyHostToDevice));
    MPIEP_CUDA_CHECK(cudaHostAlloc(&err_host_, sizeof(ll::ErrorRecord), cudaHostAllocMapped));
    std::memset(const_cast<ll::ErrorRecord*>(err_host_), 0, sizeof(ll::ErrorRecord));
    MPIEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&err_dev_),
                                              const_cast<ll::ErrorRecord*>(err_host_), 0));
    MPIEP_CUDA_CHECK(cudaMalloc(&err_lock_, sizeof(int)));
    MPIEP_CUDA_CHECK(cudaMemset(err_lock_, 0, sizeof(int)));
    int khz = 0;
    if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device_) != cudaSuccess || khz <= 0) {
      (void)cudaGetLastError();
      khz = 2000000;
    }
    clock_khz_ = khz;
    set_timeout(timeout_s);
    MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
    nvshmem_rt::barrier_all();
  }

  ~LowLatencyContext() { destroy(); }

  void set_timeout(double s) {
    MPIEP_CHECK_ARG(s > 0, "timeout_s must be positive");
    timeout_s_ = s;
    timeout_cycles_ = static_cast<long long>(s * clock_khz_ * 1000.0);
  }

  void dispatch(uintptr_t x, uintptr_t topk_idx, int num_tokens, int num_topk, int hidden,
                int max_tokens, int num_experts, bool fp8, bool round_scale, bool ue8m0,
                uintptr_t recv_x, uintptr_t recv_scales, uintptr_t recv_count,
                uintptr_t src_token_idx, uintptr_t layout_range, uintptr_t stats, int buffer,
                int phases, uintptr_t stream) {
    check_shape(hidden, max_tokens, num_experts, num_tokens);
    MPIEP_CHECK_ARG(!fp8 || hidden % 128 == 0, "FP8 low-latency dispatch needs hidden % 128 == 0");
    MPIEP_CUDA_CHECK(cudaSetDevice(device_));
    ll::DispatchParams p{};
    p.c = common();
    p.r = regions(buffer, hidden, max_tokens, num_experts);
    p.x = as_ptr<const void>(x);
    p.topk_idx = as_ptr<const int64_t>(topk_idx);
    p.num_tokens = num_tokens;
    p.num_topk = num_topk;
    p.hidden = hidden;
    p.max_tokens = max_tokens;
    p.num_experts = num_experts;
    p.fp8 = fp8;
    p.round_scale = round_scale || ue8m0;
    p.ue8m0 = ue8m0;
    p.recv_x = as_ptr<void>(recv_x);
    p.recv_scales = as_ptr<void>(recv_scales);
    p.recv_count = as_ptr<int>(recv_count);
    p.src_token_idx = as_ptr<int>(src_token_idx);
    p.layout_range = as_ptr<int>(layout_range);
    p.stats = as_ptr<int>(stats);
    p.row_bytes = static_cast<int>(ll::row_bytes(hidden));
    const size_t msg = 16 + (fp8 ? size_t(hidden) + size_t(hidden) / 32 : size_t(hidden) * 2);
    p.msg_bytes = static_cast<int>(ll::align_up(msg, 16));
    p.phases = phases;
    p.num_blocks = num_blocks_;
    ll::launch_dispatch(p, as_ptr<void>(stream));
  }

  void combine(uintptr_t y, uintptr_t topk_idx, uintptr_t topk_weights, uintptr_t src_token_idx,
               uintptr_t layout_range, uintptr_t out, int num_tokens, int num_topk, int hidden,
               int max_tokens, int num_experts, bool zero_copy, int buffer, int phases,
               uintptr_t stream) {
    check_shape(hidden, max_tokens, num_experts, num_tokens);
    MPIEP_CUDA_CHECK(cudaSetDevice(device_));
    ll::CombineParams p{};
    p.c = common();
    p.r = regions(buffer, hidden, max_tokens, num_experts);
    p.y = as_ptr<const void>(y);
    p.topk_idx = as_ptr<const int64_t>(topk_idx);
    p.topk_weights = as_ptr<const float>(topk_weights);
    p.src_token_idx = as_ptr<const int>(src_token_idx);
    p.layout_range = as_ptr<const int>(layout_range);
    p.out = as_ptr<void>(out);
    p.num_tokens = num_tokens;
    p.num_topk = num_topk;
    p.hidden = hidden;
    p.max_tokens = max_tokens;
    p.num_experts = num_experts;
    p.zero_copy = zero_copy;
    p.phases = phases;
    p.num_blocks = num_blocks_;
    ll::launch_combine(p, as_ptr<void>(stream));
  }

  uintptr_t combine_send_buffer(int buffer, int hidden, int max_tokens, int num_experts) {
    check_shape(hidden, max_tokens, num_experts, 0);
    return reinterpret_cast<uintptr_t>(regions(buffer, hidden, max_tokens, num_experts).comb_send);
  }

  // Zeroes every signal and the timeout state on this rank; the caller synchronises its streams
  // first and barriers after (all ranks clean together).
  void clean() {
    MPIEP_CUDA_CHECK(cudaSetDevice(device_));
    MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
    for (int h = 0; h < 2; ++h) MPIEP_CUDA_CHECK(cudaMemset(heap_ + h * half_bytes_, 0, kSignal()));
    MPIEP_CUDA_CHECK(cudaMemset(err_lock_, 0, sizeof(int)));
    std::memset(const_cast<ll::ErrorRecord*>(err_host_), 0, sizeof(ll::ErrorRecord));
    MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
    nvshmem_rt::barrier_all();
  }

  // None, or (rank, phase, peer, index, observed, expected) of the first timed-out wait.
  py::object error() const {
    if (err_host_ == nullptr || err_host_->flag == 0) return py::none();
    return py::make_tuple(err_host_->rank, err_host_->phase, err_host_->peer, err_host_->index,
                          err_host_->observed, err_host_->expected);
  }

  void destroy() {
    if (heap_ == nullptr) return;
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    nvshmem_rt::barrier_all();
    nvshmem_rt::release(heap_);
    heap_ = nullptr;
    cudaFree(peer_bases_);
    cudaFree(err_lock_);
    cudaFreeHost(const_cast<ll::ErrorRecord*>(err_host_));
    err_host_ = nullptr;
  }

  std::vector<bool> nvlink_peers() const { return nvlink_peers_; }
  size_t half_bytes() const { return half_bytes_; }
  uintptr_t heap() const { return reinterpret_cast<uintptr_t>(heap_); }
  double timeout_s() const { return timeout_s_; }

 private:
  static size_t kSignal() { return ll::kSignalBytes; }

  void check_shape(int hidden, int max_tokens, int num_experts, int num_tokens) const {
    MPIEP_CHECK_ARG(heap_ != nullptr, "the low-latency context was destroyed");
    MPIEP_CHECK_ARG(hidden > 0 && hidden % 8 == 0, "hidden must be a positive multiple of 8");
    MPIEP_CHECK_ARG(max_tokens > 0, "num_max_dispatch_tokens_per_rank must be positive");
    MPIEP_CHECK_ARG(num_tokens >= 0 && num_tokens <= max_tokens,
                    "num_tokens exceeds num_max_dispatch_tokens_per_rank");
    MPIEP_CHECK_ARG(num_experts > 0 && num_experts % size_ == 0,
                    "num_experts must be a positive multiple of the rank count");
    if (ll::signal_bytes_needed(max_tokens, num_experts) > kSignal() ||
        ll::half_bytes_needed(hidden, max_tokens, num_experts) > half_bytes_) {
      throw Error(ErrorCode::kCapacity,
                  "low-latency buffer too small: hidden " + std::to_string(hidden) +
                      ", max tokens " + std::to_string(max_tokens) + ", experts " +
                      std::to_string(num_experts) + " need " +
                      std::to_string(2 * ll::half_bytes_needed(hidden, max_tokens, num_experts)) +
                      " bytes (get_low_latency_rdma_size_hint), the buffer has " +
                      std::to_string(2 * half_bytes_));
    }
  }

  ll::Common common() const {
    ll::Common c;
    c.heap = heap_;
    c.peer_bases = peer_bases_;
    c.rank = rank_;
    c.num_ranks = size_;
    c.timeout_cycles = timeout_cycles_;
    c.err = err_dev_;
    c.err_lock = err_lock_;
    return c;
  }

  ll::Regions regions(int buffer, int hidden, int max_tokens, int num_experts) const {
    MPIEP_CHECK_ARG(buffer == 0 || buffer == 1, "buffer index must be 0 or 1");
    return ll::make_regions(heap_ + buffer * half_bytes_, hidden, max_tokens, num_experts, size_);
  }

  int device_ = 0, num_blocks_ = 1, rank_ = 0, size_ = 1, clock_khz_ = 0;
  size_t half_bytes_ = 0;
  uint8_t* heap_ = nullptr;
  uint8_t** peer_bases_ = nullptr;
  volatile ll::ErrorRecord* err_host_ = nullptr;
  ll::ErrorRecord* err_dev_ = nullptr;
  int* err_lock_ = nullptr;
  double timeout_s_ = 0;
  long long timeout_cycles_ = 0;
  std::vector<bool> nvlink_peers_;
};

}  // namespace

void bind_low_latency(py::module_& m) {
  m.def(
      "nvshmem_get_unique_id", [] { return py::bytes(nvshmem_rt::get_unique_id()); },
      "A fresh NVSHMEM unique id (128 bytes); call on one rank and broadcast it.");
  m.def(
      "nvshmem_init",
      [](py::bytes uid, int rank, int size, int device, size_t heap_bytes) {
        nvshmem_rt::init(std::string(uid), rank, size, device, heap_bytes);
      },
      py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"),
      py::arg("heap_bytes"));
  m.def("nvshmem_initialized", &nvshmem_rt::initialized);
  m.def("nvshmem_my_pe", &nvshmem_rt::my_pe);
  m.def("nvshmem_n_pes", &nvshmem_rt::n_pes);
  m.def("nvshmem_barrier_all", &nvshmem_rt::barrier_all);
  m.def("nvshmem_finalize", &nvshmem_rt::finalize);
  m.attr("LL_SEND_PHASE") = static_cast<int>(ll::kSendPhase);
  m.attr("LL_RECV_PHASE") = static_cast<int>(ll::kRecvPhase);

  py::class_<LowLatencyContext>(m, "LowLatencyContext")
      .def(py::init<int, size_t, bool, int, double>(), py::arg("device"), py::arg("heap_bytes"),
           py::arg("allow_nvlink"), py::arg("num_blocks"), py::arg("timeout_s"))
      .def("dispatch", &LowLatencyContext::dispatch)
      .def("combine", &LowLatencyContext::combine)
      .def("combine_send_buffer", &LowLatencyContext::combine_send_buffer)
      .def("clean", &LowLatencyContext::clean)
      .def("error", &LowLatencyContext::error)
      .def("destroy", &LowLatencyContext::destroy)
      .def("set_timeout", &LowLatencyContext::set_timeout)
      .def_property_readonly("timeout_s", &LowLatencyContext::timeout_s)
      .def_property_readonly("nvlink_peers", &LowLatencyContext::nvlink_peers)
      .def_property_readonly("half_bytes", &LowLatencyContext::half_bytes)
      .def_property_readonly("heap", &LowLatencyContext::heap);
}

}  // namespace mpiep
