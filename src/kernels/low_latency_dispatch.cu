// Low-latency dispatch. Send phase: (1) one warp per expert counts this rank's (token, expert)
// pairs and writes count+1 into the owner's disp_count[e][rank]; (2) each block stages its
// tokens as messages (header + BF16, or FP8 + scales cast here) in the symmetric send area;
// (3) warps send each (token, k) to the owner's slot [e][rank][i], i = how many earlier pairs
// of this rank went to e (deterministic: ascending token id, like the reference), each followed
// by +1 on disp_arrival[e][rank]. Receive phase: blocks of a local expert wait for every
// source's count and then for that many arrivals, pack the rows by source rank into recv_x,
// write the handle (src_token_idx, layout_range), and reset the signals they consumed.
//
// The count can travel before the data because the receiver waits for the arrivals too; each
// arrival is released after its row's data (NVLink: warp stores, __syncwarp, red.release.sys;
// puts: putmem_signal orders the signal after the data).
//
// Two instantiations: kSkips = false is the plain kernel; kSkips = true (rank masking, or the
// test stall) sends only where its block's copy of send_bits allows (one shared-memory read per
// expert and per pair), does not wait on masked sources (count 0, layout (start, 0)), and on a
// timeout masks the silent source and finishes without it.
#include <cuda_runtime.h>

#include "kernels/fp8.cuh"
#include "kernels/low_latency_common.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace ll {
namespace {

__device__ __forceinline__ void stage_token(const DispatchParams& p, int t) {
  const int H = p.hidden;
  uint8_t* row = p.r.disp_send + size_t(t) * p.row_bytes;
  const int4* xr =
      reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) + size_t(t) * H * 2);
  if (threadIdx.x == 0) *reinterpret_cast<int4*>(row) = make_int4(t, 0, 0, 0);
  if (!p.fp8) {
    int4* out = reinterpret_cast<int4*>(row + 16);
    for (int i = threadIdx.x; i < H / 8; i += blockDim.x) out[i] = __ldg(xr + i);
    return;
  }
  // Half-warp per 128-channel group: 16 lanes x 8 channels.
  const int lane = threadIdx.x % 32, half = threadIdx.x / 16, l16 = threadIdx.x % 16;
  const int halves = blockDim.x / 16, groups = H / fp8::kBlock;
  const unsigned mask = 0xFFFFu << (lane & 16);
  uint8_t* q = row + 16;
  float* scales = reinterpret_cast<float*>(row + 16 + H);
  for (int g = half; g < groups; g += halves) {
    float f[8];
    fp8::unpack_bf16x8(__ldg(xr + g * 16 + l16), f);
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fp8::max_nan(amax, fabsf(f[i]));
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = fp8::max_nan(amax, __shfl_xor_sync(mask, amax, o));
    const float s = fp8::scale_from_amax(amax, p.round_scale);
    *reinterpret_cast<uint2*>(q + g * fp8::kBlock + l16 * 8) = fp8::quantize8(f, s);
    if (l16 == 0) scales[g] = s;
  }
}

template <bool kSkips>
__device__ void send_phase(const DispatchParams& p, const uint8_t* s_send) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  const int R = p.c.num_ranks, E = p.num_experts, EL = E / R, T = p.num_tokens, K = p.num_topk;
  const int M = p.max_tokens;

  // (1) counts, one warp per expert over the whole grid (T = 0 still sends zero counts).
  for (int e = blockIdx.x * nw + warp; e < E; e += gridDim.x * nw) {
    if constexpr (kSkips) {
      if (!(s_send[e / EL] & kSendCounts)) continue;
    }
    int n = 0;
#pragma unroll 8  // independent loads in flight: topk_idx is L2-resident, latency-bound
    for (int i = lane; i < T * K; i += 32) n += (__ldg(p.topk_idx + i) == e);
    n = min(warp_sum(n), M);  // duplicates beyond capacity are dropped, consistently below
    if (lane == 0)
      signal_set(p.c, p.r.disp_count + (e % EL) * R + p.c.rank, uint64_t(n) + 1, e / EL);
  }

  // (2) stage this block's tokens.
  for (int t = blockIdx.x; t < T; t += gridDim.x) stage_token(p, t);
  __syncthreads();

  // (3) one warp per (token, k) pair of this block.
  const int mine = T > int(blockIdx.x) ? (T - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  for (int q = warp; q < mine * K; q += nw) {
    const int t = blockIdx.x + (q / K) * gridDim.x, k = q % K;
    const int64_t e = __ldg(p.topk_idx + t * K + k);
    if (e < 0) continue;
    if constexpr (kSkips) {
      if (!(s_send[e / EL] & kSendRows)) continue;
    }
    int before = 0;
#pragma unroll 8
    for (int i = lane; i < t * K + k; i += 32) before += (__ldg(p.topk_idx + i) == e);
    before = warp_sum(before);
    if (before >= M) continue;
    const int dst = int(e / EL), el = int(e % EL);
    uint8_t* slot = p.r.disp_recv + (size_t(el * R + p.c.rank) * M + before) * p.row_bytes;
    warp_send<kPlain>(p.c, slot, p.r.disp_send + size_t(t) * p.row_bytes, p.msg_bytes,
                      p.r.disp_arrival + el * R + p.c.rank, 1, dst, lane);
  }
}

