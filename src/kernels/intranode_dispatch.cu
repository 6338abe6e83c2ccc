// Dispatch data kernel. Blocks [0, C) send, blocks [C, 2C) receive; every block has
// kDataWarps warps and warp w of channel c owns segment g = c * kDataWarps + w, a
// contiguous range of the source's tokens.
//
// Sender warp: reads each token row once (16-byte loads) and stores it at its final row
// in every receiver: straight into this rank's outputs for itself, into the peer's
// buffer row area otherwise (the row index is the output row, so the receiver copies
// rows to the same index). Progress per (src, segment) is published with a system-scope
// release every kPublishEvery tokens, so receivers copy while senders still send.
//
// Receiver warp: polls its segment's flag of every source round-robin and copies the
// rows that arrived to the outputs (data, scales, top-k, source ids).
#include <cuda_runtime.h>

#include "kernels/intranode_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace intranode {
namespace {

constexpr int kThreads = kDataWarps * 32;
constexpr int kUnroll = 4;
constexpr int kPublishEvery = 4;

struct RowLayout {
  int row_bytes, scale_off, meta_off;
};

__device__ __forceinline__ RowLayout row_layout(const DispatchArgs& a) {
  RowLayout l;
  l.row_bytes = dispatch_row_bytes(a.hidden_bytes, a.num_scales, a.num_topk);
  l.scale_off = align16(a.hidden_bytes);
  l.meta_off = l.scale_off + align16(a.num_scales * 4);
  return l;
}

__device__ void send_segment(const DispatchArgs& a, const RowLayout& l, uint32_t epoch, int g,
                             int S) {
  const PeerPointers& p = a.peers;
  const int R = p.num_ranks, me = p.rank, K = a.num_topk, T = a.num_tokens;
  const int lane = threadIdx.x % 32;
  const int t0 = static_cast<int>(static_cast<int64_t>(g) * T / S);
  const int t1 = static_cast<int>(static_cast<int64_t>(g + 1) * T / S);
  const int* M = a.count_matrix;

  // Lane j < R keeps the state of destination j: where this rank's rows start in j's
  // receive order, and how many rows of this segment went there.
  int64_t base = 0;
  int sent = 0, published = -1;
  if (lane < R) {
    for (int s = 0; s < me; ++s) base += M[s * (R + 1) + lane];
    const int first = t0 < T ? slot_prefix(a.send_slot[static_cast<int64_t>(t0) * R + lane])
                             : M[me * (R + 1) + lane];
    if (lane != me) p.ctrl[lane]->dispatch_start[me][g] = static_cast<int>(base + first);
  }
  const int n16 = a.hidden_bytes / 16;
  const int E_loc = a.num_local_experts;

  for (int t = t0; t < t1; ++t) {
    const int v = lane < R ? a.send_slot[static_cast<int64_t>(t) * R + lane] : -1;
    const unsigned members = __ballot_sync(kFullMask, v >= 0);
    const int64_t my_row = base + v;
    uint8_t* dst[kMaxRanks];
    int64_t self_row = -1;
#pragma unroll
    for (int j = 0; j < kMaxRanks; ++j) {
      const int64_t row = __shfl_sync(kFullMask, my_row, j);
      dst[j] = nullptr;
      if (j < R && ((members >> j) & 1u)) {
        if (j == me) {
          self_row = row;
        } else {
          dst[j] = p.rows[j] + row * l.row_bytes;
        }
      }
    }
    // Data: load once, store to every destination.
    const int4* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) +
                                                    static_cast<int64_t>(t) * a.hidden_bytes);
    int4* self_dst =
        self_row >= 0
            ? reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + self_row * a.hidden_bytes)
            : nullptr;
    for (int i = lane; i < n16; i += 32 * kUnroll) {
      int4 val[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * 32 < n16) val[u] = ld_input(src + i + u * 32);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int idx = i + u * 32;
        if (idx >= n16) break;
        if (self_dst) self_dst[idx] = val[u];
#pragma unroll
        for (int j = 0; j < kMaxRanks; ++j)
          if (dst[j]) reinterpret_cast<int4*>(dst[j])[idx] = val[u];
      }
    }
    // FP8 scales.
    for (int i = lane; i < a.num_scales; i += 32) {
      const float sc = a.x_scales[static_cast<int64_t>(t) * a.num_scales + i];
      if (self_row >= 0) a.recv_scales[self_row * a.num_scales + i] = sc;
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j)
        if (dst[j]) reinterpret_cast<float*>(dst[j] + l.scale_off)[i] = sc;
    }
    // Top-k as local expert ids (-1 elsewhere), weights kept only for local experts.
    if (lane < K) {
      const int64_t e = a.topk_idx[static_cast<int64_t>(t) * K + lane];
      const float w = a.topk_weights ? a.topk_weights[static_cast<int64_t>(t) * K + lane] : 0.f;
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j) {
        if (!dst[j] && !(j == me && self_row >= 0)) continue;
        const int64_t lo = static_cast<int64_t>(j) * E_loc;
        const int local = (e >= lo && e < lo + E_loc) ? static_cast<int>(e - lo) : -1;
        const float wl = local >= 0 ? w : 0.f;
        if (dst[j]) {
          reinterpret_cast<int*>(dst[j] + l.meta_off)[lane] = local;
          reinterpret_cast<float*>(dst[j] + l.meta_off)[K + lane] = wl;
        } else {
          a.recv_topk_idx[self_row * K + lane] = local;
          if (a.recv_topk_weights) a.recv_topk_weights[self_row * K + lane] = wl;
        }
      }
    }
    if (lane == 0) {
      if (self_row >= 0) a.recv_src_idx[self_row] = t;
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j)
        if (dst[j]) reinterpret_cast<int*>(dst[j] + l.meta_off)[2 * K] = t;
    }
    if (lane < R && v >= 0) ++sent;
    const bool last = t + 1 == t1;
    if (last || (t - t0 + 1) % kPublishEvery == 0) {
      // __syncwarp orders the other lanes' stores before the releasing lane's signal.
      __syncwarp();
      if (lane < R && lane != me && (sent != published || last)) {
        const uint64_t flag = (static_cast<uint64_t>(epoch) << 32) | (last ? 1ull << 31 : 0ull) |
                              static_cast<uint64_t>(sent);
        st_release_sys(&p.ctrl[lane]->dispatch_flag[me][g], flag);
        published = sent;
      }
    }
  }
  if (t0 >= t1 && lane < R && lane != me) {
    st_release_sys(&p.ctrl[lane]->dispatch_flag[me][g],
                   (static_cast<uint64_t>(epoch) << 32) | (1ull << 31));
  }
}

