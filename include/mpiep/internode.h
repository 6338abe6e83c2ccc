// Internode normal mode: NVLink inside a node (CUDA IPC buffers), RDMA between nodes
// (NVSHMEM symmetric heap), NVLink forwarding. Torch-free: pointers, sizes, streams.
//
// Ranks are numbered node-major: rank = node * L + local, L ranks per node (any L <= 8).
// A rank's RDMA peers are the ranks with the same local index on every node (itself
// included); its NVLink peers are the L ranks of its node.
//
// Dispatch (one data kernel after a notify kernel; every warp runs the three phases in
// order, so later phases start while other warps still send):
//   1. send:    each token goes once to every node that owns one of its experts, into the
//               RDMA receive area of the same-local-index rank there (the forwarder);
//               rows go in chunks of `chunk` tokens, each chunk flagged with the epoch.
//   2. forward: a forwarder writes each received row, over NVLink, into the NVLink buffer
//               of every local rank the token is for, at its final row (source rank, then
//               token order), and counts the rows per receiver.
//   3. receive: a rank waits for the counts of its L forwarders and copies its NVLink
//               buffer rows into the output tensors.
// Combine is the reverse: receivers push their rows into their forwarders' NVLink buffers,
// forwarders sum the rows of each token per node (fp32, sent as BF16) and put one row per
// token back to its source over RDMA, and sources sum the per-node rows in fp32.
//
// Every cross-rank offset derives from the count matrix that notify exchanges: the
// `Tables` below are computed once per dispatch and kept in the handle for combine and
// cached dispatch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mpiep/export.h"

