// The op layer as torch custom ops (torch.ops.mpiep.*), so that the calls can sit inside
// torch.compile graphs and CUDA-graph captures. Each kernel below converts the dispatcher's
// argument types and calls the same C++ function as the pybind entry of module.cpp; there is
// no second implementation. The fake (meta) implementations that give the output shapes
// under torch.compile are in Python: python/mpiep/backends/torch_ops.py (set_python_module
// below makes torch import it when it needs them).
//
// Side effects. The communication ops write buffers torch cannot see (the NVSHMEM heap, the
// CUDA IPC buffers, signal counters) and must run in the same order on every rank, exactly
// once. A functional schema would let torch.compile drop an op whose outputs are unused,
// reorder two ops that share no tensor, or merge two identical calls. So every
// communication op takes `Tensor(a!) sequence`: one small tensor per device, owned by the
// engines (torch_ops.sequence), that stands for that hidden state. The kernels never touch
// it; declaring it mutated is what matters:
//  - an op whose schema is mutable is impure for FX dead-code elimination
//    (torch._library.utils.is_impure, used by torch.fx.Node.is_impure), and Inductor keeps a
//    fallback kernel with side effects (FallbackKernel.has_side_effects) and orders mutable
//    ops by what they mutate (pytorch/pytorch#118649, "Fix FallbackKernel behavior on mutable
//    ops": without that, Inductor "would incorrectly reorder the mutable op with other
//    mutable ops");
//  - under AOTAutograd the op becomes auto_functionalized (pytorch/pytorch#114955), whose
//    result is the new value of `sequence`; since `sequence` is a graph input, that value is
//    written back at the end of the graph, so the op is always live, and each op consumes
//    the previous one's value: a total order over all of mpiep's ops on the device.
// The alternative, torch's effect tokens (torch.library._register_effectful_op), is newer
// and its API differs between the torch releases we build against; a mutated tensor works
// the same from torch 2.2 on. Ops that mutate real outputs (stats, the receive buffers of a
// hook's receive, `out`) declare those too. The layout and the reference backend's CPU
// kernels touch no hidden state: they are plain functional ops.
//
// Normal-mode dispatch is not registered: its output row count is known only after the
// notify phase (a host wait on the peers' counts), and it returns host-side lists (the
// per-expert counts, the handle's host counts) that a graph cannot carry. See
// torch_ops.py's docstring.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "mpiep/errors.h"
#include "ops/low_latency_ops.h"
#include "ops/normal_ops.h"
#include "ops/ops_common.h"
#include "ops/reference_cpu_ops.h"

using mpiep::ops::OptTensor;

namespace {

// mpiep::Error as the c10 error torch turns into the same Python class as the pybind entries
// (ValueError, TypeError); timeouts and CUDA errors stay RuntimeError.
template <class F>
auto translate(F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const mpiep::Error& e) {
    switch (e.code()) {
      case mpiep::ErrorCode::kInvalidArgument:
      case mpiep::ErrorCode::kCapacity:
        TORCH_CHECK_VALUE(false, e.what());
      case mpiep::ErrorCode::kType:
        TORCH_CHECK_TYPE(false, e.what());
      default:
        TORCH_CHECK(false, e.what());
    }
  }
}

std::vector<at::Tensor> list(at::TensorList tensors) { return tensors.vec(); }

std::vector<int> ints(at::IntArrayRef values) { return {values.begin(), values.end()}; }

// ------------------------------------------------------------------ layout (functional)
// [per_rank, per_expert, in_rank], then per_node with more than one node.
std::vector<at::Tensor> layout_op(const at::Tensor& topk_idx, int64_t num_experts,
                                  int64_t num_ranks, int64_t ranks_per_node, int64_t hop) {
  return translate([&] {
    auto [per_rank, per_node, per_expert, in_rank] =
        mpiep::ops::layout(topk_idx, num_experts, num_ranks, ranks_per_node, hop);
    std::vector<at::Tensor> out{per_rank, per_expert, in_rank};
    if (per_node) out.push_back(*per_node);
    return out;
  });
}

// ------------------------------------------------------------------ low latency
// Mutable ops must return a fixed tuple of tensors to be functionalized by torch.compile
// (auto_functionalize.can_auto_functionalize: no Tensor[] or Tensor? returns), so the BF16
// and FP8 dispatches are two schemas.
mpiep::ops::LowLatencyDispatchOut ll_dispatch_checked(
    int64_t ctx, int64_t num_ranks, const at::Tensor& x, const at::Tensor& topk_idx,
    int64_t max_tokens, int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
    const OptTensor& stats, int64_t buffer, int64_t phases) {
  // The fake implementation computed the shapes from num_ranks: it must be the context's.
  const int64_t ranks = mpiep::ops::ll_num_ranks(ctx);
  if (num_ranks != ranks)
    throw mpiep::Error(mpiep::ErrorCode::kInvalidArgument,
                       "mpiep::ll_dispatch: num_ranks=" + std::to_string(num_ranks) +
                           ", but the low-latency context has " + std::to_string(ranks));
  const mpiep::ops::SeparateOutputs separate;  // a custom op's returns may not alias
  return mpiep::ops::ll_dispatch(ctx, x, topk_idx, max_tokens, num_experts, use_fp8, round_scale,
                                 use_ue8m0, stats, buffer, phases);
}

