#include "runtime/intranode_runtime.h"

#include <cuda_runtime.h>

#include "mpiep/errors.h"
#include "mpiep/test_stall.h"

namespace mpiep {

using namespace intranode;

IntranodeRuntime::IntranodeRuntime(int rank, int num_ranks, int device, int64_t num_nvl_bytes,
                                   double timeout_s)
    : rank_(rank),
      num_ranks_(num_ranks),
      device_(device),
      num_nvl_bytes_(num_nvl_bytes),
      timeout_s_(timeout_s) {
  MPIEP_CHECK_ARG(num_ranks >= 1 && num_ranks <= kMaxRanks,
                  "intranode: between 1 and 8 ranks per node, got " + std::to_string(num_ranks));
  MPIEP_CHECK_ARG(rank >= 0 && rank < num_ranks, "intranode: bad rank");
  MPIEP_CHECK_ARG(
      num_nvl_bytes > kControlBytes,
      "num_nvl_bytes must exceed the 1 MiB control area, got " + std::to_string(num_nvl_bytes));
  MPIEP_CHECK_ARG(timeout_s > 0, "intranode: timeout_s must be positive");
  MPIEP_CUDA_CHECK(cudaSetDevice(device));
  buffer_ = std::make_unique<IpcBuffer>(device, num_nvl_bytes);
  counters_ = std::make_unique<HostCounters>();
}

void IntranodeRuntime::open_peers(const std::vector<std::string>& handles) {
  MPIEP_CHECK_ARG(alive(), "intranode: runtime destroyed");
  MPIEP_CHECK_ARG(static_cast<int>(handles.size()) == num_ranks_, "intranode: one handle per rank");
  buffer_->open_peers(rank_, handles);
  opened_ = true;
}

void IntranodeRuntime::close_peers() {
  if (!alive()) return;
  buffer_->close_peers();
  opened_ = false;
}

void IntranodeRuntime::destroy() {
  if (!alive()) return;
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  buffer_->release();
  counters_->release();
  buffer_.reset();
  counters_.reset();
  opened_ = false;
}

void IntranodeRuntime::require_open() const {
  MPIEP_CHECK_ARG(alive(), "intranode: runtime destroyed");
  MPIEP_CHECK_ARG(opened_, "intranode: peers not opened");
}

PeerPointers IntranodeRuntime::peers() const {
  PeerPointers p{};
  for (int r = 0; r < num_ranks_; ++r) {
    auto* base = static_cast<uint8_t*>(buffer_->ptr(r));
    p.ctrl[r] = reinterpret_cast<Control*>(base);
    p.rows[r] = base + kControlBytes;
  }
  p.host = counters_->device();
  p.rank = rank_;
  p.num_ranks = num_ranks_;
  p.row_area_bytes = row_area_bytes();
  p.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  return p;
}

void IntranodeRuntime::check_error() const {
  if (alive()) counters_->check_error(rank_);
}

int64_t IntranodeRuntime::notify(NotifyArgs a, cudaStream_t stream) {
  require_open();
  check_error();
  a.peers = peers();
  a.host_token = ++next_token_;
  launch_notify(a, stream);
  return a.host_token;
}

void IntranodeRuntime::wait_notify(int64_t token, cudaStream_t stream) const {
  require_open();
  counters_->wait_ready(token, timeout_s_, stream, rank_);
}

std::vector<int> IntranodeRuntime::count_matrix() const {
  require_open();
  const HostInfo* h = counters_->host();
  std::vector<int> m;
  m.reserve(num_ranks_ * (num_ranks_ + 1));
  for (int s = 0; s < num_ranks_; ++s)
    for (int j = 0; j <= num_ranks_; ++j) m.push_back(h->count_matrix[s][j]);
  return m;
}

std::vector<int> IntranodeRuntime::recv_per_expert(int num_local) const {
  require_open();
  MPIEP_CHECK_ARG(num_local >= 0 && num_local <= kMaxLocalExperts,
                  "intranode: too many local experts");
  const HostInfo* h = counters_->host();
  return std::vector<int>(h->recv_per_expert, h->recv_per_expert + num_local);
}

void IntranodeRuntime::dispatch(DispatchArgs a, cudaStream_t stream) {
  require_open();
  check_error();
  if (stall_ & kStallDispatch) return;  // test only: the peers must time out
  a.peers = peers();
  launch_dispatch(a, stream);
}

void IntranodeRuntime::combine(CombineArgs a, cudaStream_t stream) {
  require_open();
  check_error();
  if (stall_ & kStallCombine) return;  // test only: the peers must time out
  a.peers = peers();
  launch_combine(a, stream);
}

}  // namespace mpiep
