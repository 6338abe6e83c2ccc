// Internode combine data kernel: the reverse of dispatch, three phases per warp.
//   return   my received rows (source by source) -> the NVLink combine area of the source's
//            forwarder in my node (+ per-rank row counts); rows whose forwarder is this rank
//            stay in x, where the reduce reads them
//   reduce   (forwarder) once every local rank delivered its rows: per RDMA row, the fp32
//            sum over the local ranks it went to, sent as BF16 (weights fp32) to the
//            source's combine area over RDMA, chunk by chunk (+ chunk flag)
//   sum      (source) per token, once the chunks it sits in arrived: the fp32 sum over the
//            nodes it went to, plus the biases, as BF16
// The per-node partial sums travel as BF16, as in DeepEP: the result can differ from a
// single fp32 sum by one BF16 rounding of each node's partial sum.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/internode_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace internode {
namespace {

constexpr int kThreads = kDataWarps * 32;
constexpr int kUnroll = 4;
constexpr int kReduceUnroll = 2;

__device__ __forceinline__ void copy_weights(float* dst, const float* src, int K, int lane) {
  if (lane < K) dst[lane] = __ldg(src + lane);
}

// Phase 1: rows from source s (contiguous in my receive order) go to forwarder s % L.
__device__ void return_phase(const CombineArgs& a, const Tables& tb, const Counts& cn,
                             int64_t row_bytes, int64_t w_off, int gw, int num_warps) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int R = tp.num_ranks, L = tp.local_ranks, me = tp.rank, K = a.num_topk;
  const int lane = threadIdx.x % 32, n16 = a.hidden * 2 / 16;
  // The forwarder of sources s % L == mine is this rank: it reads those rows from x itself.
  auto count = [&](int s) { return s % L == tp.local ? 0 : cn.M(s, me); };
  int s, q0, q1;
  for (int i = gw; nth_chunk(i, R, a.chunk, count, &s, &q0, &q1); i += num_warps) {
    const int l = s % L, m = s / L;
    const int64_t first = tb.recv_prefix(tp.local, s);
    uint8_t* dst0 = p.nvl_rows[l] + int64_t(tb.recv_slot_base(l, m)) * row_bytes;
    for (int q = q0; q < q1; ++q) {
      const int4* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) +
                                                      (first + q) * a.hidden * 2);
      uint8_t* dst = dst0 + int64_t(q) * row_bytes;
      for (int k = lane; k < n16; k += 32 * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (k + u * 32 < n16) v[u] = ld_input(src + k + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (k + u * 32 < n16) reinterpret_cast<int4*>(dst)[k + u * 32] = v[u];
      }
      if (a.topk_weights)
        copy_weights(reinterpret_cast<float*>(dst + w_off), a.topk_weights + (first + q) * K, K,
                     lane);
    }
    __syncwarp();
    if (lane == 0) red_add_release_sys(&p.nvl_ctrl[l]->combine_rows[tp.local][m], q1 - q0);
    __syncwarp();
  }
}

