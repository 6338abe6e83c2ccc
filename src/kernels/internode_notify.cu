// Internode notify: every rank learns every rank's count row (tokens per rank, per node,
// its token count) and its share of every rank's per-expert counts, over NVSHMEM; then it
// derives the per-dispatch tables (include/mpiep/internode.h). Blocks [0, R) scan one
// column of is_token_in_rank each (a token's position in each receiver's order), blocks
// [R, R + N) one node each (a token's position in each node list, and the inverse), and
// the last block talks to the peers.
#include <cuda_runtime.h>

#include "kernels/internode_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace internode {
namespace {

constexpr int kNotifyThreads = 1024;

// Exclusive scan of a 0/1 column over the tokens: out[t] = position among members, or -1;
// inverse[pos] = t when given.
template <class MemberFn>
__device__ void scan_members(int T, MemberFn member, int* out, int64_t out_stride, int* inverse) {
  __shared__ int warp_sums[kNotifyThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  int base = 0;
  for (int first = 0; first < T; first += blockDim.x) {
    const int t = first + threadIdx.x;
    const bool in = t < T && member(t);
    const unsigned ballot = __ballot_sync(kFullMask, in);
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      int v = lane < num_warps ? warp_sums[lane] : 0;
      for (int d = 1; d < 32; d <<= 1) {
        const int u = __shfl_up_sync(kFullMask, v, d);
        if (lane >= d) v += u;
      }
      if (lane < num_warps) warp_sums[lane] = v;  // inclusive
    }
    __syncthreads();
    const int pos = base + (warp ? warp_sums[warp - 1] : 0) + __popc(ballot & ((1u << lane) - 1u));
    if (t < T) {
      out[int64_t(t) * out_stride] = in ? pos : -1;
      if (in && inverse) inverse[pos] = t;
    }
    base += warp_sums[num_warps - 1];
    __syncthreads();
  }
}

// Row exchange with every rank, then the tables. One block.
__device__ void exchange(const NotifyArgs& a) {
  const Peers& p = a.peers;
  const Topology& tp = p.topo;
  const int R = tp.num_ranks, N = tp.num_nodes, L = tp.local_ranks, me = tp.rank;
  const int n0 = tp.node, l0 = tp.local, EL = a.num_experts / R;
  const int W = R + N + 1;
  const RdmaControlLayout& cl = p.rdma_ctrl;
  NvlControl* own = p.nvl_ctrl[l0];
  const int64_t epoch = *reinterpret_cast<volatile int64_t*>(&own->notify_epoch) + 1;
  const int parity = static_cast<int>(epoch & 1);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ int ok;

  // Stage my row and my per-expert counts in the symmetric send area (puts read it there).
  int* send = reinterpret_cast<int*>(rdma_local(p, cl.notify_send));
  for (int i = threadIdx.x; i < W; i += blockDim.x) {
    send[i] = i < R ? a.num_tokens_per_rank[i]
                    : (i < R + N ? a.num_tokens_per_rdma_rank[i - R] : a.num_tokens);
  }
  for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x)
    send[W + i] = a.num_tokens_per_expert[i];
  __threadfence_system();
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();

  // Warp w sends to ranks w, w + 32, ...: my row, then rank d's share of my expert counts,
  // each flagged with the notify epoch. Always through NVSHMEM's API where unmapped.
  const int64_t rows_slot = cl.notify_rows + (int64_t(parity) * R + me) * W * 4;
  const int64_t exp_slot = cl.notify_experts + (int64_t(parity) * R + me) * kMaxLocalExperts * 4;
  for (int d = warp; d < R; d += blockDim.x / 32) {
    rdma_send_warp(p, rows_slot, cl.notify_send, int64_t(W) * 4,
                   cl.notify_flag_rows + int64_t(me) * 8, uint64_t(epoch), d, lane);
    rdma_send_warp(p, exp_slot, cl.notify_send + (int64_t(W) + int64_t(d) * EL) * 4,
                   int64_t(EL) * 4, cl.notify_flag_experts + int64_t(me) * 8, uint64_t(epoch), d,
                   lane);
  }

