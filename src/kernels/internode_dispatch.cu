// Internode dispatch data kernel. Every warp runs three phases in turn, each over its share
// of a chunked work list (include/mpiep/internode.h has the overview):
//   send     my node lists, chunk by chunk -> the forwarders' RDMA areas (+ chunk flag)
//   forward  my RDMA area, chunk by chunk once its flag is set -> local receivers' NVLink
//            buffers at their final rows (+ per-receiver row counts)
//   receive  my NVLink buffer, source by source once its forwarder's count is complete ->
//            the output tensors
// No phase waits on a later one, and no rank waits on a phase of its own that another rank
// waits on, so the grid never deadlocks while all blocks are resident.
#include <cuda_runtime.h>

#include "kernels/internode_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace internode {
namespace {

constexpr int kThreads = kDataWarps * 32;
constexpr int kUnroll = 4;

struct Rows {
  int64_t rdma, nvl;    // row bytes in the RDMA and NVLink areas
  int64_t scale, meta;  // offsets of the scales and the metadata in both
};

__device__ __forceinline__ Rows rows_of(const DispatchArgs& a) {
  Rows r;
  r.rdma =
      rdma_dispatch_row_bytes(a.hidden_bytes, a.num_scales, a.num_topk, a.peers.topo.local_ranks);
  r.nvl = nvl_dispatch_row_bytes(a.hidden_bytes, a.num_scales, a.num_topk);
  r.scale = align16(a.hidden_bytes);
  r.meta = r.scale + align16(a.num_scales * 4);
  return r;
}

// A row on its way to the local receivers: read from a forwarder's RDMA area (written by a
// peer during this kernel) or from the caller's inputs (this rank's own node).
struct FromRdma {
  const uint8_t* row;
  const Rows& rw;
  int K;
  __device__ int4 load(int i) const {
    return ld_peer_written(reinterpret_cast<const int4*>(row) + i);
  }
  __device__ float scale(int k) const {
    return __ldcg(reinterpret_cast<const float*>(row + rw.scale) + k);
  }
  __device__ int expert(int k) const {
    return __ldcg(reinterpret_cast<const int*>(row + rw.meta) + k);
  }
  __device__ float weight(int k) const {
    return __ldcg(reinterpret_cast<const float*>(row + rw.meta) + K + k);
  }
  __device__ int token() const {
    return __ldcg(reinterpret_cast<const int*>(row + rw.meta) + 2 * K);
  }
};
struct FromInput {
  const DispatchArgs& a;
  int t;
  __device__ int4 load(int i) const {
    return ld_input(reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) +
                                                  int64_t(t) * a.hidden_bytes) +
                    i);
  }
  __device__ float scale(int k) const { return __ldg(a.x_scales + int64_t(t) * a.num_scales + k); }
  __device__ int expert(int k) const {
    return static_cast<int>(__ldg(a.topk_idx + int64_t(t) * a.num_topk + k));
  }
  __device__ float weight(int k) const {
    return a.topk_weights ? __ldg(a.topk_weights + int64_t(t) * a.num_topk + k) : 0.f;
  }
  __device__ int token() const { return t; }
};

// Writes one row of source rank `s` to every local rank j whose position `pos` (lane j) is
// set: into j's NVLink buffer at its final row, or straight into the outputs when j is this
// rank. Returns the member mask.
template <class Src>
__device__ unsigned deliver(const DispatchArgs& a, const Tables& tb, const Rows& rw, const Src& src,
                            int s, int pos) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int L = tp.local_ranks, K = a.num_topk, EL = a.num_local_experts, lane = threadIdx.x % 32;
  const int n16 = a.hidden_bytes / 16;
  const unsigned members = __ballot_sync(kFullMask, lane < L && pos >= 0);
  uint8_t* dst[kMaxLocalRanks];
  int64_t self_row = -1;
