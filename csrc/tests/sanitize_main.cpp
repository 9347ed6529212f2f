// A plain executable that drives every gradfd CPU kernel (the structured engine's included) through the dispatcher -- valid inputs of many shapes
// and dtypes, and invalid inputs that must raise -- built with AddressSanitizer and UndefinedBehaviorSanitizer
// (and LeakSanitizer at exit) by .ci/sanitize.sh. No Python is involved, so the sanitizers see only C++.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "cpu/exp_nonpositive.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

torch::jit::Stack call(const char* name, torch::jit::Stack stack) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  return stack;
}

void expect_error(const char* name, torch::jit::Stack stack, const std::string& fragment) {
  try {
    call(name, std::move(stack));
    expect(false, std::string(name) + ": expected an error mentioning '" + fragment + "'");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    expect(msg.find(fragment) != std::string::npos, std::string(name) + ": error '" + msg + "' lacks '" + fragment + "'");
  }
}

void perturb_rows(at::ScalarType dtype, int64_t n, int64_t inner, int64_t c, const std::vector<double>& offsets) {
  auto base = at::randn({n}, at::kDouble).to(dtype);
  const int64_t s = static_cast<int64_t>(offsets.size());
  const int64_t rows_n = s * c + 3;  // a larger buffer than needed
  at::Tensor rows = inner == n ? base.unsqueeze(0).repeat({rows_n, 1})
                               : base.view({n / inner, 1, inner}).repeat({1, rows_n, 1});
  auto columns = at::zeros({rows_n}, at::kLong);
  for (int round = 0; round < 3; ++round) {  // re-target the same buffer: the previous perturbations are undone
    auto index = at::randint(0, n, {c}, at::kLong);
    auto step = at::rand({c}, at::kDouble) * 0.1 + 1e-3;
    auto out = call("gradfd::perturb_rows_", {rows, columns, base, index, step, offsets});
    auto disp = out[0].toTensor();
    expect(disp.sizes() == at::IntArrayRef({s, c}), "perturb_rows_: displacement shape");
    auto logical = (inner == n ? rows : rows.permute({1, 0, 2})).reshape({rows_n, n});
    for (int64_t r = 0; r < s * c; ++r) {
      const int64_t j = index[r % c].item<int64_t>();
      auto row = logical[r];
      auto diff = (row.to(at::kDouble) - base.to(at::kDouble)).abs();
      expect(diff.sum().item<double>() == std::abs(disp[r / c][r % c].item<double>()),
             "perturb_rows_: exactly one entry moved, by the recorded displacement");
      (void)j;
    }
  }
}


// linear_update and linear_update_mse (csrc/structured.cpp, csrc/cpu/structured_cpu.cpp) against their formulas, written
// with ATen ops as the Python twins in gradfd/structured.py are: the moved values bitwise, the sums to rounding.
void linear_update(at::ScalarType dtype, int64_t n, int64_t k, int64_t d, int64_t c, int64_t s) {
  auto base = at::randn({n, k}, at::kDouble).to(dtype);
  auto features = at::randn({n, d}, at::kDouble).to(dtype);
  auto target = at::randn({n, k}, at::kDouble).to(dtype);
  auto column = at::randint(0, k, {c}, at::kLong);
  auto feature = at::randint(0, d, {c}, at::kLong);
  auto delta = at::randn({s, c}, at::kDouble) * 1e-2;
  auto zc = base.index_select(1, column).t().to(at::kDouble);     // (c, n)
  auto xc = features.index_select(1, feature).t().to(at::kDouble);  // (c, n)
  auto out = call("gradfd::linear_update", {base, features, column, feature, delta[0].contiguous()})[0].toTensor();
  auto want = (zc + delta[0].unsqueeze(1) * xc).to(dtype);
  expect(out.sizes() == at::IntArrayRef({c, n}) && out.scalar_type() == dtype, "linear_update: shape and dtype");
  expect(at::equal(out, want), "linear_update matches its formula bitwise");
  const double scale = ((1 + base.to(at::kDouble).abs() + target.to(at::kDouble).abs()).pow(2)).sum().item<double>();
  for (int64_t activation = 0; activation <= 3; ++activation) {
    auto got = call("gradfd::linear_update_mse", {base, features, target, column, feature, delta, activation})[0]
                   .toTensor();
    expect(got.sizes() == at::IntArrayRef({s, c}) && got.scalar_type() == at::kDouble,
           "linear_update_mse: shape and dtype");
    auto moved = (zc.unsqueeze(0) + delta.unsqueeze(2) * xc.unsqueeze(0)).to(dtype);  // (s, c, n)
    auto at_base = base.index_select(1, column).t();
    auto act = [&](const at::Tensor& v) {
      switch (activation) {
        case 1: return at::tanh(v);
        case 2: return at::relu(v);
        case 3: return at::sigmoid(v);
        default: return v;
      }
    };
    auto y = target.index_select(1, column).t().to(at::kDouble);
    auto diff = act(moved).to(at::kDouble) - y.unsqueeze(0), diff0 = act(at_base).to(at::kDouble) - y;
    auto want_mse = (diff * diff - (diff0 * diff0).unsqueeze(0)).sum(-1);
    const double tol = 8 * (dtype == at::kDouble ? 2.3e-16 : dtype == at::kFloat ? 1.2e-7 : 7.9e-3) * scale;
    expect(at::allclose(got, want_mse, 0, tol), "linear_update_mse matches its formula, activation " +
                                                    std::to_string(activation));
  }
}

