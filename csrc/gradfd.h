// Shared declarations and argument checks for gradfd's kernels.
//
// Every op is declared once in csrc/ops.cpp (TORCH_LIBRARY(gradfd, m)); each backend file registers its
// implementations with TORCH_LIBRARY_IMPL(gradfd, CPU|CUDA, m). The checks below are shared by the CPU and
// CUDA implementations so that both say the same thing about bad input. Every message names the op and
// says what it got.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <math.h>
#include <utility>

namespace gradfd {

inline void check_perturb_rows_args(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& base,
                                    const at::Tensor& index, const at::Tensor& step, at::ArrayRef<double> offsets,
                                    c10::DeviceType device) {
  constexpr const char* op = "gradfd::perturb_rows_: ";
  TORCH_CHECK(base.device().type() == device, op, "base must be on ", device, ", got ", base.device());
  TORCH_CHECK(base.dim() == 1, op, "base must be 1-D (the flattened parameter), got shape ", base.sizes());
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), op, "base must be floating point, got ", base.scalar_type());
  TORCH_CHECK(base.is_contiguous(), op, "base must be contiguous, got strides ", base.strides());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"rows", rows}, {"columns", columns},
                                {"index", index}, {"step", step}}) {
    TORCH_CHECK(t.device() == base.device(), op, name, " must be on ", base.device(), " like base, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
  }
  TORCH_CHECK(!offsets.empty(), op, "offsets must not be empty");
  for (double o : offsets) {
    TORCH_CHECK(std::isfinite(o), op, "offsets must be finite, got ", offsets);
  }
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op,
              "index must be a 1-D int64 tensor, got shape ", index.sizes(), " and dtype ", index.scalar_type());
  TORCH_CHECK(step.dim() == 1 && step.scalar_type() == at::kDouble && step.numel() == index.numel(), op,
              "step must be a 1-D float64 tensor with one entry per index (", index.numel(), "), got shape ",
              step.sizes(), " and dtype ", step.scalar_type());
  const int64_t needed = static_cast<int64_t>(offsets.size()) * index.numel();
  const bool flat = rows.dim() == 2 && rows.size(1) == base.numel();
  const bool split = rows.dim() == 3 && rows.size(0) * rows.size(2) == base.numel();
  TORCH_CHECK((flat || split) && rows.size(rows.dim() - 2) >= needed, op, "rows must have shape (R, ",
              base.numel(), ") or (N / inner, R, inner) with R >= len(offsets) * len(index) = ", needed, ", got ",
              rows.sizes());
  TORCH_CHECK(rows.scalar_type() == base.scalar_type(), op, "rows must have base's dtype ", base.scalar_type(),
              ", got ", rows.scalar_type());
  const int64_t num_rows = rows.size(rows.dim() - 2);
  TORCH_CHECK(columns.dim() == 1 && columns.scalar_type() == at::kLong && columns.numel() == num_rows, op,
              "columns must be a 1-D int64 tensor with one entry per row (", num_rows, "), got shape ",
              columns.sizes(), " and dtype ", columns.scalar_type());
}

// Where element i of row r lives in a rows buffer: (R, N) is the plain layout (inner = N); (N / inner, R, inner)
// puts the batch between the parameter's leading dimensions and its last one, so that a batch of matrices W
// used as X @ W is one contiguous (d, R * k) matrix.
struct RowsLayout {
  int64_t inner;  // elements per contiguous run of one row
  int64_t stride;  // distance between consecutive runs of one row: R * inner (or N for the plain layout)
  static RowsLayout of(const at::Tensor& rows) {
    if (rows.dim() == 2) return {rows.size(1), rows.size(1)};
    return {rows.size(2), rows.size(1) * rows.size(2)};
  }
};

inline C10_HOST_DEVICE int64_t element_offset(int64_t r, int64_t i, int64_t inner, int64_t stride) {
  return (i / inner) * stride + r * inner + i % inner;
}

// Bounds need the values; the caller passes min/max so that CUDA can fetch them with one copy each.
inline void check_range(const char* name, int64_t lo, int64_t hi, int64_t n) {
  TORCH_CHECK(lo >= 0 && hi < n, "gradfd::perturb_rows_: ", name, " values must lie in [0, ", n, "), got min ",
              lo, " and max ", hi);
}

