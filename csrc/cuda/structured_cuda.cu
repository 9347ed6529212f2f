// CUDA kernels of the structured engine: perturbed columns of a product linear in the perturbed parameter, the
// perturbed squared-error sums that follow it, and the perturbed cross-entropies of a product moved by an outer
// product. Mirrors csrc/cpu/structured_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../structured.h"

namespace gradfd {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535)));
}

// linear_update stages its (C, n) output through shared memory in tiles of kTile coordinates x kTile rows, so that
// both its gathers and its stores are coalesced; a block is kTile x kTileRows threads.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

// A tile is computed with threadIdx.x along the coordinates (neighbouring threads read neighbouring columns of base
// or features: a weight's consecutive entries move consecutive output columns or feature columns) and stored with
// threadIdx.x along the rows, so consecutive threads write consecutive addresses of out. The tile loop is uniform
// across the block, so every thread reaches both barriers.
template <typename scalar_t>
__global__ void linear_update_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ features,
                                     const int64_t* __restrict__ column, const int64_t* __restrict__ feature,
                                     const double* __restrict__ delta, scalar_t* __restrict__ out, int64_t n,
                                     int64_t k, int64_t d, int64_t c) {
  __shared__ scalar_t tile[kTile][kTile + 1];  // [row][coordinate]; +1 keeps the transposed reads off one bank
  const int64_t row_tiles = (n + kTile - 1) / kTile;
  const int64_t tiles = row_tiles * ((c + kTile - 1) / kTile);
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t q0 = (t / row_tiles) * kTile, r0 = (t % row_tiles) * kTile;
    const int64_t q = q0 + threadIdx.x;
    if (q < c) {
      const int64_t j = column[q], i = feature[q];
      const double dq = delta[q];
#pragma unroll
      for (int y = threadIdx.y; y < kTile; y += kTileRows) {
        const int64_t r = r0 + y;
        if (r < n) {
          tile[y][threadIdx.x] = moved_along<scalar_t>(static_cast<double>(base[r * k + j]), dq,
                                                       static_cast<double>(features[r * d + i]));
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int y = threadIdx.y; y < kTile; y += kTileRows) {
      const int64_t qy = q0 + y, r = r0 + threadIdx.x;
      if (qy < c && r < n) {
        out[qy * n + r] = tile[threadIdx.x][y];
      }
    }
    __syncthreads();  // the tile is rewritten by the next iteration
  }
}

// One thread per coordinate, its stencil nodes in registers; the rows stream past once per coordinate. kNodes is a
// compile-time bound on the node count s: every loop over the nodes runs to kNodes with a `q < s` guard and is
// unrolled, so dl[] and acc[] are only ever indexed by constants and stay in registers (ptxas: 0 bytes stack
// frame, benchmarks/cuda_evidence.sh). The launcher picks the smallest kNodes >= s, which keeps the register count
// of the common 2- and 4-node stencils low.
template <typename scalar_t, int kNodes>
__global__ void linear_update_mse_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ features,
                                         const scalar_t* __restrict__ target, const int64_t* __restrict__ column,
                                         const int64_t* __restrict__ feature, const double* __restrict__ delta,
                                         double* __restrict__ out, int64_t n, int64_t k, int64_t d, int64_t c,
                                         int64_t s, int64_t activation) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < c;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double dl[kNodes];
    double acc[kNodes];
#pragma unroll
    for (int q = 0; q < kNodes; ++q) {
      dl[q] = q < s ? delta[q * c + e] : 0.0;
      acc[q] = 0.0;
    }
    const int64_t j = column[e], i = feature[e];
    for (int64_t r = 0; r < n; ++r) {
      const double zr = static_cast<double>(base[r * k + j]);
      const double xr = static_cast<double>(features[r * d + i]);
      const double yr = static_cast<double>(target[r * k + j]);
      // the element's squared error at the base point, subtracted term by term (the changed terms only)
      const double d0 = rn::sub(static_cast<double>(activate<scalar_t, opmath_t>(base[r * k + j], activation)), yr);
      const double e0 = rn::mul(d0, d0);
#pragma unroll
      for (int q = 0; q < kNodes; ++q) {
        if (q < s) {
          const scalar_t moved = moved_along<scalar_t>(zr, dl[q], xr);
          const double diff = rn::sub(static_cast<double>(activate<scalar_t, opmath_t>(moved, activation)), yr);
          acc[q] = rn::add(acc[q], squared_minus(diff, e0));
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kNodes; ++q) {
      if (q < s) {
        out[q * c + e] = acc[q];
      }
    }
  }
}

