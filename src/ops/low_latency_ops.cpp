// Low-latency dispatch and combine as single native calls: check, allocate the outputs on the
// caller's device, take its current stream and launch through LowLatencyContext.
#include "ops/low_latency_ops.h"

#include "ops/ops_common.h"
#include "runtime/low_latency_context.h"

namespace mpiep {
namespace ops {
namespace {

// A combine also waits for rows its dispatch dropped (docs/semantics.md): say so.
constexpr const char* kDroppedPairsHint =
    ", or, without validation, its dispatch dropped (token, slot) pairs past "
    "num_max_dispatch_tokens_per_rank (an expert repeated in tokens' top-k; validate=True "
    "raises a CapacityError instead)";

LowLatencyContext& context(int64_t address) {
  if (address == 0) bad_arg("low-latency context is null (engine destroyed?)");
  auto& ctx = *reinterpret_cast<LowLatencyContext*>(address);
  if (auto e = ctx.error()) {
    static const char* what[] = {"a signal", "the token count", "token rows", "expert outputs"};
    const int phase = e->phase >= 1 && e->phase <= 3 ? e->phase : 0;
    throw Error(ErrorCode::kTimeout,
                "rank " + std::to_string(e->rank) + ": low-latency " +
                    (phase == 3 ? "combine" : "dispatch") + " timed out after " +
                    std::to_string(ctx.timeout_s()) + "s waiting for " + what[phase] + " from " +
                    (e->peer >= 0 ? "rank " + std::to_string(e->peer) : "its experts' ranks") +
                    " (index " + std::to_string(e->index) + ": saw " + std::to_string(e->observed) +
                    ", expected " + std::to_string(e->expected) +
                    "); a peer crashed, hangs or skipped the call" +
                    (phase == 3 ? kDroppedPairsHint : "") +
                    ". Call clean_low_latency_buffer on every rank to recover");
  }
  return ctx;
}

}  // namespace

namespace {

// Checks the inputs, and allocates the outputs unless `reuse` (a hook's receive phase) has them.
void launch_dispatch(LowLatencyContext& ctx, const at::Tensor& x, const at::Tensor& topk_idx,
                     int64_t max_tokens, int64_t num_experts, bool use_fp8, bool round_scale,
                     bool use_ue8m0, const std::optional<at::Tensor>& stats, int64_t buffer,
                     int64_t phases, LowLatencyDispatchOut& out, bool allocate) {
  // Every local check of Buffer.low_latency_dispatch (python/mpiep/buffer/checks.py), so that
  // Buffer skips its own without validation: same messages, same exception types.
  const int device = ctx.device();
  check(x, "x", at::kBFloat16, 2, device);
  check(topk_idx, "topk_idx", at::kLong, 2, device);
  check_size(topk_idx, "topk_idx", 0, x.size(0));
  const int64_t R = ctx.num_ranks(), EL = num_experts / R, H = x.size(1), rows = R * max_tokens;
  if (max_tokens <= 0)
    bad_arg("num_max_dispatch_tokens_per_rank must be a positive int, got " +
            std::to_string(max_tokens));
  if (num_experts <= 0 || num_experts % R)
    bad_arg("num_experts (" + std::to_string(num_experts) +
            ") must be a positive multiple of the number of ranks (" + std::to_string(R) + ")");
  if (x.size(0) > max_tokens)
    throw Error(ErrorCode::kCapacity, "x has " + std::to_string(x.size(0)) +
                                          " tokens, more than num_max_dispatch_tokens_per_rank=" +
                                          std::to_string(max_tokens));
  if (H % 128)
    bad_arg("low-latency mode needs a hidden size that is a multiple of 128, got " +
            std::to_string(H));
  if (use_ue8m0 && !use_fp8) bad_arg("use_ue8m0 needs use_fp8=True");
  if (stats.has_value()) {
    check(*stats, "cumulative_local_expert_recv_stats", at::kInt, 1, device);
    check_size(*stats, "cumulative_local_expert_recv_stats", 0, EL);
  }
  const at::Device dev = x.device();
  if (allocate) {
    // One allocation (each costs about 2 us of host time): the rows, their scales and the
    // three small int32 outputs are views of one buffer. The handle's two (src_token_idx,
    // layout_range) therefore keep the rows' memory alive as long as the handle lives.
    const int64_t row_bytes = use_fp8 ? H : 2 * H;
    const int64_t scale_cols = use_ue8m0 ? (H + 511) / 512 : H / 128;
    ByteLayout bytes;
    const int64_t x_at = bytes.add(EL * rows * row_bytes);
    const int64_t s_at = use_fp8 ? bytes.add(EL * rows * scale_cols * 4) : 0;
    const int64_t count_at = bytes.add(EL * 4), src_at = bytes.add(EL * rows * 4),
                  range_at = bytes.add(EL * R * 2 * 4);
    const OutputBlock block(bytes, dev);
    out.recv_x = block.take(x_at, {EL, rows, H}, use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16);
    if (use_fp8)
      out.recv_scales = block.take(s_at, {EL, rows, scale_cols}, use_ue8m0 ? at::kInt : at::kFloat);
    out.recv_count = block.take(count_at, {EL}, at::kInt);
    out.src_token_idx = block.take(src_at, {EL, rows}, at::kInt);
    out.layout_range = block.take(range_at, {EL, R, 2}, at::kInt);
  }
  LowLatencyDispatchCall c{};
  c.x = x.data_ptr();
  c.topk_idx = ptr<const int64_t>(topk_idx);
  c.num_tokens = static_cast<int>(x.size(0));
  c.num_topk = static_cast<int>(topk_idx.size(1));
  c.hidden = static_cast<int>(H);
  c.max_tokens = static_cast<int>(max_tokens);
  c.num_experts = static_cast<int>(num_experts);
  c.fp8 = use_fp8;
  c.round_scale = round_scale;
  c.ue8m0 = use_ue8m0;
  c.recv_x = out.recv_x.data_ptr();
  c.recv_scales = ptr<void>(out.recv_scales);
  c.recv_count = ptr<int>(out.recv_count);
  c.src_token_idx = ptr<int>(out.src_token_idx);
  c.layout_range = ptr<int>(out.layout_range);
  c.stats = ptr<int>(stats);
  c.buffer = static_cast<int>(buffer);
  c.phases = static_cast<int>(phases);
  ctx.dispatch(c, current_stream(dev));
}

}  // namespace

LowLatencyDispatchOut ll_dispatch(int64_t ctx_address, const at::Tensor& x,
                                  const at::Tensor& topk_idx, int64_t max_tokens,
                                  int64_t num_experts, bool use_fp8, bool round_scale,
                                  bool use_ue8m0, const std::optional<at::Tensor>& stats,
                                  int64_t buffer, int64_t phases) {
  LowLatencyDispatchOut out;
  launch_dispatch(context(ctx_address), x, topk_idx, max_tokens, num_experts, use_fp8, round_scale,
                  use_ue8m0, stats, buffer, phases, out, true);
  return out;
}

void ll_dispatch_receive(int64_t ctx_address, const at::Tensor& x, const at::Tensor& topk_idx,
                         const LowLatencyDispatchOut& outputs, int64_t max_tokens,
                         int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
                         const std::optional<at::Tensor>& stats, int64_t buffer) {
  LowLatencyDispatchOut out = outputs;
  launch_dispatch(context(ctx_address), x, topk_idx, max_tokens, num_experts, use_fp8, round_scale,
                  use_ue8m0, stats, buffer, ll::kRecvPhase, out, false);
}

int64_t ll_num_ranks(int64_t ctx_address) {
  if (ctx_address == 0) bad_arg("low-latency context is null (engine destroyed?)");
  return reinterpret_cast<LowLatencyContext*>(ctx_address)->num_ranks();
}

at::Tensor ll_combine(int64_t ctx_address, const at::Tensor& y, const at::Tensor& topk_idx,
                      const at::Tensor& topk_weights, const at::Tensor& src_token_idx,
                      const at::Tensor& layout_range, const std::optional<at::Tensor>& out,
                      int64_t hidden, int64_t max_tokens, int64_t num_experts, bool zero_copy,
                      int64_t buffer, int64_t phases) {
  LowLatencyContext& ctx = context(ctx_address);
  const int64_t R = ctx.num_ranks(), EL = num_experts / R, T = topk_idx.size(0);
  const int device = ctx.device();
  check(topk_idx, "topk_idx", at::kLong, 2, device);
  check(topk_weights, "topk_weights", at::kFloat, 2, device);
  check_size(topk_weights, "topk_weights", 0, T);
  check_size(topk_weights, "topk_weights", 1, topk_idx.size(1));
  check(src_token_idx, "handle.src_token_idx", at::kInt, 2, device);
  check(layout_range, "handle.layout_range", at::kInt, 3, device);
  const at::Device dev = topk_idx.device();
  // Zero copy only when y really is this call's symmetric send area; otherwise the kernel
  // stages rows there itself where NVSHMEM puts need it.
  const uint8_t* send_area =
      ctx.combine_send_buffer(static_cast<int>(buffer), static_cast<int>(hidden),
                              static_cast<int>(max_tokens), static_cast<int>(num_experts));
  const bool zc = zero_copy && y.data_ptr() == send_area;
  if (!zc) {
    check(y, "x", at::kBFloat16, 3, device);
    check_size(y, "x", 0, EL);
    check_size(y, "x", 1, R * max_tokens);
    check_size(y, "x", 2, hidden);
  }
  at::Tensor result;
  if (out.has_value()) {
    check(*out, "out", at::kBFloat16, 2, device);
    check_size(*out, "out", 0, T);
    check_size(*out, "out", 1, hidden);
    result = *out;
  } else {
    result = empty({T, hidden}, at::kBFloat16, dev);
  }
  LowLatencyCombineCall c{};
  c.y = y.data_ptr();
  c.topk_idx = ptr<const int64_t>(topk_idx);
  c.topk_weights = ptr<const float>(topk_weights);
  c.src_token_idx = ptr<const int>(src_token_idx);
  c.layout_range = ptr<const int>(layout_range);
  c.out = result.data_ptr();
  c.num_tokens = static_cast<int>(T);
  c.num_topk = static_cast<int>(topk_idx.size(1));
  c.hidden = static_cast<int>(hidden);
  c.max_tokens = static_cast<int>(max_tokens);
  c.num_experts = static_cast<int>(num_experts);
  c.zero_copy = zc;
  c.buffer = static_cast<int>(buffer);
  c.phases = static_cast<int>(phases);
  ctx.combine(c, current_stream(dev));
  return result;
}

}  // namespace ops
}  // namespace mpiep
