// CPU kernels of the structured engine: perturbed columns of a product linear in the perturbed parameter, the
// perturbed squared-error sums that follow it, and the perturbed cross-entropies of a product moved by an outer
// product. Mirrors csrc/cuda/structured_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../structured.h"
#include "exp_nonpositive.h"

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


// The terms round(-w[r] * round(log_softmax(logits[r])[target[r]])) of one perturbation's rows, into term (n), with
// logits[r, k] = round(round(base[r, k] + u[r] * v[k]) + bias[k]); 0 on the rows keep[r] leaves out (ignore_index).
// A kept row of weight 0 still computes -logp * 0, NaN where logp is infinite, as PyTorch's nll_loss does.
// base_t is base transposed (K, n) and the scratch x (K * n), mx (n), sum (n) is laid out class-major, so that every
// loop over the rows runs over contiguous memory and vectorises.
template <typename scalar_t, typename opmath_t>
void nll_rows(const scalar_t* base_t, const scalar_t* bias, const double* u, const double* v, const int64_t* target,
              const uint8_t* keep, const opmath_t* w, int64_t n, int64_t k, opmath_t* x, opmath_t* mx, opmath_t* sum,
              double* term) {
  for (int64_t c = 0; c < k; ++c) {
    const double vc = v[c];
    const scalar_t* zc = base_t + c * n;
    opmath_t* xc = x + c * n;
    if (bias == nullptr) {
      for (int64_t r = 0; r < n; ++r) {
        xc[r] = static_cast<opmath_t>(moved_along<scalar_t>(static_cast<double>(zc[r]), u[r], vc));
      }
    } else {
      const opmath_t bc = static_cast<opmath_t>(bias[c]);
      for (int64_t r = 0; r < n; ++r) {
        const opmath_t moved = static_cast<opmath_t>(moved_along<scalar_t>(static_cast<double>(zc[r]), u[r], vc));
        xc[r] = static_cast<opmath_t>(static_cast<scalar_t>(moved + bc));
      }
    }
  }
  std::copy(x, x + n, mx);
  for (int64_t c = 1; c < k; ++c) {
    const opmath_t* xc = x + c * n;
    for (int64_t r = 0; r < n; ++r) {
      mx[r] = (xc[r] > mx[r] || xc[r] != xc[r]) ? xc[r] : mx[r];  // NaN propagates, as in PyTorch's max
    }
  }
  std::fill(sum, sum + n, opmath_t(0));
  for (int64_t c = 0; c < k; ++c) {
    const opmath_t* xc = x + c * n;
    for (int64_t r = 0; r < n; ++r) {
      sum[r] += exp_nonpositive(xc[r] - mx[r]);
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    if (!keep[r]) {
      term[r] = 0.0;
      continue;
    }
    const opmath_t logp = static_cast<opmath_t>(
        static_cast<scalar_t>((x[target[r] * n + r] - mx[r]) - std::log(sum[r])));
    term[r] = static_cast<double>(static_cast<scalar_t>(-logp * w[r]));
  }
}

at::Tensor outer_update_nll_cpu(const at::Tensor& base, const std::optional<at::Tensor>& bias,
                                const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  constexpr const char* op = "gradfd::outer_update_nll: ";
  check_outer_update_nll_args(base, bias, rows, cols, target, weight, c10::DeviceType::CPU);
  const int64_t n = base.size(0), k = base.size(1), b = rows.size(0);
  const int64_t* tg = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    check_nll_target(op, tg[r], k, ignore_index);
  }
  auto out = at::zeros({b}, base.options().dtype(at::kDouble));
  if (b == 0 || n == 0) {
    return out;
  }
  const bool has_bias = bias.has_value() && bias->defined(), has_weight = weight.has_value() && weight->defined();
  const at::Tensor base_t = base.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "gradfd::outer_update_nll", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* z = base_t.data_ptr<scalar_t>();
    const scalar_t* bs = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    // whether each row counts, a safe class index and its weight
    std::vector<uint8_t> keep(n);
    std::vector<int64_t> safe(n);
    std::vector<opmath_t> w(n);
    for (int64_t r = 0; r < n; ++r) {
      keep[r] = tg[r] != ignore_index;
      safe[r] = keep[r] ? tg[r] : 0;
      w[r] = keep[r] && has_weight ? static_cast<opmath_t>(weight->data_ptr<scalar_t>()[tg[r]]) : opmath_t(1);
    }
    // the base point, by the same code: a perturbation that moves nothing changes nothing, exactly
    std::vector<double> zeros(std::max(n, k), 0.0), term0(n);
    std::vector<opmath_t> x0(k * n), mx0(n), sum0(n);
    nll_rows<scalar_t, opmath_t>(z, bs, zeros.data(), zeros.data(), safe.data(), keep.data(), w.data(), n, k,
                                 x0.data(), mx0.data(), sum0.data(), term0.data());
    const double* u = rows.data_ptr<double>();
    const double* v = cols.data_ptr<double>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, b, std::max<int64_t>(1, 32768 / (n * k)), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> x(k * n), mx(n), sum(n);
      std::vector<double> term(n);
      for (int64_t e = begin; e < end; ++e) {
        nll_rows<scalar_t, opmath_t>(z, bs, u + e * n, v + e * k, safe.data(), keep.data(), w.data(), n, k,
                                     x.data(), mx.data(), sum.data(), term.data());
        double acc = 0.0;
        for (int64_t r = 0; r < n; ++r) {
          acc = rn::add(acc, rn::sub(term[r], term0[r]));
        }
        o[e] = acc;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradfd, CPU, m) {
  m.impl("linear_update", &linear_update_cpu);
  m.impl("linear_update_mse", &linear_update_mse_cpu);
  m.impl("outer_update_nll", &outer_update_nll_cpu);
}

}  // namespace gradfd
