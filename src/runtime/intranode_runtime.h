// One rank's intranode state: its IPC buffer and the peers' mappings, the host-mapped
// counters, and the launches of the notify / dispatch / combine kernels.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mpiep/export.h"
#include "mpiep/intranode.h"
#include "runtime/host_counters.h"
#include "runtime/ipc_buffer.h"

namespace mpiep {

class MPIEP_API IntranodeRuntime {
 public:
  IntranodeRuntime(int rank, int num_ranks, int device, int64_t num_nvl_bytes, double timeout_s);

  std::string export_handle() const { return buffer_->export_handle(); }
  void open_peers(const std::vector<std::string>& handles);
  // Teardown in two collective steps: close_peers on every rank, a barrier, destroy.
  // The caller synchronises the device and the ranks before close_peers.
  void close_peers();
  // Frees everything (closing the peers' mappings too if still open).
  void destroy();
  bool alive() const { return buffer_ != nullptr; }

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  int64_t row_area_bytes() const { return num_nvl_bytes_ - intranode::kControlBytes; }

  // Launches notify; returns the token that wait_notify waits for.
  int64_t notify(intranode::NotifyArgs a, cudaStream_t stream);
  void wait_notify(int64_t token, cudaStream_t stream) const;
  std::vector<int> count_matrix() const;                  // [R * (R + 1)] of the last notify
  std::vector<int> recv_per_expert(int num_local) const;  // padded, of the last notify

  void dispatch(intranode::DispatchArgs a, cudaStream_t stream);
  void combine(intranode::CombineArgs a, cudaStream_t stream);
  void check_error() const;
  // Test only (mpiep/test_stall.h): kStallDispatch / kStallCombine skip this rank's data
  // kernel of that phase (notify still runs), so that its peers time out.
  void set_test_stall(int phases) { stall_ = phases; }
  int test_stall() const { return stall_; }

 private:
  intranode::PeerPointers peers() const;
  void require_open() const;

  int rank_, num_ranks_, device_;
  int64_t num_nvl_bytes_;
  double timeout_s_;
  int64_t next_token_ = 0;
  bool opened_ = false;
  int stall_ = 0;
  std::unique_ptr<IpcBuffer> buffer_;
  std::unique_ptr<HostCounters> counters_;
};

}  // namespace mpiep