#pragma unroll
  for (int j = 0; j < kMaxLocalRanks; ++j) {
    const int at = __shfl_sync(kFullMask, pos, j);
    dst[j] = nullptr;
    if (j < L && ((members >> j) & 1u)) {
      const int64_t row = int64_t(tb.recv_prefix(j, s)) + at;
      if (j == tp.local) {
        self_row = row;
      } else {
        dst[j] = p.nvl_rows[j] + row * rw.nvl;
      }
    }
  }
  int4* self_x =
      self_row >= 0
          ? reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + self_row * a.hidden_bytes)
          : nullptr;
  for (int k = lane; k < n16; k += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (k + u * 32 < n16) v[u] = src.load(k + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k + u * 32 >= n16) break;
      if (self_x) self_x[k + u * 32] = v[u];
#pragma unroll
      for (int j = 0; j < kMaxLocalRanks; ++j)
        if (dst[j]) reinterpret_cast<int4*>(dst[j])[k + u * 32] = v[u];
    }
  }
  for (int k = lane; k < a.num_scales; k += 32) {
    const float sc = src.scale(k);
    if (self_row >= 0) a.recv_scales[self_row * a.num_scales + k] = sc;
#pragma unroll
    for (int j = 0; j < kMaxLocalRanks; ++j)
      if (dst[j]) reinterpret_cast<float*>(dst[j] + rw.scale)[k] = sc;
  }
  // Top-k as each receiver's local expert ids (-1 elsewhere), weights only for those.
  if (lane < K) {
    const int e = src.expert(lane);
    const float w = src.weight(lane);
#pragma unroll
    for (int j = 0; j < kMaxLocalRanks; ++j) {
      if (j >= L || !((members >> j) & 1u)) continue;
      const int lo = (tp.node * L + j) * EL;
      const int local = (e >= lo && e < lo + EL) ? e - lo : -1;
      const float wl = local >= 0 ? w : 0.f;
      if (dst[j]) {
        int* out = reinterpret_cast<int*>(dst[j] + rw.meta);
        out[lane] = local;
        reinterpret_cast<float*>(out)[K + lane] = wl;
      } else {
        if (a.recv_topk_idx) a.recv_topk_idx[self_row * K + lane] = local;
        if (a.recv_topk_weights) a.recv_topk_weights[self_row * K + lane] = wl;
      }
    }
  }
  if (lane == 0) {
    const int t = src.token();
    if (self_row >= 0) a.recv_src_idx[self_row] = t;
#pragma unroll
    for (int j = 0; j < kMaxLocalRanks; ++j)
      if (dst[j]) reinterpret_cast<int*>(dst[j] + rw.meta)[2 * K] = t;
  }
  return members;
}

// After a chunk of source node m's rows: tell each other local rank how many it got (lane j
// counted them).
__device__ __forceinline__ void publish_rows(const Peers& p, int m, int sent) {
  const int lane = threadIdx.x % 32;
  __syncwarp();
  if (lane < p.topo.local_ranks && lane != p.topo.local && sent > 0)
    red_add_release_sys(&p.nvl_ctrl[lane]->dispatch_rows[p.topo.local][m], sent);
  __syncwarp();
}

// Phase 1: each of my tokens, once per destination node. Other nodes: into the RDMA area of
// that node's forwarder (directly where it is mapped, else staged here and put with
// NVSHMEM). My own node: straight to its ranks over NVLink, as the forwarder would.
__device__ void send_phase(const DispatchArgs& a, const Tables& tb, const Counts& cn,
                           const Rows& rw, uint64_t epoch, int gw, int num_warps) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int R = tp.num_ranks, N = tp.num_nodes, L = tp.local_ranks, me = tp.rank;
  const int K = a.num_topk, T = a.num_tokens, lane = threadIdx.x % 32;
  const int64_t data = p.rdma_ctrl.total;
  const int64_t stage = data + align_up(int64_t(tb.status(kRdmaRows)) * rw.rdma, 16);
  const int n16 = a.hidden_bytes / 16;
  auto count = [&](int n) { return cn.NC(me, n); };
  int n, p0, p1;
  for (int i = gw; nth_chunk(i, N, a.chunk, count, &n, &p0, &p1); i += num_warps) {
    if (n == tp.node) {
      int sent = 0;
      for (int q = p0; q < p1; ++q) {
        const int t = __ldg(a.node_token + int64_t(n) * T + q);
        const int pos = lane < L ? __ldg(a.send_slot + int64_t(t) * R + n * L + lane) : -1;
        // Combine finds these rows where the forwarder's would be: my RDMA rows of my node.
        if (lane < L) a.fwd_pos[(int64_t(tb.rdma_in_base(n)) + q) * L + lane] = pos;
        deliver(a, tb, rw, FromInput{a, t}, me, pos);
        sent += pos >= 0 ? 1 : 0;
      }
      publish_rows(p, n, sent);
      continue;
    }
    const int pe = n * L + tp.local;
    const int64_t remote = data + (int64_t(tb.rdma_out_base(n)) + p0) * rw.rdma;
    uint8_t* mapped = rdma_direct(p, remote, pe);
    uint8_t* base =
        mapped ? mapped : rdma_local(p, stage + (int64_t(tb.my_node_base(n)) + p0) * rw.rdma);
    for (int q = p0; q < p1; ++q) {
      const int t = __ldg(a.node_token + int64_t(n) * T + q);
      uint8_t* row = base + int64_t(q - p0) * rw.rdma;
      const int4* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) +
                                                      int64_t(t) * a.hidden_bytes);
      int4* dst = reinterpret_cast<int4*>(row);
      for (int k = lane; k < n16; k += 32 * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (k + u * 32 < n16) v[u] = ld_input(src + k + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (k + u * 32 < n16) dst[k + u * 32] = v[u];
      }
      for (int k = lane; k < a.num_scales; k += 32)
        reinterpret_cast<float*>(row + rw.scale)[k] =
            __ldg(a.x_scales + int64_t(t) * a.num_scales + k);
      int* meta = reinterpret_cast<int*>(row + rw.meta);
      if (lane < K) {
        meta[lane] = static_cast<int>(__ldg(a.topk_idx + int64_t(t) * K + lane));
        reinterpret_cast<float*>(meta)[K + lane] =
            a.topk_weights ? __ldg(a.topk_weights + int64_t(t) * K + lane) : 0.f;
      }
      if (lane == 0) meta[2 * K] = t;
      if (lane < L) meta[2 * K + 1 + lane] = __ldg(a.send_slot + int64_t(t) * R + n * L + lane);
    }
    __syncwarp();
    const int64_t flag =
        p.rdma_ctrl.dispatch_flag + (int64_t(tp.node) * kChunksPerSource + p0 / a.chunk) * 8;
    if (mapped) {
      if (lane == 0) rdma_flag_set(p, flag, epoch, pe);
    } else {
      nvshmemx_putmem_signal_nbi_warp(rdma_local(p, remote), base, size_t(p1 - p0) * rw.rdma,
                                      reinterpret_cast<uint64_t*>(rdma_local(p, flag)), epoch,
                                      NVSHMEM_SIGNAL_SET, pe);
    }
    __syncwarp();
  }
}

