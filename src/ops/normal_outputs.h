// The outputs of a normal-mode dispatch (both engines): the received rows, their FP8 scales,
// top-k ids and weights, as aligned views of one allocation (ops_common.h's OutputBlock).
#pragma once

#include "ops/normal_ops.h"
#include "ops/ops_common.h"

namespace mpiep {
namespace ops {

// Fills out.recv_x (x's dtype), recv_scales, recv_topk_idx and recv_topk_weights for
// `num_out` rows; with `with_src_idx` (a cached dispatch, whose handle keeps its own) also
// recv_src_idx, which a new handle keeps with the routing state instead.
inline void allocate_dispatch_outputs(DispatchOut& out, int64_t num_out, const at::Tensor& x,
                                      int64_t hidden_bytes, int num_scales, int num_topk,
                                      bool with_weights, bool with_src_idx, const at::Device& dev) {
  ByteLayout o;
  const int64_t x_at = o.add(num_out * hidden_bytes);
  const int64_t scales_at = num_scales ? o.add(num_out * num_scales * 4) : 0;
  const int64_t idx_at = num_topk ? o.add(num_out * num_topk * 8) : 0;
  const int64_t w_at = (num_topk && with_weights) ? o.add(num_out * num_topk * 4) : 0;
  const int64_t src_at = with_src_idx ? o.add(num_out * 4) : 0;
  const OutputBlock block(o, dev);
  out.recv_x = block.take(x_at, {num_out, x.size(1)}, x.scalar_type());
  if (num_scales) out.recv_scales = block.take(scales_at, {num_out, num_scales}, at::kFloat);
  if (num_topk) {
    out.recv_topk_idx = block.take(idx_at, {num_out, num_topk}, at::kLong);
    if (with_weights) out.recv_topk_weights = block.take(w_at, {num_out, num_topk}, at::kFloat);
  }
  if (with_src_idx) out.recv_src_idx = block.take(src_at, {num_out}, at::kInt);
}

}  // namespace ops
}  // namespace mpiep
