#include "runtime/host_counters.h"

#include <cuda_runtime.h>

#include <cstring>

#include "mpiep/errors.h"
#include "runtime/host_wait.h"

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
  wait_for_token(
      &host_->ready_token, token, timeout_s, static_cast<cudaStream_t>(stream),
      [&] { check_error(rank); }, "rank " + std::to_string(rank) + " (intranode)");
}

}  // namespace mpiep