// Phase 2 (forwarder): sum each RDMA row's returns over its local ranks, send per chunk.
__device__ bool reduce_phase(const CombineArgs& a, const Tables& tb, int64_t row_bytes,
                             int64_t w_off, uint64_t epoch, int gw, int num_warps) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int N = tp.num_nodes, L = tp.local_ranks, K = a.num_topk;
  const int lane = threadIdx.x % 32, n16 = a.hidden * 2 / 16;
  NvlControl* own = p.nvl_ctrl[tp.local];
  const Counts cn{a.counts, tp.num_ranks, N};
  const uint8_t* slots = p.nvl_rows[tp.local];
  const int64_t data = p.rdma_ctrl.total;
  const int64_t stage = data + align_up(int64_t(tb.status(kSendRows)) * row_bytes, 16);
  auto count = [&](int m) { return tb.rdma_in_count(m); };
  int m, p0, p1, waited = -1;
  for (int i = gw; nth_chunk(i, N, a.chunk, count, &m, &p0, &p1); i += num_warps) {
    const int s = m * L + tp.local;
    if (m != waited) {
      // Every other local rank has returned all its rows of source s (lane j waits for j).
      bool ok = true;
      if (lane < L && lane != tp.local)
        ok = wait_at_least(p, reinterpret_cast<const uint64_t*>(&own->combine_rows[lane][m]),
                           uint64_t(cn.M(s, tp.node * L + lane)), kPhaseCombineForward,
                           tp.node * L + lane);
      if (!__all_sync(kFullMask, ok)) return false;
      waited = m;
    }
    const int64_t remote = data + (int64_t(tb.comb_out_base(m)) + p0) * row_bytes;
    uint8_t* mapped = rdma_direct(p, remote, s);
    uint8_t* base =
        mapped ? mapped : rdma_local(p, stage + (int64_t(tb.rdma_in_base(m)) + p0) * row_bytes);
    for (int q = p0; q < p1; ++q) {
      const int64_t r = int64_t(tb.rdma_in_base(m)) + q;
      const int pos = lane < L ? __ldg(a.fwd_pos + r * L + lane) : -1;
      const unsigned members = __ballot_sync(kFullMask, pos >= 0);
      // Rank j's row: in my combine slots, or (j = me) in my own input x.
      const uint8_t* src[kMaxLocalRanks];
      const float* wsrc[kMaxLocalRanks];
#pragma unroll
      for (int j = 0; j < kMaxLocalRanks; ++j) {
        const int at = __shfl_sync(kFullMask, pos, j);
        src[j] = nullptr;
        wsrc[j] = nullptr;
        if (j >= L || !((members >> j) & 1u)) continue;
        if (j == tp.local) {
          const int64_t row = int64_t(tb.recv_prefix(j, s)) + at;
          src[j] = static_cast<const uint8_t*>(a.x) + row * a.hidden * 2;
          if (a.topk_weights) wsrc[j] = a.topk_weights + row * K;
        } else {
          src[j] = slots + (int64_t(tb.fwd_slot_base(j, m)) + at) * row_bytes;
          wsrc[j] = reinterpret_cast<const float*>(src[j] + w_off);
        }
      }
      uint8_t* dst = base + int64_t(q - p0) * row_bytes;
      for (int k = lane; k < n16; k += 32 * kReduceUnroll) {
        float acc[kReduceUnroll][8];
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
#pragma unroll
        for (int j = 0; j < kMaxLocalRanks; ++j) {
          if (!src[j]) continue;
#pragma unroll
          for (int u = 0; u < kReduceUnroll; ++u)
            if (k + u * 32 < n16)
              add_bf16x8(acc[u],
                         ld_peer_written(reinterpret_cast<const int4*>(src[j]) + k + u * 32));
        }
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u)
          if (k + u * 32 < n16) reinterpret_cast<int4*>(dst)[k + u * 32] = pack_bf16x8(acc[u]);
      }
      if (lane < K) {
        float w = 0.f;
#pragma unroll
        for (int j = 0; j < kMaxLocalRanks; ++j)
          if (wsrc[j]) w += __ldcg(wsrc[j] + lane);
        reinterpret_cast<float*>(dst + w_off)[lane] = w;
      }
    }
    __syncwarp();
    const int64_t flag =
        p.rdma_ctrl.combine_flag + (int64_t(tp.node) * kChunksPerSource + p0 / a.chunk) * 8;
    if (mapped) {
      if (lane == 0) rdma_flag_set(p, flag, epoch, s);
    } else {
      nvshmemx_putmem_signal_nbi_warp(rdma_local(p, remote), base, size_t(p1 - p0) * row_bytes,
                                      reinterpret_cast<uint64_t*>(rdma_local(p, flag)), epoch,
                                      NVSHMEM_SIGNAL_SET, s);
    }
    __syncwarp();
  }
  return true;
}

