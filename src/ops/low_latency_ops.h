// Native entries of the low-latency mode (mpiep._ops): one call per operation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace mpiep {
namespace ops {

struct LowLatencyDispatchOut {
  at::Tensor recv_x;                      // [E_local, R*max, H] bf16 or e4m3
  std::optional<at::Tensor> recv_scales;  // f32 [.., H/128] or UE8M0 int32 [.., ceil(H/512)]
  at::Tensor recv_count;                  // [E_local] int32
  at::Tensor src_token_idx;               // [E_local, R*max] int32
  at::Tensor layout_range;                // [E_local, R, 2] int32
};

LowLatencyDispatchOut ll_dispatch(int64_t ctx_address, const at::Tensor& x,
                                  const at::Tensor& topk_idx, int64_t max_tokens,
                                  int64_t num_experts, bool use_fp8, bool round_scale,
                                  bool use_ue8m0, const std::optional<at::Tensor>& stats,
                                  int64_t buffer, int64_t phases);

// The receive phase of a dispatch sent with a hook, into the outputs its send phase returned.
void ll_dispatch_receive(int64_t ctx_address, const at::Tensor& x, const at::Tensor& topk_idx,
                         const LowLatencyDispatchOut& outputs, int64_t max_tokens,
                         int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
                         const std::optional<at::Tensor>& stats, int64_t buffer);

// The rank count of a context (what the output shapes of ll_dispatch depend on), for the
// custom op's schema check and fake implementation (src/ops/torch_library.cpp).
int64_t ll_num_ranks(int64_t ctx_address);

at::Tensor ll_combine(int64_t ctx_address, const at::Tensor& y, const at::Tensor& topk_idx,
                      const at::Tensor& topk_weights, const at::Tensor& src_token_idx,
                      const at::Tensor& layout_range, const std::optional<at::Tensor>& out,
                      int64_t hidden, int64_t max_tokens, int64_t num_experts, bool zero_copy,
                      int64_t buffer, int64_t phases);

}  // namespace ops
}  // namespace mpiep
