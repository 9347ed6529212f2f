// Arithmetic whose every operation is rounded on its own, on the host and on the device alike.
//
// The rule: a kernel line whose result is promised bitwise equal to PyTorch (tests compare with rtol=0, atol=0, or
// with a tolerance far below one rounding of the result) spells its arithmetic with these helpers, never with a
// bare `a + b * c`. nvcc contracts a bare `a + b * c` into one fused multiply-add (one rounding instead of two) by
// default, while PyTorch's eager `a + b * c` is two ops, each rounded; the __*_rn intrinsics are never contracted.
// On the host they are the plain operators, so the CPU kernels compute exactly what they computed before; a host
// compiler contracts too where the target has FMA (GCC's default on aarch64 or with -march=native), which
// -ffp-contract=off prevents (.ci/sanitize.sh passes it). Evidence that nvcc left no FMA on these lines:
// benchmarks/cuda_evidence.sh (benchmarks/results/cuda-evidence.txt); held by tests/test_cuda_sources.py.
#pragma once

#include <c10/macros/Macros.h>

namespace gradfd {
namespace rn {

C10_HOST_DEVICE inline double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

C10_HOST_DEVICE inline float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

}  // namespace rn

// A value moved along a line, as PyTorch's eager `(x.double() + delta * v.double()).to(dtype)` computes it on either
// device: the float64 product rounded, the float64 sum rounded, then one conversion to scalar_t. Half and BFloat16
// are constructed from float in c10, so for them the conversion goes float64 -> float32 -> scalar_t, as
// `Tensor.to(dtype)` does too. Used by perturb_rows_ (x + offset * step) and linear_update[_mse] (z + delta * x).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t moved_along(double x, double delta, double v) {
  return static_cast<scalar_t>(rn::add(x, rn::mul(delta, v)));
}

// One term of a perturbed squared-error sum, diff^2 - diff0_squared, with both operations rounded (float64).
C10_HOST_DEVICE inline double squared_minus(double diff, double diff0_squared) {
  return rn::sub(rn::mul(diff, diff), diff0_squared);
}

}  // namespace gradfd
