// Device helpers of the internode kernels: table and count-matrix accessors, RDMA sends
// (stores through a mapped peer pointer, or NVSHMEM puts), flags with timeouts, the
// start-of-kernel barrier and the epoch bookkeeping. The memory-ordering primitives are
// the intranode ones (system-scope release/acquire).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "kernels/intranode_common.cuh"
#include "mpiep/internode.h"

namespace mpiep {
namespace internode {

using intranode::add_bf16x8;
using intranode::global_ns;
using intranode::kFullMask;
using intranode::ld_acquire_sys;
using intranode::ld_input;
using intranode::ld_peer_written;
using intranode::pack_bf16x8;
using intranode::st_release_sys;

__device__ __forceinline__ void red_add_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  return ld_acquire_sys(reinterpret_cast<const uint64_t*>(p));
}

// Row counts of the notify: M(s, r) rows s sends to rank r, NC(s, n) tokens s sends to
// node n, tokens(s) s's token count.
struct Counts {
  const int* c;
  int R, N;
  __device__ __forceinline__ int M(int s, int r) const {
    return __ldg(c + int64_t(s) * (R + N + 1) + r);
  }
  __device__ __forceinline__ int NC(int s, int n) const {
    return __ldg(c + int64_t(s) * (R + N + 1) + R + n);
  }
};

struct Tables {
  const int* t;
  TableLayout l;
  int R, N;
  __device__ __forceinline__ int status(int i) const { return __ldg(t + l.status + i); }
  __device__ __forceinline__ int recv_prefix(int j, int s) const {
    return __ldg(t + l.recv_prefix + j * R + s);
  }
  __device__ __forceinline__ int rdma_in_base(int m) const { return __ldg(t + l.rdma_in_base + m); }
  __device__ __forceinline__ int rdma_in_count(int m) const {
    return __ldg(t + l.rdma_in_count + m);
  }
  __device__ __forceinline__ int rdma_out_base(int n) const {
    return __ldg(t + l.rdma_out_base + n);
  }
  __device__ __forceinline__ int my_node_base(int n) const { return __ldg(t + l.my_node_base + n); }
  __device__ __forceinline__ int comb_out_base(int m) const {
    return __ldg(t + l.comb_out_base + m);
  }
  __device__ __forceinline__ int fwd_slot_base(int j, int m) const {
    return __ldg(t + l.fwd_slot_base + j * N + m);
  }
  __device__ __forceinline__ int recv_slot_base(int l_, int m) const {
    return __ldg(t + l.recv_slot_base + l_ * N + m);
  }
};

__device__ __forceinline__ Tables tables_of(const Peers& p, const int* t) {
  Tables tb;
  tb.t = t;
  tb.R = p.topo.num_ranks;
  tb.N = p.topo.num_nodes;
  tb.l = table_layout(tb.R, tb.N, p.topo.local_ranks);
  return tb;
}

// Chunked work lists: a list of groups (nodes, source nodes, ...) of `count(g)` items, cut
// into chunks of `chunk` items and dealt round-robin to the warps of the grid. Finds the
// group and chunk of the i-th chunk; false past the end.
template <class CountFn>
__device__ __forceinline__ bool nth_chunk(int i, int groups, int chunk, CountFn count, int* group,
                                          int* first, int* last) {
  for (int g = 0; g < groups; ++g) {
    const int n = count(g);
    const int chunks = (n + chunk - 1) / chunk;
    if (i < chunks) {
      *group = g;
      *first = i * chunk;
      *last = min(n, *first + chunk);
      return true;
    }
    i -= chunks;
  }
  return false;
}

// The first error of this rank wins; the host reads it from mapped memory, this rank's
// waits from the device word (NvlControl::failed).
__device__ __forceinline__ void report_error(const Peers& p, int phase, int peer) {
  if (atomicCAS(const_cast<int*>(&p.host->error_phase), 0, phase) == 0) {
    p.host->error_peer = peer;
    __threadfence_system();
  }
  atomicExch(&p.nvl_ctrl[p.topo.local]->failed, 1);
}
__device__ __forceinline__ bool failed_before(const Peers& p) {
  return *reinterpret_cast<const volatile int*>(&p.nvl_ctrl[p.topo.local]->failed) != 0;
}

__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Spins until *flag >= want, then acquires it once. Polls with relaxed loads and a growing
// sleep: every warp runs every phase, so pollers share SMs with warps that copy, and a
// system-scope acquire per poll would stall those SMs' memory pipelines. On timeout (or when
// another wait of this rank already failed) reports and returns false. Called by one lane.
__device__ __forceinline__ bool wait_at_least(const Peers& p, const uint64_t* flag, uint64_t want,
                                              int phase, int peer) {
  if (ld_acquire_sys(flag) >= want) return true;
  const uint64_t deadline = global_ns() + p.timeout_ns;
  unsigned sleep_ns = 32;
  for (unsigned iter = 1;; ++iter) {
    if (ld_relaxed_sys(flag) >= want) {
      (void)ld_acquire_sys(flag);  // monotonic: still >= want, now with acquire semantics
      return true;
    }
    __nanosleep(sleep_ns);
    if (sleep_ns < 256) sleep_ns *= 2;
    if ((iter & 15) == 0) {
      if (failed_before(p)) return false;
      if (global_ns() > deadline) {
        report_error(p, phase, peer);
        return false;
      }
    }
  }
}

// The symmetric address of `offset` in this rank's RDMA area, and where it is mapped for
// PE `pe` (null when the peer is not reachable by loads and stores).
__device__ __forceinline__ uint8_t* rdma_local(const Peers& p, int64_t offset) {
  return p.rdma + offset;
}
__device__ __forceinline__ uint8_t* rdma_mapped(const Peers& p, int64_t offset, int pe) {
  uint8_t* base = p.rdma_peer[pe];
  return base ? base + offset : nullptr;
}

// Where a send to `pe` at `offset` goes by loads and stores, or null: NVSHMEM puts.
__device__ __forceinline__ uint8_t* rdma_direct(const Peers& p, int64_t offset, int pe) {
  return p.force_puts ? nullptr : rdma_mapped(p, offset, pe);
}

// Sets a 64-bit flag (at `offset` of the RDMA area) on PE `pe` to `value`.
__device__ __forceinline__ void rdma_flag_set(const Peers& p, int64_t offset, uint64_t value,
                                              int pe) {
  uint8_t* mapped = rdma_direct(p, offset, pe);
  if (mapped) {
    st_release_sys(reinterpret_cast<uint64_t*>(mapped), value);
  } else {
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(rdma_local(p, offset)), value,
                       NVSHMEM_SIGNAL_SET, pe);
  }
}

