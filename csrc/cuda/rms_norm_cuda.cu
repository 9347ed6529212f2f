// CUDA kernels of the RMSNorm example op (float16, bfloat16, float32, float64; float32 accumulation for the half
// types). Mirrors csrc/cpu/rms_norm_cpu.cpp: one block per row for y and grad_x, one thread per column for
// grad_weight (rows summed in order: deterministic). Sums within a row are tree-reduced, so they may differ from
// the CPU kernel's sequential sums by roundings of the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../gradfd.h"

namespace gradfd {
namespace {

constexpr int kThreads = 256;

// The sum of every thread's `v` in the block, returned to every thread. `shared` holds kThreads values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      shared[threadIdx.x] += shared[threadIdx.x + half];
    }
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void rms_norm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                scalar_t* __restrict__ y, acc_t* __restrict__ rstd, int64_t d, acc_t eps) {
  __shared__ acc_t shared[kThreads];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * d;
  acc_t squares = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const acc_t v = static_cast<acc_t>(x[o + j]);
    squares += v * v;
  }
  squares = block_sum(squares, shared);
  const acc_t s = acc_t(1) / sqrt(squares / static_cast<acc_t>(d) + eps);
  if (threadIdx.x == 0) {
    rstd[blockIdx.x] = s;
  }
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    y[o + j] = static_cast<scalar_t>(static_cast<acc_t>(x[o + j]) * s * static_cast<acc_t>(weight[j]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rms_norm_backward_x_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                           const scalar_t* __restrict__ weight, const acc_t* __restrict__ rstd,
                                           scalar_t* __restrict__ gx, int64_t d, bool planted_bug) {
  __shared__ acc_t shared[kThreads];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * d;
  const acc_t s = rstd[blockIdx.x];
  acc_t dot = 0;  // sum of g * weight * xhat (the planted bug: of g * xhat)
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const acc_t gj = static_cast<acc_t>(grad[o + j]) * (planted_bug ? acc_t(1) : static_cast<acc_t>(weight[j]));
    dot += gj * static_cast<acc_t>(x[o + j]) * s;
  }
  const acc_t mean = block_sum(dot, shared) / static_cast<acc_t>(d);
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const acc_t xhat = static_cast<acc_t>(x[o + j]) * s;
    gx[o + j] = static_cast<scalar_t>(s * (static_cast<acc_t>(grad[o + j]) * static_cast<acc_t>(weight[j]) -
                                           xhat * mean));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rms_norm_backward_weight_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                                const acc_t* __restrict__ rstd, scalar_t* __restrict__ gw,
                                                int64_t rows, int64_t d) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) {
    return;
  }
  acc_t sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    sum += static_cast<acc_t>(grad[r * d + j]) * static_cast<acc_t>(x[r * d + j]) * rstd[r];
  }
  gw[j] = static_cast<scalar_t>(sum);
}

int64_t row_count(const at::Tensor& x) { return x.numel() / x.size(-1); }

void check_grid(const char* op, int64_t rows) {
  TORCH_CHECK(rows <= 2147483647, op, ": at most 2^31 - 1 rows on CUDA, got ", rows);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("gradfd::rms_norm", x, weight, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1);
  const int64_t rows = row_count(x);
  check_grid("gradfd::rms_norm", rows);
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(rms_norm_stat_type(x.scalar_type())));
  if (rows == 0) {
    return {y, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gradfd::rms_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_norm_kernel<scalar_t, acc_t><<<rows, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), d,
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          bool planted_bug) {
  check_rms_norm_backward_args(grad, x, weight, rstd, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1);
  const int64_t rows = row_count(x);
  check_grid("gradfd::rms_norm_backward", rows);
  auto gx = at::empty_like(x);
  auto gw = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gradfd::rms_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto stream = at::cuda::getCurrentCUDAStream();
    if (rows > 0) {
      rms_norm_backward_x_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
          gx.data_ptr<scalar_t>(), d, planted_bug);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t blocks = (d + kThreads - 1) / kThreads;
    rms_norm_backward_weight_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), gw.data_ptr<scalar_t>(), rows, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace gradfd
