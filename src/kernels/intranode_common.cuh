// Device helpers shared by the intranode kernels: system-scope signalling, timeouts,
// error reports and the 16-byte copy primitives.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mpiep/intranode.h"

namespace mpiep {
namespace intranode {

constexpr unsigned kFullMask = 0xffffffffu;

// Peers are other GPUs (NVLink) or other processes on this GPU (MPS): every signal is
// a system-scope release store, every wait a system-scope acquire load.
__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(int64_t* p, int64_t v) {
  asm volatile("st.release.sys.global.s64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int64_t ld_acquire_sys(const int64_t* p) {
  int64_t v;
  asm volatile("ld.acquire.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
// Words written by peers are read with volatile loads: never from a stale L1 line.
__device__ __forceinline__ int ld_volatile(const int* p) {
  return *reinterpret_cast<const volatile int*>(p);
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The first error of this rank wins; the host reads it from mapped memory.
__device__ __forceinline__ void report_error(HostInfo* host, int phase, int peer) {
  if (atomicCAS(const_cast<int*>(&host->error_phase), 0, phase) == 0) {
    host->error_peer = peer;
    __threadfence_system();
  }
}

// Rows received from peers were written during this kernel: bypass L1 (documented
// .cg loads), or, with PTX tricks enabled, DeepEP's non-coherent no-allocate load, which
// is safe here only because each row is read once, after the acquire of its flag.
__device__ __forceinline__ int4 ld_peer_written(const int4* p) {
#ifdef MPIEP_DISABLE_PTX_TRICKS
  return __ldcg(p);
#else
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}
// Caller inputs do not change during a kernel: read-only path.
__device__ __forceinline__ int4 ld_input(const int4* p) { return __ldg(p); }

// Eight BF16 values (one 16-byte load) accumulated into fp32, and eight fp32 sums packed
// back to BF16 (round to nearest even): the combine reductions.
__device__ __forceinline__ void add_bf16x8(float* acc, const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}
__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
  int4 res;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&res);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2bfloat162_rn(acc[2 * e], acc[2 * e + 1]);
  return res;
}

// The exclusive prefix of a send_slot entry (entries of non-members store -1 - prefix).
__device__ __forceinline__ int slot_prefix(int v) { return v >= 0 ? v : -1 - v; }

// Start-of-kernel barrier of the data kernels. It closes the buffer-reuse hazard: a
// rank may write into a peer's rows only once that peer has started the same epoch's
// kernel, i.e. (stream order) finished reading rows and flags of every earlier one.
// Block 0 announces; blocks that write to peers wait. Returns false on timeout.
__device__ __forceinline__ bool data_barrier(const PeerPointers& p, int64_t epoch, int phase,
                                             bool wait) {
  __shared__ int ok;
  if (blockIdx.x == 0 && threadIdx.x < p.num_ranks)
    st_release_sys(&p.ctrl[threadIdx.x]->data_barrier[p.rank], epoch);
  if (threadIdx.x == 0) {
    ok = 1;
    Control* own = p.ctrl[p.rank];
    uint64_t deadline = global_ns() + p.timeout_ns;
    for (int r = 0; wait && r < p.num_ranks && ok; ++r) {
      while (ld_acquire_sys(&own->data_barrier[r]) < epoch) {
        if (global_ns() > deadline) {
          report_error(p.host, phase, r);
          ok = 0;
          break;
        }
      }
    }
  }
  __syncthreads();
  return ok != 0;
}

// The rank a timed-out receiver names: a source that has not started this call's data kernel
// (it never announced `epoch` at the start barrier: it is the one that stopped, the others wait
// for it), else `waited` (the source it waited on). Timeout path only.
static __device__ __noinline__ int silent_source(const PeerPointers& p, int64_t epoch, int waited) {
  const Control* own = p.ctrl[p.rank];
  for (int s = 0; s < p.num_ranks; ++s)
    if (s != p.rank && ld_acquire_sys(&own->data_barrier[s]) < epoch) return s;
  return waited;
}

// Every block reads the epoch at entry (read_data_epoch); the last block to leave
// advances it. Keeping the epoch on the device makes captured CUDA graphs replay right.
__device__ __forceinline__ int64_t read_data_epoch(Control* own) {
  return *reinterpret_cast<volatile int64_t*>(&own->data_epoch) + 1;
}
__device__ __forceinline__ void finish_data_kernel(Control* own, int64_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&own->exit_count, 1u) == gridDim.x - 1) {
      own->exit_count = 0;
      *reinterpret_cast<volatile int64_t*>(&own->data_epoch) = epoch;
    }
  }
}

// Checks every receiver's row count against the buffer (and num_worst_tokens); all
// ranks see the same matrix, so all ranks skip the kernel together on failure.
__device__ __forceinline__ bool rows_fit(const PeerPointers& p, const int* m, int row_bytes,
                                         int worst_rows, bool by_receiver) {
  const int R = p.num_ranks;
  for (int r = 0; r < R; ++r) {
    int64_t rows = 0;
    for (int s = 0; s < R; ++s) rows += by_receiver ? m[s * (R + 1) + r] : m[r * (R + 1) + s];
    if (rows * row_bytes > p.row_area_bytes) {
      if (threadIdx.x == 0 && blockIdx.x == 0) report_error(p.host, kPhaseCapacity, r);
      return false;
    }
    if (worst_rows > 0 && rows > worst_rows) {
      if (threadIdx.x == 0 && blockIdx.x == 0) report_error(p.host, kPhaseWorstTokensOverflow, r);
      return false;
    }
  }
  return true;
}

}  // namespace intranode
}  // namespace mpiep
