// A vectorisable exp for the CPU kernels (csrc/cpu/structured_cpu.cpp), beside a plain one for double, so that a
// softmax over a short class dim runs at the speed of PyTorch's own vectorised kernels. Header-only, so that
// csrc/tests/sanitize_main.cpp can measure its accuracy.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gradfd {

// exp(v) for v <= 0 (or NaN) in float, written without calls, branches or float comparisons so that loops over it
// vectorise (libm's expf does not, and a float select does not under the default -ftrapping-math): v = n ln2 + r
// with |r| <= ln2/2 (Cody and Waite: ln2 split in two so that n * kLn2Hi is exact), exp(r) by its degree-7 Taylor
// polynomial (truncated below 0.1 ulp), and 2^n written into the exponent bits. Within 1.5 ulp of exp
// (csrc/tests/sanitize_main.cpp measures it against float64 over the floats in [-87, 0] along a stride). Below -87 it
// gives 0 (selected on the bits: a non-positive float's bits grow as it falls): exp(v) < 2^-125 there, which cannot
// change a softmax sum of at least 1 rounded to float. NaN (of either sign) gives NaN.
inline float exp_nonpositive(float v) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: v * log2e + kShifter holds round(v * log2e) in its low bits
  constexpr uint32_t kShifterBits = 0x4B400000u;
  constexpr uint32_t kFloorBits = 0xC2AE0000u;  // -87.0f
  constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kInfBits = 0x7F800000u;  // |bits| above infinity's: a NaN
  const float shifted = v * kLog2e + kShifter;
  const float n = shifted - kShifter;
  const float r = (v - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const uint32_t scale_bits = (bits - kShifterBits + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const float value = p * scale;
  uint32_t v_bits, out_bits;
  std::memcpy(&v_bits, &v, sizeof v_bits);
  std::memcpy(&out_bits, &value, sizeof out_bits);
  const uint32_t keep =
      static_cast<uint32_t>(v_bits <= kFloorBits) | static_cast<uint32_t>((v_bits & kAbsMask) > kInfBits);
  out_bits &= 0u - keep;
  float out;
  std::memcpy(&out, &out_bits, sizeof out);
  return out;
}

inline double exp_nonpositive(double v) { return std::exp(v); }

}  // namespace gradfd