// (recv_x bf16, recv_count, src_token_idx, layout_range)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ll_dispatch_op(
    at::Tensor& sequence, int64_t ctx, int64_t num_ranks, const at::Tensor& x,
    const at::Tensor& topk_idx, int64_t max_tokens, int64_t num_experts, const OptTensor& stats,
    int64_t buffer, int64_t phases) {
  (void)sequence;
  return translate([&] {
    auto o = ll_dispatch_checked(ctx, num_ranks, x, topk_idx, max_tokens, num_experts, false, false,
                                 false, stats, buffer, phases);
    return std::make_tuple(o.recv_x, o.recv_count, o.src_token_idx, o.layout_range);
  });
}

// (recv_x e4m3, recv_scales, recv_count, src_token_idx, layout_range)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ll_dispatch_fp8_op(
    at::Tensor& sequence, int64_t ctx, int64_t num_ranks, const at::Tensor& x,
    const at::Tensor& topk_idx, int64_t max_tokens, int64_t num_experts, bool round_scale,
    bool use_ue8m0, const OptTensor& stats, int64_t buffer, int64_t phases) {
  (void)sequence;
  return translate([&] {
    auto o = ll_dispatch_checked(ctx, num_ranks, x, topk_idx, max_tokens, num_experts, true,
                                 round_scale, use_ue8m0, stats, buffer, phases);
    return std::make_tuple(o.recv_x, *o.recv_scales, o.recv_count, o.src_token_idx, o.layout_range);
  });
}

void ll_dispatch_receive_op(at::Tensor& sequence, int64_t ctx, const at::Tensor& x,
                            const at::Tensor& topk_idx, at::Tensor& recv_x,
                            const OptTensor& recv_scales, at::Tensor& recv_count,
                            at::Tensor& src_token_idx, at::Tensor& layout_range, int64_t max_tokens,
                            int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
                            const OptTensor& stats, int64_t buffer) {
  (void)sequence;
  translate([&] {
    const mpiep::ops::LowLatencyDispatchOut outputs{recv_x, recv_scales, recv_count, src_token_idx,
                                                    layout_range};
    mpiep::ops::ll_dispatch_receive(ctx, x, topk_idx, outputs, max_tokens, num_experts, use_fp8,
                                    round_scale, use_ue8m0, stats, buffer);
  });
}

at::Tensor ll_combine_op(at::Tensor& sequence, int64_t ctx, const at::Tensor& y,
                         const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                         const at::Tensor& src_token_idx, const at::Tensor& layout_range,
                         int64_t hidden, int64_t max_tokens, int64_t num_experts, bool zero_copy,
                         int64_t buffer, int64_t phases) {
  (void)sequence;
  return translate([&] {
    return mpiep::ops::ll_combine(ctx, y, topk_idx, topk_weights, src_token_idx, layout_range,
                                  std::nullopt, hidden, max_tokens, num_experts, zero_copy, buffer,
                                  phases);
  });
}

// ll_combine into the caller's `out` (Buffer's out=, and the receive of a hook's combine):
// returns nothing, since an op's output may not alias its input.
void ll_combine_out_op(at::Tensor& sequence, int64_t ctx, const at::Tensor& y,
                       const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                       const at::Tensor& src_token_idx, const at::Tensor& layout_range,
                       at::Tensor& out, int64_t hidden, int64_t max_tokens, int64_t num_experts,
                       bool zero_copy, int64_t buffer, int64_t phases) {
  (void)sequence;
  translate([&] {
    mpiep::ops::ll_combine(ctx, y, topk_idx, topk_weights, src_token_idx, layout_range, out, hidden,
                           max_tokens, num_experts, zero_copy, buffer, phases);
  });
}