  // Wait for every rank's two messages (>=: a fast rank may already be one notify ahead;
  // its payload then went to the other parity).
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    const uint64_t* fr =
        reinterpret_cast<const uint64_t*>(rdma_local(p, cl.notify_flag_rows + int64_t(s) * 8));
    const uint64_t* fe =
        reinterpret_cast<const uint64_t*>(rdma_local(p, cl.notify_flag_experts + int64_t(s) * 8));
    if (!wait_at_least(p, fr, uint64_t(epoch), kPhaseNotify, s) ||
        !wait_at_least(p, fe, uint64_t(epoch), kPhaseNotify, s))
      ok = 0;
  }
  __syncthreads();
  if (!ok) return;  // reported; the host raises from the error record

  // Copy the matrix out (peers wrote it: read around L1).
  const int* rows =
      reinterpret_cast<const int*>(rdma_local(p, cl.notify_rows + int64_t(parity) * R * W * 4));
  for (int i = threadIdx.x; i < R * W; i += blockDim.x) a.counts[i] = __ldcg(rows + i);
  __syncthreads();
  __threadfence_block();
  auto M = [&](int s, int r) { return a.counts[int64_t(s) * W + r]; };
  auto NC = [&](int s, int n) { return a.counts[int64_t(s) * W + R + n]; };

  // Per-rank row counts and their maxima over all ranks.
  __shared__ int maxima[4];
  __shared__ int mine[4];
  if (threadIdx.x < 4) maxima[threadIdx.x] = 0;
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int nr = r / L, lr = r % L;
    int recv = 0, rdma = 0, fwd = 0, send_rows = 0;
    for (int s = 0; s < R; ++s) recv += M(s, r);
    for (int m = 0; m < N; ++m) {
      rdma += NC(m * L + lr, nr);
      for (int j = 0; j < L; ++j) fwd += M(m * L + lr, nr * L + j);
    }
    for (int n = 0; n < N; ++n) send_rows += NC(r, n);
    atomicMax(&maxima[0], recv);
    atomicMax(&maxima[1], rdma);
    atomicMax(&maxima[2], fwd);
    atomicMax(&maxima[3], send_rows);
    if (r == me) {
      mine[0] = recv;
      mine[1] = rdma;
      mine[2] = fwd;
      mine[3] = send_rows;
    }
  }
  __syncthreads();

  const TableLayout tl = table_layout(R, N, L);
  int* tb = a.tables;
  if (threadIdx.x < 4) {
    tb[tl.status + threadIdx.x] = maxima[threadIdx.x];
    tb[tl.status + 4 + threadIdx.x] = mine[threadIdx.x];
    p.host->status[threadIdx.x] = maxima[threadIdx.x];
    p.host->status[4 + threadIdx.x] = mine[threadIdx.x];
  }
  // recv_prefix[j][s]: rows of local rank j from sources below s.
  if (warp < L) {
    const int r = n0 * L + warp;
    int run = 0;
    for (int first = 0; first < R; first += 32) {
      const int s = first + lane;
      const int v = s < R ? M(s, r) : 0;
      int incl = v;
      for (int d = 1; d < 32; d <<= 1) {
        const int u = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += u;
      }
      if (s < R) tb[tl.recv_prefix + warp * R + s] = run + incl - v;
      run += __shfl_sync(kFullMask, incl, 31);
    }
  }
  if (threadIdx.x == 0) {
    int in_run = 0, mine_run = 0;
    for (int m = 0; m < N; ++m) {
      const int c = NC(m * L + l0, n0);
      tb[tl.rdma_in_base + m] = in_run;
      tb[tl.rdma_in_count + m] = c;
      in_run += c;
      tb[tl.my_node_base + m] = mine_run;
      mine_run += NC(me, m);
    }
  }
  for (int x = threadIdx.x; x < N; x += blockDim.x) {
    int out_base = 0, comb_base = 0;
    for (int m = 0; m < n0; ++m) out_base += NC(m * L + l0, x);   // at node x's forwarder
    for (int n = 0; n < n0; ++n) comb_base += NC(x * L + l0, n);  // at source (x, l0)
    tb[tl.rdma_out_base + x] = out_base;
    tb[tl.comb_out_base + x] = comb_base;
  }
  if (threadIdx.x < L) {
    const int j = threadIdx.x;
    // My combine slots: rank j's rows first grouped by local rank (j' < j), then by source
    // node m, each group in j's receive order.
    int base = 0;
    for (int jj = 0; jj < j; ++jj)
      for (int m = 0; m < N; ++m) base += M(m * L + l0, n0 * L + jj);
    int q = 0;
    for (int m = 0; m < N; ++m) {
      tb[tl.fwd_slot_base + j * N + m] = base + q;
      q += M(m * L + l0, n0 * L + j);
    }
    // My slots in forwarder j's combine area (j plays the forwarder, I the local rank).
    int at = 0;
    for (int jj = 0; jj < l0; ++jj)
      for (int m = 0; m < N; ++m) at += M(m * L + j, n0 * L + jj);
    int q2 = 0;
    for (int m = 0; m < N; ++m) {
      tb[tl.recv_slot_base + j * N + m] = at + q2;
      q2 += M(m * L + j, me);
    }
  }
  // Received tokens per local expert, padded to the alignment.
  const int* experts = reinterpret_cast<const int*>(
      rdma_local(p, cl.notify_experts + int64_t(parity) * R * kMaxLocalExperts * 4));
  const int align = a.expert_alignment > 0 ? a.expert_alignment : 1;
  for (int e = threadIdx.x; e < EL; e += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < R; ++s) sum += __ldcg(experts + int64_t(s) * kMaxLocalExperts + e);
    p.host->recv_per_expert[e] = (sum + align - 1) / align * align;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile int64_t*>(&own->notify_epoch) = epoch;
    p.host->ready_token = a.host_token;
  }
}

