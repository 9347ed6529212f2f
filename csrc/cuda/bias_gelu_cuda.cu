// CUDA kernels of the fused bias + GELU example op (float32 only). Mirrors csrc/cpu/bias_gelu_cpu.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "../gradfd.h"

namespace gradfd {
namespace {

constexpr int kThreads = 256;

__global__ void bias_gelu_kernel(const float* __restrict__ x, const float* __restrict__ bias, float* __restrict__ y,
                                 int64_t n, int64_t d) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = gelu(x[i] + bias[i % d]);
  }
}

__global__ void bias_gelu_backward_kernel(const float* __restrict__ grad, const float* __restrict__ x,
                                          const float* __restrict__ bias, float* __restrict__ out, int64_t n,
                                          int64_t d) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = grad[i] * gelu_derivative(x[i] + bias[i % d]);
  }
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias) {
  check_bias_gelu_args("gradfd::bias_gelu", x, bias, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (x.numel() == 0) {
    return y;
  }
  bias_gelu_kernel<<<blocks_for(x.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), bias.data_ptr<float>(), y.data_ptr<float>(), x.numel(), bias.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias) {
  check_bias_gelu_args("gradfd::bias_gelu_backward", x, bias, c10::DeviceType::CUDA);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.device() == x.device(),
              "gradfd::bias_gelu_backward: grad must be a contiguous float32 tensor of x's shape ", x.sizes(),
              " on ", x.device(), ", got ", grad.scalar_type(), " of shape ", grad.sizes(), " on ", grad.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty_like(x);
  if (x.numel() == 0) {
    return gx;
  }
  bias_gelu_backward_kernel<<<blocks_for(x.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      grad.data_ptr<float>(), x.data_ptr<float>(), bias.data_ptr<float>(), gx.data_ptr<float>(), x.numel(),
      bias.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
}

}  // namespace gradfd