// One received message -> row `out_row` of the packed outputs.
__device__ __forceinline__ void copy_out(const DispatchParams& p, const uint8_t* msg,
                                         size_t out_row, int lane) {
  const int H = p.hidden;
  if (lane == 0) p.src_token_idx[out_row] = __ldcg(reinterpret_cast<const int*>(msg));
  if (!p.fp8) {
    warp_copy<kL2>(static_cast<uint8_t*>(p.recv_x) + out_row * H * 2, msg + 16, H * 2, lane);
    return;
  }
  warp_copy<kL2>(static_cast<uint8_t*>(p.recv_x) + out_row * H, msg + 16, H, lane);
  const float* scales = reinterpret_cast<const float*>(msg + 16 + H);
  const int groups = H / fp8::kBlock;
  if (!p.ue8m0) {
    float* out = static_cast<float*>(p.recv_scales) + out_row * groups;
    for (int g = lane; g < groups; g += 32) out[g] = __ldcg(scales + g);
  } else {
    // ceil(groups / 4) words; the bytes past the last group of the last word stay 0.
    const int words = (groups + 3) / 4;
    int* out = static_cast<int*>(p.recv_scales) + out_row * words;
    for (int w = lane; w < words; w += 32) {
      uint32_t v = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (4 * w + j < groups) v |= fp8::ue8m0(__ldcg(scales + 4 * w + j)) << (8 * j);
      out[w] = static_cast<int>(v);
    }
  }
}

template <bool kSkips>
__device__ void recv_phase(const DispatchParams& p, int* s_count, int* s_start) {
  __shared__ int s_total, s_last;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  const int R = p.c.num_ranks, EL = p.num_experts / R, M = p.max_tokens;
  const bool masking = kSkips && p.c.active != nullptr;
  // Several blocks per expert when there are fewer experts than blocks.
  const int bpe = max(1, int(gridDim.x) / EL), groups = gridDim.x / bpe;
  const int g = blockIdx.x / bpe, sub = blockIdx.x % bpe;
  if (g >= groups) return;
  for (int el = g; el < EL; el += groups) {
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      int n = 0;  // a masked source, or one that timed out, contributes no rows
      if (!masking || rank_active(p.c, s)) {
        bool failed = false;
        const uint64_t v = spin_wait(p.c, p.r.disp_count + el * R + s, kNonZero, 0,
                                     kWaitDispatchCount, s, el, masking, &failed);
        if (!failed) {
          n = min(int(v - 1), M);
          spin_wait(p.c, p.r.disp_arrival + el * R + s, kEqual, uint64_t(n), kWaitDispatchData, s,
                    el, masking, &failed);
        }
        if (failed) n = 0;
      }
      s_count[s] = n;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int acc = 0;
      for (int s = 0; s < R; ++s) {
        s_start[s] = acc;
        acc += s_count[s];
      }
      s_total = acc;
      // The last of the bpe blocks to have read this expert's signals resets them.
      s_last = atomicAdd(p.r.disp_readers + el, 1u) == unsigned(bpe - 1);
    }
    __syncthreads();
    if (s_last) {
      for (int s = threadIdx.x; s < R; s += blockDim.x) {
        p.r.disp_count[el * R + s] = 0;
        p.r.disp_arrival[el * R + s] = 0;
      }
      if (threadIdx.x == 0) p.r.disp_readers[el] = 0;
    }
    const int total = s_total;
    const size_t base = size_t(el) * R * M;
    for (int r = sub * nw + warp; r < total; r += bpe * nw) {
      int lo = 0, hi = R - 1;  // last source whose group starts at or before r
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (s_start[mid] <= r)
          lo = mid;
        else
          hi = mid - 1;
      }
      const uint8_t* msg =
          p.r.disp_recv + (size_t(el * R + lo) * M + (r - s_start[lo])) * p.row_bytes;
      copy_out(p, msg, base + r, lane);
    }
    for (int r = total + sub * blockDim.x + threadIdx.x; r < R * M; r += bpe * blockDim.x) {
      p.src_token_idx[base + r] = -1;
    }
    if (sub == 0) {
      for (int s = threadIdx.x; s < R; s += blockDim.x) {
        p.layout_range[(el * R + s) * 2] = s_start[s];
        p.layout_range[(el * R + s) * 2 + 1] = s_count[s];
      }
      if (threadIdx.x == 0) {
        p.recv_count[el] = total;
        if (p.stats) p.stats[el] += total;
      }
    }
    __syncthreads();  // s_count/s_start are reused by the next expert
  }
}

// Dynamic shared memory: s_count[R], s_start[R] (receive), then s_send[R] bytes (kSkips).
template <bool kSkips>
__global__ void __launch_bounds__(kThreads, 2)
    dispatch_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ int smem[];
  const int R = p.c.num_ranks;
  uint8_t* s_send = reinterpret_cast<uint8_t*>(smem + 2 * R);
  if constexpr (kSkips) {
    if (p.phases & kSendPhase) {
      load_send_bits(p.c, p.stall, s_send);
      __syncthreads();
    }
  }
  if (p.phases & kSendPhase) send_phase<kSkips>(p, s_send);
  if (p.phases & kRecvPhase) recv_phase<kSkips>(p, smem, smem + R);
}

}  // namespace

int dispatch_blocks_per_sm(int num_ranks) {
  const size_t smem = size_t(2) * num_ranks * sizeof(int) + size_t(num_ranks);
  int plain = 0, skipping = 0;
  MPIEP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&plain, dispatch_kernel<false>,
                                                                 kThreads, smem));
  MPIEP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&skipping, dispatch_kernel<true>,
                                                                 kThreads, smem));
  return std::min(plain, skipping);
}

void launch_dispatch(const DispatchParams& p, void* stream) {
  const bool skips = p.c.active != nullptr || p.stall != 0;
  const size_t smem = size_t(2) * p.c.num_ranks * sizeof(int) + (skips ? p.c.num_ranks : 0);
  const auto kernel = skips ? dispatch_kernel<true> : dispatch_kernel<false>;
  kernel<<<p.num_blocks, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ll
}  // namespace mpiep
