// Low-latency combine. Send phase: one warp per received row (expert e, source s, i-th row of
// the group) sends y[e, row] to source s's comb_recv[global expert][source token], followed by
// combine_signal(e) added to s's comb_arrival[token]. Receive phase: one block per local token
// waits until the counter holds the signals of all its valid top-k slots (known locally: no
// count message needed), resets the counter, and writes out[t] = sum_k w[t,k] * row(e_k, t),
// accumulated in float32 in k order and rounded once to BF16.
//
// Two instantiations: kSkips = false is the plain kernel; kSkips = true (rank masking, or the
// test stall) sends no rows to masked sources, and a slot whose expert's owner is masked adds 0
// and is not waited for. A token whose wait times out names the rank whose rows are missing
// (low_latency_missing.cuh); with masking that rank is masked, the call finishes without it,
// and a token whose missing rows cannot be told apart comes out NaN, never a wrong sum. With
// masking every rank also tells each active rank that its combine started (a beacon, block 0),
// and block 0 of the receive waits for those of the active ranks: a rank that stops is noticed
// by every survivor in this call, not only by those whose tokens had an expert there.
//
// Duplicate experts within one token's top-k share one comb_recv row: the result is right only
// when the expert produced identical rows for both copies (the usual case: same input token).
#include <cuda_runtime.h>

#include "kernels/fp8.cuh"
#include "kernels/low_latency_common.cuh"
#include "kernels/low_latency_missing.cuh"
#include "mpiep/errors.h"