// outer_update_nll against its formula written with ATen ops (PyTorch's log-softmax sums in another order, and the
// kernel's float exp is a polynomial: equal to rounding, a few units of the dtype's epsilon per row).
void outer_update_nll(at::ScalarType dtype, int64_t n, int64_t k, int64_t b, bool with_bias, bool with_weight) {
  auto base = (at::randn({n, k}, at::kDouble) * 3).to(dtype);
  auto rows = at::randn({b, n}, at::kDouble);
  auto cols = at::randn({b, k}, at::kDouble);
  auto target = at::randint(0, k, {n}, at::kLong);
  if (n > 2) {
    target[1] = -100;  // ignored
  }
  auto bias = with_bias ? at::randn({k}, at::kDouble).to(dtype) : at::Tensor();
  auto weight = with_weight ? (at::rand({k}, at::kDouble) + 0.5).to(dtype) : at::Tensor();
  auto got = call("gradfd::outer_update_nll", {base, with_bias ? c10::IValue(bias) : c10::IValue(), rows, cols,
                                               target, with_weight ? c10::IValue(weight) : c10::IValue(),
                                               int64_t{-100}})[0].toTensor();
  expect(got.sizes() == at::IntArrayRef({b}) && got.scalar_type() == at::kDouble, "outer_update_nll: shape and dtype");
  auto keep = target.ne(-100);
  auto safe = at::where(keep, target, at::zeros_like(target));
  auto w = (with_weight ? weight.index_select(0, safe) : at::ones({n}, dtype)) * keep.to(dtype);
  auto terms = [&](const at::Tensor& moved) {  // (B, n, K) before the bias -> (B, n) float64
    auto logits = with_bias ? moved + bias : moved;
    auto logp = at::log_softmax(logits, 2);
    auto picked = logp.gather(2, safe.view({1, n, 1}).expand({logp.size(0), n, 1})).squeeze(2);
    return (-picked * w).to(at::kDouble);
  };
  auto moved = (base.to(at::kDouble).unsqueeze(0) + rows.unsqueeze(2) * cols.unsqueeze(1)).to(dtype);
  auto want = (terms(moved) - terms(base.unsqueeze(0))).sum(1);
  const double eps = dtype == at::kDouble ? 2.3e-16 : dtype == at::kFloat ? 1.2e-7 : 7.9e-3;
  const double scale = std::max(1.0, terms(moved).abs().max().item<double>());
  expect(at::allclose(got, want, 0, 8 * eps * scale * n), "outer_update_nll matches its formula");
}