// Phase 3 (source): each of my tokens, summed over the nodes it went to.
__device__ bool sum_phase(const CombineArgs& a, const Tables& tb, int64_t row_bytes, int64_t w_off,
                          uint64_t epoch, int gw, int num_warps) {
  __shared__ int member_row[kDataWarps][kMaxTopk];  // row in my combine area, per member node
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int N = tp.num_nodes, L = tp.local_ranks, K = a.num_topk, T = a.num_tokens;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n16 = a.hidden * 2 / 16;
  const uint8_t* area = rdma_local(p, p.rdma_ctrl.total);
  const int t0 = static_cast<int>(int64_t(gw) * T / num_warps);
  const int t1 = static_cast<int>(int64_t(gw + 1) * T / num_warps);
  for (int t = t0; t < t1; ++t) {
    // Member nodes of the token (at most K of them), in node order, with their chunk flags.
    int members = 0;
    bool ok = true;
    for (int nb = 0; nb < N; nb += 32) {
      const int n = nb + lane;
      const int slot = n < N ? __ldg(a.node_slot + int64_t(t) * N + n) : -1;
      const unsigned bits = __ballot_sync(kFullMask, slot >= 0);
      if (slot >= 0) {
        const int idx = members + __popc(bits & ((1u << lane) - 1u));
        if (idx < kMaxTopk) member_row[warp][idx] = tb.my_node_base(n) + slot;
        const int64_t flag =
            p.rdma_ctrl.combine_flag + (int64_t(n) * kChunksPerSource + slot / a.chunk) * 8;
        ok = ok && wait_at_least(p, reinterpret_cast<const uint64_t*>(rdma_local(p, flag)), epoch,
                                 kPhaseCombineRecv, n * L + tp.local);
      }
      members += __popc(bits);
    }
    if (!__all_sync(kFullMask, ok)) return false;
    members = min(members, kMaxTopk);
    __syncwarp();
    const int4* b0 = a.bias0 ? reinterpret_cast<const int4*>(a.bias0) + int64_t(t) * n16 : nullptr;
    const int4* b1 = a.bias1 ? reinterpret_cast<const int4*>(a.bias1) + int64_t(t) * n16 : nullptr;
    int4* out = reinterpret_cast<int4*>(a.out) + int64_t(t) * n16;
    for (int k = lane; k < n16; k += 32 * kReduceUnroll) {
      float acc[kReduceUnroll][8];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
      for (int i = 0; i < members; ++i) {
        const int4* row =
            reinterpret_cast<const int4*>(area + int64_t(member_row[warp][i]) * row_bytes);
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u)
          if (k + u * 32 < n16) add_bf16x8(acc[u], ld_peer_written(row + k + u * 32));
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        if (k + u * 32 >= n16) break;
        if (b0) add_bf16x8(acc[u], __ldg(b0 + k + u * 32));
        if (b1) add_bf16x8(acc[u], __ldg(b1 + k + u * 32));
        out[k + u * 32] = pack_bf16x8(acc[u]);
      }
    }
    if (a.out_weights && lane < K) {
      float w = 0.f;
      for (int i = 0; i < members; ++i)
        w += __ldcg(reinterpret_cast<const float*>(area + int64_t(member_row[warp][i]) * row_bytes +
                                                   w_off) +
                    lane);
      a.out_weights[int64_t(t) * K + lane] = w;
    }
    __syncwarp();
  }
  return true;
}

__global__ void __launch_bounds__(kThreads, 1)
    combine_kernel(const __grid_constant__ CombineArgs a) {
  const Peers& p = a.peers;
  NvlControl* own = p.nvl_ctrl[p.topo.local];
  const int64_t epoch = read_data_epoch(own);
  const Tables tb = tables_of(p, a.tables);
  const Counts cn{a.counts, p.topo.num_ranks, p.topo.num_nodes};
  const int64_t row_bytes = combine_row_bytes(a.hidden, a.num_topk);
  const int64_t w_off = align16(int64_t(a.hidden) * 2);
  const int num_warps = gridDim.x * kDataWarps;
  const int gw = blockIdx.x * kDataWarps + threadIdx.x / 32;
  // NVLink: a forwarder's slots; RDMA: a source's combine area (+ a forwarder's staging).
  const int64_t staged_rows = p.staged ? tb.status(kMaxRdmaRows) : 0;
  if (fits(p, tb, tb.status(kMaxFwdRows), row_bytes, tb.status(kMaxSendRows), row_bytes,
           staged_rows, row_bytes, 0) &&
      start_barrier(p, epoch, kPhaseCombineBarrier)) {
    return_phase(a, tb, cn, row_bytes, w_off, gw, num_warps);
    if (reduce_phase(a, tb, row_bytes, w_off, uint64_t(epoch), gw, num_warps))
      sum_phase(a, tb, row_bytes, w_off, uint64_t(epoch), gw, num_warps);
  }
  finish_data_kernel(own, epoch, own->combine_rows, p.topo.local_ranks, p.topo.num_nodes);
}

}  // namespace

void launch_combine(const CombineArgs& a, cudaStream_t stream) {
  MPIEP_CHECK_ARG(a.num_blocks >= 1 && a.num_blocks <= kMaxSms,
                  "internode combine: Config.num_sms must be in [1, 128]");
  MPIEP_CHECK_ARG(a.hidden % 8 == 0, "internode combine: hidden must be a multiple of 8");
  MPIEP_CHECK_ARG(a.num_topk <= kMaxTopk, "internode combine: at most 32 top-k slots");
  MPIEP_CHECK_ARG(a.chunk >= 1, "internode combine: chunk must be positive");
  MPIEP_CHECK_ARG(int64_t(a.num_tokens) <= int64_t(a.chunk) * kChunksPerSource,
                  "internode combine: too many tokens for the chunk size");
  combine_kernel<<<a.num_blocks, kThreads, 0, stream>>>(a);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace internode
}  // namespace mpiep
