// Notify: exchange the token-count matrix and per-expert counts between all ranks of
// the node, and compute each token's slot in every receiver (a column scan of
// is_token_in_rank). Blocks 0..R-1 scan one column each; block R talks to the peers.
#include <cuda_runtime.h>

#include "kernels/intranode_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace intranode {
namespace {

constexpr int kNotifyThreads = 1024;

// send_slot[t, r] = number of earlier tokens sent to r when t goes to r, else -1 - that
// number: the sign says membership and the exclusive prefix stays available for
// segment starts.
__device__ void scan_column(const NotifyArgs& a, int r) {
  __shared__ int warp_sums[kNotifyThreads / 32];
  const int R = a.peers.num_ranks, T = a.num_tokens;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  int base = 0;
  for (int first = 0; first < T; first += blockDim.x) {
    const int t = first + threadIdx.x;
    const bool in = t < T && a.is_token_in_rank[static_cast<int64_t>(t) * R + r];
    const unsigned ballot = __ballot_sync(kFullMask, in);
    const int before = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      int v = lane < num_warps ? warp_sums[lane] : 0;
      for (int d = 1; d < 32; d <<= 1) {
        int u = __shfl_up_sync(kFullMask, v, d);
        if (lane >= d) v += u;
      }
      if (lane < num_warps) warp_sums[lane] = v;  // inclusive
    }
    __syncthreads();
    const int prefix = base + (warp ? warp_sums[warp - 1] : 0) + before;
    if (t < T) a.send_slot[static_cast<int64_t>(t) * R + r] = in ? prefix : -1 - prefix;
    base += warp_sums[num_warps - 1];
    __syncthreads();
  }
}

__device__ void exchange_counts(const NotifyArgs& a) {
  const PeerPointers& p = a.peers;
  const int R = p.num_ranks, me = p.rank, E_loc = a.num_experts / R;
  Control* own = p.ctrl[me];
  const int64_t epoch = *reinterpret_cast<volatile int64_t*>(&own->notify_epoch) + 1;
  const int parity = static_cast<int>(epoch & 1);
  __shared__ int ok;

  // My row of the matrix and each peer's share of my expert counts, into every peer.
  for (int i = threadIdx.x; i < R * (R + 1); i += blockDim.x) {
    const int peer = i / (R + 1), j = i % (R + 1);
    p.ctrl[peer]->count_matrix[parity][me][j] = j < R ? a.num_tokens_per_rank[j] : a.num_tokens;
  }
  for (int i = threadIdx.x; i < R * E_loc; i += blockDim.x) {
    const int peer = i / E_loc, e = i % E_loc;
    p.ctrl[peer]->expert_counts[parity][me][e] = a.num_tokens_per_expert[peer * E_loc + e];
  }
  __threadfence_system();
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    st_release_sys(&p.ctrl[r]->notify_barrier[me], epoch);
    const uint64_t deadline = global_ns() + p.timeout_ns;
    while (ld_acquire_sys(&own->notify_barrier[r]) < epoch) {
      if (global_ns() > deadline) {
        report_error(p.host, kPhaseNotifyBarrier, r);
        ok = 0;
        break;
      }
    }
  }
  __syncthreads();
  if (ok) {
    for (int i = threadIdx.x; i < R * (R + 1); i += blockDim.x) {
      const int v = ld_volatile(&own->count_matrix[parity][i / (R + 1)][i % (R + 1)]);
      a.count_matrix[i] = v;
      p.host->count_matrix[i / (R + 1)][i % (R + 1)] = v;
    }
    const int align = a.expert_alignment > 0 ? a.expert_alignment : 1;
    for (int e = threadIdx.x; e < E_loc; e += blockDim.x) {
      int sum = 0;
      for (int s = 0; s < R; ++s) sum += ld_volatile(&own->expert_counts[parity][s][e]);
      p.host->recv_per_expert[e] = (sum + align - 1) / align * align;
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile int64_t*>(&own->notify_epoch) = epoch;
    if (ok) p.host->ready_token = a.host_token;
  }
}

__global__ void __launch_bounds__(kNotifyThreads)
    notify_kernel(const __grid_constant__ NotifyArgs a) {
  if (static_cast<int>(blockIdx.x) < a.peers.num_ranks) {
    scan_column(a, blockIdx.x);
  } else {
    exchange_counts(a);
  }
}

}  // namespace

void launch_notify(const NotifyArgs& a, cudaStream_t stream) {
  const int R = a.peers.num_ranks;
  MPIEP_CHECK_ARG(R >= 1 && R <= kMaxRanks, "intranode: 1..8 ranks per node");
  MPIEP_CHECK_ARG(
      a.num_experts % R == 0 && a.num_experts / R <= kMaxLocalExperts,
      "intranode: num_experts must be a multiple of the rank count, at most 4096 per rank");
  notify_kernel<<<R + 1, kNotifyThreads, 0, stream>>>(a);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace intranode
}  // namespace mpiep