// Phase 2: every row that arrived in my RDMA area from another node goes to each local rank
// it is for; the positions are kept in fwd_pos for combine.
__device__ bool forward_phase(const DispatchArgs& a, const Tables& tb, const Rows& rw,
                              uint64_t epoch, int gw, int num_warps) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int N = tp.num_nodes, L = tp.local_ranks, K = a.num_topk, lane = threadIdx.x % 32;
  const int64_t data = p.rdma_ctrl.total;
  auto count = [&](int m) { return m == tp.node ? 0 : tb.rdma_in_count(m); };
  int m, p0, p1;
  for (int i = gw; nth_chunk(i, N, a.chunk, count, &m, &p0, &p1); i += num_warps) {
    const int s = m * L + tp.local;
    bool ok = true;
    if (lane == 0) {
      const int64_t flag =
          p.rdma_ctrl.dispatch_flag + (int64_t(m) * kChunksPerSource + p0 / a.chunk) * 8;
      ok = wait_at_least(p, reinterpret_cast<const uint64_t*>(rdma_local(p, flag)), epoch,
                         kPhaseDispatchForward, s);
    }
    if (!__shfl_sync(kFullMask, ok, 0)) return false;
    int sent = 0;  // lane j < L: rows of this chunk for local rank j
    for (int q = p0; q < p1; ++q) {
      const int64_t r = int64_t(tb.rdma_in_base(m)) + q;
      const uint8_t* row = rdma_local(p, data + r * rw.rdma);
      const int pos =
          lane < L ? __ldcg(reinterpret_cast<const int*>(row + rw.meta) + 2 * K + 1 + lane) : -1;
      if (lane < L) a.fwd_pos[r * L + lane] = pos;
      deliver(a, tb, rw, FromRdma{row, rw, K}, s, pos);
      sent += pos >= 0 ? 1 : 0;
    }
    publish_rows(p, m, sent);
  }
  return true;
}

__device__ __forceinline__ void copy_out_row(const DispatchArgs& a, const Rows& rw,
                                             const uint8_t* src, int64_t r) {
  const int lane = threadIdx.x % 32, K = a.num_topk;
  const int4* s16 = reinterpret_cast<const int4*>(src);
  int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + r * a.hidden_bytes);
  const int n16 = a.hidden_bytes / 16;
  for (int i = lane; i < n16; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n16) v[u] = ld_peer_written(s16 + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n16) out[i + u * 32] = v[u];
  }
  for (int i = lane; i < a.num_scales; i += 32)
    a.recv_scales[r * a.num_scales + i] =
        __ldcg(reinterpret_cast<const float*>(src + rw.scale) + i);
  const int* meta = reinterpret_cast<const int*>(src + rw.meta);
  if (lane < K && a.recv_topk_idx) {
    a.recv_topk_idx[r * K + lane] = __ldcg(meta + lane);
    if (a.recv_topk_weights)
      a.recv_topk_weights[r * K + lane] = __ldcg(reinterpret_cast<const float*>(meta) + K + lane);
  }
  if (lane == 0) a.recv_src_idx[r] = __ldcg(meta + 2 * K);
}

