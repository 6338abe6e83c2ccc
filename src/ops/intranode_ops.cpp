// Normal mode inside one node as single native calls (and the layout, for both engines).
#include "mpiep/internode.h"
#include "mpiep/intranode.h"
#include "ops/normal_checks.h"
#include "ops/normal_ops.h"
#include "ops/normal_outputs.h"
#include "ops/ops_common.h"
#include "runtime/host_wait.h"
#include "runtime/intranode_runtime.h"

namespace mpiep {
namespace ops {

LayoutOut layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                 int64_t ranks_per_node, int64_t hop) {
  check(topk_idx, "topk_idx", at::kLong, 2);
  const at::Device dev = topk_idx.device();
  const int64_t T = topk_idx.size(0), K = topk_idx.size(1), N = num_ranks / ranks_per_node;
  at::Tensor per_rank = empty({num_ranks}, at::kInt, dev);
  at::Tensor per_expert = empty({num_experts}, at::kInt, dev);
  at::Tensor in_rank = empty({T, num_ranks}, at::kBool, dev);
  OptTensor per_node;
  const HopGuard guard(hop, dev);
  const cudaStream_t stream = guard.stream();
  if (N == 1 && num_ranks <= 32) {
    intranode::LayoutArgs a{ptr<const int64_t>(topk_idx), static_cast<int>(T),
                            static_cast<int>(K),          static_cast<int>(num_experts),
                            static_cast<int>(num_ranks),  ptr<int>(per_rank),
                            ptr<int>(per_expert),         ptr<bool>(in_rank)};
    intranode::launch_layout(a, stream);
  } else {
    at::Tensor nodes = empty({N}, at::kInt, dev);
    internode::LayoutArgs a{};
    a.topk_idx = ptr<const int64_t>(topk_idx);
    a.num_tokens = static_cast<int>(T);
    a.num_topk = static_cast<int>(K);
    a.num_experts = static_cast<int>(num_experts);
    a.num_ranks = static_cast<int>(num_ranks);
    a.local_ranks = static_cast<int>(ranks_per_node);
    a.num_tokens_per_rank = ptr<int>(per_rank);
    a.num_tokens_per_rdma_rank = ptr<int>(nodes);
    a.num_tokens_per_expert = ptr<int>(per_expert);
    a.is_token_in_rank = ptr<bool>(in_rank);
    internode::launch_layout(a, stream);
    if (N > 1) per_node = nodes;
  }
  return {per_rank, per_node, per_expert, in_rank};
}

namespace {

IntranodeRuntime& runtime_at(int64_t address) {
  if (address == 0) bad_arg("intranode runtime is null (engine destroyed?)");
  return *reinterpret_cast<IntranodeRuntime*>(address);
}

// Rows each rank receives in dispatch (column sums of the [R, R + 1] count matrix), or sends
// (row sums), from its host copy.
std::vector<int64_t> matrix_rows(const std::vector<int>& m, int R, bool by_receiver) {
  std::vector<int64_t> rows(R, 0);
  for (int s = 0; s < R; ++s)
    for (int r = 0; r < R; ++r) rows[by_receiver ? r : s] += m[s * (R + 1) + r];
  return rows;
}

// The same CapacityError on every rank (all hold the same counts).
void check_fit(const std::vector<int64_t>& rows_per_rank, int64_t row_bytes, int64_t capacity,
               const char* what) {
  for (size_t r = 0; r < rows_per_rank.size(); ++r) {
    if (rows_per_rank[r] * row_bytes > capacity) {
      throw Error(ErrorCode::kCapacity,
                  std::string(what) + ": rank " + std::to_string(r) + " needs " +
                      std::to_string(rows_per_rank[r]) + " rows x " + std::to_string(row_bytes) +
                      " B = " + std::to_string(rows_per_rank[r] * row_bytes) +
                      " B of buffer but num_nvl_bytes leaves " + std::to_string(capacity) +
                      " B for rows; create the Buffer with a larger num_nvl_bytes "
                      "(see mpiep.get_normal_buffer_size_hint)");
    }
  }
}

}  // namespace

DispatchOut intranode_dispatch(int64_t runtime, const at::Tensor& x, const OptTensor& x_scales,
                               const OptTensor& topk_idx, const OptTensor& topk_weights,
                               const Routing& routing, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens, int64_t num_sms,
                               int64_t hop) {
  IntranodeRuntime& rt = runtime_at(runtime);
  const int R = rt.num_ranks(), me = rt.rank();
  const int64_t hidden_bytes =
      check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, routing, R, 1, rt.device());
  const int64_t T = x.size(0), H = x.size(1);
  const int num_scales = x_scales ? static_cast<int>(x_scales->size(1)) : 0;
  const bool cached = !routing.state.empty();
  const at::Device dev = x.device();
  // A plain dispatch waits on the host for its counts: refuse a capture before launching.
  if (!cached && num_worst_tokens <= 0) refuse_capture(current_stream(dev), "intranode dispatch");
  const HopGuard guard(hop, dev);
  const cudaStream_t stream = guard.stream();
  const int64_t worst = num_worst_tokens;
  const int num_topk = (!cached && topk_idx) ? static_cast<int>(topk_idx->size(1)) : 0;
  const int64_t row_bytes =
      intranode::dispatch_row_bytes(static_cast<int>(hidden_bytes), num_scales, num_topk);
  if (worst > 0) check_fit({worst}, row_bytes, rt.row_area_bytes(), "dispatch (num_worst_tokens)");

