// CUDA kernels for perturbed parameter rows and turning perturbed losses into differences.
// Mirrors csrc/cpu/finite_diff_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "../gradfd.h"
#include "../rounding.h"

namespace gradfd {
namespace {

constexpr int kThreads = 256;

// One thread per row: O(rows) work, the rest of each row already equals base.
template <typename scalar_t>
__global__ void perturb_rows_kernel(scalar_t* __restrict__ rows, int64_t* __restrict__ columns,
                                    const scalar_t* __restrict__ base, const int64_t* __restrict__ index,
                                    const double* __restrict__ step, const double* __restrict__ offsets,
                                    double* __restrict__ displacement, int64_t c, int64_t num_rows, int64_t inner,
                                    int64_t stride) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < num_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    rows[element_offset(r, columns[r], inner, stride)] = base[columns[r]];
    const int64_t j = index[r % c];
    const double x = static_cast<double>(base[j]);
    const scalar_t moved = moved_along<scalar_t>(x, offsets[r / c], step[r % c]);  // bitwise: see rounding.h
    rows[element_offset(r, j, inner, stride)] = moved;
    columns[r] = j;
    displacement[r] = static_cast<double>(moved) - x;
  }
}

template <typename scalar_t>
__global__ void central_differences_kernel(const scalar_t* __restrict__ losses,
                                           const double* __restrict__ displacement, double* __restrict__ out,
                                           int64_t k, int64_t c) {
  const int64_t total = k * c;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plus = 2 * (e / c) * c + e % c;
    const int64_t minus = plus + c;
    out[e] = (static_cast<double>(losses[plus]) - static_cast<double>(losses[minus])) /
             (displacement[plus] - displacement[minus]);
  }
}

void check_range_cuda(const char* name, const at::Tensor& v, int64_t count, int64_t n) {
  if (count > 0) {
    const auto bounds = at::aminmax(v.narrow(0, 0, count));
    check_range(name, std::get<0>(bounds).item<int64_t>(), std::get<1>(bounds).item<int64_t>(), n);
  }
}

at::Tensor perturb_rows_cuda(at::Tensor& rows, at::Tensor& columns, const at::Tensor& base, const at::Tensor& index,
                             const at::Tensor& step, at::ArrayRef<double> offsets) {
  check_perturb_rows_args(rows, columns, base, index, step, offsets, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t n = base.numel();
  const int64_t c = index.numel();
  const int64_t num_rows = static_cast<int64_t>(offsets.size()) * c;
  auto displacement = at::empty({static_cast<int64_t>(offsets.size()), c}, base.options().dtype(at::kDouble));
  if (num_rows == 0) {
    return displacement;
  }
  check_range_cuda("index", index, c, n);
  check_range_cuda("columns", columns, num_rows, n);
  const auto off = at::tensor(std::vector<double>(offsets.begin(), offsets.end()),
                              at::TensorOptions().dtype(at::kDouble))
                       .to(base.device(), /*non_blocking=*/false);
  const auto layout = RowsLayout::of(rows);
  const int blocks = static_cast<int>(std::min<int64_t>((num_rows + kThreads - 1) / kThreads, 4096));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::perturb_rows_", [&] {
    perturb_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        rows.data_ptr<scalar_t>(), columns.data_ptr<int64_t>(), base.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        step.data_ptr<double>(), off.data_ptr<double>(), displacement.data_ptr<double>(), c, num_rows,
        layout.inner, layout.stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return displacement;
}

at::Tensor central_differences_cuda(const at::Tensor& losses, const at::Tensor& displacement) {
  check_central_differences_args(losses, displacement, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(losses.device());
  const int64_t k = losses.size(0) / 2;
  const int64_t c = losses.size(1);
  auto out = at::empty({k, c}, losses.options().dtype(at::kDouble));
  if (out.numel() == 0) {
    return out;
  }
  const int blocks = static_cast<int>(std::min<int64_t>((k * c + kThreads - 1) / kThreads, 4096));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, losses.scalar_type(),
                                  "gradfd::central_differences", [&] {
    central_differences_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        losses.data_ptr<scalar_t>(), displacement.data_ptr<double>(), out.data_ptr<double>(), k, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CUDA, m) {
  m.impl("perturb_rows_", &perturb_rows_cuda);
  m.impl("central_differences", &central_differences_cuda);
}

}  // namespace gradfd
