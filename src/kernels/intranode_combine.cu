// Combine data kernel: the reverse of dispatch. Blocks [0, C) send, [C, 2C) reduce;
// warp w of channel c owns segment g = c * kDataWarps + w of every source's tokens.
//
// Sender warp (on a dispatch receiver): for each source s, the rows of s are contiguous
// and sorted by source token; a binary search on recv_src_idx finds the rows of segment
// g, which go back into s's buffer at (rows s sent to lower ranks) + slot. Progress is
// published in source-token units, round-robin over the sources.
//
// Reducer warp (on a source): for each token of segment g, waits until every rank the
// token went to has covered it, then sums in fp32 (rank order, then the biases) and
// writes BF16; the top-k weights are summed the same way. Its own contribution is read
// straight from the combine input, never copied through the buffer.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/intranode_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace intranode {
namespace {

constexpr int kThreads = kDataWarps * 32;
constexpr int kUnroll = 4;
constexpr int kReduceUnroll = 2;
constexpr int kPublishEvery = 4;

__device__ __forceinline__ int lower_bound(const int* v, int n, int key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (__ldg(v + mid) < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ void send_segment(const CombineArgs& a, int row_bytes, int w_off, uint32_t epoch, int g,
                             int S) {
  const PeerPointers& p = a.peers;
  const int R = p.num_ranks, me = p.rank, K = a.num_topk, lane = threadIdx.x % 32;
  const int* M = a.count_matrix;
  const int n16 = a.hidden * 2 / 16;
  // Lane s < R (s != me) holds source s's cursor over the rows of this segment.
  int cur = 0, hi = 0, t0 = 0, t1 = 0;
  int64_t P = 0, base = 0;
  if (lane < R && lane != me) {
    const int Ts = M[lane * (R + 1) + R];
    t0 = static_cast<int>(static_cast<int64_t>(g) * Ts / S);
    t1 = static_cast<int>(static_cast<int64_t>(g + 1) * Ts / S);
    for (int s = 0; s < lane; ++s) P += M[s * (R + 1) + me];
    const int n = M[lane * (R + 1) + me];
    cur = lower_bound(a.recv_src_idx + P, n, t0);
    hi = lower_bound(a.recv_src_idx + P, n, t1);
    for (int r = 0; r < me; ++r) base += M[lane * (R + 1) + r];
  }
  bool done = lane >= R || lane == me;
  while (!__all_sync(kFullMask, done)) {
    for (int s = 0; s < R; ++s) {
      if (__shfl_sync(kFullMask, done ? 1 : 0, s)) continue;
      const int from = __shfl_sync(kFullMask, cur, s);
      const int end = min(__shfl_sync(kFullMask, hi, s), from + kPublishEvery);
      const int64_t Ps = __shfl_sync(kFullMask, P, s);
      const int64_t bs = __shfl_sync(kFullMask, base, s);
      for (int i = from; i < end; ++i) {
        const int4* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) +
                                                        (Ps + i) * a.hidden * 2);
        uint8_t* dst = p.rows[s] + (bs + i) * row_bytes;
        for (int k = lane; k < n16; k += 32 * kUnroll) {
          int4 val[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (k + u * 32 < n16) val[u] = ld_input(src + k + u * 32);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (k + u * 32 < n16) reinterpret_cast<int4*>(dst)[k + u * 32] = val[u];
        }
        if (lane < K)
          reinterpret_cast<float*>(dst + w_off)[lane] = a.topk_weights[(Ps + i) * K + lane];
      }
      __syncwarp();
      if (lane == s) {
        cur = end;
        done = cur >= hi;
        // All tokens below the last row's token (or the whole segment) are covered.
        const int covered = done ? t1 - t0 : __ldg(a.recv_src_idx + P + cur - 1) + 1 - t0;
        st_release_sys(&p.ctrl[s]->combine_flag[me][g],
                       (static_cast<uint64_t>(epoch) << 32) | static_cast<uint32_t>(covered));
      }
    }
  }
}

__device__ void reduce_segment(const CombineArgs& a, int row_bytes, int w_off, int64_t epoch, int g,
                               int S) {
  const PeerPointers& p = a.peers;
  const int R = p.num_ranks, me = p.rank, K = a.num_topk, T = a.num_tokens;
  const int lane = threadIdx.x % 32;
  const int* M = a.count_matrix;
  Control* own = p.ctrl[me];
  const uint8_t* rows = p.rows[me];
  const int t0 = static_cast<int>(static_cast<int64_t>(g) * T / S);
  const int t1 = static_cast<int>(static_cast<int64_t>(g + 1) * T / S);
  const int n16 = a.hidden * 2 / 16;
  // Lane j < R: where rank j's rows for me start (my own rows in x: the rows I received
  // from lower ranks; a peer's rows in my buffer: what I sent to lower ranks), and how
  // far into the segment rank j is known to have sent.
  int64_t base = 0;
  int known = 0;
  if (lane < R) {
    if (lane == me) {
      for (int s = 0; s < me; ++s) base += M[s * (R + 1) + me];
    } else {
      for (int r = 0; r < lane; ++r) base += M[me * (R + 1) + r];
    }
  }
  for (int t = t0; t < t1; ++t) {
    const int v = lane < R ? a.send_slot[static_cast<int64_t>(t) * R + lane] : -1;
    bool failed = false;
    if (v >= 0 && lane != me && known <= t - t0) {
      const uint64_t deadline = global_ns() + p.timeout_ns;
      while (true) {
        const uint64_t f = ld_acquire_sys(&own->combine_flag[lane][g]);
        if (static_cast<uint32_t>(f >> 32) == static_cast<uint32_t>(epoch))
          known = static_cast<int>(f & 0xffffffffu);
        if (known > t - t0) break;
        if (global_ns() > deadline) {
          report_error(p.host, kPhaseCombineRecv, silent_source(p, epoch, lane));
          failed = true;
          break;
        }
      }
    }
    if (__any_sync(kFullMask, failed)) return;
    __syncwarp();
    const unsigned members = __ballot_sync(kFullMask, v >= 0);
    const int64_t my_row = base + v;
    const uint8_t* src[kMaxRanks];
    int64_t self_row = -1;
#pragma unroll
    for (int j = 0; j < kMaxRanks; ++j) {
      const int64_t row = __shfl_sync(kFullMask, my_row, j);
      src[j] = nullptr;
      if (j < R && ((members >> j) & 1u)) {
        if (j == me) {
          self_row = row;
          src[j] = static_cast<const uint8_t*>(a.x) + row * a.hidden * 2;
        } else {
          src[j] = rows + row * row_bytes;
        }
      }
    }
    const int4* b0 =
        a.bias0 ? reinterpret_cast<const int4*>(a.bias0) + static_cast<int64_t>(t) * n16 : nullptr;
    const int4* b1 =
        a.bias1 ? reinterpret_cast<const int4*>(a.bias1) + static_cast<int64_t>(t) * n16 : nullptr;
    int4* out = reinterpret_cast<int4*>(a.out) + static_cast<int64_t>(t) * n16;
    for (int i = lane; i < n16; i += 32 * kReduceUnroll) {
      float acc[kReduceUnroll][8];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j) {
        if (!src[j]) continue;
        int4 val[kReduceUnroll];
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u)
          if (i + u * 32 < n16)
            val[u] = ld_peer_written(reinterpret_cast<const int4*>(src[j]) + i + u * 32);
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u)
          if (i + u * 32 < n16) add_bf16x8(acc[u], val[u]);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int idx = i + u * 32;
        if (idx >= n16) break;
        if (b0) add_bf16x8(acc[u], __ldg(b0 + idx));
        if (b1) add_bf16x8(acc[u], __ldg(b1 + idx));
        out[idx] = pack_bf16x8(acc[u]);
      }
    }
    if (a.out_weights && lane < K) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j) {
        if (!src[j]) continue;
        if (j == me) {
          sum += __ldg(a.topk_weights + self_row * K + lane);
        } else {
          sum += __ldcg(reinterpret_cast<const float*>(src[j] + w_off) + lane);
        }
      }
      a.out_weights[static_cast<int64_t>(t) * K + lane] = sum;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    combine_kernel(const __grid_constant__ CombineArgs a) {
  const PeerPointers& p = a.peers;
  Control* own = p.ctrl[p.rank];
  const int64_t epoch = read_data_epoch(own);
  const int C = a.num_channels;
  const bool sender = static_cast<int>(blockIdx.x) < C;
  const int channel = sender ? blockIdx.x : blockIdx.x - C;
  const int S = C * kDataWarps, g = channel * kDataWarps + threadIdx.x / 32;
  const int row_bytes = combine_row_bytes(a.hidden, a.num_topk);
  const int w_off = align16(a.hidden * 2);
  // Rows arriving at rank r in combine = rows r sent in dispatch (row r of the matrix).
  if (rows_fit(p, a.count_matrix, row_bytes, 0, false) &&
      data_barrier(p, epoch, kPhaseCombineBarrier, sender)) {
    if (sender) {
      send_segment(a, row_bytes, w_off, static_cast<uint32_t>(epoch), g, S);
    } else {
      reduce_segment(a, row_bytes, w_off, epoch, g, S);
    }
  }
  finish_data_kernel(own, epoch);
}

}  // namespace

void launch_combine(const CombineArgs& a, cudaStream_t stream) {
  MPIEP_CHECK_ARG(a.num_channels >= 1 && a.num_channels <= kMaxChannels,
                  "intranode combine: Config.num_sms must be in [2, 128]");
  MPIEP_CHECK_ARG(a.hidden % 8 == 0, "intranode combine: hidden must be a multiple of 8");
  MPIEP_CHECK_ARG(a.num_topk <= 32, "intranode combine: at most 32 top-k slots");
  combine_kernel<<<2 * a.num_channels, kThreads, 0, stream>>>(a);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace intranode
}  // namespace mpiep