inline void check_central_differences_args(const at::Tensor& losses, const at::Tensor& displacement,
                                           c10::DeviceType device) {
  TORCH_CHECK(losses.device().type() == device, "gradfd::central_differences: losses must be on ", device,
              ", got ", losses.device());
  TORCH_CHECK(displacement.device() == losses.device(), "gradfd::central_differences: displacement must be on ",
              losses.device(), ", got ", displacement.device());
  TORCH_CHECK(losses.dim() == 2 && losses.size(0) % 2 == 0,
              "gradfd::central_differences: losses must have shape (2K, C) with rows (+k, -k) in pairs, got ",
              losses.sizes());
  TORCH_CHECK(at::isFloatingType(losses.scalar_type()),
              "gradfd::central_differences: losses must be floating point, got ", losses.scalar_type());
  TORCH_CHECK(losses.is_contiguous(), "gradfd::central_differences: losses must be contiguous, got strides ",
              losses.strides());
  TORCH_CHECK(displacement.sizes() == losses.sizes(),
              "gradfd::central_differences: displacement must have the shape of losses ", losses.sizes(),
              ", got ", displacement.sizes());
  TORCH_CHECK(displacement.scalar_type() == at::kDouble && displacement.is_contiguous(),
              "gradfd::central_differences: displacement must be contiguous float64, got ",
              displacement.scalar_type(), " with strides ", displacement.strides());
}

// ---- the fused bias + GELU example op (float32 only) ----------------------------------------------------------

// Exact GELU, z * Phi(z), and its derivative Phi(z) + z * phi(z), evaluated in float (the op is float32-only).
C10_HOST_DEVICE inline float gelu(float z) { return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f)); }

C10_HOST_DEVICE inline float gelu_derivative(float z) {
  const float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * z * z);
  return cdf + z * pdf;
}

inline void check_bias_gelu_args(const char* op, const at::Tensor& x, const at::Tensor& bias,
                                 c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", device, ", got ", x.device());
  TORCH_CHECK(bias.device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ", bias.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32 (this kernel is float32-only), got ",
              x.scalar_type());
  TORCH_CHECK(bias.scalar_type() == at::kFloat, op, ": bias must be float32 (this kernel is float32-only), got ",
              bias.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && bias.dim() == 1 && x.size(-1) == bias.size(0), op,
              ": bias must be 1-D with x's last dimension, got x of shape ", x.sizes(), " and bias of shape ",
              bias.sizes());
  TORCH_CHECK(x.is_contiguous() && bias.is_contiguous(), op, ": x and bias must be contiguous, got strides ",
              x.strides(), " and ", bias.strides());
}

// ---- the RMSNorm example op (float16, bfloat16, float32, float64) --------------------------------------------

// The shared argument checks of rms_norm and rms_norm_backward: x (..., d) and weight (d,) contiguous, of one
// floating dtype, on `device`; for the backward, grad like x and rstd float32 (float64 for float64) of x's rows.
inline void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", device, ", got ", x.device());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device(), " like x, got ",
              weight.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op,
              ": x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && weight.dim() == 1 && weight.size(0) == x.size(-1), op,
              ": weight must be 1-D with x's last dimension (> 0), got x of shape ", x.sizes(),
              " and weight of shape ", weight.sizes());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), op, ": x and weight must be contiguous, got strides ",
              x.strides(), " and ", weight.strides());
}

inline at::ScalarType rms_norm_stat_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rms_norm_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rstd, c10::DeviceType device) {
  constexpr const char* op = "gradfd::rms_norm_backward";
  check_rms_norm_args(op, x, weight, device);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous() &&
                  grad.device() == x.device(),
              op, ": grad must be a contiguous ", x.scalar_type(), " tensor of x's shape ", x.sizes(), " on ",
              x.device(), ", got ", grad.scalar_type(), " of shape ", grad.sizes(), " on ", grad.device());
  TORCH_CHECK(rstd.numel() * x.size(-1) == x.numel() && rstd.scalar_type() == rms_norm_stat_type(x.scalar_type()) &&
                  rstd.is_contiguous() && rstd.device() == x.device(),
              op, ": rstd must be rms_norm's contiguous ", rms_norm_stat_type(x.scalar_type()), " output of ",
              x.numel() / x.size(-1), " rows on ", x.device(), ", got ", rstd.scalar_type(), " of shape ",
              rstd.sizes(), " on ", rstd.device());
}

}  // namespace gradfd
