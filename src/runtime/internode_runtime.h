// One rank's internode state: its NVLink (CUDA IPC) buffer and its node peers' mappings,
// its NVSHMEM symmetric area and the table of peers mapped by NVLink, the host-mapped
// notify results, and the launches of the notify / dispatch / combine kernels.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mpiep/export.h"
#include "mpiep/internode.h"
#include "runtime/ipc_buffer.h"
#include "runtime/mapped_host.h"

namespace mpiep {

class MPIEP_API InternodeRuntime {
 public:
  // Collective over all ranks (allocates the symmetric area); NVSHMEM must be initialised.
  InternodeRuntime(int rank, int num_ranks, int local_ranks, int device, int64_t num_nvl_bytes,
                   int64_t num_rdma_bytes, double timeout_s, bool force_puts);
  ~InternodeRuntime();

  std::string export_handle() const { return nvl_->export_handle(); }
  // handles[j]: the NVLink buffer handle of local rank j of this node.
  void open_peers(const std::vector<std::string>& handles);
  // Whether some RDMA peer's symmetric area is not mapped here (then puts need staging).
  bool has_unmapped_rdma_peer() const;
  // Agreed over all ranks by the caller: whether staging space is reserved everywhere.
  void set_staged(bool staged) { staged_ = staged; }
  bool staged() const { return staged_; }
  // Teardown in two collective steps: close_peers on every rank, a barrier, destroy.
  void close_peers();
  void destroy();
  bool alive() const { return nvl_ != nullptr; }

  const internode::Topology& topology() const { return topo_; }
  int device() const { return device_; }
  int64_t nvl_row_bytes() const { return num_nvl_bytes_ - internode::kNvlControlBytes; }
  int64_t rdma_data_bytes() const { return num_rdma_bytes_ - ctrl_.total; }
  int64_t rdma_control_bytes() const { return ctrl_.total; }

  int64_t notify(internode::NotifyArgs a, cudaStream_t stream);
  void wait_notify(int64_t token, cudaStream_t stream) const;
  std::vector<int> status() const;                        // TableStatus words of the last notify
  std::vector<int> recv_per_expert(int num_local) const;  // padded, of the last notify

  void dispatch(internode::DispatchArgs a, cudaStream_t stream);
  void combine(internode::CombineArgs a, cudaStream_t stream);
  void check_error() const;
  // Test only (mpiep/test_stall.h): kStallDispatch / kStallCombine skip this rank's data
  // kernel of that phase (notify still runs), so that its peers time out.
  void set_test_stall(int phases) { stall_ = phases; }
  int test_stall() const { return stall_; }

 private:
  internode::Peers peers() const;
  void require_open() const;

  internode::Topology topo_{};
  int device_;
  int64_t num_nvl_bytes_, num_rdma_bytes_;
  double timeout_s_;
  bool force_puts_, staged_ = true, opened_ = false;
  int64_t next_token_ = 0;
  int stall_ = 0;
  internode::RdmaControlLayout ctrl_{};
  std::unique_ptr<IpcBuffer> nvl_;
  std::vector<void*> nvl_ptrs_;  // [L] after open_peers
  uint8_t* rdma_ = nullptr;
  uint8_t** rdma_peer_ = nullptr;  // device array [R]
  std::vector<bool> rdma_mapped_;
  std::unique_ptr<MappedHost<internode::HostInfo>> host_;
};

std::string internode_phase_name(int phase);

}  // namespace mpiep
