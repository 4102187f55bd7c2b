// Scalar float <-> float16 / bfloat16 conversions shared by the CPU kernels: round to nearest even like torch, NaN
// stays NaN (bfloat16 NaN -> 0x7FC0), branch-free so that loops using them stay vectorisable. Also the kernels'
// 16-bit storage types and their conversions to and from the compute type.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastattn {
namespace cpu {
namespace bits {

inline float float_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline uint32_t select(bool c, uint32_t a, uint32_t b) {  // c ? a : b without a branch
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

// IEEE half <-> float by the bit tricks of the FP16 library (exact / round-to-nearest-even, NaN -> NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormal = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_from_bits(sign | select(two_w < (1u << 27), bits_of(denormal), bits_of(normal)));
}
inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = float_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}
inline float bf16_to_float(uint16_t h) { return float_from_bits(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {  // NaN -> 0x7FC0
  const uint32_t u = bits_of(f);
  return uint16_t(select(f != f, 0x7FC0u, (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16));
}

}  // namespace bits

// The floating dtypes of a kernel's tensors (torch-free headers pass them as this).
enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Storage types of float16 / bfloat16 elements (their bits). to_acc widens a stored value to the compute type
// (float, or double for float64); from_acc<T> rounds a computed value to nearest even into storage type T.
struct Half { uint16_t bits; };
struct BF16 { uint16_t bits; };

#define FA_CONVERT inline __attribute__((always_inline))
FA_CONVERT float to_acc(float v) { return v; }
FA_CONVERT double to_acc(double v) { return v; }
FA_CONVERT float to_acc(Half v) { return bits::half_to_float(v.bits); }
FA_CONVERT float to_acc(BF16 v) { return bits::bf16_to_float(v.bits); }

template <class T, class Acc>
FA_CONVERT T from_acc(Acc v) {
  if constexpr (std::is_same_v<T, Half>) return Half{bits::float_to_half(float(v))};
  else if constexpr (std::is_same_v<T, BF16>) return BF16{bits::float_to_bf16(float(v))};
  else return static_cast<T>(v);
}
#undef FA_CONVERT

}  // namespace cpu
}  // namespace fastattn