namespace mpiep {
namespace internode {

constexpr int kMaxLocalRanks = 8;  // one NVLink domain
constexpr int kMaxNodes = 128;     // nodes of one EP group
constexpr int kMaxRanks = 1024;    // kMaxLocalRanks * kMaxNodes
constexpr int kMaxLocalExperts = 1024;
constexpr int kMaxTopk = 32;            // one lane per top-k slot
constexpr int kDataWarps = 16;          // warps per block of the data kernels
constexpr int kMaxSms = 128;            // blocks of the data kernels (Config.num_sms)
constexpr int kChunksPerSource = 4096;  // RDMA chunk flags per source node
constexpr int64_t kNvlControlBytes = 1 << 20;

// Error codes written by kernels into HostInfo::error_phase (0 = none).
enum DevicePhase : int {
  kPhaseNone = 0,
  kPhaseNotify = 1,           // waiting for a rank's counts
  kPhaseBarrier = 2,          // start-of-kernel barrier, peer did not start the call
  kPhaseDispatchForward = 3,  // forwarder waiting for a source's RDMA rows
  kPhaseDispatchRecv = 4,     // receiver waiting for a forwarder's NVLink rows
  kPhaseCombineForward = 5,   // forwarder waiting for a local rank's combine rows
  kPhaseCombineRecv = 6,      // source waiting for a forwarder's reduced rows
  kPhaseCapacity = 7,         // a receive does not fit a buffer (peer = that rank)
  kPhaseWorstTokens = 8,      // a rank receives more rows than num_worst_tokens
  kPhaseDispatchBarrier = 9,  // kPhaseBarrier of the dispatch kernel
  kPhaseCombineBarrier = 10,  // kPhaseBarrier of the combine kernel
};

// The NVLink (CUDA IPC) control area at the start of every rank's NVLink buffer.
struct NvlControl {
  int64_t barrier[kMaxLocalRanks];  // [local peer] = its data epoch once it started
  int64_t data_epoch;               // this rank's epoch of the data kernels
  int64_t notify_epoch;             // this rank's epoch of the notify kernel
  unsigned int exit_count;          // "last block leaves" counter of the data kernels
  // Set with the first device error of this rank: waits poll it here, in device memory,
  // and never the host-mapped error record (a PCIe read per poll of every waiting warp).
  int failed;
  int pad_[2];
  // Rows delivered into this rank's NVLink buffer, added by the writers after each chunk
  // and reset by the last block of the kernel that consumed them. Counted per source node,
  // so that a reader can start on one node's rows while others are still on their way.
  unsigned long long dispatch_rows[kMaxLocalRanks][kMaxNodes];  // [forwarder][source node]
  unsigned long long combine_rows[kMaxLocalRanks][kMaxNodes];   // [receiver][source node]
};
static_assert(sizeof(NvlControl) <= kNvlControlBytes, "NVLink control area too large");

// Host-mapped memory (cudaHostAllocMapped): notify results and the error report.
struct HostInfo {
  volatile int64_t ready_token;           // host token of the last finished notify
  volatile int error_phase;               // DevicePhase of the first device error
  volatile int error_peer;                // the rank waited on (or the rank over capacity)
  int status[8];                          // the notify's TableStatus words (see below)
  int recv_per_expert[kMaxLocalExperts];  // this rank's local experts, padded
};

// Layout of the symmetric (NVSHMEM) control area; identical on every rank.
struct RdmaControlLayout {
  int64_t notify_flag_rows;     // u64 [R]: epoch once src's count row arrived
  int64_t notify_flag_experts;  // u64 [R]: epoch once src's expert counts arrived
  int64_t barrier_flag;         // u64 [N]: data epoch of the node peer on node m
  int64_t dispatch_flag;        // u64 [N][kChunksPerSource]: epoch once chunk k arrived
  int64_t combine_flag;         // u64 [N][kChunksPerSource]
  int64_t notify_rows;          // int [2][R][R + N + 1]: parity, src, (per rank, per node, T)
  int64_t notify_experts;       // int [2][R][kMaxLocalExperts]
  int64_t notify_send;          // int [R + N + 1 + R * kMaxLocalExperts]: staging for puts
  int64_t total;                // bytes of the control area (multiple of 4096)
};

__host__ __device__ inline int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

__host__ __device__ inline RdmaControlLayout rdma_control_layout(int num_ranks, int num_nodes) {
  RdmaControlLayout l{};
  const int64_t R = num_ranks, N = num_nodes;
  int64_t off = 0;
  l.notify_flag_rows = off;
  off += align_up(R * 8, 128);
  l.notify_flag_experts = off;
  off += align_up(R * 8, 128);
  l.barrier_flag = off;
  off += align_up(N * 8, 128);
  l.dispatch_flag = off;
  off += align_up(N * kChunksPerSource * 8, 128);
  l.combine_flag = off;
  off += align_up(N * kChunksPerSource * 8, 128);
  l.notify_rows = off;
  off += align_up(2 * R * (R + N + 1) * 4, 128);
  l.notify_experts = off;
  off += align_up(2 * R * kMaxLocalExperts * 4, 128);
  l.notify_send = off;
  off += align_up((R + N + 1 + R * kMaxLocalExperts) * 4, 128);
  l.total = align_up(off, 4096);
  return l;
}

// Row layouts (all offsets 16-byte aligned).
// RDMA dispatch row: data | FP8 scales | topk global ids (int32) | weights | source token |
//                    position in each local receiver's order (-1: not for it).
// NVLink dispatch row: data | FP8 scales | topk local ids (int32) | weights | source token.
// Combine row (NVLink and RDMA): BF16 data | top-k weights (float).
__host__ __device__ inline int64_t align16(int64_t n) { return align_up(n, 16); }
__host__ __device__ inline int64_t rdma_dispatch_row_bytes(int hidden_bytes, int num_scales,
                                                           int num_topk, int local_ranks) {
  return align16(hidden_bytes) + align16(num_scales * 4) +
         align16((2 * num_topk + 1 + local_ranks) * 4);
}
__host__ __device__ inline int64_t nvl_dispatch_row_bytes(int hidden_bytes, int num_scales,
                                                          int num_topk) {
  return align16(hidden_bytes) + align16(num_scales * 4) + align16((2 * num_topk + 1) * 4);
}
__host__ __device__ inline int64_t combine_row_bytes(int hidden, int num_topk) {
  return align16(int64_t(hidden) * 2) + align16(num_topk * 4);
}

// Per-dispatch tables (int32, on the device), computed by notify from the count matrix.
// Offsets are in rows. R ranks, N nodes, L local ranks; this rank is (n0, l0).
struct TableLayout {
  int status, recv_prefix, rdma_in_base, rdma_in_count, rdma_out_base, my_node_base, comb_out_base,
      fwd_slot_base, recv_slot_base, total;
};
// Row counts: the maxima over all ranks (identical on every rank, so that every rank takes
// the same capacity decision) and this rank's own.
enum TableStatus : int {
  kMaxRecv = 0,      // rows a rank receives in dispatch (its NVLink dispatch area)
  kMaxRdmaRows = 1,  // rows a forwarder receives over RDMA (its RDMA receive area)
  kMaxFwdRows = 2,   // rows a forwarder forwards (its NVLink combine area)
  kMaxSendRows = 3,  // rows a rank sends over RDMA (its combine receive area)
  kNumRecv = 4,      // the same four for this rank
  kRdmaRows = 5,
  kFwdRows = 6,
  kSendRows = 7,
  kStatusCount = 8,
};
__host__ __device__ inline TableLayout table_layout(int R, int N, int L) {
  TableLayout t{};
  int off = 0;
  t.status = off;
  off += kStatusCount;
  t.recv_prefix = off;  // [L][R]: rows of (n0, j) from sources below s
  off += L * R;
  t.rdma_in_base = off;  // [N]: where source node m's rows start in my RDMA area
  off += N;
  t.rdma_in_count = off;  // [N]: rows source node m sends to my RDMA area
  off += N;
  t.rdma_out_base = off;  // [N]: where my rows start in node n's forwarder's RDMA area
  off += N;
  t.my_node_base = off;  // [N]: exclusive prefix of my per-node token counts
  off += N;
  t.comb_out_base = off;  // [N]: where my node's rows start in source (m, l0)'s combine area
  off += N;
  t.fwd_slot_base = off;  // [L][N]: my combine NVLink slots of (j, source node m)
  off += L * N;
  t.recv_slot_base = off;  // [L][N]: my slots in forwarder l's combine area, source node m
  off += L * N;
  t.total = off;
  return t;
}

struct Topology {
  int rank, num_ranks, num_nodes, local_ranks;  // rank = node * local_ranks + local
  int node, local;
};

// Everything a kernel needs to reach its peers.
struct Peers {
  Topology topo;
  NvlControl* nvl_ctrl[kMaxLocalRanks];  // each local rank's NVLink control area
  uint8_t* nvl_rows[kMaxLocalRanks];     // each local rank's NVLink row area
  int64_t nvl_row_bytes;                 // size of every rank's NVLink row area
  uint8_t* rdma;                         // this rank's symmetric area (NVSHMEM heap)
  uint8_t* const* rdma_peer;             // [R] device array: peer's area mapped here, or null
  int64_t rdma_data_bytes;               // bytes after the control area
  RdmaControlLayout rdma_ctrl;
  HostInfo* host;  // device alias of this rank's HostInfo
  uint64_t timeout_ns;
  // 1: some rank has an RDMA peer that is not mapped, so every rank reserves staging space
  // for NVSHMEM puts (the same on all ranks: capacity decisions must agree).
  int staged;
  // 1: NVSHMEM puts even to mapped peers (exercises the RDMA path on one machine).
  int force_puts;
};

struct LayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_experts, num_ranks, local_ranks;
  int* num_tokens_per_rank;       // [R]
  int* num_tokens_per_rdma_rank;  // [N]
  int* num_tokens_per_expert;     // [E]
  bool* is_token_in_rank;         // [T, R]
};

struct NotifyArgs {
  Peers peers;
  const int* num_tokens_per_rank;       // [R]
  const int* num_tokens_per_rdma_rank;  // [N]
  const int* num_tokens_per_expert;     // [E]
  const bool* is_token_in_rank;         // [T, R]
  int num_tokens, num_experts, expert_alignment;
  int64_t host_token;
  int* send_slot;   // out [T, R]: position in (me -> r)'s order, or -1
  int* node_slot;   // out [T, N]: position in my node-n list, or -1
  int* node_token;  // out [N, T]: token at position p of my node-n list
  int* counts;      // out [R, R + N + 1]: every rank's count row
  int* tables;      // out [table_layout().total]
};

struct DispatchArgs {
  Peers peers;
  const void* x;              // [T, hidden_bytes]
  const float* x_scales;      // [T, num_scales] or null
  const int64_t* topk_idx;    // [T, K] or null (cached)
  const float* topk_weights;  // [T, K] or null
  const int* send_slot;       // [T, R]
  const int* node_token;      // [N, T]
  const int* counts;          // [R, R + N + 1]
  const int* tables;
  int num_tokens, hidden_bytes, num_scales, num_topk, num_local_experts;
  int chunk;                 // tokens per RDMA chunk
  int* fwd_pos;              // out [rdma rows, L]: positions of each forwarded row
  void* recv_x;              // [num_out_rows, hidden_bytes]
  float* recv_scales;        // [num_out_rows, num_scales] or null
  int64_t* recv_topk_idx;    // [num_out_rows, K] or null
  float* recv_topk_weights;  // [num_out_rows, K] or null
  int* recv_src_idx;         // [num_out_rows]
  int num_out_rows;
  int worst;  // 1: num_out_rows is num_worst_tokens (pad the tail)
  int num_blocks;
};

struct CombineArgs {
  Peers peers;
  const void* x;              // [N_recv, H] bf16, rows in the dispatch's receive order
  const float* topk_weights;  // [N_recv, K] or null
  const int* node_slot;       // [T, N] from the dispatch
  const int* fwd_pos;         // [rdma rows, L] from the dispatch
  const int* counts;          // [R, R + N + 1]
  const int* tables;
  const void* bias0;  // [T, H] bf16 or null
  const void* bias1;
  int num_tokens, hidden, num_topk;
  int chunk;
  void* out;           // [T, H] bf16
  float* out_weights;  // [T, K] or null
  int num_blocks;
};

MPIEP_API void launch_layout(const LayoutArgs& a, cudaStream_t stream);
void launch_notify(const NotifyArgs& a, cudaStream_t stream);
void launch_dispatch(const DispatchArgs& a, cudaStream_t stream);
void launch_combine(const CombineArgs& a, cudaStream_t stream);

}  // namespace internode
}  // namespace mpiep