__global__ void __launch_bounds__(kNotifyThreads)
    notify_kernel(const __grid_constant__ NotifyArgs a) {
  const Topology& tp = a.peers.topo;
  const int R = tp.num_ranks, N = tp.num_nodes, L = tp.local_ranks, T = a.num_tokens;
  const int b = blockIdx.x;
  if (b < R) {
    const bool* col = a.is_token_in_rank + b;
    scan_members(T, [&](int t) { return col[int64_t(t) * R]; }, a.send_slot + b, R, nullptr);
  } else if (b < R + N) {
    const int n = b - R;
    const bool* cols = a.is_token_in_rank + n * L;
    scan_members(
        T,
        [&](int t) {
          bool any = false;
          for (int j = 0; j < L; ++j) any |= cols[int64_t(t) * R + j];
          return any;
        },
        a.node_slot + n, N, a.node_token + int64_t(n) * T);
  } else {
    exchange(a);
  }
}

}  // namespace

void launch_notify(const NotifyArgs& a, cudaStream_t stream) {
  const Topology& tp = a.peers.topo;
  MPIEP_CHECK_ARG(tp.num_ranks >= 1 && tp.num_ranks <= kMaxRanks, "internode: 1..1024 ranks");
  MPIEP_CHECK_ARG(tp.local_ranks >= 1 && tp.local_ranks <= kMaxLocalRanks,
                  "internode: 1..8 ranks per node");
  MPIEP_CHECK_ARG(tp.num_nodes <= kMaxNodes, "internode: at most 128 nodes");
  MPIEP_CHECK_ARG(
      a.num_experts % tp.num_ranks == 0 && a.num_experts / tp.num_ranks <= kMaxLocalExperts,
      "internode: num_experts must be a multiple of the rank count, at most 1024 "
      "per rank");
  notify_kernel<<<tp.num_ranks + tp.num_nodes + 1, kNotifyThreads, 0, stream>>>(a);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace internode
}  // namespace mpiep
