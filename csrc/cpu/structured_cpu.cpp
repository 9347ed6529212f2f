// CPU kernels of the structured engine: perturbed columns of a product linear in the perturbed parameter, and
// the perturbed squared-error sums that follow it. Mirrors csrc/cuda/structured_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../structured.h"

namespace gradfd {
namespace {

constexpr int64_t kTile = 32;  // coordinates whose accumulators stay in cache while the rows stream past

void check_range_cpu(const char* op, const char* name, const at::Tensor& v, int64_t n) {
  if (v.numel() > 0) {
    const int64_t* p = v.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(p, p + v.numel());
    check_index_range(op, name, *lo, *hi, n);
  }
}

at::Tensor linear_update_cpu(const at::Tensor& base, const at::Tensor& features, const at::Tensor& column,
                             const at::Tensor& feature, const at::Tensor& delta) {
  check_linear_update_args(base, features, column, feature, delta, c10::DeviceType::CPU);
  const int64_t n = base.size(0), k = base.size(1), d = features.size(1), c = column.numel();
  auto out = at::empty({c, n}, base.options());
  if (out.numel() == 0) {
    return out;
  }
  check_range_cpu("gradfd::linear_update: ", "column", column, k);
  check_range_cpu("gradfd::linear_update: ", "feature", feature, d);
  const int64_t* col = column.data_ptr<int64_t>();
  const int64_t* fi = feature.data_ptr<int64_t>();
  const double* dl = delta.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::linear_update", [&] {
    const scalar_t* z = base.data_ptr<scalar_t>();
    const scalar_t* x = features.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, c, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        for (int64_t r = 0; r < n; ++r) {
          o[e * n + r] = moved_along<scalar_t>(static_cast<double>(z[r * k + col[e]]), dl[e],
                                               static_cast<double>(x[r * d + fi[e]]));
        }
      }
    });
  });
  return out;
}

at::Tensor linear_update_mse_cpu(const at::Tensor& base, const at::Tensor& features, const at::Tensor& target,
                                 const at::Tensor& column, const at::Tensor& feature, const at::Tensor& delta,
                                 int64_t activation) {
  check_linear_update_mse_args(base, features, target, column, feature, delta, activation, c10::DeviceType::CPU);
  const int64_t n = base.size(0), k = base.size(1), d = features.size(1), c = column.numel(), s = delta.size(0);
  auto out = at::zeros({s, c}, base.options().dtype(at::kDouble));
  if (c == 0) {
    return out;
  }
  check_range_cpu("gradfd::linear_update_mse: ", "column", column, k);
  check_range_cpu("gradfd::linear_update_mse: ", "feature", feature, d);
  const int64_t* col = column.data_ptr<int64_t>();
  const int64_t* fi = feature.data_ptr<int64_t>();
  const double* dl = delta.data_ptr<double>();
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::linear_update_mse", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* z = base.data_ptr<scalar_t>();
    const scalar_t* x = features.data_ptr<scalar_t>();
    const scalar_t* y = target.data_ptr<scalar_t>();
    at::parallel_for(0, c, kTile, [&](int64_t begin, int64_t end) {
      double acc[kMaxNodes * kTile];
      for (int64_t t0 = begin; t0 < end; t0 += kTile) {
        const int64_t tiles = std::min(kTile, end - t0);
        std::fill(acc, acc + s * kTile, 0.0);
        // rows outer, coordinates inner: consecutive coordinates read neighbouring features of the same row
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t e = t0 + t;
            const double zr = static_cast<double>(z[r * k + col[e]]);
            const double xr = static_cast<double>(x[r * d + fi[e]]);
            const double yr = static_cast<double>(y[r * k + col[e]]);
            // the element's squared error at the base point, subtracted term by term (the changed terms only)
            const double d0 =
                rn::sub(static_cast<double>(activate<scalar_t, opmath_t>(z[r * k + col[e]], activation)), yr);
            const double e0 = rn::mul(d0, d0);
            for (int64_t q = 0; q < s; ++q) {
              const scalar_t moved = moved_along<scalar_t>(zr, dl[q * c + e], xr);
              const double diff = rn::sub(static_cast<double>(activate<scalar_t, opmath_t>(moved, activation)), yr);
              acc[q * kTile + t] = rn::add(acc[q * kTile + t], squared_minus(diff, e0));
            }
          }
        }
        for (int64_t q = 0; q < s; ++q) {
          for (int64_t t = 0; t < tiles; ++t) {
            o[q * c + t0 + t] = acc[q * kTile + t];
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CPU, m) {
  m.impl("linear_update", &linear_update_cpu);
  m.impl("linear_update_mse", &linear_update_mse_cpu);
}

}  // namespace gradfd