  // Two allocations (each at::empty costs ~2 us of host time; see DispatchOut): what the
  // handle keeps, made before the notify (which writes it), and the outputs, made once
  // their size is known. recv_src_idx goes with the handle's part (carved from the outputs
  // it would pin recv_x), sized for the most rows this rank can receive: num_worst_tokens,
  // or the rows the row area holds (check_fit guarantees it; 4 bytes for every >= 32 there;
  // past kMaxEarlyTailBytes on its own after the wait).
  DispatchOut out;
  at::Tensor send_slot, count_matrix;
  int64_t num_out = 0;
  if (cached) {
    send_slot = routing.state.at(0);
    count_matrix = routing.state.at(1);
    out.host_counts = routing.host_counts;
    num_out = routing.cached_rows;
    if (!out.host_counts.empty())
      check_fit(matrix_rows(out.host_counts, R, true), row_bytes, rt.row_area_bytes(), "dispatch");
  } else {
    if (!routing.num_tokens_per_rank || !routing.num_tokens_per_expert || !routing.is_token_in_rank)
      bad_arg(
          "dispatch: needs the layout (num_tokens_per_rank, num_tokens_per_expert, "
          "is_token_in_rank) or a handle");
    const int64_t src_cap = worst > 0 ? worst : rt.row_area_bytes() / row_bytes;
    const bool early = worst > 0 || src_cap * 4 <= kMaxEarlyTailBytes;
    ByteLayout st;
    const int64_t slot_at = st.add(T * R * 4), matrix_at = st.add(int64_t(R) * (R + 1) * 4),
                  src_at = early ? st.add(src_cap * 4) : 0;
    const at::Tensor state_bytes = empty({st.total}, at::kByte, dev);
    send_slot = typed_slice(state_bytes, slot_at, {T, R}, at::kInt);
    count_matrix = typed_slice(state_bytes, matrix_at, {R, R + 1}, at::kInt);
    intranode::NotifyArgs a{};
    a.num_tokens_per_rank = ptr<const int>(*routing.num_tokens_per_rank);
    a.num_tokens_per_expert = ptr<const int>(*routing.num_tokens_per_expert);
    a.is_token_in_rank = ptr<const bool>(*routing.is_token_in_rank);
    a.num_tokens = static_cast<int>(T);
    a.num_experts = static_cast<int>(num_experts);
    a.expert_alignment = static_cast<int>(std::max<int64_t>(1, expert_alignment));
    a.send_slot = ptr<int>(send_slot);
    a.count_matrix = ptr<int>(count_matrix);
    const int64_t token = rt.notify(a, stream);
    if (worst > 0) {
      num_out = worst;  // no host wait: the counts stay on the GPU
    } else {
      rt.wait_notify(token, stream);
      out.host_counts = rt.count_matrix();
      const auto recv = matrix_rows(out.host_counts, R, true);
      check_fit(recv, row_bytes, rt.row_area_bytes(), "dispatch");
      num_out = recv[me];
      out.expert_counts = rt.recv_per_expert(static_cast<int>(num_experts / R));
    }
    if (!early) {
      out.recv_src_idx = empty({num_out}, at::kInt, dev);
    } else {
      if (num_out > src_cap) bad_arg("dispatch: internal error, more rows than the buffer holds");
      out.recv_src_idx = typed_slice(state_bytes, src_at, {num_out}, at::kInt);
    }
  }
  // A cached dispatch's recv_src_idx is not kept (its handle has one): with the outputs.
  allocate_dispatch_outputs(out, num_out, x, hidden_bytes, num_scales, num_topk,
                            topk_weights.has_value(), cached, dev);
  intranode::DispatchArgs a{};
  a.x = x.data_ptr();
  a.x_scales = ptr<const float>(x_scales);
  a.topk_idx = num_topk ? ptr<const int64_t>(topk_idx) : nullptr;
  a.topk_weights = num_topk ? ptr<const float>(topk_weights) : nullptr;
  a.send_slot = ptr<const int>(send_slot);
  a.count_matrix = ptr<const int>(count_matrix);
  a.num_tokens = static_cast<int>(T);
  a.hidden_bytes = static_cast<int>(hidden_bytes);
  a.num_scales = num_scales;
  a.num_topk = num_topk;
  a.num_local_experts = static_cast<int>(num_experts / R);
  a.recv_x = out.recv_x.data_ptr();
  a.recv_scales = ptr<float>(out.recv_scales);
  a.recv_topk_idx = ptr<int64_t>(out.recv_topk_idx);
  a.recv_topk_weights = ptr<float>(out.recv_topk_weights);
  a.recv_src_idx = ptr<int>(out.recv_src_idx);
  a.num_out_rows = static_cast<int>(num_out);
  a.worst = worst > 0 ? 1 : 0;
  a.num_channels = static_cast<int>(num_sms / 2);
  rt.dispatch(a, stream);
  out.num_recv = worst > 0 ? -1 : num_out;
  out.recv_per_src = column_view(count_matrix, me);  // rows from each source (matrix rows)
  out.state = {send_slot, count_matrix};
  return out;
}