// ------------------------------------------------------------------ normal combine
// (out, summed weights): without topk_weights the second is an empty [num_tokens, 0] float32
// tensor (a fixed tuple, for the same reason as the dispatch above).
std::tuple<at::Tensor, at::Tensor> combine_pair(const std::tuple<at::Tensor, OptTensor>& r,
                                                const at::Tensor& x) {
  const at::Tensor& out = std::get<0>(r);
  if (std::get<1>(r)) return {out, *std::get<1>(r)};
  return {out, at::empty({out.size(0), 0}, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> intranode_combine_op(
    at::Tensor& sequence, int64_t runtime, const at::Tensor& x, const OptTensor& topk_weights,
    const at::Tensor& recv_src_idx, at::TensorList state, at::IntArrayRef host_counts,
    const OptTensor& bias0, const OptTensor& bias1, int64_t num_tokens, int64_t num_sms,
    int64_t hop) {
  (void)sequence;
  return translate([&] {
    const mpiep::ops::SeparateOutputs separate;  // a custom op's returns may not alias
    return combine_pair(
        mpiep::ops::intranode_combine(runtime, x, topk_weights, recv_src_idx, list(state),
                                      ints(host_counts), bias0, bias1, num_tokens, num_sms, hop),
        x);
  });
}

std::tuple<at::Tensor, at::Tensor> internode_combine_op(
    at::Tensor& sequence, int64_t runtime, const at::Tensor& x, const OptTensor& topk_weights,
    at::TensorList state, at::IntArrayRef host_counts, const OptTensor& bias0,
    const OptTensor& bias1, int64_t num_tokens, int64_t num_sms, int64_t chunk, int64_t hop) {
  (void)sequence;
  return translate([&] {
    const mpiep::ops::SeparateOutputs separate;  // a custom op's returns may not alias
    return combine_pair(
        mpiep::ops::internode_combine(runtime, x, topk_weights, list(state), ints(host_counts),
                                      bias0, bias1, num_tokens, num_sms, chunk, hop),
        x);
  });
}

// ------------------------------------------------------------------ reference CPU kernels
void reference_gather_sum_op(const at::Tensor& rows, const at::Tensor& idx, at::Tensor& out,
                             const OptTensor& weights, at::TensorList bias) {
  translate([&] { mpiep::ops::reference_gather_sum(rows, idx, out, weights, list(bias)); });
}

std::tuple<at::Tensor, at::Tensor> reference_cast_to_fp8_op(const at::Tensor& x, bool round_scale,
                                                            bool use_ue8m0) {
  return translate([&] { return mpiep::ops::reference_cast_to_fp8(x, round_scale, use_ue8m0); });
}

}  // namespace

TORCH_LIBRARY(mpiep, m) {
  m.set_python_module("mpiep.backends.torch_ops");
  m.def(
      "layout(Tensor topk_idx, int num_experts, int num_ranks, int ranks_per_node, int hop) "
      "-> Tensor[]");
  m.def(
      "ll_dispatch(Tensor(a!) sequence, int ctx, int num_ranks, Tensor x, Tensor topk_idx, "
      "int max_tokens, int num_experts, Tensor(b!)? stats, int buffer, int phases) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ll_dispatch_fp8(Tensor(a!) sequence, int ctx, int num_ranks, Tensor x, Tensor topk_idx, "
      "int max_tokens, int num_experts, bool round_scale, bool use_ue8m0, Tensor(b!)? stats, "
      "int buffer, int phases) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ll_dispatch_receive(Tensor(a!) sequence, int ctx, Tensor x, Tensor topk_idx, "
      "Tensor(b!) recv_x, Tensor(c!)? recv_scales, Tensor(d!) recv_count, "
      "Tensor(e!) src_token_idx, Tensor(f!) layout_range, int max_tokens, int num_experts, "
      "bool use_fp8, bool round_scale, bool use_ue8m0, Tensor(g!)? stats, int buffer) -> ()");
  m.def(
      "ll_combine(Tensor(a!) sequence, int ctx, Tensor y, Tensor topk_idx, Tensor topk_weights, "
      "Tensor src_token_idx, Tensor layout_range, int hidden, int max_tokens, int num_experts, "
      "bool zero_copy, int buffer, int phases) -> Tensor");
  m.def(
      "ll_combine_out(Tensor(a!) sequence, int ctx, Tensor y, Tensor topk_idx, "
      "Tensor topk_weights, Tensor src_token_idx, Tensor layout_range, Tensor(b!) out, "
      "int hidden, int max_tokens, int num_experts, bool zero_copy, int buffer, int phases) "
      "-> ()");
  m.def(
      "intranode_combine(Tensor(a!) sequence, int runtime, Tensor x, Tensor? topk_weights, "
      "Tensor recv_src_idx, Tensor[] state, int[] host_counts, Tensor? bias0, Tensor? bias1, "
      "int num_tokens, int num_sms, int hop) -> (Tensor, Tensor)");
  m.def(
      "internode_combine(Tensor(a!) sequence, int runtime, Tensor x, Tensor? topk_weights, "
      "Tensor[] state, int[] host_counts, Tensor? bias0, Tensor? bias1, int num_tokens, "
      "int num_sms, int chunk, int hop) -> (Tensor, Tensor)");
  m.def(
      "reference_gather_sum(Tensor rows, Tensor idx, Tensor(a!) out, Tensor? weights, "
      "Tensor[] bias) -> ()");
  m.def("reference_cast_to_fp8(Tensor x, bool round_scale, bool use_ue8m0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mpiep, CUDA, m) {
  m.impl("layout", &layout_op);
  m.impl("ll_dispatch", &ll_dispatch_op);
  m.impl("ll_dispatch_fp8", &ll_dispatch_fp8_op);
  m.impl("ll_dispatch_receive", &ll_dispatch_receive_op);
  m.impl("ll_combine", &ll_combine_op);
  m.impl("ll_combine_out", &ll_combine_out_op);
  m.impl("intranode_combine", &intranode_combine_op);
  m.impl("internode_combine", &internode_combine_op);
}

TORCH_LIBRARY_IMPL(mpiep, CPU, m) {
  m.impl("reference_gather_sum", &reference_gather_sum_op);
  m.impl("reference_cast_to_fp8", &reference_cast_to_fp8_op);
}