namespace mpiep {
namespace ll {
namespace {

template <bool kSkips>
__device__ void send_phase(const CombineParams& p, const uint8_t* s_send) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  const int R = p.c.num_ranks, EL = p.num_experts / R, M = p.max_tokens, H = p.hidden;
  const size_t slots = size_t(EL) * R * M;
  if constexpr (kSkips) {
    if (p.c.active != nullptr && blockIdx.x == 0) {  // the beacons: "my combine started"
      for (int r = threadIdx.x; r < R; r += blockDim.x)
        if (s_send[r] & kSendRows)
          signal_set(p.c, p.r.comb_beacon + p.c.rank, uint64_t(p.c.epoch) + 1, r);
    }
  }
  for (size_t idx = size_t(blockIdx.x) * nw + warp; idx < slots; idx += size_t(gridDim.x) * nw) {
    // Row index outermost: the first EL*R warps take row 0 of every (expert, source) group,
    // so the few rows per group spread over all warps instead of idling most of them.
    const int i = int(idx / (size_t(EL) * R)), pair = int(idx % (size_t(EL) * R));
    const int el = pair / R, s = pair % R;
    if constexpr (kSkips) {
      if (!(s_send[s] & kSendRows)) continue;
    }
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
    warp_send<kReadOnly>(p.c, dst, src, H * 2, arrival, combine_signal(p.c.rank * EL + el), s,
                         lane);
  }
}

// Records a token's timed-out wait (`got` of `want` on its counter; `slots`: the slots waited
// for), naming the owner of its first missing row (-1 when the counter does not say). Returns
// the missing slots, 0 when unknown.
__device__ __noinline__ uint32_t report_token_timeout(const CombineParams& p, int t, uint32_t slots,
                                                      uint64_t want, uint64_t got) {
  const int64_t* row = p.topk_idx + size_t(t) * p.num_topk;
  const int EL = p.num_experts / p.c.num_ranks;
  const uint32_t missing = missing_slots(row, slots, want - got);
  const int peer = missing ? static_cast<int>(__ldg(row + __ffs(missing) - 1) / EL) : -1;
  report_timeout(p.c, kWaitCombineData, peer, t, got & 0xFFFFFFFFu, want & 0xFFFFFFFFu);
  return missing;
}

// Thread 0 of a token's block, plain kernel: waits for every valid slot's row. A timeout loses
// the call's outputs (the host raises before the next call); the rank's other waits bail out.
__device__ __forceinline__ void wait_token_plain(const CombineParams& p, int t) {
  const int K = p.num_topk;
  uint64_t want = 0;
  for (int k = 0; k < K; ++k) {
    const int64_t e = __ldg(p.topk_idx + t * K + k);
    if (e >= 0) want += combine_signal(static_cast<int>(e));
  }
  const uint64_t* arrival = p.r.comb_arrival + t;
  const uint64_t start = global_ns();
  for (unsigned iter = 0;; ++iter) {
    const uint64_t v = ld_acquire_sys(arrival);
    if (v == want) break;
    if ((iter & 63) == 0) {
      if (timeout_reported(p.c)) break;
      if (global_ns() - start > p.c.timeout_ns) {
        report_token_timeout(p, t, valid_slots(p.topk_idx + size_t(t) * K, K), want, v);
        break;
      }
    }
  }
}

// Which slots of a token to wait for and add: valid ones whose expert's owner is active.
struct TokenPlan {
  uint32_t use;   // slots to add
  uint64_t want;  // the counter once their rows are in
};
__device__ __forceinline__ TokenPlan plan_token(const CombineParams& p, const int* s_e) {
  const int EL = p.num_experts / p.c.num_ranks;
  TokenPlan plan{0, 0};
  for (int k = 0; k < p.num_topk; ++k) {
    const int e = s_e[k];
    if (e >= 0 && rank_active(p.c, e / EL)) {
      plan.use |= 1u << k;
      plan.want += combine_signal(e);
    }
  }
  return plan;
}

// A timed-out token with masking: mask the owners of its missing rows and add only the slots
// of owners still active (a masked owner's rows are dropped even where they arrived, as if it
// had been masked before the call). *poison when the counter does not say what is missing.
__device__ __noinline__ uint32_t drop_silent(const CombineParams& p, int t, uint32_t valid,
                                             uint64_t got, bool* poison) {
  const int64_t* row = p.topk_idx + size_t(t) * p.num_topk;
  const int EL = p.num_experts / p.c.num_ranks;
  const uint32_t missing = report_token_timeout(p, t, valid, signal_sum(row, valid), got);
  if (missing == 0) {
    *poison = true;
    return 0;
  }
  for (uint32_t b = missing; b; b &= b - 1)
    mask_rank(p.c, static_cast<int>(__ldg(row + __ffs(b) - 1) / EL));
  uint32_t keep = 0;
  for (uint32_t b = valid; b; b &= b - 1) {
    const int k = __ffs(b) - 1;
    if (rank_active(p.c, static_cast<int>(__ldg(row + k) / EL))) keep |= 1u << k;
  }
  return keep;
}

// A token's wait timed out (masking): of the ranks whose rows are missing, those that have not
// started this combine (no beacon of this epoch) are masked; those that have (this rank
// included) are alive, their rows on their way (sent by blocks of their kernels that started
// late, e.g. while other ranks' kernels held the SMs waiting on the silent rank). Masking one
// of them would split the survivors, so the token waits on for them. Returns whether it
// should (false: the counter does not say what is missing, or only silent ranks' rows are).
__device__ __noinline__ bool wait_for_started(const CombineParams& p, int t, uint32_t valid,
                                              uint64_t got) {
  const int64_t* row = p.topk_idx + size_t(t) * p.num_topk;
  const int EL = p.num_experts / p.c.num_ranks;
  const uint32_t missing = missing_slots(row, valid, signal_sum(row, valid) - got);
  bool alive = false;
  for (uint32_t b = missing; b; b &= b - 1) {
    const int r = static_cast<int>(__ldg(row + __ffs(b) - 1) / EL);
    if (!rank_active(p.c, r)) continue;
    if (r == p.c.rank || ld_acquire_sys(p.r.comb_beacon + r) >= uint64_t(p.c.epoch) + 1) {
      alive = true;
    } else {
      report_timeout(p.c, kWaitCombineData, r, t, got & 0xFFFFFFFFu,
                     signal_sum(row, valid) & 0xFFFFFFFFu);
      mask_rank(p.c, r);
    }
  }
  return alive;
}

// Thread 0 of a token's block, kSkips kernel: waits for the rows of active owners' slots,
// following mask changes made meanwhile by other blocks. Returns the slots to add.
__device__ uint32_t wait_token_skipping(const CombineParams& p, int t, const int* s_e,
                                        bool* poison) {
  const bool masking = p.c.active != nullptr;
  const int64_t* row = p.topk_idx + size_t(t) * p.num_topk;
  TokenPlan plan = plan_token(p, s_e);
  const uint64_t* arrival = p.r.comb_arrival + t;
  const uint64_t start = global_ns();
  for (unsigned iter = 0;; ++iter) {
    const uint64_t v = ld_acquire_sys(arrival);
    if (v == plan.want) return plan.use;
    if ((iter & 63) == 0) {
      if (!masking) {  // a stall without masking: the plain kernel's rules
        if (timeout_reported(p.c)) return plan.use;
        if (global_ns() - start > p.c.timeout_ns) {
          report_token_timeout(p, t, plan.use, plan.want, v);
          return plan.use;
        }
        continue;
      }
      const uint32_t valid = valid_slots(row, p.num_topk);
      plan = plan_token(p, s_e);
      // Masked owners may have sent some of their rows before they were masked.
      if (plan.use != valid &&
          only_optional_missing(row, valid & ~plan.use, signal_sum(row, valid) - v))
        return plan.use;
      // A rank that started this combine gets one more timeout to deliver its rows.
      const uint64_t waited = global_ns() - start;
      if (waited > p.c.timeout_ns &&
          (waited > 2 * p.c.timeout_ns || !wait_for_started(p, t, valid, v)))
        return drop_silent(p, t, valid, v, poison);
    }
  }
}

template <bool kSkips>
__device__ void recv_phase(const CombineParams& p, int* s_e) {
  __shared__ uint32_t s_use;
  __shared__ bool s_poison;
  const int T = p.num_tokens, K = p.num_topk, H = p.hidden, M = p.max_tokens;
  if constexpr (kSkips) {
    if (p.c.active != nullptr && blockIdx.x == 0) {  // every active rank started this combine?
      for (int s = threadIdx.x; s < p.c.num_ranks; s += blockDim.x) {
        bool failed = false;
        if (rank_active(p.c, s))  // a silent one is masked here: the other blocks follow
          spin_wait(p.c, p.r.comb_beacon + s, kAtLeast, uint64_t(p.c.epoch) + 1, kWaitCombineStart,
                    s, -1, true, &failed);
      }
      __syncthreads();
    }
  }
  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    if constexpr (kSkips) {
      for (int k = threadIdx.x; k < K; k += blockDim.x)
        s_e[k] = static_cast<int>(__ldg(p.topk_idx + t * K + k));
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if constexpr (kSkips) {
        bool poison = false;
        s_use = wait_token_skipping(p, t, s_e, &poison);
        s_poison = poison;
      } else {
        wait_token_plain(p, t);
      }
      p.r.comb_arrival[t] = 0;  // every row for t has arrived: nobody writes it again this call
    }
    __syncthreads();
    int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(p.out) + size_t(t) * H * 2);
    if constexpr (kSkips) {
      const uint32_t use = s_use;
      const bool poison = s_poison;
      for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k = 0; k < K; ++k) {
          if (!((use >> k) & 1u)) continue;
          const float w = __ldg(p.topk_weights + t * K + k);
          const int4* src =
              reinterpret_cast<const int4*>(p.r.comb_recv + (size_t(s_e[k]) * M + t) * H * 2);
          float f[8];
          fp8::unpack_bf16x8(__ldcg(src + v), f);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] = fmaf(w, f[j], acc[j]);
        }
        if (poison) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] = __int_as_float(0x7FC00000);
        }
        out[v] = fp8::pack_bf16x8(acc);
      }
    } else {
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
    }
    __syncthreads();
  }
}

