// CPU kernels for perturbed parameter rows and for turning perturbed losses into differences.
// Mirrors csrc/cuda/finite_diff_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../gradfd.h"
#include "../rounding.h"

namespace gradfd {
namespace {

void check_range_cpu(const char* name, const int64_t* v, int64_t count, int64_t n) {
  if (count > 0) {
    const auto [lo, hi] = std::minmax_element(v, v + count);
    check_range(name, *lo, *hi, n);
  }
}

at::Tensor perturb_rows_cpu(at::Tensor& rows, at::Tensor& columns, const at::Tensor& base, const at::Tensor& index,
                            const at::Tensor& step, at::ArrayRef<double> offsets) {
  check_perturb_rows_args(rows, columns, base, index, step, offsets, c10::DeviceType::CPU);
  const int64_t n = base.numel();
  const int64_t c = index.numel();
  const int64_t num_rows = static_cast<int64_t>(offsets.size()) * c;
  auto displacement = at::empty({static_cast<int64_t>(offsets.size()), c}, base.options().dtype(at::kDouble));
  if (num_rows == 0) {
    return displacement;
  }
  const int64_t* idx = index.data_ptr<int64_t>();
  int64_t* col = columns.data_ptr<int64_t>();
  check_range_cpu("index", idx, c, n);
  check_range_cpu("columns", col, num_rows, n);
  const auto layout = RowsLayout::of(rows);
  const double* h = step.data_ptr<double>();
  const std::vector<double> off(offsets.begin(), offsets.end());
  double* disp = displacement.data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::perturb_rows_", [&] {
    const scalar_t* src = base.data_ptr<scalar_t>();
    scalar_t* dst = rows.data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        // undo the previous perturbation of this row, then make the new one
        dst[element_offset(r, col[r], layout.inner, layout.stride)] = src[col[r]];
        const int64_t j = idx[r % c];
        const double x = static_cast<double>(src[j]);
        const scalar_t moved = moved_along<scalar_t>(x, off[r / c], h[r % c]);
        dst[element_offset(r, j, layout.inner, layout.stride)] = moved;
        col[r] = j;
        disp[r] = static_cast<double>(moved) - x;
      }
    });
  });
  return displacement;
}

at::Tensor central_differences_cpu(const at::Tensor& losses, const at::Tensor& displacement) {
  check_central_differences_args(losses, displacement, c10::DeviceType::CPU);
  const int64_t k = losses.size(0) / 2;
  const int64_t c = losses.size(1);
  auto out = at::empty({k, c}, losses.options().dtype(at::kDouble));
  if (out.numel() == 0) {
    return out;
  }
  const double* d = displacement.data_ptr<double>();
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, losses.scalar_type(),
                                  "gradfd::central_differences", [&] {
    const scalar_t* f = losses.data_ptr<scalar_t>();
    at::parallel_for(0, k * c, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t plus = 2 * (e / c) * c + e % c;  // row 2k, column c
        const int64_t minus = plus + c;                 // row 2k + 1
        o[e] = (static_cast<double>(f[plus]) - static_cast<double>(f[minus])) / (d[plus] - d[minus]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CPU, m) {
  m.impl("perturb_rows_", &perturb_rows_cpu);
  m.impl("central_differences", &central_differences_cpu);
}

}  // namespace gradfd
