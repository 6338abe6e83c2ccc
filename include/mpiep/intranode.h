// Intranode (NVLink, CUDA IPC) normal mode: the buffer layout shared by every rank, the
// kernel parameter blocks and the launchers. Torch-free: pointers, sizes and streams.
//
// Each rank owns one cudaMalloc'd buffer of num_nvl_bytes, mapped by every peer:
//   [0, kControlBytes)   Control (barriers, counts, per-segment progress flags)
//   [kControlBytes, end) rows: a dispatch receive laid out in final output order, or the
//                        rows sent back to this rank by combine.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mpiep/export.h"

namespace mpiep {
namespace intranode {

constexpr int kMaxRanks = 8;      // one NVLink domain
constexpr int kDataWarps = 16;    // warps per block of the data kernels
constexpr int kMaxChannels = 64;  // Config.num_sms / 2
constexpr int kMaxSegments = kMaxChannels * kDataWarps;
constexpr int kMaxLocalExperts = 4096;      // experts per rank
constexpr int64_t kControlBytes = 1 << 20;  // python/mpiep/config.py CONTROL_BYTES

// Error codes written by kernels into HostInfo::error_phase (0 = none).
enum DevicePhase : int {
  kPhaseNone = 0,
  kPhaseNotifyBarrier = 1,
  kPhaseDispatchBarrier = 2,
  kPhaseDispatchRecv = 3,
  kPhaseCombineBarrier = 4,
  kPhaseCombineRecv = 5,
  kPhaseWorstTokensOverflow = 6,
  kPhaseCapacity = 7,
};

// The control area at the start of every rank's buffer. Peers write into it through
// their IPC mapping; all cross-rank words carry epochs, so nothing is ever reset.
struct Control {
  // [src] = the src's notify / data-kernel epoch once it has arrived (monotonic).
  int64_t notify_barrier[kMaxRanks];
  int64_t data_barrier[kMaxRanks];
  // This rank's own epoch counters (device-resident so that CUDA graph replays advance
  // them) and the exit counter of the "last block bumps the epoch" pattern.
  int64_t notify_epoch;
  int64_t data_epoch;
  unsigned int exit_count;
  int pad_[3];
  // Notify payload, double-buffered by epoch parity: a fast rank may write epoch e+1's
  // counts while a slow one still reads epoch e's (the barrier of e+1 cannot pass
  // before every rank finished notify e, so parity e+2 == e is safe).
  // count_matrix[p][src][dst] (dst == R: src's token count).
  int count_matrix[2][kMaxRanks][kMaxRanks + 1];
  int expert_counts[2][kMaxRanks][kMaxLocalExperts];  // [p][src][local expert]
  // Dispatch: per (src, segment) progress written by src: epoch << 32 | final << 31 | rows.
  uint64_t dispatch_flag[kMaxRanks][kMaxSegments];
  int dispatch_start[kMaxRanks][kMaxSegments];  // first row of that segment here
  // Combine: per (src, segment): epoch << 32 | source tokens of the segment covered.
  uint64_t combine_flag[kMaxRanks][kMaxSegments];
};
static_assert(sizeof(Control) <= kControlBytes, "control area too large");

// Host-mapped (cudaHostAllocMapped) memory: the notify results and the error report.
struct HostInfo {
  volatile int64_t ready_token;  // the host token of the last finished notify
  volatile int error_phase;      // DevicePhase of the first device error
  volatile int error_peer;       // the rank waited on, or -1
  int count_matrix[kMaxRanks][kMaxRanks + 1];
  int recv_per_expert[kMaxLocalExperts];  // this rank's local experts, padded
};

struct LayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_experts, num_ranks;
  int* num_tokens_per_rank;    // [R]
  int* num_tokens_per_expert;  // [E]
  bool* is_token_in_rank;      // [T, R]
};

struct PeerPointers {
  Control* ctrl[kMaxRanks];
  uint8_t* rows[kMaxRanks];  // the row area of each rank's buffer
  HostInfo* host;            // device alias of this rank's HostInfo
  int rank, num_ranks;
  int64_t row_area_bytes;
  uint64_t timeout_ns;
};

struct NotifyArgs {
  PeerPointers peers;
  const int* num_tokens_per_rank;    // [R]
  const int* num_tokens_per_expert;  // [E]
  const bool* is_token_in_rank;      // [T, R]
  int num_tokens, num_experts, expert_alignment;
  int64_t host_token;
  int* send_slot;     // out [T, R]: slot in the receiver's block, or -1 - exclusive prefix
  int* count_matrix;  // out [R, R + 1]
};

struct DispatchArgs {
  PeerPointers peers;
  const void* x;              // [T, hidden_bytes]
  const float* x_scales;      // [T, num_scales] or null
  const int64_t* topk_idx;    // [T, K] or null
  const float* topk_weights;  // [T, K] or null
  const int* send_slot;       // [T, R]
  const int* count_matrix;    // [R, R + 1]
  int num_tokens, hidden_bytes, num_scales, num_topk, num_local_experts;
  void* recv_x;              // [num_out_rows, hidden_bytes]
  float* recv_scales;        // [num_out_rows, num_scales] or null
  int64_t* recv_topk_idx;    // [num_out_rows, K] or null
  float* recv_topk_weights;  // [num_out_rows, K] or null
  int* recv_src_idx;         // [num_out_rows]
  int num_out_rows;          // rows of the outputs
  int worst;                 // 1: num_out_rows is num_worst_tokens (pad the tail)
  int num_channels;
};

struct CombineArgs {
  PeerPointers peers;
  const void* x;              // [N, H] bf16, rows in the dispatch's receive order
  const float* topk_weights;  // [N, K] or null
  const int* recv_src_idx;    // [N]
  const int* send_slot;       // [T, R] from the dispatch
  const int* count_matrix;    // [R, R + 1] from the dispatch
  const void* bias0;          // [T, H] bf16 or null
  const void* bias1;
  int num_tokens, hidden, num_topk;
  void* out;           // [T, H] bf16
  float* out_weights;  // [T, K] or null
  int num_channels;
};

// Row layouts in the row area (all offsets 16-byte aligned).
// Dispatch row: data | FP8 scales (float) | topk local ids (int32) | weights | source id.
// Combine row: BF16 data | top-k weights.
__host__ __device__ inline int align16(int64_t n) { return static_cast<int>((n + 15) / 16 * 16); }
__host__ __device__ inline int dispatch_row_bytes(int hidden_bytes, int num_scales, int num_topk) {
  return align16(hidden_bytes) + align16(num_scales * 4) + align16(num_topk * 8 + 4);
}
__host__ __device__ inline int combine_row_bytes(int hidden, int num_topk) {
  return align16(hidden * 2) + align16(num_topk * 4);
}

MPIEP_API void launch_layout(const LayoutArgs& a, cudaStream_t stream);
void launch_notify(const NotifyArgs& a, cudaStream_t stream);
void launch_dispatch(const DispatchArgs& a, cudaStream_t stream);
void launch_combine(const CombineArgs& a, cudaStream_t stream);

}  // namespace intranode
}  // namespace mpiep
