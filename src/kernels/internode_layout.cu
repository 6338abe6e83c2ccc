// get_dispatch_layout for any number of ranks and nodes: per-rank, per-node and per-expert
// token counts and the token -> rank membership matrix. One warp per token; lane k looks at
// top-k slot k, and a rank (node) is counted once per token however many of its experts
// the token picked.
#include <cuda_runtime.h>

#include "mpiep/errors.h"
#include "mpiep/internode.h"

namespace mpiep {
namespace internode {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxSharedCounters = 12 * 1024;  // 48 KB

__global__ void __launch_bounds__(kThreads) layout_kernel(LayoutArgs a, bool use_shared) {
  extern __shared__ int counts[];
  const int E = a.num_experts, R = a.num_ranks, K = a.num_topk, L = a.local_ranks;
  const int N = R / L, EL = E / R;
  const int lane = threadIdx.x % 32;
  if (use_shared) {
    for (int i = threadIdx.x; i < E + R + N; i += blockDim.x) counts[i] = 0;
    __syncthreads();
  }
  int* per_expert = use_shared ? counts : a.num_tokens_per_expert;
  int* per_rank = use_shared ? counts + E : a.num_tokens_per_rank;
  int* per_node = use_shared ? counts + E + R : a.num_tokens_per_rdma_rank;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; t < a.num_tokens; t += warps) {
    bool* row = a.is_token_in_rank + int64_t(t) * R;
    for (int r = lane; r < R; r += 32) row[r] = false;
    int64_t e = -1;
    if (lane < K) e = a.topk_idx[int64_t(t) * K + lane];
    const bool valid = e >= 0 && e < E;
    const int rank = valid ? static_cast<int>(e / EL) : -1;
    const int node = valid ? rank / L : -1;
    // First slot of its rank (node) among the valid slots: count it once.
    bool first_rank = valid, first_node = valid;
    for (int k = 0; k < K; ++k) {
      const int rk = __shfl_sync(0xffffffffu, rank, k);
      if (k < lane && rk >= 0) {
        first_rank &= rk != rank;
        first_node &= rk / L != node;
      }
    }
    __syncwarp();  // the zeroing above lands before the marks below
    if (valid) atomicAdd(&per_expert[e], 1);
    if (first_rank) {
      row[rank] = true;
      atomicAdd(&per_rank[rank], 1);
    }
    if (first_node) atomicAdd(&per_node[node], 1);
  }
  if (use_shared) {
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += blockDim.x)
      if (counts[i]) atomicAdd(&a.num_tokens_per_expert[i], counts[i]);
    for (int r = threadIdx.x; r < R; r += blockDim.x)
      if (counts[E + r]) atomicAdd(&a.num_tokens_per_rank[r], counts[E + r]);
    for (int n = threadIdx.x; n < N; n += blockDim.x)
      if (counts[E + R + n]) atomicAdd(&a.num_tokens_per_rdma_rank[n], counts[E + R + n]);
  }
}

}  // namespace

void launch_layout(const LayoutArgs& a, cudaStream_t stream) {
  MPIEP_CHECK_ARG(a.num_ranks > 0 && a.num_ranks <= kMaxRanks, "internode layout: 1..1024 ranks");
  MPIEP_CHECK_ARG(a.local_ranks > 0 && a.num_ranks % a.local_ranks == 0,
                  "internode layout: ranks per node must divide the rank count");
  MPIEP_CHECK_ARG(a.num_experts % a.num_ranks == 0,
                  "internode layout: num_experts must be a multiple of the rank count");
  MPIEP_CHECK_ARG(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "internode layout: at most 32 top-k");
  const int N = a.num_ranks / a.local_ranks;
  MPIEP_CUDA_CHECK(cudaMemsetAsync(a.num_tokens_per_rank, 0, sizeof(int) * a.num_ranks, stream));
  MPIEP_CUDA_CHECK(cudaMemsetAsync(a.num_tokens_per_rdma_rank, 0, sizeof(int) * N, stream));
  MPIEP_CUDA_CHECK(
      cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int) * a.num_experts, stream));
  if (a.num_tokens == 0) return;
  const int total = a.num_experts + a.num_ranks + N;
  const bool use_shared = total <= kMaxSharedCounters;
  const size_t smem = use_shared ? sizeof(int) * total : 0;
  int blocks = (a.num_tokens + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 132) blocks = 132;
  layout_kernel<<<blocks, kThreads, smem, stream>>>(a, use_shared);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace internode
}  // namespace mpiep