// Phase 3: rows from source s = (m, l) sit at [recv_prefix(s), + M(s, me)) of my NVLink
// buffer once forwarder l (another rank of my node) has delivered all of them.
__device__ bool receive_phase(const DispatchArgs& a, const Tables& tb, const Counts& cn,
                              const Rows& rw, int gw, int num_warps) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int R = tp.num_ranks, L = tp.local_ranks, me = tp.rank, lane = threadIdx.x % 32;
  NvlControl* own = p.nvl_ctrl[tp.local];
  const uint8_t* rows = p.nvl_rows[tp.local];
  // Rows of sources whose forwarder is this rank were written straight into the outputs.
  auto count = [&](int s) { return s % L == tp.local ? 0 : cn.M(s, me); };
  int s, q0, q1, waited = -1;
  for (int i = gw; nth_chunk(i, R, a.chunk, count, &s, &q0, &q1); i += num_warps) {
    const int l = s % L, m = s / L;
    if (s != waited) {
      bool ok = true;
      if (lane == 0)
        ok = wait_at_least(p, reinterpret_cast<const uint64_t*>(&own->dispatch_rows[l][m]),
                           uint64_t(cn.M(s, me)), kPhaseDispatchRecv, tp.node * L + l);
      if (!__shfl_sync(kFullMask, ok, 0)) return false;
      waited = s;
    }
    const int64_t first = tb.recv_prefix(tp.local, s);
    for (int q = q0; q < q1; ++q) copy_out_row(a, rw, rows + (first + q) * rw.nvl, first + q);
  }
  return true;
}

// num_worst_tokens: rows past the real receive are zero, top-k -1, source id -1.
__device__ void pad_tail(const DispatchArgs& a, const Tables& tb, int gw, int num_warps) {
  const int lane = threadIdx.x % 32, K = a.num_topk;
  const int n16 = a.hidden_bytes / 16;
  for (int64_t r = tb.status(kNumRecv) + gw; r < a.num_out_rows; r += num_warps) {
    int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + r * a.hidden_bytes);
    for (int i = lane; i < n16; i += 32) out[i] = make_int4(0, 0, 0, 0);
    for (int i = lane; i < a.num_scales; i += 32) a.recv_scales[r * a.num_scales + i] = 0.f;
    if (lane < K && a.recv_topk_idx) {
      a.recv_topk_idx[r * K + lane] = -1;
      if (a.recv_topk_weights) a.recv_topk_weights[r * K + lane] = 0.f;
    }
    if (lane == 0) a.recv_src_idx[r] = -1;
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    dispatch_kernel(const __grid_constant__ DispatchArgs a) {
  const Peers& p = a.peers;
  NvlControl* own = p.nvl_ctrl[p.topo.local];
  const int64_t epoch = read_data_epoch(own);
  const Tables tb = tables_of(p, a.tables);
  const Counts cn{a.counts, p.topo.num_ranks, p.topo.num_nodes};
  const Rows rw = rows_of(a);
  const int num_warps = gridDim.x * kDataWarps;
  const int gw = blockIdx.x * kDataWarps + threadIdx.x / 32;
  const int64_t staged_rows = p.staged ? tb.status(kMaxSendRows) : 0;
  if (fits(p, tb, tb.status(kMaxRecv), rw.nvl, tb.status(kMaxRdmaRows), rw.rdma, staged_rows,
           rw.rdma, a.worst ? a.num_out_rows : 0) &&
      start_barrier(p, epoch, kPhaseDispatchBarrier)) {
    send_phase(a, tb, cn, rw, uint64_t(epoch), gw, num_warps);
    if (forward_phase(a, tb, rw, uint64_t(epoch), gw, num_warps) &&
        receive_phase(a, tb, cn, rw, gw, num_warps) && a.worst)
      pad_tail(a, tb, gw, num_warps);
  }
  finish_data_kernel(own, epoch, own->dispatch_rows, p.topo.local_ranks, p.topo.num_nodes);
}

}  // namespace

void launch_dispatch(const DispatchArgs& a, cudaStream_t stream) {
  MPIEP_CHECK_ARG(a.num_blocks >= 1 && a.num_blocks <= kMaxSms,
                  "internode dispatch: Config.num_sms must be in [1, 128]");
  MPIEP_CHECK_ARG(a.hidden_bytes % 16 == 0,
                  "internode dispatch: hidden row bytes must be a multiple of 16");
  MPIEP_CHECK_ARG(a.num_topk <= kMaxTopk, "internode dispatch: at most 32 top-k slots");
  MPIEP_CHECK_ARG(a.chunk >= 1, "internode dispatch: chunk must be positive");
  MPIEP_CHECK_ARG(int64_t(a.num_tokens) <= int64_t(a.chunk) * kChunksPerSource,
                  "internode dispatch: too many tokens for the chunk size (raise "
                  "Config.num_max_rdma_chunked_send_tokens)");
  dispatch_kernel<<<a.num_blocks, kThreads, 0, stream>>>(a);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace internode
}  // namespace mpiep
