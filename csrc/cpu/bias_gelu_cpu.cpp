// CPU kernels of the fused bias + GELU example op (float32 only, as custom kernels often are).
// Mirrors csrc/cuda/bias_gelu_cuda.cu. y = gelu(x + bias) with the exact (erf) GELU; bias broadcasts over the
// last dimension of x.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gradfd.h"

namespace gradfd {
namespace {

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias) {
  check_bias_gelu_args("gradfd::bias_gelu", x, bias, c10::DeviceType::CPU);
  auto y = at::empty_like(x);
  const int64_t d = bias.numel();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      yp[i] = gelu(xp[i] + bp[i % d]);
    }
  });
  return y;
}

at::Tensor bias_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias) {
  check_bias_gelu_args("gradfd::bias_gelu_backward", x, bias, c10::DeviceType::CPU);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "gradfd::bias_gelu_backward: grad must be a contiguous float32 tensor of x's shape ", x.sizes(),
              ", got ", grad.scalar_type(), " of shape ", grad.sizes());
  auto gx = at::empty_like(x);
  const int64_t d = bias.numel();
  const float* g = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* out = gx.data_ptr<float>();
  at::parallel_for(0, x.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = g[i] * gelu_derivative(xp[i] + bp[i % d]);
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}

}  // namespace gradfd