// Dynamic shared memory (kSkips only): s_send[R] bytes, then s_e[K] ints (4-byte aligned).
template <bool kSkips>
__global__ void __launch_bounds__(kThreads, 2)
    combine_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ int smem[];
  uint8_t* s_send = reinterpret_cast<uint8_t*>(smem);
  int* s_e = smem + (p.c.num_ranks + 3) / 4;
  if constexpr (kSkips) {
    if (p.phases & kSendPhase) {
      load_send_bits(p.c, p.stall, s_send);
      __syncthreads();
    }
  }
  if (p.phases & kSendPhase) send_phase<kSkips>(p, s_send);
  if (p.phases & kRecvPhase) recv_phase<kSkips>(p, s_e);
}

}  // namespace

int combine_blocks_per_sm(int num_ranks) {
  const size_t smem = (size_t(num_ranks + 3) / 4 + size_t(kMaxTopkSkipping)) * sizeof(int);
  int plain = 0, skipping = 0;
  MPIEP_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&plain, combine_kernel<false>, kThreads, smem));
  MPIEP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&skipping, combine_kernel<true>,
                                                                 kThreads, smem));
  return std::min(plain, skipping);
}

void launch_combine(const CombineParams& p, void* stream) {
  const bool skips = p.c.active != nullptr || p.stall != 0;
  MPIEP_CHECK_ARG(!skips || p.num_topk <= kMaxTopkSkipping,
                  "low-latency combine with rank masking supports at most 32 top-k slots");
  const size_t smem =
      skips ? (size_t(p.c.num_ranks + 3) / 4 + size_t(p.num_topk)) * sizeof(int) : 0;
  const auto kernel = skips ? combine_kernel<true> : combine_kernel<false>;
  kernel<<<p.num_blocks, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  MPIEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ll
}  // namespace mpiep