__device__ __forceinline__ void copy_out_row(const DispatchArgs& a, const RowLayout& l,
                                             const uint8_t* rows, int64_t r) {
  const int lane = threadIdx.x % 32, K = a.num_topk;
  const uint8_t* src = rows + r * l.row_bytes;
  const int4* src16 = reinterpret_cast<const int4*>(src);
  int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + r * a.hidden_bytes);
  const int n16 = a.hidden_bytes / 16;
  for (int i = lane; i < n16; i += 32 * kUnroll) {
    int4 val[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n16) val[u] = ld_peer_written(src16 + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n16) out[i + u * 32] = val[u];
  }
  for (int i = lane; i < a.num_scales; i += 32)
    a.recv_scales[r * a.num_scales + i] =
        __ldcg(reinterpret_cast<const float*>(src + l.scale_off) + i);
  const int* meta = reinterpret_cast<const int*>(src + l.meta_off);
  if (lane < K) {
    a.recv_topk_idx[r * K + lane] = __ldcg(meta + lane);
    if (a.recv_topk_weights)
      a.recv_topk_weights[r * K + lane] = __ldcg(reinterpret_cast<const float*>(meta) + K + lane);
  }
  if (lane == 0) a.recv_src_idx[r] = __ldcg(meta + 2 * K);
}

