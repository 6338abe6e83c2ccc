// get_dispatch_layout on the GPU: per-rank and per-expert token counts and the
// token -> rank membership matrix, from topk_idx.
#include <cuda_runtime.h>

#include "mpiep/errors.h"
#include "mpiep/intranode.h"

namespace mpiep {
namespace intranode {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kMaxSharedCounters = 12 * 1024;  // 48 KB of shared counters

// One thread per token. Counters go to shared memory first (E + R of them) and are
// flushed once per block, so the global atomics do not serialise on hot experts.
__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(LayoutArgs a, bool use_shared) {
  extern __shared__ int counts[];
  const int E = a.num_experts, R = a.num_ranks, K = a.num_topk;
  const int experts_per_rank = E / R;
  if (use_shared) {
    for (int i = threadIdx.x; i < E + R; i += blockDim.x) counts[i] = 0;
    __syncthreads();
  }
  int* per_expert = use_shared ? counts : a.num_tokens_per_expert;
  int* per_rank = use_shared ? counts + E : a.num_tokens_per_rank;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < a.num_tokens;
       t += gridDim.x * blockDim.x) {
    unsigned mask = 0;
    for (int k = 0; k < K; ++k) {
      int64_t e = a.topk_idx[static_cast<int64_t>(t) * K + k];
      if (e < 0 || e >= E) continue;
      atomicAdd(&per_expert[e], 1);
      mask |= 1u << (static_cast<int>(e) / experts_per_rank);
    }
    for (int r = 0; r < R; ++r) {
      bool in = (mask >> r) & 1u;
      a.is_token_in_rank[static_cast<int64_t>(t) * R + r] = in;
      if (in) atomicAdd(&per_rank[r], 1);
    }
  }
  if (use_shared) {
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += blockDim.x)
      if (counts[i]) atomicAdd(&a.num_tokens_per_expert[i], counts[i]);
    for (int r = threadIdx.x; r < R; r += blockDim.x)
      if (counts[E + r]) atomicAdd(&a.num_tokens_per_rank[r], counts[E + r]);
  }
}

}  // namespace

void launch_layout(const LayoutArgs& a, cudaStream_t stream) {
  MPIEP_CHECK_ARG(a.num_ranks > 0 && a.num_ranks <= 32, "layout: 1..32 ranks supported");
  MPIEP_CHECK_ARG(a.num_experts % a.num_ranks == 0,
                  "layout: num_experts must be a multiple of ranks");
  MPIEP_CUDA_CHECK(cudaMemsetAsync(a.num_tokens_per_rank, 0, sizeof(int) * a.num_ranks, stream));
  MPIEP_CUDA_CHECK(
      cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int) * a.num_experts, stream));
  if (a.num_tokens == 0) return;
  const bool use_shared = a.num_experts + a.num_ranks <= kMaxSharedCounters;
  const size_t smem = use_shared ? sizeof(int) * (a.num_experts + a.num_ranks) : 0;
  int blocks = (a.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  if (blocks > 64) blocks = 64;
  layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(a, use_shared);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace intranode
}  // namespace mpiep
