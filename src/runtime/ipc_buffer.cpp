#include "runtime/ipc_buffer.h"

#include <cuda_runtime.h>

#include <cstring>

#include "mpiep/errors.h"

namespace mpiep {

IpcBuffer::IpcBuffer(int device, int64_t bytes) : device_(device), bytes_(bytes) {
  MPIEP_CHECK_ARG(bytes > 0, "IpcBuffer: size must be positive");
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  MPIEP_CUDA_CHECK(cudaMalloc(&local_, static_cast<size_t>(bytes_)));
  // Zero control words: epochs start at 0 on every rank. Synchronous, so that the
  // zeroes land before any peer can learn the handle and signal into it.
  MPIEP_CUDA_CHECK(cudaMemset(local_, 0, static_cast<size_t>(bytes_)));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
}

IpcBuffer::~IpcBuffer() {
  try {
    release();
  } catch (...) {
    // Destructors must not throw; release() reported through its caller if called.
  }
}

std::string IpcBuffer::export_handle() const {
  MPIEP_CHECK_ARG(local_ != nullptr, "IpcBuffer: already released");
  cudaIpcMemHandle_t handle;
  MPIEP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, local_));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void IpcBuffer::open_peers(int rank, const std::vector<std::string>& handles) {
  MPIEP_CHECK_ARG(local_ != nullptr, "IpcBuffer: already released");
  MPIEP_CHECK_ARG(ptrs_.empty(), "IpcBuffer: peers already opened");
  MPIEP_CHECK_ARG(rank >= 0 && rank < static_cast<int>(handles.size()), "IpcBuffer: bad rank");
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  rank_ = rank;
  ptrs_.assign(handles.size(), nullptr);
  for (size_t r = 0; r < handles.size(); ++r) {
    if (static_cast<int>(r) == rank) {
      ptrs_[r] = local_;
      continue;
    }
    MPIEP_CHECK_ARG(handles[r].size() == sizeof(cudaIpcMemHandle_t), "IpcBuffer: bad handle size");
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handles[r].data(), sizeof(handle));
    void* p = nullptr;
    cudaError_t err = cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      // Undo what was mapped so far, then report.
      for (size_t q = 0; q < r; ++q)
        if (static_cast<int>(q) != rank && ptrs_[q]) cudaIpcCloseMemHandle(ptrs_[q]);
      ptrs_.clear();
      throw Error(ErrorCode::kCuda, std::string("cudaIpcOpenMemHandle of rank ") +
                                        std::to_string(r) +
                                        "'s buffer failed: " + cudaGetErrorString(err));
    }
    ptrs_[r] = p;
  }
}

void IpcBuffer::close_peers() {
  if (ptrs_.empty()) return;
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  std::vector<void*> ptrs;
  ptrs.swap(ptrs_);
  for (size_t r = 0; r < ptrs.size(); ++r)
    if (static_cast<int>(r) != rank_ && ptrs[r]) MPIEP_CUDA_CHECK(cudaIpcCloseMemHandle(ptrs[r]));
}

void IpcBuffer::release() {
  if (local_ == nullptr) return;
  close_peers();
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  void* p = local_;
  local_ = nullptr;
  MPIEP_CUDA_CHECK(cudaFree(p));
}

}  // namespace mpiep
