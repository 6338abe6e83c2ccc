// Low-latency combine. Send phase: one warp per received row (expert e, source s, i-th row of
// the group) sends y[e, row] to source s's comb_recv[global expert][source token], followed by
// +1 on s's comb_arrival[token]. Receive phase: one block per local token waits until as many
// rows arrived as the token has valid top-k slots (known locally: no count message needed),
// resets the counter, and writes out[t] = sum_k w[t,k] * row(e_k, t), accumulated in float32
// in k order and rounded once to BF16.
//
// Duplicate experts within one token's top-k share one comb_recv row: the result is right only
// when the expert produced identical rows for both copies (the usual case: same input token).
#include <cuda_runtime.h>

#include "kernels/fp8.cuh"
#include "kernels/low_latency_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace ll {
namespace {

__device__ void send_phase(const CombineParams& p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  const int R = p.c.num_ranks, EL = p.num_experts / R, M = p.max_tokens, H = p.hidden;
  const size_t slots = size_t(EL) * R * M;
  for (size_t idx = size_t(blockIdx.x) * nw + warp; idx < slots; idx += size_t(gridDim.x) * nw) {
    // Row index outermost: the first EL*R warps take row 0 of every (expert, source) group,
    // so the few rows per group spread over all warps instead of idling most of them.
    const int i = int(idx / (size_t(EL) * R)), pair = int(idx % (size_t(EL) * R));
    const int el = pair / R, s = pair % R;
    const int cnt = __ldg(p.layout_range + (el * R + s) * 2 + 1);
    if (i >= cnt) continue;
    const size_t row = size_t(el) * R * M + __ldg(p.layout_range + (el * R + s) * 2) + i;
    const int tok = __ldg(p.src_token_idx + row);
    const uint8_t* src = static_cast<const uint8_t*>(p.y) + row * H * 2;
    uint8_t* dst = p.r.comb_recv + (size_t(p.c.rank * EL + el) * M + tok) * H * 2;
    uint64_t* arrival = p.r.comb_arrival + tok;
    if (peer_ptr(p.c, dst, s) == nullptr && !p.zero_copy) {
      // NVSHMEM puts read from the symmetric heap: stage the row there first.
      uint8_t* stage = p.r.comb_send + row * H * 2;
      warp_copy<kReadOnly>(stage, src, H * 2, lane);
      __syncwarp();
      src = stage;
    }
    warp_send<kReadOnly>(p.c, dst, src, H * 2, arrival, s, lane);
  }
}

__device__ void recv_phase(const CombineParams& p) {
  const int T = p.num_tokens, K = p.num_topk, H = p.hidden, M = p.max_tokens;
  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    if (threadIdx.x == 0) {
      int valid = 0;
      for (int k = 0; k < K; ++k) valid += __ldg(p.topk_idx + t * K + k) >= 0;
      bool failed = false;
      spin_wait(p.c, p.r.comb_arrival + t, false, uint64_t(valid), kWaitCombineData, -1, t,
                &failed);
      p.r.comb_arrival[t] = 0;  // every row for t has arrived: nobody writes it again this call
    }
    __syncthreads();
    int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(p.out) + size_t(t) * H * 2);
    for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < K; ++k) {
        const int64_t e = __ldg(p.topk_idx + t * K + k);
        if (e < 0) continue;
        const float w = __ldg(p.topk_weights + t * K + k);
        const int4* src =
            reinterpret_cast<const int4*>(p.r.comb_recv + (size_t(e) * M + t) * H * 2);
        float f[8];
        fp8::unpack_bf16x8(__ldcg(src + v), f);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = fmaf(w, f[j], acc[j]);
      }
      out[v] = fp8::pack_bf16x8(acc);
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads, 2)
    combine_kernel(const __grid_constant__ CombineParams p) {
  if (p.phases & kSendPhase) send_phase(p);
  if (p.phases & kRecvPhase) recv_phase(p);
}

}  // namespace

void launch_combine(const CombineParams& p, void* stream) {
  combine_kernel<<<p.num_blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ll
}  // namespace mpiep
