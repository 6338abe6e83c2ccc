// Normal mode across nodes as single native calls (InternodeRuntime underneath).
#include "mpiep/internode.h"
#include "ops/normal_checks.h"
#include "ops/normal_ops.h"
#include "ops/normal_outputs.h"
#include "ops/ops_common.h"
#include "runtime/host_wait.h"
#include "runtime/internode_runtime.h"

namespace mpiep {
namespace ops {
namespace {

using namespace internode;

InternodeRuntime& runtime_at(int64_t address) {
  if (address == 0) bad_arg("internode runtime is null (engine destroyed?)");
  return *reinterpret_cast<InternodeRuntime*>(address);
}

// The state tensors of an internode handle, in this order.
enum State { kSendSlot, kNodeSlot, kNodeToken, kCounts, kTables, kFwdPos, kStateCount };

// Raises the same CapacityError on every rank: the status maxima are global. `nvl` and `rdma`
// are (status word, row bytes) of the NVLink area and the RDMA receive area; the RDMA area
// also holds the staged sends when staging is on.
void check_fit(const InternodeRuntime& rt, const std::vector<int>& status, int nvl_word,
               int64_t nvl_row, int rdma_word, int64_t rdma_row, const char* what) {
  if (status.empty()) return;  // the kernel checks on the GPU and skips on every rank
  const int64_t need_nvl = int64_t(status[nvl_word]) * nvl_row;
  int64_t need_rdma = int64_t(status[rdma_word]) * rdma_row;
  if (rt.staged())
    need_rdma +=
        int64_t(status[rdma_word == kMaxRdmaRows ? kMaxSendRows : kMaxRdmaRows]) * rdma_row;
  if (need_nvl > rt.nvl_row_bytes()) {
    throw Error(ErrorCode::kCapacity,
                std::string(what) + ": a rank needs " + std::to_string(need_nvl) +
                    " B of NVLink buffer (" + std::to_string(status[nvl_word]) + " rows of " +
                    std::to_string(nvl_row) + " B) but num_nvl_bytes leaves " +
                    std::to_string(rt.nvl_row_bytes()) +
                    " B for rows; create the Buffer with a larger num_nvl_bytes "
                    "(mpiep.get_normal_buffer_size_hint)");
  }
  if (need_rdma > rt.rdma_data_bytes()) {
    throw Error(ErrorCode::kCapacity,
                std::string(what) + ": a rank needs " + std::to_string(need_rdma) +
                    " B of RDMA buffer but num_rdma_bytes leaves " +
                    std::to_string(rt.rdma_data_bytes()) +
                    " B for rows; create the Buffer with a larger num_rdma_bytes "
                    "(mpiep.config.get_internode_rdma_size_hint)");
  }
}

}  // namespace

DispatchOut internode_dispatch(int64_t runtime, const at::Tensor& x, const OptTensor& x_scales,
                               const OptTensor& topk_idx, const OptTensor& topk_weights,
                               const Routing& routing, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens, int64_t num_sms,
                               int64_t chunk, int64_t hop) {
  InternodeRuntime& rt = runtime_at(runtime);
  const Topology& tp = rt.topology();
  const int R = tp.num_ranks, N = tp.num_nodes, L = tp.local_ranks;
  const int64_t hidden_bytes =
      check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, routing, R, N, rt.device());
  const int64_t T = x.size(0), H = x.size(1);
  const int num_scales = x_scales ? static_cast<int>(x_scales->size(1)) : 0;
  const bool cached = !routing.state.empty();
  const int num_topk = (!cached && topk_idx) ? static_cast<int>(topk_idx->size(1)) : 0;
  const int64_t worst = num_worst_tokens;
  const at::Device dev = x.device();
  // A plain dispatch waits on the host for its counts: refuse a capture before launching.
  if (!cached && num_worst_tokens <= 0) refuse_capture(current_stream(dev), "internode dispatch");
  const HopGuard guard(hop, dev);
  const cudaStream_t stream = guard.stream();

  const int64_t nvl_row =
      nvl_dispatch_row_bytes(static_cast<int>(hidden_bytes), num_scales, num_topk);
  const int64_t rdma_row =
      rdma_dispatch_row_bytes(static_cast<int>(hidden_bytes), num_scales, num_topk, L);