template <typename scalar_t, int kNodes>
void launch_linear_update_mse(const at::Tensor& base, const at::Tensor& features, const at::Tensor& target,
                              const at::Tensor& column, const at::Tensor& feature, const at::Tensor& delta,
                              at::Tensor& out, int64_t activation, cudaStream_t stream) {
  const int64_t n = base.size(0), k = base.size(1), d = features.size(1), c = column.numel(), s = delta.size(0);
  linear_update_mse_kernel<scalar_t, kNodes><<<blocks_for(c), kThreads, 0, stream>>>(
      base.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
      column.data_ptr<int64_t>(), feature.data_ptr<int64_t>(), delta.data_ptr<double>(), out.data_ptr<double>(), n,
      k, d, c, s, activation);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_range_cuda(const char* op, const char* name, const at::Tensor& v, int64_t n) {
  if (v.numel() > 0) {
    const auto bounds = at::aminmax(v);
    check_index_range(op, name, std::get<0>(bounds).item<int64_t>(), std::get<1>(bounds).item<int64_t>(), n);
  }
}

at::Tensor linear_update_cuda(const at::Tensor& base, const at::Tensor& features, const at::Tensor& column,
                              const at::Tensor& feature, const at::Tensor& delta) {
  check_linear_update_args(base, features, column, feature, delta, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t n = base.size(0), k = base.size(1), d = features.size(1), c = column.numel();
  auto out = at::empty({c, n}, base.options());
  if (out.numel() == 0) {
    return out;
  }
  check_range_cuda("gradfd::linear_update: ", "column", column, k);
  check_range_cuda("gradfd::linear_update: ", "feature", feature, d);
  const int64_t tiles = ((n + kTile - 1) / kTile) * ((c + kTile - 1) / kTile);
  const int grid = static_cast<int>(std::min<int64_t>(tiles, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::linear_update", [&] {
    linear_update_kernel<scalar_t><<<grid, dim3(kTile, kTileRows), 0, stream>>>(
        base.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), column.data_ptr<int64_t>(),
        feature.data_ptr<int64_t>(), delta.data_ptr<double>(), out.data_ptr<scalar_t>(), n, k, d, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor linear_update_mse_cuda(const at::Tensor& base, const at::Tensor& features, const at::Tensor& target,
                                  const at::Tensor& column, const at::Tensor& feature, const at::Tensor& delta,
                                  int64_t activation) {
  check_linear_update_mse_args(base, features, target, column, feature, delta, activation, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t k = base.size(1), d = features.size(1), c = column.numel(), s = delta.size(0);
  auto out = at::zeros({s, c}, base.options().dtype(at::kDouble));
  if (c == 0) {
    return out;
  }
  check_range_cuda("gradfd::linear_update_mse: ", "column", column, k);
  check_range_cuda("gradfd::linear_update_mse: ", "feature", feature, d);
  auto stream = at::cuda::getCurrentCUDAStream();
  static_assert(kMaxNodes == 16, "the node-count buckets below end at kMaxNodes");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::linear_update_mse", [&] {
    if (s <= 2) {
      launch_linear_update_mse<scalar_t, 2>(base, features, target, column, feature, delta, out, activation, stream);
    } else if (s <= 4) {
      launch_linear_update_mse<scalar_t, 4>(base, features, target, column, feature, delta, out, activation, stream);
    } else if (s <= 8) {
      launch_linear_update_mse<scalar_t, 8>(base, features, target, column, feature, delta, out, activation, stream);
    } else {
      launch_linear_update_mse<scalar_t, 16>(base, features, target, column, feature, delta, out, activation, stream);
    }
  });
  return out;
}

C10_DEVICE inline float log_of(float v) { return ::logf(v); }
C10_DEVICE inline double log_of(double v) { return ::log(v); }

// One row's term round(-w * round(log_softmax(logits)[t])) with logits[k] = round(round(base[k] + u * v[k]) +
// bias[k]), as the CPU kernel's nll_rows computes it (exp and log are CUDA's, the CPU's a polynomial: both within
// 2 ulp). The logits are recomputed in each of the two passes over the classes rather than stored.
template <typename scalar_t, typename opmath_t>
C10_DEVICE double nll_row(const scalar_t* __restrict__ base_r, const scalar_t* __restrict__ bias, double u,
                          const double* __restrict__ v, int64_t k, int64_t t, opmath_t w) {
  auto logit = [&](int64_t c) {
    const scalar_t moved = moved_along<scalar_t>(static_cast<double>(base_r[c]), u, v == nullptr ? 0.0 : v[c]);
    return bias == nullptr ? static_cast<opmath_t>(moved)
                           : static_cast<opmath_t>(static_cast<scalar_t>(rn::add(
                                 static_cast<opmath_t>(moved), static_cast<opmath_t>(bias[c]))));
  };
  opmath_t mx = logit(0);
  for (int64_t c = 1; c < k; ++c) {
    const opmath_t x = logit(c);
    mx = (x > mx || x != x) ? x : mx;  // NaN propagates, as in PyTorch's max
  }
  opmath_t sum = 0;
  for (int64_t c = 0; c < k; ++c) {
    sum = rn::add(sum, exp_of(static_cast<opmath_t>(logit(c) - mx)));
  }
  // rn::sub: nvcc would otherwise fuse log's last multiply into the subtraction (benchmarks/cuda_evidence.sh)
  const opmath_t logp = static_cast<opmath_t>(static_cast<scalar_t>(rn::sub(rn::sub(logit(t), mx), log_of(sum))));
  return static_cast<double>(static_cast<scalar_t>(-logp * w));
}

// The base point's terms, one thread per row (0 on ignored rows), by the same code as the perturbed ones.
template <typename scalar_t>
__global__ void outer_update_nll_base_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ bias,
                                             const int64_t* __restrict__ target, const scalar_t* __restrict__ weight,
                                             double* __restrict__ term0, int64_t n, int64_t k, int64_t ignore_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = target[r];
    term0[r] = t == ignore_index ? 0.0
                                 : nll_row<scalar_t, opmath_t>(base + r * k, bias, 0.0, nullptr, k, t,
                                                               weight == nullptr ? opmath_t(1)
                                                                                 : static_cast<opmath_t>(weight[t]));
  }
}

// One warp per perturbation, its lanes over the rows; each lane sums its rows in order and the warp adds the lanes
// in a fixed tree (__shfl_down_sync), so the result does not depend on scheduling (the CPU kernel sums the rows in
// order: the two differ in the order of that float64 sum, and in exp and log). The warp loop is uniform across the
// warp, so every lane reaches the shuffles.
template <typename scalar_t>
__global__ void outer_update_nll_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ bias,
                                        const double* __restrict__ rows, const double* __restrict__ cols,
                                        const int64_t* __restrict__ target, const scalar_t* __restrict__ weight,
                                        const double* __restrict__ term0, double* __restrict__ out, int64_t n,
                                        int64_t k, int64_t b, int64_t ignore_index) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kWarp = 32;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t e = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; e < b; e += warps) {
    double acc = 0.0;
    for (int64_t r = lane; r < n; r += kWarp) {
      const int64_t t = target[r];
      if (t != ignore_index) {
        const opmath_t w = weight == nullptr ? opmath_t(1) : static_cast<opmath_t>(weight[t]);
        const double term = nll_row<scalar_t, opmath_t>(base + r * k, bias, rows[e * n + r], cols + e * k, k, t, w);
        acc = rn::add(acc, rn::sub(term, term0[r]));
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      acc = rn::add(acc, __shfl_down_sync(0xffffffffu, acc, offset));
    }
    if (lane == 0) {
      out[e] = acc;
    }
  }
}

