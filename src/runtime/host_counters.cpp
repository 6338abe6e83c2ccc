#include "runtime/host_counters.h"

#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "mpiep/errors.h"

namespace mpiep {

using intranode::HostInfo;

HostCounters::HostCounters() {
  void* p = nullptr;
  MPIEP_CUDA_CHECK(cudaHostAlloc(&p, sizeof(HostInfo), cudaHostAllocMapped));
  std::memset(p, 0, sizeof(HostInfo));
  host_ = static_cast<HostInfo*>(p);
  void* d = nullptr;
  MPIEP_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
  device_ = static_cast<HostInfo*>(d);
}

HostCounters::~HostCounters() {
  try {
    release();
  } catch (...) {
  }
}

void HostCounters::release() {
  if (!host_) return;
  void* p = host_;
  host_ = device_ = nullptr;
  MPIEP_CUDA_CHECK(cudaFreeHost(p));
}

std::string device_phase_name(int phase) {
  switch (phase) {
    case intranode::kPhaseNotifyBarrier:
      return "intranode notify barrier";
    case intranode::kPhaseDispatchBarrier:
      return "intranode dispatch start barrier";
    case intranode::kPhaseDispatchRecv:
      return "intranode dispatch receive";
    case intranode::kPhaseCombineBarrier:
      return "intranode combine start barrier";
    case intranode::kPhaseCombineRecv:
      return "intranode combine receive";
    case intranode::kPhaseWorstTokensOverflow:
      return "intranode dispatch (num_worst_tokens overflow)";
    case intranode::kPhaseCapacity:
      return "intranode (buffer capacity)";
    default:
      return "intranode phase " + std::to_string(phase);
  }
}

void HostCounters::check_error(int rank) const {
  const int phase = host_->error_phase;
  if (phase == 0) return;
  const int peer = host_->error_peer;
  const std::string where = "rank " + std::to_string(rank) + ": " + device_phase_name(phase);
  if (phase == intranode::kPhaseWorstTokensOverflow) {
    throw Error(ErrorCode::kCapacity, where + ": rank " + std::to_string(peer) +
                                          " receives more tokens than num_worst_tokens; the kernel "
                                          "skipped the exchange (the engine is unusable now)");
  }
  if (phase == intranode::kPhaseCapacity) {
    throw Error(ErrorCode::kCapacity,
                where + ": rank " + std::to_string(peer) +
                    "'s receive exceeds num_nvl_bytes; the kernel skipped the "
                    "exchange (the engine is unusable now)");
  }
  throw Error(ErrorCode::kTimeout,
              where + ": a GPU kernel timed out waiting for rank " + std::to_string(peer) +
                  " (a peer crashed, hangs, or skipped this call); the engine is "
                  "unusable now");
}

void HostCounters::wait_ready(int64_t token, double timeout_s, void* stream, int rank) const {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  // A little longer than the kernels' own timeout, so that they report first and name
  // the peer and phase.
  const auto deadline = start + std::chrono::duration<double>(timeout_s + 1.0);
  int polls = 0;
  while (host_->ready_token != token) {
    check_error(rank);
    if ((++polls & 1023) == 0) {
      const cudaError_t err = cudaStreamQuery(static_cast<cudaStream_t>(stream));
      if (err != cudaSuccess && err != cudaErrorNotReady) {
        throw Error(ErrorCode::kCuda,
                    std::string("rank ") + std::to_string(rank) +
                        ": intranode notify kernel failed: " + cudaGetErrorString(err));
      }
      if (clock::now() > deadline) {
        throw Error(ErrorCode::kTimeout, "rank " + std::to_string(rank) +
                                             ": no intranode notify result within " +
                                             std::to_string(timeout_s) +
                                             "s (a peer crashed, hangs, or skipped this call)");
      }
      if (clock::now() - start > std::chrono::milliseconds(2)) {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  check_error(rank);
}

}  // namespace mpiep
