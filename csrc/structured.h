// Shared declarations and argument checks for the structured engine's kernels (csrc/structured.cpp declares the
// ops; csrc/cpu/structured_cpu.cpp and csrc/cuda/structured_cuda.cu implement them).
//
// The kernels evaluate perturbed outputs of a product that is linear in the perturbed parameter: perturbing one
// parameter entry by delta moves one column of the product's output by delta times one column of a fixed
// feature matrix ("mm is linear in each operand"). They never use a derivative of anything.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>
#include <utility>

#include "rounding.h"

namespace gradfd {

// The elementwise activation applied to the perturbed column before the squared error (linear_update_mse).
enum Activation : int64_t { kIdentity = 0, kTanh = 1, kRelu = 2, kSigmoid = 3 };
constexpr int64_t kMaxNodes = 16;  // stencil nodes per coordinate handled in registers by linear_update_mse

C10_HOST_DEVICE inline float tanh_of(float v) { return ::tanhf(v); }
C10_HOST_DEVICE inline double tanh_of(double v) { return ::tanh(v); }
C10_HOST_DEVICE inline float exp_of(float v) { return ::expf(v); }
C10_HOST_DEVICE inline double exp_of(double v) { return ::exp(v); }

// The activation evaluated in the op-math type of scalar_t and rounded to scalar_t, as an elementwise op would.
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline scalar_t activate(scalar_t z, int64_t activation) {
  const opmath_t v = static_cast<opmath_t>(z);
  switch (activation) {
    case kTanh:
      return static_cast<scalar_t>(tanh_of(v));
    case kRelu:
      return static_cast<scalar_t>((v > opmath_t(0) || v != v) ? v : opmath_t(0));  // NaN propagates, as in relu
    case kSigmoid:
      // rn::add: nvcc would otherwise fuse exp's final scaling multiply with this add (benchmarks/cuda_evidence.sh)
      return static_cast<scalar_t>(opmath_t(1) / rn::add(opmath_t(1), exp_of(-v)));
    default:
      return z;
  }
}

// base (n, K) and features (n, D): the product's output columns and the feature columns, same dtype, contiguous;
// column (C,) and feature (C,): int64 indices of the moved output column and of the feature column it moves along.
inline void check_linear_update_common(const char* op, const at::Tensor& base, const at::Tensor& features,
                                       const at::Tensor& column, const at::Tensor& feature,
                                       c10::DeviceType device) {
  TORCH_CHECK(base.device().type() == device, op, "base must be on ", device, ", got ", base.device());
  TORCH_CHECK(base.dim() == 2, op, "base must be 2-D (n, K): the product's output columns, got shape ",
              base.sizes());
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), op, "base must be floating point, got ", base.scalar_type());
  TORCH_CHECK(features.dim() == 2 && features.size(0) == base.size(0), op,
              "features must be 2-D (n, D) with n = ", base.size(0), " rows like base, got shape ",
              features.sizes());
  TORCH_CHECK(features.scalar_type() == base.scalar_type(), op, "features must have base's dtype ",
              base.scalar_type(), ", got ", features.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"base", base}, {"features", features},
                                {"column", column}, {"feature", feature}}) {
    TORCH_CHECK(t.device() == base.device(), op, name, " must be on ", base.device(), " like base, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
  }
  TORCH_CHECK(column.dim() == 1 && column.scalar_type() == at::kLong, op,
              "column must be a 1-D int64 tensor, got shape ", column.sizes(), " and dtype ", column.scalar_type());
  TORCH_CHECK(feature.dim() == 1 && feature.scalar_type() == at::kLong && feature.numel() == column.numel(), op,
              "feature must be a 1-D int64 tensor with one entry per column entry (", column.numel(),
              "), got shape ", feature.sizes(), " and dtype ", feature.scalar_type());
}

inline void check_index_range(const char* op, const char* name, int64_t lo, int64_t hi, int64_t n) {
  TORCH_CHECK(lo >= 0 && hi < n, op, name, " values must lie in [0, ", n, "), got min ", lo, " and max ", hi);
}

inline void check_linear_update_args(const at::Tensor& base, const at::Tensor& features, const at::Tensor& column,
                                     const at::Tensor& feature, const at::Tensor& delta, c10::DeviceType device) {
  constexpr const char* op = "gradfd::linear_update: ";
  check_linear_update_common(op, base, features, column, feature, device);
  TORCH_CHECK(delta.device() == base.device(), op, "delta must be on ", base.device(), ", got ", delta.device());
  TORCH_CHECK(delta.dim() == 1 && delta.scalar_type() == at::kDouble && delta.numel() == column.numel() &&
                  delta.is_contiguous(),
              op, "delta must be a contiguous 1-D float64 tensor with one entry per column entry (", column.numel(),
              "), got shape ", delta.sizes(), " and dtype ", delta.scalar_type());
}

