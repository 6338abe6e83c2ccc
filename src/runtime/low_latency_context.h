// The low-latency mode's per-Buffer runtime: the NVSHMEM symmetric heap (two halves, double
// buffering), the table of peers mapped by NVLink, the host-mapped timeout record, the device
// words of rank masking, and the launches of the dispatch / combine kernels on a caller's
// stream. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "mpiep/export.h"
#include "mpiep/low_latency.h"

namespace mpiep {

// One low-latency dispatch: device pointers and sizes (see ll::DispatchParams).
struct LowLatencyDispatchCall {
  const void* x;            // [T, H] bf16
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, hidden, max_tokens, num_experts;
  bool fp8, round_scale, ue8m0;
  void* recv_x;
  void* recv_scales;  // or null
  int* recv_count;
  int* src_token_idx;
  int* layout_range;
  int* stats;  // or null
  int buffer;  // 0 or 1: the heap half
  int phases;  // ll::kSendPhase | ll::kRecvPhase
};

// One low-latency combine.
struct LowLatencyCombineCall {
  const void* y;  // [E_local, R*max, H] bf16
  const int64_t* topk_idx;
  const float* topk_weights;
  const int* src_token_idx;
  const int* layout_range;
  void* out;  // [T, H] bf16
  int num_tokens, num_topk, hidden, max_tokens, num_experts;
  bool zero_copy;
  int buffer, phases;
};

class MPIEP_API LowLatencyContext {
 public:
  LowLatencyContext(int device, size_t heap_bytes, bool allow_nvlink, int num_blocks,
                    double timeout_s);
  ~LowLatencyContext();
  LowLatencyContext(const LowLatencyContext&) = delete;
  LowLatencyContext& operator=(const LowLatencyContext&) = delete;

  void set_timeout(double s);
  void dispatch(const LowLatencyDispatchCall& c, cudaStream_t stream);
  void combine(const LowLatencyCombineCall& c, cudaStream_t stream);
  // The symmetric area the next combine into `buffer` sends from (zero-copy combine).
  uint8_t* combine_send_buffer(int buffer, int hidden, int max_tokens, int num_experts) const;
  // Every rank together (none masked): quiet, barrier, reset_signals, barrier (NVSHMEM's).
  void clean();
  // The two halves of a clean among the active ranks only, whose barriers the caller runs
  // (MPI over the active ranks: NVSHMEM's barrier would wait for a masked PE): quiet() on
  // every active rank, barrier, reset_signals(), barrier.
  void quiet();          // this PE's NVSHMEM puts have completed (device-side quiet)
  void reset_signals();  // zero every signal of both halves and the timeout state
  // The first timed-out wait, if any; with rank masking none (the kernels mask the silent
  // rank and go on; the host learns of it from settled_error).
  std::optional<ll::ErrorRecord> error() const;
  // Rank masking, at a combine's entry: a timeout recorded by a launch of combine epoch <=
  // (this combine's) - 2, once that combine has completed. Every survivor records a silent rank
  // within one epoch (dispatch counts and combine beacons reach every rank), so every survivor
  // sees it at the same combine, whatever its host's timing.
  std::optional<ll::ErrorRecord> settled_error() const;
  void destroy();

  // Rank masking: from enable_masking() on, every launch reads the device words set by
  // set_active ([R], 1 = takes part); a timed-out wait clears its peer's word.
  void enable_masking() { masking_ = true; }
  bool masking() const { return masking_; }
  void set_active(const std::vector<int>& active);
  std::vector<int> active() const;  // the device words now (synchronises the device)
  // Test only (mpiep/test_stall.h): this rank withholds its part of the given phases.
  void set_test_stall(int phases) { stall_ = phases; }
  int test_stall() const { return stall_; }

  std::vector<bool> nvlink_peers() const { return nvlink_peers_; }
  size_t half_bytes() const { return half_bytes_; }
  uint8_t* heap() const { return heap_; }
  double timeout_s() const { return timeout_s_; }
  int num_ranks() const { return size_; }
  int device() const { return device_; }
  int num_blocks() const { return num_blocks_; }  // per launch, after the residency clamp

 private:
  static size_t kSignal() { return ll::kSignalBytes; }
  void check_shape(int hidden, int max_tokens, int num_experts, int num_tokens) const;
  ll::Common common() const;
  void record_combine_done(int epoch, cudaStream_t stream);
  ll::Regions regions(int buffer, int hidden, int max_tokens, int num_experts) const;

  int device_ = 0, num_blocks_ = 1, rank_ = 0, size_ = 1;
  size_t half_bytes_ = 0;
  uint8_t* heap_ = nullptr;
  uint8_t** peer_bases_ = nullptr;
  volatile ll::ErrorRecord* err_host_ = nullptr;
  ll::ErrorRecord* err_dev_ = nullptr;
  int* err_lock_ = nullptr;
  int* active_ = nullptr;  // [R] device words of rank masking
  bool masking_ = false;
  int stall_ = 0;
  // Combine epochs (see low_latency.h): combines launched since the last clean, the epoch of
  // the send launched into each half (its receive hook launches later), and, with masking, an
  // event recorded after each combine's receive (slot epoch % 2; which epoch it holds).
  int combines_ = 0;
  int dispatch_epoch_[2] = {0, 0}, combine_epoch_[2] = {0, 0};
  cudaEvent_t combine_done_[2] = {nullptr, nullptr};
  int combine_done_epoch_[2] = {-1, -1};
  double timeout_s_ = 0;
  std::vector<bool> nvlink_peers_;
};

}  // namespace mpiep