// exp_nonpositive (csrc/cpu/exp_nonpositive.h) within 1.5 ulp (float's spacing at the true value) of float64's exp
// over the floats in [-87, 0] along a stride; 0 below -87; NaN for NaN.
void exp_nonpositive_accuracy() {
  double worst = 0;
  for (uint64_t bits = 0x80000000u; bits <= 0xC2AE0000u; bits += 1009) {
    const uint32_t b32 = static_cast<uint32_t>(bits);
    float v;
    std::memcpy(&v, &b32, sizeof v);
    const double want = std::exp(static_cast<double>(v));
    const double ulp = std::ldexp(1.0, std::max(std::ilogb(want), -126) - 23);  // float's spacing at want
    worst = std::max(worst, std::abs(gradfd::exp_nonpositive(v) - want) / ulp);
  }
  expect(worst <= 1.5, "exp_nonpositive within 1.5 ulp of exp on [-87, 0], got " + std::to_string(worst));
  expect(gradfd::exp_nonpositive(-87.5f) == 0.0f && gradfd::exp_nonpositive(-1e30f) == 0.0f &&
             gradfd::exp_nonpositive(-INFINITY) == 0.0f,
         "exp_nonpositive is 0 below -87");
  expect(gradfd::exp_nonpositive(0.0f) == 1.0f && gradfd::exp_nonpositive(-0.0f) == 1.0f, "exp_nonpositive(0) = 1");
  expect(std::isnan(gradfd::exp_nonpositive(NAN)) && std::isnan(gradfd::exp_nonpositive(-NAN)),
         "exp_nonpositive(NaN) is NaN, of either sign");
}
}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    for (int64_t n : {1, 7, 64}) {
      perturb_rows(dtype, n, n, 5, {1.0, -1.0});
      perturb_rows(dtype, n, n, 1, {1.0, -1.0, 2.0, -2.0});
    }
    perturb_rows(dtype, 12, 4, 6, {1.0, -1.0, 2.0, -2.0, 4.0, -4.0});  // split layout
  }
  // central differences
  for (auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    auto losses = at::randn({4, 33}, at::kDouble).to(dtype);
    auto disp = at::randn({4, 33}, at::kDouble);
    auto out = call("gradfd::central_differences", {losses, disp})[0].toTensor();
    auto ref = (losses.to(at::kDouble).slice(0, 0, 4, 2) - losses.to(at::kDouble).slice(0, 1, 4, 2)) /
               (disp.slice(0, 0, 4, 2) - disp.slice(0, 1, 4, 2));
    expect(at::allclose(out, ref, 0, 0), "central_differences matches its formula");
  }
  // the structured engine's kernels: every dtype, one and many rows, every node count up to kMaxNodes (16)
  for (auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    linear_update(dtype, 13, 5, 7, 40, 4);
    linear_update(dtype, 1, 1, 1, 3, 1);
    linear_update(dtype, 70, 3, 300, 100, 16);
    linear_update(dtype, 33, 64, 9, 75, 2);  // more coordinates than one tile of the CPU kernel (32)
  }
  {
    auto z = at::randn({4, 3}, at::kDouble);
    auto empty = call("gradfd::linear_update", {z, z, at::zeros({0}, at::kLong), at::zeros({0}, at::kLong),
                                                at::zeros({0}, at::kDouble)})[0].toTensor();
    expect(empty.sizes() == at::IntArrayRef({0, 4}), "linear_update: no coordinates");
    auto none = call("gradfd::linear_update_mse", {z, z, z, at::zeros({0}, at::kLong), at::zeros({0}, at::kLong),
                                                   at::zeros({2, 0}, at::kDouble), int64_t{0}})[0].toTensor();
    expect(none.sizes() == at::IntArrayRef({2, 0}), "linear_update_mse: no coordinates");
  }
  exp_nonpositive_accuracy();
  for (auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    outer_update_nll(dtype, 32, 10, 40, true, false);
    outer_update_nll(dtype, 5, 1, 3, false, true);  // one class: every log-probability is 0
    outer_update_nll(dtype, 1, 7, 2, true, true);
    outer_update_nll(dtype, 9, 300, 5, false, false);
  }
  // the example op
  for (auto shape : {std::vector<int64_t>{5, 3}, std::vector<int64_t>{2, 4, 8}, std::vector<int64_t>{0, 3}}) {
    auto x = at::randn(shape, at::kFloat);
    auto b = at::randn({shape.back()}, at::kFloat);
    auto y = call("gradfd::bias_gelu", {x, b})[0].toTensor();
    expect(at::allclose(y, at::gelu(x + b), 1e-5, 1e-6), "bias_gelu matches gelu(x + b)");
    auto g = at::randn(shape, at::kFloat);
    auto gx = call("gradfd::bias_gelu_backward", {g, x, b})[0].toTensor();
    expect(gx.sizes() == x.sizes(), "bias_gelu_backward shape");
  }
  // the RMSNorm example op, every dtype, the planted bug included, and no rows
  for (auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    for (auto shape : {std::vector<int64_t>{5, 3}, std::vector<int64_t>{2, 4, 70}, std::vector<int64_t>{0, 6}}) {
      auto x = at::randn(shape, at::kDouble).to(dtype);
      auto w = (at::randn({shape.back()}, at::kDouble) * 0.1 + 1).to(dtype);
      auto out = call("gradfd::rms_norm", {x, w, 1e-6});
      auto y = out[0].toTensor();
      auto rstd = out[1].toTensor();
      auto x64 = x.to(at::kDouble);
      auto ref = x64 * at::rsqrt(x64.pow(2).mean({-1}, true) + 1e-6) * w.to(at::kDouble);
      const double tol = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-5 : 5e-2;
      expect(at::allclose(y.to(at::kDouble), ref, tol, tol), "rms_norm matches its reference");
      for (bool bug : {false, true}) {
        auto g = at::randn(shape, at::kDouble).to(dtype);
        auto grads = call("gradfd::rms_norm_backward", {g, x, w, rstd, bug});
        expect(grads[0].toTensor().sizes() == x.sizes() && grads[1].toTensor().sizes() == w.sizes(),
               "rms_norm_backward shapes");
      }
    }
  }
  // invalid inputs: every one must raise a c10::Error naming the op, never crash
  auto base = at::randn({8}, at::kDouble);
  auto rows = base.unsqueeze(0).repeat({4, 1});
  auto cols = at::zeros({4}, at::kLong);
  auto idx = at::tensor(std::vector<int64_t>{1, 2});
  auto step = at::full({2}, 1e-3, at::kDouble);
  const std::vector<double> off{1.0, -1.0};
  expect_error("gradfd::perturb_rows_", {rows, cols, base, at::tensor(std::vector<int64_t>{1, 8}), step, off},
               "index values must lie in [0, 8)");
  expect_error("gradfd::perturb_rows_", {rows, at::full({4}, 99, at::kLong), base, idx, step, off},
               "columns values must lie in [0, 8)");
  expect_error("gradfd::perturb_rows_", {rows.narrow(0, 0, 3), cols.narrow(0, 0, 3), base, idx, step, off},
               "R >= len(offsets) * len(index)");
  expect_error("gradfd::perturb_rows_", {rows, cols, base.view({2, 4}), idx, step, off}, "base must be 1-D");
  expect_error("gradfd::perturb_rows_", {rows, cols, base, idx, step, std::vector<double>{}},
               "offsets must not be empty");
  expect_error("gradfd::central_differences", {at::zeros({3, 2}, at::kDouble), at::zeros({3, 2}, at::kDouble)},
               "(2K, C)");
  expect_error("gradfd::bias_gelu", {at::randn({3, 2}, at::kDouble), at::randn({2}, at::kDouble)}, "float32");
  expect_error("gradfd::bias_gelu", {at::randn({3, 2}), at::randn({3})}, "last dimension");
  expect_error("gradfd::bias_gelu_backward", {at::randn({3, 3}), at::randn({3, 2}), at::randn({2})},
               "grad must be a contiguous float32 tensor");
  expect_error("gradfd::rms_norm", {at::randn({3, 2}), at::randn({2}, at::kDouble), 1e-6},
               "weight must have x's dtype");
  expect_error("gradfd::rms_norm", {at::randn({3, 2}), at::randn({3}), 1e-6}, "x's last dimension");
  expect_error("gradfd::rms_norm", {at::randn({2, 3}).t(), at::randn({2}), 1e-6}, "must be contiguous");
  expect_error("gradfd::rms_norm_backward", {at::randn({3, 2}), at::randn({3, 2}), at::randn({2}),
                                             at::randn({3}, at::kDouble), false}, "rstd must be");
  expect_error("gradfd::rms_norm_backward", {at::randn({3, 3}), at::randn({3, 2}), at::randn({2}), at::randn({3}),
                                             false}, "grad must be a contiguous");
  {
    auto z = at::randn({13, 5}, at::kDouble);
    auto x = at::randn({13, 7}, at::kDouble);
    auto col = at::randint(0, 5, {4}, at::kLong);
    auto fi = at::randint(0, 7, {4}, at::kLong);
    auto dl = at::randn({2, 4}, at::kDouble);
    expect_error("gradfd::linear_update", {z, x, at::full({4}, 5, at::kLong), fi, dl[0].contiguous()},
                 "column values must lie in [0, 5)");
    expect_error("gradfd::linear_update", {z, x, col, at::full({4}, -1, at::kLong), dl[0].contiguous()},
                 "feature values must lie in [0, 7)");
    expect_error("gradfd::linear_update", {z, x, col, fi, dl}, "delta must be a contiguous 1-D float64 tensor");
    expect_error("gradfd::linear_update", {z, x.narrow(0, 0, 12), col, fi, dl[0].contiguous()}, "n = 13");
    expect_error("gradfd::linear_update_mse", {z, x, z, col, fi, at::randn({17, 4}, at::kDouble), int64_t{0}},
                 "between 1 and 16 rows");
    expect_error("gradfd::linear_update_mse", {z, x, z, col, fi, dl, int64_t{7}}, "activation must be 0");
    expect_error("gradfd::linear_update_mse", {z, x, z.narrow(1, 0, 4), col, fi, dl, int64_t{0}},
                 "target must have base's shape");
    expect_error("gradfd::linear_update_mse", {z, x, z, at::full({4}, 9, at::kLong), fi, dl, int64_t{1}},
                 "column values must lie in [0, 5)");
    expect_error("gradfd::linear_update_mse", {z.t(), x, z, col, fi, dl, int64_t{0}}, "must be 2-D (n, D) with n = 5");
    auto r = at::randn({3, 13}, at::kDouble);
    auto c = at::randn({3, 5}, at::kDouble);
    auto t = at::randint(0, 5, {13}, at::kLong);
    const c10::IValue none;
    expect_error("gradfd::outer_update_nll", {z, none, r, c, at::full({13}, 5, at::kLong), none, int64_t{-100}},
                 "target values must lie in [0, 5) or equal ignore_index = -100, got 5");
    expect_error("gradfd::outer_update_nll", {z, none, r.narrow(1, 0, 12), c, t, none, int64_t{-100}},
                 "rows must be a (B, n) float64 tensor with n = 13");
    expect_error("gradfd::outer_update_nll", {z, none, r, c.narrow(0, 0, 2), t, none, int64_t{-100}},
                 "cols must be a (B, K) float64 tensor with B = 3");
    expect_error("gradfd::outer_update_nll", {z, at::randn({5}, at::kFloat), r, c, t, none, int64_t{-100}},
                 "bias must be a 1-D tensor of K = 5 entries in base's dtype");
    expect_error("gradfd::outer_update_nll", {z, none, r, c, t, at::randn({4}, at::kDouble), int64_t{-100}},
                 "weight must be a 1-D tensor of K = 5");
    expect_error("gradfd::outer_update_nll", {z.t(), none, r, c, t, none, int64_t{-100}}, "rows must be");
    expect_error("gradfd::outer_update_nll", {z, none, r, c, t.to(at::kInt), none, int64_t{-100}},
                 "target must be a 1-D int64 tensor");
  }
  if (failures == 0) {
    std::printf("sanitize_main: all kernel checks passed\n");
  }
  return failures == 0 ? 0 : 1;
}