std::tuple<at::Tensor, OptTensor> intranode_combine(
    int64_t runtime, const at::Tensor& x, const OptTensor& topk_weights,
    const at::Tensor& recv_src_idx, const std::vector<at::Tensor>& state,
    const std::vector<int>& host_counts, const OptTensor& bias0, const OptTensor& bias1,
    int64_t num_tokens, int64_t num_sms, int64_t hop) {
  IntranodeRuntime& rt = runtime_at(runtime);
  const int R = rt.num_ranks();
  const int64_t H = check_combine_inputs(x, topk_weights, bias0, bias1, num_tokens, rt.device());
  const int K = topk_weights ? static_cast<int>(topk_weights->size(1)) : 0;
  const int64_t row_bytes = intranode::combine_row_bytes(static_cast<int>(H), K);
  // Rows arriving at rank s = rows s sent in dispatch.
  if (!host_counts.empty())
    check_fit(matrix_rows(host_counts, R, false), row_bytes, rt.row_area_bytes(), "combine");
  const at::Device dev = x.device();
  const HopGuard guard(hop, dev);
  auto [out, out_w] = combine_outputs(num_tokens, H, K, topk_weights.has_value(), dev);
  intranode::CombineArgs a{};
  a.x = x.data_ptr();
  a.topk_weights = ptr<const float>(topk_weights);
  a.recv_src_idx = ptr<const int>(recv_src_idx);
  a.send_slot = ptr<const int>(state.at(0));
  a.count_matrix = ptr<const int>(state.at(1));
  a.bias0 = bias0 ? bias0->data_ptr() : nullptr;
  a.bias1 = bias1 ? bias1->data_ptr() : nullptr;
  a.num_tokens = static_cast<int>(num_tokens);
  a.hidden = static_cast<int>(H);
  a.num_topk = K;
  a.out = out.data_ptr();
  a.out_weights = ptr<float>(out_w);
  a.num_channels = static_cast<int>(num_sms / 2);
  rt.combine(a, guard.stream());
  return {out, out_w};
}

}  // namespace ops
}  // namespace mpiep
