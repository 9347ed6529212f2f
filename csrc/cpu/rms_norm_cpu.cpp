// CPU kernels of the RMSNorm example op (float16, bfloat16, float32, float64; float32 accumulation for the half
// types, as half-precision kernels do). Mirrors csrc/cuda/rms_norm_cuda.cu. Per row of x (..., d):
//   rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd,  y = xhat * weight;
//   grad_x = rstd * (g * weight - xhat * mean(g * weight * xhat)),  grad_weight = sum over rows of g * xhat.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../gradfd.h"

namespace gradfd {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("gradfd::rms_norm", x, weight, c10::DeviceType::CPU);
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(rms_norm_stat_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gradfd::rms_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * d;
        acc_t squares = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          squares += v * v;
        }
        const acc_t s = acc_t(1) / std::sqrt(squares / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
        rp[r] = s;
        for (int64_t j = 0; j < d; ++j) {
          yp[r * d + j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * s * static_cast<acc_t>(wp[j]));
        }
      }
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         bool planted_bug) {
  check_rms_norm_backward_args(grad, x, weight, rstd, c10::DeviceType::CPU);
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  auto gx = at::empty_like(x);
  auto gw = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gradfd::rms_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gwp = gw.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * d;
        const acc_t s = rp[r];
        acc_t dot = 0;  // sum of g * weight * xhat (the planted bug: of g * xhat)
        for (int64_t j = 0; j < d; ++j) {
          const acc_t gj = static_cast<acc_t>(g[o + j]) * (planted_bug ? acc_t(1) : static_cast<acc_t>(wp[j]));
          dot += gj * static_cast<acc_t>(xp[o + j]) * s;
        }
        const acc_t mean = dot / static_cast<acc_t>(d);
        for (int64_t j = 0; j < d; ++j) {
          const acc_t xhat = static_cast<acc_t>(xp[o + j]) * s;
          gxp[o + j] = static_cast<scalar_t>(
              s * (static_cast<acc_t>(g[o + j]) * static_cast<acc_t>(wp[j]) - xhat * mean));
        }
      }
    });
    // grad_weight: one column at a time, rows in order (deterministic)
    at::parallel_for(0, d, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        acc_t sum = 0;
        for (int64_t r = 0; r < rows; ++r) {
          sum += static_cast<acc_t>(g[r * d + j]) * static_cast<acc_t>(xp[r * d + j]) * rp[r];
        }
        gwp[j] = static_cast<scalar_t>(sum);
      }
    });
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace gradfd