// The warp copies `bytes` (a multiple of 4) from local `src` to `dst` in PE `pe`'s RDMA area
// (both at symmetric offsets), then sets the flag at `flag_offset` there to `value`, ordered
// after the data. Mapped peers: stores, __syncwarp, release store. Others: one NVSHMEM put
// with signal (the source must be symmetric).
__device__ __forceinline__ void rdma_send_warp(const Peers& p, int64_t dst_offset,
                                               int64_t src_offset, int64_t bytes,
                                               int64_t flag_offset, uint64_t value, int pe,
                                               int lane) {
  uint8_t* mapped = rdma_direct(p, dst_offset, pe);
  if (mapped) {
    const int* s = reinterpret_cast<const int*>(rdma_local(p, src_offset));
    int* d = reinterpret_cast<int*>(mapped);
    for (int64_t i = lane; i < bytes / 4; i += 32) d[i] = s[i];
    __syncwarp();
    if (lane == 0) rdma_flag_set(p, flag_offset, value, pe);
    __syncwarp();
  } else {
    nvshmemx_putmem_signal_nbi_warp(
        rdma_local(p, dst_offset), rdma_local(p, src_offset), static_cast<size_t>(bytes),
        reinterpret_cast<uint64_t*>(rdma_local(p, flag_offset)), value, NVSHMEM_SIGNAL_SET, pe);
  }
}