  // Two allocations (each at::empty costs ~2 us of host time; see DispatchOut): what the
  // handle keeps, made before the notify (which writes it), and the outputs, made once
  // their size is known. fwd_pos and recv_src_idx go with the handle's part (carved from
  // the outputs they would pin recv_x), sized for the most rows they can need: from
  // num_worst_tokens (a forwarder's rows are at most L x the rows any rank receives; the
  // kernel checks capacity), or from what the NVLink and RDMA areas hold (check_fit below
  // guarantees it; 4 bytes per row for every row of >= 32 bytes there; past
  // kMaxEarlyTailBytes in a third allocation after the wait).
  DispatchOut out;
  std::vector<at::Tensor> state;
  at::Tensor state_bytes;
  int64_t num_out = 0, fwd_rows = 0, src_cap = 0, fwd_cap = 0, fwd_at = 0, src_at = 0;
  bool early = false;
  if (cached) {
    state = routing.state;
    if (state.size() != kStateCount) bad_arg("handle: not an internode dispatch handle");
    out.host_counts = routing.host_counts;
    num_out = routing.cached_rows;
  } else {
    if (!routing.num_tokens_per_rank || !routing.num_tokens_per_rdma_rank ||
        !routing.num_tokens_per_expert || !routing.is_token_in_rank)
      bad_arg(
          "dispatch: needs the layout (num_tokens_per_rank, num_tokens_per_rdma_rank, "
          "num_tokens_per_expert, is_token_in_rank) or a handle");
    const int64_t T1 = std::max<int64_t>(T, 1);
    src_cap = worst > 0 ? worst : rt.nvl_row_bytes() / nvl_row;
    fwd_cap = worst > 0 ? L * worst : std::max<int64_t>(rt.rdma_data_bytes() / rdma_row, 1);
    ByteLayout st;
    const int64_t slot_at = st.add(T * R * 4), node_slot_at = st.add(T * N * 4),
                  node_token_at = st.add(N * T1 * 4),
                  counts_at = st.add(int64_t(R) * (R + N + 1) * 4),
                  tables_at = st.add(int64_t(table_layout(R, N, L).total) * 4);
    early = worst > 0 || (fwd_cap * L + src_cap) * 4 <= kMaxEarlyTailBytes;
    if (early) {
      fwd_at = st.add(fwd_cap * L * 4);
      src_at = st.add(src_cap * 4);
    }
    state_bytes = empty({st.total}, at::kByte, dev);
    state.resize(kStateCount);
    state[kSendSlot] = typed_slice(state_bytes, slot_at, {T, R}, at::kInt);
    state[kNodeSlot] = typed_slice(state_bytes, node_slot_at, {T, N}, at::kInt);
    state[kNodeToken] = typed_slice(state_bytes, node_token_at, {N, T1}, at::kInt);
    state[kCounts] = typed_slice(state_bytes, counts_at, {R, R + N + 1}, at::kInt);
    state[kTables] = typed_slice(state_bytes, tables_at, {table_layout(R, N, L).total}, at::kInt);
    NotifyArgs a{};
    a.num_tokens_per_rank = ptr<const int>(*routing.num_tokens_per_rank);
    a.num_tokens_per_rdma_rank = ptr<const int>(*routing.num_tokens_per_rdma_rank);
    a.num_tokens_per_expert = ptr<const int>(*routing.num_tokens_per_expert);
    a.is_token_in_rank = ptr<const bool>(*routing.is_token_in_rank);
    a.num_tokens = static_cast<int>(T);
    a.num_experts = static_cast<int>(num_experts);
    a.expert_alignment = static_cast<int>(std::max<int64_t>(1, expert_alignment));
    a.send_slot = ptr<int>(state[kSendSlot]);
    a.node_slot = ptr<int>(state[kNodeSlot]);
    a.node_token = ptr<int>(state[kNodeToken]);
    a.counts = ptr<int>(state[kCounts]);
    a.tables = ptr<int>(state[kTables]);
    const int64_t token = rt.notify(a, stream);
    if (worst > 0) {
      num_out = worst;  // no host wait
      fwd_rows = L * worst;
    } else {
      rt.wait_notify(token, stream);
      out.host_counts = rt.status();
      num_out = out.host_counts[kNumRecv];
      out.expert_counts = rt.recv_per_expert(static_cast<int>(num_experts / R));
      fwd_rows = std::max<int64_t>(out.host_counts[kRdmaRows], 1);
    }
  }
  check_fit(rt, out.host_counts, kMaxRecv, nvl_row, kMaxRdmaRows, rdma_row, "dispatch");
  if (!out.host_counts.empty() && worst > 0 && out.host_counts[kMaxRecv] > worst) {
    throw Error(ErrorCode::kCapacity,
                "dispatch: num_worst_tokens=" + std::to_string(worst) + " is below the " +
                    std::to_string(out.host_counts[kMaxRecv]) + " rows a rank receives");
  }
  if (!cached && !early) {
    ByteLayout tail;
    fwd_at = tail.add(fwd_rows * L * 4);
    src_at = tail.add(num_out * 4);
    state_bytes = empty({tail.total}, at::kByte, dev);
  } else if (!cached && (num_out > src_cap || fwd_rows > fwd_cap)) {
    bad_arg("dispatch: internal error, more rows than the buffers hold");
  }
  if (!cached) {
    state[kFwdPos] = typed_slice(state_bytes, fwd_at, {fwd_rows, L}, at::kInt);
    out.recv_src_idx = typed_slice(state_bytes, src_at, {num_out}, at::kInt);
  }
  // A cached dispatch's recv_src_idx is not kept (its handle has one): with the outputs.
  allocate_dispatch_outputs(out, num_out, x, hidden_bytes, num_scales, num_topk,
                            topk_weights.has_value(), cached, dev);
  DispatchArgs a{};
  a.x = x.data_ptr();
  a.x_scales = ptr<const float>(x_scales);
  a.topk_idx = num_topk ? ptr<const int64_t>(topk_idx) : nullptr;
  a.topk_weights = num_topk ? ptr<const float>(topk_weights) : nullptr;
  a.send_slot = ptr<const int>(state[kSendSlot]);
  a.node_token = ptr<const int>(state[kNodeToken]);
  a.counts = ptr<const int>(state[kCounts]);
  a.tables = ptr<const int>(state[kTables]);
  a.num_tokens = static_cast<int>(T);
  a.hidden_bytes = static_cast<int>(hidden_bytes);
  a.num_scales = num_scales;
  a.num_topk = num_topk;
  a.num_local_experts = static_cast<int>(num_experts / R);
  a.chunk = static_cast<int>(chunk);
  a.fwd_pos = ptr<int>(state[kFwdPos]);
  a.recv_x = out.recv_x.data_ptr();
  a.recv_scales = ptr<float>(out.recv_scales);
  a.recv_topk_idx = ptr<int64_t>(out.recv_topk_idx);
  a.recv_topk_weights = ptr<float>(out.recv_topk_weights);
  a.recv_src_idx = ptr<int>(out.recv_src_idx);
  a.num_out_rows = static_cast<int>(num_out);
  a.worst = worst > 0 ? 1 : 0;
  a.num_blocks = static_cast<int>(num_sms);
  rt.dispatch(a, stream);
  out.num_recv = worst > 0 ? -1 : num_out;
  out.recv_per_src = column_view(state[kCounts], tp.rank);  // rows from each source rank
  out.state = std::move(state);
  return out;
}

std::tuple<at::Tensor, OptTensor> internode_combine(int64_t runtime, const at::Tensor& x,
                                                    const OptTensor& topk_weights,
                                                    const std::vector<at::Tensor>& state,
                                                    const std::vector<int>& host_counts,
                                                    const OptTensor& bias0, const OptTensor& bias1,
                                                    int64_t num_tokens, int64_t num_sms,
                                                    int64_t chunk, int64_t hop) {
  InternodeRuntime& rt = runtime_at(runtime);
  if (state.size() != kStateCount) bad_arg("handle: not an internode dispatch handle");
  const int64_t H = check_combine_inputs(x, topk_weights, bias0, bias1, num_tokens, rt.device());
  const int K = topk_weights ? static_cast<int>(topk_weights->size(1)) : 0;
  const int64_t row = combine_row_bytes(static_cast<int>(H), K);
  check_fit(rt, host_counts, kMaxFwdRows, row, kMaxSendRows, row, "combine");
  const at::Device dev = x.device();
  const HopGuard guard(hop, dev);
  auto [out, out_w] = combine_outputs(num_tokens, H, K, topk_weights.has_value(), dev);
  CombineArgs a{};
  a.x = x.data_ptr();
  a.topk_weights = ptr<const float>(topk_weights);
  a.node_slot = ptr<const int>(state[kNodeSlot]);
  a.fwd_pos = ptr<const int>(state[kFwdPos]);
  a.counts = ptr<const int>(state[kCounts]);
  a.tables = ptr<const int>(state[kTables]);
  a.bias0 = bias0 ? bias0->data_ptr() : nullptr;
  a.bias1 = bias1 ? bias1->data_ptr() : nullptr;
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(H);
  a.num_topk = K;
  a.chunk = static_cast<int>(chunk);
  a.out = out.data_ptr();
  a.out_weights = ptr<float>(out_w);
  a.num_blocks = static_cast<int>(num_sms);
  rt.combine(a, guard.stream());
  return {out, out_w};
}

}  // namespace ops
}  // namespace mpiep
