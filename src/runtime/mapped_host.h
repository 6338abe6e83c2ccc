// A host-mapped (cudaHostAllocMapped) object: kernels write it through a device alias and
// the host reads it without a stream synchronisation (counts, readiness tokens, errors).
#pragma once

#include <cuda_runtime.h>

#include <cstring>

#include "mpiep/errors.h"

namespace mpiep {

template <class T>
class MappedHost {
 public:
  MappedHost() {
    void* p = nullptr;
    MPIEP_CUDA_CHECK(cudaHostAlloc(&p, sizeof(T), cudaHostAllocMapped));
    std::memset(p, 0, sizeof(T));
    host_ = static_cast<T*>(p);
    void* d = nullptr;
    MPIEP_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
    device_ = static_cast<T*>(d);
  }
  ~MappedHost() {
    if (host_) cudaFreeHost(host_);
  }
  MappedHost(const MappedHost&) = delete;
  MappedHost& operator=(const MappedHost&) = delete;

  T* host() const { return host_; }
  T* device() const { return device_; }

 private:
  T* host_ = nullptr;
  T* device_ = nullptr;
};

}  // namespace mpiep
