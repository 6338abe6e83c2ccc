// FP8 (e4m3fn) casting with one float32 scale per 128 channels, bit-exact with the reference:
//   scale = max(amax, 1e-4) / 448          (IEEE float32 division, round to nearest even)
//   round_scale: scale = 2^ceil(log2(scale)), computed exactly on the bits (a scale with a
//                nonzero mantissa moves up to the next power of two)
//   q = e4m3(x / scale)                     (IEEE float32 division, then RNE saturating cast;
//                                            |x / scale| <= 448 here, so saturation never bites)
//   UE8M0 byte = the exponent bits of the (rounded) scale: (bits >> 23) & 0xFF
// Division, not multiplication by 1/scale: x * (1/scale) differs in the last bit for some x.
// Inf and NaN (docs/semantics.md, "FP8"): the block amax keeps a NaN (max_nan), so a block
// holding an Inf or NaN gets an Inf/NaN scale, which round_scale turns into +Inf; the whole
// block then dequantises to NaN, as on the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace mpiep {
namespace fp8 {

constexpr int kBlock = 128;  // channels per scale
constexpr float kMax = 448.0f;
constexpr float kMinAmax = 1e-4f;

// max that propagates NaN (fmaxf drops it): one instruction on sm_80+.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float scale_from_amax(float amax, bool round_scale) {
  float s = __fdiv_rn(max_nan(amax, kMinAmax), kMax);
  if (round_scale) {
    uint32_t b = __float_as_uint(s);
    if ((b & 0x7F800000u) == 0x7F800000u) {
      b = 0x7F800000u;  // Inf or NaN: +Inf (a NaN's mantissa must not carry into the sign)
    } else if (b & 0x7FFFFFu) {
      b = (b & 0xFF800000u) + 0x800000u;
    }
    s = __uint_as_float(b);
  }
  return s;
}

__device__ __forceinline__ uint32_t ue8m0(float scale) {
  return (__float_as_uint(scale) >> 23) & 0xFFu;
}

// Two floats to two e4m3 bytes (a in the low byte).
__device__ __forceinline__ uint16_t cast_pair(float a, float b) {
  return static_cast<uint16_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// 8 bf16 (one int4) -> 8 floats.
__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&f)[8]) {
  int4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

// 8 floats divided by scale -> 8 e4m3 bytes.
__device__ __forceinline__ uint2 quantize8(const float (&f)[8], float scale) {
  uint32_t w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint32_t lo = cast_pair(__fdiv_rn(f[4 * i], scale), __fdiv_rn(f[4 * i + 1], scale));
    uint32_t hi = cast_pair(__fdiv_rn(f[4 * i + 2], scale), __fdiv_rn(f[4 * i + 3], scale));
    w[i] = lo | (hi << 16);
  }
  return make_uint2(w[0], w[1]);
}

}  // namespace fp8
}  // namespace mpiep
