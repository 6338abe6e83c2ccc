#include "runtime/internode_runtime.h"

#include <cuda_runtime.h>

#include "mpiep/errors.h"
#include "mpiep/test_stall.h"
#include "runtime/host_wait.h"
#include "runtime/nvshmem_runtime.h"

namespace mpiep {

using namespace internode;

InternodeRuntime::InternodeRuntime(int rank, int num_ranks, int local_ranks, int device,
                                   int64_t num_nvl_bytes, int64_t num_rdma_bytes, double timeout_s,
                                   bool force_puts)
    : device_(device),
      num_nvl_bytes_(num_nvl_bytes),
      num_rdma_bytes_(num_rdma_bytes),
      timeout_s_(timeout_s),
      force_puts_(force_puts) {
  MPIEP_CHECK_ARG(local_ranks >= 1 && local_ranks <= kMaxLocalRanks,
                  "internode: between 1 and 8 ranks per node, got " + std::to_string(local_ranks));
  MPIEP_CHECK_ARG(num_ranks % local_ranks == 0 && num_ranks / local_ranks <= kMaxNodes,
                  "internode: the rank count must be a multiple of the ranks per node, with at "
                  "most 128 nodes");
  MPIEP_CHECK_ARG(rank >= 0 && rank < num_ranks, "internode: bad rank");
  MPIEP_CHECK_ARG(timeout_s > 0, "internode: timeout_s must be positive");
  MPIEP_CHECK_ARG(nvshmem_rt::initialized(), "internode: NVSHMEM is not initialised");
  MPIEP_CHECK_ARG(nvshmem_rt::my_pe() == rank && nvshmem_rt::n_pes() == num_ranks,
                  "internode: NVSHMEM PEs do not match the communicator's ranks");
  topo_.rank = rank;
  topo_.num_ranks = num_ranks;
  topo_.local_ranks = local_ranks;
  topo_.num_nodes = num_ranks / local_ranks;
  topo_.node = rank / local_ranks;
  topo_.local = rank % local_ranks;
  ctrl_ = rdma_control_layout(num_ranks, topo_.num_nodes);
  MPIEP_CHECK_ARG(num_nvl_bytes > kNvlControlBytes,
                  "internode: num_nvl_bytes must exceed the 1 MiB control area, got " +
                      std::to_string(num_nvl_bytes));
  MPIEP_CHECK_ARG(num_rdma_bytes > ctrl_.total,
                  "internode: num_rdma_bytes must exceed the " + std::to_string(ctrl_.total) +
                      "-byte control area for " + std::to_string(num_ranks) + " ranks, got " +
                      std::to_string(num_rdma_bytes));
  MPIEP_CUDA_CHECK(cudaSetDevice(device));
  nvl_ = std::make_unique<IpcBuffer>(device, num_nvl_bytes);
  host_ = std::make_unique<MappedHost<HostInfo>>();
  // Symmetric area: every rank allocates the same size (collective), zeroes its control
  // words and waits for everyone before any flag can be written into it.
  rdma_ = static_cast<uint8_t*>(nvshmem_rt::alloc(static_cast<size_t>(num_rdma_bytes)));
  MPIEP_CUDA_CHECK(cudaMemset(rdma_, 0, static_cast<size_t>(ctrl_.total)));
  std::vector<uint8_t*> bases(num_ranks, nullptr);
  rdma_mapped_.assign(num_ranks, false);
  for (int r = 0; r < num_ranks; ++r) {
    bases[r] = static_cast<uint8_t*>(nvshmem_rt::peer_ptr(rdma_, r));
    rdma_mapped_[r] = bases[r] != nullptr;
  }
  MPIEP_CUDA_CHECK(cudaMalloc(&rdma_peer_, num_ranks * sizeof(uint8_t*)));
  MPIEP_CUDA_CHECK(
      cudaMemcpy(rdma_peer_, bases.data(), num_ranks * sizeof(uint8_t*), cudaMemcpyHostToDevice));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_rt::barrier_all();
}

InternodeRuntime::~InternodeRuntime() {
  try {
    destroy();
  } catch (...) {
  }
}

void InternodeRuntime::open_peers(const std::vector<std::string>& handles) {
  MPIEP_CHECK_ARG(alive(), "internode: runtime destroyed");
  MPIEP_CHECK_ARG(static_cast<int>(handles.size()) == topo_.local_ranks,
                  "internode: one NVLink handle per local rank");
  nvl_->open_peers(topo_.local, handles);
  nvl_ptrs_.clear();
  for (int j = 0; j < topo_.local_ranks; ++j) nvl_ptrs_.push_back(nvl_->ptr(j));
  opened_ = true;
}

bool InternodeRuntime::has_unmapped_rdma_peer() const {
  for (int m = 0; m < topo_.num_nodes; ++m)
    if (!rdma_mapped_[m * topo_.local_ranks + topo_.local]) return true;
  return false;
}

void InternodeRuntime::close_peers() {
  if (!alive()) return;
  nvl_->close_peers();
  nvl_ptrs_.clear();
  opened_ = false;
}

void InternodeRuntime::destroy() {
  if (!alive()) return;
  MPIEP_CUDA_CHECK(cudaSetDevice(device_));
  MPIEP_CUDA_CHECK(cudaDeviceSynchronize());
  // Collective: every rank frees its symmetric area in the same order.
  nvshmem_rt::barrier_all();
  nvshmem_rt::release(rdma_);
  rdma_ = nullptr;
  cudaFree(rdma_peer_);
  rdma_peer_ = nullptr;
  nvl_->release();
  nvl_.reset();
  host_.reset();
  opened_ = false;
}

void InternodeRuntime::require_open() const {
  MPIEP_CHECK_ARG(alive(), "internode: runtime destroyed");
  MPIEP_CHECK_ARG(opened_, "internode: NVLink peers not opened");
}

Peers InternodeRuntime::peers() const {
  Peers p{};
  p.topo = topo_;
  for (int j = 0; j < topo_.local_ranks; ++j) {
    auto* base = static_cast<uint8_t*>(nvl_ptrs_[j]);
    p.nvl_ctrl[j] = reinterpret_cast<NvlControl*>(base);
    p.nvl_rows[j] = base + kNvlControlBytes;
  }
  p.nvl_row_bytes = nvl_row_bytes();
  p.rdma = rdma_;
  p.rdma_peer = rdma_peer_;
  p.rdma_data_bytes = rdma_data_bytes();
  p.rdma_ctrl = ctrl_;
  p.host = host_->device();
  p.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  p.staged = staged_ ? 1 : 0;
  p.force_puts = force_puts_ ? 1 : 0;
  return p;
}

std::string internode_phase_name(int phase) {
  switch (phase) {
    case kPhaseNotify:
      return "internode notify (count exchange)";
    case kPhaseBarrier:
      return "internode start barrier";
    case kPhaseDispatchBarrier:
      return "internode dispatch start barrier";
    case kPhaseCombineBarrier:
      return "internode combine start barrier";
    case kPhaseDispatchForward:
      return "internode dispatch, forwarder waiting for RDMA rows";
    case kPhaseDispatchRecv:
      return "internode dispatch, receiver waiting for NVLink rows";
    case kPhaseCombineForward:
      return "internode combine, forwarder waiting for NVLink rows";
    case kPhaseCombineRecv:
      return "internode combine, source waiting for RDMA rows";
    case kPhaseCapacity:
      return "internode (buffer capacity)";
    case kPhaseWorstTokens:
      return "internode dispatch (num_worst_tokens overflow)";
    default:
      return "internode phase " + std::to_string(phase);
  }
}

void InternodeRuntime::check_error() const {
  if (!alive()) return;
  const HostInfo* h = host_->host();
  const int phase = h->error_phase;
  if (phase == 0) return;
  const int peer = h->error_peer;
  const std::string where = "rank " + std::to_string(topo_.rank) + " (node " +
                            std::to_string(topo_.node) + "): " + internode_phase_name(phase);
  if (phase == kPhaseWorstTokens) {
    throw Error(ErrorCode::kCapacity,
                where +
                    ": a rank receives more tokens than num_worst_tokens; the kernel "
                    "skipped the exchange on every rank (the engine is unusable now)");
  }
  if (phase == kPhaseCapacity) {
    throw Error(ErrorCode::kCapacity,
                where +
                    ": a rank's rows exceed num_nvl_bytes or num_rdma_bytes; the kernel "
                    "skipped the exchange on every rank (the engine is unusable now)");
  }
  const int node = peer >= 0 ? peer / topo_.local_ranks : -1;
  throw Error(ErrorCode::kTimeout,
              where + ": a GPU kernel timed out waiting for rank " + std::to_string(peer) +
                  " (node " + std::to_string(node) +
                  ") (a peer crashed, hangs, or skipped this call); the engine is unusable now");
}

int64_t InternodeRuntime::notify(NotifyArgs a, cudaStream_t stream) {
  require_open();
  check_error();
  a.peers = peers();
  a.host_token = ++next_token_;
  launch_notify(a, stream);
  return a.host_token;
}

void InternodeRuntime::wait_notify(int64_t token, cudaStream_t stream) const {
  require_open();
  wait_for_token(
      &host_->host()->ready_token, token, timeout_s_, stream, [&] { check_error(); },
      "rank " + std::to_string(topo_.rank) + " (node " + std::to_string(topo_.node) +
          ", internode)");
}

std::vector<int> InternodeRuntime::status() const {
  require_open();
  const HostInfo* h = host_->host();
  return std::vector<int>(h->status, h->status + kStatusCount);
}

std::vector<int> InternodeRuntime::recv_per_expert(int num_local) const {
  require_open();
  MPIEP_CHECK_ARG(num_local >= 0 && num_local <= kMaxLocalExperts,
                  "internode: too many local experts");
  const HostInfo* h = host_->host();
  return std::vector<int>(h->recv_per_expert, h->recv_per_expert + num_local);
}

void InternodeRuntime::dispatch(DispatchArgs a, cudaStream_t stream) {
  require_open();
  check_error();
  if (stall_ & kStallDispatch) return;  // test only: the peers must time out
  a.peers = peers();
  launch_dispatch(a, stream);
}

void InternodeRuntime::combine(CombineArgs a, cudaStream_t stream) {
  require_open();
  check_error();
  if (stall_ & kStallCombine) return;  // test only: the peers must time out
  a.peers = peers();
  launch_combine(a, stream);
}

}  // namespace mpiep