inline void check_linear_update_mse_args(const at::Tensor& base, const at::Tensor& features, const at::Tensor& target,
                                         const at::Tensor& column, const at::Tensor& feature, const at::Tensor& delta,
                                         int64_t activation, c10::DeviceType device) {
  constexpr const char* op = "gradfd::linear_update_mse: ";
  check_linear_update_common(op, base, features, column, feature, device);
  TORCH_CHECK(target.sizes() == base.sizes() && target.scalar_type() == base.scalar_type(), op,
              "target must have base's shape ", base.sizes(), " and dtype ", base.scalar_type(), ", got shape ",
              target.sizes(), " and dtype ", target.scalar_type());
  TORCH_CHECK(target.device() == base.device() && target.is_contiguous(), op, "target must be contiguous on ",
              base.device(), ", got ", target.device(), " with strides ", target.strides());
  TORCH_CHECK(delta.device() == base.device(), op, "delta must be on ", base.device(), ", got ", delta.device());
  TORCH_CHECK(delta.dim() == 2 && delta.scalar_type() == at::kDouble && delta.size(1) == column.numel() &&
                  delta.is_contiguous(),
              op, "delta must be a contiguous (S, C) float64 tensor with C = ", column.numel(),
              " (one column per coordinate), got shape ", delta.sizes(), " and dtype ", delta.scalar_type());
  TORCH_CHECK(delta.size(0) >= 1 && delta.size(0) <= kMaxNodes, op, "delta must have between 1 and ", kMaxNodes,
              " rows (stencil nodes), got ", delta.size(0));
  TORCH_CHECK(activation >= kIdentity && activation <= kSigmoid, op,
              "activation must be 0 (identity), 1 (tanh), 2 (relu) or 3 (sigmoid), got ", activation);
}

// base (n, K), bias (K,) or undefined, rows (B, n) and cols (B, K) float64, target (n,) int64, weight (K,) or
// undefined: the arguments of outer_update_nll (csrc/structured.cpp). Target values are checked by the backends.
inline void check_outer_update_nll_args(const at::Tensor& base, const std::optional<at::Tensor>& bias,
                                        const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, c10::DeviceType device) {
  constexpr const char* op = "gradfd::outer_update_nll: ";
  TORCH_CHECK(base.device().type() == device, op, "base must be on ", device, ", got ", base.device());
  TORCH_CHECK(base.dim() == 2 && base.size(1) >= 1, op,
              "base must be 2-D (n, K) with K >= 1 classes: the product's output, got shape ", base.sizes());
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), op, "base must be floating point, got ", base.scalar_type());
  const int64_t n = base.size(0), k = base.size(1);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == n && rows.scalar_type() == at::kDouble, op,
              "rows must be a (B, n) float64 tensor with n = ", n, ", got shape ", rows.sizes(), " and dtype ",
              rows.scalar_type());
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == rows.size(0) && cols.size(1) == k &&
                  cols.scalar_type() == at::kDouble,
              op, "cols must be a (B, K) float64 tensor with B = ", rows.size(0), " and K = ", k, ", got shape ",
              cols.sizes(), " and dtype ", cols.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n && target.scalar_type() == at::kLong, op,
              "target must be a 1-D int64 tensor of n = ", n, " rows' classes, got shape ", target.sizes(),
              " and dtype ", target.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>&>{"bias", bias},
                                {"weight", weight}}) {
    if (t.has_value() && t->defined()) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == k && t->scalar_type() == base.scalar_type(), op, name,
                  " must be a 1-D tensor of K = ", k, " entries in base's dtype ", base.scalar_type(),
                  ", got shape ", t->sizes(), " and dtype ", t->scalar_type());
      TORCH_CHECK(t->device() == base.device() && t->is_contiguous(), op, name, " must be contiguous on ",
                  base.device(), ", got ", t->device(), " with strides ", t->strides());
    }
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"base", base}, {"rows", rows},
                                {"cols", cols}, {"target", target}}) {
    TORCH_CHECK(t.device() == base.device(), op, name, " must be on ", base.device(), " like base, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
  }
}

// One row of a cross-entropy: a class index in [0, K), or ignore_index.
inline void check_nll_target(const char* op, int64_t t, int64_t k, int64_t ignore_index) {
  TORCH_CHECK(t == ignore_index || (t >= 0 && t < k), op, "target values must lie in [0, ", k,
              ") or equal ignore_index = ", ignore_index, ", got ", t);
}


}  // namespace gradfd
