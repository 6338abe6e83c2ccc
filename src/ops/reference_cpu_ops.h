// Fused CPU kernels of the reference backend (mpiep._ops): single-pass loops for what torch
// does in several passes with large temporaries. Results are those of the pure-torch code
// they replace (python/mpiep/backends/reference/reduce.py, python/mpiep/fp8.py); the Python
// side picks one or the other in one place (backends/reference/fused.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mpiep {
namespace ops {

// out[t] = bf16(sum_j w[t, j] * rows[idx[t, j]] + sum_b bias_b[t]), in float32: the first
// slot's row (times its weight), then slots j = 1, 2, ... in order, each weighted term added
// with one rounding (fma), then the biases in order; cast to BF16 once (round to nearest
// even). rows: BF16 [N, H] (rows may be strided); idx: int64 [T, J] in [0, N); weights:
// float32 [T, J] or none (all ones); bias: BF16 [T, H] each; out: BF16 [T, H]. With T or J
// zero, out = the biases added one by one in BF16 (what torch's out.zero_(); out.add_(b)
// gives).
void reference_gather_sum(const at::Tensor& rows, const at::Tensor& idx, const at::Tensor& out,
                          const std::optional<at::Tensor>& weights,
                          const std::vector<at::Tensor>& bias);

// Per token, per 128 channels: scale = max(amax, 1e-4) / 448 (float32), rounded up to a power
// of two with round_scale or use_ue8m0; q = e4m3fn(x / scale), round to nearest even,
// saturating at 448. x: BF16 or float32 [T, H], H % 128 == 0. Returns (q float8_e4m3fn
// [T, H], scales float32 [T, H/128] or, with use_ue8m0, int32 [T, ceil(H/512)] of UE8M0
// exponent bytes, little-endian, 0 past the last block).
std::tuple<at::Tensor, at::Tensor> reference_cast_to_fp8(const at::Tensor& x, bool round_scale,
                                                         bool use_ue8m0);

}  // namespace ops
}  // namespace mpiep
