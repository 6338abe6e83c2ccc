// Native entries of normal mode (mpiep._ops), one call per operation: the layout, dispatch
// (notify, the host wait for the receive size, output allocation and the data kernel in one
// go) and combine, for the intranode (CUDA IPC) and internode (NVLink + RDMA) engines.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace mpiep {
namespace ops {

using OptTensor = std::optional<at::Tensor>;

// (num_tokens_per_rank [R], num_tokens_per_rdma_rank [N] or None, num_tokens_per_expert [E],
//  is_token_in_rank [T, R]).
using LayoutOut = std::tuple<at::Tensor, OptTensor, at::Tensor, at::Tensor>;
// `hop`: a StreamHop address (ops_common.h) to run on the Buffer's comm stream, or 0.
LayoutOut layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                 int64_t ranks_per_node, int64_t hop);

// What a dispatch returns: the outputs, then what the handle keeps.
//
// Memory: recv_x, recv_scales, recv_topk_idx and recv_topk_weights are views of one
// allocation (the user's outputs, used together as the experts' input), so one the caller
// drops stays allocated while another is alive. The handle's tensors (state, recv_src_idx,
// recv_per_src) are views of the routing's own allocation(s), never of the outputs': a
// handle kept until combine does not pin recv_x.
struct DispatchOut {
  at::Tensor recv_x;
  OptTensor recv_scales, recv_topk_idx, recv_topk_weights;
  at::Tensor recv_src_idx;
  int64_t num_recv = -1;           // real rows; -1 with num_worst_tokens (known on the GPU only)
  std::vector<int> expert_counts;  // per local expert, padded; empty with num_worst_tokens
  std::vector<at::Tensor> state;   // the routing on the GPU (engine-specific order)
  std::vector<int> host_counts;    // its host copy (engine-specific), or empty
  at::Tensor recv_per_src;         // [R] int32: rows received from each rank (a strided view
                                   // of the count matrix's column of this rank, on the GPU)
};

// The routing of a new dispatch (from get_dispatch_layout), or of a handle (cached mode).
struct Routing {
  OptTensor num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank;
  std::vector<at::Tensor> state;  // non-empty: cached dispatch along a handle's routes
  std::vector<int> host_counts;
  int64_t cached_rows = 0;  // output rows of the handle's dispatch
};

DispatchOut intranode_dispatch(int64_t runtime, const at::Tensor& x, const OptTensor& x_scales,
                               const OptTensor& topk_idx, const OptTensor& topk_weights,
                               const Routing& routing, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens, int64_t num_sms,
                               int64_t hop);
std::tuple<at::Tensor, OptTensor> intranode_combine(
    int64_t runtime, const at::Tensor& x, const OptTensor& topk_weights,
    const at::Tensor& recv_src_idx, const std::vector<at::Tensor>& state,
    const std::vector<int>& host_counts, const OptTensor& bias0, const OptTensor& bias1,
    int64_t num_tokens, int64_t num_sms, int64_t hop);

DispatchOut internode_dispatch(int64_t runtime, const at::Tensor& x, const OptTensor& x_scales,
                               const OptTensor& topk_idx, const OptTensor& topk_weights,
                               const Routing& routing, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens, int64_t num_sms,
                               int64_t chunk, int64_t hop);
std::tuple<at::Tensor, OptTensor> internode_combine(int64_t runtime, const at::Tensor& x,
                                                    const OptTensor& topk_weights,
                                                    const std::vector<at::Tensor>& state,
                                                    const std::vector<int>& host_counts,
                                                    const OptTensor& bias0, const OptTensor& bias1,
                                                    int64_t num_tokens, int64_t num_sms,
                                                    int64_t chunk, int64_t hop);

}  // namespace ops
}  // namespace mpiep
