// Fused CPU kernels of the reference backend: the combine sums and the FP8 cast, each one
// pass over its rows. torch needs several passes with large temporaries for these (a widened
// copy of every BF16 operand, a float32 copy of x, its absolute values, a quotient), which
// made them the reference backend's largest cost beyond MPI (docs/PERFORMANCE.md).
//
// One thread: the reference backend runs one rank per core or more ranks than cores, so
// threads of our own would only preempt the other ranks. Bit patterns are those of the torch
// code these loops replace: the order of the float32 operations is the same, weighted terms
// are added with a fused multiply-add (as torch's vectorised addcmul_ does on AVX2 and
// AVX-512 CPUs), and setup.py compiles the op layer with -ffp-contract=off, so that nothing
// else becomes an fma. On x86 the loops are compiled for AVX2+FMA and for the baseline
// (whose std::fma is a library call, slow but exact), the cast also for AVX-512; the CPU
// picks one at run time.
#include "ops/reference_cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "mpiep/errors.h"

namespace mpiep {
namespace ops {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define MPIEP_X86_DISPATCH 1
#define MPIEP_AVX2_FMA __attribute__((target("avx2,fma")))
#define MPIEP_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512")))
#else
#define MPIEP_X86_DISPATCH 0
#endif
#define MPIEP_INLINE inline __attribute__((always_inline))

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "UE8M0 words are written byte by byte");

constexpr int64_t kBlock = 128;  // channels per FP8 scale
constexpr int64_t kTile = 256;   // channels summed at a time: the accumulator stays in L1
constexpr float kE4m3Max = 448.0f;
// Python's 1e-4 (a double) cast to float32, as torch's clamp(min=1e-4) does on a float tensor.
const float kAmaxFloor = static_cast<float>(1e-4);

[[noreturn]] void bad_arg(const std::string& msg) { throw Error(ErrorCode::kInvalidArgument, msg); }

MPIEP_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

MPIEP_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

MPIEP_INLINE float widen(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }
MPIEP_INLINE float widen(float f) { return f; }

// float32 -> BF16, round to nearest even. NaN stays NaN: quiet, with its sign and top payload
// bits (the numpy oracle's rule; torch's NaN bits differ between its own CPU paths).
MPIEP_INLINE uint16_t narrow(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// float32 -> e4m3fn byte, round to nearest even, saturating at +-448; NaN -> 0x7F with its
// sign. Below 2^-6, adding 2^14 lets the FPU round at the subnormal quantum 2^-9. Both paths
// are computed and picked with masks, not branches, so that the loop vectorises.
MPIEP_INLINE uint8_t e4m3(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t denorm_bias = 141u << 23;
  const uint32_t sub = bits_of(float_of(a) + float_of(denorm_bias)) - denorm_bias;
  const uint32_t normal =
      (a + (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < (121u << 23));
  const uint32_t is_big = 0u - static_cast<uint32_t>(a >= bits_of(kE4m3Max));
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a > 0x7F800000u);
  uint32_t r = (sub & is_sub) | (normal & ~is_sub);
  r = (0x7Eu & is_big) | (r & ~is_big);
  r = (0x7Fu & is_nan) | (r & ~is_nan);
  return static_cast<uint8_t>(r | sign);
}

// The smallest power of two >= scale, through the float32 bits; Inf and NaN become Inf.
MPIEP_INLINE float round_up_pow2(float scale) {
  const uint32_t u = bits_of(scale);
  uint32_t exponent = (u >> 23) & 0xFFu;
  exponent += ((u & 0x7FFFFFu) != 0 && exponent != 0xFFu) ? 1u : 0u;
  return float_of(exponent << 23);
}

// ---------------------------------------------------------------------------- combine sums
struct SumArgs {
  const uint16_t* rows;
  int64_t row_stride;
  const int64_t* idx;
  const float* weights;  // null: all ones
  int64_t width, tokens, hidden;
  const uint16_t* const* bias;
  const int64_t* bias_stride;
  int64_t num_bias;
  uint16_t* out;
  int64_t out_stride;
};

MPIEP_INLINE void sum_tile(const SumArgs& a, int64_t t, int64_t h0, int64_t n, float* acc) {
  const int64_t* ix = a.idx + t * a.width;
  const float* w = a.weights ? a.weights + t * a.width : nullptr;
  const uint16_t* r0 = a.rows + ix[0] * a.row_stride + h0;
  if (w) {
    const float w0 = w[0];
    for (int64_t h = 0; h < n; ++h) acc[h] = widen(r0[h]) * w0;
  } else {
    for (int64_t h = 0; h < n; ++h) acc[h] = widen(r0[h]);
  }
  for (int64_t j = 1; j < a.width; ++j) {
    const uint16_t* r = a.rows + ix[j] * a.row_stride + h0;
    if (w) {
      const float wj = w[j];
      for (int64_t h = 0; h < n; ++h) acc[h] = std::fma(widen(r[h]), wj, acc[h]);
    } else {
      for (int64_t h = 0; h < n; ++h) acc[h] = acc[h] + widen(r[h]);
    }
  }
  for (int64_t b = 0; b < a.num_bias; ++b) {
    const uint16_t* bb = a.bias[b] + t * a.bias_stride[b] + h0;
    for (int64_t h = 0; h < n; ++h) acc[h] = acc[h] + widen(bb[h]);
  }
  uint16_t* o = a.out + t * a.out_stride + h0;
  for (int64_t h = 0; h < n; ++h) o[h] = narrow(acc[h]);
}

MPIEP_INLINE void gather_sum_loop(const SumArgs& a) {
  alignas(64) float acc[kTile];
  for (int64_t t = 0; t < a.tokens; ++t)
    for (int64_t h0 = 0; h0 < a.hidden; h0 += kTile)
      sum_tile(a, t, h0, std::min(kTile, a.hidden - h0), acc);
}

void gather_sum_baseline(const SumArgs& a) { gather_sum_loop(a); }
#if MPIEP_X86_DISPATCH
MPIEP_AVX2_FMA void gather_sum_avx2(const SumArgs& a) { gather_sum_loop(a); }
#endif

// No rows to sum: out = 0, then each bias added in BF16 arithmetic.
void bias_only(const SumArgs& a) {
  for (int64_t t = 0; t < a.tokens; ++t) {
    uint16_t* o = a.out + t * a.out_stride;
    for (int64_t h = 0; h < a.hidden; ++h) {
      uint16_t v = 0;
      for (int64_t b = 0; b < a.num_bias; ++b)
        v = narrow(widen(v) + widen(a.bias[b][t * a.bias_stride[b] + h]));
      o[h] = v;
    }
  }
}

// ---------------------------------------------------------------------------- FP8 cast
struct CastArgs {
  const void* x;
  int64_t x_stride;  // elements
  int64_t tokens, hidden;
  bool round_scale, ue8m0;
  uint8_t* q;
  float* scales;       // [T, G] unless ue8m0
  uint8_t* exponents;  // [T, 4 * ceil(G/4)] bytes with ue8m0
};

template <class In>
MPIEP_INLINE void cast_loop(const CastArgs& a) {
  const int64_t groups = a.hidden / kBlock;
  const int64_t words = (groups + 3) / 4;
  for (int64_t t = 0; t < a.tokens; ++t) {
    const In* x = static_cast<const In*>(a.x) + t * a.x_stride;
    uint8_t* q = a.q + t * a.hidden;
    for (int64_t g = 0; g < groups; ++g) {
      alignas(64) float v[kBlock];
      // |x| compared as integers: for non-negative floats the bit patterns order like the
      // values, and every NaN is above Inf, so a NaN in the block gives a NaN amax (as
      // torch's amax does) and the max is an integer reduction, which vectorises.
      uint32_t amax_bits = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        v[i] = widen(x[g * kBlock + i]);
        const uint32_t m = bits_of(v[i]) & 0x7FFFFFFFu;
        amax_bits = m > amax_bits ? m : amax_bits;
      }
      float amax = float_of(amax_bits);
      if (amax_bits <= 0x7F800000u && amax < kAmaxFloor) amax = kAmaxFloor;
      float scale = amax / kE4m3Max;
      if (a.round_scale || a.ue8m0) scale = round_up_pow2(scale);
      for (int64_t i = 0; i < kBlock; ++i) q[g * kBlock + i] = e4m3(v[i] / scale);
      if (a.ue8m0)
        a.exponents[t * words * 4 + g] = static_cast<uint8_t>(bits_of(scale) >> 23);
      else
        a.scales[t * groups + g] = scale;
    }
    if (a.ue8m0)
      for (int64_t g = groups; g < words * 4; ++g) a.exponents[t * words * 4 + g] = 0;
  }
}

template <class In>
void cast_baseline(const CastArgs& a) {
  cast_loop<In>(a);
}
#if MPIEP_X86_DISPATCH
template <class In>
MPIEP_AVX2_FMA void cast_avx2(const CastArgs& a) {
  cast_loop<In>(a);
}
// The cast is compute-bound (a division and the e4m3 rounding per element): 512-bit vectors
// take 15% off it where the CPU has them. The sums are bound by memory: AVX2 is enough.
template <class In>
MPIEP_AVX512 void cast_avx512(const CastArgs& a) {
  cast_loop<In>(a);
}
#endif

bool use_avx512() {
#if MPIEP_X86_DISPATCH
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

bool use_avx2() {
#if MPIEP_X86_DISPATCH
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  if (t.device().type() != c10::DeviceType::CPU) bad_arg(std::string(name) + " must be on the CPU");
  if (t.scalar_type() != dtype)
    bad_arg(std::string(name) + " must have dtype " + c10::toString(dtype) + ", got " +
            c10::toString(t.scalar_type()));
  if (t.dim() != dim)
    bad_arg(std::string(name) + " must have " + std::to_string(dim) + " dimensions");
}

// Rows of a 2-D tensor may be strided (a field of packed rows); channels must be contiguous.
void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t hidden) {
  check_cpu(t, name, at::kBFloat16, 2);
  if (t.size(0) != rows || t.size(1) != hidden)
    bad_arg(std::string(name) + " must be [" + std::to_string(rows) + ", " +
            std::to_string(hidden) + "]");
  if (hidden > 1 && t.stride(1) != 1) bad_arg(std::string(name) + ": channels must be contiguous");
}

}  // namespace