at::Tensor outer_update_nll_cuda(const at::Tensor& base, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  constexpr const char* op = "gradfd::outer_update_nll: ";
  check_outer_update_nll_args(base, bias, rows, cols, target, weight, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t n = base.size(0), k = base.size(1), b = rows.size(0);
  auto out = at::zeros({b}, base.options().dtype(at::kDouble));
  if (n > 0) {
    // a target outside [0, K) that is not ignore_index: the first offender, read back once
    const auto bad = target.ne(ignore_index).logical_and(target.lt(0).logical_or(target.ge(k))).nonzero();
    if (bad.size(0) > 0) {
      check_nll_target(op, target[bad[0][0].item<int64_t>()].item<int64_t>(), k, ignore_index);
    }
  }
  if (b == 0 || n == 0) {
    return out;
  }
  const bool has_bias = bias.has_value() && bias->defined(), has_weight = weight.has_value() && weight->defined();
  auto term0 = at::empty({n}, base.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::outer_update_nll", [&] {
    const scalar_t* bs = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ws = has_weight ? weight->data_ptr<scalar_t>() : nullptr;
    outer_update_nll_base_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        base.data_ptr<scalar_t>(), bs, target.data_ptr<int64_t>(), ws, term0.data_ptr<double>(), n, k, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    outer_update_nll_kernel<scalar_t><<<blocks_for(b * 32), kThreads, 0, stream>>>(
        base.data_ptr<scalar_t>(), bs, rows.data_ptr<double>(), cols.data_ptr<double>(), target.data_ptr<int64_t>(),
        ws, term0.data_ptr<double>(), out.data_ptr<double>(), n, k, b, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CUDA, m) {
  m.impl("linear_update", &linear_update_cuda);
  m.impl("linear_update_mse", &linear_update_mse_cuda);
  m.impl("outer_update_nll", &outer_update_nll_cuda);
}

}  // namespace gradfd
