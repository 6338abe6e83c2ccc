// After a low-latency combine wait gives up: which of a token's rows are missing, read off the
// token's arrival counter. Every row adds combine_signal(expert) (a count and a 32-bit hash of
// the expert), so the gap between the expected and the observed counter is the signal sum of
// exactly the missing rows; the set of slots whose sum matches is found by enumeration (a
// chance match of two different sets needs a 32-bit hash collision). Timeout path only:
// nothing here runs while rows arrive in time.
#pragma once

#include <cstdint>

#include "kernels/low_latency_common.cuh"

namespace mpiep {
namespace ll {

// Bit k of the result: slot k of the token holds an expert (at most 32 slots looked at).
__device__ __forceinline__ uint32_t valid_slots(const int64_t* topk_row, int K) {
  uint32_t bits = 0;
  for (int k = 0; k < K && k < 32; ++k)
    if (__ldg(topk_row + k) >= 0) bits |= 1u << k;
  return bits;
}

__device__ __forceinline__ uint64_t signal_sum(const int64_t* topk_row, uint32_t slots) {
  uint64_t sum = 0;
  for (uint32_t b = slots; b; b &= b - 1)
    sum += combine_signal(static_cast<int>(__ldg(topk_row + __ffs(b) - 1)));
  return sum;
}

// The subset of `slots` whose signals sum to `gap`: the missing rows (a rank that stopped sends
// none of its rows, or stopped halfway). 0 when none does, or with more than 16 slots to try.
// At most 2^16 sums, on one thread, once per timed-out token.
static __device__ __noinline__ uint32_t missing_slots(const int64_t* topk_row, uint32_t slots,
                                                      uint64_t gap) {
  if (gap == 0 || __popc(slots) > 16) return 0;
  for (uint32_t sub = slots; sub; sub = (sub - 1) & slots)
    if (signal_sum(topk_row, sub) == gap) return sub;
  return 0;
}

// Whether the counter shortfall `gap` is made only of rows of `optional` slots (experts of
// masked ranks, which may or may not have sent before they were masked).
static __device__ __noinline__ bool only_optional_missing(const int64_t* topk_row,
                                                          uint32_t optional, uint64_t gap) {
  if (gap == 0) return true;
  if (__popc(optional) > 16) return false;
  for (uint32_t sub = optional; sub; sub = (sub - 1) & optional)
    if (signal_sum(topk_row, sub) == gap) return true;
  return false;
}

}  // namespace ll
}  // namespace mpiep