// Start-of-kernel barrier with every rank this kernel writes to: the node's NVLink peers
// and the same-local-index rank of every node. A rank writes into a peer's buffers only
// once the peer has started the same epoch's kernel, i.e. (stream order) finished every
// earlier one. Block 0 announces; every block waits. Returns false on timeout, reported as
// `phase` (the dispatch or the combine barrier).
__device__ __forceinline__ bool start_barrier(const Peers& p, int64_t epoch, int phase) {
  __shared__ int ok;
  const Topology& tp = p.topo;
  if (blockIdx.x == 0) {
    if (threadIdx.x < tp.local_ranks)
      st_release_sys(&p.nvl_ctrl[threadIdx.x]->barrier[tp.local], epoch);
    for (int m = threadIdx.x; m < tp.num_nodes; m += blockDim.x)
      rdma_flag_set(p, p.rdma_ctrl.barrier_flag + int64_t(tp.node) * 8, uint64_t(epoch),
                    m * tp.local_ranks + tp.local);
  }
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();
  if (threadIdx.x < tp.local_ranks) {
    const int j = threadIdx.x;
    const uint64_t* f = reinterpret_cast<const uint64_t*>(&p.nvl_ctrl[tp.local]->barrier[j]);
    if (!wait_at_least(p, f, uint64_t(epoch), phase, tp.node * tp.local_ranks + j)) ok = 0;
  } else if (threadIdx.x < tp.local_ranks + tp.num_nodes) {
    const int m = threadIdx.x - tp.local_ranks;
    const uint64_t* f =
        reinterpret_cast<const uint64_t*>(rdma_local(p, p.rdma_ctrl.barrier_flag + int64_t(m) * 8));
    if (!wait_at_least(p, f, uint64_t(epoch), phase, m * tp.local_ranks + tp.local)) ok = 0;
  }
  __syncthreads();
  return ok != 0;
}

// Every block reads the epoch at entry; the last block to leave resets the row counters
// this kernel consumed and advances the epoch (device-resident: CUDA graphs replay right).
__device__ __forceinline__ int64_t read_data_epoch(NvlControl* own) {
  return *reinterpret_cast<volatile int64_t*>(&own->data_epoch) + 1;
}
__device__ __forceinline__ void finish_data_kernel(NvlControl* own, int64_t epoch,
                                                   unsigned long long (*consumed)[kMaxNodes],
                                                   int local_ranks, int num_nodes) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&own->exit_count, 1u) == gridDim.x - 1) {
      own->exit_count = 0;
      for (int j = 0; j < local_ranks; ++j)
        for (int m = 0; m < num_nodes; ++m)
          reinterpret_cast<volatile unsigned long long*>(&consumed[j][m])[0] = 0;
      __threadfence_system();
      *reinterpret_cast<volatile int64_t*>(&own->data_epoch) = epoch;
    }
  }
}

// Whether this call's rows fit every rank's buffers; identical on every rank (the maxima are
// global), so every rank skips a call that does not fit, and says why.
__device__ __forceinline__ bool fits(const Peers& p, const Tables& tb, int64_t nvl_rows,
                                     int64_t nvl_row, int64_t rdma_rows, int64_t rdma_row,
                                     int64_t stage_rows, int64_t stage_row, int worst_rows) {
  if (worst_rows > 0 && tb.status(kMaxRecv) > worst_rows) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report_error(p, kPhaseWorstTokens, -1);
    return false;
  }
  if (nvl_rows * nvl_row > p.nvl_row_bytes ||
      rdma_rows * rdma_row + stage_rows * stage_row > p.rdma_data_bytes) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report_error(p, kPhaseCapacity, -1);
    return false;
  }
  return true;
}

}  // namespace internode
}  // namespace mpiep
