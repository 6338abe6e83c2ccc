// Host-mapped memory (cudaHostAllocMapped) through which kernels hand counts and error
// reports to the CPU without a stream synchronisation.
#pragma once

#include <cstdint>
#include <string>

#include "mpiep/intranode.h"

namespace mpiep {

class HostCounters {
 public:
  HostCounters();
  ~HostCounters();
  HostCounters(const HostCounters&) = delete;
  HostCounters& operator=(const HostCounters&) = delete;

  intranode::HostInfo* host() const { return host_; }
  intranode::HostInfo* device() const { return device_; }

  // Waits until a kernel publishes `token` in ready_token. Throws Error(kTimeout) after
  // timeout_s, or at once when a kernel reported an error or the stream failed.
  void wait_ready(int64_t token, double timeout_s, void* stream, int rank) const;
  // Throws when a kernel reported an error (timeouts name rank and phase).
  void check_error(int rank) const;
  void release();

 private:
  intranode::HostInfo* host_ = nullptr;
  intranode::HostInfo* device_ = nullptr;
};

std::string device_phase_name(int phase);

}  // namespace mpiep
