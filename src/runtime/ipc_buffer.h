// A device buffer shared with the other ranks of the node through CUDA IPC: allocated
// with cudaMalloc, exported as a cudaIpcMemHandle_t (exchanged by the Python/MPI layer)
// and mapped by every peer.
#pragma once

#include <string>
#include <vector>

namespace mpiep {

class IpcBuffer {
 public:
  IpcBuffer(int device, int64_t bytes);
  ~IpcBuffer();
  IpcBuffer(const IpcBuffer&) = delete;
  IpcBuffer& operator=(const IpcBuffer&) = delete;

  // The opaque export handle of this rank's buffer.
  std::string export_handle() const;
  // Maps every peer's buffer; handles[rank] must be this rank's own handle.
  void open_peers(int rank, const std::vector<std::string>& handles);
  // Pointer (in this process) to rank r's buffer; valid after open_peers.
  void* ptr(int r) const { return ptrs_.at(r); }
  void* local() const { return local_; }
  int64_t bytes() const { return bytes_; }
  // Unmaps the peers' buffers (first step of a collective teardown). Idempotent.
  void close_peers();
  // Unmaps peers and frees the local buffer. Callers make sure no kernel touches the
  // buffers any more (device sync + MPI barrier) first. Idempotent.
  void release();

 private:
  int device_;
  int64_t bytes_;
  int rank_ = -1;
  void* local_ = nullptr;
  std::vector<void*> ptrs_;
};

}  // namespace mpiep
