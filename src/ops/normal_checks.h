// The local checks of Buffer.dispatch and Buffer.combine that read tensors, done in the op so
// that Buffer skips its Python copies without validation (python/mpiep/buffer/checks.py keeps
// them for validation, where ranks agree on the outcome before anything launches). Same
// exception types as the Python checks: TypeError for a dtype, ValueError otherwise.
#pragma once

#include <string>

#include "ops/normal_ops.h"
#include "ops/ops_common.h"

namespace mpiep {
namespace ops {

inline void need(const OptTensor& t, const char* name) {
  if (!t)
    bad_arg(std::string("dispatch without a handle needs ") + name + " (from get_dispatch_layout)");
}

// x (BF16, or FP8 with its scales), then the layout and top-k of a new dispatch. Returns the
// row bytes of x (dispatch_row_bytes_of), so that nothing checks x twice.
inline int64_t check_dispatch_inputs(const at::Tensor& x, const OptTensor& x_scales,
                                     const OptTensor& topk_idx, const OptTensor& topk_weights,
                                     const Routing& r, int64_t num_ranks, int64_t num_nodes,
                                     int device) {
  const bool fp8 = x.scalar_type() == at::kFloat8_e4m3fn;
  if (!fp8 && x.scalar_type() != at::kBFloat16)
    throw Error(ErrorCode::kType, "x must have dtype BFloat16 or Float8_e4m3fn, got " +
                                      std::string(c10::toString(x.scalar_type())));
  check(x, "x", x.scalar_type(), 2, device);
  const int64_t T = x.size(0), H = x.size(1);
  if (x_scales || fp8) {
    if (!fp8)
      throw Error(ErrorCode::kType, "FP8 dispatch takes x as float8_e4m3fn, got " +
                                        std::string(c10::toString(x.scalar_type())));
    if (!x_scales) bad_arg("FP8 x needs its scales: pass x as (x_e4m3, scales)");
    if (H % 128)
      bad_arg("FP8 x needs a hidden size that is a multiple of 128, got " + std::to_string(H));
    check(*x_scales, "x scales", at::kFloat, 2, device);
    check_size(*x_scales, "x scales", 0, T);
    check_size(*x_scales, "x scales", 1, H / 128);
  }
  const int64_t row_bytes = dispatch_row_bytes_of(x);
  if (!r.state.empty()) return row_bytes;  // cached: the handle stands for the layout (Python)
  need(r.num_tokens_per_rank, "num_tokens_per_rank");
  need(r.is_token_in_rank, "is_token_in_rank");
  need(r.num_tokens_per_expert, "num_tokens_per_expert");
  // Without top-k (the engines allow it; Buffer asks for it) tokens move without expert ids.
  if (topk_idx) {
    check(*topk_idx, "topk_idx", at::kLong, 2, device);
    check_size(*topk_idx, "topk_idx", 0, T);
  }
  if (topk_weights && topk_idx) {
    check(*topk_weights, "topk_weights", at::kFloat, 2, device);
    check_size(*topk_weights, "topk_weights", 0, T);
    check_size(*topk_weights, "topk_weights", 1, topk_idx->size(1));
  }
  check(*r.num_tokens_per_expert, "num_tokens_per_expert", at::kInt, 1, device);
  const int64_t E = r.num_tokens_per_expert->size(0);
  if (E <= 0 || E % num_ranks)
    bad_arg("num_experts (" + std::to_string(E) +
            ") must be a positive multiple of the number of ranks (" + std::to_string(num_ranks) +
            ")");
  check(*r.num_tokens_per_rank, "num_tokens_per_rank", at::kInt, 1, device);
  check_size(*r.num_tokens_per_rank, "num_tokens_per_rank", 0, num_ranks);
  if (r.num_tokens_per_rdma_rank) {
    check(*r.num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", at::kInt, 1, device);
    check_size(*r.num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", 0, num_nodes);
  }
  check(*r.is_token_in_rank, "is_token_in_rank", at::kBool, 2, device);
  check_size(*r.is_token_in_rank, "is_token_in_rank", 0, T);
  check_size(*r.is_token_in_rank, "is_token_in_rank", 1, num_ranks);
  return row_bytes;
}

// Combine's x [rows, H] BF16 (rows and H against the handle: in Python), the received
// weights, and the biases [num_tokens, H]. Returns H.
inline int64_t check_combine_inputs(const at::Tensor& x, const OptTensor& topk_weights,
                                    const OptTensor& bias0, const OptTensor& bias1,
                                    int64_t num_tokens, int device) {
  check(x, "x", at::kBFloat16, 2, device);
  const int64_t H = combine_hidden_of(x);  // x checked just above: only its row alignment
  if (topk_weights) {
    check(*topk_weights, "topk_weights", at::kFloat, 2, device);
    check_size(*topk_weights, "topk_weights", 0, x.size(0));
  }
  check_bias(bias0, "bias[0]", num_tokens, H, device);
  check_bias(bias1, "bias[1]", num_tokens, H, device);
  return H;
}

}  // namespace ops
}  // namespace mpiep