void reference_gather_sum(const at::Tensor& rows, const at::Tensor& idx, const at::Tensor& out,
                          const std::optional<at::Tensor>& weights,
                          const std::vector<at::Tensor>& bias) {
  check_cpu(idx, "idx", at::kLong, 2);
  if (!idx.is_contiguous()) bad_arg("idx must be contiguous");
  const int64_t tokens = idx.size(0), width = idx.size(1);
  check_cpu(rows, "rows", at::kBFloat16, 2);
  const int64_t num_rows = rows.size(0), hidden = rows.size(1);
  check_rows(rows, "rows", num_rows, hidden);
  check_rows(out, "out", tokens, hidden);
  if (weights) {
    check_cpu(*weights, "weights", at::kFloat, 2);
    if (!weights->is_contiguous() || weights->size(0) != tokens || weights->size(1) != width)
      bad_arg("weights must be a contiguous float32 [T, J] tensor like idx");
  }
  std::vector<const uint16_t*> bias_ptr;
  std::vector<int64_t> bias_stride;
  for (const at::Tensor& b : bias) {
    check_rows(b, "bias", tokens, hidden);
    bias_ptr.push_back(static_cast<const uint16_t*>(b.data_ptr()));
    bias_stride.push_back(b.stride(0));
  }
  const int64_t* ix = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens * width; ++i)
    if (ix[i] < 0 || ix[i] >= num_rows)
      bad_arg("idx holds " + std::to_string(ix[i]) + ", outside [0, " + std::to_string(num_rows) +
              ")");
  const SumArgs a{static_cast<const uint16_t*>(rows.data_ptr()),
                  rows.stride(0),
                  ix,
                  weights ? weights->data_ptr<float>() : nullptr,
                  width,
                  tokens,
                  hidden,
                  bias_ptr.data(),
                  bias_stride.data(),
                  static_cast<int64_t>(bias_ptr.size()),
                  static_cast<uint16_t*>(out.data_ptr()),
                  out.stride(0)};
  if (tokens == 0 || hidden == 0) return;
  if (width == 0) return bias_only(a);
