#include "runtime/low_latency_context.h"

#include <cstring>
#include <string>

#include "mpiep/errors.h"
#include "mpiep/test_stall.h"
#include "runtime/nvshmem_runtime.h"

namespace mpiep {

LowLatencyContext::LowLatencyContext(int device, size_t heap_bytes, bool allow_nvlink,
                                     int num_blocks, double timeout_s)
    : device_(device), num_blocks_(num_blocks) {
  MPIEP_CHECK_ARG(nvshmem_rt::initialized(), "call nvshmem_init before creating the context");
  MPIEP_CHECK_ARG(num_blocks > 0, "num_blocks must be positive");
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  rank_ = nvshmem_rt::my_pe();
  size_ = nvshmem_rt::n_pes();
  // Never more blocks than the GPU holds at once (the kernels' blocks wait on each other).
  int sms = 0;
  MPIEP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
  const int per_sm = std::min(ll::dispatch_blocks_per_sm(size_), ll::combine_blocks_per_sm(size_));
  num_blocks_ = std::max(1, std::min(num_blocks_, std::max(1, per_sm) * sms));
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
  MPIEP_CUDA_CHECK(cudaMalloc(&active_, size_ * sizeof(int)));
  set_active(std::vector<int>(size_, 1));
  for (auto& e : combine_done_)
    MPIEP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  set_timeout(timeout_s);
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_rt::barrier_all();
}

LowLatencyContext::~LowLatencyContext() {
  try {
    destroy();
  } catch (...) {
  }
}

void LowLatencyContext::set_timeout(double s) {
  MPIEP_CHECK_ARG(s > 0, "timeout_s must be positive");
  timeout_s_ = s;
}

namespace {
// Launches go to the caller's stream, which belongs to this device; switch only when needed
// (cudaGetDevice is a thread-local read, cudaSetDevice is not free).
void ensure_device(int device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device)
    MPIEP_CUDA_CHECK(cudaSetDevice(device));
}
}  // namespace

void LowLatencyContext::dispatch(const LowLatencyDispatchCall& c, cudaStream_t stream) {
  check_shape(c.hidden, c.max_tokens, c.num_experts, c.num_tokens);
  MPIEP_CHECK_ARG(!c.fp8 || c.hidden % 128 == 0,
                  "FP8 low-latency dispatch needs hidden % 128 == 0");
  ensure_device(device_);
  ll::DispatchParams p{};
  p.c = common();
  p.r = regions(c.buffer, c.hidden, c.max_tokens, c.num_experts);
  // A dispatch shares the epoch of the combine after it; a receive hook, that of its send.
  if (c.phases & ll::kSendPhase) dispatch_epoch_[c.buffer] = combines_;
  p.c.epoch = dispatch_epoch_[c.buffer];
  p.x = c.x;
  p.topk_idx = c.topk_idx;
  p.num_tokens = c.num_tokens;
  p.num_topk = c.num_topk;
  p.hidden = c.hidden;
  p.max_tokens = c.max_tokens;
  p.num_experts = c.num_experts;
  p.fp8 = c.fp8;
  p.round_scale = c.round_scale || c.ue8m0;
  p.ue8m0 = c.ue8m0;
  p.recv_x = c.recv_x;
  p.recv_scales = c.recv_scales;
  p.recv_count = c.recv_count;
  p.src_token_idx = c.src_token_idx;
  p.layout_range = c.layout_range;
  p.stats = c.stats;
  p.row_bytes = static_cast<int>(ll::row_bytes(c.hidden));
  const size_t msg = 16 + (c.fp8 ? size_t(c.hidden) + size_t(c.hidden) / 32 : size_t(c.hidden) * 2);
  p.msg_bytes = static_cast<int>(ll::align_up(msg, 16));
  p.phases = c.phases;
  p.num_blocks = num_blocks_;
  p.stall = stall_ & (kStallLlDispatchCount | kStallLlDispatchData);
  ll::launch_dispatch(p, stream);
}

void LowLatencyContext::combine(const LowLatencyCombineCall& c, cudaStream_t stream) {
  check_shape(c.hidden, c.max_tokens, c.num_experts, c.num_tokens);
  ensure_device(device_);
  ll::CombineParams p{};
  p.c = common();
  p.r = regions(c.buffer, c.hidden, c.max_tokens, c.num_experts);
  if (c.phases & ll::kSendPhase) combine_epoch_[c.buffer] = combines_++;
  p.c.epoch = combine_epoch_[c.buffer];
  p.y = c.y;
  p.topk_idx = c.topk_idx;
  p.topk_weights = c.topk_weights;
  p.src_token_idx = c.src_token_idx;
  p.layout_range = c.layout_range;
  p.out = c.out;
  p.num_tokens = c.num_tokens;
  p.num_topk = c.num_topk;
  p.hidden = c.hidden;
  p.max_tokens = c.max_tokens;
  p.num_experts = c.num_experts;
  p.zero_copy = c.zero_copy;
  p.phases = c.phases;
  p.num_blocks = num_blocks_;
  p.stall = stall_ & kStallLlCombine;
  ll::launch_combine(p, stream);
  if (masking_ && (c.phases & ll::kRecvPhase)) record_combine_done(p.c.epoch, stream);
}

void LowLatencyContext::record_combine_done(int epoch, cudaStream_t stream) {
  // Not inside a CUDA graph capture: its replays run without the host (and without recovery).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MPIEP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  MPIEP_CUDA_CHECK(cudaEventRecord(combine_done_[epoch % 2], stream));
  combine_done_epoch_[epoch % 2] = epoch;
}