__device__ void recv_segment(const DispatchArgs& a, const RowLayout& l, int64_t epoch, int g,
                             int S) {
  const PeerPointers& p = a.peers;
  const int R = p.num_ranks, me = p.rank, lane = threadIdx.x % 32;
  Control* own = p.ctrl[me];
  const uint8_t* rows = p.rows[me];
  // Lane s < R tracks source s: rows copied, the segment's first row, finished.
  int copied = 0;
  int64_t start = -1;
  bool finished = lane >= R || lane == me;
  uint64_t deadline = global_ns() + p.timeout_ns;
  while (!__all_sync(kFullMask, finished)) {
    bool progressed = false;
    for (int s = 0; s < R; ++s) {
      if (__shfl_sync(kFullMask, finished ? 1 : 0, s)) continue;
      uint64_t f = 0;
      if (lane == s) f = ld_acquire_sys(&own->dispatch_flag[s][g]);
      f = __shfl_sync(kFullMask, f, s);
      __syncwarp();
      if (static_cast<uint32_t>(f >> 32) != static_cast<uint32_t>(epoch)) continue;
      const int done = static_cast<int>(f & 0x7fffffffu);
      const bool fin = (f >> 31) & 1u;
      int from = __shfl_sync(kFullMask, copied, s);
      if (lane == s && start < 0) start = ld_volatile(&own->dispatch_start[s][g]);
      const int64_t first = __shfl_sync(kFullMask, start, s);
      for (int i = from; i < done; ++i) copy_out_row(a, l, rows, first + i);
      if (done > from) progressed = true;
      if (lane == s) {
        copied = done;
        finished = fin;
      }
    }
    if (progressed) {
      deadline = global_ns() + p.timeout_ns;
    } else if (global_ns() > deadline) {
      // Name the source that never started, else the first source still missing.
      const unsigned missing = __ballot_sync(kFullMask, !finished);
      if (lane == 0)
        report_error(p.host, kPhaseDispatchRecv, silent_source(p, epoch, __ffs(missing) - 1));
      return;
    }
  }
}

// num_worst_tokens: rows past the real receive are zero, top-k -1, source id -1.
__device__ void pad_tail(const DispatchArgs& a, int g, int S) {
  const PeerPointers& p = a.peers;
  const int R = p.num_ranks, lane = threadIdx.x % 32, K = a.num_topk;
  int64_t total = 0;
  for (int s = 0; s < R; ++s) total += a.count_matrix[s * (R + 1) + p.rank];
  const int n16 = a.hidden_bytes / 16;
  for (int64_t r = total + g; r < a.num_out_rows; r += S) {
    int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + r * a.hidden_bytes);
    for (int i = lane; i < n16; i += 32) out[i] = make_int4(0, 0, 0, 0);
    for (int i = lane; i < a.num_scales; i += 32) a.recv_scales[r * a.num_scales + i] = 0.f;
    if (lane < K) {
      a.recv_topk_idx[r * K + lane] = -1;
      if (a.recv_topk_weights) a.recv_topk_weights[r * K + lane] = 0.f;
    }
    if (lane == 0) a.recv_src_idx[r] = -1;
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    dispatch_kernel(const __grid_constant__ DispatchArgs a) {
  const PeerPointers& p = a.peers;
  Control* own = p.ctrl[p.rank];
  const int64_t epoch = read_data_epoch(own);
  const int C = a.num_channels;
  const bool sender = static_cast<int>(blockIdx.x) < C;
  const int channel = sender ? blockIdx.x : blockIdx.x - C;
  const int S = C * kDataWarps, g = channel * kDataWarps + threadIdx.x / 32;
  const RowLayout l = row_layout(a);
  if (rows_fit(p, a.count_matrix, l.row_bytes, a.worst ? a.num_out_rows : 0, true) &&
      data_barrier(p, epoch, kPhaseDispatchBarrier, sender)) {
    if (sender) {
      send_segment(a, l, static_cast<uint32_t>(epoch), g, S);
    } else {
      recv_segment(a, l, epoch, g, S);
      if (a.worst) pad_tail(a, g, S);
    }
  }
  finish_data_kernel(own, epoch);
}

}  // namespace

void launch_dispatch(const DispatchArgs& a, cudaStream_t stream) {
  MPIEP_CHECK_ARG(a.num_channels >= 1 && a.num_channels <= kMaxChannels,
                  "intranode dispatch: Config.num_sms must be in [2, 128]");
  MPIEP_CHECK_ARG(a.hidden_bytes % 16 == 0,
                  "intranode dispatch: hidden row bytes must be a multiple of 16");
  MPIEP_CHECK_ARG(a.num_topk <= 32, "intranode dispatch: at most 32 top-k slots");
  dispatch_kernel<<<2 * a.num_channels, kThreads, 0, stream>>>(a);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace intranode
}  // namespace mpiep