#if MPIEP_X86_DISPATCH
  if (use_avx2()) return gather_sum_avx2(a);
#endif
  gather_sum_baseline(a);
}

std::tuple<at::Tensor, at::Tensor> reference_cast_to_fp8(const at::Tensor& x, bool round_scale,
                                                         bool use_ue8m0) {
  if (x.device().type() != c10::DeviceType::CPU) bad_arg("x must be on the CPU");
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kFloat)
    bad_arg("x must be bfloat16 or float32");
  if (x.dim() != 2 || x.size(1) % kBlock) bad_arg("x must be [T, H] with H a multiple of 128");
  if (x.size(1) > 1 && x.stride(1) != 1) bad_arg("x: channels must be contiguous");
  const int64_t tokens = x.size(0), hidden = x.size(1), groups = hidden / kBlock;
  const auto on_cpu = at::TensorOptions().device(c10::DeviceType::CPU);
  at::Tensor q = at::empty({tokens, hidden}, on_cpu.dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = use_ue8m0 ? at::empty({tokens, (groups + 3) / 4}, on_cpu.dtype(at::kInt))
                                : at::empty({tokens, groups}, on_cpu.dtype(at::kFloat));
  const CastArgs a{x.data_ptr(),
                   tokens ? x.stride(0) : 0,
                   tokens,
                   hidden,
                   round_scale,
                   use_ue8m0,
                   static_cast<uint8_t*>(q.data_ptr()),
                   use_ue8m0 ? nullptr : scales.data_ptr<float>(),
                   use_ue8m0 ? static_cast<uint8_t*>(scales.data_ptr()) : nullptr};
  const bool bf16 = x.scalar_type() == at::kBFloat16;
#if MPIEP_X86_DISPATCH
  if (use_avx512()) {
    bf16 ? cast_avx512<uint16_t>(a) : cast_avx512<float>(a);
    return {q, scales};
  }
  if (use_avx2()) {
    bf16 ? cast_avx2<uint16_t>(a) : cast_avx2<float>(a);
    return {q, scales};
  }
#endif
  bf16 ? cast_baseline<uint16_t>(a) : cast_baseline<float>(a);
  return {q, scales};
}

}  // namespace ops
}  // namespace mpiep