uint8_t* LowLatencyContext::combine_send_buffer(int buffer, int hidden, int max_tokens,
                                                int num_experts) const {
  check_shape(hidden, max_tokens, num_experts, 0);
  return regions(buffer, hidden, max_tokens, num_experts).comb_send;
}

void LowLatencyContext::clean() {
  // Puts of every PE land before anyone zeroes, and nobody sends again before all have.
  quiet();
  nvshmem_rt::barrier_all();
  reset_signals();
  nvshmem_rt::barrier_all();
}

void LowLatencyContext::quiet() {
  MPIEP_CHECK_ARG(heap_ != nullptr, "the low-latency context was destroyed");
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_rt::quiet_device();
}

void LowLatencyContext::reset_signals() {
  MPIEP_CHECK_ARG(heap_ != nullptr, "the low-latency context was destroyed");
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  for (int h = 0; h < 2; ++h) MPIEP_CUDA_CHECK(cudaMemset(heap_ + h * half_bytes_, 0, kSignal()));
  MPIEP_CUDA_CHECK(cudaMemset(err_lock_, 0, sizeof(int)));
  std::memset(const_cast<ll::ErrorRecord*>(err_host_), 0, sizeof(ll::ErrorRecord));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  // Every rank that cleans together counts combines afresh (beacons compare epochs).
  combines_ = 0;
  dispatch_epoch_[0] = dispatch_epoch_[1] = combine_epoch_[0] = combine_epoch_[1] = 0;
  combine_done_epoch_[0] = combine_done_epoch_[1] = -1;
}

void LowLatencyContext::set_active(const std::vector<int>& active) {
  MPIEP_CHECK_ARG(static_cast<int>(active.size()) == size_, "set_active: one word per rank");
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  // No launch of this rank may read the words while they change.
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int> words(active.size());
  for (size_t r = 0; r < active.size(); ++r) words[r] = active[r] != 0;
  MPIEP_CUDA_CHECK(
      cudaMemcpy(active_, words.data(), words.size() * sizeof(int), cudaMemcpyHostToDevice));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<int> LowLatencyContext::active() const {
  std::vector<int> words(size_);
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  MPIEP_CUDA_CHECK(
      cudaMemcpy(words.data(), active_, words.size() * sizeof(int), cudaMemcpyDeviceToHost));
  return words;
}

std::optional<ll::ErrorRecord> LowLatencyContext::error() const {
  if (masking_ || err_host_ == nullptr || err_host_->flag == 0) return std::nullopt;
  ll::ErrorRecord r;
  std::memcpy(&r, const_cast<const ll::ErrorRecord*>(err_host_), sizeof(r));
  return r;
}

std::optional<ll::ErrorRecord> LowLatencyContext::settled_error() const {
  const int settled = combines_ - 2;  // this combine is number combines_
  if (!masking_ || err_host_ == nullptr || settled < 0) return std::nullopt;
  // That combine has run its receive (the hook rules: its half is this combine's), so its
  // event is recorded; once it has completed, so has every launch of that epoch and before.
  if (combine_done_epoch_[settled % 2] == settled)
    MPIEP_CUDA_CHECK(cudaEventSynchronize(combine_done_[settled % 2]));
  if (err_host_->flag == 0 || err_host_->epoch > settled) return std::nullopt;
  ll::ErrorRecord r;
  std::memcpy(&r, const_cast<const ll::ErrorRecord*>(err_host_), sizeof(r));
  return r;
}

void LowLatencyContext::destroy() {
  if (heap_ == nullptr) return;
  cudaSetDevice(device_);
  cudaDeviceSynchronize();
  nvshmem_rt::barrier_all();
  nvshmem_rt::release(heap_);
  heap_ = nullptr;
  cudaFree(peer_bases_);
  cudaFree(err_lock_);
  cudaFree(active_);
  active_ = nullptr;
  for (auto& e : combine_done_) {
    if (e != nullptr) cudaEventDestroy(e);
    e = nullptr;
  }
  cudaFreeHost(const_cast<ll::ErrorRecord*>(err_host_));
  err_host_ = nullptr;
}

void LowLatencyContext::check_shape(int hidden, int max_tokens, int num_experts,
                                    int num_tokens) const {
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
                "low-latency buffer too small: hidden " + std::to_string(hidden) + ", max tokens " +
                    std::to_string(max_tokens) + ", experts " + std::to_string(num_experts) +
                    " need " +
                    std::to_string(2 * ll::half_bytes_needed(hidden, max_tokens, num_experts)) +
                    " bytes (get_low_latency_rdma_size_hint), the buffer has " +
                    std::to_string(2 * half_bytes_));
  }
}

ll::Common LowLatencyContext::common() const {
  ll::Common c;
  c.heap = heap_;
  c.peer_bases = peer_bases_;
  c.rank = rank_;
  c.num_ranks = size_;
  c.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  c.err = err_dev_;
  c.err_lock = err_lock_;
  c.active = masking_ ? active_ : nullptr;
  return c;
}

ll::Regions LowLatencyContext::regions(int buffer, int hidden, int max_tokens,
                                       int num_experts) const {
  MPIEP_CHECK_ARG(buffer == 0 || buffer == 1, "buffer index must be 0 or 1");
  return ll::make_regions(heap_ + buffer * half_bytes_, hidden, max_tokens, num_experts, size_);
}

}  // namespace mpiep
