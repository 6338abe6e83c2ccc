// Device helpers shared by the low-latency kernels: system-scope signalling, per-peer transport
// choice (NVLink stores when the peer's heap is mapped, NVSHMEM puts otherwise), warp copies,
// spin-waits that give up after a globaltimer timeout instead of hanging, and rank masking
// (which ranks a launch sends to and waits on).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "mpiep/low_latency.h"
#include "mpiep/test_stall.h"

namespace mpiep {
namespace ll {

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// Release: every write that happened before (this thread's, and its warp's through __syncwarp)
// is visible to whoever acquires the counter value.
__device__ __forceinline__ void red_add_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Address of `local` (inside our heap) in PE `pe`'s heap as mapped here, or null.
template <class T>
__device__ __forceinline__ T* peer_ptr(const Common& c, T* local, int pe) {
  uint8_t* base = c.peer_bases[pe];
  if (base == nullptr) return nullptr;
  return reinterpret_cast<T*>(base + (reinterpret_cast<uint8_t*>(local) - c.heap));
}

enum LoadKind { kPlain, kL2, kReadOnly };

template <LoadKind kind>
__device__ __forceinline__ int4 load16(const int4* p) {
  if constexpr (kind == kL2)
    return __ldcg(p);  // written by peers: bypass L1
  else if constexpr (kind == kReadOnly)
    return __ldg(p);
  else
    return *p;
}

// The warp copies `bytes` (a multiple of 16) with four 16-byte loads in flight per lane.
template <LoadKind kind>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int bytes, int lane) {
  int4* d = reinterpret_cast<int4*>(dst);
  const int4* s = reinterpret_cast<const int4*>(src);
  const int n = bytes / 16;
  int i = lane;
  for (; i + 96 < n; i += 128) {
    int4 a = load16<kind>(s + i), b = load16<kind>(s + i + 32);
    int4 e = load16<kind>(s + i + 64), f = load16<kind>(s + i + 96);
    d[i] = a;
    d[i + 32] = b;
    d[i + 64] = e;
    d[i + 96] = f;
  }
  for (; i < n; i += 32) d[i] = load16<kind>(s + i);
}

// Signal SET on `pe` (count messages; ordering against data is not needed, see dispatch).
__device__ __forceinline__ void signal_set(const Common& c, uint64_t* sig, uint64_t v, int pe) {
  if (uint64_t* p = peer_ptr(c, sig, pe)) {
    st_release_sys(p, v);
  } else {
    nvshmemx_signal_op(sig, v, NVSHMEM_SIGNAL_SET, pe);
  }
}

// The warp sends `bytes` from local `src` to `dst` (our heap address; the same offset on pe),
// then adds `signal` to `arrival` on pe, ordered after the data. For NVSHMEM puts `src` must be
// symmetric (IBGDA registers only the heap).
template <LoadKind kind>
__device__ __forceinline__ void warp_send(const Common& c, void* dst, const void* src, int bytes,
                                          uint64_t* arrival, uint64_t signal, int pe, int lane) {
  if (void* p = peer_ptr(c, dst, pe)) {
    warp_copy<kind>(p, src, bytes, lane);
    __syncwarp();
    if (lane == 0) red_add_release_sys(peer_ptr(c, arrival, pe), signal);
    __syncwarp();
  } else {
    nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, arrival, signal, NVSHMEM_SIGNAL_ADD, pe);
  }
}

// What one combined row of global expert `e` adds to its token's arrival counter: 1 in the low
// 32 bits (a count: a token has far fewer slots) and a hash of e in the high 32 bits (summed
// modulo 2^32). A token whose counter stops short then tells which of its rows are missing,
// and so which rank stopped answering (identify_missing in low_latency_combine.cu).
__device__ __forceinline__ uint64_t combine_signal(int e) {
  return (uint64_t(static_cast<uint32_t>(e + 1) * 0x9E3779B1u) << 32) | 1u;
}

// -- rank masking -------------------------------------------------------------------------
// Whether rank r takes part now (another block of this launch may have masked it meanwhile).
__device__ __forceinline__ bool rank_active(const Common& c, int r) {
  return c.active == nullptr || *reinterpret_cast<const volatile int*>(c.active + r) != 0;
}
// Masks rank r for the rest of this call and every later launch (the host resets the words
// once the ranks agree).
__device__ __forceinline__ void mask_rank(const Common& c, int r) {
  if (c.active != nullptr && r >= 0) atomicExch(c.active + r, 0);
}

// What a launch sends to each rank: bit kSendCounts (dispatch counts), bit kSendRows (rows).
// Nothing to masked ranks; a test stall withholds its phase from every rank but this one.
constexpr uint8_t kSendCounts = 1, kSendRows = 2;
__device__ __forceinline__ uint8_t send_bits(const Common& c, int stall, int r) {
  if (!rank_active(c, r)) return 0;
  if (r == c.rank) return kSendCounts | kSendRows;
  if (stall & (kStallLlDispatchCount | kStallLlCombine)) return 0;
  if (stall & kStallLlDispatchData) return kSendCounts;
  return kSendCounts | kSendRows;
}
// Fills s_send[R] for this block; the caller synchronises the block before reading it.
__device__ __forceinline__ void load_send_bits(const Common& c, int stall, uint8_t* s_send) {
  for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x) s_send[r] = send_bits(c, stall, r);
}

// Records the first timeout (one writer, elected through a device word) in host-mapped memory.
__device__ __forceinline__ void report_timeout(const Common& c, int phase, int peer, int index,
                                               uint64_t observed, uint64_t expected) {
  if (atomicCAS(c.err_lock, 0, 1) != 0) return;
  c.err->rank = c.rank;
  c.err->phase = phase;
  c.err->peer = peer;
  c.err->index = index;
  c.err->epoch = c.epoch;
  c.err->observed = static_cast<long long>(observed);
  c.err->expected = static_cast<long long>(expected);
  __threadfence_system();
  c.err->flag = 1;
  __threadfence_system();
}

__device__ __forceinline__ bool timeout_reported(const Common& c) {
  return *reinterpret_cast<const volatile int*>(c.err_lock) != 0;
}

enum WaitFor { kNonZero, kEqual, kAtLeast };

// Spins until *p != 0, == expected or >= expected (`cond`), waiting on rank `peer`. Returns the
// last value; *failed is set when it gave up: after timeout_ns (recording the first timeout), or
//  - unmasked (`masking` false): as soon as another wait of this rank timed out (all bail out);
//  - masking: as soon as `peer` is masked. A wait that times out masks its peer, so the call
//    finishes without it while waits on the other ranks go on.
__device__ __forceinline__ uint64_t spin_wait(const Common& c, const uint64_t* p, WaitFor cond,
                                              uint64_t expected, int phase, int peer, int index,
                                              bool masking, bool* failed) {
  const uint64_t start = global_ns();
  for (unsigned iter = 0;; ++iter) {
    uint64_t v = ld_acquire_sys(p);
    if (cond == kNonZero ? v != 0 : cond == kEqual ? v == expected : v >= expected) return v;
    if ((iter & 63) == 0) {
      if (masking ? !rank_active(c, peer) : timeout_reported(c)) {
        *failed = true;
        return v;
      }
      if (global_ns() - start > c.timeout_ns) {
        report_timeout(c, phase, peer, index, v, cond == kNonZero ? 1 : expected);
        if (masking) mask_rank(c, peer);
        *failed = true;
        return v;
      }
    }
  }
}

}  // namespace ll
}  // namespace mpiep
